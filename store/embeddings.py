"""The embedding cache: backbone embeddings of images, by content hash and backbone fingerprint.

Head-only retraining needs every labelled image's embedding from the active backbone. Those are
stored once, keyed by (image sha256, backbone fingerprint), so a retrain job only runs the backbone
on images it has not seen, and a new backbone never reuses another's vectors. Vectors are stored as
raw little-endian float32 bytes (never pickle) and come back bit-for-bit as they were stored.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence

import numpy as np

VECTOR_DTYPE = np.dtype("<f4")


def encode_vectors(items: Mapping[str, np.ndarray], backbone: str) -> list[tuple[str, int, bytes]]:
    """``(image_id, dim, bytes)`` per vector, ready to store.

    Raises:
        ValueError: a vector is not one-dimensional and non-empty, or ``backbone`` is empty.
    """
    if not backbone:
        raise ValueError("backbone fingerprint is empty")
    rows = []
    for image_id, vector in items.items():
        array = np.asarray(vector)
        if array.ndim != 1 or array.size == 0:
            raise ValueError(f"embedding of {image_id} must be a non-empty 1-D array, got shape {array.shape}")
        rows.append((image_id, array.size, array.astype(VECTOR_DTYPE).tobytes()))
    return rows


def decode_vector(dim: int, blob: bytes) -> np.ndarray | None:
    """The stored vector as a writable float32 array; None if its bytes do not hold ``dim``
    values (damaged: treated as a miss, recomputed and replaced by the caller)."""
    if len(blob) != dim * VECTOR_DTYPE.itemsize:
        return None
    return np.frombuffer(blob, dtype=VECTOR_DTYPE).astype(np.float32)


class EmbeddingCache(ABC):
    """Embeddings per (image, backbone). Safe to use from many threads and processes."""

    @abstractmethod
    def get_many(self, image_ids: Sequence[str], backbone: str) -> dict[str, np.ndarray]:
        """The cached embeddings of ``image_ids`` for ``backbone``, as writable float32 1-D
        arrays; ids with no (or a damaged) cached embedding are absent from the result."""

    @abstractmethod
    def put_many(self, items: Mapping[str, np.ndarray], backbone: str) -> None:
        """Store (or replace) embeddings for ``backbone``, all in one write. Vectors are stored
        as float32 (a float32 input comes back bit-for-bit).

        Raises:
            ValueError: see :func:`encode_vectors`.
        """

    @abstractmethod
    def count(self, backbone: str) -> int:
        """How many embeddings are cached for ``backbone``."""
