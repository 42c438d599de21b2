"""Head-only retraining, in process, on a tiny real ONNX model whose embedding is an image's mean
colour: solid-colour photos are separable, so every outcome of the gate can be staged exactly."""

from __future__ import annotations

import io
import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from models.onnx_io import read_head, replace_head
from models.retrain import RetrainParams, RetrainRefused, is_held_out
from service.jobs import retrainable_parent
from service.retrain import RetrainResult, retrain
from store.state import State, open_state
from tests.conftest import tiny_spec, write_tiny_onnx

COLOURS = {"red": (230, 20, 20), "blue": (20, 20, 230), "green": (20, 230, 20)}


def photo(colour: tuple[int, int, int], seed: int) -> bytes:
    """A solid-colour 8x8 PNG with a little noise, so every one has its own bytes (and hash)."""
    rng = np.random.default_rng(seed)
    pixels = np.clip(np.array(colour) + rng.integers(-15, 16, size=(8, 8, 3)), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def photos(colour: str, n: int, *, held: bool | None = None, start: int = 0) -> list[bytes]:
    """``n`` photos of a colour; with ``held`` given, only ones on that side of the fixed split."""
    import hashlib

    out, seed = [], start
    while len(out) < n:
        data = photo(COLOURS[colour], seed)
        seed += 1
        if held is None or is_held_out(hashlib.sha256(data).hexdigest()) == held:
            out.append(data)
    return out


@pytest.fixture
def home(tmp_path: Path) -> Path:
    """v1: the tiny graph with a red/blue head that is right, trained on 4 embeddings."""
    home = tmp_path / "home"
    graph = write_tiny_onnx(tmp_path / "tiny.onnx")
    weight = np.array([[1.0, 0.0, -1.0], [-1.0, 0.0, 1.0]], np.float32)  # red vs blue by R - B
    replace_head(graph, tmp_path / "v1.onnx", weight, np.zeros(2, np.float32))
    embeddings = np.array([[2, -1.8, -1.6], [2.1, -1.7, -1.5], [-1.9, -1.8, 2.3], [-1.8, -1.7, 2.4]], np.float32)
    open_state(home=home).registry.register(
        onnx_file=tmp_path / "v1.onnx", spec=tiny_spec(("red", "blue")), metrics={},
        embeddings=embeddings, embedding_targets=np.array([0, 0, 1, 1]),
        embedding_hashes=["a" * 64, "b" * 64, "c" * 64, "d" * 64], parent=None, dataset_fingerprint=None,
    )
    return home


def state_of(home: Path) -> State:
    return open_state(home=home)


def add(home: Path, label: str, blobs: list[bytes]) -> None:
    store = state_of(home).labels
    for data in blobs:
        store.add(data, label, max_pixels=10_000)


def run(home: Path, **params: object) -> RetrainResult:
    phases: list[str] = []
    result = retrain(state_of(home), home, RetrainParams(**params), lambda phase, _: phases.append(phase), threads=1)
    assert phases[0] == "embedding" and "verifying" in phases
    return result


def test_promotes_a_version_that_is_not_worse_and_keeps_old_classes(home: Path) -> None:
    add(home, "red", photos("red", 6))
    add(home, "green", photos("green", 6))  # a new label: a new class
    result = run(home)
    assert result.state == "succeeded" and result.version == "v2"
    registry = state_of(home).registry
    assert registry.active_version() == "v2"
    v2 = registry.get("v2")
    assert v2.spec.labels == ("red", "blue", "green")  # blue kept from v1's own embeddings
    assert v2.info["parent"] == "v1"
    metrics = result.metrics
    assert metrics["from_parent"] == 4 and metrics["embeddings_computed"] == 12
    assert metrics["candidate"]["held_out"] == metrics["active"]["held_out"] > 0
    # the new graph is v1's backbone with the new head
    weight, bias = read_head(v2.onnx_path)
    assert weight.shape == (3, 3)
    assert metrics["head_check_max_diff"] < 1e-5
    hashes = set(v2.training_hashes())
    assert {"a" * 64, "c" * 64} <= hashes and len(hashes) == 16  # 4 from v1 + 12 stored


def test_second_job_hits_the_embedding_cache(home: Path) -> None:
    add(home, "red", photos("red", 4))
    add(home, "blue", photos("blue", 4))
    run(home)
    add(home, "blue", photos("blue", 2, start=100))
    metrics = run(home).metrics
    assert metrics["embeddings_cached"] == 8 and metrics["embeddings_computed"] == 2
    assert state_of(home).embeddings.count("0" * 64) == 10


def test_a_worse_candidate_is_kept_inactive_and_the_job_is_rejected(home: Path) -> None:
    # held-out images carry true labels; the training ones are swapped: the candidate learns
    # the opposite of the truth, the active model is right
    add(home, "red", photos("red", 3, held=True) + photos("blue", 6, held=False))
    add(home, "blue", photos("blue", 3, held=True) + photos("red", 6, held=False))
    result = run(home)
    assert result.state == "rejected"
    assert result.metrics["candidate"]["accuracy"] < result.metrics["active"]["accuracy"] == 1.0
    registry = state_of(home).registry
    assert registry.active_version() == "v1"
    assert registry.get(result.version).metrics["promoted"] is False  # kept, with its metrics
    forced = run(home, force=True)
    assert forced.state == "succeeded" and registry.active_version() == forced.version


def test_tolerance_lets_a_slightly_worse_candidate_through(home: Path) -> None:
    add(home, "red", photos("red", 3, held=True) + photos("blue", 6, held=False))
    add(home, "blue", photos("blue", 3, held=True) + photos("red", 6, held=False))
    assert run(home, tolerance=1.0).state == "succeeded"


@pytest.mark.parametrize(
    "stored,message",
    [({}, "no labelled images"), ({"red": 1, "blue": 3}, "at least 2"), ({"red": 3}, None)],
)
def test_check_retrainable(home: Path, stored: dict[str, int], message: str | None) -> None:
    for label, n in stored.items():
        add(home, label, photos(label, n))
    state = state_of(home)
    if message is None:  # one stored class is fine: v1's own embeddings bring the other
        assert retrainable_parent(state.registry, state.labels).version == "v1"
    else:
        with pytest.raises(RetrainRefused, match=message):
            retrainable_parent(state.registry, state.labels)


def test_a_single_class_with_no_parent_data_is_refused(tmp_path: Path) -> None:
    home = tmp_path / "home"
    state = state_of(home)
    state.registry.register(
        onnx_file=write_tiny_onnx(tmp_path / "t.onnx"), spec=tiny_spec(("red", "blue")), metrics={},
        embeddings=np.zeros((0, 3), np.float32), embedding_targets=np.zeros(0, np.int64),
        parent=None, dataset_fingerprint=None,
    )
    add(home, "green", photos("green", 4))
    with pytest.raises(RetrainRefused, match="one class"):
        retrainable_parent(state.registry, state.labels)


def test_held_out_is_fixed_per_image_and_near_the_fraction() -> None:
    rng = random.Random(0)
    ids = [rng.randbytes(32).hex() for _ in range(2000)]
    split = [is_held_out(i) for i in ids]
    assert split == [is_held_out(i) for i in ids]
    assert 0.17 < sum(split) / len(ids) < 0.23
    assert sum(is_held_out(i, 0.5) for i in ids) / len(ids) == pytest.approx(0.5, abs=0.04)
    assert not any(is_held_out(i, 0.0) for i in ids) and all(is_held_out(i, 1.0) for i in ids)
    assert all(is_held_out(i, 0.5) for i, h in zip(ids, split) if h)  # growing the fraction only adds
    with pytest.raises(ValueError):
        is_held_out("../x")
    with pytest.raises(ValueError):
        is_held_out(ids[0], 1.5)
