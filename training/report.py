"""Evaluation reports written beside every model version: ``write_report`` stores the metrics
(:mod:`models.metrics`) with the training history and run details as ``report.json``, a
human-readable ``report.md`` and the two plots of :mod:`training.plots`;
``format_metrics_table`` is what the CLI prints.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np

from models.errors import InputError

from .plots import MAX_MATRIX_CLASSES, plot_confusion_matrix, plot_training_curves

logger = logging.getLogger(__name__)

REPORT_JSON = "report.json"
REPORT_MD = "report.md"
CONFUSION_PNG = "confusion_matrix.png"
CURVES_PNG = "training_curves.png"


def _json_ready(value: Any) -> Any:
    """Convert numpy scalars, paths and non-finite floats into strict-JSON-friendly values."""
    if isinstance(value, Mapping):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_json_ready(v) for v in value]
    if isinstance(value, np.ndarray):
        return _json_ready(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        # A diverged loss is NaN/inf; strict JSON has no spelling for it, null does.
        return None
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


def _report_json(
    title: str,
    metrics: Mapping[str, Any],
    history: list[dict[str, Any]],
    details: Mapping[str, object],
    best_epoch: int | None,
) -> str:
    """report.json's text: indented, except that each confusion-matrix row is one line.

    Indenting every cell would put a 1000-class bootstrap matrix on a million lines (about
    11 MB); one line per row keeps it diffable and about a fifth of that size.
    """
    placeholder = "@@confusion_matrix@@"
    payload = _json_ready(
        {
            "title": title,
            "metrics": {**metrics, "confusion_matrix": placeholder},
            "history": history,
            "details": details,
            "best_epoch": best_epoch,
        }
    )
    text = json.dumps(payload, indent=2, allow_nan=False)
    rows = ",\n".join(
        "      " + json.dumps([int(c) for c in row], separators=(",", ":"))
        for row in metrics["confusion_matrix"]
    )
    # Exactly one occurrence: the placeholder sits at metrics.confusion_matrix, indent 4.
    marker = f'"confusion_matrix": "{placeholder}"'
    if text.count(marker) != 1:
        raise RuntimeError("report.json placeholder for the confusion matrix was not unique")
    return text.replace(marker, f'"confusion_matrix": [\n{rows}\n    ]') + "\n"


def _md_cell(value: object) -> str:
    """Text safe to put in a markdown table cell."""
    if isinstance(value, float):
        text = f"{value:.4g}"
    elif isinstance(value, (list, tuple, set, frozenset)):
        items = [str(v) for v in value]
        text = ", ".join(items[:10])
        if len(items) > 10:
            text += f", … ({len(items) - 10} more)"
        if not items:
            text = "none"
    else:
        text = str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def _check_metrics(metrics: Mapping[str, Any]) -> None:
    required = ("accuracy", "n", "labels", "per_class", "macro_f1", "confusion_matrix")
    missing = [key for key in required if key not in metrics]
    if missing:
        raise InputError(
            f"metrics is missing {missing}; build it with classification_metrics()"
        )


def _markdown(
    title: str,
    metrics: Mapping[str, Any],
    details: Mapping[str, object],
    best_epoch: int | None,
    n_epochs: int,
) -> str:
    labels: list[str] = list(metrics["labels"])
    lines = [f"# {title}", ""]

    if details:
        lines += ["## Details", "", "| detail | value |", "|---|---|"]
        lines += [f"| {_md_cell(key)} | {_md_cell(value)} |" for key, value in details.items()]
        lines.append("")

    lines += [
        "## Metrics",
        "",
        f"- accuracy: **{metrics['accuracy']:.4f}** (n = {metrics['n']})",
        f"- macro F1: **{metrics['macro_f1']:.4f}**",
        f"- epochs: {n_epochs}" + (f" (best: {best_epoch})" if best_epoch is not None else ""),
        "",
        "## Per class",
        "",
        "| class | precision | recall | F1 | support |",
        "|---|---:|---:|---:|---:|",
    ]
    listed = labels
    if len(labels) > MAX_MATRIX_CLASSES:
        # A 1000-class head evaluated on a few classes would list ~1000 rows of zeros; keep the
        # classes that were true or predicted at least once (report.json has every class).
        predicted = np.asarray(metrics["confusion_matrix"]).sum(axis=0)
        listed = [
            label
            for label, n_predicted in zip(labels, predicted, strict=True)
            if metrics["per_class"][label]["support"] > 0 or n_predicted > 0
        ]
    for label in listed:
        row = metrics["per_class"][label]
        lines.append(
            f"| {_md_cell(label)} | {row['precision']:.4f} | {row['recall']:.4f} "
            f"| {row['f1']:.4f} | {row['support']} |"
        )
    if len(listed) < len(labels):
        lines += [
            "",
            f"{len(labels) - len(listed)} of {len(labels)} classes had no examples and no "
            "predictions and are not listed.",
        ]
    lines.append("")

    lines += ["## Confusion matrix", ""]
    if len(labels) <= MAX_MATRIX_CLASSES:
        lines += [
            "Rows are the true class, columns the predicted class.",
            "",
            "| true \\ predicted | " + " | ".join(_md_cell(label) for label in labels) + " |",
            "|---|" + "---:|" * len(labels),
        ]
        for label, row in zip(labels, metrics["confusion_matrix"], strict=True):
            lines.append(f"| {_md_cell(label)} | " + " | ".join(str(c) for c in row) + " |")
        lines.append("")
    else:
        lines += [
            f"{len(labels)} classes: too many for a table; the plot shows the busiest "
            f"{MAX_MATRIX_CLASSES} and report.json has the full matrix.",
            "",
        ]
    lines += [
        f"![confusion matrix]({CONFUSION_PNG})",
        "",
        "## Training curves",
        "",
        f"![training curves]({CURVES_PNG})",
        "",
    ]
    return "\n".join(lines)


def write_report(
    out_dir: str | PathLike[str],
    *,
    title: str,
    metrics: dict[str, Any],
    history: Sequence[Mapping[str, float]] = (),
    details: Mapping[str, object] | None = None,
    best_epoch: int | None = None,
) -> dict[str, Path]:
    """Write report.json, report.md, confusion_matrix.png and training_curves.png to ``out_dir``.

    ``metrics`` is the dict from :func:`classification_metrics`; ``details`` holds free-form run
    facts (strategy, backbone, time, data counts, skipped files) shown as a table in report.md.
    Returns the written paths keyed ``json``, ``markdown``, ``confusion_matrix``,
    ``training_curves``.

    Raises:
        InputError: ``metrics`` lacks a key that classification_metrics() produces.
    """
    _check_metrics(metrics)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    details = dict(details or {})
    history_list = [dict(entry) for entry in history]

    paths = {
        "json": out / REPORT_JSON,
        "markdown": out / REPORT_MD,
        "confusion_matrix": out / CONFUSION_PNG,
        "training_curves": out / CURVES_PNG,
    }
    paths["json"].write_text(
        _report_json(title, metrics, history_list, details, best_epoch), encoding="utf-8"
    )
    paths["markdown"].write_text(
        _markdown(title, metrics, details, best_epoch, len(history_list)), encoding="utf-8"
    )
    plot_confusion_matrix(metrics["confusion_matrix"], metrics["labels"],
                          paths["confusion_matrix"])
    plot_training_curves(history_list, paths["training_curves"], best_epoch=best_epoch)
    logger.info("wrote evaluation report to %s (accuracy %.4f)", out, metrics["accuracy"])
    return paths


def format_metrics_table(metrics: dict[str, Any], *, max_classes: int = MAX_MATRIX_CLASSES) -> str:
    """The short text a CLI prints: accuracy, macro F1 and one line per class.

    With more than ``max_classes`` labels only the classes with the largest support are listed,
    followed by a line saying how many were left out.
    """
    _check_metrics(metrics)
    labels: list[str] = list(metrics["labels"])
    per_class = metrics["per_class"]
    shown = labels
    if len(labels) > max_classes:
        # sorted() is stable, so equal supports keep label order.
        shown = sorted(labels, key=lambda lab: -per_class[lab]["support"])[:max_classes]

    width = min(max([len("class")] + [len(label) for label in shown]), 32)
    lines = [
        f"accuracy  {metrics['accuracy']:.4f}  (n={metrics['n']})",
        f"macro F1  {metrics['macro_f1']:.4f}",
        "",
        f"{'class':<{width}}  precision  recall      f1  support",
    ]
    for label in shown:
        row = per_class[label]
        name = label if len(label) <= width else label[: width - 1] + "…"
        lines.append(
            f"{name:<{width}}  {row['precision']:9.4f}  {row['recall']:6.4f}  "
            f"{row['f1']:6.4f}  {row['support']:7d}"
        )
    if len(shown) < len(labels):
        lines.append(f"... {len(labels) - len(shown)} more classes (by support); see report.md")
    return "\n".join(lines)
