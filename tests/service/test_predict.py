"""``service/predict.py``, unit level: a batch's probabilities turned into ``/predict``'s results
(top-k ordered and capped, the shape the API's schema promises)."""

from __future__ import annotations

import numpy as np
import pytest

from service.predict import Prediction, build_predictions


def test_build_predictions_orders_and_caps_top_k() -> None:
    probabilities = np.array([[0.1, 0.6, 0.3], [0.5, 0.2, 0.3]], np.float32)
    first, second = build_predictions(probabilities, ["a", "b", "c"], top_k=2, version="v3")
    assert first["label"] == "b" and [e["label"] for e in first["top_k"]] == ["b", "c"]
    assert second["label"] == "a" and second["model_version"] == "v3"
    (capped, _) = build_predictions(probabilities, ["a", "b", "c"], top_k=10, version="v3")
    assert [e["label"] for e in capped["top_k"]] == ["b", "c", "a"]
    assert capped["score"] == pytest.approx(0.6)
    Prediction.model_validate(capped)  # the shape the OpenAPI schema promises
