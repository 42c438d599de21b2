"""The versioned model registry, built on BentoML's model store.

Each version is a BentoML model ``transfer-serve:vN`` in ``$TRANSFER_SERVE_HOME/bentoml/models``
holding ``model.onnx``, ``spec.json``, ``metrics.json``, ``version.json`` (parent, dataset
fingerprint, creation time, training details), the training set's embeddings and targets
(``embeddings.npy``, ``embedding_targets.npy``), the report (``report/``) and ``manifest.json``
(sha256 of every file). A version counts only once its ``COMPLETE`` marker exists, which is
written after everything else, so a crash mid-write never leaves a usable half-version. The
active version is a pointer file replaced atomically (write to a temporary file, then rename),
under a file lock. The pointer also keeps a short activation history, so that when the active
version turns out to be corrupted (see :meth:`ModelRegistry.fall_back`) the service can go back
to the last version that was good.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ModelError, VersionNotFoundError
from .onnx_io import check_onnx_contract
from .paths import write_atomic
from .spec import SPEC_FILENAME, ModelSpec

os.environ.setdefault("BENTOML_DO_NOT_TRACK", "True")  # no usage analytics from a private service

log = logging.getLogger(__name__)

MODEL_NAME = "transfer-serve"
ONNX_FILENAME = "model.onnx"
#: The statically quantised (INT8, QDQ) variant of ``model.onnx``, added later by
#: ``python -m training quantize`` (:meth:`ModelRegistry.add_files`); same inputs and outputs.
INT8_ONNX_FILENAME = "model.int8.onnx"
#: The figures of the INT8 variant's accuracy check, stored beside it.
INT8_REPORT_FILENAME = "model.int8.json"
#: Top-1 accuracy an INT8 variant may lose against fp32 on its check images (0.5 percentage
#: points, the issue's target); a variant that loses more is not added.
INT8_MAX_ACCURACY_LOSS = 0.005
METRICS_FILENAME = "metrics.json"
INFO_FILENAME = "version.json"
EMBEDDINGS_FILENAME = "embeddings.npy"
TARGETS_FILENAME = "embedding_targets.npy"
HASHES_FILENAME = "embedding_hashes.npy"
MANIFEST_FILENAME = "manifest.json"
COMPLETE_MARKER = "COMPLETE"
REPORT_DIRNAME = "report"
POINTER_FILENAME = "active_version.json"
#: How many earlier activations the pointer remembers (candidates for a fall-back).
HISTORY_LENGTH = 20
_VERSION_RE = re.compile(r"^v(\d+)$")


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON so readers see the old file or the new one, never a torn one."""
    write_atomic(path, json.dumps(data, indent=2, sort_keys=True).encode())


@dataclass(frozen=True)
class ModelVersion:
    """One stored, complete model version (read-only view of its directory)."""

    version: str
    path: Path

    @property
    def onnx_path(self) -> Path:
        return self.path / ONNX_FILENAME

    @property
    def int8_onnx_path(self) -> Path:
        return self.path / INT8_ONNX_FILENAME

    def manifest_files(self) -> dict[str, str]:
        """The files the manifest lists (name -> sha256)."""
        manifest = _read_json(self.path / MANIFEST_FILENAME, self.version)
        files = manifest.get("files") if isinstance(manifest, dict) else None
        if not isinstance(files, dict):
            raise ModelError(f"version {self.version}: {MANIFEST_FILENAME} is corrupted (no file list)")
        return files

    @property
    def report_dir(self) -> Path:
        return self.path / REPORT_DIRNAME

    @cached_property
    def spec(self) -> ModelSpec:
        try:
            return ModelSpec.from_json((self.path / SPEC_FILENAME).read_bytes())
        except (OSError, ValueError) as exc:
            raise ModelError(f"version {self.version}: unreadable {SPEC_FILENAME} ({exc})") from exc

    @cached_property
    def info(self) -> dict[str, Any]:
        return _read_json(self.path / INFO_FILENAME, self.version)

    @cached_property
    def metrics(self) -> dict[str, Any]:
        return _read_json(self.path / METRICS_FILENAME, self.version)

    @property
    def number(self) -> int:
        return _version_number(self.version)

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
        """Raise :class:`ModelError` if any file differs from the manifest or the ONNX graph does
        not match the spec. Run before a version is made active."""
        manifest = _read_json(self.path / MANIFEST_FILENAME, self.version)
        files = manifest.get("files") if isinstance(manifest, dict) else None
        if not isinstance(files, dict) or ONNX_FILENAME not in files or SPEC_FILENAME not in files:
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
        info = self.info
        return {
            "version": self.version,
            "created_at": info.get("created_at"),
            "parent": info.get("parent"),
            "strategy": info.get("details", {}).get("strategy"),
            "backbone": self.spec.backbone,
            "labels": list(self.spec.labels),
            "metrics": self.metrics,
        }


@dataclass(frozen=True)
class Fallback:
    """What :meth:`ModelRegistry.fall_back` did about a version that failed verification."""

    failed: str | None  #: the version that failed (None: the pointer itself was unreadable)
    reason: str  #: what is wrong with it
    version: str | None  #: the version active now; None if no stored version verifies
    switched: bool  #: True if this call moved the pointer (False: another process already had)


def _read_json(path: Path, version: str) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelError(f"version {version}: unreadable {path.name} ({exc})") from exc


def _version_number(version: str) -> int:
    match = _VERSION_RE.match(version)
    if not match:
        raise VersionNotFoundError(f"'{version}' is not a version name (versions look like v1, v2, ...)")
    return int(match.group(1))


class ModelRegistry:
    """Model versions and the active pointer under one state directory."""

    def __init__(self, home: str | os.PathLike[str]) -> None:
        from bentoml._internal.models import ModelStore  # the store class bentoml.models uses

        self.home = Path(home)
        self.store_path = self.home / "bentoml" / "models"
        self.store_path.mkdir(parents=True, exist_ok=True)
        self._store = ModelStore(self.store_path)
        self._pointer = self.home / POINTER_FILENAME
        self._lock_path = self.home / ".registry.lock"

    # -- reading ------------------------------------------------------------------------------

    def _version_dirs(self) -> Iterator[tuple[str, Path]]:
        root = self.store_path / MODEL_NAME
        if not root.is_dir():
            return
        for child in root.iterdir():
            if child.is_dir() and _VERSION_RE.match(child.name):
                yield child.name, child

    def versions(self) -> list[ModelVersion]:
        """Complete versions, oldest first."""
        found = [
            ModelVersion(name, path)
            for name, path in self._version_dirs()
            if (path / COMPLETE_MARKER).is_file()
        ]
        return sorted(found, key=lambda v: v.number)

    def get(self, version: str) -> ModelVersion:
        _version_number(version)
        path = self.store_path / MODEL_NAME / version
        if not (path / COMPLETE_MARKER).is_file():
            known = ", ".join(v.version for v in self.versions()) or "none"
            raise VersionNotFoundError(f"no model version '{version}' (known versions: {known})")
        return ModelVersion(version, path)

    def is_empty(self) -> bool:
        return not self.versions()

    def active_pointer(self) -> dict[str, Any] | None:
        """The pointer record: ``version``, ``activated_at``, ``previous`` (earlier active
        versions, most recent first) and, after a fall-back, ``fallback_from`` (``version``,
        ``reason``). None if no version was ever activated."""
        try:
            pointer = json.loads(self._pointer.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise ModelError(f"active pointer {self._pointer} is unreadable ({exc})") from exc
        if not isinstance(pointer, dict) or not isinstance(pointer.get("version"), str):
            raise ModelError(f"active pointer {self._pointer} is unreadable (no version in it)")
        return pointer

    def active_version(self) -> str | None:
        pointer = self.active_pointer()
        return pointer["version"] if pointer else None

    def active(self) -> ModelVersion | None:
        version = self.active_version()
        return self.get(version) if version else None

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

    def _remove_cut_short(self) -> None:
        """Remove the version directories whose registration was cut short (no completion
        marker: the writer was killed). Call with the lock held: every registration runs under
        it from start to marker, so an incomplete directory seen then is no one's work in
        progress."""
        for name, path in list(self._version_dirs()):
            if not (path / COMPLETE_MARKER).is_file():
                log.warning("removing %s: a registration that was cut short (no %s marker)", name, COMPLETE_MARKER)
                shutil.rmtree(path, ignore_errors=True)

    def _write_pointer(self, version: str, fallback_from: Mapping[str, Any] | None = None) -> None:
        """Point at ``version``, remembering the version it replaces. Call with the lock held."""
        try:
            current = self.active_pointer()
        except ModelError:  # an unreadable pointer has no history worth keeping
            current = None
        previous: list[str] = []
        if current is not None:
            earlier = current.get("previous")
            names = [current["version"], *(earlier if isinstance(earlier, list) else [])]
            for name in names:
                if isinstance(name, str) and name != version and name not in previous:
                    previous.append(name)
        pointer: dict[str, Any] = {
            "version": version,
            "activated_at": datetime.now(timezone.utc).isoformat(),
            "previous": previous[:HISTORY_LENGTH],
        }
        if fallback_from is not None:
            pointer["fallback_from"] = dict(fallback_from)
        write_json_atomic(self._pointer, pointer)

    def activate(self, version: str) -> ModelVersion:
        """Verify ``version`` and make it the active one (atomic pointer swap)."""
        target = self.get(version)
        target.verify()
        with self._locked():
            self._write_pointer(version)
        log.info("active model version is now %s", version)
        return target

    def fall_back(self, failed: str | None, reason: str) -> Fallback:
        """The active version ``failed`` did not verify (``reason`` says why; ``failed`` is None
        if the pointer itself is unreadable): make the last good version active instead.

        The most recently active version that verifies wins, else the newest one that verifies.
        Runs under the registry lock and only acts if the pointer still names ``failed``, so any
        number of workers may call it at once: one moves the pointer, the others find it moved
        (``switched`` False) and load what it names. If nothing verifies, the pointer is left
        as it is and ``version`` is None.
        """
        with self._locked():
            try:
                pointer = self.active_pointer()
            except ModelError:
                pointer = None
                if failed is not None:  # unreadable now, yet the caller read it: fall back anyway
                    log.warning("active pointer became unreadable while falling back from %s", failed)
            else:
                current = pointer["version"] if pointer else None
                if current != failed:  # another worker fell back already, or someone activated
                    return Fallback(failed, reason, current, switched=False)
            earlier = pointer.get("previous") if pointer else None
            history = [v for v in (earlier if isinstance(earlier, list) else []) if isinstance(v, str)]
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
        """Add derived files (a quantised variant and its figures) to a complete version, which
        must verify first. A version is otherwise immutable: a name it already holds is refused,
        and an INT8 graph that does not meet the spec is refused before anything is written.

        Under the registry lock, each file is copied in atomically, then the manifest is replaced
        atomically with their checksums added, so a reader (a worker verifying the version) sees
        the old manifest or the new one, and every file either lists is complete."""
        target = self.get(version)
        for name, source in files.items():
            if not name or "/" in name or name.startswith("."):
                raise ModelError(f"{name!r} is not a plain file name")
            if name == INT8_ONNX_FILENAME:
                check_onnx_contract(source, target.spec)
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
            manifest = json.dumps({"files": {**listed, **added}}, indent=2, sort_keys=True).encode()
            write_atomic(target.path / MANIFEST_FILENAME, manifest, mode)
        log.info("added %s to model version %s", ", ".join(files), version)
        return target

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

        The ONNX file is checked against the spec first: nothing is stored if they disagree.
        """
        import bentoml

        check_onnx_contract(onnx_file, spec)
        embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
        embedding_targets = np.ascontiguousarray(embedding_targets, dtype=np.int64)
        if embeddings.ndim != 2 or (len(embeddings) and embeddings.shape[1] != spec.embedding_size):
            raise ModelError(
                f"embeddings must be (N, {spec.embedding_size}), got {embeddings.shape}"
            )
        if embedding_targets.shape != (len(embeddings),):
            raise ModelError("embedding targets must have one entry per embedding")
        hashes = np.array(embedding_hashes if embedding_hashes is not None else [""] * len(embeddings), dtype="<U64")
        if hashes.shape != (len(embeddings),):
            raise ModelError("embedding hashes must have one entry per embedding")
        if len(embedding_targets) and (
            embedding_targets.min() < 0 or embedding_targets.max() >= spec.num_classes
        ):
            raise ModelError("embedding targets must index into the spec's labels")

        with self._locked():
            numbers = [_version_number(name) for name, _ in self._version_dirs()]
            version = f"v{max(numbers, default=0) + 1}"  # above every number used, cut short or not
            self._remove_cut_short()
            created_at = datetime.now(timezone.utc).isoformat()
            info = {
                "version": version,
                "created_at": created_at,
                "parent": parent,
                "dataset_fingerprint": dataset_fingerprint,
                "details": dict(details or {}),
            }
            with bentoml.models.create(
                f"{MODEL_NAME}:{version}",
                labels={"parent": parent or "none", "backbone": spec.backbone},
                metadata={"num_classes": spec.num_classes, "dataset_fingerprint": dataset_fingerprint or ""},
                _model_store=self._store,
            ) as bento_model:
                staging = Path(bento_model.path)
                shutil.copyfile(onnx_file, staging / ONNX_FILENAME)
                (staging / SPEC_FILENAME).write_text(spec.to_json())
                (staging / METRICS_FILENAME).write_text(json.dumps(dict(metrics), indent=2))
                (staging / INFO_FILENAME).write_text(json.dumps(info, indent=2))
                np.save(staging / EMBEDDINGS_FILENAME, embeddings, allow_pickle=False)
                np.save(staging / TARGETS_FILENAME, embedding_targets, allow_pickle=False)
                np.save(staging / HASHES_FILENAME, hashes, allow_pickle=False)
                if report_dir is not None:
                    shutil.copytree(report_dir, staging / REPORT_DIRNAME)
                files = {
                    str(p.relative_to(staging)): sha256_file(p)
                    for p in sorted(staging.rglob("*"))
                    if p.is_file() and p.name != "model.yaml"
                }
                (staging / MANIFEST_FILENAME).write_text(json.dumps({"files": files}, indent=2))
            final = self.store_path / MODEL_NAME / version
            _fsync_tree(final)
            (final / COMPLETE_MARKER).write_text(created_at + "\n")
        stored = ModelVersion(version, final)
        log.info("registered model version %s (%d labels)", version, spec.num_classes)
        if activate or self.active_version() is None:
            self.activate(version)
        return stored


def _fsync_tree(root: Path) -> None:
    """Flush a freshly written version to disk before it is marked complete."""
    for path in root.rglob("*"):
        if path.is_file():
            with path.open("rb") as fh:
                os.fsync(fh.fileno())
