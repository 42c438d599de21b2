"""``training/plots.py``, unit level: the confusion matrix and training curves as PNG files, and
the backbone comparison's accuracy-against-throughput plot and learning curve."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from models.metrics import classification_metrics
from tests.support.reports import LABELS, assert_png
from training.plots import (
    MAX_MATRIX_CLASSES,
    ComparedBackbone,
    plot_accuracy_vs_throughput,
    plot_confusion_matrix,
    plot_learning_curve,
    plot_training_curves,
)
from training.report import write_report


def test_empty_history_writes_closed_form_png(tmp_path: Path) -> None:
    path = tmp_path / "curves.png"
    plot_training_curves([], path)
    assert_png(path)

    metrics = classification_metrics([0, 1], [0, 1], ["a", "b"])
    paths = write_report(tmp_path / "report", title="closed form", metrics=metrics)
    assert_png(paths["training_curves"])
    assert json.loads(paths["json"].read_text(encoding="utf-8"))["history"] == []


def test_training_curves_partial_keys_and_best_epoch(tmp_path: Path) -> None:
    # Only validation accuracy recorded: the loss panel says so instead of failing or warning.
    path = tmp_path / "curves.png"
    plot_training_curves([{"epoch": 1, "val_accuracy": 0.5}], path, best_epoch=1)
    assert_png(path)


def test_thousand_label_confusion_plot_draws_only_the_busiest_classes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What keeps a 1000-class plot quick and readable: only MAX_MATRIX_CLASSES classes (the
    busiest, in label order) are drawn, not a million cells (checked by what reaches imshow,
    not by a timing)."""
    from matplotlib.axes import Axes

    labels = [f"imagenet class number {i}" for i in range(1000)]
    rng = np.random.default_rng(0)
    y_true = rng.integers(0, 1000, size=5000)
    y_pred = np.where(rng.random(5000) < 0.7, y_true, rng.integers(0, 1000, size=5000))
    y_true[:400] = 7  # one class far busier than the rest: it must be among those drawn
    y_pred[:400] = 7
    metrics = classification_metrics(y_true, y_pred, labels)

    drawn: list[np.ndarray] = []
    original = Axes.imshow

    def recording_imshow(self: Axes, data: np.ndarray, *args: Any, **kwargs: Any) -> Any:
        drawn.append(np.asarray(data))
        return original(self, data, *args, **kwargs)

    monkeypatch.setattr(Axes, "imshow", recording_imshow)
    path = tmp_path / "cm.png"
    plot_confusion_matrix(metrics["confusion_matrix"], labels, path)
    assert_png(path)
    (matrix,) = drawn
    assert matrix.shape == (MAX_MATRIX_CLASSES, MAX_MATRIX_CLASSES)
    assert matrix.max() >= 400  # class 7's diagonal cell is there

    paths = write_report(tmp_path / "report", title="bootstrap", metrics=metrics)
    md = paths["markdown"].read_text(encoding="utf-8")
    assert "true \\ predicted" not in md  # no 1000-column markdown table
    assert "1000 classes" in md
    # The full matrix is kept in report.json, one line per row rather than per cell.
    raw = paths["json"].read_text(encoding="utf-8")
    assert json.loads(raw)["metrics"] == metrics
    assert len(raw) < 3_000_000


def test_confusion_plot_rejects_wrong_shape(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="3 x 3"):
        plot_confusion_matrix([[1, 0], [0, 1]], LABELS, tmp_path / "cm.png")


def test_accuracy_against_throughput_with_and_without_int8_points(tmp_path: Path) -> None:
    backbones = [ComparedBackbone("lite0", 0.93, 0.02, 120.0, 260.0, 260.0),
                 ComparedBackbone("lite2", 0.99, 0.01, 50.0, None, 50.0)]  # a GPU host: no INT8
    plot_accuracy_vs_throughput(backbones, ["lite0", "lite2"], tmp_path / "front.png")
    assert_png(tmp_path / "front.png")
    plot_accuracy_vs_throughput(backbones[:1], [], tmp_path / "alone.png")
    assert_png(tmp_path / "alone.png")


def test_learning_curve_of_two_backbones(tmp_path: Path) -> None:
    rows = [{"per_class": n, "accuracy_mean": acc, "accuracy_std": sd}
            for n, acc, sd in ((1, 0.6, 0.2), (2, 0.7, 0.1), (97.5, 0.95, 0.0))]
    plot_learning_curve([("lite0", rows), ("lite1", rows[:2])], tmp_path / "curve.png")
    assert_png(tmp_path / "curve.png")
