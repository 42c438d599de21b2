"""The retrain job (run in its own process by :mod:`service.job_process`).

The active version's ONNX graph is the backbone: embeddings of labelled images not seen before are
computed with it (batched, cached by content hash + backbone fingerprint), then
:func:`models.retrain.retrain_head` fits and judges the new head, and the new version is the same
graph with the new head written in. It goes live only if the promotion gate lets it (or ``force``
is set); a refused version is kept, inactive, with its metrics. A parent with an INT8 variant
passes it on, with the new head, if it passes the INT8 gate (:mod:`models.int8`); on a CPU host
that serves INT8 where it can, a parent without one has the new version calibrated instead.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from models.extract import extract
from models.head import LinearHead
from models.int8 import MAX_CALIBRATION_IMAGES, check_int8, quantize_onnx
from models.onnx_io import check_onnx_contract, read_head, replace_head, verify_head
from models.preprocess import decode_image, preprocess_image
from models.retrain import ParentModel, RetrainParams, retrain_head
from models.spec import PreprocessConfig
from store.embeddings import EmbeddingCache
from store.errors import storage_failure
from store.jobs import scratch_prefix
from store.registry import INT8_ONNX_FILENAME, INT8_REPORT_FILENAME, ModelRegistry, ModelVersion, graph_exporter
from store.state import State

from .jobs import retrainable_parent

log = logging.getLogger(__name__)
EMBED_BATCH = 16


@dataclass
class Progress:
    report: Callable[[str, float], None]
    started: float = field(default_factory=time.perf_counter)
    phase: str = ""

    def __call__(self, phase: str, progress: float) -> None:
        if phase != self.phase:  # the job log shows where the time goes
            log.info("phase %s at %.2fs", phase, time.perf_counter() - self.started)
            self.phase = phase
        self.report(phase, round(min(max(progress, 0.0), 1.0), 4))


def embed_missing(parent: ModelVersion, read: Callable[[str], bytes], cache: EmbeddingCache, ids: list[str],
                  progress: Progress, threads: int) -> tuple[dict[str, np.ndarray], int, float]:
    """Embeddings of the images ``ids`` (``read`` gives their bytes): from the cache, the rest
    computed with the parent's graph (and cached) the way the service runs it: a single-thread
    session per core, each thread decoding its own batch (:func:`models.extract.extract`).
    Returns them, how many were computed and how many seconds that took."""
    fingerprint = parent.spec.backbone_fingerprint
    found = cache.get_many(ids, fingerprint)
    missing = [i for i in ids if i not in found]
    log.info("%d images: %d embeddings cached, %d to compute", len(ids), len(found), len(missing))
    started = time.perf_counter()
    done = 0
    for batch, _, embeddings in extract(parent.onnx_path, missing, read, parent.spec.preprocess,
                                        workers=threads, batch_size=EMBED_BATCH):
        computed = dict(zip(batch, embeddings, strict=True))
        cache.put_many(computed, fingerprint)
        found.update(computed)
        done += len(batch)
        progress("embedding", 0.05 + 0.75 * done / len(missing))
    return found, len(missing), time.perf_counter() - started


def add_int8_variant(registry: ModelRegistry, parent: ModelVersion, version: ModelVersion, head: LinearHead,
                     check: tuple[np.ndarray, np.ndarray | None], calibration: np.ndarray | None, workdir: Path,
                     threads: int) -> dict[str, Any]:
    """Give the new version (``head`` on the parent's backbone) an INT8 variant if it passes the
    INT8 gate on ``check`` (held-out images and their targets; without targets, its agreement
    with fp32): the parent's INT8 graph with the new head when the parent has one (its backbone,
    and so its calibration, is the parent's; the head is float in both), else the new graph
    quantised on ``calibration``."""
    path = workdir / INT8_ONNX_FILENAME
    if parent.has_int8():
        replace_head(parent.int8_onnx_path, path, head.weight, head.bias)
        origin: dict[str, Any] = {"from": parent.version}
    elif calibration is not None:
        quantize_onnx(version.onnx_path, path, calibration)
        origin = {"from": None, "calibration_images": len(calibration)}
    else:
        raise ValueError("a parent without an INT8 variant needs calibration images")
    inputs, targets = check
    check_onnx_contract(path, version.spec)
    verify_head(path, head.weight, head.bias, inputs[:4])
    figures = {**origin, **check_int8(version.onnx_path, path, inputs, targets, threads=threads).as_dict()}
    figures["added"] = figures["passed"]
    if not figures["passed"]:
        log.warning("version %s gets no INT8 variant (it is registered and served in fp32): its INT8 graph scores "
                    "%.4f against fp32's %.4f on %d held-out images, more than %.1f points lower",
                    version.version, figures["int8_accuracy"], figures["fp32_accuracy"], len(inputs),
                    100 * figures["max_accuracy_loss"])
        return figures
    report = workdir / INT8_REPORT_FILENAME
    report.write_text(json.dumps(figures, indent=2))
    registry.add_files(version.version, {INT8_ONNX_FILENAME: path, INT8_REPORT_FILENAME: report})
    return figures


def calibration_images(read: Callable[[str], bytes], ids: list[str], config: PreprocessConfig) -> np.ndarray:
    """At most :data:`MAX_CALIBRATION_IMAGES` of the images ``ids``, a fixed sample, preprocessed."""
    ids = sorted(ids)
    if len(ids) > MAX_CALIBRATION_IMAGES:
        ids = sorted(np.random.default_rng(0).choice(ids, MAX_CALIBRATION_IMAGES, replace=False).tolist())
    return preprocessed(read, ids, config)


def preprocessed(read: Callable[[str], bytes], ids: list[str], config: PreprocessConfig) -> np.ndarray:
    """The images ``ids`` as the graph takes them, (N, 3, S, S)."""
    return np.stack([preprocess_image(decode_image(read(i)), config) for i in ids])


def activate(registry: ModelRegistry, version: str, progress: Progress) -> None:
    """Put the job's new version live; a write the state cannot take says what failed."""
    progress("activating", 0.98)
    try:
        registry.activate(version)
    except OSError as exc:
        failure = storage_failure(exc, f"activating the new version {version}")
        if failure is None:
            raise
        raise failure from exc


@dataclass(frozen=True)
class RetrainResult:
    state: Literal["succeeded", "rejected"]  #: whether the new version went live
    version: str
    metrics: dict[str, Any]


def retrain(state: State, home: Path, params: RetrainParams, progress_report: Callable[[str, float], None],
            threads: int = 2, job_id: str = "", int8: bool = False) -> RetrainResult:
    """Run one head-only retrain. Scratch files go to a directory in ``home`` named after the
    job. With ``int8`` (a CPU host serving INT8 where it can), a new version whose parent has no
    INT8 variant gets one calibrated on its own images (:func:`add_int8_variant`)."""
    progress = Progress(progress_report)
    registry, labels = state.registry, state.labels
    parent = retrainable_parent(registry, labels)
    started = time.perf_counter()
    progress("embedding", 0.05)
    images = labels.images()
    ids = [image.image_id for image in images]
    labels_by_id = {image.image_id: image.label for image in images}
    vectors, computed, embedding_seconds = embed_missing(parent, labels.read, state.embeddings, ids, progress,
                                                         threads)

    progress("fitting", 0.82)
    parent_x, parent_y = parent.training_embeddings()
    weight, bias = read_head(parent.onnx_path)
    result = retrain_head(
        ParentModel(parent.version, parent.spec.labels, weight, bias, parent_x, parent_y, parent.training_hashes()),
        vectors, labels_by_id, params,
    )
    progress("evaluating", 0.88)
    metrics = {
        **result.metrics,
        "embeddings_computed": computed,
        "embeddings_cached": len(ids) - computed,
        "embedding_seconds": round(embedding_seconds, 3),
        "embedding_images_per_second": round(computed / embedding_seconds, 1) if computed else None,
    }

    progress("exporting", 0.92)
    # named after the job, so that the job runner can remove it if this process is killed
    with tempfile.TemporaryDirectory(prefix=scratch_prefix(job_id), dir=home) as tmp:
        onnx_path = Path(tmp) / "model.onnx"
        replace_head(parent.onnx_path, onnx_path, result.head.weight, result.head.bias)
        progress("verifying", 0.95)
        sample_ids = (result.held_ids or result.train_ids or ids)[:4]
        sample = preprocessed(labels.read, sample_ids, parent.spec.preprocess)
        metrics["head_check_max_diff"] = verify_head(onnx_path, result.head.weight, result.head.bias, sample)
        version = registry.register(
            onnx_file=onnx_path,
            spec=parent.spec.model_copy(update={"labels": tuple(result.labels)}),
            metrics=metrics,
            embeddings=result.embeddings,
            embedding_targets=result.targets,
            embedding_hashes=result.hashes,
            parent=parent.version,
            dataset_fingerprint=None,
            details={"strategy": "retrain-head", "exporter": graph_exporter(parent.info),
                     "job_params": params.model_dump(),
                     "seconds": round(time.perf_counter() - started, 2)},
        )
        if parent.has_int8() or int8:  # before activation: workers load both at once
            progress("quantizing", 0.96)
            if result.held_ids:
                inputs = preprocessed(labels.read, result.held_ids, parent.spec.preprocess)
                index = {label: k for k, label in enumerate(result.labels)}
                targets: np.ndarray | None = np.array([index[labels_by_id[i]] for i in result.held_ids], np.int64)
            else:
                inputs, targets = sample, None
            calibration = None if parent.has_int8() else calibration_images(
                labels.read, result.train_ids or result.held_ids, parent.spec.preprocess)
            metrics["int8"] = add_int8_variant(registry, parent, version, result.head, (inputs, targets),
                                               calibration, Path(tmp), threads)
        metrics["variants"] = ["fp32", "int8"] if metrics.get("int8", {}).get("added") else ["fp32"]
    if result.promote:
        activate(registry, version.version, progress)
    metrics["seconds"] = round(time.perf_counter() - started, 2)
    return RetrainResult("succeeded" if result.promote else "rejected", version.version, metrics)


#: What a job is writing in each phase, for the operator's message when a write fails.
_PHASE_WRITES = {
    "starting": "recording the job's progress",
    "embedding": "caching the image embeddings",
    "fitting": "recording the job's progress",
    "evaluating": "recording the job's progress",
    "exporting": "writing the new model version",
    "verifying": "writing the new model version",
    "quantizing": "writing the new model version's INT8 variant",
    "activating": "activating the new version",
}


def failure_reason(exc: BaseException, phase: str) -> str:
    """The job's ``error`` for ``exc``, raised during ``phase``: for a write the state directory
    could not take, what failed, what it left, and what the operator should do."""
    failure = storage_failure(exc, _PHASE_WRITES.get(phase, f"the {phase} phase"))
    if failure is None:
        return f"{exc.__class__.__name__}: {exc}"
    if phase == "activating":  # registered, then the pointer could not be replaced
        left = "the new version is registered but not active (activate it once the problem is fixed)"
    else:
        left = "no model version was registered"
    return f"{failure}; {left}; start a new job once it is fixed"
