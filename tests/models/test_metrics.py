"""``training/metrics.py``, unit level: hand-computed metrics and input errors."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from models.errors import InputError
from models.metrics import classification_metrics
from tests.support.reports import LABELS, Y_PRED, Y_TRUE


def test_hand_computed_metrics() -> None:
    m = classification_metrics(Y_TRUE, Y_PRED, LABELS)

    assert m["n"] == 6
    assert m["labels"] == LABELS
    assert m["accuracy"] == pytest.approx(4 / 6, abs=1e-12)
    assert m["confusion_matrix"] == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]

    cat, dog, bird = (m["per_class"][label] for label in LABELS)
    # cat: tp 2 of 2 predicted, 2 of 3 true
    assert cat["precision"] == pytest.approx(1.0, abs=1e-12)
    assert cat["recall"] == pytest.approx(2 / 3, abs=1e-12)
    assert cat["f1"] == pytest.approx(0.8, abs=1e-12)
    assert cat["support"] == 3
    # dog: tp 1 of 2 predicted, 1 of 2 true
    assert dog["precision"] == pytest.approx(0.5, abs=1e-12)
    assert dog["recall"] == pytest.approx(0.5, abs=1e-12)
    assert dog["f1"] == pytest.approx(0.5, abs=1e-12)
    assert dog["support"] == 2
    # bird: tp 1 of 2 predicted, 1 of 1 true
    assert bird["precision"] == pytest.approx(0.5, abs=1e-12)
    assert bird["recall"] == pytest.approx(1.0, abs=1e-12)
    assert bird["f1"] == pytest.approx(2 / 3, abs=1e-12)
    assert bird["support"] == 1

    assert m["macro_f1"] == pytest.approx((0.8 + 0.5 + 2 / 3) / 3, abs=1e-12)


def test_confusion_rows_are_true_class() -> None:
    # One cat predicted as dog: the count belongs in row "cat", column "dog".
    m = classification_metrics([0], [1], ["cat", "dog"])
    assert m["confusion_matrix"] == [[0, 1], [0, 0]]


def test_metrics_are_plain_json_types() -> None:
    # numpy arrays, as training passes them (the signature says Sequence[int])
    m = classification_metrics(np.array(Y_TRUE), np.array(Y_PRED, dtype=np.int32), LABELS)
    assert json.loads(json.dumps(m, allow_nan=False)) == m
    assert type(m["accuracy"]) is float
    assert type(m["n"]) is int
    assert all(type(c) is int for row in m["confusion_matrix"] for c in row)


def test_class_never_predicted_is_zero_not_nan() -> None:
    m = classification_metrics([0, 1, 2], [0, 1, 1], LABELS)
    bird = m["per_class"]["bird"]
    assert bird == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    for row in m["per_class"].values():
        assert not any(math.isnan(row[k]) for k in ("precision", "recall", "f1"))


def test_absent_class_is_zero_and_left_out_of_macro_f1() -> None:
    # "fish" is neither true nor predicted: all zeros, and it does not drag macro F1 down.
    m = classification_metrics([0, 1], [0, 1], ["cat", "dog", "fish"])
    assert m["per_class"]["fish"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert m["macro_f1"] == 1.0


def test_perfect_predictions() -> None:
    m = classification_metrics(Y_TRUE, Y_TRUE, LABELS)
    assert m["accuracy"] == 1.0
    assert m["macro_f1"] == 1.0
    for row in m["per_class"].values():
        assert row["precision"] == row["recall"] == row["f1"] == 1.0


@pytest.mark.parametrize(
    ("y_true", "y_pred", "labels", "message"),
    [
        ([0, 1], [0], LABELS, "length"),
        ([], [], LABELS, "empty"),
        ([0, 3], [0, 1], LABELS, "outside"),
        ([0, 1], [0, -1], LABELS, "outside"),
        ([0.0, 1.0], [0, 1], LABELS, "integer"),
        ([0], [0], [], "labels must not be empty"),
        ([0], [0], ["cat", "cat"], "unique"),
    ],
)
def test_bad_input_raises_value_error(
    y_true: list[float], y_pred: list[int], labels: list[str], message: str
) -> None:
    with pytest.raises(ValueError, match=message) as info:
        classification_metrics(y_true, y_pred, labels)  # type: ignore[arg-type]  # floats on purpose
    assert isinstance(info.value, InputError)
