"""Unlabelled domain adaptation on corrupted photos: the head's test accuracy with no adaptation,
with the target embeddings aligned onto the source ones (``models/adapt.py``: diagonal, CORAL),
and with the backbone's batch-norm statistics re-estimated on the target images (AdaBN), from a
few to all of the unlabelled target images.

    .venv/bin/python -m bench.adapt_bench [--data ../shared/data/hymenoptera/train] [--seeds 3] \
        [--json OUT.json] [--report-dir DIR] [--home DIR] [--corruptions blur noise ...]

Per seed the photos are split, stratified, into source (60 %) and test (40 %); a linear head
(``models.head.fit_linear_head`` with its default parameters, as the service fits) is fitted on
the clean source photos' embeddings and scored on the test photos, clean and under each corruption
of ``tests/support/corruptions.py`` at each severity. The unlabelled target images are the photos
under the same corruption: all of them (transductive: a deployed service adapts to the images it
is asked to classify, so the test photos are among them; no label is used), or the first 16, 64
(and, for diagonal alignment, which costs nothing, 8, 32, 128) of one random order per seed.

Embeddings come from the version's ONNX graph (``training.pipeline.onnx_embeddings``) on the exact
preprocessing of ``models.preprocess``; a corruption is applied to the full-size decoded photo
before it. AdaBN runs the torch backbone the graph was exported from (checked by its weights'
fingerprint) with re-estimated batch-norm statistics, scored with the head fitted on the original
backbone's source embeddings, and with a head fitted on the source photos with the statistics
re-estimated on them (AdaBN as defined: a model's statistics are those of its training domain).
Without --home, the pretrained classifier is bootstrapped into a temporary state directory
(``python -m training bootstrap``) and removed at the end.

The report (Markdown) goes to stdout, progress bars to stderr; --report-dir writes it as
summary.md with accuracy_change.png beside it, --json every score per seed.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import shlex
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import NullLocator
from PIL import Image
from tqdm import tqdm

from bench.common import DEFAULT_IMAGES, Progress, install_sigterm_handler, run_main, state_home
from models.adapt import CORAL_SHRINKAGE, MIN_TARGET_IMAGES, Alignment, coral_alignment, diagonal_alignment
from models.hardware import cpu_count
from models.head import LinearHead, fit_linear_head
from models.preprocess import preprocess_image
from models.spec import PreprocessConfig
from store.state import open_state
from tests.support.corruptions import CORRUPTIONS, SEVERITIES, Severity, corrupt
from training.backbones import ClassifierWithEmbedding, TimmModel, create_backbone
from training.data import load_labelled, stratified_split
from training.pipeline import onnx_embeddings

TEST_FRACTION = 0.4
#: target image counts every method is measured at, besides all of them
TARGETS = (16, 64)
#: diagonal alignment costs milliseconds, so its curve is drawn finer
DIAGONAL_TARGETS = (8, 16, 32, 64, 128)
SHRINKAGES = (0.1, 0.5, 0.9, 1.0)
#: the share of one class in the skewed target pools
SKEW = 0.8
# A batch holds all of 16 or 64 target images, so that AdaBN at those counts estimates each
# layer's statistics on exactly the target set, as the method defines them.
ADABN_BATCH = 64
PARITY_IMAGES = 8
MAX_PARITY_DIFF = 1e-3
NONE, DIAGONAL, ADABN = "none", "diagonal", "AdaBN"
#: AdaBN scored with a head fitted on the source photos' embeddings with the statistics re-estimated on those
ADABN_SOURCE_HEAD = "AdaBN, source-statistics head"


def coral(shrinkage: float) -> str:
    return f"CORAL s={shrinkage:g}"


@dataclass(frozen=True)
class Domain:
    """The clean photos (``corruption`` None) or the photos under one corruption."""

    corruption: str | None = None
    severity: Severity = "mild"

    @property
    def label(self) -> str:
        return "clean" if self.corruption is None else f"{self.corruption} {self.severity}"

    def photo(self, image: Image.Image, index: int) -> Image.Image:
        # each photo's noise is its own and the same in every run
        return image if self.corruption is None else corrupt(image, self.corruption, self.severity, seed=index)


@dataclass(frozen=True)
class Score:
    """The test photos of one seed's split that one method classified right."""

    domain: str
    method: str
    targets: int  #: unlabelled target images used (0: no adaptation)
    seed: int
    correct: int
    total: int

    @property
    def accuracy(self) -> float:
        return self.correct / self.total


@dataclass(frozen=True)
class Split:
    seed: int
    source: np.ndarray
    test: np.ndarray
    target_order: np.ndarray  #: the first n of this order are the n target images
    skewed: dict[str, np.ndarray]  #: class -> a target pool with SKEW of it

    def pool(self, n: int) -> np.ndarray:
        return self.target_order[:n]


def skewed_pool(targets: np.ndarray, majority: int, rng: np.random.Generator) -> np.ndarray:
    """Every photo of class ``majority`` and as many others, drawn at random, as make it
    :data:`SKEW` of the pool."""
    members = np.flatnonzero(targets == majority)
    others = rng.permutation(np.flatnonzero(targets != majority))
    return np.concatenate([members, others[: round(len(members) * (1 - SKEW) / SKEW)]])


def make_splits(targets: np.ndarray, classes: Sequence[str], seeds: int) -> list[Split]:
    splits = []
    for seed in range(seeds):
        source, test = stratified_split(targets, TEST_FRACTION, seed)
        # random streams of their own, not the split's
        order = np.random.default_rng([seed, 1]).permutation(len(targets))
        skew_rng = np.random.default_rng([seed, 2])
        skewed = {label: skewed_pool(targets, c, skew_rng) for c, label in enumerate(classes)}
        splits.append(Split(seed, source, test, order, skewed))
    return splits


def skewed_method(label: str) -> str:
    return f"diagonal, {SKEW:.0%} {label}"


# -- embeddings -------------------------------------------------------------------------------


def domain_inputs(photos: Sequence[Image.Image], domain: Domain, config: PreprocessConfig) -> np.ndarray:
    return np.stack([preprocess_image(domain.photo(photo, i), config) for i, photo in enumerate(photos)])


def _batches(inputs: np.ndarray) -> Iterator[torch.Tensor]:
    for start in range(0, len(inputs), ADABN_BATCH):
        # channels-last runs this backbone's depthwise convolutions several times faster on CPU
        yield torch.from_numpy(inputs[start : start + ADABN_BATCH]).contiguous(memory_format=torch.channels_last)


def torch_embeddings(model: TimmModel, inputs: np.ndarray, done: Callable[[int], Any] = lambda _: None) -> np.ndarray:
    """The embedding output of the exported graph, computed by ``model`` as it is (eval mode)."""
    wrapper = ClassifierWithEmbedding(model).eval()
    chunks = []
    with torch.no_grad():
        for batch in _batches(inputs):
            chunks.append(wrapper(batch)[1].numpy())
            done(len(batch))
    return np.concatenate(chunks).astype(np.float32)


def adabn_embeddings(model: TimmModel, target: np.ndarray, inputs: np.ndarray,
                     done: Callable[[int], Any] = lambda _: None) -> np.ndarray:
    """Embeddings of ``inputs`` by a copy of ``model`` whose batch-norm statistics were
    re-estimated on ``target`` (AdaBN): from reset statistics, every batch-norm layer in train
    mode with a cumulative average (momentum None) over one pass of the target images, the rest
    of the network in eval mode; then all in eval mode."""
    adapted = copy.deepcopy(model).eval()
    for norm in (m for m in adapted.modules() if isinstance(m, torch.nn.BatchNorm2d)):
        norm.reset_running_stats()
        norm.momentum = None
        norm.train()
    # in a random order: a train-mode batch normalises with its own statistics, so a batch of one
    # class (the photos come sorted by class) would skew the statistics of the layers after it
    shuffled = target[np.random.default_rng(0).permutation(len(target))]
    with torch.no_grad():
        for batch in _batches(shuffled):
            adapted.forward_features(batch)
            done(len(batch))
    return torch_embeddings(adapted, inputs, done)


@dataclass
class Embeddings:
    """Per domain: every photo's embedding from the ONNX graph; AdaBN's embeddings of each
    seed's test photos, per target image count (all: every photo, one adaptation for all seeds);
    per seed, the clean source photos' embeddings with the statistics re-estimated on them."""

    onnx: dict[str, np.ndarray]
    adabn: dict[tuple[str, int, int], np.ndarray]  #: (domain, targets, seed) -> (test photos, D)
    adabn_source: dict[int, np.ndarray]  #: seed -> (source photos, D)
    parity_max_diff: float
    batch_norms: int


def embed(photos: Sequence[Image.Image], domains: Sequence[Domain], splits: Sequence[Split], onnx_path: Path,
          config: PreprocessConfig, model: TimmModel) -> Embeddings:
    n = len(photos)
    adabn_work = 2 * n + sum(k + len(split.test) for split in splits for k in TARGETS)
    source_work = sum(2 * len(split.source) for split in splits)
    onnx: dict[str, np.ndarray] = {}
    adabn: dict[tuple[str, int, int], np.ndarray] = {}
    adabn_source: dict[int, np.ndarray] = {}
    parity = 0.0
    with tqdm(total=len(domains) * (2 * n + adabn_work) + source_work, desc="embeddings", unit="img") as bar:
        for domain in domains:
            bar.set_postfix_str(f"{domain.label}: preprocessing")
            inputs = domain_inputs(photos, domain, config)
            bar.update(n)
            bar.set_postfix_str(f"{domain.label}: onnx")
            onnx[domain.label] = onnx_embeddings(onnx_path, inputs, progress=False)
            bar.update(n)
            if domain.corruption is None:
                # AdaBN's differences must come from the statistics, not from torch against onnxruntime
                reference = torch_embeddings(model, inputs[:PARITY_IMAGES])
                parity = float(np.abs(reference - onnx[domain.label][:PARITY_IMAGES]).max())
                if parity > MAX_PARITY_DIFF:
                    raise RuntimeError(f"torch and the ONNX graph differ by {parity:.2e} on the clean photos' "
                                       "embeddings: AdaBN would not be comparable")
                bar.set_postfix_str("clean: AdaBN on the source photos")
                for split in splits:
                    adabn_source[split.seed] = adabn_embeddings(model, inputs[split.source], inputs[split.source],
                                                                bar.update)
            bar.set_postfix_str(f"{domain.label}: AdaBN")
            every = adabn_embeddings(model, inputs, inputs, bar.update)
            for split in splits:
                adabn[domain.label, n, split.seed] = every[split.test]
                for k in TARGETS:
                    adabn[domain.label, k, split.seed] = adabn_embeddings(model, inputs[split.pool(k)],
                                                                          inputs[split.test], bar.update)
    norms = sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    return Embeddings(onnx, adabn, adabn_source, parity, norms)


# -- scores -----------------------------------------------------------------------------------


@dataclass
class Timer:
    seconds: float = 0.0

    def __enter__(self) -> Timer:
        self._started = time.perf_counter()
        return self

    def __exit__(self, *_: object) -> None:
        self.seconds += time.perf_counter() - self._started


@dataclass(frozen=True)
class Heads:
    """One seed's heads: fitted on the clean source photos' embeddings from the graph (the one
    the service would adapt) and from the backbone with statistics re-estimated on them."""

    graph: LinearHead
    source_statistics: LinearHead


class Scorer:
    """Scores of one setting on one seed's split, appended to ``scores``; alignments timed."""

    def __init__(self, embeddings: Embeddings, targets: np.ndarray, domain: Domain, split: Split, heads: Heads,
                 timers: dict[str, Timer], scores: list[Score]) -> None:
        self.source = embeddings.onnx[Domain().label][split.source]
        self.target = embeddings.onnx[domain.label]
        self.embeddings, self.domain, self.split, self.heads = embeddings, domain, split, heads
        self.truth = targets[split.test]
        self.timers, self.scores = timers, scores

    def score(self, method: str, k: int, head: tuple[np.ndarray, np.ndarray], test: np.ndarray) -> None:
        weight, bias = head
        correct = int(((test @ weight.T + bias).argmax(1) == self.truth).sum())
        self.scores.append(Score(self.domain.label, method, k, self.split.seed, correct, len(self.truth)))

    def aligned(self, method: str, k: int, alignment: Alignment) -> None:
        self.score(method, k, alignment.fold(self.heads.graph.weight, self.heads.graph.bias),
                   self.target[self.split.test])

    def none(self) -> None:
        self.score(NONE, 0, (self.heads.graph.weight, self.heads.graph.bias), self.target[self.split.test])

    def diagonal(self, k: int) -> None:
        with self.timers[DIAGONAL]:
            alignment = diagonal_alignment(self.source, self.target[self.split.pool(k)])
        self.aligned(DIAGONAL, k, alignment)

    def diagonal_skewed(self, label: str) -> None:
        pool = self.split.skewed[label]
        self.aligned(skewed_method(label), len(pool), diagonal_alignment(self.source, self.target[pool]))

    def coral(self, k: int, shrinkage: float) -> None:
        with self.timers["CORAL"]:
            alignment = coral_alignment(self.source, self.target[self.split.pool(k)], shrinkage)
        self.aligned(coral(shrinkage), k, alignment)

    def adabn(self, k: int) -> None:
        test = self.embeddings.adabn[self.domain.label, k, self.split.seed]
        self.score(ADABN, k, (self.heads.graph.weight, self.heads.graph.bias), test)
        head = self.heads.source_statistics
        self.score(ADABN_SOURCE_HEAD, k, (head.weight, head.bias), test)


def score_all(embeddings: Embeddings, targets: np.ndarray, classes: int, domains: Sequence[Domain],
              splits: Sequence[Split], shrinkages: Sequence[float]) -> tuple[list[Score], dict[str, float]]:
    """Every method's scores, and the seconds the alignments took. CORAL's shrinkages are
    compared on all the target images; the smaller counts are measured with the default and, if
    another is better, with that one too."""
    clean, n = embeddings.onnx[Domain().label], len(targets)
    scores: list[Score] = []
    timers = {DIAGONAL: Timer(), "CORAL": Timer()}
    heads = {split.seed: Heads(fit_linear_head(clean[split.source], targets[split.source], classes, seed=split.seed),
                               fit_linear_head(embeddings.adabn_source[split.seed], targets[split.source], classes,
                                               seed=split.seed))
             for split in splits}

    def scorers() -> Iterator[Scorer]:
        for split in splits:
            for domain in domains:
                bar.set_postfix_str(domain.label)
                yield Scorer(embeddings, targets, domain, split, heads[split.seed], timers, scores)
                bar.update()

    with tqdm(total=len(splits) * len(domains), desc="alignment", unit="setting") as bar:
        for scorer in scorers():
            scorer.none()
            for k in (*DIAGONAL_TARGETS, n):
                scorer.diagonal(k)
            for label in scorer.split.skewed:
                scorer.diagonal_skewed(label)
            for shrinkage in shrinkages:
                scorer.coral(n, shrinkage)
            for k in TARGETS:
                scorer.coral(k, CORAL_SHRINKAGE)
            for k in (*TARGETS, n):
                scorer.adabn(k)
        best = best_shrinkage(Results(scores, domains, len(splits), n), shrinkages)
        if best != CORAL_SHRINKAGE:
            bar.total += len(splits) * len(domains)
            for scorer in scorers():
                for k in TARGETS:
                    scorer.coral(k, best)
    return scores, {name: timer.seconds for name, timer in timers.items()}


class Results:
    """The scores, indexed: accuracies and changes per seed, and their summaries."""

    def __init__(self, scores: Sequence[Score], domains: Sequence[Domain], seeds: int, images: int) -> None:
        self.scores = list(scores)
        self.domains = [d.label for d in domains]
        self.corrupted = [d.label for d in domains if d.corruption is not None]
        self.images = images
        self._by_key: dict[tuple[str, str, int], list[Score]] = {}
        for s in scores:
            self._by_key.setdefault((s.domain, s.method, s.targets), []).append(s)
        self.seeds = seeds

    def has(self, method: str, k: int) -> bool:
        return (self.domains[0], method, k) in self._by_key

    def per_seed(self, domain: str, method: str, k: int) -> list[Score]:
        found = sorted(self._by_key[domain, method, 0 if method == NONE else k], key=lambda s: s.seed)
        if len(found) != self.seeds:
            raise RuntimeError(f"{domain}, {method}, {k}: {len(found)} scores for {self.seeds} seeds")
        return found

    def accuracy(self, domain: str, method: str, k: int) -> np.ndarray:
        return np.array([s.accuracy for s in self.per_seed(domain, method, k)])

    def change(self, domain: str, method: str, k: int) -> np.ndarray:
        """Accuracy points gained over no adaptation, per seed (the same test photos)."""
        return 100 * (self.accuracy(domain, method, k) - self.accuracy(domain, NONE, 0))

    def mean_change(self, method: str, k: int) -> np.ndarray:
        """Per seed, the change averaged over the corruption settings."""
        return np.mean([self.change(d, method, k) for d in self.corrupted], axis=0)

    def worst(self, method: str, k: int) -> tuple[float, str]:
        """The least seed-mean change of any setting, clean included, and that setting."""
        return min((float(self.change(d, method, k).mean()), d) for d in self.domains)

    def cell(self, domain: str, method: str, k: int) -> str:
        found = self.per_seed(domain, method, k)
        acc = self.accuracy(domain, method, k)
        correct = np.mean([s.correct for s in found])
        total = np.mean([s.total for s in found])
        return f"{acc.mean():.3f} ± {_std(acc):.3f} ({correct:.1f}/{total:g})"

    def summary(self) -> dict[str, Any]:
        table: dict[str, Any] = {}
        for d in self.domains:
            table[d] = {}
            for method, k in sorted({(s.method, s.targets) for s in self.scores}):
                acc = self.accuracy(d, method, k)
                table[d][f"{method} @ {k}"] = {"accuracy_mean": float(acc.mean()), "accuracy_std": _std(acc),
                                               "correct_mean": float(np.mean([s.correct for s in
                                                                              self.per_seed(d, method, k)]))}
        return table


def _std(values: np.ndarray) -> float:
    return float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def _signed(values: np.ndarray) -> str:
    return f"{values.mean():+.1f} ± {_std(values):.1f}"


def best_shrinkage(results: Results, shrinkages: Sequence[float]) -> float:
    """The shrinkage with the largest mean change over the corruptions at all target images (the
    default on a tie)."""
    n = results.images
    return max(shrinkages, key=lambda s: (round(float(results.mean_change(coral(s), n).mean()), 6),
                                          s == CORAL_SHRINKAGE))


@dataclass(frozen=True)
class Recommendation:
    min_target_images: int | None
    rule: str


def recommend_min_targets(results: Results, test_images: int) -> Recommendation:
    """The fewest target images from which on diagonal alignment loses at most one test photo on
    any setting (clean included) on average over the seeds, and gains at least half of what all
    the images gain on average over the corruptions."""
    n = results.images
    # one test photo is the resolution of the measurement: a smaller mean loss is one photo on
    # some of the seeds
    tolerance = 100 / test_images
    full_gain = float(results.mean_change(DIAGONAL, n).mean())
    rule = (f"the fewest target images from which on (at that count and every larger one measured) diagonal "
            f"alignment loses, averaged over the seeds, at most one test photo ({tolerance:.1f} points) against no "
            f"adaptation on any setting (clean included), and gains at least half of what all the target images "
            f"gain, averaged over the corruptions ({full_gain / 2:+.1f} points)")
    choice = None
    for k in sorted((*DIAGONAL_TARGETS, n), reverse=True):
        if (results.worst(DIAGONAL, k)[0] < -tolerance * (1 + 1e-9)  # exactly one photo passes
                or float(results.mean_change(DIAGONAL, k).mean()) < full_gain / 2):
            break
        choice = k
    return Recommendation(choice, rule)


# -- report -----------------------------------------------------------------------------------


def count_label(k: int, images: int) -> str:
    return f"all ({images})" if k == images else str(k)


def curve_methods(best: float) -> list[str]:
    corals = [coral(CORAL_SHRINKAGE)] + ([coral(best)] if best != CORAL_SHRINKAGE else [])
    return [DIAGONAL, *corals, ADABN, ADABN_SOURCE_HEAD]


def main_table(results: Results, best: float) -> str:
    n = results.images
    columns = [(NONE, 0, "none"), (DIAGONAL, n, "diagonal"),
               (coral(CORAL_SHRINKAGE), n, f"CORAL s={CORAL_SHRINKAGE:g} (default)")]
    if best != CORAL_SHRINKAGE:
        columns.append((coral(best), n, f"CORAL s={best:g} (best)"))
    columns += [(ADABN, n, ADABN), (ADABN_SOURCE_HEAD, n, ADABN_SOURCE_HEAD),
                (DIAGONAL, 16, "diagonal, 16 images"), (DIAGONAL, 64, "diagonal, 64 images")]
    lines = ["| setting | " + " | ".join(title for _, _, title in columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for d in results.domains:
        lines.append(f"| {d} | " + " | ".join(results.cell(d, m, k) for m, k, _ in columns) + " |")
    return "\n".join(lines)


def curve_cell(results: Results, method: str, k: int, what: str) -> str:
    if what == "worst setting":
        return "{:+.1f} ({})".format(*results.worst(method, k))
    return _signed(results.change("clean", method, k) if what == "clean" else results.mean_change(method, k))


def curve_table(results: Results, best: float) -> str:
    n = results.images
    counts = sorted({*DIAGONAL_TARGETS, *TARGETS, n})
    header = ["method", "", *(count_label(k, n) for k in counts)]
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    for method in curve_methods(best):
        for what in ("mean over the corruptions", "worst setting", "clean"):
            cells = [curve_cell(results, method, k, what) if results.has(method, k) else "-" for k in counts]
            lines.append(f"| {method} | {what} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def shrinkage_table(results: Results, shrinkages: Sequence[float]) -> str:
    n = results.images
    lines = ["| shrinkage | mean over the corruptions | worst setting | clean |", "|---|---|---|---|"]
    for s in shrinkages:
        worst, where = results.worst(coral(s), n)
        name = f"{s:g}{' (default)' if s == CORAL_SHRINKAGE else ''}"
        lines.append(f"| {name} | {_signed(results.mean_change(coral(s), n))} | {worst:+.1f} ({where}) | "
                     f"{_signed(results.change('clean', coral(s), n))} |")
    return "\n".join(lines)


def skew_table(results: Results, splits: Sequence[Split]) -> str:
    lines = ["| target pool | photos | mean over the corruptions | worst setting | clean |", "|---|---|---|---|---|"]
    n = results.images
    rows = [(DIAGONAL, n, f"all {n} (the photos' own class balance)")]
    rows += [(skewed_method(label), len(pool), f"{SKEW:.0%} {label}") for label, pool in splits[0].skewed.items()]
    for method, k, title in rows:
        lines.append(f"| {title} | {k} | {_signed(results.mean_change(method, k))} | "
                     "{:+.1f} ({}) | ".format(*results.worst(method, k))
                     + f"{_signed(results.change('clean', method, k))} |")
    return "\n".join(lines)


def plot_changes(results: Results, best: float, path: Path) -> None:
    """Accuracy change against the number of target images, per method: the mean over the
    corruptions (band: ± one standard deviation over the seeds) and the worst setting."""
    n = results.images
    ticks = sorted({*DIAGONAL_TARGETS, *TARGETS, n})
    fig = Figure(figsize=(11.0, 4.2))
    mean_ax, worst_ax = fig.subplots(1, 2, sharey=True)
    for method in curve_methods(best):
        counts = [k for k in ticks if results.has(method, k)]
        changes = [results.mean_change(method, k) for k in counts]
        mean = np.array([c.mean() for c in changes])
        std = np.array([_std(c) for c in changes])
        (line,) = mean_ax.plot(counts, mean, marker="o", markersize=4, label=method)
        mean_ax.fill_between(counts, mean - std, mean + std, color=line.get_color(), alpha=0.15)
        worst_ax.plot(counts, [results.worst(method, k)[0] for k in counts], marker="o", markersize=4,
                      color=line.get_color(), label=method)
    for ax, title in ((mean_ax, f"mean over the {len(results.corrupted)} corruption settings"),
                      (worst_ax, "worst setting (clean included)")):
        ax.axhline(0.0, color="grey", linewidth=1)
        ax.set_xscale("log")
        ax.set_xticks(ticks, [count_label(k, n) for k in ticks])
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xlabel("unlabelled target images")
        ax.set_title(title, fontsize=10)
        ax.grid(True, alpha=0.3)
    mean_ax.set_ylabel("test accuracy change against no adaptation (points)")
    mean_ax.legend(fontsize=8)
    FigureCanvasAgg(fig)
    fig.savefig(path, format="png", dpi=100, bbox_inches="tight")


def report(results: Results, splits: Sequence[Split], shrinkages: Sequence[float], context: dict[str, Any],
           plot_name: str | None) -> str:
    n = results.images
    best = best_shrinkage(results, shrinkages)
    minimum = recommend_min_targets(results, context["test_images"])
    losses = [d for d in results.domains if results.change(d, DIAGONAL, n).mean() < 0]
    seed_losses = sum(int((results.change(d, DIAGONAL, n) < 0).sum()) for d in results.domains)
    adabn_hurts = [d for d in results.corrupted if results.change(d, ADABN, n).mean() < 0]
    adabn_source_hurts = [d for d in results.corrupted if results.change(d, ADABN_SOURCE_HEAD, n).mean() < 0]
    lines = [
        f"# Unlabelled domain adaptation on {context['data']}",
        "",
        f"{n} photos ({context['class_counts']}); {results.seeds} seeds. Per seed, a stratified split: "
        f"{context['source_images']} source photos ({1 - TEST_FRACTION:.0%}), {context['test_images']} test photos. "
        f"The head (`models.head.fit_linear_head`, default parameters) is fitted on the clean source photos' "
        f"embeddings from {context['backbone']} (version {context['version']}'s ONNX graph, pretrained ImageNet "
        f"weights) and scored on the test photos, clean and under each corruption (`tests/support/corruptions.py`). "
        f"Unlabelled target images: the photos under the same setting, the first 8 to 128 of a random order per "
        f"seed, or all of them: \"all\" is {n}, every photo, the test photos included (no label is used). Cells: "
        f"test accuracy, mean ± standard deviation over the seeds (mean correct / test photos). Changes: accuracy "
        f"points against no adaptation on the same test photos.",
        "",
        f"AdaBN: the torch backbone (it agrees with the ONNX graph within {context['parity_max_diff']:.1e} on the "
        f"clean embeddings) with its {context['batch_norms']} batch-norm layers' statistics re-estimated on the "
        f"target images (one pass, batches of {ADABN_BATCH}, cumulative average). \"{ADABN}\" scores it with the "
        f"same head as the others (fitted on the original backbone's embeddings); \"{ADABN_SOURCE_HEAD}\" with a "
        f"head fitted on the source photos' embeddings with the statistics re-estimated on those photos, as AdaBN "
        f"is defined (the source model's statistics are the source domain's).",
        "",
        f"Run of {context['date']}, {context['threads']} threads for torch and onnxruntime, wall time "
        f"{context['seconds']['total']:.0f} s ({context['timing']}). Command: `{context['command']}`.",
        "",
        f"## All {n} target images",
        "",
        main_table(results, best),
        "",
        ("Diagonal alignment is, averaged over the seeds, at least as accurate as no adaptation on every setting"
         if not losses else
         f"Diagonal alignment is, averaged over the seeds, less accurate than no adaptation on {', '.join(losses)}")
        + f"; it is less accurate on {seed_losses} of the {len(results.domains) * results.seeds} pairs of setting "
        f"and seed. {ADABN} loses accuracy on {len(adabn_hurts)} of the {len(results.corrupted)} corruption "
        f"settings, {ADABN_SOURCE_HEAD} on {len(adabn_source_hurts)}.",
        "",
        "## By the number of target images",
        "",
        "Accuracy change against no adaptation (points): averaged over the corruption settings (mean ± standard "
        "deviation over the seeds), the setting with the lowest seed mean (clean included), and clean."
        + (f" Plot: [{plot_name}]({plot_name})." if plot_name else ""),
        "",
        curve_table(results, best),
        "",
        f"## CORAL shrinkage, all {n} target images",
        "",
        shrinkage_table(results, shrinkages),
        "",
        f"Best: {best:g} (the largest mean change over the corruptions; the default on a tie).",
        "",
        "## Class balance of the target images",
        "",
        f"Diagonal alignment matches each dimension's mean, so a target pool whose classes are mixed unlike the "
        f"source photos' looks like a shift of the domain. Here the pool is every photo of one class under the "
        f"setting and enough photos of the others, drawn per seed, to make that class {SKEW:.0%} of it (labels "
        f"pick the pool; the adaptation uses none).",
        "",
        skew_table(results, splits),
        "",
        "## Minimum number of target images",
        "",
        (f"**{minimum.min_target_images}**" if minimum.min_target_images is not None else "**none of the counts**")
        + f" (models.adapt.MIN_TARGET_IMAGES is {MIN_TARGET_IMAGES}). Rule: {minimum.rule}.",
    ]
    return "\n".join(lines) + "\n"


# -- main -------------------------------------------------------------------------------------


def domains_of(corruptions: Sequence[str]) -> list[Domain]:
    return [Domain(), *(Domain(name, severity) for name in corruptions for severity in SEVERITIES)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_IMAGES,
                        help=f"labelled photos, one subfolder per class (default {DEFAULT_IMAGES})")
    parser.add_argument("--seeds", type=int, default=3, help="splits and target draws (default 3)")
    parser.add_argument("--json", type=Path, help="write every score per seed and the summaries here")
    parser.add_argument("--report-dir", type=Path, help="write summary.md and accuracy_change.png here")
    parser.add_argument("--home", type=Path, help="state directory whose active version is used (default: a "
                        "temporary one, bootstrapped with the pretrained classifier)")
    parser.add_argument("--corruptions", nargs="+", choices=list(CORRUPTIONS), default=list(CORRUPTIONS),
                        help="the corruptions to measure (default: all); clean is always measured")
    parser.add_argument("--shrinkages", nargs="+", type=float, default=list(SHRINKAGES),
                        help=f"CORAL shrinkages compared on all the target images (default {SHRINKAGES}; "
                        f"models.adapt's {CORAL_SHRINKAGE} is always among them)")
    args = parser.parse_args()
    if args.seeds < 1:
        parser.error("--seeds must be at least 1")
    shrinkages = sorted({*args.shrinkages, CORAL_SHRINKAGE})
    install_sigterm_handler()
    progress = Progress()
    started = time.perf_counter()
    threads = cpu_count()
    torch.set_num_threads(threads)
    seconds: dict[str, float] = {}

    photos = load_labelled(args.data, lambda image: image, progress=False)
    targets = photos.targets
    progress(f"{len(photos)} photos ({photos.class_counts()}) from {args.data}")
    domains = domains_of(args.corruptions)
    splits = make_splits(targets, photos.classes, args.seeds)
    with state_home(args.home, progress) as home:
        seconds["bootstrap"] = time.perf_counter() - started
        registry = open_state(home=home).registry
        version = registry.active()
        if version is None:
            raise RuntimeError(f"{home} has no active version")
        backbone = create_backbone(version.spec.backbone)
        if backbone.fingerprint() != version.spec.backbone_fingerprint:
            raise RuntimeError(f"version {version.version}'s backbone is not {version.spec.backbone} with its "
                               "pretrained weights: AdaBN needs the torch backbone its graph was exported from")
        model = backbone.model.to(memory_format=torch.channels_last)
        phase = time.perf_counter()
        embeddings = embed(photos.items, domains, splits, version.onnx_path, version.spec.preprocess, model)
        seconds["embeddings"] = time.perf_counter() - phase
    phase = time.perf_counter()
    scores, alignment_seconds = score_all(embeddings, targets, len(photos.classes), domains, splits, shrinkages)
    seconds["alignment"] = time.perf_counter() - phase
    seconds["total"] = time.perf_counter() - started
    results = Results(scores, domains, args.seeds, len(photos))

    context = {
        "data": str(args.data),
        "class_counts": ", ".join(f"{label}: {count}" for label, count in photos.class_counts().items()),
        "source_images": len(splits[0].source),
        "test_images": len(splits[0].test),
        "backbone": version.spec.backbone,
        "version": version.version,
        "parity_max_diff": embeddings.parity_max_diff,
        "batch_norms": embeddings.batch_norms,
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "threads": threads,
        "seconds": seconds,
        "timing": (f"bootstrap {seconds['bootstrap']:.0f} s; corruption, preprocessing, ONNX and AdaBN embeddings "
                   f"{seconds['embeddings']:.0f} s; alignments and scoring {seconds['alignment']:.0f} s, of which "
                   f"CORAL {alignment_seconds['CORAL']:.0f} s"),
        "command": ".venv/bin/python -m bench.adapt_bench " + shlex.join(sys.argv[1:]),
    }
    plot_name = "accuracy_change.png" if args.report_dir else None
    text = report(results, splits, shrinkages, context, plot_name)
    print(text)
    if args.report_dir:
        args.report_dir.mkdir(parents=True, exist_ok=True)
        (args.report_dir / "summary.md").write_text(text)
        plot_changes(results, best_shrinkage(results, shrinkages), args.report_dir / "accuracy_change.png")
        progress(f"report in {args.report_dir}")
    if args.json:
        minimum = recommend_min_targets(results, len(splits[0].test))
        payload = {
            "config": {"test_fraction": TEST_FRACTION, "targets": [*TARGETS, len(photos)],
                       "diagonal_targets": [*DIAGONAL_TARGETS, len(photos)], "shrinkages": shrinkages,
                       "default_shrinkage": CORAL_SHRINKAGE, "adabn_batch": ADABN_BATCH, "seeds": args.seeds,
                       "domains": results.domains},
            "context": context,
            "alignment_seconds": alignment_seconds,
            "best_shrinkage": best_shrinkage(results, shrinkages),
            "min_target_images": asdict(minimum),
            "summary": results.summary(),
            "scores": [asdict(s) for s in scores],
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
        progress(f"scores in {args.json}")
    return 0


if __name__ == "__main__":
    run_main(main)
