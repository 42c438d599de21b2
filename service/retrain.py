"""Head-only retraining, run as its own process: ``python -m service.retrain JOB_ID``.

The active version's ONNX graph is the backbone: embeddings of images not seen before are
computed with it (batched, cached by content hash + backbone fingerprint), a new linear head is
fitted on ALL labelled images in the store plus the active version's own training embeddings (no
class is forgotten; new labels become new classes), the new and the active model are compared on
the same held-out images (fixed per image by its hash), and the new version is the same graph
with the new head written in. It goes live only if it is not worse (or ``force`` is set); a
refused version is kept, inactive, with its metrics.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from models.errors import InputError
from models.head import HeadParams, LinearHead, fit_linear_head
from models.extract import extract
from models.onnx_io import cpu_session, read_head, replace_head, run_in_batches, verify_head
from models.preprocess import preprocess
from models.registry import (
    INT8_MAX_ACCURACY_LOSS,
    INT8_ONNX_FILENAME,
    INT8_REPORT_FILENAME,
    ModelRegistry,
    ModelVersion,
)

from .db import storage_failure
from .embeddings import EmbeddingCache
from .jobs import scratch_prefix
from .labels import LabelStore, held_out

log = logging.getLogger(__name__)
EMBED_BATCH = 16


class RetrainParams(BaseModel):
    """Optional JSON body of ``POST /admin/retrain``."""

    model_config = ConfigDict(extra="forbid")

    force: bool = Field(False, description="activate the new version even if it is worse")
    tolerance: float = Field(0.0, ge=0.0, le=1.0, description="accuracy the new version may lose and still go live")
    steps: int = Field(300, ge=10, le=5000, description="head optimisation steps")
    learning_rate: float = Field(0.05, gt=0.0, le=1.0)
    l2: float = Field(1e-3, ge=0.0, le=10.0, description="L2 regularisation of the head")


class RetrainRefused(InputError):
    """The store does not hold enough to train on (422)."""

    status_code = 422


def usable_labels(parent: ModelVersion, store_counts: dict[str, int]) -> list[str]:
    """The new version's labels: the parent's that still have training data (in the parent's
    order), then new ones (sorted). Parent labels without any data (e.g. the bootstrap model's
    1000 ImageNet classes) cannot be fitted and are dropped."""
    _, targets = parent.training_embeddings()
    parent_with_data = {parent.spec.labels[t] for t in set(targets.tolist())} | set(store_counts)
    kept = [label for label in parent.spec.labels if label in parent_with_data]
    return kept + sorted(set(store_counts) - set(kept))


def check_retrainable(store: LabelStore, parent: ModelVersion | None) -> ModelVersion:
    """The version to retrain from; :class:`RetrainRefused` with the reason if a retrain cannot
    produce a classifier."""
    if parent is None:
        raise RetrainRefused("no active model version to retrain from: run `python -m training bootstrap`")
    counts = store.counts()
    if not counts:
        raise RetrainRefused("no labelled images: upload some with POST /admin/labels first")
    small = {label: n for label, n in counts.items() if n < 2}
    if small:
        raise RetrainRefused(f"every label needs at least 2 images; too few: {small}")
    labels = usable_labels(parent, counts)
    if len(labels) < 2:
        raise RetrainRefused(f"only one class ({labels[0]}); a classifier needs at least two: label images of another class")
    return parent


@dataclass
class Progress:
    report: Callable[..., None]
    started: float = field(default_factory=time.perf_counter)
    phase: str = ""

    def __call__(self, phase: str, progress: float) -> None:
        if phase != self.phase:  # the job log shows where the time goes
            log.info("phase %s at %.2fs", phase, time.perf_counter() - self.started)
            self.phase = phase
        self.report(phase=phase, progress=round(min(max(progress, 0.0), 1.0), 4))


def embed_missing(parent: ModelVersion, store: LabelStore, cache: EmbeddingCache, ids: list[str],
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
    for batch, _, embeddings in extract(parent.onnx_path, missing, store.read, parent.spec.preprocess,
                                        workers=threads, batch_size=EMBED_BATCH):
        computed = dict(zip(batch, embeddings))
        cache.put_many(computed, fingerprint)
        found.update(computed)
        done += len(batch)
        progress("embedding", 0.05 + 0.75 * done / len(missing))
    return found, len(missing), time.perf_counter() - started


def add_int8_variant(registry: ModelRegistry, parent: ModelVersion, version: ModelVersion, head: LinearHead,
                     inputs: np.ndarray, targets: np.ndarray | None, workdir: Path, threads: int) -> dict[str, Any]:
    """Give the new version the parent's INT8 graph with the new head. The backbone, and so its
    calibration (on the parent's training images), is the parent's; the head is float in both.
    Added only if its top-1 accuracy on ``inputs`` (the held-out images; without labels, its
    agreement with fp32) is within INT8_MAX_ACCURACY_LOSS of the new fp32 graph's."""
    path = workdir / INT8_ONNX_FILENAME
    replace_head(parent.int8_onnx_path, path, head.weight, head.bias)
    verify_head(path, head.weight, head.bias, inputs[:4])
    fp32 = run_in_batches(cpu_session(version.onnx_path, intra_op_threads=threads), inputs)[0].argmax(1)
    int8 = run_in_batches(cpu_session(path, intra_op_threads=threads), inputs)[0].argmax(1)
    reference = targets if targets is not None else fp32
    figures: dict[str, Any] = {
        "from": parent.version, "check_images": len(inputs), "labelled": targets is not None,
        "fp32_accuracy": float((fp32 == reference).mean()), "int8_accuracy": float((int8 == reference).mean()),
        "top1_agreement": float((fp32 == int8).mean()),
    }
    figures["added"] = figures["fp32_accuracy"] - figures["int8_accuracy"] <= INT8_MAX_ACCURACY_LOSS + 1e-9
    if not figures["added"]:
        log.warning("version %s gets no INT8 variant: with its head, %s's INT8 backbone scores %.4f against "
                    "fp32's %.4f on %d held-out images", version.version, parent.version,
                    figures["int8_accuracy"], figures["fp32_accuracy"], len(inputs))
        return figures
    report = workdir / INT8_REPORT_FILENAME
    report.write_text(json.dumps(figures, indent=2))
    registry.add_files(version.version, {INT8_ONNX_FILENAME: path, INT8_REPORT_FILENAME: report})
    return figures


def _accuracy(predicted: list[str], truth: list[str]) -> float:
    return float(np.mean([p == t for p, t in zip(predicted, truth)])) if truth else 0.0


def retrain(home: Path, params: RetrainParams, report: Callable[..., None], threads: int = 2,
            job_id: str = "") -> dict[str, Any]:
    """Run one head-only retrain; returns the job's result fields (state, version, metrics)."""
    progress = Progress(report)
    registry = ModelRegistry(home)
    store = LabelStore(home)
    cache = EmbeddingCache(home)
    parent = check_retrainable(store, registry.active())
    started = time.perf_counter()
    progress("embedding", 0.05)
    images = store.images()
    ids = [image.image_id for image in images]
    store_labels = {image.image_id: image.label for image in images}
    vectors, computed, embedding_seconds = embed_missing(parent, store, cache, ids, progress, threads)

    labels = usable_labels(parent, Counter(store_labels.values()))
    index = {label: i for i, label in enumerate(labels)}
    # held-out images fixed per image; a class whose images are all held out trains on them
    held = {i for i in ids if held_out(i)}
    for label in set(store_labels.values()):
        members = [i for i in ids if store_labels[i] == label]
        if all(i in held for i in members):
            held -= set(members)
    train_ids = [i for i in ids if i not in held]
    held_ids = sorted(held)

    parent_x, parent_y = parent.training_embeddings()
    parent_hashes = parent.training_hashes()
    keep = [k for k, h in enumerate(parent_hashes)
            if h not in store_labels and parent.spec.labels[parent_y[k]] in index]
    x_parts = [parent_x[keep]] if keep else []
    y_parts = [np.array([index[parent.spec.labels[parent_y[k]]] for k in keep], np.int64)] if keep else []
    if train_ids:
        x_parts.append(np.stack([vectors[i] for i in train_ids]))
        y_parts.append(np.array([index[store_labels[i]] for i in train_ids], np.int64))
    train_x, train_y = np.concatenate(x_parts), np.concatenate(y_parts)
    held_x = np.stack([vectors[i] for i in held_ids]) if held_ids else np.zeros((0, train_x.shape[1]), np.float32)
    held_truth = [store_labels[i] for i in held_ids]
    held_y = np.array([index[t] for t in held_truth], np.int64)

    progress("fitting", 0.82)
    head = fit_linear_head(
        train_x, train_y, len(labels),
        params=HeadParams(steps=params.steps, learning_rate=params.learning_rate, l2=params.l2),
        validation=(held_x, held_y) if held_ids else None,
    )
    progress("evaluating", 0.88)
    candidate_pred = [labels[k] for k in head.logits(held_x).argmax(1)] if held_ids else []
    parent_w, parent_b = read_head(parent.onnx_path)
    active_pred = [parent.spec.labels[k] for k in (held_x @ parent_w.T + parent_b).argmax(1)] if held_ids else []
    candidate_acc, active_acc = _accuracy(candidate_pred, held_truth), _accuracy(active_pred, held_truth)
    if not held_ids:
        promote, reason = params.force, "no held-out images to compare on"
    else:
        promote = params.force or candidate_acc >= active_acc - params.tolerance
        reason = (f"candidate accuracy {candidate_acc:.4f} vs active {active_acc:.4f} "
                  f"(tolerance {params.tolerance}) on {len(held_ids)} held-out images")
    metrics = {
        "candidate": {"accuracy": candidate_acc, "held_out": len(held_ids)},
        "active": {"version": parent.version, "accuracy": active_acc, "held_out": len(held_ids)},
        "train_images": int(len(train_y)),
        "from_parent": len(keep),
        "embeddings_computed": computed,
        "embeddings_cached": len(ids) - computed,
        "embedding_seconds": round(embedding_seconds, 3),
        "embedding_images_per_second": round(computed / embedding_seconds, 1) if computed else None,
        "labels": labels,
        "dropped_labels": len(parent.spec.labels) - len([l for l in parent.spec.labels if l in index]),
        "promoted": bool(promote),
        "gate": reason + (" (forced)" if params.force else ""),
    }

    progress("exporting", 0.92)
    # named after the job, so that the job runner can remove it if this process is killed
    with tempfile.TemporaryDirectory(prefix=scratch_prefix(job_id), dir=home) as tmp:
        onnx_path = Path(tmp) / "model.onnx"
        replace_head(parent.onnx_path, onnx_path, head.weight, head.bias)
        progress("verifying", 0.95)
        sample_ids = (held_ids or train_ids or ids)[:4]
        sample = np.stack([preprocess(store.read(i), parent.spec.preprocess) for i in sample_ids])
        metrics["head_check_max_diff"] = verify_head(onnx_path, head.weight, head.bias, sample)
        # the version's own data: everything it was fitted or judged on, for the next retrain
        all_ids = train_ids + held_ids
        stored_x = ([parent_x[keep]] if keep else []) + [np.stack([vectors[i] for i in all_ids])]
        stored_y = (y_parts[:1] if keep else []) + [np.array([index[store_labels[i]] for i in all_ids], np.int64)]
        version = registry.register(
            onnx_file=onnx_path,
            spec=parent.spec.model_copy(update={"labels": tuple(labels)}),
            metrics=metrics,
            embeddings=np.concatenate(stored_x),
            embedding_targets=np.concatenate(stored_y),
            embedding_hashes=[parent_hashes[k] for k in keep] + all_ids,
            parent=parent.version,
            dataset_fingerprint=None,
            details={"strategy": "retrain-head", "job_params": params.model_dump(),
                     "seconds": round(time.perf_counter() - started, 2)},
        )
        if INT8_ONNX_FILENAME in parent.manifest_files():  # before activation: workers load both at once
            held_inputs = np.stack([preprocess(store.read(i), parent.spec.preprocess) for i in held_ids]) \
                if held_ids else sample
            held_targets = held_y if held_ids else None
            metrics["int8"] = add_int8_variant(registry, parent, version, head, held_inputs, held_targets, Path(tmp),
                                               threads)
    if promote:
        progress("activating", 0.98)
        try:
            registry.activate(version.version)
        except OSError as exc:
            failure = storage_failure(exc, f"activating the new version {version.version}")
            if failure is None:
                raise
            raise failure from exc
    metrics["seconds"] = round(time.perf_counter() - started, 2)
    return {"state": "succeeded" if promote else "rejected", "version": version.version, "metrics": metrics}


#: What a job is writing in each phase, for the operator's message when a write fails.
_PHASE_WRITES = {
    "starting": "recording the job's progress",
    "embedding": "caching the image embeddings",
    "fitting": "recording the job's progress",
    "evaluating": "recording the job's progress",
    "exporting": "writing the new model version",
    "verifying": "writing the new model version",
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


def _record_failure(jobs: Any, job_id: str, reason: str) -> None:
    try:
        jobs.update(job_id, state="failed", error=reason)
    except Exception:  # the database itself cannot be written: the job is marked failed once gone
        log.exception("could not record that retrain job %s failed (%s)", job_id, reason)


def main(argv: list[str] | None = None) -> int:
    from .jobs import JobStore
    from .settings import cpu_count, get_settings

    parser = argparse.ArgumentParser(prog="python -m service.retrain")
    parser.add_argument("job_id")
    parser.add_argument("--parent-pid", type=int, help="exit (marking the job failed) if this process dies")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    settings = get_settings()
    os.nice(10)  # serving comes first: the job takes the CPU the service leaves
    jobs = JobStore(settings.home)
    job = jobs.get(args.job_id)
    if job is None:
        log.error("no job %s", args.job_id)
        return 2

    phase = "starting"

    def report(**fields: Any) -> None:
        nonlocal phase
        if args.parent_pid and os.getppid() != args.parent_pid:
            raise SystemExit("the service stopped during the job")
        jobs.update(args.job_id, **fields)
        phase = fields.get("phase", phase)

    try:
        report(state="running", phase="starting", pid=os.getpid())
        # every core: the job is niced, so serving still comes first
        result = retrain(settings.home, RetrainParams.model_validate(job["params"] or {}), report,
                         threads=cpu_count(), job_id=args.job_id)
    except SystemExit as exc:
        _record_failure(jobs, args.job_id, str(exc))
        return 1
    except Exception as exc:  # any failure ends the job failed, with the reason, never half-done
        log.exception("retrain job %s failed", args.job_id)
        _record_failure(jobs, args.job_id, failure_reason(exc, phase))
        return 1
    jobs.update(args.job_id, phase="done", progress=1.0, **result)
    log.info("retrain job %s %s: %s", args.job_id, result["state"], result["metrics"]["gate"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
