"""The embedding cache: backbone embeddings of images, by content hash and backbone fingerprint.

Head-only retraining needs every labelled image's embedding from the active backbone. Those are
stored here once, in the SQLite table ``embeddings`` keyed by (image sha256, backbone
fingerprint), so a retrain job only runs the backbone on images it has not seen, and a new
backbone never reuses another's vectors. Vectors are raw little-endian float32 bytes (never
pickle) and come back bit-for-bit as they were stored.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from . import db

log = logging.getLogger(__name__)

_VECTOR_DTYPE = np.dtype("<f4")
# SQLite's default limit on bound parameters was 999 before 3.32; stay well below it.
_CHUNK = 500

_SCHEMA = """
CREATE TABLE IF NOT EXISTS embeddings (
    image_id TEXT NOT NULL,       -- sha256 of the image bytes, lowercase hex
    backbone TEXT NOT NULL,       -- fingerprint of the backbone graph and weights
    dim INTEGER NOT NULL,
    vector BLOB NOT NULL,         -- dim float32 values, little-endian
    PRIMARY KEY (image_id, backbone)
)
"""


class EmbeddingCache:
    """Embeddings in the project database under ``home``; one connection per call, so it is
    safe to use from many threads and processes."""

    def __init__(self, home: Path) -> None:
        self.database = db.database_path(Path(home))
        with db.connected(self.database) as conn:
            conn.execute(_SCHEMA)

    def get_many(self, image_ids: Sequence[str], backbone: str) -> dict[str, np.ndarray]:
        """The cached embeddings of ``image_ids`` for ``backbone``, as writable float32 1-D
        arrays; ids with no cached embedding are absent from the result."""
        unique = list(dict.fromkeys(image_ids))
        found: dict[str, np.ndarray] = {}
        with db.connected(self.database) as conn:
            for start in range(0, len(unique), _CHUNK):
                chunk = unique[start : start + _CHUNK]
                marks = ",".join("?" * len(chunk))
                rows = conn.execute(
                    f"SELECT image_id, dim, vector FROM embeddings"
                    f" WHERE backbone = ? AND image_id IN ({marks})",
                    (backbone, *chunk),
                )
                for image_id, dim, blob in rows:
                    if len(blob) != dim * _VECTOR_DTYPE.itemsize:
                        # Treated as a miss: the caller recomputes and put_many replaces it.
                        log.warning("embedding cache: %s has a damaged vector; ignoring it", image_id)
                        continue
                    found[image_id] = np.frombuffer(blob, dtype=_VECTOR_DTYPE).astype(np.float32)
        return found

    def put_many(self, items: Mapping[str, np.ndarray], backbone: str) -> None:
        """Store (or replace) embeddings for ``backbone`` in one transaction. Vectors are stored
        as float32 (a float32 input comes back bit-for-bit).

        Raises:
            ValueError: a vector is not one-dimensional and non-empty, or ``backbone`` is empty.
        """
        if not backbone:
            raise ValueError("backbone fingerprint is empty")
        rows = []
        for image_id, vector in items.items():
            array = np.asarray(vector)
            if array.ndim != 1 or array.size == 0:
                raise ValueError(
                    f"embedding of {image_id} must be a non-empty 1-D array, got shape {array.shape}"
                )
            rows.append((image_id, backbone, array.size, array.astype(_VECTOR_DTYPE).tobytes()))
        if not rows:
            return
        with db.connected(self.database) as conn, db.transaction(conn):
            conn.executemany(
                "INSERT OR REPLACE INTO embeddings (image_id, backbone, dim, vector)"
                " VALUES (?, ?, ?, ?)",
                rows,
            )

    def count(self, backbone: str) -> int:
        """How many embeddings are cached for ``backbone``."""
        with db.connected(self.database) as conn:
            (n,) = conn.execute(
                "SELECT COUNT(*) FROM embeddings WHERE backbone = ?", (backbone,)
            ).fetchone()
        return int(n)
