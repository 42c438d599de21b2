"""The model registry: numbered model versions, the active pointer and its history.

A version (``v1``, ``v2``, ...) is immutable once registered, apart from derived files added once
(an INT8 variant). It holds ``model.onnx``, ``spec.json``, ``metrics.json``, ``version.json``
(parent, dataset fingerprint, creation time, training details), the training set's embeddings,
targets and image hashes (``.npy``, loaded without pickle), the report (``report/``) and
``manifest.json`` (sha256 of every file). A version becomes visible only once all of it is written
and flushed; numbers are never reused.

The active pointer names the version the service serves, when it was activated, and the versions
active before it (most recent first): when the active version turns out to be damaged,
:meth:`ModelRegistry.fall_back` goes back to the last one that was good. A version is made active
only after its files match their checksums and its graph matches its spec.

This module holds what every backend shares: the interface (:class:`ModelRegistry`), the view of a
version's files (:class:`ModelVersion`, always a local directory: a backend that keeps versions
elsewhere serves a verified local copy) and the manifest format.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from models.errors import ModelError, VersionNotFoundError
from models.onnx_io import check_onnx_contract, read_head
from models.retrain import ParentModel
from models.spec import SPEC_FILENAME, ModelSpec

from .files import sha256_file

log = logging.getLogger(__name__)

ONNX_FILENAME = "model.onnx"
#: The statically quantised (INT8, QDQ) variant of ``model.onnx``, added later by
#: ``python -m training quantize`` or a retrain job (:meth:`ModelRegistry.add_files`); same
#: inputs and outputs.
INT8_ONNX_FILENAME = "model.int8.onnx"
#: The figures of the INT8 variant's accuracy check, stored beside it.
INT8_REPORT_FILENAME = "model.int8.json"
METRICS_FILENAME = "metrics.json"
INFO_FILENAME = "version.json"
EMBEDDINGS_FILENAME = "embeddings.npy"
TARGETS_FILENAME = "embedding_targets.npy"
HASHES_FILENAME = "embedding_hashes.npy"
MANIFEST_FILENAME = "manifest.json"
#: Written last into a local version directory: a directory without it is incomplete.
COMPLETE_MARKER = "COMPLETE"
REPORT_DIRNAME = "report"
#: How many earlier activations the pointer remembers (candidates for a fall-back).
HISTORY_LENGTH = 20
VERSION_RE = re.compile(r"^v(\d+)$")


def version_number(version: str) -> int:
    """7 for ``v7``; :class:`VersionNotFoundError` for anything that is not a version name."""
    match = VERSION_RE.match(version)
    if not match:
        raise VersionNotFoundError(f"'{version}' is not a version name (versions look like v1, v2, ...)")
    return int(match.group(1))


def _read_json(path: Path, version: str) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelError(f"version {version}: unreadable {path.name} ({exc})") from exc


def read_manifest(directory: Path, version: str) -> dict[str, str]:
    """The files a version's manifest lists (relative name -> sha256).

    Raises:
        ModelError: the manifest is missing, unreadable, or lists no files.
    """
    manifest = _read_json(directory / MANIFEST_FILENAME, version)
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or not all(isinstance(v, str) for v in files.values()):
        raise ModelError(f"version {version}: {MANIFEST_FILENAME} is corrupted (no file list)")
    return files


def manifest_bytes(files: Mapping[str, str]) -> bytes:
    """The manifest listing ``files`` (relative name -> sha256)."""
    return json.dumps({"files": dict(files)}, indent=2, sort_keys=True).encode()


class StoredVersion(Protocol):
    """A version as a listing sees it: its name and catalogue data, without needing its files."""

    @property
    def version(self) -> str: ...

    @property
    def number(self) -> int: ...

    def summary(self) -> dict[str, Any]: ...

    def has_int8(self) -> bool: ...


@dataclass(frozen=True)
class ModelVersion:
    """One stored, complete model version: a read-only view of its local directory."""

    version: str
    path: Path

    @property
    def onnx_path(self) -> Path:
        return self.path / ONNX_FILENAME

    @property
    def int8_onnx_path(self) -> Path:
        return self.path / INT8_ONNX_FILENAME

    @property
    def report_dir(self) -> Path:
        return self.path / REPORT_DIRNAME

    @property
    def number(self) -> int:
        return version_number(self.version)

    def manifest_files(self) -> dict[str, str]:
        """The files the manifest lists (name -> sha256)."""
        return read_manifest(self.path, self.version)

    def has_int8(self) -> bool:
        """Whether an INT8 variant was added (and so checked with the version)."""
        return INT8_ONNX_FILENAME in self.manifest_files()

    @cached_property
    def spec(self) -> ModelSpec:
        try:
            return ModelSpec.from_json((self.path / SPEC_FILENAME).read_bytes())
        except (OSError, ValueError) as exc:
            raise ModelError(f"version {self.version}: unreadable {SPEC_FILENAME} ({exc})") from exc

    @cached_property
    def info(self) -> dict[str, Any]:
        info = _read_json(self.path / INFO_FILENAME, self.version)
        if not isinstance(info, dict):
            raise ModelError(f"version {self.version}: {INFO_FILENAME} is not a JSON object")
        return info

    @cached_property
    def metrics(self) -> dict[str, Any]:
        metrics = _read_json(self.path / METRICS_FILENAME, self.version)
        if not isinstance(metrics, dict):
            raise ModelError(f"version {self.version}: {METRICS_FILENAME} is not a JSON object")
        return metrics

    def training_embeddings(self) -> tuple[np.ndarray, np.ndarray]:
        """The training set's embeddings (N, D) float32 and targets (N,) int64, indices into
        ``spec.labels``. Loaded without pickle."""
        return self._array(EMBEDDINGS_FILENAME), self._array(TARGETS_FILENAME)

    def training_hashes(self) -> list[str]:
        """sha256 of the image behind each training embedding ('' where unknown)."""
        if not (self.path / HASHES_FILENAME).is_file():
            return [""] * len(self._array(TARGETS_FILENAME))
        return [str(h) for h in self._array(HASHES_FILENAME)]

    def _array(self, name: str) -> np.ndarray:
        """One of the version's ``.npy`` files, never unpickled; :class:`ModelError` if it is
        missing or damaged (an object array, a truncated file)."""
        try:
            return np.load(self.path / name, allow_pickle=False)
        except (OSError, ValueError, EOFError) as exc:
            raise ModelError(f"version {self.version}: {name} is unreadable ({exc})") from exc

    def verify(self) -> None:
        """Raise :class:`ModelError` if any file differs from the manifest or an ONNX graph does
        not match the spec. Run before a version is made active or served."""
        files = self.manifest_files()
        if ONNX_FILENAME not in files or SPEC_FILENAME not in files:
            raise ModelError(f"version {self.version}: {MANIFEST_FILENAME} is corrupted (no checksums "
                             f"of {ONNX_FILENAME} and {SPEC_FILENAME})")
        for name, expected in files.items():
            file = self.path / name
            if not file.is_file():
                raise ModelError(f"version {self.version}: {name} is missing")
            try:
                actual = sha256_file(file)
            except OSError as exc:
                raise ModelError(f"version {self.version}: {name} is unreadable ({exc})") from exc
            if actual != expected:
                raise ModelError(f"version {self.version}: {name} is corrupted (checksum mismatch)")
        check_onnx_contract(self.onnx_path, self.spec)
        if INT8_ONNX_FILENAME in files:
            check_onnx_contract(self.int8_onnx_path, self.spec)

    def summary(self) -> dict[str, Any]:
        return version_summary(self.version, self.info, self.metrics, self.spec)


#: The exporter of every graph made before versions recorded theirs (``training/export.py``).
LEGACY_EXPORTER = "torchscript"


def graph_exporter(info: Mapping[str, Any]) -> str:
    """Which ONNX exporter made a version's graph: what its details record (a fit's or bootstrap's
    parity check names it, a retrain inherits its parent's), else the one all older versions had."""
    details = info.get("details") or {}
    return str(details.get("exporter") or (details.get("onnx_parity") or {}).get("exporter") or LEGACY_EXPORTER)


def version_summary(version: str, info: Mapping[str, Any], metrics: Mapping[str, Any],
                    spec: ModelSpec) -> dict[str, Any]:
    """What a listing shows of a version."""
    return {
        "version": version,
        "created_at": info.get("created_at"),
        "parent": info.get("parent"),
        "strategy": (info.get("details") or {}).get("strategy"),
        "exporter": graph_exporter(info),
        "backbone": spec.backbone,
        "labels": list(spec.labels),
        "metrics": dict(metrics),
    }


#: Writes a new version's files into an empty directory, given its name and creation time;
#: returns the manifest's files (name -> sha256).
VersionWriter = Callable[[Path, str, str], dict[str, str]]


@dataclass(frozen=True)
class ActivePointer:
    """Which version is active, since when, and the versions active before it."""

    version: str
    activated_at: str | None = None
    previous: tuple[str, ...] = ()  #: most recent first, at most HISTORY_LENGTH
    #: set by a fall-back: the version that failed verification and why (``version``, ``reason``)
    fallback_from: Mapping[str, Any] | None = field(default=None)

    def history_after(self, version: str) -> tuple[str, ...]:
        """The ``previous`` list of the pointer that replaces this one with ``version``."""
        names = [self.version, *self.previous]
        return tuple(dict.fromkeys(n for n in names if n != version))[:HISTORY_LENGTH]


@dataclass(frozen=True)
class ReplicaStatus:
    """What one replica last said it serves."""

    id: str
    version: str | None
    variant: str | None
    last_seen: str  #: ISO 8601, UTC


#: A replica reports what it serves this often; one silent for REPLICA_TIMEOUT_S is dropped.
HEARTBEAT_S = 5.0
REPLICA_TIMEOUT_S = 3 * HEARTBEAT_S


@dataclass(frozen=True)
class Fallback:
    """What :meth:`ModelRegistry.fall_back` did about a version that failed verification."""

    failed: str | None  #: the version that failed (None: the pointer itself was unreadable)
    reason: str  #: what is wrong with it
    version: str | None  #: the version active now; None if no stored version verifies
    switched: bool  #: True if this call moved the pointer (False: another process already had)


class ModelRegistry(ABC):
    """Model versions and the active pointer of a deployment."""

    # -- reading ------------------------------------------------------------------------------

    @abstractmethod
    def versions(self) -> Sequence[StoredVersion]:
        """Complete versions, oldest first."""

    @abstractmethod
    def get(self, version: str) -> ModelVersion:
        """A complete version's files on this machine (fetched first if it has none);
        :class:`VersionNotFoundError` (naming the known ones) if there is none by that name."""

    @abstractmethod
    def local_copy(self, version: str) -> ModelVersion | None:
        """The version's files if this machine holds them, asking no one else (the prediction
        path uses this: it never waits on a database or an object store)."""

    @abstractmethod
    def active_pointer(self) -> ActivePointer | None:
        """The pointer; None if no version was ever activated; :class:`ModelError` if it cannot
        be read."""

    def active_version(self) -> str | None:
        pointer = self.active_pointer()
        return pointer.version if pointer else None

    def active(self) -> ModelVersion | None:
        version = self.active_version()
        return self.get(version) if version else None

    # -- writing ------------------------------------------------------------------------------

    @abstractmethod
    def activate(self, version: str) -> ModelVersion:
        """Verify ``version`` and make it the active one, atomically."""

    @abstractmethod
    def fall_back(self, failed: str | None, reason: str) -> Fallback:
        """The active version ``failed`` did not verify (``reason`` says why; ``failed`` is None
        if the pointer itself is unreadable): make the last good version active instead.

        The most recently active version that verifies wins, else the newest one that verifies.
        Only acts if the pointer still names ``failed``, so any number of workers may call it at
        once: one moves the pointer, the others find it moved (``switched`` False) and load what
        it names. If nothing verifies, the pointer is left as it is and ``version`` is None.
        """

    def register(
        self,
        *,
        onnx_file: Path,
        spec: ModelSpec,
        metrics: Mapping[str, Any],
        embeddings: np.ndarray,
        embedding_targets: np.ndarray,
        embedding_hashes: list[str] | None = None,
        parent: str | None,
        dataset_fingerprint: str | None,
        details: Mapping[str, Any] | None = None,
        report_dir: Path | None = None,
        activate: bool = False,
    ) -> ModelVersion:
        """Store a new version and return it; make it active if asked or if it is the first.
        The ONNX file is checked against the spec first: nothing is stored if they disagree."""
        embeddings, targets, hashes = check_new_version(spec, onnx_file, embeddings, embedding_targets,
                                                        embedding_hashes)

        def write(directory: Path, version: str, created_at: str) -> dict[str, str]:
            info = new_version_info(version, created_at, parent, dataset_fingerprint, details)
            return write_version(directory, info=info, onnx_file=onnx_file, spec=spec, metrics=metrics,
                                 embeddings=embeddings, targets=targets, hashes=hashes, report_dir=report_dir)

        stored = self._store_new(write)
        log.info("registered model version %s (%d labels)", stored.version, spec.num_classes)
        if activate or self.active_version() is None:
            self.activate(stored.version)
        return stored

    @abstractmethod
    def _store_new(self, write: VersionWriter) -> ModelVersion:
        """Give a new version the next number, have ``write`` put its files into an empty local
        directory, and make the version visible once all of them are stored."""

    @abstractmethod
    def add_files(self, version: str, files: Mapping[str, Path]) -> ModelVersion:
        """Add derived files (a quantised variant and its figures) to a complete version, which
        must verify first. A name the version already holds is refused, and an INT8 graph that
        does not meet the spec is refused before anything is written."""

    @abstractmethod
    def delete(self, version: str) -> None:
        """Remove a version that is neither active nor in the active pointer's history."""

    # -- following the active version -----------------------------------------------------------

    def wait_for_change(self, timeout: float) -> None:
        """Return when the active version may have changed, or after ``timeout`` seconds: the
        watchers of serving workers call this in a loop, then read the pointer."""
        time.sleep(timeout)

    @abstractmethod
    def report_serving(self, replica: str, version: str | None, variant: str | None) -> None:
        """Heartbeat: ``replica`` serves ``version`` (``variant``: fp32, int8, fp16)."""

    @abstractmethod
    def replicas(self) -> list[ReplicaStatus]:
        """The replicas heard from within :data:`REPLICA_TIMEOUT_S`, by id."""


def parent_model(version: ModelVersion) -> ParentModel:
    """What a job that starts from ``version`` needs of it: labels, head, training embeddings."""
    embeddings, targets = version.training_embeddings()
    weight, bias = read_head(version.onnx_path)
    return ParentModel(version.version, version.spec.labels, weight, bias, embeddings, targets,
                       version.training_hashes())


def check_new_version(spec: ModelSpec, onnx_file: Path, embeddings: np.ndarray, targets: np.ndarray,
                      hashes: list[str] | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """What :meth:`ModelRegistry.register` checks before it writes anything: the graph meets the
    spec, and the training embeddings, targets and hashes agree with it and with each other.
    Returns the three arrays as stored (float32, int64, 64-character strings)."""
    check_onnx_contract(onnx_file, spec)
    embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
    targets = np.ascontiguousarray(targets, dtype=np.int64)
    if embeddings.ndim != 2 or (len(embeddings) and embeddings.shape[1] != spec.embedding_size):
        raise ModelError(f"embeddings must be (N, {spec.embedding_size}), got {embeddings.shape}")
    if targets.shape != (len(embeddings),):
        raise ModelError("embedding targets must have one entry per embedding")
    hash_array = np.array(hashes if hashes is not None else [""] * len(embeddings), dtype="<U64")
    if hash_array.shape != (len(embeddings),):
        raise ModelError("embedding hashes must have one entry per embedding")
    if len(targets) and (targets.min() < 0 or targets.max() >= spec.num_classes):
        raise ModelError("embedding targets must index into the spec's labels")
    return embeddings, targets, hash_array


def check_derived_files(target: ModelVersion, files: Mapping[str, Path]) -> None:
    """What :meth:`ModelRegistry.add_files` checks before it writes anything: plain file names,
    and an INT8 graph that meets the version's spec."""
    for name, source in files.items():
        if not name or "/" in name or name.startswith("."):
            raise ModelError(f"{name!r} is not a plain file name")
        if name == INT8_ONNX_FILENAME:
            check_onnx_contract(source, target.spec)


def write_version(directory: Path, *, info: Mapping[str, Any], onnx_file: Path, spec: ModelSpec,
                  metrics: Mapping[str, Any], embeddings: np.ndarray, targets: np.ndarray, hashes: np.ndarray,
                  report_dir: Path | None) -> dict[str, str]:
    """Write a new version's files into the empty ``directory`` (the arrays as
    :func:`check_new_version` returned them), and its manifest; returns the manifest's files
    (name -> sha256)."""
    shutil.copyfile(onnx_file, directory / ONNX_FILENAME)
    (directory / SPEC_FILENAME).write_text(spec.to_json())
    (directory / METRICS_FILENAME).write_text(json.dumps(dict(metrics), indent=2))
    (directory / INFO_FILENAME).write_text(json.dumps(dict(info), indent=2))
    np.save(directory / EMBEDDINGS_FILENAME, embeddings, allow_pickle=False)
    np.save(directory / TARGETS_FILENAME, targets, allow_pickle=False)
    np.save(directory / HASHES_FILENAME, hashes, allow_pickle=False)
    if report_dir is not None:
        shutil.copytree(report_dir, directory / REPORT_DIRNAME)
    files = {str(p.relative_to(directory)): sha256_file(p) for p in sorted(directory.rglob("*")) if p.is_file()}
    (directory / MANIFEST_FILENAME).write_bytes(manifest_bytes(files))
    return files


def new_version_info(version: str, created_at: str, parent: str | None, dataset_fingerprint: str | None,
                     details: Mapping[str, Any] | None) -> dict[str, Any]:
    """``version.json`` of a new version."""
    return {"version": version, "created_at": created_at, "parent": parent,
            "dataset_fingerprint": dataset_fingerprint, "details": dict(details or {})}
