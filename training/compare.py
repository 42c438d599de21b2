"""``python -m training compare``: which backbone for this data, and how many labelled images are
enough.

Per backbone, on one labelled folder: held-out accuracy and macro F1 of the head strategy (and of
fine-tuning, when asked) over several seeded stratified splits, reported as mean and standard
deviation (one small split cannot tell 2 points from noise); onnxruntime latency at batch 1 and
throughput at batch 32 on this host's provider, fp32 and (on CPU) INT8; parameters, model file
sizes, wall time. Optionally a learning curve: the head fitted on 1, 2, 5, ... images per class,
several draws each, scored on one fixed held-out set.

The recommendation follows a stated rule (:func:`recommend`) and says when the splits cannot
separate the candidates; nothing here registers a version.
"""

from __future__ import annotations

import logging
import statistics
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from models.hardware import cpu_count, cuda_device_count
from models.head import fit_linear_head
from models.int8 import MAX_CALIBRATION_IMAGES, check_int8, quantize_onnx
from models.metrics import classification_metrics
from models.onnx_io import cpu_session, replace_head

from .backbones import OFFLINE_BACKBONES, create_backbone
from .data import LabelledImages, load_labelled, stratified_split
from .export import export_onnx
from .pipeline import PARITY_IMAGES, EvalAndThumbnail, onnx_embeddings

log = logging.getLogger(__name__)

#: images per class of the learning curve; "all" (every training image) is always added
CURVE_SIZES = (1, 2, 5, 10, 20)
LATENCY_BATCH = 1
THROUGHPUT_BATCH = 32
CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"


@dataclass(frozen=True)
class CompareOptions:
    backbones: tuple[str, ...] = tuple(OFFLINE_BACKBONES)
    splits: int = 5
    val_fraction: float = 0.2
    finetune: bool = False
    epochs: int = 3  #: fine-tuning epochs per split (with --finetune)
    max_latency_ms: float | None = None
    learning_curve: bool = False
    curve_sizes: tuple[int, ...] = CURVE_SIZES
    curve_draws: int = 10  #: training subsets drawn per size
    timing_seconds: float = 1.0  #: per measurement (latency, throughput; each graph, each round)
    timing_rounds: int = 3
    progress: bool = True


@dataclass(frozen=True)
class Spread:
    """A score over several splits or draws."""

    mean: float
    std: float  #: sample standard deviation (0 for a single value)
    values: tuple[float, ...]

    @classmethod
    def of(cls, values: Sequence[float]) -> Spread:
        values = tuple(float(v) for v in values)
        return cls(statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0, values)

    def __str__(self) -> str:
        return f"{self.mean:.3f} ± {self.std:.3f}"


@dataclass(frozen=True)
class Speed:
    """onnxruntime timings of one graph on this host's provider."""

    latency_ms: float  #: median time of one batch-1 run
    throughput: float  #: images per second at batch 32


#: a result's speed until :func:`measure_speeds_in_turn` has timed its graph
NOT_TIMED = Speed(latency_ms=float("nan"), throughput=float("nan"))


@dataclass
class BackboneResult:
    backbone: str
    arch: str
    input_size: int
    parameters: int
    model_bytes: int  #: the fp32 graph with a head for these classes
    head_accuracy: Spread
    head_macro_f1: Spread
    fp32: Speed
    provider: str
    int8: Speed | None = None
    int8_bytes: int | None = None
    int8_check: dict[str, Any] | None = None  #: the INT8 gate on the first split's held-out images
    finetune_accuracy: Spread | None = None
    finetune_macro_f1: Spread | None = None
    learning_curve: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0  #: reading, export, embeddings, fits, INT8, fine-tuning (timing not included)

    @property
    def served_variant(self) -> str:
        """What the service would serve here (``TRANSFER_SERVE_MODEL_VARIANT=auto``): INT8 on CPU
        when it passed its gate, fp32 otherwise."""
        passed = self.int8 is not None and self.int8_check is not None and self.int8_check["passed"]
        return "int8" if passed else "fp32"

    @property
    def served(self) -> Speed:
        """The timings of the served variant."""
        return self.int8 if self.served_variant == "int8" and self.int8 is not None else self.fp32

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "served_variant": self.served_variant}


@dataclass(frozen=True)
class Recommendation:
    backbone: str | None
    rule: str
    reason: str
    tied_with: tuple[str, ...] = ()


@dataclass
class Comparison:
    data: str
    images: int
    classes: list[str]
    splits: int
    val_fraction: float
    results: list[BackboneResult]
    recommendation: Recommendation
    seconds: float
    timing_rounds: int
    curve_held_out: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "data": self.data, "images": self.images, "classes": self.classes, "splits": self.splits,
            "val_fraction": self.val_fraction, "seconds": round(self.seconds, 1), "timing_rounds": self.timing_rounds,
            "curve_held_out": self.curve_held_out,
            "results": [r.as_dict() for r in self.results],
            "pareto_front": pareto_front(self.results),
            "recommendation": asdict(self.recommendation),
        }


def host_provider() -> str:
    """CUDA when the driver reports a GPU and onnxruntime has the CUDA provider, else CPU: the
    choice the service makes with its default settings."""
    import onnxruntime as ort

    return CUDA if cuda_device_count() > 0 and CUDA in ort.get_available_providers() else CPU


def _session(path: Path, provider: str) -> Any:
    if provider == CPU:
        return cpu_session(path)
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=[provider, CPU])


def measure_speed(session: Any, images: np.ndarray, seconds: float) -> Speed:
    """Median batch-1 latency and batch-32 throughput of a session on real preprocessed images,
    each measured for about ``seconds`` after a warm-up run."""
    batch = np.ascontiguousarray(np.resize(images, (THROUGHPUT_BATCH, *images.shape[1:])), dtype=np.float32)

    def timed(x: np.ndarray, min_runs: int) -> list[float]:
        session.run(None, {"input": x})  # warm-up: allocations, kernel choice
        times: list[float] = []
        deadline = time.perf_counter() + seconds
        while len(times) < min_runs or time.perf_counter() < deadline:
            start = time.perf_counter()
            session.run(None, {"input": x})
            times.append(time.perf_counter() - start)
        return times

    single = timed(batch[:LATENCY_BATCH], min_runs=10)
    full = timed(batch, min_runs=2)
    return Speed(latency_ms=1000 * statistics.median(single), throughput=THROUGHPUT_BATCH * len(full) / sum(full))


@dataclass(frozen=True)
class _Graphs:
    """What the timing phase runs for one backbone: its served graph(s) and real images."""

    result: BackboneResult
    fp32: Path
    int8: Path | None
    images: np.ndarray


def measure_speeds_in_turn(graphs: Sequence[_Graphs], provider: str, options: CompareOptions) -> None:
    """Time every graph ``options.timing_rounds`` times, one after another in each round, and
    give each result the median of its rounds: a burst of load on a shared machine then spoils
    one round of every graph rather than every round of one."""
    sessions = [(g, variant, _session(path, provider))
                for g in graphs for variant, path in (("fp32", g.fp32), ("int8", g.int8)) if path is not None]
    rounds: dict[tuple[int, str], list[Speed]] = {}
    for _ in tqdm(range(options.timing_rounds), desc="timing rounds", unit="round", disable=not options.progress):
        for g, variant, session in sessions:
            rounds.setdefault((id(g), variant), []).append(measure_speed(session, g.images, options.timing_seconds))
    for g, variant, _ in sessions:
        speeds = rounds[(id(g), variant)]
        median = Speed(statistics.median(s.latency_ms for s in speeds), statistics.median(s.throughput for s in speeds))
        if variant == "fp32":
            g.result.fp32 = median
        else:
            g.result.int8 = median


def _scores(y_true: np.ndarray, y_pred: np.ndarray, classes: list[str]) -> tuple[float, float]:
    metrics = classification_metrics(y_true.tolist(), y_pred.tolist(), classes)
    return float(metrics["accuracy"]), float(metrics["macro_f1"])


def compare(data: Path, options: CompareOptions = CompareOptions(), *, work_dir: Path | None = None) -> Comparison:
    """Measure every backbone of ``options`` on the labelled folder or manifest ``data``."""
    if options.splits < 1 or options.timing_rounds < 1:
        raise ValueError("splits and timing_rounds must be at least 1")
    unknown = [name for name in options.backbones if name not in OFFLINE_BACKBONES]
    if unknown or not options.backbones:
        raise ValueError(f"backbones must be some of {', '.join(OFFLINE_BACKBONES)}; "
                         f"got {', '.join(unknown) or 'none'}")
    started = time.perf_counter()
    torch.set_num_threads(cpu_count())
    provider = host_provider()
    graphs: list[_Graphs] = []
    with tempfile.TemporaryDirectory(prefix="transfer-serve-compare-", dir=work_dir) as tmp:
        for name in tqdm(options.backbones, desc="backbones", unit="backbone", disable=not options.progress):
            measured, dataset, curve_held_out = _measure_backbone(name, data, options, provider, Path(tmp) / name)
            graphs.append(measured)
            log.info("%s: head accuracy %s", name, measured.result.head_accuracy)
        measure_speeds_in_turn(graphs, provider, options)
    results = [g.result for g in graphs]
    # every backbone read the same folder: the last one's dataset describes it
    return Comparison(
        data=str(data), images=len(dataset), classes=list(dataset.classes), splits=options.splits,
        val_fraction=options.val_fraction, results=results,
        recommendation=recommend(results, options.max_latency_ms), seconds=time.perf_counter() - started,
        timing_rounds=options.timing_rounds, curve_held_out=curve_held_out,
    )


def _measure_backbone(
    name: str, data: Path, options: CompareOptions, provider: str, workdir: Path
) -> tuple[_Graphs, LabelledImages, int | None]:
    """Everything but the speed of one backbone (timed later, in turn with the others)."""
    started = time.perf_counter()
    workdir.mkdir(parents=True)
    backbone = create_backbone(name)
    dataset = load_labelled(data, EvalAndThumbnail(backbone.preprocess, options.finetune), progress=options.progress)
    inputs = np.stack([tensor for tensor, _ in dataset.items])
    classes = list(dataset.classes)
    splits = [stratified_split(dataset.targets, options.val_fraction, seed) for seed in range(options.splits)]
    backbone.reset_head(len(classes))
    export_onnx(backbone.model, workdir / "backbone.onnx", inputs[splits[0][1][:PARITY_IMAGES]])
    embeddings = onnx_embeddings(workdir / "backbone.onnx", inputs, progress=options.progress)

    accuracies, f1s = [], []
    heads = []
    for seed, (train_idx, val_idx) in enumerate(
        tqdm(splits, desc=f"{name} head splits", unit="split", disable=not options.progress)
    ):
        head = fit_linear_head(embeddings[train_idx], dataset.targets[train_idx], len(classes), seed=seed)
        heads.append(head)
        accuracy, f1 = _scores(dataset.targets[val_idx], head.logits(embeddings[val_idx]).argmax(1), classes)
        accuracies.append(accuracy)
        f1s.append(f1)

    # the graph the first split's head would be served as: its size (and later its speed)
    model_path = workdir / "model.onnx"
    replace_head(workdir / "backbone.onnx", model_path, heads[0].weight, heads[0].bias)
    result = BackboneResult(
        backbone=name, arch=backbone.name, input_size=backbone.preprocess.input_size,
        parameters=sum(p.numel() for p in backbone.model.parameters()), model_bytes=model_path.stat().st_size,
        head_accuracy=Spread.of(accuracies), head_macro_f1=Spread.of(f1s), fp32=NOT_TIMED, provider=provider,
    )
    int8_path = None
    if provider == CPU:
        train_idx, val_idx = splits[0]
        int8_path = workdir / "model.int8.onnx"
        quantize_onnx(model_path, int8_path, inputs[train_idx[:MAX_CALIBRATION_IMAGES]])
        result.int8 = NOT_TIMED
        result.int8_bytes = int8_path.stat().st_size
        result.int8_check = check_int8(model_path, int8_path, inputs[val_idx], dataset.targets[val_idx]).as_dict()
    if options.finetune:
        result.finetune_accuracy, result.finetune_macro_f1 = _finetune_splits(
            name, dataset, inputs, splits, heads, options)
    curve_held_out = None
    if options.learning_curve:
        train_idx, val_idx = splits[0]
        result.learning_curve = learning_curve(embeddings, dataset.targets, train_idx, val_idx, classes,
                                               options.curve_sizes, options.curve_draws, progress=options.progress,
                                               desc=f"{name} learning curve")
        curve_held_out = len(val_idx)
    result.seconds = time.perf_counter() - started
    return _Graphs(result, model_path, int8_path, inputs[splits[0][1]]), dataset, curve_held_out


def _finetune_splits(
    name: str, dataset: LabelledImages, inputs: np.ndarray, splits: list[tuple[np.ndarray, np.ndarray]],
    heads: list[Any], options: CompareOptions,
) -> tuple[Spread, Spread]:
    """Fine-tune a fresh pretrained network per split, starting from that split's head (as
    ``fit --strategy finetune`` does), and score its best epoch on the held-out images."""
    from .finetune import finetune

    accuracies, f1s = [], []
    for seed, ((train_idx, val_idx), head) in enumerate(zip(splits, heads, strict=True)):
        torch.manual_seed(seed)
        backbone = create_backbone(name)
        backbone.set_head(head.weight, head.bias)
        finetune(backbone, dataset, inputs, train_idx, val_idx, epochs=options.epochs, seed=seed,
                 progress=options.progress)
        with torch.no_grad():
            logits = torch.cat([backbone.model(torch.from_numpy(inputs[val_idx[i : i + 32]]))
                                for i in range(0, len(val_idx), 32)])
        accuracy, f1 = _scores(dataset.targets[val_idx], logits.argmax(1).numpy(), list(dataset.classes))
        accuracies.append(accuracy)
        f1s.append(f1)
    return Spread.of(accuracies), Spread.of(f1s)


def learning_curve(
    embeddings: np.ndarray, targets: np.ndarray, train_idx: np.ndarray, val_idx: np.ndarray,
    classes: list[str], sizes: Sequence[int] = CURVE_SIZES, draws: int = 5, *, progress: bool = False,
    desc: str = "learning curve",
) -> list[dict[str, Any]]:
    """Held-out accuracy of the head fitted on ``n`` training images per class, for each ``n`` in
    ``sizes`` below every class's count, and on all of ``train_idx``; ``draws`` random subsets
    (and head initialisations) each. The held-out images ``val_idx`` are the same for every
    point. Sizes below the fit's usual 2-image minimum are allowed on purpose: the curve shows
    what one labelled image buys. The last row (``all``) has the mean count per class as
    ``per_class``."""
    per_class = [train_idx[targets[train_idx] == c] for c in range(len(classes))]
    smallest = min(len(members) for members in per_class)
    points: list[int | None] = [n for n in sorted(set(sizes)) if 1 <= n < smallest]
    rows = []
    for n in tqdm([*points, None], desc=desc, unit="size", disable=not progress):
        accuracies = []
        for draw in range(draws):
            rng = np.random.default_rng(draw)
            chosen = train_idx if n is None else np.concatenate(
                [rng.choice(members, size=n, replace=False) for members in per_class])
            head = fit_linear_head(embeddings[chosen], targets[chosen], len(classes), seed=draw)
            accuracies.append(float((head.logits(embeddings[val_idx]).argmax(1) == targets[val_idx]).mean()))
        spread = Spread.of(accuracies)
        rows.append({"per_class": len(train_idx) / len(classes) if n is None else n, "all": n is None,
                     "accuracy_mean": spread.mean, "accuracy_std": spread.std, "accuracies": list(spread.values)})
    return rows


def pareto_front(results: Sequence[BackboneResult]) -> list[str]:
    """Backbones no other one beats on both mean head accuracy and served throughput."""
    return [
        r.backbone for r in results
        if not any(
            o.head_accuracy.mean >= r.head_accuracy.mean and o.served.throughput >= r.served.throughput
            and (o.head_accuracy.mean > r.head_accuracy.mean or o.served.throughput > r.served.throughput)
            for o in results
        )
    ]


RULE = ("the backbone with the highest mean held-out accuracy (head strategy) among those whose batch-1 latency "
        "(the variant served on this host) is within the limit; one whose mean is within one standard deviation "
        "(the larger of the two) of the best counts as tied with it, and of tied backbones the faster one is "
        "recommended")


def recommend(results: Sequence[BackboneResult], max_latency_ms: float | None) -> Recommendation:
    rule = RULE if max_latency_ms is not None else RULE.replace(" among those whose batch-1 latency (the variant "
                                                                "served on this host) is within the limit", "")
    eligible = [r for r in results if max_latency_ms is None or r.served.latency_ms <= max_latency_ms]
    if not eligible:
        fastest = min(results, key=lambda r: r.served.latency_ms)
        return Recommendation(None, rule, f"no backbone answers a single image within {max_latency_ms:g} ms here; "
                                          f"the fastest is {fastest.backbone} at {fastest.served.latency_ms:.1f} ms")
    best = max(eligible, key=lambda r: (r.head_accuracy.mean, -r.served.latency_ms))
    tied = [r for r in eligible if r is not best
            and best.head_accuracy.mean - r.head_accuracy.mean <= max(best.head_accuracy.std, r.head_accuracy.std)]
    chosen = min([best, *tied], key=lambda r: r.served.latency_ms)
    limit = f" within {max_latency_ms:g} ms" if max_latency_ms is not None else ""
    if len(eligible) == 1:
        reason = (f"{chosen.backbone}: the only backbone {limit.strip() if limit else 'compared'} "
                  f"({chosen.head_accuracy}); {chosen.served.latency_ms:.1f} ms at batch 1")
    elif tied:
        others = [r for r in [best, *tied] if r is not chosen]
        reason = (f"{chosen.backbone}: the splits cannot separate it from "
                  + ", ".join(f"{r.backbone} ({r.head_accuracy})" for r in others)
                  + f"; with accuracy {chosen.head_accuracy} it is the fastest of them{limit} "
                    f"({chosen.served.latency_ms:.1f} ms at batch 1)")
    else:
        reason = (f"{chosen.backbone}: the most accurate{limit} ({chosen.head_accuracy}), ahead of the others by "
                  f"more than the spread of the splits; {chosen.served.latency_ms:.1f} ms at batch 1")
    return Recommendation(chosen.backbone, rule, reason, tuple(r.backbone for r in tied))


def _mb(size: int | None) -> str:
    return "-" if size is None else f"{size / 1e6:.1f}"


def format_table(comparison: Comparison) -> str:
    """The comparison as a Markdown table (also what the CLI prints)."""
    finetuned = any(r.finetune_accuracy is not None for r in comparison.results)
    header = ["backbone", "input", "params (M)", "fp32 MB", "INT8 MB", f"head accuracy ({comparison.splits} splits)",
              "head macro F1"]
    if finetuned:
        header += ["finetune accuracy", "finetune macro F1"]
    header += ["INT8 acc. lost (split 1)", "batch 1 ms fp32 / INT8", "batch 32 img/s fp32 / INT8", "served", "wall s"]
    rows = []
    for r in comparison.results:
        int8 = r.int8
        row = [r.backbone, str(r.input_size), f"{r.parameters / 1e6:.2f}", _mb(r.model_bytes), _mb(r.int8_bytes),
               str(r.head_accuracy), str(r.head_macro_f1)]
        if finetuned:
            row += [str(r.finetune_accuracy or "-"), str(r.finetune_macro_f1 or "-")]
        lost = "-" if r.int8_check is None else f"{100 * r.int8_check['accuracy_loss']:.1f} pts"
        row += [lost, f"{r.fp32.latency_ms:.1f} / {'-' if int8 is None else f'{int8.latency_ms:.1f}'}",
                f"{r.fp32.throughput:.0f} / {'-' if int8 is None else f'{int8.throughput:.0f}'}",
                r.served_variant, f"{r.seconds:.0f}"]
        rows.append(row)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def format_curve_table(comparison: Comparison) -> str:
    results = [r for r in comparison.results if r.learning_curve]
    if not results:
        return ""
    sizes = [row["per_class"] for row in results[0].learning_curve]
    header = ["images per class", *(f"all ({n:.0f})" if row["all"] else f"{n:g}"
                                    for n, row in zip(sizes, results[0].learning_curve, strict=True))]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in results:
        lines.append("| " + " | ".join([r.backbone, *(f"{row['accuracy_mean']:.3f} ± {row['accuracy_std']:.3f}"
                                                      for row in r.learning_curve)]) + " |")
    return "\n".join(lines)


def write_compare_report(comparison: Comparison, report_dir: Path, *, command: str = "") -> Path:
    """summary.md, compare.json and the plots in ``report_dir``; returns summary.md's path."""
    import json

    from .plots import ComparedBackbone, plot_accuracy_vs_throughput, plot_learning_curve

    report_dir.mkdir(parents=True, exist_ok=True)
    (report_dir / "compare.json").write_text(json.dumps(comparison.as_dict(), indent=2) + "\n")
    front = pareto_front(comparison.results)
    plot_accuracy_vs_throughput(
        [ComparedBackbone(r.backbone, r.head_accuracy.mean, r.head_accuracy.std, r.fp32.throughput,
                          None if r.int8 is None else r.int8.throughput, r.served.throughput)
         for r in comparison.results],
        front, report_dir / "accuracy_vs_throughput.png",
    )
    provider = comparison.results[0].provider
    lines = [
        f"# Backbones compared on {comparison.data}",
        "",
        f"{comparison.images} images, {len(comparison.classes)} classes; {comparison.splits} seeded stratified splits, "
        f"{comparison.val_fraction:.0%} of each class held out; timings with onnxruntime's {provider} on this host "
        f"({cpu_count()} cores): every graph in turn, {comparison.timing_rounds} rounds, medians; wall time "
        f"{comparison.seconds:.0f} s (per backbone: everything but the timing)."
        + (f" Command: `{command}`." if command else ""),
        "",
        format_table(comparison),
        "",
        f"Pareto front (no other backbone is both more accurate and faster, at the served variant's batch-32 "
        f"throughput): {', '.join(front)}. Plot: [accuracy_vs_throughput.png](accuracy_vs_throughput.png).",
        "",
        f"**Recommendation**: {comparison.recommendation.reason}.",  # it opens with the backbone, or says none
        "",
        f"Rule: {comparison.recommendation.rule}.",
    ]
    curve = format_curve_table(comparison)
    if curve:
        plot_learning_curve([(r.backbone, r.learning_curve) for r in comparison.results if r.learning_curve],
                            report_dir / "learning_curve.png")
        lines += ["", "## Learning curve", "",
                  f"Held-out accuracy of the head fitted on n training images per class (random draws, mean ± "
                  f"standard deviation), always scored on the same {comparison.curve_held_out} held-out images "
                  "(the first split's). Plot: [learning_curve.png](learning_curve.png).", "", curve]
    summary = report_dir / "summary.md"
    summary.write_text("\n".join(lines) + "\n")
    return summary

