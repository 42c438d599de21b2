"""Operators' state maintenance, for ``python -m store`` (torch-free: it runs in the serving
image): copying a single-machine ``TRANSFER_SERVE_HOME`` into a shared database and object store,
pruning old model versions, and seeding an empty state with the model an image was built with.

The copy is idempotent: what the target already holds is skipped (a version under the same number
with other files stops it, rather than being overwritten), so it can be run again after an
interruption, or once more just before the switch to pick up what changed meanwhile. Its dry run
reads both sides and writes nothing.
"""

from __future__ import annotations

import logging
import sqlite3
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from models.errors import ModelError

from .local import LocalBackend
from .local.database import database_path
from .local.registry import DirectoryRegistry
from .registry import ModelRegistry, ModelVersion
from .shared import SharedBackend
from .state import State

log = logging.getLogger(__name__)

_EMBEDDING_CHUNK = 500
#: kept predictions per write of a copy (each carries its image's bytes)
_PREDICTION_CHUNK = 100


@dataclass
class CopySummary:
    """What a copy did (or, in a dry run, would do)."""

    dry_run: bool
    versions_copied: list[str] = field(default_factory=list)
    versions_present: list[str] = field(default_factory=list)
    history_copied: bool = False
    labels: dict[str, int] = field(default_factory=dict)  #: stored / moved / unchanged
    embeddings: int = 0
    jobs_copied: int = 0
    jobs_present: int = 0
    jobs_skipped_active: int = 0
    predictions_copied: int = 0
    predictions_present: int = 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        verb = "would copy" if self.dry_run else "copied"
        labels = ", ".join(f"{n} {status}" for status, n in sorted(self.labels.items())) or "none"
        return (f"{verb}: {len(self.versions_copied)} version(s) {self.versions_copied} "
                f"({len(self.versions_present)} already there), activation history: "
                f"{'yes' if self.history_copied else 'no (the target has one)'}; labelled images: {labels}; "
                f"{self.embeddings} embedding(s); {self.jobs_copied} finished job(s) "
                f"({self.jobs_present} already there, {self.jobs_skipped_active} still active: not copied); "
                f"{self.predictions_copied} kept prediction(s) ({self.predictions_present} already there)")


def copy_home(source_home: Path, target: SharedBackend, *, dry_run: bool = False) -> CopySummary:
    """Copy the versions, activation history, labelled images, embeddings, finished jobs and kept
    predictions (with their images) of a single-machine home into a shared deployment."""
    source = State(LocalBackend(source_home))
    summary = CopySummary(dry_run=dry_run)
    registry = target.open_registry()
    catalogue = {v.version for v in registry.versions()}
    for version in source.registry.versions():
        if version.version in catalogue:
            summary.versions_present.append(version.version)
        else:
            summary.versions_copied.append(version.version)
            if not dry_run:
                registry.import_version(source.registry.get(version.version))
    pointer = source.registry.active_pointer()
    if pointer is not None:
        if dry_run:
            summary.history_copied = registry.active_pointer() is None
        else:
            summary.history_copied = registry.import_history(pointer)
    labels = target.open_labels()
    existing = {image.image_id: image.label for image in labels.images()}
    for image in source.labels.images():
        status = "stored" if image.image_id not in existing else (
            "unchanged" if existing[image.image_id] == image.label else "moved")
        summary.labels[status] = summary.labels.get(status, 0) + 1
        if not dry_run and status != "unchanged":
            labels.add(source.labels.read(image.image_id), image.label, max_pixels=10**9, domain=image.domain)
    summary.embeddings = _copy_embeddings(source_home, target, dry_run)
    _copy_jobs(source, target, summary, dry_run)
    _copy_predictions(source, target, summary, dry_run)
    log.info("%s", summary.describe())
    return summary


def _copy_embeddings(source_home: Path, target: SharedBackend, dry_run: bool) -> int:
    import numpy as np

    from .embeddings import decode_vector

    cache = target.open_embeddings()
    copied = 0
    with sqlite3.connect(database_path(source_home)) as conn:
        rows = conn.execute("SELECT image_id, backbone, dim, vector FROM embeddings ORDER BY backbone, image_id")
        batch: dict[str, dict[str, np.ndarray]] = {}
        for image_id, backbone, dim, blob in rows:
            vector = decode_vector(dim, blob)
            if vector is None:
                continue
            batch.setdefault(backbone, {})[image_id] = vector
            copied += 1
            if not dry_run and len(batch[backbone]) >= _EMBEDDING_CHUNK:
                cache.put_many(batch.pop(backbone), backbone)
        if not dry_run:
            for backbone, vectors in batch.items():
                cache.put_many(vectors, backbone)
    return copied


def _copy_jobs(source: State, target: SharedBackend, summary: CopySummary, dry_run: bool) -> None:
    from psycopg.types.json import Jsonb

    from .local.jobs import SqliteJobStore

    jobs = source.jobs
    if not isinstance(jobs, SqliteJobStore):
        raise TypeError("the source of a copy is a single-machine home")
    with jobs.database.connect() as conn:
        ids = [row[0] for row in conn.execute("SELECT id FROM jobs ORDER BY created_at")]
    database = target.open_jobs().database
    for job_id in ids:
        job = jobs.get(job_id)
        if job is None:
            continue
        if job.state in ("queued", "running"):
            summary.jobs_skipped_active += 1
            continue
        with database.connect() as conn:
            present = conn.execute("SELECT 1 FROM jobs WHERE id = %s", (job.id,)).fetchone() is not None
            if present:
                summary.jobs_present += 1
                continue
            summary.jobs_copied += 1
            if not dry_run:
                conn.execute(
                    "INSERT INTO jobs (id, kind, state, phase, progress, params, metrics, version, parent, error,"
                    " pid, replica, lease_until, created_at, updated_at, finished_at)"
                    " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, NULL, %s, now(), %s, %s, %s)"
                    " ON CONFLICT (id) DO NOTHING",
                    (job.id, job.kind, job.state, job.phase, job.progress, Jsonb(job.params or {}),
                     Jsonb(job.metrics) if job.metrics is not None else None, job.version, job.parent, job.error,
                     "copied from a single-machine home", job.created_at, job.updated_at, job.finished_at))


def _copy_predictions(source: State, target: SharedBackend, summary: CopySummary, dry_run: bool) -> None:
    from .local.predictions import SqlitePredictionStore
    from .predictions import NewPrediction, PredictionNotFoundError

    kept = source.predictions
    if not isinstance(kept, SqlitePredictionStore):
        raise TypeError("the source of a copy is a single-machine home")
    store = target.open_predictions()
    everything = kept.everything()
    for start in range(0, len(everything), _PREDICTION_CHUNK):
        chunk = everything[start : start + _PREDICTION_CHUNK]
        with store.database.connect() as conn:
            present = {row["id"] for row in conn.execute("SELECT id FROM predictions WHERE id = ANY(%s)",
                                                         ([p.prediction_id for p in chunk],)).fetchall()}
        summary.predictions_present += len(present)
        missing = [p for p in chunk if p.prediction_id not in present]
        new = []
        for p in missing:
            try:
                image = kept.read_image(p.prediction_id)
            except PredictionNotFoundError:  # deleted while the copy ran, or its image damaged
                log.warning("kept prediction %s lost its image; not copied", p.prediction_id)
                continue
            new.append(NewPrediction(p.prediction_id, image, p.version, p.label, p.score, p.margin,
                                     p.entropy, p.top_k, p.created_at, p.embedding))
        summary.predictions_copied += len(new)
        if not dry_run:
            store.add_many(new)


def prune_versions(registry: ModelRegistry, keep: int, *, dry_run: bool = False) -> list[str]:
    """Delete every version but the active one, its history and the newest ``keep``; returns the
    versions deleted (or, in a dry run, that would be)."""
    if keep < 0:
        raise ValueError("keep must be 0 or more")
    pointer = registry.active_pointer()
    kept = set((pointer.version, *pointer.previous) if pointer else ())
    names = [v.version for v in registry.versions()]
    kept |= set(names[len(names) - keep:] if keep else [])
    doomed = [name for name in names if name not in kept]
    if not dry_run:
        for name in doomed:
            registry.delete(name)
    return doomed


def seed_registry(seed_home: Path, registry: ModelRegistry) -> ModelVersion | None:
    """Register the active version of the state in ``seed_home`` (the serving images' model, made
    when the image was built) as the first version, unless ``registry`` already has one. Returns
    the new version, or None if nothing was needed. The seed must be a single-machine home."""
    if registry.versions():
        return None
    seed = DirectoryRegistry(seed_home).active()  # files only: the image's copy is read-only
    if seed is None:
        raise ModelError(f"{seed_home} holds no active model version to seed the state with")
    seed.verify()
    embeddings, targets = seed.training_embeddings()
    version = registry.register(
        onnx_file=seed.onnx_path, spec=seed.spec, metrics=seed.metrics, embeddings=embeddings,
        embedding_targets=targets, embedding_hashes=seed.training_hashes(), parent=None,
        dataset_fingerprint=seed.info.get("dataset_fingerprint"),
        details={**seed.info.get("details", {}), "seeded_from": f"{seed_home} ({seed.version})"},
        report_dir=seed.report_dir if seed.report_dir.is_dir() else None,
    )
    log.info("seeded the empty state with %s from %s", version.version, seed_home)
    return version
