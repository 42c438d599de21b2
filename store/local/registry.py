"""The model registry of the single-machine backend: plain directories under
``$TRANSFER_SERVE_HOME/versions/vN`` and a pointer file, ``active_version.json``.

Why not BentoML's model store, which held the versions up to eb365a9: its public API
(``bentoml.models.create`` / ``get`` / ``list``) works only on the one store under
``$BENTOML_HOME``; pointing it at the state directory took a private class
(``bentoml._internal.models.ModelStore``), which any BentoML release may change. And it bought
nothing: the service never loads a version through BentoML (it opens the ONNX file with
onnxruntime), Bentos do not carry the versions (they live in the state volume), and numbering,
listing, completion markers, checksums and the active pointer were ours anyway. So a version is a
directory we write ourselves.

Registration runs under a file lock from start to end: the files go into a hidden staging
directory, are flushed to disk with their manifest and a ``COMPLETE`` marker, and the directory is
renamed to ``vN`` in one step. Numbers are never reused: the next number is above every version
directory and every staging directory left by a registration that was cut short, and those are
removed (under the lock, so none is in progress) by the next registration. The pointer is a JSON
file replaced atomically, under the same lock.

A state directory written by eb365a9 or earlier keeps its versions in BentoML's layout
(``bentoml/models/transfer-serve/vN``, each with BentoML's ``model.yaml`` beside our files, and a
``latest`` file). The first process to open it moves each version directory to ``versions/`` (a
rename: the files, their manifest and checksums are unchanged; ``model.yaml`` stays, unlisted and
unused) and removes BentoML's empty directories.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from models.errors import ModelError, VersionNotFoundError

from ..files import fsync_dir, fsync_tree, sha256_file, write_atomic, write_json_atomic
from ..registry import (
    COMPLETE_MARKER,
    MANIFEST_FILENAME,
    REPLICA_TIMEOUT_S,
    VERSION_RE,
    ActivePointer,
    Fallback,
    ModelRegistry,
    ModelVersion,
    ReplicaStatus,
    VersionWriter,
    check_derived_files,
    manifest_bytes,
    version_number,
)

log = logging.getLogger(__name__)

VERSIONS_DIRNAME = "versions"
POINTER_FILENAME = "active_version.json"
LOCK_FILENAME = ".registry.lock"
#: one heartbeat file per replica (on one machine: one per service started on this home)
REPLICAS_DIRNAME = "replicas"
#: Staging directories are named ``.partial-vN-<random>``.
_STAGING_PREFIX = ".partial-"
#: Where eb365a9 and earlier kept the versions (BentoML's model store layout), relative to home.
LEGACY_VERSIONS = Path("bentoml") / "models" / "transfer-serve"


class DirectoryRegistry(ModelRegistry):
    """Model versions and the active pointer under one state directory."""

    def __init__(self, home: str | os.PathLike[str]) -> None:
        self.home = Path(home)
        self.versions_dir = self.home / VERSIONS_DIRNAME
        self.versions_dir.mkdir(parents=True, exist_ok=True)
        self._pointer = self.home / POINTER_FILENAME
        self._lock_path = self.home / LOCK_FILENAME
        self._replicas_dir = self.home / REPLICAS_DIRNAME
        if (self.home / LEGACY_VERSIONS).is_dir():
            with self._locked():
                adopt_legacy_versions(self.home)

    # -- reading ------------------------------------------------------------------------------

    def _version_dirs(self) -> Iterator[tuple[str, Path]]:
        for child in self.versions_dir.iterdir():
            if child.is_dir() and VERSION_RE.match(child.name):
                yield child.name, child

    def versions(self) -> list[ModelVersion]:
        found = [ModelVersion(name, path) for name, path in self._version_dirs()
                 if (path / COMPLETE_MARKER).is_file()]
        return sorted(found, key=lambda v: v.number)

    def get(self, version: str) -> ModelVersion:
        version_number(version)
        path = self.versions_dir / version
        if not (path / COMPLETE_MARKER).is_file():
            known = ", ".join(v.version for v in self.versions()) or "none"
            raise VersionNotFoundError(f"no model version '{version}' (known versions: {known})")
        return ModelVersion(version, path)

    def local_copy(self, version: str) -> ModelVersion | None:
        try:
            return self.get(version)
        except VersionNotFoundError:
            return None

    def active_pointer(self) -> ActivePointer | None:
        try:
            record = json.loads(self._pointer.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise ModelError(f"active pointer {self._pointer} is unreadable ({exc})") from exc
        if not isinstance(record, dict) or not isinstance(record.get("version"), str):
            raise ModelError(f"active pointer {self._pointer} is unreadable (no version in it)")
        previous = record.get("previous")
        fallback = record.get("fallback_from")
        return ActivePointer(
            version=record["version"],
            activated_at=str(record["activated_at"]) if record.get("activated_at") is not None else None,
            previous=tuple(v for v in previous if isinstance(v, str)) if isinstance(previous, list) else (),
            fallback_from=dict(fallback) if isinstance(fallback, dict) else None,
        )

    # -- writing ------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.home.mkdir(parents=True, exist_ok=True)
        with self._lock_path.open("a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def _write_pointer(self, version: str, fallback_from: Mapping[str, Any] | None = None) -> None:
        """Point at ``version``, remembering the version it replaces. Call with the lock held."""
        try:
            current = self.active_pointer()
        except ModelError:  # an unreadable pointer has no history worth keeping
            current = None
        record: dict[str, Any] = {
            "version": version,
            "activated_at": datetime.now(UTC).isoformat(),
            "previous": list(current.history_after(version)) if current else [],
        }
        if fallback_from is not None:
            record["fallback_from"] = dict(fallback_from)
        write_json_atomic(self._pointer, record)

    def activate(self, version: str) -> ModelVersion:
        target = self.get(version)
        target.verify()
        with self._locked():
            self._write_pointer(version)
        log.info("active model version is now %s", version)
        return target

    def fall_back(self, failed: str | None, reason: str) -> Fallback:
        with self._locked():
            try:
                pointer = self.active_pointer()
            except ModelError:
                pointer = None
                if failed is not None:  # unreadable now, yet the caller read it: fall back anyway
                    log.warning("active pointer became unreadable while falling back from %s", failed)
            else:
                current = pointer.version if pointer else None
                if current != failed:  # another worker fell back already, or someone activated
                    return Fallback(failed, reason, current, switched=False)
            history = list(pointer.previous) if pointer else []
            newest_first = [v.version for v in reversed(self.versions())]
            candidates = [v for v in dict.fromkeys(history + newest_first) if v != failed]
            for name in candidates:
                try:
                    self.get(name).verify()
                except (ModelError, OSError) as exc:
                    log.warning("model version %s cannot replace %s: %s", name, failed, exc)
                    continue
                self._write_pointer(name, fallback_from={"version": failed, "reason": reason})
                return Fallback(failed, reason, name, switched=True)
        return Fallback(failed, reason, None, switched=False)

    def add_files(self, version: str, files: Mapping[str, Path]) -> ModelVersion:
        """See :meth:`ModelRegistry.add_files`. Under the registry lock, each file is copied in
        atomically, then the manifest is replaced atomically with their checksums added, so a
        reader (a worker verifying the version) sees the old manifest or the new one, and every
        file either lists is complete."""
        target = self.get(version)
        check_derived_files(target, files)
        with self._locked():
            target.verify()
            listed = target.manifest_files()
            for name in files:
                if name in listed or (target.path / name).exists():
                    raise ModelError(f"version {version} already has {name} (a version is immutable: "
                                     "a derived file can be added once)")
            # the new files get the version's own permissions (mkstemp's 0600 would lock out a
            # service running as another user), set before the rename so no reader sees less
            mode = (target.path / MANIFEST_FILENAME).stat().st_mode & 0o777
            added = {}
            for name, source in files.items():
                write_atomic(target.path / name, Path(source).read_bytes(), mode)
                added[name] = sha256_file(target.path / name)
            write_atomic(target.path / MANIFEST_FILENAME, manifest_bytes({**listed, **added}), mode)
        log.info("added %s to model version %s", ", ".join(files), version)
        return target

    def delete(self, version: str) -> None:
        with self._locked():
            target = self.get(version)
            pointer = self.active_pointer()
            if pointer is not None and version in (pointer.version, *pointer.previous):
                raise ModelError(f"version {version} is active or in the active version's history: not deleted")
            aside = self.versions_dir / f"{_STAGING_PREFIX}deleted-{version}"  # invisible at once, then removed
            os.rename(target.path, aside)
            shutil.rmtree(aside, ignore_errors=True)
        log.info("deleted model version %s", version)

    def report_serving(self, replica: str, version: str | None, variant: str | None) -> None:
        self._replicas_dir.mkdir(parents=True, exist_ok=True)
        record = {"id": replica, "version": version, "variant": variant,
                  "last_seen": datetime.now(UTC).isoformat()}
        name = hashlib.sha256(replica.encode()).hexdigest()[:16] + ".json"  # any id, a safe file name
        write_json_atomic(self._replicas_dir / name, record, 0o644)

    def replicas(self) -> list[ReplicaStatus]:
        found = []
        now = datetime.now(UTC)
        for path in self._replicas_dir.glob("*.json") if self._replicas_dir.is_dir() else ():
            try:
                record = json.loads(path.read_text())
                last_seen = datetime.fromisoformat(record["last_seen"])
            except (OSError, ValueError, KeyError, TypeError):
                continue
            if (now - last_seen).total_seconds() <= REPLICA_TIMEOUT_S:
                found.append(ReplicaStatus(str(record["id"]), record.get("version"), record.get("variant"),
                                           record["last_seen"]))
        return sorted(found, key=lambda r: r.id)

    def _next_number(self) -> int:
        """Above every version and staging directory, complete or cut short."""
        numbers = [version_number(name) for name, _ in self._version_dirs()]
        for child in self.versions_dir.glob(_STAGING_PREFIX + "v*"):
            with contextlib.suppress(VersionNotFoundError, IndexError):
                numbers.append(version_number(child.name[len(_STAGING_PREFIX):].split("-")[0]))
        return max(numbers, default=0) + 1

    def _remove_cut_short(self) -> None:
        """Remove what registrations that were cut short (the writer was killed) left: staging
        directories, and version directories without a completion marker (from before
        versions were renamed into place). Call with the lock held: every registration runs under
        it from start to end, so anything incomplete seen then is no one's work in progress."""
        leftovers = [path for _, path in self._version_dirs() if not (path / COMPLETE_MARKER).is_file()]
        leftovers += [path for path in self.versions_dir.glob(_STAGING_PREFIX + "*") if path.is_dir()]
        for path in leftovers:
            log.warning("removing %s: a registration that was cut short", path.name)
            shutil.rmtree(path, ignore_errors=True)

    def _store_new(self, write: VersionWriter) -> ModelVersion:
        with self._locked():
            version = f"v{self._next_number()}"
            self._remove_cut_short()
            created_at = datetime.now(UTC).isoformat()
            staging = Path(tempfile.mkdtemp(prefix=f"{_STAGING_PREFIX}{version}-", dir=self.versions_dir))
            try:
                staging.chmod(0o755)  # mkdtemp's 0700 would lock out a service running as another user
                write(staging, version, created_at)
                (staging / COMPLETE_MARKER).write_text(created_at + "\n")
                fsync_tree(staging)
                final = self.versions_dir / version
                os.rename(staging, final)
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
            fsync_dir(self.versions_dir)
        return ModelVersion(version, final)

def adopt_legacy_versions(home: Path) -> int:
    """Move the versions that eb365a9 and earlier kept in BentoML's store layout to
    ``versions/``, then remove BentoML's directories if nothing else is in them. Call with the
    registry lock held. Returns how many versions moved."""
    legacy = home / LEGACY_VERSIONS
    if not legacy.is_dir():
        return 0
    destination = home / VERSIONS_DIRNAME
    destination.mkdir(parents=True, exist_ok=True)
    moved = 0
    for child in sorted(legacy.iterdir()):
        if not (child.is_dir() and VERSION_RE.match(child.name)):
            continue
        if (destination / child.name).exists():
            log.error("both %s and %s exist: keeping the second, leaving the first where it is; "
                      "compare them and remove one", child, destination / child.name)
            continue
        os.rename(child, destination / child.name)
        moved += 1
    with contextlib.suppress(FileNotFoundError):
        (legacy / "latest").unlink()  # BentoML's tag of the newest version
    for directory in (legacy, legacy.parent, legacy.parent.parent):  # transfer-serve, models, bentoml
        with contextlib.suppress(OSError):  # not empty: something else lives there; leave it
            directory.rmdir()
    if moved:
        fsync_dir(destination)
        log.info("moved %d model version(s) from BentoML's store layout (%s) to %s", moved, legacy, destination)
    return moved
