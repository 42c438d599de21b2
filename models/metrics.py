"""Classification metrics of a model on labelled images, as a JSON-serialisable dict:
accuracy, per-class precision, recall, F1 and support, macro F1, the confusion matrix (rows true,
columns predicted). numpy only (no sklearn)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from models.errors import InputError

#: Class indices: a list or an integer array.
Indices = Sequence[int] | np.ndarray


def _as_index_array(values: Indices, name: str) -> np.ndarray:
    """Return ``values`` as a 1-D int64 array, raising InputError if they are not integers."""
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise InputError(f"{name} must be a flat sequence of class indices, got shape {arr.shape}")
    # Bools are integers to numpy's casting rules but never valid class indices here.
    if arr.size and arr.dtype.kind not in "iu":
        raise InputError(f"{name} must contain integer class indices, got dtype {arr.dtype}")
    return arr.astype(np.int64, copy=False)


def _safe_ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """Element-wise ratio that is 0.0 where the denominator is 0 (undefined), without warnings."""
    num = numerator.astype(np.float64)
    den = denominator.astype(np.float64)
    return np.divide(num, den, out=np.zeros_like(num), where=den != 0)


def classification_metrics(
    y_true: Indices, y_pred: Indices, labels: Sequence[str]
) -> dict[str, Any]:
    """Accuracy, per-class precision/recall/F1/support, macro F1 and the confusion matrix.

    ``y_true`` and ``y_pred`` are class indices into ``labels``. Precision, recall and F1 are 0.0
    where undefined (a class never predicted, or never present), never NaN. ``macro_f1`` is the
    unweighted mean F1 over the classes that occur in ``y_true`` or ``y_pred`` (sklearn's default
    label set): a 1000-class bootstrap head evaluated on a 5-class folder would otherwise score
    near zero because of 995 classes that were never in play. ``confusion_matrix`` rows are the
    true class and columns the predicted class, both in ``labels`` order.

    Raises:
        InputError (a ValueError): lengths differ, input is empty, labels are empty or
            duplicated, or an index is not an integer in ``range(len(labels))``.
    """
    label_list = [str(label) for label in labels]
    n_classes = len(label_list)
    if n_classes == 0:
        raise InputError("labels must not be empty")
    if len(set(label_list)) != n_classes:
        duplicates = sorted({lab for lab in label_list if label_list.count(lab) > 1})
        raise InputError(f"labels must be unique; duplicated: {duplicates}")

    true = _as_index_array(y_true, "y_true")
    pred = _as_index_array(y_pred, "y_pred")
    if true.size != pred.size:
        raise InputError(
            f"y_true and y_pred differ in length ({true.size} vs {pred.size})"
        )
    if true.size == 0:
        raise InputError("cannot compute metrics on an empty evaluation set")
    for name, arr in (("y_true", true), ("y_pred", pred)):
        bad = (arr < 0) | (arr >= n_classes)
        if bad.any():
            raise InputError(
                f"{name} has class index {int(arr[bad][0])} outside 0..{n_classes - 1} "
                f"({n_classes} labels)"
            )

    # One bincount over the flattened (true, pred) pairs builds the whole matrix at once.
    confusion = np.bincount(true * n_classes + pred, minlength=n_classes * n_classes).reshape(
        n_classes, n_classes
    )
    true_positives = np.diag(confusion)
    support = confusion.sum(axis=1)
    predicted = confusion.sum(axis=0)
    precision = _safe_ratio(true_positives, predicted)
    recall = _safe_ratio(true_positives, support)
    f1 = _safe_ratio(2.0 * precision * recall, precision + recall)

    in_play = (support > 0) | (predicted > 0)
    macro_f1 = float(f1[in_play].mean())  # in_play is never empty: n >= 1

    per_class = {
        label: {
            "precision": float(precision[i]),
            "recall": float(recall[i]),
            "f1": float(f1[i]),
            "support": int(support[i]),
        }
        for i, label in enumerate(label_list)
    }
    return {
        "accuracy": float(true_positives.sum() / true.size),
        "n": int(true.size),
        "labels": label_list,
        "per_class": per_class,
        "macro_f1": macro_f1,
        "confusion_matrix": confusion.tolist(),
    }
