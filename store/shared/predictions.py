"""The kept-prediction store of the shared backend: one row per image (``kept_images``) and one per
prediction (``predictions``) in Postgres, the image bytes in the object store under
``kept/<2 hex>/<sha256>``.

The label store's locking (:mod:`store.shared.labels`): an add takes its images' row locks first
(``INSERT ... ON CONFLICT DO UPDATE``, in image-id order so that two adds cannot deadlock) and
writes the objects while it holds them; a removal takes the same lock (``SELECT ... FOR UPDATE``),
then checks in a fresh statement that no prediction uses the image any more, and deletes the row
and then the object before it commits. So an add and a delete of the same bytes on two replicas
cannot interleave into a row without its object. If the object store fails mid-add, the add
removes the objects it wrote for images it was the first to keep, and its transaction rolls back:
nothing of the batch remains. Prunes take an advisory lock, so two
replicas pruning at once do not both remove "the oldest beyond the limit".
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from ..errors import storage_failure
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
from .database import PostgresDatabase
from .objects import ObjectNotFound, ObjectStore

log = logging.getLogger(__name__)

#: pg_advisory_xact_lock key of prunes ("tsrp" in ASCII)
PRUNE_LOCK = 0x74737270


def kept_image_key(image_id: str) -> str:
    return f"kept/{image_id[:2]}/{image_id}"


class PostgresPredictionStore(PredictionStore):
    def __init__(self, database: PostgresDatabase, objects: ObjectStore) -> None:
        self.database = database
        self.objects = objects

    # -- writing ------------------------------------------------------------------------------

    def add_many(self, predictions: Sequence[NewPrediction]) -> None:
        batch: dict[str, NewPrediction] = {}
        for prediction in predictions:
            check_new_prediction(prediction)
            batch.setdefault(prediction.prediction_id, prediction)
        if not batch:
            return
        try:
            with self.database.transaction() as conn:
                known = {row["id"] for row in conn.execute(
                    "SELECT id FROM predictions WHERE id = ANY(%s)", (list(batch),)).fetchall()}
                fresh = [p for p in batch.values() if p.prediction_id not in known]
                images = {p.image_id: p.image for p in fresh}
                new_images: list[str] = []  # rows this call inserted: their objects are its own
                try:
                    for image_id in sorted(images):
                        row = conn.execute(
                            "INSERT INTO kept_images (id, size, created_at) VALUES (%s, %s, now())"
                            " ON CONFLICT (id) DO UPDATE SET size = EXCLUDED.size"  # takes the row lock
                            " RETURNING (xmax = 0) AS inserted", (image_id, len(images[image_id]))).fetchone()
                        if row["inserted"]:
                            new_images.append(image_id)
                        self.objects.put(kept_image_key(image_id), images[image_id])  # the same bytes again is harmless
                    with conn.cursor() as cursor:
                        cursor.executemany(
                            f"INSERT INTO predictions ({COLUMNS})"  # noqa: S608 - constant
                            " VALUES (%s, %s, %s, %s, %s, %s, %s, %s::jsonb, %s, %s, %s) ON CONFLICT (id) DO NOTHING",
                            [_row(p) for p in fresh])
                except BaseException:
                    self._remove_objects(new_images)  # while their row locks are still held
                    raise
        except OSError as exc:  # a mounted object store directory that cannot take the write
            failure = storage_failure(exc, "keeping the prediction" + ("s" if len(batch) > 1 else ""))
            if failure is None:
                raise
            log.error("kept predictions: %s (nothing was kept)", failure)
            raise failure from exc
        log.debug("kept predictions: kept %d", len(fresh))

    def _remove_objects(self, image_ids: list[str]) -> None:
        """After a failed add, before its rollback: remove the objects of the images whose rows it
        inserted. If that fails too, they stay: an object without a row is never read, and is
        written again if those bytes are kept again."""
        for image_id in image_ids:
            try:
                self.objects.delete(kept_image_key(image_id))
            except Exception as exc:  # noqa: BLE001 - the add's own error is the one to raise
                log.warning("kept predictions: could not remove the object of %s after a failed add: %s",
                            image_id[:12], exc)

    def _drop_unused(self, conn: Any, image_ids: set[str]) -> int:
        """Inside a transaction: remove the rows and objects of ``image_ids`` that no prediction
        uses; returns how many images went."""
        if not image_ids:
            return 0
        ids = sorted(image_ids)
        # Lock first; the check below is a new statement, so it sees what an add that held the
        # lock committed (a check in the same statement would judge by the older snapshot).
        conn.execute("SELECT id FROM kept_images WHERE id = ANY(%s) ORDER BY id FOR UPDATE", (ids,))
        dropped = [row["id"] for row in conn.execute(
            "DELETE FROM kept_images AS k WHERE k.id = ANY(%s)"
            " AND NOT EXISTS (SELECT 1 FROM predictions AS p WHERE p.image_id = k.id) RETURNING k.id",
            (ids,)).fetchall()]
        for image_id in dropped:
            self.objects.delete(kept_image_key(image_id))  # before the commit: still under the row's lock
        return len(dropped)

    def delete(self, prediction_id: str) -> bool:
        if not is_prediction_id(prediction_id):
            return False
        with self.database.transaction() as conn:
            row = conn.execute("DELETE FROM predictions WHERE id = %s RETURNING image_id",
                               (prediction_id,)).fetchone()
            if row is None:
                return False
            self._drop_unused(conn, {row["image_id"]})
        log.info("kept predictions: deleted %s", prediction_id)
        return True

    def prune(self, *, max_items: int | None, older_than: datetime | None) -> int:
        check_max_items(max_items)
        if older_than is not None:
            check_aware(older_than, "older_than")
        if max_items is None and older_than is None:
            return 0
        # the common case, every few seconds: nothing to remove, learnt without a lock
        with self.database.connect() as conn:
            row = conn.execute("SELECT COUNT(*) AS n, MIN(created_at) AS oldest FROM predictions").fetchone()
        if not ((max_items is not None and row["n"] > max_items) or (
                older_than is not None and row["oldest"] is not None and row["oldest"] < older_than)):
            return 0
        with self.database.transaction() as conn:
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (PRUNE_LOCK,))
            images: list[str] = []
            if older_than is not None:
                images += [r["image_id"] for r in conn.execute(
                    "DELETE FROM predictions WHERE created_at < %s RETURNING image_id", (older_than,)).fetchall()]
            if max_items is not None:
                count = conn.execute("SELECT COUNT(*) AS n FROM predictions").fetchone()["n"]
                if count > max_items:
                    images += [r["image_id"] for r in conn.execute(
                        "DELETE FROM predictions WHERE id IN"
                        " (SELECT id FROM predictions ORDER BY created_at, id LIMIT %s) RETURNING image_id",
                        (count - max_items,)).fetchall()]
            dropped = self._drop_unused(conn, set(images))
        if images:
            log.info("kept predictions: pruned %d prediction(s) and %d image(s)", len(images), dropped)
        return len(images)

    # -- reading ------------------------------------------------------------------------------

    def get(self, prediction_id: str) -> KeptPrediction:
        if is_prediction_id(prediction_id):
            with self.database.connect() as conn:
                row = conn.execute(f"SELECT {COLUMNS} FROM predictions WHERE id = %s",  # noqa: S608 - constant
                                   (prediction_id,)).fetchone()
            if row is not None:
                return _kept(row)
        raise PredictionNotFoundError(f"no kept prediction {prediction_id!r}")

    def read_image(self, prediction_id: str) -> bytes:
        if is_prediction_id(prediction_id):
            with self.database.connect() as conn:
                row = conn.execute("SELECT image_id FROM predictions WHERE id = %s", (prediction_id,)).fetchone()
            if row is not None:
                try:
                    return checked_image(row["image_id"], self.objects.get(kept_image_key(row["image_id"])))
                except ObjectNotFound:  # removed since the row was read
                    pass
        raise PredictionNotFoundError(f"no kept prediction {prediction_id!r}")

    def unlabelled(self, *, order: ReviewOrder, limit: int) -> list[KeptPrediction]:
        order_by = review_order_sql(order, limit)
        with self.database.connect() as conn:
            rows = conn.execute(
                f"SELECT {COLUMNS} FROM ("  # noqa: S608 - constants only
                "  SELECT p.*, ROW_NUMBER() OVER (PARTITION BY p.image_id ORDER BY p.created_at DESC, p.id DESC)"
                "  AS newest FROM predictions AS p"
                "  WHERE NOT EXISTS (SELECT 1 FROM images AS i WHERE i.id = p.image_id)"
                f") AS candidates WHERE newest = 1 ORDER BY {order_by} LIMIT %s", (limit,)).fetchall()
        return [_kept(row) for row in rows]

    def count(self) -> int:
        with self.database.connect() as conn:
            return int(conn.execute("SELECT COUNT(*) AS n FROM predictions").fetchone()["n"])


def _row(p: NewPrediction) -> tuple[Any, ...]:
    dim, vector = encode_embedding(p)
    return (p.prediction_id, p.image_id, p.version, p.label, float(p.score), float(p.margin), float(p.entropy),
            encode_top_k(p.top_k), p.created_at.astimezone(UTC), dim, vector)


def _kept(row: dict[str, Any]) -> KeptPrediction:
    return KeptPrediction(
        row["id"], row["image_id"], row["version"], row["label"], row["score"], row["margin"], row["entropy"],
        decode_top_k(row["top_k"]), row["created_at"].astimezone(UTC),
        decode_embedding(row["id"], row["dim"], row["vector"]))
