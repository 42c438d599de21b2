"""``training/report.py``, unit level: the written report and the CLI's metrics table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from models.metrics import classification_metrics
from tests.support.reports import LABELS, Y_PRED, Y_TRUE, assert_png
from training.report import format_metrics_table, write_report


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
