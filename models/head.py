"""A linear classification head fitted on embeddings, in numpy (torch-free, so the service's
retrain jobs can use it too).

Multinomial logistic regression with L2 regularisation and class-balanced sample weights,
optimised full-batch with Adam on standardised features; the standardisation is folded back into
the weights, so the result is a plain ``logits = embedding @ weight.T + bias`` layer that can
replace the network's own classifier.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from .onnx_io import softmax


@dataclass(frozen=True)
class HeadParams:
    """Hyper-parameters of the head fit (defaults work for 1280-d CNN embeddings)."""

    steps: int = 300
    learning_rate: float = 0.05
    l2: float = 1e-3
    balance_classes: bool = True
    log_every: int = 10


@dataclass
class LinearHead:
    weight: np.ndarray  # (C, D) float32
    bias: np.ndarray  # (C,) float32
    history: list[dict[str, float]] = field(default_factory=list)

    def logits(self, embeddings: np.ndarray) -> np.ndarray:
        return embeddings.astype(np.float32, copy=False) @ self.weight.T + self.bias


def _cross_entropy(logits: np.ndarray, targets: np.ndarray, weights: np.ndarray) -> float:
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    return float(-(weights * log_probs[np.arange(len(targets)), targets]).sum() / weights.sum())


def fit_linear_head(
    embeddings: np.ndarray,
    targets: np.ndarray,
    num_classes: int,
    *,
    params: HeadParams = HeadParams(),
    validation: tuple[np.ndarray, np.ndarray] | None = None,
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> LinearHead:
    """Fit ``num_classes`` logits on (N, D) embeddings; ``targets`` are class indices.

    Classes with no training example keep a very negative bias (they are never predicted).
    ``validation`` (embeddings, targets), if given, is scored during the fit for the history.
    """
    x = np.asarray(embeddings, dtype=np.float64)
    y = np.asarray(targets, dtype=np.int64)
    if x.ndim != 2 or len(x) == 0 or y.shape != (len(x),):
        raise ValueError(f"need (N, D) embeddings and N targets, got {x.shape} and {y.shape}")
    if y.min() < 0 or y.max() >= num_classes:
        raise ValueError("targets must be class indices below num_classes")
    counts = np.bincount(y, minlength=num_classes).astype(np.float64)
    present = counts > 0
    if params.balance_classes:
        sample_weight = len(y) / (present.sum() * counts[y])
    else:
        sample_weight = np.ones(len(y))
    mean = x.mean(axis=0)
    scale = x.std(axis=0) + 1e-6
    z = (x - mean) / scale

    rng = np.random.default_rng(seed)
    w = rng.normal(0.0, 0.01, size=(num_classes, x.shape[1]))
    b = np.zeros(num_classes)
    onehot = np.zeros((len(y), num_classes))
    onehot[np.arange(len(y)), y] = 1.0
    norm = sample_weight.sum()
    m_w, v_w = np.zeros_like(w), np.zeros_like(w)  # Adam's moment estimates
    m_b, v_b = np.zeros_like(b), np.zeros_like(b)
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    history: list[dict[str, float]] = []

    def fold() -> tuple[np.ndarray, np.ndarray]:
        weight = w / scale
        bias = b - weight @ mean
        bias = np.where(present, bias, -1e4)  # unseen classes: never predicted
        return weight.astype(np.float32), bias.astype(np.float32)

    for step in range(1, params.steps + 1):
        probs = softmax(z @ w.T + b)
        grad_logits = (probs - onehot) * sample_weight[:, None] / norm
        g_w = grad_logits.T @ z + params.l2 * w
        g_b = grad_logits.sum(axis=0)
        for param, grad, m, v in ((w, g_w, m_w, v_w), (b, g_b, m_b, v_b)):
            m *= beta1
            m += (1 - beta1) * grad
            v *= beta2
            v += (1 - beta2) * grad * grad
            m_hat = m / (1 - beta1**step)
            v_hat = v / (1 - beta2**step)
            param -= params.learning_rate * m_hat / (np.sqrt(v_hat) + eps)
        if step % params.log_every == 0 or step == params.steps:
            weight, bias = fold()
            train_logits = x @ weight.T + bias
            row = {
                "epoch": float(step),
                "train_loss": _cross_entropy(train_logits, y, sample_weight),
                "train_accuracy": float((train_logits.argmax(1) == y).mean()),
            }
            if validation is not None and len(validation[1]):
                vx, vy = np.asarray(validation[0], dtype=np.float64), np.asarray(validation[1])
                val_logits = vx @ weight.T + bias
                row["val_loss"] = _cross_entropy(val_logits, vy, np.ones(len(vy)))
                row["val_accuracy"] = float((val_logits.argmax(1) == vy).mean())
            history.append(row)
            if progress is not None:
                progress(step, params.steps)
    weight, bias = fold()
    return LinearHead(weight=weight, bias=bias, history=history)
