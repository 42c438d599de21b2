"""The training workflows behind the CLI: bootstrap, fit (head or finetune) and evaluate.

Each ends in a verified artifact or a clear error: ``fit`` exports ONNX, checks parity, scores
the exported model on the held-out split and registers a version; nothing is registered if any
step fails.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image

from models.errors import DatasetError
from models.hardware import cpu_count
from models.head import fit_linear_head
from models.metrics import classification_metrics
from models.onnx_io import cpu_session, replace_head, run_in_batches, softmax
from models.preprocess import decode_image, preprocess_image
from models.spec import ModelSpec, PreprocessConfig
from store.registry import ModelRegistry, ModelVersion

from .backbones import (
    DEFAULT_BACKBONE,
    Backbone,
    ClassifierWithEmbedding,
    create_backbone,
    imagenet_labels,
    offline_weights,
)
from .data import LabelledImages, load_labelled, stratified_split
from .export import ParityResult, check_parity, export_onnx
from .report import write_report

log = logging.getLogger(__name__)

Strategy = Literal["head", "finetune"]
SAMPLES_DIR = Path(__file__).parent / "samples"
PARITY_IMAGES = 16


@dataclass(frozen=True)
class FitOptions:
    strategy: Strategy = "head"
    backbone: str = DEFAULT_BACKBONE
    checkpoint: Path | None = None
    epochs: int | None = None  # default: per strategy
    seed: int = 0
    val_fraction: float = 0.2
    batch_size: int = 32
    activate: bool = False
    progress: bool = True


@dataclass(frozen=True)
class FitResult:
    version: ModelVersion
    metrics: dict[str, Any]
    seconds: float


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % (2**32))


def onnx_embeddings(
    onnx_path: Path, inputs: np.ndarray, *, batch_size: int = 8, progress: bool = True
) -> np.ndarray:
    """Embeddings of preprocessed images (N, 3, S, S) through an exported graph, with
    onnxruntime: the graph and the runtime the service and its retrain jobs use."""
    from tqdm import tqdm

    session = cpu_session(onnx_path)
    chunks = []
    for start in tqdm(
        range(0, len(inputs), batch_size), desc="embeddings", unit="batch", disable=not progress
    ):
        chunks.append(run_in_batches(session, inputs[start : start + batch_size], batch_size)[1])
    return np.concatenate(chunks).astype(np.float32)


class EvalAndThumbnail:
    """Per image: the exact eval tensor, plus (for fine-tuning) a thumbnail to augment from."""

    def __init__(self, config: PreprocessConfig, keep_thumbnail: bool) -> None:
        self.config = config
        self.keep_thumbnail = keep_thumbnail

    def __call__(self, image: Image.Image) -> tuple[np.ndarray, Image.Image | None]:
        tensor = preprocess_image(image, self.config)
        thumb = None
        if self.keep_thumbnail:
            thumb = image.copy()
            side = self.config.resize_size
            scale = side / min(thumb.size)
            if scale < 1:  # keep memory bounded; augmentation crops from this
                thumb = thumb.resize(
                    (max(1, round(thumb.width * scale)), max(1, round(thumb.height * scale))),
                    Image.Resampling.BICUBIC,
                )
        return tensor, thumb


def fit(data: Path, registry: ModelRegistry, options: FitOptions = FitOptions()) -> FitResult:
    """Train, export, verify and register a new version from a labelled folder or manifest."""
    started = time.perf_counter()
    _seed_everything(options.seed)
    torch.set_num_threads(cpu_count())  # torch's default counts the host's cores, not a container's quota
    backbone = create_backbone(options.backbone, checkpoint=options.checkpoint)
    config = backbone.preprocess
    dataset = load_labelled(
        data, EvalAndThumbnail(config, options.strategy == "finetune"), progress=options.progress
    )
    inputs = np.stack([tensor for tensor, _ in dataset.items])
    train_idx, val_idx = stratified_split(dataset.targets, options.val_fraction, options.seed)
    log.info("%d images (%d skipped), %d classes: %d train / %d held out",
             len(dataset), len(dataset.skipped), len(dataset.classes), len(train_idx), len(val_idx))
    backbone.reset_head(len(dataset.classes))
    parity_inputs = inputs[val_idx[:PARITY_IMAGES]]
    workdir = Path(tempfile.mkdtemp(prefix="transfer-serve-fit-"))
    try:
        # Embeddings come from the exported graph (the head does not affect them).
        backbone_parity = export_onnx(backbone.model, workdir / "backbone.onnx", parity_inputs)
        embeddings = onnx_embeddings(workdir / "backbone.onnx", inputs, progress=options.progress)
        head = fit_linear_head(
            embeddings[train_idx], dataset.targets[train_idx], len(dataset.classes),
            validation=(embeddings[val_idx], dataset.targets[val_idx]), seed=options.seed,
        )
        backbone.set_head(head.weight, head.bias)
        history, best_epoch = head.history, None
        if options.strategy == "finetune":
            from .finetune import finetune

            result = finetune(
                backbone, dataset, inputs, train_idx, val_idx,
                epochs=options.epochs or 6, seed=options.seed, progress=options.progress,
            )
            history, best_epoch = result.history, result.best_epoch
        elif options.strategy != "head":
            raise ValueError(f"unknown strategy {options.strategy!r} (use 'head' or 'finetune')")
        return _export_and_register(
            backbone, dataset, inputs, train_idx, val_idx, embeddings, history, best_epoch,
            data, registry, options, workdir, started, backbone_parity,
        )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _export_and_register(
    backbone: Backbone, dataset: LabelledImages, inputs: np.ndarray, train_idx: np.ndarray,
    val_idx: np.ndarray, embeddings: np.ndarray, history: list[dict[str, float]],
    best_epoch: int | None, data: Path, registry: ModelRegistry, options: FitOptions,
    workdir: Path, started: float, backbone_parity: ParityResult,
) -> FitResult:
    config = backbone.preprocess
    spec = ModelSpec(
        labels=tuple(dataset.classes),
        preprocess=config,
        backbone=backbone.name,
        backbone_fingerprint=backbone.fingerprint(),
        embedding_size=backbone.embedding_size,
    )
    onnx_path = workdir / "model.onnx"
    parity_inputs = inputs[val_idx[:PARITY_IMAGES]]
    if options.strategy == "head":
        # the backbone is the one already exported: write the fitted head into that graph, and
        # check the result against torch with the same head like any export
        replace_head(workdir / "backbone.onnx", onnx_path, *backbone.head())
        parity = check_parity(ClassifierWithEmbedding(backbone.model).eval(), onnx_path, parity_inputs,
                              exporter=backbone_parity.exporter)
    else:
        parity = export_onnx(backbone.model, onnx_path, parity_inputs)
    if options.strategy == "finetune":
        # the backbone changed: the stored training embeddings must come from the new one
        embeddings = onnx_embeddings(onnx_path, inputs, progress=options.progress)
    # score the artifact that will be served, not the torch model it came from
    logits, _ = run_in_batches(cpu_session(onnx_path), inputs[val_idx], batch_size=8)
    metrics = classification_metrics(
        dataset.targets[val_idx].tolist(), logits.argmax(1).tolist(), dataset.classes
    )
    metrics["evaluated_on"] = f"held-out split: {len(val_idx)} images, seed {options.seed}"
    seconds = time.perf_counter() - started
    details = {
        "strategy": options.strategy,
        "backbone": backbone.name,
        "data": str(data),
        "images": len(dataset),
        "train_images": len(train_idx),
        "held_out_images": len(val_idx),
        "skipped_files": len(dataset.skipped),
        "skipped": [f"{path}: {reason}" for path, reason in dataset.skipped],
        "class_counts": dataset.class_counts(),
        "seed": options.seed,
        "val_fraction": options.val_fraction,  # with seed, reproduces the split (training/quantize.py)
        "epochs": len(history) if options.strategy == "finetune" else None,
        "best_epoch": best_epoch,
        "train_seconds": round(seconds, 1),
        "onnx_parity": parity.as_dict(),
    }
    report_dir = workdir / "report"
    write_report(report_dir, title=f"{options.strategy} fit on {Path(data).name}", metrics=metrics,
                 history=history, details=details, best_epoch=best_epoch)
    version = registry.register(
        onnx_file=onnx_path, spec=spec, metrics=metrics, embeddings=embeddings,
        embedding_targets=dataset.targets, embedding_hashes=dataset.content_hashes, parent=None,
        dataset_fingerprint=dataset.fingerprint(), details=details, report_dir=report_dir,
        activate=options.activate,
    )
    return FitResult(version=version, metrics=metrics, seconds=time.perf_counter() - started)


def bootstrap(
    registry: ModelRegistry, *, force: bool = False, backbone_name: str = DEFAULT_BACKBONE
) -> ModelVersion | None:
    """Register a pretrained ImageNet classifier (1000 labels) as the first version, unless the
    store already has one. Returns the new version, or None if nothing was needed. Its backbone
    is the one head-only retrain jobs fit their heads on."""
    if registry.versions() and not force:
        return None
    backbone = create_backbone(backbone_name)
    weights = offline_weights(backbone_name)
    config = backbone.preprocess
    samples = sorted(SAMPLES_DIR.glob("*.jpg"))
    parity_inputs = np.stack(
        [preprocess_image(decode_image(p.read_bytes()), config) for p in samples]
    )
    spec = ModelSpec(
        labels=tuple(imagenet_labels()),
        preprocess=config,
        backbone=backbone.name,
        backbone_fingerprint=backbone.fingerprint(),
        embedding_size=backbone.embedding_size,
    )
    with tempfile.TemporaryDirectory(prefix="transfer-serve-bootstrap-") as tmp:
        onnx_path = Path(tmp) / "model.onnx"
        parity = export_onnx(backbone.model, onnx_path, parity_inputs)
        report_dir = Path(tmp) / "report"
        report_dir.mkdir()
        (report_dir / "report.md").write_text(
            "# Bootstrap model\n\nThe pretrained ImageNet-1k classifier "
            f"({backbone.name}, weights from `{weights.distribution if weights else 'timm'}`), not retrained.\n"
            f"ONNX ({parity.exporter} exporter) parity on {parity.images} sample images: max logit difference "
            f"{parity.max_logit_diff:.2e}.\n"
        )
        return registry.register(
            onnx_file=onnx_path, spec=spec,
            metrics={"note": "pretrained ImageNet-1k classifier, not evaluated on local data"},
            embeddings=np.zeros((0, backbone.embedding_size), np.float32),
            embedding_targets=np.zeros((0,), np.int64), parent=None, dataset_fingerprint=None,
            details={"strategy": "bootstrap", "backbone": backbone.name, "onnx_parity": parity.as_dict()},
            report_dir=report_dir, activate=registry.active_version() is None,
        )


def evaluate(
    version: ModelVersion, data: Path, *, progress: bool = True, batch_size: int = 32,
    report_dir: Path | None = None,
) -> dict[str, Any]:
    """Metrics of a stored version (its ONNX file, through onnxruntime) on a labelled folder.
    Every label in the folder must be one of the version's labels."""
    spec = version.spec
    dataset: LabelledImages = load_labelled(
        data, lambda image: preprocess_image(image, spec.preprocess), progress=progress,
        require_trainable=False,
    )
    unknown = sorted(set(dataset.classes) - set(spec.labels))
    if unknown:
        raise DatasetError(
            f"{data}: labels unknown to version {version.version}: {', '.join(unknown)} "
            f"(it knows {', '.join(spec.labels[:10])}{', ...' if spec.num_classes > 10 else ''})"
        )
    index = {label: i for i, label in enumerate(spec.labels)}
    y_true = np.array([index[dataset.classes[t]] for t in dataset.targets])
    logits, _ = run_in_batches(cpu_session(version.onnx_path), np.stack(dataset.items), batch_size)
    y_pred = logits.argmax(1)
    # Report on the labels that occur (a 1000-class model evaluated on 2 classes stays readable).
    used = sorted(set(y_true.tolist()) | set(y_pred.tolist()))
    remap = {label_index: i for i, label_index in enumerate(used)}
    metrics = classification_metrics(
        [remap[t] for t in y_true.tolist()], [remap[p] for p in y_pred.tolist()],
        [spec.labels[i] for i in used],
    )
    metrics["version"] = version.version
    metrics["data"] = str(data)
    metrics["skipped_files"] = len(dataset.skipped)
    metrics["mean_top1_score"] = float(softmax(logits).max(1).mean())
    if report_dir is not None:
        write_report(report_dir, title=f"{version.version} on {Path(data).name}", metrics=metrics,
                     details={"version": version.version, "data": str(data)})
    return metrics
