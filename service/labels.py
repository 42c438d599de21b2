"""The label store: images an operator has labelled, kept for head-only retraining.

Uploads (``POST /admin/labels``, ``python -m training import``) are stored by content: the file
is ``$TRANSFER_SERVE_HOME/labels/images/<2 hex>/<sha256>`` (the client's file name is never used
in a path) and its row in the SQLite table ``images`` holds the label, size and pixel dimensions.
The same bytes uploaded twice are one image; uploaded again with another label, the image moves
to that label. Files are written atomically (temporary file, fsync, rename) before their row is
committed, and a file is only removed inside the transaction that removes its row, so any number
of threads and processes can add and delete at once and every row has its file. An upload of
several images is stored all or none: when the state directory cannot take a write (disk full,
read-only volume...), :class:`~service.db.StorageError` says so, and neither rows nor files of
that upload remain.

:func:`held_out` fixes, per image, whether it belongs to the evaluation split, from its hash
alone, so successive retrain jobs compare candidate and active models on the same images.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import secrets
import sqlite3
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from models.errors import InputError
from models.paths import write_atomic
from models.preprocess import decode_image

from . import db

log = logging.getLogger(__name__)

#: A label: 1-64 ASCII letters, digits, spaces, '-', '_' or '.' (see :func:`validate_label`).
LABEL_RE = re.compile(r"[A-Za-z0-9 ._-]{1,64}")
MAX_LABEL_LENGTH = 64
_IMAGE_ID_RE = re.compile(r"[0-9a-f]{64}")

AddStatus = Literal["stored", "moved", "unchanged"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS images (
    id TEXT PRIMARY KEY,          -- sha256 of the file's bytes, lowercase hex
    label TEXT NOT NULL,
    size INTEGER,                 -- bytes
    width INTEGER,                -- pixels, after EXIF orientation
    height INTEGER,
    created_at TEXT,              -- ISO 8601, UTC
    updated_at TEXT
)
"""


class InvalidLabelError(InputError):
    """A label that breaks the naming rules of :func:`validate_label`."""

    status_code = 422


class ImageNotFoundError(InputError, LookupError):
    """No stored image has that id (or the id is not a sha256 hex digest at all)."""

    status_code = 404


def validate_label(label: str) -> str:
    """Return ``label`` if it is a valid label, else raise :class:`InvalidLabelError` saying
    which rule it breaks.

    A label is 1-64 characters from ASCII letters, digits, space, ``-``, ``_`` and ``.``, does
    not start or end with a space, and is not ``.`` or ``..``. Labels name classes in reports
    and may name folders, so look-alike Unicode letters, control characters and path
    separators are refused rather than normalised: the operator sees exactly what is stored.
    """
    if not isinstance(label, str):
        raise InvalidLabelError(f"a label must be text, got {type(label).__name__}")
    if not label:
        raise InvalidLabelError("the label is empty; give 1 to 64 characters")
    if len(label) > MAX_LABEL_LENGTH:
        raise InvalidLabelError(
            f"label {label[:20]!r}... is {len(label)} characters long; "
            f"the most is {MAX_LABEL_LENGTH}"
        )
    if not LABEL_RE.fullmatch(label):
        bad = next(c for c in label if not LABEL_RE.fullmatch(c))
        raise InvalidLabelError(
            f"label {label!r} may only contain letters, digits, space, '-', '_' and '.' "
            f"(found {_describe_char(bad)})"
        )
    if label != label.strip(" "):
        raise InvalidLabelError(f"label {label!r} may not start or end with a space")
    if label in {".", ".."}:
        raise InvalidLabelError(f"label {label!r} is not allowed (it names a directory)")
    return label


def _describe_char(char: str) -> str:
    name = unicodedata.name(char, "")
    if char.isprintable() and name:
        return f"{char!r}, U+{ord(char):04X} {name}"
    return f"U+{ord(char):04X}{' ' + name if name else ''}"


def is_image_id(value: object) -> bool:
    """Whether ``value`` has the form of an image id: 64 lowercase hex digits."""
    return isinstance(value, str) and _IMAGE_ID_RE.fullmatch(value) is not None


def held_out(image_id: str, fraction: float = 0.2) -> bool:
    """Whether the image belongs to the held-out evaluation split.

    Decided by the first 32 bits of its hash, so the answer never changes for an image and
    about ``fraction`` of all images are held out, independently of their labels.
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be between 0 and 1, got {fraction}")
    if not is_image_id(image_id):
        raise ValueError(f"{image_id!r} is not an image id (64 lowercase hex digits)")
    return int(image_id[:8], 16) / 16**8 < fraction


@dataclass(frozen=True)
class AddResult:
    """What :meth:`LabelStore.add` did with one upload.

    ``status`` is ``"stored"`` (a new image), ``"moved"`` (these bytes were stored under
    ``previous_label`` and now have ``label``) or ``"unchanged"`` (already stored with ``label``).
    """

    image_id: str
    label: str
    status: AddStatus
    previous_label: str | None
    width: int
    height: int


@dataclass(frozen=True)
class LabelledImage:
    """One stored image: its id (sha256 hex), label, and file."""

    image_id: str
    label: str
    path: Path


def _now() -> str:
    return datetime.now(timezone.utc).isoformat()


class LabelStore:
    """Labelled images under ``home``: files in ``home/labels/images``, rows in the database.

    Safe to use from many threads and processes at once: each call opens its own database
    connection and closes it before returning.
    """

    def __init__(self, home: Path) -> None:
        self.home = Path(home)
        self.images_dir = self.home / "labels" / "images"
        self.database = db.database_path(self.home)
        try:
            self.images_dir.mkdir(parents=True, exist_ok=True)
            with db.connected(self.database) as conn:
                conn.execute(_SCHEMA)
        except (OSError, sqlite3.Error) as exc:
            failure = db.storage_failure(exc, "opening the label store")
            if failure is None:
                raise
            raise failure from exc

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

    def add(self, data: bytes, label: str, *, max_pixels: int) -> AddResult:
        """Store image bytes under ``label``, deduplicated by content.

        Raises:
            InvalidLabelError: the label breaks the naming rules.
            ImageDecodeError: the bytes are not a readable image.
            ImageTooLargeError: the image has more than ``max_pixels`` pixels.
            StorageError: the state directory cannot take the write (disk full, read-only...);
                nothing was stored.
        """
        return self.add_many([data], label, max_pixels=max_pixels)[0]

    def add_many(self, blobs: Sequence[bytes], label: str, *, max_pixels: int) -> list[AddResult]:
        """Store several images under ``label``, all or none: if any cannot be written, none
        is stored (no row, and no file this call wrote is left behind).

        The same bytes twice in ``blobs`` are one image (the second is ``"unchanged"``).
        Raises the errors of :meth:`add`; every image is checked before anything is written.
        """
        validate_label(label)
        checked = []
        for data in blobs:
            width, height = decode_image(data, max_pixels=max_pixels).size
            checked.append((hashlib.sha256(data).hexdigest(), data, width, height))
        written: set[str] = set()  # image ids whose file this call created
        try:
            # The writes (and their fsyncs) happen outside the database lock so that concurrent
            # uploads of different images do not queue behind each other's disk flushes.
            for image_id, data, _, _ in checked:
                if self._write_file(self.path_of(image_id), data):
                    written.add(image_id)
            now = _now()
            results = []
            with db.connected(self.database) as conn, db.transaction(conn):
                for image_id, data, width, height in checked:
                    # A delete of these same bytes may have run between the write and here; with
                    # the write lock held nobody can remove the file again before the row is
                    # committed.
                    if self._write_file(self.path_of(image_id), data):
                        written.add(image_id)
                    results.append(self._upsert(conn, image_id, label, len(data), width, height, now))
        except Exception as exc:
            failure = db.storage_failure(exc, "storing the labelled image" + ("s" if len(checked) > 1 else ""))
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
    def _upsert(conn: sqlite3.Connection, image_id: str, label: str, size: int, width: int, height: int,
                now: str) -> AddResult:
        row = conn.execute("SELECT label FROM images WHERE id = ?", (image_id,)).fetchone()
        if row is None:
            conn.execute(
                "INSERT INTO images (id, label, size, width, height, created_at, updated_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (image_id, label, size, width, height, now, now),
            )
            return AddResult(image_id, label, "stored", None, width, height)
        if row[0] == label:
            return AddResult(image_id, label, "unchanged", None, width, height)
        conn.execute("UPDATE images SET label = ?, updated_at = ? WHERE id = ?", (label, now, image_id))
        return AddResult(image_id, label, "moved", row[0], width, height)

    @staticmethod
    def _write_file(path: Path, data: bytes) -> bool:
        """Write ``data`` to ``path`` atomically unless a file of that size is already there.
        Returns whether it wrote the file."""
        with contextlib.suppress(FileNotFoundError):
            if path.stat().st_size == len(data):
                return False
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, data)
        return True

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
            with db.connected(self.database) as conn, db.transaction(conn):
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
            with db.connected(self.database) as conn, db.transaction(conn):
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
        with db.connected(self.database) as conn:
            return conn.execute(sql, params).fetchall()

    def counts(self) -> dict[str, int]:
        """Number of images per label, labels in sorted order."""
        rows = self._query("SELECT label, COUNT(*) FROM images GROUP BY label ORDER BY label")
        return {label: int(n) for label, n in rows}

    def total(self) -> int:
        """Number of stored images."""
        ((n,),) = self._query("SELECT COUNT(*) FROM images")
        return int(n)

    def images(self) -> list[LabelledImage]:
        """Every stored image, ordered by id."""
        rows = self._query("SELECT id, label FROM images ORDER BY id")
        return [LabelledImage(image_id, label, self.path_of(image_id)) for image_id, label in rows]

    def label_of(self, image_id: str) -> str | None:
        """The image's label, or None if it is not stored."""
        if not is_image_id(image_id):
            return None
        rows = self._query("SELECT label FROM images WHERE id = ?", (image_id,))
        return rows[0][0] if rows else None

    def read(self, image_id: str) -> bytes:
        """The stored image's bytes.

        Raises:
            ImageNotFoundError: no image with that id is stored.
        """
        path = self.path_of(image_id)
        if self.label_of(image_id) is None:
            raise ImageNotFoundError(f"no stored image {image_id}")
        try:
            return path.read_bytes()
        except FileNotFoundError:  # deleted since the row was read
            raise ImageNotFoundError(f"no stored image {image_id}") from None
