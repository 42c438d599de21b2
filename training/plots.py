"""The report's plots as PNG files: the confusion matrix and the training curves of a fit, and the
backbone comparison's accuracy against speed and learning curve. Drawn through
matplotlib's object API on the Agg canvas, so nothing touches pyplot's global state or needs a
display."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from os import PathLike
from pathlib import Path
from typing import NamedTuple

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator, NullLocator

from models.errors import InputError

#: Above this many classes the confusion matrix is cut down to the busiest classes in the plot
#: (and left out of report.md): a 1000 x 1000 grid (a bootstrap ImageNet head) is unreadable.
MAX_MATRIX_CLASSES = 30

#: History keys drawn by ``plot_training_curves``, per panel.
LOSS_KEYS = ("train_loss", "val_loss")
ACCURACY_KEYS = ("train_accuracy", "val_accuracy")

EMPTY_HISTORY_MESSAGE = "no epochs (closed-form head fit)"

# Tick labels longer than this are cut; ImageNet names ("tench, Tinca tinca", ...) run long.
_TICK_LABEL_CHARS = 24


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


class ComparedBackbone(NamedTuple):
    """One backbone's point in :func:`plot_accuracy_vs_throughput`."""

    name: str
    accuracy: float  #: mean over the splits
    accuracy_std: float
    fp32_throughput: float  #: images per second
    int8_throughput: float | None  #: None where no INT8 graph was measured (GPU hosts)
    served_throughput: float  #: the variant the service would serve on this host


def plot_accuracy_vs_throughput(
    backbones: Sequence[ComparedBackbone], pareto_front: Sequence[str], path: str | PathLike[str]
) -> None:
    """Mean held-out accuracy (error bar: standard deviation over the splits, capped at 1) against
    batch-32 throughput, one colour per backbone: fp32 filled, INT8 hollow on the same accuracy;
    the Pareto front (at the served variant's throughput) starred and joined."""
    fig = Figure(figsize=(7.5, 4.8))
    ax = fig.subplots()
    for i, b in enumerate(backbones):
        color = f"C{i}"
        low, high = min(b.accuracy_std, b.accuracy), min(b.accuracy_std, 1.0 - b.accuracy)
        ax.errorbar([b.fp32_throughput], [b.accuracy], yerr=[[low], [high]], fmt="o", capsize=4, color=color,
                    label=f"{b.name} fp32")
        if b.int8_throughput is not None:
            ax.plot([b.fp32_throughput, b.int8_throughput], [b.accuracy, b.accuracy], color=color,
                    linestyle=":", linewidth=1)
            ax.plot([b.int8_throughput], [b.accuracy], marker="o", markerfacecolor="none", color=color,
                    linestyle="none", label=f"{b.name} INT8")
    front = sorted((b for b in backbones if b.name in pareto_front), key=lambda b: b.served_throughput)
    if front:
        ax.plot([b.served_throughput for b in front], [b.accuracy for b in front], color="black",
                marker="*", markersize=12, linestyle="--", linewidth=1, label="Pareto front (served variant)")
    ax.set_xlabel("throughput at batch 32 (images/s, onnxruntime)")
    ax.set_ylabel("held-out accuracy (head, mean ± sd over splits)")
    ax.set_title("accuracy against speed")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    _save(fig, path)


def plot_learning_curve(
    curves: Sequence[tuple[str, Sequence[Mapping[str, float]]]], path: str | PathLike[str]
) -> None:
    """Held-out accuracy (mean, with a band of ± one standard deviation over the draws) against
    training images per class, on a log axis, one line per backbone. Each curve is a list of
    rows with ``per_class``, ``accuracy_mean`` and ``accuracy_std``."""
    fig = Figure(figsize=(7.5, 4.8))
    ax = fig.subplots()
    for name, rows in curves:
        x = np.array([float(row["per_class"]) for row in rows])
        mean = np.array([float(row["accuracy_mean"]) for row in rows])
        std = np.array([float(row["accuracy_std"]) for row in rows])
        (line,) = ax.plot(x, mean, marker="o", markersize=4, label=name)
        ax.fill_between(x, mean - std, np.minimum(mean + std, 1.0), color=line.get_color(), alpha=0.15)
    ax.set_xscale("log")
    ticks = sorted({float(row["per_class"]) for _, rows in curves for row in rows})
    ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xlabel("training images per class (last point: all of them)")
    ax.set_ylabel("held-out accuracy")
    ax.set_title("learning curve (head on frozen embeddings)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)
