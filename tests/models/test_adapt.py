"""``models/adapt.py``: the alignment maps, their folding into the head (on real embeddings of
real photos, and through the exported graph with the folded head written in), the minimum of
target images, and the gate on labelled target images. The job around it is tested in
``tests/service/test_adapt.py``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from models.adapt import (
    MIN_TARGET_IMAGES,
    AdaptParams,
    AdaptRefused,
    adapt_head,
    align,
    coral_alignment,
    diagonal_alignment,
    target_fingerprint,
)
from models.extract import extract
from models.onnx_io import cpu_session, read_head, replace_head, run_in_batches
from models.preprocess import decode_and_crop, normalise_crops
from models.retrain import ParentModel
from store.state import open_state
from tests.support.corruptions import corrupt_bytes

PHOTOS = 24


@pytest.fixture(scope="module")
def real(bootstrapped_home: Path, hymenoptera: Path) -> dict[str, object]:
    """The bootstrap graph's embeddings of real photos (source) and of the same photos blurred
    (target), its real ImageNet head, and the blurred photos' network inputs."""
    version = open_state(home=bootstrapped_home).registry.get("v1")
    photos = [p for label in ("ants", "bees") for p in sorted((hymenoptera / label).iterdir())[:PHOTOS // 2]]
    clean = [p.read_bytes() for p in photos]
    shifted = [corrupt_bytes(data, "blur", "strong") for data in clean]

    def embed(images: list[bytes]) -> np.ndarray:
        return np.concatenate([e for _, _, e in extract(version.onnx_path, images, lambda b: b,
                                                        version.spec.preprocess, workers=2, batch_size=8)])

    inputs = normalise_crops(np.stack([decode_and_crop(b, version.spec.preprocess) for b in shifted]),
                             version.spec.preprocess)
    weight, bias = read_head(version.onnx_path)
    return {"version": version, "source": embed(clean), "target": embed(shifted), "inputs": inputs,
            "weight": weight, "bias": bias}


@pytest.mark.parametrize("method", ["diagonal", "coral"])
def test_the_folded_head_equals_the_explicit_map_then_the_old_head_on_real_embeddings(
    real: dict, method: str, tmp_path: Path
) -> None:
    source, target, weight, bias = real["source"], real["target"], real["weight"], real["bias"]
    alignment = align(method, source, target)  # type: ignore[arg-type]
    folded_w, folded_b = alignment.fold(weight, bias)
    explicit = alignment.apply(target) @ weight.astype(np.float64).T + bias
    folded = target @ folded_w.T + folded_b
    assert np.abs(folded - explicit).max() < 1e-3 * np.abs(explicit).max()
    assert (folded.argmax(1) == explicit.argmax(1)).all()

    # and through onnxruntime, the graph with the folded head written in
    graph = tmp_path / "adapted.onnx"
    replace_head(real["version"].onnx_path, graph, folded_w, folded_b)
    logits, embeddings = run_in_batches(cpu_session(graph), real["inputs"])
    assert np.abs(embeddings - target).max() < 1e-4  # the backbone is untouched
    assert np.abs(logits - explicit).max() < 1e-3 * np.abs(explicit).max()


def test_the_diagonal_map_gives_target_embeddings_the_source_statistics(real: dict) -> None:
    source, target = real["source"], real["target"]
    mapped = diagonal_alignment(source, target).apply(target)
    # a (nearly) constant dimension on either side is floored, not blown up
    unfloored = np.ones(source.shape[1], bool)
    for side in (source, target):
        spread = side.std(axis=0)
        unfloored &= spread > 1e-2 * spread.mean()
    assert np.allclose(mapped.mean(axis=0), source.mean(axis=0), atol=1e-5)
    assert np.allclose(mapped.std(axis=0)[unfloored], source.std(axis=0)[unfloored], rtol=1e-3)


@pytest.mark.parametrize("method", ["diagonal", "coral"])
def test_invert_moves_source_embeddings_into_the_target_domain_and_back(real: dict, method: str) -> None:
    alignment = align(method, real["source"], real["target"])  # type: ignore[arg-type]
    assert np.allclose(alignment.apply(alignment.invert(real["source"])), real["source"], atol=1e-6)
    assert np.allclose(alignment.invert(real["source"]).mean(axis=0), real["target"].mean(axis=0), atol=1e-5)


def test_coral_with_full_shrinkage_is_the_diagonal_map_of_equal_spreads() -> None:
    rng = np.random.default_rng(0)
    source, target = rng.normal(1.0, 2.0, (50, 6)), rng.normal(-1.0, 0.5, (40, 6))
    coral = coral_alignment(source, target, shrinkage=1.0)
    ratio = np.sqrt(np.trace(np.cov(source, rowvar=False)) / np.trace(np.cov(target, rowvar=False)))
    assert np.allclose(coral.matrix, ratio * np.eye(6))
    with pytest.raises(ValueError, match="shrinkage"):
        coral_alignment(source, target, shrinkage=0.0)


def parent(embeddings: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> ParentModel:
    targets = np.arange(len(embeddings)) % len(weight)
    return ParentModel("v2", tuple(f"c{k}" for k in range(len(weight))), weight, bias, embeddings, targets,
                       ["0" * 64] * len(embeddings))


def test_too_few_target_images_or_no_training_embeddings_are_refused_with_what_to_do() -> None:
    rng = np.random.default_rng(1)
    weight, bias = rng.normal(size=(2, 8)).astype(np.float32), np.zeros(2, np.float32)
    model = parent(rng.normal(size=(40, 8)), weight, bias)
    few = rng.normal(size=(MIN_TARGET_IMAGES - 1, 8))
    with pytest.raises(AdaptRefused, match=f"{MIN_TARGET_IMAGES - 1} unlabelled image.*at least {MIN_TARGET_IMAGES}"):
        adapt_head(model, few, np.zeros((0, 8)), [], AdaptParams())
    empty = parent(np.zeros((0, 8), np.float32), weight, bias)
    with pytest.raises(AdaptRefused, match="no training embeddings.*retrain it"):
        adapt_head(empty, rng.normal(size=(MIN_TARGET_IMAGES, 8)), np.zeros((0, 8)), [], AdaptParams())


def test_the_gate_judges_on_labelled_target_images_and_refuses_without_them_unless_forced() -> None:
    """Two classes told apart by dimension 0; the target domain shifts and shrinks it, so the old
    head calls everything c1 and the aligned head gets them right again."""
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 2, 400)
    source = rng.normal(0, 1, (400, 4))
    source[:, 0] += np.where(labels == 1, 2.0, -2.0)
    shifted = source.copy()
    shifted[:, 0] = shifted[:, 0] * 0.2 + 5.0  # the whole domain moved
    weight, bias = np.array([[-1.0, 0, 0, 0], [1.0, 0, 0, 0]], np.float32), np.zeros(2, np.float32)
    model = ParentModel("v2", ("c0", "c1"), weight, bias, source[:200], labels[:200], ["0" * 64] * 200)
    judge_labels = [f"c{k}" for k in labels[200:300]] + ["unknown"]
    judges = np.concatenate([shifted[200:300], shifted[:1]])

    result = adapt_head(model, shifted[300:], judges, judge_labels, AdaptParams(domain="night"))
    assert result.promote and result.metrics["candidate"]["accuracy"] > 0.9 > 0.6 > result.metrics["active"]["accuracy"]
    assert result.metrics["unknown_labels_left_out"] == 1 and result.metrics["candidate"]["judged_on"] == 100
    assert "on 100 labelled images of domain 'night'" in result.metrics["gate"]
    # the stored training embeddings are in the target domain
    assert np.allclose(result.embeddings.mean(axis=0), shifted[300:].mean(axis=0), atol=1e-4)

    unjudged = adapt_head(model, shifted[300:], np.zeros((0, 4)), [], AdaptParams())
    assert not unjudged.promote and "no labelled target images to compare on" in unjudged.metrics["gate"]
    assert "or set force" in unjudged.metrics["gate"]
    forced = adapt_head(model, shifted[300:], np.zeros((0, 4)), [], AdaptParams(force=True))
    assert forced.promote and forced.metrics["gate"].endswith("(forced)")


def test_the_target_fingerprint_is_the_set_of_images() -> None:
    a, b = "a" * 64, "b" * 64
    assert target_fingerprint([a, b]) == target_fingerprint([b, a, a]) != target_fingerprint([a])
