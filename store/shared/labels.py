"""The label store of the shared backend: one row per image in Postgres, its bytes in the object
store under ``images/<2 hex>/<sha256>``.

An add takes the rows' locks first (``INSERT ... ON CONFLICT``) and writes the objects while it
holds them; a delete removes the row and then the object, also under the row's lock. So an add
and a delete of the same bytes on two replicas cannot interleave into a row without its object,
and the same image uploaded to two replicas at once is one row and one object. If the object
store fails mid-upload, the transaction rolls back: no row refers to a half-stored upload.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import UTC, datetime

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
from .database import PostgresDatabase
from .objects import ObjectNotFound, ObjectStore

log = logging.getLogger(__name__)


def image_key(image_id: str) -> str:
    return f"images/{image_id[:2]}/{image_id}"


class PostgresLabelStore(LabelStore):
    def __init__(self, database: PostgresDatabase, objects: ObjectStore) -> None:
        self.database = database
        self.objects = objects

    def add_many(self, images: Sequence[CheckedImage], label: str, domain: str | None = None) -> list[AddResult]:
        validate_label(label)
        validate_domain(domain)
        now = datetime.now(UTC).isoformat()
        results = []
        with self.database.transaction() as conn:
            for image in images:
                row = conn.execute(
                    "INSERT INTO images AS i (id, label, domain, size, width, height, created_at, updated_at)"
                    " VALUES (%s, %s, %s, %s, %s, %s, %s, %s)"
                    # takes the row lock; a new domain tag replaces the old one, none leaves it
                    " ON CONFLICT (id) DO UPDATE SET domain = COALESCE(EXCLUDED.domain, i.domain)"
                    " RETURNING label, (xmax = 0) AS inserted",
                    (image.image_id, label, domain, len(image.data), image.width, image.height, now,
                     now)).fetchone()
                if row["inserted"]:
                    results.append(AddResult(image.image_id, label, "stored", None, image.width, image.height))
                elif row["label"] == label:
                    results.append(AddResult(image.image_id, label, "unchanged", None, image.width, image.height))
                else:
                    conn.execute("UPDATE images SET label = %s, updated_at = %s WHERE id = %s",
                                 (label, now, image.image_id))
                    results.append(AddResult(image.image_id, label, "moved", row["label"], image.width, image.height))
                self.objects.put(image_key(image.image_id), image.data)  # the same bytes again is harmless
        for result in results:
            if result.status != "unchanged":
                log.info("label store: %s %s as %r", result.status, result.image_id[:12], label)
        return results

    def delete(self, image_id: str) -> bool:
        if not is_image_id(image_id):
            return False
        with self.database.transaction() as conn:
            deleted = conn.execute("DELETE FROM images WHERE id = %s", (image_id,)).rowcount
            if deleted:
                self.objects.delete(image_key(image_id))  # before the commit: still under the row's lock
        if deleted:
            log.info("label store: deleted %s", image_id[:12])
        return bool(deleted)

    def counts(self) -> dict[str, int]:
        with self.database.connect() as conn:
            rows = conn.execute("SELECT label, COUNT(*) AS n FROM images GROUP BY label ORDER BY label").fetchall()
        return {row["label"]: int(row["n"]) for row in rows}

    def images(self) -> list[LabelledImage]:
        with self.database.connect() as conn:
            rows = conn.execute("SELECT id, label, domain FROM images ORDER BY id").fetchall()
        return [LabelledImage(row["id"], row["label"], row["domain"]) for row in rows]

    def read(self, image_id: str) -> bytes:
        if not is_image_id(image_id):
            raise ImageNotFoundError(f"{image_id!r} is not an image id (64 lowercase hex digits)")
        with self.database.connect() as conn:
            if conn.execute("SELECT 1 FROM images WHERE id = %s", (image_id,)).fetchone() is None:
                raise ImageNotFoundError(f"no stored image {image_id}")
        try:
            return self.objects.get(image_key(image_id))
        except ObjectNotFound:  # deleted since the row was read
            raise ImageNotFoundError(f"no stored image {image_id}") from None
