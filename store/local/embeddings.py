"""The embedding cache of the single-machine backend: the SQLite table ``embeddings``."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import numpy as np

from ..embeddings import EmbeddingCache, decode_vector, encode_vectors
from .database import Database

log = logging.getLogger(__name__)

# SQLite's default limit on bound parameters was 999 before 3.32; stay well below it.
_CHUNK = 500


class SqliteEmbeddingCache(EmbeddingCache):
    """Embeddings in ``database``; one connection per call."""

    def __init__(self, database: Database) -> None:
        self.database = database

    def get_many(self, image_ids: Sequence[str], backbone: str) -> dict[str, np.ndarray]:
        unique = list(dict.fromkeys(image_ids))
        found: dict[str, np.ndarray] = {}
        with self.database.connect() as conn:
            for start in range(0, len(unique), _CHUNK):
                chunk = unique[start : start + _CHUNK]
                marks = ",".join("?" * len(chunk))
                rows = conn.execute(
                    f"SELECT image_id, dim, vector FROM embeddings WHERE backbone = ? AND image_id IN ({marks})",  # noqa: S608 - placeholders only
                    (backbone, *chunk),
                )
                for image_id, dim, blob in rows:
                    vector = decode_vector(dim, blob)
                    if vector is None:
                        log.warning("embedding cache: %s has a damaged vector; ignoring it", image_id)
                        continue
                    found[image_id] = vector
        return found

    def put_many(self, items: Mapping[str, np.ndarray], backbone: str) -> None:
        rows = [(image_id, backbone, dim, blob) for image_id, dim, blob in encode_vectors(items, backbone)]
        if not rows:
            return
        with self.database.transaction() as conn:
            conn.executemany(
                "INSERT OR REPLACE INTO embeddings (image_id, backbone, dim, vector) VALUES (?, ?, ?, ?)", rows
            )

    def count(self, backbone: str) -> int:
        with self.database.connect() as conn:
            (n,) = conn.execute("SELECT COUNT(*) FROM embeddings WHERE backbone = ?", (backbone,)).fetchone()
        return int(n)
