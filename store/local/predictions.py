"""The kept-prediction store of the single-machine backend: image files under
``$TRANSFER_SERVE_HOME/kept/images/<2 hex>/<sha256>``, one row per image in the SQLite table
``kept_images`` and one per prediction in ``predictions``.

The label store's care (:mod:`store.local.labels`), for the same reasons: a file is written
atomically before the row that refers to it commits (and written again under the write lock if a
delete removed it meanwhile), and removed only inside the transaction that removes the last
prediction using it (set aside, unlinked once that commits, put back if it fails). So any number of
threads and processes can add, delete and prune at once, every row has its file, and an add that
fails leaves no row and no file it wrote.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import sqlite3
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ..errors import storage_errors, storage_failure
from ..files import write_unless_present
from ..predictions import (
    COLUMNS,
    KeptPrediction,
    NewPrediction,
    PredictionNotFoundError,
    PredictionStore,
    ReviewOrder,
    check_aware,
    check_max_items,
    check_new_prediction,
    checked_image,
    decode_embedding,
    decode_top_k,
    encode_embedding,
    encode_top_k,
    is_prediction_id,
    review_order_sql,
)
from .database import Database

log = logging.getLogger(__name__)


#: Files set aside by a transaction: (where it is now, where it belongs).
_Aside = list[tuple[Path, Path]]


def _timestamp(moment: datetime) -> str:
    """``moment`` as stored: ISO 8601 in UTC with microseconds, always the same width, so that
    comparing the text compares the times."""
    return moment.astimezone(UTC).isoformat(timespec="microseconds")


class SqlitePredictionStore(PredictionStore):
    """Kept predictions under ``home``: files in ``home/kept/images``, rows in ``database``.
    Each call opens its own database connection and closes it before returning."""

    def __init__(self, home: Path, database: Database) -> None:
        self.home = Path(home)
        self.images_dir = self.home / "kept" / "images"
        self.database = database
        with storage_errors("opening the kept-prediction store"):
            self.images_dir.mkdir(parents=True, exist_ok=True)

    def path_of(self, image_id: str) -> Path:
        """The file of a kept image (``image_id``: a checked sha256 hex digest)."""
        return self.images_dir / image_id[:2] / image_id

    # -- writing ------------------------------------------------------------------------------

    def add_many(self, predictions: Sequence[NewPrediction]) -> None:
        """See :meth:`PredictionStore.add_many`. If anything cannot be written, no row is
        committed and no file this call wrote is left behind."""
        batch: dict[str, NewPrediction] = {}
        for prediction in predictions:
            check_new_prediction(prediction)
            batch.setdefault(prediction.prediction_id, prediction)
        if not batch:
            return
        images = {p.image_id: p.image for p in batch.values()}
        written: set[str] = set()  # image ids whose file this call created
        try:
            # Written outside the database lock, so that workers keeping different images do not
            # queue behind each other's writes; not flushed to disk one by one (checked_image
            # catches what a power cut damaged), which is most of what keeping costs a worker.
            for image_id, data in images.items():
                if write_unless_present(self.path_of(image_id), data, durable=False):
                    written.add(image_id)
            now = _timestamp(datetime.now(UTC))
            with self.database.transaction() as conn:
                fresh = [p for p in batch.values()
                         if conn.execute("SELECT 1 FROM predictions WHERE id = ?", (p.prediction_id,)).fetchone()
                         is None]
                used = {p.image_id for p in fresh}
                for image_id in sorted(used):
                    # A delete of the same bytes may have removed the file since it was written;
                    # with the write lock held, nobody can remove it again before the row commits.
                    if write_unless_present(self.path_of(image_id), images[image_id], durable=False):
                        written.add(image_id)
                    conn.execute("INSERT INTO kept_images (id, size, created_at) VALUES (?, ?, ?)"
                                 " ON CONFLICT (id) DO NOTHING", (image_id, len(images[image_id]), now))
                conn.executemany(
                    f"INSERT INTO predictions ({COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",  # noqa: S608 - constant
                    [_row(p) for p in fresh])
                # the images of predictions kept before (a retried call): no row refers to them
                self._unlink_unreferenced(conn, written - used)
        except Exception as exc:
            failure = storage_failure(exc, "keeping the prediction" + ("s" if len(batch) > 1 else ""))
            self._remove_unreferenced(written)
            if failure is None:
                raise
            log.error("kept predictions: %s (nothing was kept)", failure)
            raise failure from exc
        log.debug("kept predictions: kept %d, %d new image file(s)", len(fresh), len(written & used))

    def _unlink_unreferenced(self, conn: sqlite3.Connection, image_ids: set[str]) -> None:
        """Inside a write transaction: remove the files of ``image_ids`` that no row refers to."""
        for image_id in sorted(image_ids):
            if conn.execute("SELECT 1 FROM kept_images WHERE id = ?", (image_id,)).fetchone() is None:
                self.path_of(image_id).unlink(missing_ok=True)

    def _remove_unreferenced(self, image_ids: set[str]) -> None:
        """After a failed add: remove the files it wrote that no row refers to, under the write
        lock (see :meth:`SqliteLabelStore._remove_unreferenced`). If even that fails, the files
        stay: a file without a row is never read, and is reused if those bytes are kept again."""
        if not image_ids:
            return
        try:
            with self.database.transaction() as conn:
                self._unlink_unreferenced(conn, image_ids)
        except (OSError, sqlite3.Error) as exc:
            log.warning("kept predictions: could not remove %d unreferenced file(s) after a failed add: %s",
                        len(image_ids), exc)

    @contextlib.contextmanager
    def _removing(self) -> Iterator[tuple[sqlite3.Connection, _Aside]]:
        """A write transaction, and the list of image files it set aside (:meth:`_drop_unused`):
        unlinked once it commits, put back if it fails."""
        aside: _Aside = []
        try:
            with self.database.transaction() as conn:
                yield conn, aside
        except BaseException:
            for moved, path in aside:
                os.replace(moved, path)
            raise
        for moved, _ in aside:
            moved.unlink(missing_ok=True)

    def _drop_unused(self, conn: sqlite3.Connection, image_ids: set[str], aside: _Aside) -> int:
        """Inside :meth:`_removing`: remove the rows of ``image_ids`` that no prediction uses and
        set their files aside; returns how many images went."""
        dropped = 0
        for image_id in sorted(image_ids):
            if conn.execute("SELECT 1 FROM predictions WHERE image_id = ? LIMIT 1", (image_id,)).fetchone():
                continue
            conn.execute("DELETE FROM kept_images WHERE id = ?", (image_id,))
            dropped += 1
            path = self.path_of(image_id)
            moved = path.with_name(f".{image_id[:12]}.{secrets.token_hex(4)}.deleting")
            try:
                os.rename(path, moved)
            except FileNotFoundError:
                log.warning("kept predictions: image %s had a row but no file", image_id[:12])
                continue
            aside.append((moved, path))
        return dropped

    def delete(self, prediction_id: str) -> bool:
        if not is_prediction_id(prediction_id):
            return False
        with self._removing() as (conn, aside):
            row = conn.execute("SELECT image_id FROM predictions WHERE id = ?", (prediction_id,)).fetchone()
            if row is None:
                return False
            conn.execute("DELETE FROM predictions WHERE id = ?", (prediction_id,))
            self._drop_unused(conn, {row[0]}, aside)
        log.info("kept predictions: deleted %s", prediction_id)
        return True

    def prune(self, *, max_items: int | None, older_than: datetime | None) -> int:
        check_max_items(max_items)
        cutoff = None
        if older_than is not None:
            check_aware(older_than, "older_than")
            cutoff = _timestamp(older_than)
        if max_items is None and cutoff is None:
            return 0
        # the common case, every few seconds: nothing to remove, learnt without the write lock
        with self.database.connect() as conn:
            count, oldest = conn.execute("SELECT COUNT(*), MIN(created_at) FROM predictions").fetchone()
        if not ((max_items is not None and count > max_items) or (cutoff is not None and oldest is not None
                                                                   and oldest < cutoff)):
            return 0
        with self._removing() as (conn, aside):
            doomed: list[tuple[str, str]] = []  # (prediction id, image id)
            if cutoff is not None:
                doomed += conn.execute("SELECT id, image_id FROM predictions WHERE created_at < ?",
                                       (cutoff,)).fetchall()
                conn.execute("DELETE FROM predictions WHERE created_at < ?", (cutoff,))
            if max_items is not None:
                (count,) = conn.execute("SELECT COUNT(*) FROM predictions").fetchone()
                if count > max_items:
                    oldest = conn.execute("SELECT id, image_id FROM predictions ORDER BY created_at, id LIMIT ?",
                                          (count - max_items,)).fetchall()
                    conn.executemany("DELETE FROM predictions WHERE id = ?", [(pid,) for pid, _ in oldest])
                    doomed += oldest
            dropped = self._drop_unused(conn, {image_id for _, image_id in doomed}, aside)
        if doomed:
            log.info("kept predictions: pruned %d prediction(s) and %d image(s)", len(doomed), dropped)
        return len(doomed)

    # -- reading ------------------------------------------------------------------------------

    def _query(self, sql: str, params: tuple[object, ...] = ()) -> list[tuple[Any, ...]]:
        with self.database.connect() as conn:
            return conn.execute(sql, params).fetchall()

    def get(self, prediction_id: str) -> KeptPrediction:
        if is_prediction_id(prediction_id):
            rows = self._query(f"SELECT {COLUMNS} FROM predictions WHERE id = ?", (prediction_id,))  # noqa: S608 - constant
            if rows:
                return _kept(rows[0])
        raise PredictionNotFoundError(f"no kept prediction {prediction_id!r}")

    def read_image(self, prediction_id: str) -> bytes:
        if is_prediction_id(prediction_id):
            rows = self._query("SELECT image_id FROM predictions WHERE id = ?", (prediction_id,))
            if rows:
                try:
                    return checked_image(rows[0][0], self.path_of(rows[0][0]).read_bytes())
                except FileNotFoundError:  # removed since the row was read
                    pass
        raise PredictionNotFoundError(f"no kept prediction {prediction_id!r}")

    def unlabelled(self, *, order: ReviewOrder, limit: int) -> list[KeptPrediction]:
        order_by = review_order_sql(order, limit)
        rows = self._query(
            f"SELECT {COLUMNS} FROM ("  # noqa: S608 - constants only
            "  SELECT p.*, ROW_NUMBER() OVER (PARTITION BY p.image_id ORDER BY p.created_at DESC, p.id DESC) AS newest"
            "  FROM predictions AS p WHERE NOT EXISTS (SELECT 1 FROM images AS i WHERE i.id = p.image_id)"
            f") WHERE newest = 1 ORDER BY {order_by} LIMIT ?", (limit,))
        return [_kept(row) for row in rows]

    def count(self) -> int:
        return int(self._query("SELECT COUNT(*) FROM predictions")[0][0])

    def everything(self) -> list[KeptPrediction]:
        """Every kept prediction, oldest first (for copying a home into another backend)."""
        return [_kept(row) for row in self._query(f"SELECT {COLUMNS} FROM predictions ORDER BY created_at, id")]  # noqa: S608 - constant


def _row(p: NewPrediction) -> tuple[object, ...]:
    dim, vector = encode_embedding(p)
    return (p.prediction_id, p.image_id, p.version, p.label, float(p.score), float(p.margin), float(p.entropy),
            encode_top_k(p.top_k), _timestamp(p.created_at), dim, vector)


def _kept(row: tuple[Any, ...]) -> KeptPrediction:
    prediction_id, image_id, version, label, score, margin, entropy, top_k, created_at, dim, vector = row
    return KeptPrediction(prediction_id, image_id, version, label, score, margin, entropy, decode_top_k(top_k),
                          datetime.fromisoformat(created_at), decode_embedding(prediction_id, dim, vector))
