"""``training/export.py``, real network level (slow): the dynamo exporter's graph (padding folded
into the convolutions, one self-contained file, what TensorRT's ONNX parser takes); ONNX export
parity, the check passes for a faithful export and fails for an unfaithful one; a network the
dynamo exporter cannot trace falls back to the TorchScript exporter, and says so."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from models.errors import ExportError
from models.onnx_io import check_onnx_contract, cpu_session, run_in_batches, serving_graph
from models.preprocess import decode_image, preprocess_image
from tests.support.images import jpeg_files
from training.backbones import ClassifierWithEmbedding, create_backbone
from training.export import DYNAMO, TORCHSCRIPT, check_parity, export_onnx

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory, hymenoptera: Path):
    backbone = create_backbone()
    backbone.reset_head(2)
    photos = jpeg_files(hymenoptera, "ants")[:3] + jpeg_files(hymenoptera, "bees")[:3]
    inputs = np.stack([preprocess_image(decode_image(p.read_bytes()), backbone.preprocess)
                       for p in photos])
    path = tmp_path_factory.mktemp("export") / "model.onnx"
    parity = export_onnx(backbone.model, path, inputs)
    return backbone, path, inputs, parity


def test_export_matches_torch_on_real_photos(exported) -> None:
    backbone, path, inputs, parity = exported
    assert parity.images == 6
    assert parity.max_logit_diff < 1e-4 and parity.top1_agreement == 1.0


def test_exported_graph_has_the_contract_and_a_dynamic_batch(exported) -> None:
    from models.spec import ModelSpec

    backbone, path, inputs, _ = exported
    spec = ModelSpec(labels=("ants", "bees"), preprocess=backbone.preprocess, backbone=backbone.name,
                     backbone_fingerprint=backbone.fingerprint(), embedding_size=1280)
    check_onnx_contract(path, spec)
    session = cpu_session(path)
    for batch in (1, 5):
        logits, embedding = run_in_batches(session, inputs[:batch], batch_size=batch)
        assert logits.shape == (batch, 2) and embedding.shape == (batch, 1280)


def test_parity_check_catches_a_graph_that_differs_from_torch(exported) -> None:
    backbone, path, inputs, _ = exported
    wrapper = ClassifierWithEmbedding(backbone.model).eval()
    with torch.no_grad():
        backbone.model.get_classifier().bias += 1e-2  # torch now disagrees with the file
    try:
        with pytest.raises(ExportError, match="differs from torch"):
            check_parity(wrapper, path, inputs)
    finally:
        with torch.no_grad():
            backbone.model.get_classifier().bias -= 1e-2


def test_export_needs_real_images(exported, tmp_path: Path) -> None:
    backbone, _, inputs, _ = exported
    with pytest.raises(ExportError, match="at least two"):
        export_onnx(backbone.model, tmp_path / "m.onnx", inputs[:1])


# -- the graph itself -------------------------------------------------------------------------------

#: What the TorchScript exporter adds to compute TF-"same" padding from the input at run time.
RUNTIME_PADDING_OPS = {"Shape", "Gather", "Ceil", "Pad", "ConstantOfShape", "Concat", "Slice"}


def op_types(graph: bytes | Path) -> dict[str, int]:
    import onnx

    model = onnx.load_from_string(graph) if isinstance(graph, bytes) else onnx.load(str(graph))
    counts: dict[str, int] = {}
    for node in model.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def test_the_dynamo_graph_has_its_padding_folded_into_the_convolutions(exported) -> None:
    _, path, _, parity = exported
    assert parity.exporter == DYNAMO
    ops = op_types(path)
    assert not RUNTIME_PADDING_OPS & set(ops), ops
    assert ops["Conv"] == 49 and sum(ops.values()) < 100  # lite0's 49 convolutions and little else
    assert [p.name for p in path.parent.iterdir()] == ["model.onnx"]  # no external-data file beside it


#: Operators of the served graphs (fp32, and with the uint8 pixel input) that TensorRT 10's ONNX
#: parser supports (onnx-tensorrt docs/operators.md), and the opsets it reads (9 to 20).
TENSORRT_OPS = {"Conv", "Clip", "Add", "ReduceMean", "Reshape", "Gemm", "Cast", "Gather", "Transpose",
                "GlobalAveragePool", "Flatten", "Relu", "Mul", "Sigmoid"}
TENSORRT_OPSETS = range(9, 21)


def test_the_served_graphs_meet_tensorrts_parser(exported) -> None:
    import onnx

    backbone, path, _, _ = exported
    for graph in (path.read_bytes(), serving_graph(path, pixels=backbone.preprocess)):
        model = onnx.load_from_string(graph)
        assert set(op_types(graph)) <= TENSORRT_OPS, set(op_types(graph)) - TENSORRT_OPS
        assert [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")][0] in TENSORRT_OPSETS
        weights = {init.name for init in model.graph.initializer}
        convs = [node for node in model.graph.node if node.op_type == "Conv"]
        assert all(node.input[1] in weights for node in convs)  # TensorRT: Conv weights are initializers
        assert all(init.data_location != onnx.TensorProto.EXTERNAL for init in model.graph.initializer)


# -- a network the dynamo exporter cannot trace ---------------------------------------------------


class BranchingNet(nn.Module):
    """A timm-shaped network (``forward_features``, ``forward_head``, ``get_classifier``) whose
    features branch on a tensor's value: ``torch.export`` cannot trace a data-dependent branch;
    the TorchScript tracer records the branch real images take."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.classifier = nn.Linear(8, 2)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        features = self.conv(x)
        if features.abs().sum() > 0:  # data-dependent: always true for a real image
            features = torch.relu(features)
        return features

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        pooled = x.mean(dim=(2, 3))
        return pooled if pre_logits else self.classifier(pooled)

    def get_classifier(self) -> nn.Module:
        return self.classifier


def test_a_network_the_dynamo_exporter_cannot_trace_falls_back_and_says_so(
    exported, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _, _, inputs, _ = exported
    torch.manual_seed(0)
    net = BranchingNet().eval()
    with caplog.at_level("WARNING", logger="training.export"):
        parity = export_onnx(net, tmp_path / "model.onnx", inputs)
    assert parity.exporter == TORCHSCRIPT and parity.max_logit_diff < 1e-4
    [warning] = [r.getMessage() for r in caplog.records if r.name == "training.export"]
    assert "the dynamo ONNX exporter failed for BranchingNet" in warning
    assert "falling back to the torchscript exporter" in warning
    logits, embedding = run_in_batches(cpu_session(tmp_path / "model.onnx"), inputs)
    assert logits.shape == (len(inputs), 2) and embedding.shape == (len(inputs), 8)


def test_when_every_exporter_fails_the_error_names_the_last(exported, tmp_path: Path) -> None:
    _, _, inputs, _ = exported
    with pytest.raises(ExportError, match="the dynamo ONNX exporter failed"):
        export_onnx(BranchingNet().eval(), tmp_path / "model.onnx", inputs, exporters=(DYNAMO,))
