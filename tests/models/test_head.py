"""``models/head.py``, unit level: the numpy linear head must actually learn, respect class
balance and unseen classes."""

from __future__ import annotations

import numpy as np
import pytest

from models.head import HeadParams, fit_linear_head


def blobs(n_per_class: list[int], dim: int = 16, seed: int = 0, spread: float = 1.0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 3, size=(len(n_per_class), dim))
    x = np.concatenate([rng.normal(c, spread, size=(n, dim)) for c, n in zip(centres, n_per_class, strict=True)])
    y = np.concatenate([np.full(n, i) for i, n in enumerate(n_per_class)])
    return x.astype(np.float32), y


def test_learns_separable_classes_and_records_history() -> None:
    x, y = blobs([40, 40, 40])
    vx, vy = blobs([10, 10, 10], seed=0)
    head = fit_linear_head(x, y, 3, validation=(vx, vy))
    assert head.weight.shape == (3, 16) and head.bias.shape == (3,)
    assert head.weight.dtype == np.float32
    assert (head.logits(x).argmax(1) == y).mean() == 1.0
    assert head.history[-1]["train_loss"] < head.history[0]["train_loss"]
    assert "val_accuracy" in head.history[-1]


def test_is_a_plain_linear_layer_on_raw_embeddings() -> None:
    x, y = blobs([20, 20], dim=8)
    x = x * 50 + 100  # features far from standardised: the folding must undo it exactly
    head = fit_linear_head(x, y, 2)
    np.testing.assert_allclose(head.logits(x), x @ head.weight.T + head.bias, rtol=1e-5)
    assert (head.logits(x).argmax(1) == y).mean() == 1.0


def test_class_without_examples_is_never_predicted() -> None:
    x, y = blobs([30, 30], dim=8)
    head = fit_linear_head(x, y, 3)
    assert head.bias[2] < -1e3
    assert not (head.logits(np.random.default_rng(1).normal(size=(100, 8))).argmax(1) == 2).any()


def test_balanced_weights_help_a_rare_overlapping_class() -> None:
    x, y = blobs([300, 12], dim=4, spread=2.5, seed=3)
    balanced = fit_linear_head(x, y, 2)
    plain = fit_linear_head(x, y, 2, params=HeadParams(balance_classes=False))
    minority = y == 1
    recall = lambda head: (head.logits(x[minority]).argmax(1) == 1).mean()  # noqa: E731
    assert recall(balanced) > recall(plain)


def test_reproducible_for_a_seed() -> None:
    x, y = blobs([20, 20])
    a, b = fit_linear_head(x, y, 2, seed=5), fit_linear_head(x, y, 2, seed=5)
    np.testing.assert_array_equal(a.weight, b.weight)


@pytest.mark.parametrize(
    "x,y,classes",
    [
        (np.zeros((0, 4)), np.zeros(0, int), 2),
        (np.zeros((3, 4)), np.array([0, 1]), 2),
        (np.zeros((2, 4)), np.array([0, 2]), 2),
        (np.zeros((2, 4)), np.array([0, -1]), 2),
    ],
)
def test_bad_input_is_refused(x: np.ndarray, y: np.ndarray, classes: int) -> None:
    with pytest.raises(ValueError):
        fit_linear_head(x, y, classes)
