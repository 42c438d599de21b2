"""Unit tests for training.report: hand-computed metrics, input errors, and the written report."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from models.errors import InputError
from training.report import (
    MAX_MATRIX_CLASSES,
    classification_metrics,
    format_metrics_table,
    plot_confusion_matrix,
    plot_training_curves,
    write_report,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
LABELS = ["cat", "dog", "bird"]

# Hand-worked 3-class example. Confusion (rows true, columns predicted):
#   cat:  2 cat, 1 dog, 0 bird   -> support 3
#   dog:  0 cat, 1 dog, 1 bird   -> support 2
#   bird: 0 cat, 0 dog, 1 bird   -> support 1
# Column sums (predictions): cat 2, dog 2, bird 2.
Y_TRUE = [0, 0, 0, 1, 1, 2]
Y_PRED = [0, 0, 1, 1, 2, 2]


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE)
    assert len(data) > 2000  # a real rendered figure, not an empty stub


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
        classification_metrics(y_true, y_pred, labels)
    assert isinstance(info.value, InputError)


def test_write_report_creates_all_files(tmp_path: Path) -> None:
    metrics = classification_metrics(Y_TRUE, Y_PRED, LABELS)
    history = [
        {"epoch": e, "train_loss": tl, "val_loss": vl, "train_accuracy": ta, "val_accuracy": va}
        for e, tl, vl, ta, va in [
            (1, 1.2, 1.0, 0.4, 0.5),
            (2, 0.8, 0.7, 0.6, 0.7),
            (3, 0.5, 0.9, 0.8, 0.6),
        ]
    ]
    details = {
        "strategy": "finetune",
        "backbone": "resnet18",
        "time_s": 12.5,
        "skipped_files": ["a.jpg", "b|c.png"],
    }
    out = tmp_path / "nested" / "v1"
    paths = write_report(
        out, title="pets v1", metrics=metrics, history=history, details=details, best_epoch=2
    )

    assert set(paths) == {"json", "markdown", "confusion_matrix", "training_curves"}
    assert all(p.parent == out and p.is_file() for p in paths.values())
    assert_png(paths["confusion_matrix"])
    assert_png(paths["training_curves"])

    report = json.loads(paths["json"].read_text(encoding="utf-8"))
    assert report["title"] == "pets v1"
    assert report["metrics"] == metrics
    assert report["history"] == history
    assert report["details"] == details
    assert report["best_epoch"] == 2

    md = paths["markdown"].read_text(encoding="utf-8")
    assert md.startswith("# pets v1")
    assert "| cat | 1.0000 | 0.6667 | 0.8000 | 3 |" in md
    assert "| dog | 0.5000 | 0.5000 | 0.5000 | 2 |" in md
    assert "| bird | 0.5000 | 1.0000 | 0.6667 | 1 |" in md
    assert "| cat | 2 | 1 | 0 |" in md  # confusion matrix row for true "cat"
    assert "| strategy | finetune |" in md
    assert "b\\|c.png" in md  # a pipe in a value must not break the table
    assert "0.6667" in md and "0.6556" in md  # accuracy, macro F1
    assert "![confusion matrix](confusion_matrix.png)" in md
    assert "![training curves](training_curves.png)" in md


def test_write_report_json_is_strict_with_nan_loss(tmp_path: Path) -> None:
    metrics = classification_metrics([0, 1], [0, 1], ["a", "b"])
    history = [{"epoch": 1, "train_loss": float("nan"), "val_loss": 1.0}]
    paths = write_report(tmp_path, title="diverged", metrics=metrics, history=history)
    report = json.loads(paths["json"].read_text(encoding="utf-8"))
    assert report["history"] == [{"epoch": 1, "train_loss": None, "val_loss": 1.0}]


def test_write_report_rejects_incomplete_metrics(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="missing"):
        write_report(tmp_path, title="x", metrics={"accuracy": 1.0})


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

    def recording_imshow(self: Axes, data: np.ndarray, *args: object, **kwargs: object) -> object:
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


def test_many_labels_markdown_lists_only_classes_in_play(tmp_path: Path) -> None:
    labels = [f"class {i}" for i in range(40)]
    metrics = classification_metrics([0, 1, 2, 3], [0, 1, 2, 39], labels)
    md = write_report(tmp_path, title="bootstrap", metrics=metrics)["markdown"].read_text(
        encoding="utf-8"
    )
    assert "| class 3 | 0.0000 | 0.0000 | 0.0000 | 1 |" in md
    assert "| class 39 | 0.0000 | 0.0000 | 0.0000 | 0 |" in md  # predicted, never true
    assert "| class 20 |" not in md
    assert "35 of 40 classes had no examples and no predictions" in md


def test_confusion_plot_rejects_wrong_shape(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="3 x 3"):
        plot_confusion_matrix([[1, 0], [0, 1]], LABELS, tmp_path / "cm.png")


def test_format_metrics_table() -> None:
    text = format_metrics_table(classification_metrics(Y_TRUE, Y_PRED, LABELS))
    lines = text.splitlines()
    assert lines[0].startswith("accuracy  0.6667")
    assert "(n=6)" in lines[0]
    assert lines[1] == "macro F1  0.6556"
    assert any(line.split() == ["cat", "1.0000", "0.6667", "0.8000", "3"] for line in lines)
    assert any(line.split() == ["bird", "0.5000", "1.0000", "0.6667", "1"] for line in lines)


def test_format_metrics_table_truncates_many_classes() -> None:
    labels = [f"c{i}" for i in range(100)]
    metrics = classification_metrics(list(range(100)), list(range(100)), labels)
    text = format_metrics_table(metrics, max_classes=10)
    assert "90 more classes" in text
    assert len(text.splitlines()) == 4 + 10 + 1
