"""The model registry of the shared backend: a catalogue of versions and the activations in
Postgres, the versions' files in the object store, and a verified local copy of each version a
replica uses.

A version's files go to ``versions/vN/`` in the object store, are read back and checked against
their checksums, and only then does one catalogue row make the version visible; they are never
overwritten (numbers come from a sequence and are never reused). Each replica keeps local copies
under ``$TRANSFER_SERVE_HOME/versions/vN`` (the single-machine layout) fetched and checked on
first use. A local copy found damaged when a worker verifies it is fetched again; only a version
whose stored files are damaged too makes the deployment fall back to another one.

The active version is the newest row of ``activations``; each activation is announced with
``NOTIFY`` so that every replica's watchers load it at once (polling remains the safety net), and
replicas report what they serve in ``replicas``.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cached_property
from pathlib import Path
from typing import Any

from models.errors import ModelError, VersionNotFoundError
from models.spec import ModelSpec

from ..files import fsync_tree, sha256_file
from ..registry import (
    COMPLETE_MARKER,
    HISTORY_LENGTH,
    INT8_ONNX_FILENAME,
    MANIFEST_FILENAME,
    REPLICA_TIMEOUT_S,
    ActivePointer,
    Fallback,
    ModelRegistry,
    ModelVersion,
    ReplicaStatus,
    VersionWriter,
    check_derived_files,
    manifest_bytes,
    read_manifest,
    version_number,
    version_summary,
)
from .database import ACTIVE_CHANNEL, PostgresDatabase
from .objects import ObjectStore

log = logging.getLogger(__name__)

#: pg_advisory_xact_lock key of registry writes that read before they write (a fall-back, add_files)
REGISTRY_LOCK = 0x74737277


@dataclass(frozen=True)
class CatalogueVersion:
    """A version as its catalogue row describes it (no files needed)."""

    version: str
    info: dict[str, Any]
    metrics: dict[str, Any]
    spec_json: dict[str, Any]
    manifest: dict[str, str]

    @property
    def number(self) -> int:
        return version_number(self.version)

    @cached_property
    def spec(self) -> ModelSpec:
        return ModelSpec.model_validate(self.spec_json)

    def summary(self) -> dict[str, Any]:
        return version_summary(self.version, self.info, self.metrics, self.spec)

    def has_int8(self) -> bool:
        return INT8_ONNX_FILENAME in self.manifest

    @classmethod
    def of(cls, row: Mapping[str, Any]) -> CatalogueVersion:
        return cls(f"v{row['number']}", row["info"], row["metrics"], row["spec"], row["manifest"])


def object_key(version: str, name: str) -> str:
    return f"versions/{version}/{name}"


class SharedRegistry(ModelRegistry):
    def __init__(self, database: PostgresDatabase, objects: ObjectStore, home: Path) -> None:
        self.database = database
        self.objects = objects
        self.cache = Path(home) / "versions"
        self.cache.mkdir(parents=True, exist_ok=True)
        self._listener: Any = None

    # -- the catalogue ----------------------------------------------------------------------------

    def _rows(self, number: int | None = None) -> list[CatalogueVersion]:
        where, values = ("WHERE number = %s", (number,)) if number is not None else ("", ())
        with self.database.connect() as conn:
            rows = conn.execute(f"SELECT number, manifest, info, metrics, spec FROM versions {where}"  # noqa: S608
                                " ORDER BY number", values).fetchall()
        return [CatalogueVersion.of(row) for row in rows]

    def versions(self) -> list[CatalogueVersion]:
        return self._rows()

    def _entry(self, version: str) -> CatalogueVersion:
        found = self._rows(version_number(version))
        if not found:
            known = ", ".join(v.version for v in self._rows()) or "none"
            raise VersionNotFoundError(f"no model version '{version}' (known versions: {known})")
        return found[0]

    # -- local copies -----------------------------------------------------------------------------

    def local_copy(self, version: str) -> ModelVersion | None:
        version_number(version)
        path = self.cache / version
        return ModelVersion(version, path) if (path / COMPLETE_MARKER).is_file() else None

    def get(self, version: str) -> ModelVersion:
        entry = self._entry(version)
        return self._local(entry.version, entry.manifest)

    @contextlib.contextmanager
    def _fetching(self, version: str) -> Iterator[None]:
        """One process of this replica fetches a version at a time."""
        with (self.cache / f".{version}.lock").open("a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def _local(self, version: str, manifest: Mapping[str, str], *, refetch: bool = False) -> ModelVersion:
        path = self.cache / version
        if not refetch and self._holds(path, version, manifest):
            return ModelVersion(version, path)
        with self._fetching(version):
            if refetch or not self._holds(path, version, manifest):
                self._fetch(version, manifest, path)
        return ModelVersion(version, path)

    @staticmethod
    def _holds(path: Path, version: str, manifest: Mapping[str, str]) -> bool:
        if not (path / COMPLETE_MARKER).is_file():
            return False
        try:
            return read_manifest(path, version) == dict(manifest)
        except ModelError:
            return False

    def _fetch(self, version: str, manifest: Mapping[str, str], path: Path) -> None:
        """Download every file of ``version``, check it against the catalogue's checksum, and put
        the copy in place in one rename."""
        staging = Path(tempfile.mkdtemp(prefix=f".fetch-{version}-", dir=self.cache))
        try:
            for name, digest in manifest.items():
                target = staging / name
                target.parent.mkdir(parents=True, exist_ok=True)
                self.objects.download(object_key(version, name), target)
                if sha256_file(target) != digest:
                    raise ModelError(f"version {version}: {name} in {self.objects.description} is corrupted "
                                     "(checksum mismatch)")
            (staging / MANIFEST_FILENAME).write_bytes(manifest_bytes(manifest))
            (staging / COMPLETE_MARKER).write_text(datetime.now(UTC).isoformat() + "\n")
            fsync_tree(staging)
            staging.chmod(0o755)
            if path.exists():
                aside = self.cache / f".old-{version}-{os.getpid()}"
                os.rename(path, aside)
                shutil.rmtree(aside, ignore_errors=True)
            os.rename(staging, path)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        log.info("fetched model version %s from %s", version, self.objects.description)

    # -- the active pointer -----------------------------------------------------------------------

    @staticmethod
    def _pointer(conn: Any) -> ActivePointer | None:
        rows = conn.execute("SELECT version, activated_at, fallback_from FROM activations ORDER BY id DESC"
                            " LIMIT %s", (10 * HISTORY_LENGTH,)).fetchall()
        if not rows:
            return None
        current = rows[0]
        previous = [row["version"] for row in rows[1:] if row["version"] != current["version"]]
        return ActivePointer(current["version"], current["activated_at"],
                             tuple(dict.fromkeys(previous))[:HISTORY_LENGTH], current["fallback_from"])

    def active_pointer(self) -> ActivePointer | None:
        with self.database.connect() as conn:
            return self._pointer(conn)

    @staticmethod
    def _activate(conn: Any, version: str, fallback_from: Mapping[str, Any] | None = None) -> None:
        from psycopg.types.json import Jsonb

        conn.execute("INSERT INTO activations (version, activated_at, fallback_from) VALUES (%s, %s, %s)",
                     (version, datetime.now(UTC).isoformat(), Jsonb(dict(fallback_from)) if fallback_from else None))
        conn.execute("SELECT pg_notify(%s, %s)", (ACTIVE_CHANNEL, version))  # delivered at commit

    def activate(self, version: str) -> ModelVersion:
        target = self.get(version)
        target.verify()
        with self.database.transaction() as conn:
            self._activate(conn, version)
        log.info("active model version is now %s", version)
        return target

    def fall_back(self, failed: str | None, reason: str) -> Fallback:
        if failed is not None:
            try:  # a damaged local copy is fetched again; the shared pointer stays
                entry = self._entry(failed)
                self._local(failed, entry.manifest, refetch=True).verify()
            except (ModelError, OSError) as exc:
                log.warning("model version %s is damaged in %s too: %s", failed, self.objects.description, exc)
            else:
                log.warning("the local copy of model version %s was damaged (%s); fetched it again", failed, reason)
                return Fallback(failed, reason, failed, switched=False)
        with self.database.transaction() as conn:
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (REGISTRY_LOCK,))
            pointer = self._pointer(conn)
            current = pointer.version if pointer else None
            if current != failed:  # another replica or worker fell back already, or someone activated
                return Fallback(failed, reason, current, switched=False)
            newest_first = [v.version for v in reversed(self._rows())]
            candidates = [v for v in dict.fromkeys([*(pointer.previous if pointer else ()), *newest_first])
                          if v != failed]
            for name in candidates:
                try:
                    self.get(name).verify()
                except (ModelError, OSError) as exc:
                    log.warning("model version %s cannot replace %s: %s", name, failed, exc)
                    continue
                self._activate(conn, name, {"version": failed, "reason": reason})
                return Fallback(failed, reason, name, switched=True)
        return Fallback(failed, reason, None, switched=False)

    # -- writing versions -------------------------------------------------------------------------

    def _upload(self, version: str, directory: Path, files: Mapping[str, str]) -> None:
        """Put ``files`` (name -> sha256) of ``directory`` in the object store and read each back."""
        for name, digest in files.items():
            self.objects.put_file(object_key(version, name), directory / name)
            if self.objects.sha256(object_key(version, name)) != digest:
                raise ModelError(f"version {version}: {name} did not arrive intact in {self.objects.description}")

    def _store_new(self, write: VersionWriter) -> ModelVersion:
        from psycopg.types.json import Jsonb

        with self.database.connect() as conn:
            number = int(conn.execute("SELECT nextval('version_numbers') AS n").fetchone()["n"])
        version, created_at = f"v{number}", datetime.now(UTC).isoformat()
        staging = Path(tempfile.mkdtemp(prefix=f".partial-{version}-", dir=self.cache))
        try:
            files = write(staging, version, created_at)
            self._upload(version, staging, files)
            written = ModelVersion(version, staging)
            with self.database.transaction() as conn:  # the row makes the version visible
                conn.execute("INSERT INTO versions (number, created_at, manifest, info, metrics, spec)"
                             " VALUES (%s, %s, %s, %s, %s, %s)",
                             (number, created_at, Jsonb(files), Jsonb(written.info), Jsonb(written.metrics),
                              Jsonb(written.spec.model_dump(mode="json"))))
            (staging / COMPLETE_MARKER).write_text(created_at + "\n")
            staging.chmod(0o755)
            os.rename(staging, self.cache / version)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return ModelVersion(version, self.cache / version)

    def import_version(self, source: ModelVersion) -> bool:
        """Copy a complete version from a single-machine home, keeping its number, files and
        metadata (``python -m store copy``). False if the catalogue already has that number with
        the same files; :class:`ModelError` if it has different ones."""
        from psycopg.types.json import Jsonb

        source.verify()
        manifest = source.manifest_files()
        existing = self._rows(source.number)
        if existing:
            if existing[0].manifest != manifest:
                raise ModelError(f"version {source.version} in the database is not the {source.version} being "
                                 "copied (other files): refusing to overwrite it")
            return False
        self._upload(source.version, source.path, manifest)
        with self.database.transaction() as conn:
            conn.execute("INSERT INTO versions (number, created_at, manifest, info, metrics, spec)"
                         " VALUES (%s, %s, %s, %s, %s, %s)",
                         (source.number, source.info.get("created_at") or datetime.now(UTC).isoformat(),
                          Jsonb(manifest), Jsonb(source.info), Jsonb(source.metrics),
                          Jsonb(source.spec.model_dump(mode="json"))))
            # later registrations number above every copied version
            conn.execute("SELECT setval('version_numbers', GREATEST(%s, (SELECT last_value FROM version_numbers)))",
                         (source.number,))
        return True

    def import_history(self, pointer: ActivePointer) -> bool:
        """Give a new deployment the activation history of a single-machine home (oldest first,
        the active version last). False (nothing done) if it has activations already."""
        with self.database.transaction() as conn:
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (REGISTRY_LOCK,))
            if self._pointer(conn) is not None:
                return False
            for version in [*reversed(pointer.previous), pointer.version]:
                self._activate(conn, version, pointer.fallback_from if version == pointer.version else None)
        return True

    def add_files(self, version: str, files: Mapping[str, Path]) -> ModelVersion:
        from psycopg.types.json import Jsonb

        target = self.get(version)
        check_derived_files(target, files)
        with self.database.transaction() as conn:
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (REGISTRY_LOCK,))
            manifest = self._entry(version).manifest
            target = self._local(version, manifest)
            target.verify()
            for name in files:
                if name in manifest:
                    raise ModelError(f"version {version} already has {name} (a version is immutable: a derived "
                                     "file can be added once)")
            added = {name: sha256_file(Path(source)) for name, source in files.items()}
            staging = Path(tempfile.mkdtemp(prefix=f".add-{version}-", dir=self.cache))
            try:
                for name, source in files.items():
                    shutil.copyfile(source, staging / name)
                self._upload(version, staging, added)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
            conn.execute("UPDATE versions SET manifest = manifest || %s WHERE number = %s",
                         (Jsonb(added), version_number(version)))
        log.info("added %s to model version %s", ", ".join(files), version)
        return self._local(version, {**manifest, **added})

    def delete(self, version: str) -> None:
        entry = self._entry(version)
        with self.database.transaction() as conn:
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (REGISTRY_LOCK,))
            pointer = self._pointer(conn)
            if pointer is not None and version in (pointer.version, *pointer.previous):
                raise ModelError(f"version {version} is active or in the active version's history: not deleted")
            conn.execute("DELETE FROM versions WHERE number = %s", (entry.number,))
        for name in entry.manifest:  # no row refers to them any more
            self.objects.delete(object_key(version, name))
        shutil.rmtree(self.cache / version, ignore_errors=True)
        log.info("deleted model version %s", version)

    # -- following the active version -----------------------------------------------------------

    def wait_for_change(self, timeout: float) -> None:
        """Wait for an activation's NOTIFY (or ``timeout``); without a database connection, sleep."""
        import time

        import psycopg

        if self._listener is None:
            self._listener = self.database.listener()
            if self._listener is None:
                time.sleep(timeout)
                return
        try:
            for _ in self._listener.notifies(timeout=timeout, stop_after=1):
                pass
        except psycopg.Error as exc:
            log.warning("lost the database connection that listens for activations (%s); reconnecting", exc)
            with contextlib.suppress(psycopg.Error):
                self._listener.close()
            self._listener = None
            time.sleep(min(timeout, 1.0))

    def report_serving(self, replica: str, version: str | None, variant: str | None) -> None:
        with self.database.connect() as conn:
            conn.execute("INSERT INTO replicas (id, version, variant, last_seen) VALUES (%s, %s, %s, now())"
                         " ON CONFLICT (id) DO UPDATE SET version = EXCLUDED.version, variant = EXCLUDED.variant,"
                         " last_seen = now()", (replica, version, variant))

    def replicas(self) -> list[ReplicaStatus]:
        with self.database.connect() as conn:
            rows = conn.execute("SELECT id, version, variant, last_seen FROM replicas"
                                " WHERE last_seen > now() - make_interval(secs => %s) ORDER BY id",
                                (REPLICA_TIMEOUT_S,)).fetchall()
        return [ReplicaStatus(row["id"], row["version"], row["variant"], row["last_seen"].astimezone(UTC).isoformat())
                for row in rows]
