"""The embedding cache of the shared backend: the Postgres table ``embeddings``."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import numpy as np

from ..embeddings import EmbeddingCache, decode_vector, encode_vectors
from .database import PostgresDatabase

log = logging.getLogger(__name__)


class PostgresEmbeddingCache(EmbeddingCache):
    def __init__(self, database: PostgresDatabase) -> None:
        self.database = database

    def get_many(self, image_ids: Sequence[str], backbone: str) -> dict[str, np.ndarray]:
        found: dict[str, np.ndarray] = {}
        with self.database.connect() as conn:
            rows = conn.execute(
                "SELECT image_id, dim, vector FROM embeddings WHERE backbone = %s AND image_id = ANY(%s)",
                (backbone, list(dict.fromkeys(image_ids)))).fetchall()
        for row in rows:
            vector = decode_vector(row["dim"], bytes(row["vector"]))
            if vector is None:
                log.warning("embedding cache: %s has a damaged vector; ignoring it", row["image_id"])
                continue
            found[row["image_id"]] = vector
        return found

    def put_many(self, items: Mapping[str, np.ndarray], backbone: str) -> None:
        rows = [(image_id, backbone, dim, blob) for image_id, dim, blob in encode_vectors(items, backbone)]
        if not rows:
            return
        with self.database.transaction() as conn, conn.cursor() as cursor:
            cursor.executemany(
                "INSERT INTO embeddings (image_id, backbone, dim, vector) VALUES (%s, %s, %s, %s)"
                " ON CONFLICT (image_id, backbone) DO UPDATE SET dim = EXCLUDED.dim, vector = EXCLUDED.vector", rows)

    def count(self, backbone: str) -> int:
        with self.database.connect() as conn:
            row = conn.execute("SELECT COUNT(*) AS n FROM embeddings WHERE backbone = %s", (backbone,)).fetchone()
        return int(row["n"])
