"""models/review.py (unit): the uncertainty measures, and the spreading pass on real embeddings
(the bootstrap network's, of real photos and of near-duplicates made from them)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageEnhance

from models.extract import extract
from models.review import margin, normalised_entropy, spread_out
from store.state import open_state
from tests.support.images import encode


def test_margin_is_top1_minus_top2_and_one_label_is_certain() -> None:
    probabilities = np.array([[0.5, 0.3, 0.2], [0.1, 0.45, 0.45], [1.0, 0.0, 0.0]], np.float32)
    assert margin(probabilities) == pytest.approx([0.2, 0.0, 1.0])
    assert margin(np.ones((2, 1), np.float32)).tolist() == [1.0, 1.0]


def test_entropy_is_normalised_by_the_number_of_labels() -> None:
    uniform_2, uniform_10 = np.full((1, 2), 0.5), np.full((1, 10), 0.1)
    assert normalised_entropy(uniform_2)[0] == pytest.approx(1.0)
    assert normalised_entropy(uniform_10)[0] == pytest.approx(1.0)
    assert normalised_entropy(np.array([[1.0, 0.0, 0.0]]))[0] == pytest.approx(0.0, abs=1e-6)
    skewed = normalised_entropy(np.array([[0.9, 0.1], [0.6, 0.4]]))
    assert 0 < skewed[0] < skewed[1] < 1


def test_spreading_keeps_everything_when_there_is_room_and_nothing_for_no_room() -> None:
    vectors: list[np.ndarray | None] = [np.ones(4, np.float32)] * 3
    assert spread_out(vectors, 5) == [0, 1, 2]
    assert spread_out(vectors, 0) == []
    assert spread_out([], 3) == []


def embed_with_bootstrap(home: Path, images: list[bytes]) -> list[np.ndarray]:
    version = open_state(home=home).registry.get("v1")
    return [e for _, _, batch in extract(version.onnx_path, images, lambda b: b, version.spec.preprocess,
                                         workers=2, batch_size=8) for e in batch]


def test_spreading_skips_near_duplicates_and_keeps_the_least_certain_first(
        bootstrapped_home: Path, hymenoptera: Path) -> None:
    """Five photos, the first (the least certain) with four near-copies behind it (brightness
    changed by 2-8 %): 5 picks out of the 9 are the five different photos, in the input order."""
    photos = sorted((hymenoptera / "ants").glob("*.jpg"))[:5]
    first = Image.open(photos[0]).convert("RGB")
    copies = [encode(ImageEnhance.Brightness(first).enhance(1 + 0.02 * k), "JPEG") for k in range(1, 5)]
    blobs = [photos[0].read_bytes(), *copies, *(p.read_bytes() for p in photos[1:])]
    embeddings: list[np.ndarray | None] = list(embed_with_bootstrap(bootstrapped_home, blobs))
    picked = spread_out(embeddings, 5)
    assert picked == [0, 5, 6, 7, 8]
    # the same list without the copies: nothing is skipped
    assert spread_out([embeddings[i] for i in (0, 5, 6, 7, 8)], 5) == [0, 1, 2, 3, 4]


def test_items_without_a_comparable_embedding_are_never_taken_for_duplicates() -> None:
    same = np.array([1.0, 0.0, 0.0], np.float32)
    vectors = [same, same.copy(), None, np.ones(5, np.float32), same.copy()]
    # the duplicates of item 0 go; the one without an embedding and the one of another size stay
    assert spread_out(vectors, 3) == [0, 2, 3]
