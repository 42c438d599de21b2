"""Evaluation reports written beside every model version.

``classification_metrics`` turns true and predicted class indices into a JSON-serialisable dict
(accuracy, per-class precision/recall/F1/support, macro F1, confusion matrix); ``write_report``
stores that dict with the training history and run details as ``report.json``, a human-readable
``report.md`` and two PNG plots. Only numpy and matplotlib are used (no torch, no sklearn), and
figures are drawn through matplotlib's object API on the Agg canvas, so nothing touches pyplot's
global state or needs a display.
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
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from models.errors import InputError

logger = logging.getLogger(__name__)

#: Above this many classes the confusion matrix is cut down to the busiest classes in the plot
#: and left out of report.md: a 1000 x 1000 grid (a bootstrap ImageNet head) is unreadable.
MAX_MATRIX_CLASSES = 30

#: History keys drawn by ``plot_training_curves``, per panel.
LOSS_KEYS = ("train_loss", "val_loss")
ACCURACY_KEYS = ("train_accuracy", "val_accuracy")

EMPTY_HISTORY_MESSAGE = "no epochs (closed-form head fit)"

REPORT_JSON = "report.json"
REPORT_MD = "report.md"
CONFUSION_PNG = "confusion_matrix.png"
CURVES_PNG = "training_curves.png"

# Tick labels longer than this are cut; ImageNet names ("tench, Tinca tinca", ...) run long.
_TICK_LABEL_CHARS = 24


def _as_index_array(values: Sequence[int], name: str) -> np.ndarray:
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
    y_true: Sequence[int], y_pred: Sequence[int], labels: Sequence[str]
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


def _short_label(label: str) -> str:
    return label if len(label) <= _TICK_LABEL_CHARS else label[: _TICK_LABEL_CHARS - 1] + "…"


def _save(fig: Figure, path: str | PathLike[str]) -> None:
    # bbox_inches="tight" fits long tick labels without tight_layout, which warns when it cannot
    # satisfy its constraints (and warnings are errors in this project's tests).
    FigureCanvasAgg(fig)
    fig.savefig(Path(path), format="png", dpi=100, bbox_inches="tight")
    # A bare Figure is not registered with pyplot, so dropping the reference frees it; clearing
    # releases the artists now rather than at the next garbage collection.
    fig.clear()


def plot_confusion_matrix(
    confusion: Sequence[Sequence[int]], labels: Sequence[str], path: str | PathLike[str]
) -> None:
    """Write the confusion matrix (rows true, columns predicted) as a PNG with counts in cells.

    With more than ``MAX_MATRIX_CLASSES`` labels only the classes with the largest support plus
    prediction count are drawn (kept in label order), and the title says so.

    Raises:
        InputError: the matrix is not square with one row per label.
    """
    matrix = np.asarray(confusion, dtype=np.int64)
    n_classes = len(labels)
    if n_classes == 0 or matrix.shape != (n_classes, n_classes):
        raise InputError(
            f"confusion matrix must be {n_classes} x {n_classes} for {n_classes} labels, "
            f"got shape {matrix.shape}"
        )

    title = "Confusion matrix"
    shown = np.arange(n_classes)
    if n_classes > MAX_MATRIX_CLASSES:
        activity = matrix.sum(axis=1) + matrix.sum(axis=0)
        # Stable sort so ties keep label order and the choice is reproducible.
        busiest = np.argsort(-activity, kind="stable")[:MAX_MATRIX_CLASSES]
        shown = np.sort(busiest)
        title = (
            f"Confusion matrix: {len(shown)} of {n_classes} classes "
            "(largest support + predictions)"
        )
    sub = matrix[np.ix_(shown, shown)]
    tick_labels = [_short_label(str(labels[int(i)])) for i in shown]

    k = len(shown)
    side = min(max(4.0, 0.45 * k + 2.5), 18.0)
    fig = Figure(figsize=(side + 1.0, side))
    ax = fig.add_subplot()
    vmax = max(int(sub.max()), 1)  # an all-zero matrix still needs a non-degenerate colour scale
    image = ax.imshow(sub, cmap="Blues", vmin=0, vmax=vmax, interpolation="nearest")
    colorbar = fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    colorbar.ax.yaxis.set_major_locator(MaxNLocator(integer=True))  # counts, not 0.25 steps

    fontsize = 10 if k <= 10 else 8 if k <= 20 else 6
    # Large matrices are mostly zeros; leaving those cells blank keeps the plot readable and
    # halves the drawing time (every text artist is drawn twice by bbox_inches="tight").
    annotate_zeros = k <= 10
    for row in range(k):
        for col in range(k):
            count = int(sub[row, col])
            if count == 0 and not annotate_zeros:
                continue
            # White text on dark cells keeps the count readable at the top of the colour scale.
            colour = "white" if count > vmax / 2 else "black"
            ax.text(col, row, str(count), ha="center", va="center", color=colour,
                    fontsize=fontsize)

    ax.set_xticks(range(k))
    ax.set_yticks(range(k))
    ax.set_xticklabels(tick_labels, rotation=90, fontsize=fontsize + 1)
    ax.set_yticklabels(tick_labels, fontsize=fontsize + 1)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=10)
    _save(fig, path)


def _series(history: Sequence[Mapping[str, float]], key: str) -> tuple[list[float], list[float]]:
    """(epochs, values) for ``key``, skipping epochs that did not record it or recorded None."""
    epochs: list[float] = []
    values: list[float] = []
    for position, entry in enumerate(history, start=1):
        value = entry.get(key)
        if value is None:
            continue
        # A history without "epoch" keys is still plottable by position (1-based).
        epochs.append(float(entry.get("epoch", position)))
        values.append(float(value))
    return epochs, values


def plot_training_curves(
    history: Sequence[Mapping[str, float]],
    path: str | PathLike[str],
    *,
    best_epoch: int | None = None,
) -> None:
    """Write loss and accuracy per epoch as a two-panel PNG, marking ``best_epoch`` if given.

    ``history`` is a list of per-epoch dicts with ``epoch`` and any of ``train_loss``,
    ``val_loss``, ``train_accuracy``, ``val_accuracy``. An empty history (a head fitted in closed
    form, no epochs) writes a PNG that says so instead of failing.
    """
    if not history:
        fig = Figure(figsize=(6.0, 2.5))
        fig.text(0.5, 0.5, EMPTY_HISTORY_MESSAGE, ha="center", va="center", fontsize=12)
        _save(fig, path)
        return

    fig = Figure(figsize=(11.0, 4.0))
    loss_ax, acc_ax = fig.subplots(1, 2)
    for ax, keys, ylabel in ((loss_ax, LOSS_KEYS, "loss"), (acc_ax, ACCURACY_KEYS, "accuracy")):
        drawn = False
        for key in keys:
            epochs, values = _series(history, key)
            if not values:
                continue
            # Markers make a one-epoch run visible (a single-point line draws nothing).
            ax.plot(epochs, values, marker="o", markersize=3, label=key.replace("_", " "))
            drawn = True
            if best_epoch is not None and best_epoch in epochs:
                best_value = values[epochs.index(best_epoch)]
                ax.plot([best_epoch], [best_value], marker="*", markersize=14, color="gold",
                        markeredgecolor="black", linestyle="none")
        if best_epoch is not None and drawn:
            ax.axvline(best_epoch, color="grey", linestyle="--", linewidth=1,
                       label=f"best epoch ({best_epoch})")
        if drawn:
            # Only legend when something carries a label: an empty legend() call warns.
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, f"no {ylabel} recorded", ha="center", va="center",
                    transform=ax.transAxes)
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.set_title(ylabel)
        ax.grid(True, alpha=0.3)
    _save(fig, path)


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
