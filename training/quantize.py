"""An INT8 variant of a stored version: static quantisation (QDQ, per-channel weights, MinMax
calibration) written as ``model.int8.onnx`` beside the version's ``model.onnx``.

    .venv/bin/python -m training quantize --version v2 --data ../shared/data/hymenoptera/train

Calibration uses the version's own training images: the images under ``--data`` whose content
hash is among those the version was trained on (its stored embedding hashes). For a version made
by ``fit`` on that folder, fit's split is reproduced: at most ``MAX_CALIBRATION_IMAGES`` of the
training part calibrate, and the held-out part checks the variant. For other versions (a
head-only retrain) the check runs on the calibration images themselves, which the result says.

The variant keeps the graph's input and outputs (``logits``, ``embedding``); the linear head stays
float (a 1280 x C Gemm costs nothing, and quantised logits would make the scores coarse), so the
head of an INT8 graph can be read and replaced like an fp32 one. It is written only if its
top-1 accuracy on the check images is at most ``MAX_ACCURACY_LOSS`` (0.5 percentage points) below
fp32's (the INT8 gate, :mod:`models.int8`, which the retrain job runs too); otherwise
:class:`QuantizationRefused` says by how much it missed and nothing is written.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from models.errors import DatasetError, ModelError
from models.int8 import MAX_ACCURACY_LOSS, MAX_CALIBRATION_IMAGES, check_int8, quantize_onnx
from models.onnx_io import check_onnx_contract
from models.preprocess import preprocess_image
from store.registry import INT8_ONNX_FILENAME, INT8_REPORT_FILENAME, ModelRegistry, ModelVersion

from .data import load_labelled, stratified_split

log = logging.getLogger(__name__)

#: val_fraction of versions fitted before fit recorded it (FitOptions' default then).
DEFAULT_VAL_FRACTION = 0.2


class QuantizationRefused(ModelError):
    """The INT8 variant lost more accuracy than allowed; nothing was written."""


@dataclass(frozen=True)
class ImageSets:
    """Preprocessed images (N, 3, S, S) to calibrate on, and labelled ones to check on."""

    calibration: np.ndarray
    check: np.ndarray
    check_targets: np.ndarray  # indices into the version's labels
    check_source: str  # what the check images are, for people


@dataclass(frozen=True)
class QuantizeResult:
    version: str
    calibration_images: int
    check_images: int
    check_source: str
    fp32_accuracy: float
    int8_accuracy: float
    top1_agreement: float
    max_logit_diff: float
    max_score_diff: float
    max_accuracy_loss: float
    seconds: float

    @property
    def accuracy_loss(self) -> float:
        return self.fp32_accuracy - self.int8_accuracy

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "accuracy_loss": self.accuracy_loss}


def select_images(version: ModelVersion, data: Path, *, max_calibration: int = MAX_CALIBRATION_IMAGES,
                  seed: int = 0, progress: bool = True) -> ImageSets:
    """The version's own training images found under ``data``, split into calibration and check
    images (see the module docstring). Labels come from the version, matched by content hash."""
    if max_calibration < 1:
        raise ValueError("max_calibration must be at least 1")
    hashes = version.training_hashes()
    _, targets = version.training_embeddings()
    known = {h: int(t) for h, t in zip(hashes, targets, strict=True) if h}
    if not known:
        raise DatasetError(f"version {version.version} records no training images (a bootstrap version?), so "
                           "there is nothing of its own to calibrate on; quantise a fitted or retrained version")
    dataset = load_labelled(data, lambda image: preprocess_image(image, version.spec.preprocess),
                            progress=progress, require_trainable=False)
    own = np.array([i for i, h in enumerate(dataset.content_hashes) if h in known], dtype=np.int64)
    if len(own) == 0:
        raise DatasetError(f"none of the {len(dataset)} images under {data} are among the {len(known)} images "
                           f"version {version.version} was trained on; pass the folder it was trained on")
    inputs = np.stack(dataset.items)
    labels = np.array([known.get(h, -1) for h in dataset.content_hashes], dtype=np.int64)
    split = _fit_split(version, dataset)
    calibration_idx = split[0] if split is not None else own
    if len(calibration_idx) > max_calibration:
        rng = np.random.default_rng(seed)
        calibration_idx = np.sort(rng.choice(calibration_idx, max_calibration, replace=False))
    if split is not None:
        check_idx = split[1]
        check_source = f"fit's held-out split ({len(check_idx)} images, seed {version.info['details']['seed']})"
    else:
        check_idx = calibration_idx
        check_source = f"the calibration images themselves ({len(check_idx)} of the version's training images)"
    return ImageSets(inputs[calibration_idx], inputs[check_idx], labels[check_idx], check_source)


def _fit_split(version: ModelVersion, dataset: Any) -> tuple[np.ndarray, np.ndarray] | None:
    """fit's (train, held-out) indices into ``dataset`` if ``version`` was fitted on exactly these
    images (same dataset fingerprint) and the split reproduces (same held-out count); else None."""
    info = version.info
    details = info.get("details") or {}
    if details.get("strategy") not in ("head", "finetune") or not isinstance(details.get("seed"), int):
        return None
    if info.get("dataset_fingerprint") != dataset.fingerprint():
        log.info("%s is not the exact image set version %s was fitted on; checking on the calibration images",
                 details.get("data"), version.version)
        return None
    fraction = details.get("val_fraction", DEFAULT_VAL_FRACTION)
    train_idx, val_idx = stratified_split(dataset.targets, float(fraction), details["seed"])
    if len(val_idx) != details.get("held_out_images"):
        log.warning("could not reproduce fit's held-out split of version %s (%d images, not %s); checking on "
                    "the calibration images", version.version, len(val_idx), details.get("held_out_images"))
        return None
    return train_idx, val_idx


def quantize_version(
    registry: ModelRegistry, version: str, data: Path, *, max_calibration: int = MAX_CALIBRATION_IMAGES,
    max_accuracy_loss: float = MAX_ACCURACY_LOSS, seed: int = 0, progress: bool = True,
) -> QuantizeResult:
    """Quantise ``version``, check the variant, and add it (with its figures) to the version."""
    started = time.perf_counter()
    stored = registry.get(version)
    stored.verify()
    if stored.has_int8():
        raise ModelError(f"version {version} already has an INT8 variant ({INT8_ONNX_FILENAME})")
    images = select_images(stored, data, max_calibration=max_calibration, seed=seed, progress=progress)
    log.info("calibrating on %d of version %s's training images; checking on %s",
             len(images.calibration), version, images.check_source)
    with tempfile.TemporaryDirectory(prefix="transfer-serve-int8-") as tmp:
        int8_path = Path(tmp) / INT8_ONNX_FILENAME
        quantize_onnx(stored.onnx_path, int8_path, images.calibration)
        check_onnx_contract(int8_path, stored.spec)
        check = check_int8(stored.onnx_path, int8_path, images.check, images.check_targets,
                           max_accuracy_loss=max_accuracy_loss)
        result = QuantizeResult(
            version=version, calibration_images=len(images.calibration), check_images=check.check_images,
            check_source=images.check_source, max_accuracy_loss=max_accuracy_loss,
            seconds=round(time.perf_counter() - started, 1), fp32_accuracy=check.fp32_accuracy,
            int8_accuracy=check.int8_accuracy, top1_agreement=check.top1_agreement,
            max_logit_diff=check.max_logit_diff, max_score_diff=check.max_score_diff,
        )
        log.info("INT8 variant of %s on %s: accuracy %.4f (fp32 %.4f), top-1 agreement %.4f",
                 version, images.check_source, result.int8_accuracy, result.fp32_accuracy, result.top1_agreement)
        if not check.passed:
            raise QuantizationRefused(
                f"the INT8 variant of {version} loses {100 * result.accuracy_loss:.2f} percentage points of "
                f"top-1 accuracy on {images.check_source} ({result.int8_accuracy:.4f} against fp32's "
                f"{result.fp32_accuracy:.4f}; the limit is {100 * max_accuracy_loss:.2f}); nothing was written"
            )
        report = Path(tmp) / INT8_REPORT_FILENAME
        report.write_text(json.dumps(result.as_dict(), indent=2))
        registry.add_files(version, {INT8_ONNX_FILENAME: int8_path, INT8_REPORT_FILENAME: report})
    return result
