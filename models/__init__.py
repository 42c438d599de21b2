"""Torch-free model contract shared by the service and training: spec, preprocessing, ONNX artifacts, registry."""
