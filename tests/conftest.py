"""Shared fixtures: real data paths, a tiny hand-built ONNX model that meets the model contract
(for fast registry tests), and one bootstrapped state directory per test session."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from models.spec import ONNX_EMBEDDING, ONNX_INPUT, ONNX_LOGITS, ModelSpec, PreprocessConfig

ROOT = Path(__file__).resolve().parents[1]
HYMENOPTERA = ROOT.parent / "shared" / "data" / "hymenoptera" / "train"


@pytest.fixture(scope="session")
def hymenoptera() -> Path:
    if not HYMENOPTERA.is_dir():
        pytest.fail(f"test data missing: {HYMENOPTERA} (CI checks out ../shared beside the repo)")
    return HYMENOPTERA


def jpeg_files(root: Path, label: str) -> list[Path]:
    return sorted((root / label).glob("*.jpg"))


def make_subset(source: Path, dest: Path, per_class: int, offset: int = 0) -> Path:
    """A labelled folder of symlinks to ``per_class`` real photos of each class."""
    for class_dir in sorted(p for p in source.iterdir() if p.is_dir()):
        target = dest / class_dir.name
        target.mkdir(parents=True, exist_ok=True)
        for photo in jpeg_files(source, class_dir.name)[offset : offset + per_class]:
            (target / photo.name).symlink_to(photo)
    return dest


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


def write_tiny_onnx(path: Path, num_classes: int = 2, seed: int = 0) -> Path:
    """input (batch, 3, 4, 4) -> global average pool -> embedding (batch, 3) -> Gemm -> logits."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    weight = numpy_helper.from_array(rng.normal(size=(num_classes, 3)).astype(np.float32), "W")
    bias = numpy_helper.from_array(np.zeros(num_classes, np.float32), "B")
    nodes = [
        helper.make_node("GlobalAveragePool", [ONNX_INPUT], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], [ONNX_EMBEDDING], axis=1),
        helper.make_node("Gemm", [ONNX_EMBEDDING, "W", "B"], [ONNX_LOGITS], transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info(ONNX_INPUT, TensorProto.FLOAT, ["batch", 3, TINY_SIZE, TINY_SIZE])],
        [
            helper.make_tensor_value_info(ONNX_LOGITS, TensorProto.FLOAT, ["batch", num_classes]),
            helper.make_tensor_value_info(ONNX_EMBEDDING, TensorProto.FLOAT, ["batch", 3]),
        ],
        initializer=[weight, bias],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


@pytest.fixture
def state_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    home = tmp_path / "state"
    monkeypatch.setenv("TRANSFER_SERVE_HOME", str(home))
    yield home


@pytest.fixture(scope="session")
def bootstrapped_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A state directory holding the bootstrap model (built once per session: ~15 s)."""
    from store.state import open_state
    from training.pipeline import bootstrap

    home = tmp_path_factory.mktemp("bootstrapped")
    bootstrap(open_state(home=home).registry)
    return home


def subprocess_env(home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["TRANSFER_SERVE_HOME"] = str(home)
    return env
