"""The adaptation job: a version's head aligned with unlabelled images of a new domain
(:mod:`models.adapt`), registered as a new version and put live through the promotion gate.

Run by ``POST /admin/adapt`` as a job like a retrain (:mod:`service.job_process` runs both kinds;
the uploaded images wait in the job's scratch directory); ``python -m training adapt``
(:mod:`training.adapt`) does the same from folders. The target images are embedded with the
parent's graph through the embedding cache; the labelled images of the job's ``domain`` in the
label store (read when the job gets to its gate, so they may be uploaded while it runs) judge the
adapted head against the parent's. The new version is the parent's graph with the folded head
written in, the same spec, and the parent's training embeddings moved into the target domain.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from models.adapt import AdaptParams, adapt_head, check_adaptable, target_fingerprint
from models.head import LinearHead
from models.onnx_io import replace_head, verify_head
from store.errors import storage_failure
from store.files import write_atomic
from store.jobs import scratch_prefix
from store.registry import ModelVersion, graph_exporter, parent_model
from store.state import State

from .retrain import (
    Progress,
    RetrainResult,
    activate,
    add_int8_variant,
    calibration_images,
    embed_missing,
    preprocessed,
)

log = logging.getLogger(__name__)

#: The job's uploaded target images, one file per image id, in its scratch directory in the home.
TARGET_DIR_SUFFIX = "target"


@dataclass(frozen=True)
class ImageSet:
    """Images by id (sha256 of their bytes) and where to read them."""

    ids: list[str]
    read: Callable[[str], bytes]


def target_dir(home: Path, job_id: str) -> Path:
    """Where ``POST /admin/adapt`` leaves job ``job_id``'s images (removed with the job's scratch)."""
    return home / (scratch_prefix(job_id) + TARGET_DIR_SUFFIX)


def save_targets(home: Path, job_id: str, images: dict[str, bytes]) -> None:
    """Write the checked uploads (by image id) for the job to read."""
    directory = target_dir(home, job_id)
    directory.mkdir(parents=True, exist_ok=True)
    for image_id, data in images.items():
        write_atomic(directory / image_id, data)


def saved_targets(home: Path, job_id: str) -> ImageSet:
    directory = target_dir(home, job_id)
    return ImageSet(sorted(p.name for p in directory.iterdir()), lambda i: (directory / i).read_bytes())


def domain_judges(state: State, domain: str | None) -> tuple[list[str], list[str]]:
    """The labelled images of ``domain`` in the label store: (ids, labels)."""
    if domain is None:
        return [], []
    tagged = [image for image in state.labels.images() if image.domain == domain]
    return [image.image_id for image in tagged], [image.label for image in tagged]


def adapt_version(state: State, home: Path, parent: ModelVersion, target: ImageSet, params: AdaptParams,
                  progress_report: Callable[[str, float], None], *, threads: int = 2, job_id: str = "",
                  int8: bool = False) -> RetrainResult:
    """Adapt ``parent`` to ``target``, judged on the label store's images of ``params.domain``
    (read now: they may have been uploaded while the job ran). With ``int8`` (a CPU host serving INT8
    where it can), a new version whose parent has no INT8 variant gets one calibrated on the
    target images."""
    progress = Progress(progress_report)
    registry = state.registry
    started = time.perf_counter()
    model = parent_model(parent)
    check_adaptable(model, len(target.ids))
    progress("embedding", 0.05)
    vectors, computed, seconds = embed_missing(parent, target.read, state.embeddings, target.ids, progress, threads)
    judge_ids, labels = domain_judges(state, params.domain)
    judges = ImageSet(judge_ids, state.labels.read)
    judged, judged_computed, _ = embed_missing(parent, judges.read, state.embeddings, judges.ids, progress, threads)

    progress("fitting", 0.82)
    result = adapt_head(model, np.stack([vectors[i] for i in target.ids]),
                        np.stack([judged[i] for i in judges.ids]) if judges.ids else np.zeros((0, 1), np.float32),
                        labels, params)
    metrics = {
        **result.metrics,
        "target_fingerprint": target_fingerprint(target.ids),
        "embeddings_computed": computed + judged_computed,
        "embeddings_cached": len(target.ids) + len(judges.ids) - computed - judged_computed,
        "embedding_seconds": round(seconds, 3),
    }
    head = LinearHead(result.weight, result.bias)
    progress("exporting", 0.9)
    with tempfile.TemporaryDirectory(prefix=scratch_prefix(job_id), dir=home) as tmp:
        onnx_path = Path(tmp) / "model.onnx"
        replace_head(parent.onnx_path, onnx_path, head.weight, head.bias)
        progress("verifying", 0.93)
        sample = preprocessed(target.read, target.ids[:4], parent.spec.preprocess)
        metrics["head_check_max_diff"] = verify_head(onnx_path, head.weight, head.bias, sample)
        _, targets = parent.training_embeddings()
        version = registry.register(
            onnx_file=onnx_path,
            spec=parent.spec,
            metrics=metrics,
            embeddings=result.embeddings,
            embedding_targets=targets,
            embedding_hashes=parent.training_hashes(),
            parent=parent.version,
            dataset_fingerprint=None,
            details={"strategy": f"adapt-{params.method}", "exporter": graph_exporter(parent.info),
                     "job_params": params.model_dump(),
                     "target": {"fingerprint": metrics["target_fingerprint"], "images": len(target.ids)},
                     "seconds": round(time.perf_counter() - started, 2)},
        )
        if parent.has_int8() or int8:  # before activation: workers load both at once
            progress("quantizing", 0.96)
            index = {label: k for k, label in enumerate(parent.spec.labels)}
            known = [k for k, label in enumerate(labels) if label in index]
            check: tuple[np.ndarray, np.ndarray | None]
            if known:
                check = (preprocessed(judges.read, [judges.ids[k] for k in known], parent.spec.preprocess),
                         np.array([index[labels[k]] for k in known], np.int64))
            else:
                check = (sample, None)
            calibration = None if parent.has_int8() else calibration_images(target.read, target.ids,
                                                                             parent.spec.preprocess)
            metrics["int8"] = add_int8_variant(registry, parent, version, head, check, calibration, Path(tmp),
                                               threads)
        metrics["variants"] = ["fp32", "int8"] if metrics.get("int8", {}).get("added") else ["fp32"]
    if result.promote:
        activate(registry, version.version, progress)
    metrics["seconds"] = round(time.perf_counter() - started, 2)
    log.info("adapted %s to %d target images (%s): %s, %s", parent.version, len(target.ids), params.method,
             version.version, metrics["gate"])
    return RetrainResult("succeeded" if result.promote else "rejected", version.version, metrics)


def run_job(state: State, home: Path, job_id: str, parent: str, params: AdaptParams,
            progress_report: Callable[[str, float], None], *, threads: int, int8: bool) -> RetrainResult:
    """The body of an adapt job: its parent version adapted to the images its request left."""
    try:
        return adapt_version(state, home, state.registry.get(parent), saved_targets(home, job_id), params,
                             progress_report, threads=threads, job_id=job_id, int8=int8)
    finally:
        _remove_targets(home, job_id)


def _remove_targets(home: Path, job_id: str) -> None:
    try:
        shutil.rmtree(target_dir(home, job_id))
    except FileNotFoundError:
        pass
    except OSError as exc:
        if storage_failure(exc, "removing the job's images") is None:
            raise
        log.warning("could not remove adapt job %s's images: %s", job_id, exc)

