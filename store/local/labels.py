"""The label store of the single-machine backend: image files under
``$TRANSFER_SERVE_HOME/labels/images/<2 hex>/<sha256>`` and one row per image in the SQLite table
``images`` (label, size, pixel dimensions).

Files are written atomically (temporary file, fsync, rename) before their row is committed, and
a file is only removed inside the transaction that removes its row, so any number of threads and
processes can add and delete at once and every row has its file.
"""

from __future__ import annotations

import logging
import os
import secrets
import sqlite3
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ..errors import storage_errors, storage_failure
from ..files import write_unless_present
from ..labels import (
    AddResult,
    CheckedImage,
    ImageNotFoundError,
    LabelledImage,
    LabelStore,
    is_image_id,
    validate_domain,
    validate_label,
)
from .database import Database

log = logging.getLogger(__name__)


def _now() -> str:
    return datetime.now(UTC).isoformat()


class SqliteLabelStore(LabelStore):
    """Labelled images under ``home``: files in ``home/labels/images``, rows in ``database``.
    Each call opens its own database connection and closes it before returning."""

    def __init__(self, home: Path, database: Database) -> None:
        self.home = Path(home)
        self.images_dir = self.home / "labels" / "images"
        self.database = database
        with storage_errors("opening the label store"):
            self.images_dir.mkdir(parents=True, exist_ok=True)

    # -- paths --------------------------------------------------------------------------------

    def path_of(self, image_id: str) -> Path:
        """The file an image id maps to (whether or not it is stored).

        Raises:
            ImageNotFoundError: ``image_id`` is not 64 lowercase hex digits, so it names no image
                (and no path is built from it).
        """
        if not is_image_id(image_id):
            raise ImageNotFoundError(f"{image_id!r} is not an image id (64 lowercase hex digits)")
        return self.images_dir / image_id[:2] / image_id

    # -- writing ------------------------------------------------------------------------------

    def add_many(self, images: Sequence[CheckedImage], label: str, domain: str | None = None) -> list[AddResult]:
        """See :meth:`LabelStore.add_many`. If any image cannot be written, no row is committed
        and no file this call wrote is left behind."""
        validate_label(label)
        validate_domain(domain)
        checked = list(images)
        written: set[str] = set()  # image ids whose file this call created
        try:
            # The writes (and their fsyncs) happen outside the database lock so that concurrent
            # uploads of different images do not queue behind each other's disk flushes.
            for image in checked:
                if write_unless_present(self.path_of(image.image_id), image.data):
                    written.add(image.image_id)
            now = _now()
            results = []
            with self.database.transaction() as conn:
                for image in checked:
                    # A delete of these same bytes may have run between the write and here; with
                    # the write lock held nobody can remove the file again before the row is
                    # committed.
                    if write_unless_present(self.path_of(image.image_id), image.data):
                        written.add(image.image_id)
                    results.append(self._upsert(conn, image.image_id, label, domain, len(image.data),
                                                image.width, image.height, now))
        except Exception as exc:
            failure = storage_failure(exc, "storing the labelled image" + ("s" if len(checked) > 1 else ""))
            self._remove_unreferenced(written)
            if failure is None:
                raise
            log.error("label store: %s (nothing was stored)", failure)
            raise failure from exc
        for result in results:
            if result.status != "unchanged":
                log.info(
                    "label store: %s %s as %r%s", result.status, result.image_id[:12], label,
                    f" (was {result.previous_label!r})" if result.previous_label else "",
                )
        return results

    @staticmethod
    def _upsert(conn: sqlite3.Connection, image_id: str, label: str, domain: str | None, size: int, width: int,
                height: int, now: str) -> AddResult:
        row = conn.execute("SELECT label FROM images WHERE id = ?", (image_id,)).fetchone()
        if row is None:
            conn.execute(
                "INSERT INTO images (id, label, domain, size, width, height, created_at, updated_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (image_id, label, domain, size, width, height, now, now),
            )
            return AddResult(image_id, label, "stored", None, width, height)
        if domain is not None:
            conn.execute("UPDATE images SET domain = ? WHERE id = ?", (domain, image_id))
        if row[0] == label:
            return AddResult(image_id, label, "unchanged", None, width, height)
        conn.execute("UPDATE images SET label = ?, updated_at = ? WHERE id = ?", (label, now, image_id))
        return AddResult(image_id, label, "moved", row[0], width, height)

    def _remove_unreferenced(self, image_ids: set[str]) -> None:
        """After a failed add: remove the files of ``image_ids`` that no row refers to.

        Inside a write transaction, as :meth:`delete` does: a concurrent add of the same bytes
        either committed its row first (the file stays) or rewrites the file under the lock
        after this (see :meth:`add_many`). If even that transaction fails, the files stay: a
        file without a row is never read, and is reused if those bytes are uploaded again.
        """
        if not image_ids:
            return
        try:
            with self.database.transaction() as conn:
                for image_id in sorted(image_ids):
                    if conn.execute("SELECT 1 FROM images WHERE id = ?", (image_id,)).fetchone() is None:
                        self.path_of(image_id).unlink(missing_ok=True)
        except (OSError, sqlite3.Error) as exc:
            log.warning("label store: could not remove %d unreferenced file(s) after a failed add: %s",
                        len(image_ids), exc)

    def delete(self, image_id: str) -> bool:
        """Remove an image (its row, then its file). False if there is no such image, including
        for anything that is not a well-formed image id."""
        if not is_image_id(image_id):
            return False
        path = self.path_of(image_id)
        # The file is renamed aside inside the transaction (so no concurrent add can see the
        # row gone but the file still there, re-add it, and then lose the file) and unlinked
        # once the removal is committed; if the commit fails, it is put back.
        aside: Path | None = None
        try:
            with self.database.transaction() as conn:
                deleted = conn.execute("DELETE FROM images WHERE id = ?", (image_id,)).rowcount
                if deleted:
                    aside = path.with_name(f".{image_id[:12]}.{secrets.token_hex(4)}.deleting")
                    try:
                        os.rename(path, aside)
                    except FileNotFoundError:
                        log.warning("label store: %s had a row but no file", image_id[:12])
                        aside = None
        except BaseException:
            if aside is not None:
                os.replace(aside, path)
            raise
        if aside is not None:
            aside.unlink()
        if deleted:
            log.info("label store: deleted %s", image_id[:12])
        return bool(deleted)

    # -- reading ------------------------------------------------------------------------------

    def _query(self, sql: str, params: tuple[object, ...] = ()) -> list[tuple[Any, ...]]:
        with self.database.connect() as conn:
            return conn.execute(sql, params).fetchall()

    def counts(self) -> dict[str, int]:
        rows = self._query("SELECT label, COUNT(*) FROM images GROUP BY label ORDER BY label")
        return {label: int(n) for label, n in rows}

    def images(self) -> list[LabelledImage]:
        rows = self._query("SELECT id, label, domain FROM images ORDER BY id")
        return [LabelledImage(image_id, label, domain) for image_id, label, domain in rows]

    def read(self, image_id: str) -> bytes:
        path = self.path_of(image_id)
        if not self._query("SELECT 1 FROM images WHERE id = ?", (image_id,)):
            raise ImageNotFoundError(f"no stored image {image_id}")
        try:
            return path.read_bytes()
        except FileNotFoundError:  # deleted since the row was read
            raise ImageNotFoundError(f"no stored image {image_id}") from None
