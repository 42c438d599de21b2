"""Tiny real ONNX models that meet the model contract, and registries holding them: real
onnxruntime sessions and real files in milliseconds, for tests of everything around a network."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from models.spec import ONNX_EMBEDDING, ONNX_INPUT, ONNX_LOGITS, ModelSpec, PreprocessConfig
from store.local.registry import DirectoryRegistry
from store.registry import ModelRegistry, ModelVersion
from tests.support.images import grey_png

if TYPE_CHECKING:
    from service.runtime import ModelRuntime

TINY_SIZE = 4
TINY_LABELS = ("cat", "dog")


def tiny_spec(labels: tuple[str, ...] = TINY_LABELS) -> ModelSpec:
    return ModelSpec(
        labels=labels,
        preprocess=PreprocessConfig(input_size=TINY_SIZE, crop_pct=1.0),
        backbone="tiny-test-net",
        backbone_fingerprint="0" * 64,
        embedding_size=3,
    )


def _save(nodes: list[Any], name: str, initializers: list[Any], num_classes: int, path: Path) -> Path:
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        nodes, name,
        [helper.make_tensor_value_info(ONNX_INPUT, TensorProto.FLOAT, ["batch", 3, TINY_SIZE, TINY_SIZE])],
        [helper.make_tensor_value_info(ONNX_LOGITS, TensorProto.FLOAT, ["batch", num_classes]),
         helper.make_tensor_value_info(ONNX_EMBEDDING, TensorProto.FLOAT, ["batch", 3])],
        initializer=initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def write_tiny_onnx(path: Path, num_classes: int = 2, seed: int = 0) -> Path:
    """input (batch, 3, 4, 4) -> global average pool -> embedding (batch, 3) -> Gemm -> logits."""
    from onnx import helper, numpy_helper

    rng = np.random.default_rng(seed)
    weight = numpy_helper.from_array(rng.normal(size=(num_classes, 3)).astype(np.float32), "W")
    bias = numpy_helper.from_array(np.zeros(num_classes, np.float32), "B")
    nodes = [
        helper.make_node("GlobalAveragePool", [ONNX_INPUT], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], [ONNX_EMBEDDING], axis=1),
        helper.make_node("Gemm", [ONNX_EMBEDDING, "W", "B"], [ONNX_LOGITS], transB=1),
    ]
    return _save(nodes, "tiny", [weight, bias], num_classes, path)


def write_conv_onnx(path: Path) -> Path:
    """Like :func:`write_tiny_onnx`, with a 1x1 Conv + Relu in front, so quantising has weights
    per channel and activations to calibrate; the head separates dark from light."""
    from onnx import helper, numpy_helper

    conv = numpy_helper.from_array((np.eye(3, dtype=np.float32) * 0.5 + 0.1).reshape(3, 3, 1, 1), "CW")
    conv_b = numpy_helper.from_array(np.full(3, 3.0, np.float32), "CB")  # keeps normalised pixels positive
    head = numpy_helper.from_array(np.array([[-1, -1, -1], [1, 1, 1]], np.float32), "W")
    head_b = numpy_helper.from_array(np.array([8.0, -8.0], np.float32), "B")
    nodes = [
        helper.make_node("Conv", [ONNX_INPUT, "CW", "CB"], ["conv"], name="conv"),
        helper.make_node("Relu", ["conv"], ["relu"], name="relu"),
        helper.make_node("GlobalAveragePool", ["relu"], ["pooled"], name="pool"),
        helper.make_node("Flatten", ["pooled"], [ONNX_EMBEDDING], axis=1, name="flatten"),
        helper.make_node("Gemm", [ONNX_EMBEDDING, "W", "B"], [ONNX_LOGITS], transB=1, name="head"),
    ]
    return _save(nodes, "tiny-conv", [conv, conv_b, head, head_b], 2, path)


def tiny_crops(count: int, seed: int = 0) -> np.ndarray:
    """Random uint8 crops the size of the tiny models' input; every channel different, so a
    wrong channel order or layout shows."""
    return np.random.default_rng(seed).integers(0, 256, (count, TINY_SIZE, TINY_SIZE, 3), dtype=np.uint8)


# -- registries ---------------------------------------------------------------------------------


def register_tiny(registry: ModelRegistry, tmp_path: Path, **overrides: Any) -> ModelVersion:
    """Registers a new tiny model (with embeddings, details and a report) in ``registry``;
    keyword arguments replace :meth:`ModelRegistry.register`'s."""
    onnx_file = write_tiny_onnx(tmp_path / f"tiny-{len(registry.versions())}.onnx")
    report = tmp_path / "report"
    report.mkdir(exist_ok=True)
    (report / "report.md").write_text("# report\n")
    kwargs: dict[str, Any] = dict(
        onnx_file=onnx_file, spec=tiny_spec(), metrics={"accuracy": 0.5},
        embeddings=np.arange(12, dtype=np.float32).reshape(4, 3),
        embedding_targets=np.array([0, 1, 0, 1]), parent=None, dataset_fingerprint="abc",
        details={"strategy": "head"}, report_dir=report,
    )
    kwargs.update(overrides)
    return registry.register(**kwargs)


def registry_with(tmp_path: Path, count: int) -> DirectoryRegistry:
    """A single-machine registry in ``tmp_path/home`` holding ``count`` tiny versions (v1 active)."""
    registry = DirectoryRegistry(tmp_path / "home")
    for _ in range(count):
        register_tiny(registry, tmp_path)
    return registry


def damage(version_path: Path, name: str = "model.onnx") -> None:
    """Flip bytes in the middle of a stored file, as a bad disk or a careless hand would."""
    with (version_path / name).open("r+b") as fh:
        fh.seek(10)
        fh.write(b"\x00garbage\x00")


def pointer(registry: DirectoryRegistry) -> dict[str, Any]:
    """The active pointer file, as written."""
    return dict(json.loads((registry.home / "active_version.json").read_text()))


def tiny_runtime(registry: DirectoryRegistry, *, max_batch_size: int = 2, **settings: Any) -> ModelRuntime:
    """An inference worker's :class:`service.runtime.ModelRuntime` on the CPU, one thread."""
    from service.runtime import ModelRuntime
    from service.settings import Settings

    return ModelRuntime(Settings(home=registry.home, providers="cpu", inference_workers=1, intra_op_threads=1,
                                 max_batch_size=max_batch_size, **settings), registry)


# -- a version trained on flat grey images (dark: cat, light: dog) -----------------------------

GREYS = {"cat": [0, 20, 40, 60, 80], "dog": [170, 190, 210, 230, 250]}


def grey_folder(root: Path, greys: dict[str, list[int]]) -> tuple[Path, list[str], list[int]]:
    """One subfolder per label of flat grey PNGs; returns (folder, their sha256, label index)."""
    hashes, targets = [], []
    for index, (label, values) in enumerate(sorted(greys.items())):
        (root / label).mkdir(parents=True, exist_ok=True)
        for value in values:
            data = grey_png(value)
            (root / label / f"{value}.png").write_bytes(data)
            hashes.append(hashlib.sha256(data).hexdigest())
            targets.append(index)
    return root, hashes, targets
