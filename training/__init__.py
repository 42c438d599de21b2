"""Training: backbones, datasets, transfer-learning strategies, reports, ONNX export, CLI."""
