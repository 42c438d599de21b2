"""The result of ``POST /predict``: its models (the API's response schema) and turning a batch's
probabilities into it."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from pydantic import BaseModel, Field


class LabelScore(BaseModel):
    label: str
    score: float = Field(description="softmax probability")


class Prediction(BaseModel):
    label: str = Field(description="the most probable label")
    score: float = Field(description="its softmax probability")
    top_k: list[LabelScore] = Field(description="the k most probable labels, best first")
    model_version: str = Field(description="the model version that produced this result")
    prediction_id: str | None = Field(
        None, pattern="^[0-9a-f]{32}$",
        description="present when this image was kept for review (TRANSFER_SERVE_KEEP_PREDICTIONS): give it to "
                    "POST /admin/feedback to label the image")


def build_predictions(probabilities: np.ndarray, labels: Sequence[str], top_k: int,
                      version: str) -> list[dict[str, Any]]:
    """One result per row, shaped like :class:`Prediction`, its top-k labels best first; k is
    capped at the number of labels. Plain dicts: the service sends them as they are, since
    validating and serialising them through pydantic again costs CPU on every request
    (bench/README.md, "Serving choices measured on the way")."""
    k = min(top_k, len(labels))
    # argpartition then sort only the k best: cheap even for 1000 classes
    best = np.argpartition(-probabilities, k - 1, axis=1)[:, :k]
    order = np.take_along_axis(best, np.argsort(-np.take_along_axis(probabilities, best, 1), axis=1), 1)
    results = []
    for row, indices in zip(probabilities.tolist(), order.tolist(), strict=True):
        top = [{"label": labels[i], "score": row[i]} for i in indices]
        results.append({"label": top[0]["label"], "score": top[0]["score"], "top_k": top, "model_version": version})
    return results
