"""The retrain job, run as its own process: ``python -m service.retrain JOB_ID``.

The active version's ONNX graph is the backbone: embeddings of labelled images not seen before are
computed with it (batched, cached by content hash + backbone fingerprint), then
:func:`models.retrain.retrain_head` fits and judges the new head, and the new version is the same
graph with the new head written in. It goes live only if the promotion gate lets it (or ``force``
is set); a refused version is kept, inactive, with its metrics. A parent with an INT8 variant
passes it on, with the new head, if it passes the INT8 gate (:mod:`models.int8`); on a CPU host
that serves INT8 where it can, a parent without one has the new version calibrated instead.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from models.extract import extract
from models.int8 import MAX_CALIBRATION_IMAGES, check_int8, quantize_onnx
from models.onnx_io import check_onnx_contract, read_head, replace_head, verify_head
from models.preprocess import decode_image, preprocess_image
from models.retrain import HeadRetrain, ParentModel, RetrainParams, retrain_head
from models.spec import PreprocessConfig
from store.embeddings import EmbeddingCache
from store.errors import storage_failure
from store.jobs import JobStore, scratch_prefix
from store.labels import LabelStore
from store.registry import INT8_ONNX_FILENAME, INT8_REPORT_FILENAME, ModelRegistry, ModelVersion, graph_exporter
from store.state import State, open_state

from .jobs import retrainable_parent
from .providers import serves_on_cpu

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


def embed_missing(parent: ModelVersion, labels: LabelStore, cache: EmbeddingCache, ids: list[str],
                  progress: Progress, threads: int) -> tuple[dict[str, np.ndarray], int, float]:
    """Embeddings of ``ids``: from the cache, the rest computed with the parent's graph (and
    cached) the way the service runs it: a single-thread session per core, each thread decoding
    its own batch (:func:`models.extract.extract`). Returns them, how many were computed and
    how many seconds that took."""
    fingerprint = parent.spec.backbone_fingerprint
    found = cache.get_many(ids, fingerprint)
    missing = [i for i in ids if i not in found]
    log.info("%d labelled images: %d embeddings cached, %d to compute", len(ids), len(found), len(missing))
    started = time.perf_counter()
    done = 0
    for batch, _, embeddings in extract(parent.onnx_path, missing, labels.read, parent.spec.preprocess,
                                        workers=threads, batch_size=EMBED_BATCH):
        computed = dict(zip(batch, embeddings, strict=True))
        cache.put_many(computed, fingerprint)
        found.update(computed)
        done += len(batch)
        progress("embedding", 0.05 + 0.75 * done / len(missing))
    return found, len(missing), time.perf_counter() - started


def add_int8_variant(registry: ModelRegistry, parent: ModelVersion, version: ModelVersion, result: HeadRetrain,
                     check: tuple[np.ndarray, np.ndarray | None], calibration: np.ndarray | None, workdir: Path,
                     threads: int) -> dict[str, Any]:
    """Give the new version an INT8 variant if it passes the INT8 gate on ``check`` (the held-out
    images and their targets; without targets, its agreement with fp32): the parent's INT8 graph
    with the new head when the parent has one (its backbone, and so its calibration, is the
    parent's; the head is float in both), else the new graph quantised on ``calibration``."""
    path = workdir / INT8_ONNX_FILENAME
    if parent.has_int8():
        replace_head(parent.int8_onnx_path, path, result.head.weight, result.head.bias)
        origin: dict[str, Any] = {"from": parent.version}
    elif calibration is not None:
        quantize_onnx(version.onnx_path, path, calibration)
        origin = {"from": None, "calibration_images": len(calibration)}
    else:
        raise ValueError("a parent without an INT8 variant needs calibration images")
    inputs, targets = check
    check_onnx_contract(path, version.spec)
    verify_head(path, result.head.weight, result.head.bias, inputs[:4])
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


def calibration_images(labels: LabelStore, result: HeadRetrain, config: PreprocessConfig) -> np.ndarray:
    """At most :data:`MAX_CALIBRATION_IMAGES` of the images the new head was trained on (all
    labelled ones if none), a fixed sample, preprocessed."""
    ids = sorted(result.train_ids or result.held_ids)
    if len(ids) > MAX_CALIBRATION_IMAGES:
        ids = sorted(np.random.default_rng(0).choice(ids, MAX_CALIBRATION_IMAGES, replace=False).tolist())
    return np.stack([preprocess_image(decode_image(labels.read(i)), config) for i in ids])


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
    vectors, computed, embedding_seconds = embed_missing(parent, labels, state.embeddings, ids, progress, threads)

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
        sample = np.stack([preprocess_image(decode_image(labels.read(i)), parent.spec.preprocess)
                           for i in sample_ids])
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
                inputs = np.stack([
                    preprocess_image(decode_image(labels.read(i)), parent.spec.preprocess)
                    for i in result.held_ids])
                index = {label: k for k, label in enumerate(result.labels)}
                targets: np.ndarray | None = np.array([index[labels_by_id[i]] for i in result.held_ids], np.int64)
            else:
                inputs, targets = sample, None
            calibration = None if parent.has_int8() else calibration_images(labels, result, parent.spec.preprocess)
            metrics["int8"] = add_int8_variant(registry, parent, version, result, (inputs, targets), calibration,
                                               Path(tmp), threads)
        metrics["variants"] = ["fp32", "int8"] if metrics.get("int8", {}).get("added") else ["fp32"]
    if result.promote:
        progress("activating", 0.98)
        try:
            registry.activate(version.version)
        except OSError as exc:
            failure = storage_failure(exc, f"activating the new version {version.version}")
            if failure is None:
                raise
            raise failure from exc
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


def _record_failure(jobs: JobStore, job_id: str, reason: str) -> None:
    try:
        jobs.fail(job_id, reason)
    except Exception:  # the database itself cannot be written: the job is marked failed once gone
        log.exception("could not record that retrain job %s failed (%s)", job_id, reason)


def keep_lease(jobs: JobStore, job_id: str, every_s: float) -> threading.Event:
    """Renew the job's lease every ``every_s`` seconds in the background; the event is set once
    the job is no longer this process's to finish."""
    lost = threading.Event()

    def renew() -> None:
        while not lost.wait(every_s):
            try:
                if not jobs.renew_lease(job_id):
                    lost.set()
            except Exception as exc:  # noqa: BLE001 - the next renewal tells whether the lease held
                log.warning("could not renew the lease of retrain job %s: %s", job_id, exc)

    threading.Thread(target=renew, name="job-lease", daemon=True).start()
    return lost


def main(argv: list[str] | None = None) -> int:
    from models.hardware import cpu_count

    from .settings import get_settings

    parser = argparse.ArgumentParser(prog="python -m service.retrain")
    parser.add_argument("job_id")
    parser.add_argument("--parent-pid", type=int, help="exit (marking the job failed) if this process dies")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    settings = get_settings()
    os.nice(10)  # serving comes first: the job takes the CPU the service leaves
    state = open_state(settings)
    jobs = state.jobs
    job = jobs.get(args.job_id)
    if job is None:
        log.error("no job %s", args.job_id)
        return 2

    phase = "starting"
    lease_lost = keep_lease(jobs, args.job_id, settings.job_lease_s / 3)

    def report(new_phase: str, progress: float) -> None:
        nonlocal phase
        if args.parent_pid and os.getppid() != args.parent_pid:
            raise SystemExit("the service stopped during the job")
        if lease_lost.is_set():
            raise SystemExit("the job's lease ran out (it could not reach the database in time) and another replica "
                             "failed it; start a new job")
        jobs.record_progress(args.job_id, new_phase, progress)
        phase = new_phase

    try:
        jobs.mark_running(args.job_id, os.getpid())
        # every core: the job is niced, so serving still comes first
        result = retrain(state, settings.home, RetrainParams.model_validate(job.params or {}), report,
                         threads=cpu_count(), job_id=args.job_id,
                         int8=settings.model_variant in ("auto", "int8") and serves_on_cpu(settings))
    except SystemExit as exc:
        _record_failure(jobs, args.job_id, str(exc))
        return 1
    except Exception as exc:  # any failure ends the job failed, with the reason, never half-done
        log.exception("retrain job %s failed", args.job_id)
        _record_failure(jobs, args.job_id, failure_reason(exc, phase))
        return 1
    jobs.finish(args.job_id, result.state, result.version, result.metrics)
    log.info("retrain job %s %s: %s", args.job_id, result.state, result.metrics["gate"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
