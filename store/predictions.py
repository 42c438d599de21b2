"""Kept predictions: images the served model saw, with what it answered, kept (opt-in, a sampled
fraction) so that an operator can review the least certain, confirm or correct them, and the next
retrain learns from them.

These are users' images: the service keeps none unless ``TRANSFER_SERVE_KEEP_PREDICTIONS`` is set,
and the oldest go first once there are more than ``TRANSFER_SERVE_KEEP_MAX_ITEMS`` or they are older
than ``TRANSFER_SERVE_KEEP_MAX_DAYS`` (:meth:`PredictionStore.prune`). An image is stored once by
content hash however often it was predicted, apart from the label store's copy (an image an
operator labels is copied there and stays when its kept prediction goes).

A kept prediction is *unlabelled* while its image is not in the label store: those are the review
queue's candidates (:meth:`PredictionStore.unlabelled`).

This module holds what every backend shares: the records, the id rule, the interface, and the
encodings both backends store (top-k as a JSON list of ``[label, score]``, the embedding as raw
little-endian float32 bytes, never pickle).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import secrets
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

import numpy as np

from models.errors import InputError

from .embeddings import decode_vector, encode_vectors

log = logging.getLogger(__name__)

_PREDICTION_ID_RE = re.compile(r"[0-9a-f]{32}")
#: How the review queue orders candidates: smallest margin between the top two scores first, or
#: highest entropy of the scores (normalised by the number of labels) first.
ReviewOrder = Literal["margin", "entropy"]


class PredictionNotFoundError(InputError, LookupError):
    """No kept prediction has that id (or the id does not have the form of one)."""


class DamagedImageError(PredictionNotFoundError):
    """A kept image's bytes no longer match its content hash (see :func:`checked_image`): to
    callers, the same as an image that is gone."""


def new_prediction_id() -> str:
    """A random, unguessable prediction id: 128 bits from the OS's CSPRNG, 32 lowercase hex."""
    return secrets.token_hex(16)


def is_prediction_id(value: object) -> bool:
    """Whether ``value`` has the form of a prediction id: 32 lowercase hex digits."""
    return isinstance(value, str) and _PREDICTION_ID_RE.fullmatch(value) is not None


@dataclass(frozen=True)
class NewPrediction:
    """A prediction to keep, as the serving worker made it. ``image_id`` is worked out from
    ``image``, so the content address a backend files the image under is right by construction
    (and hashed once, in the serving worker's writer thread)."""

    prediction_id: str
    image: bytes  #: the bytes the client sent
    version: str  #: the model version that answered
    label: str  #: its top-1 label
    score: float  #: its top-1 score
    margin: float  #: top-1 score minus top-2 score (1.0 for a one-label model)
    entropy: float  #: entropy of the scores / log(number of labels), in [0, 1]
    top_k: tuple[tuple[str, float], ...]  #: the best few labels and scores, best first
    created_at: datetime  #: when it was predicted, timezone-aware UTC
    #: the backbone's embedding of the image as served (None if the worker did not send one)
    embedding: np.ndarray | None = None
    image_id: str = field(init=False)  #: SHA-256 of ``image``, lowercase hex

    def __post_init__(self) -> None:
        object.__setattr__(self, "image_id", hashlib.sha256(self.image).hexdigest())


@dataclass(frozen=True)
class KeptPrediction:
    """A kept prediction as stored (the image's bytes are read apart: :meth:`PredictionStore.read_image`)."""

    prediction_id: str
    image_id: str
    version: str
    label: str
    score: float
    margin: float
    entropy: float
    top_k: tuple[tuple[str, float], ...]
    created_at: datetime
    embedding: np.ndarray | None = None


class PredictionStore(ABC):
    """Kept predictions and their images. Safe to use from many threads and processes at once."""

    @abstractmethod
    def add_many(self, predictions: Sequence[NewPrediction]) -> None:
        """Keep predictions, all or none, each image stored once by content (a prediction id
        already stored, or twice in ``predictions``, is kept once, as it was first).

        Raises:
            ValueError: a prediction breaks :func:`check_new_prediction`; nothing was kept.
            StorageError: the state cannot take the write; nothing was kept.
        """

    @abstractmethod
    def get(self, prediction_id: str) -> KeptPrediction:
        """One kept prediction, embedding included.

        Raises:
            PredictionNotFoundError: none has that id (including ids of the wrong form).
        """

    @abstractmethod
    def read_image(self, prediction_id: str) -> bytes:
        """The kept prediction's image bytes.

        Raises:
            PredictionNotFoundError: none has that id, or it was removed meanwhile.
        """

    @abstractmethod
    def delete(self, prediction_id: str) -> bool:
        """Remove a kept prediction, and its image unless another kept prediction has the same
        bytes. False if there is none with that id (including ids of the wrong form)."""

    @abstractmethod
    def unlabelled(self, *, order: ReviewOrder, limit: int) -> list[KeptPrediction]:
        """Up to ``limit`` kept predictions whose image is not in the label store, one per image
        (its newest prediction), least certain first (see :data:`ReviewOrder`; ties: newest first),
        embeddings included.

        Raises:
            ValueError: ``order`` is not a :data:`ReviewOrder` or ``limit`` is negative.
        """

    @abstractmethod
    def count(self) -> int:
        """How many predictions are kept."""

    @abstractmethod
    def prune(self, *, max_items: int | None, older_than: datetime | None) -> int:
        """Remove the kept predictions created before ``older_than``, then the oldest beyond the
        newest ``max_items``, with the images no remaining prediction uses; returns how many
        predictions went. None: no limit of that kind.

        Cheap when there is nothing to remove (one count and one indexed look-up, no write lock):
        the service calls it every few seconds.

        Raises:
            ValueError: ``max_items`` is negative or ``older_than`` is not timezone-aware.
        """


# -- what both backends store -------------------------------------------------------------------

def check_new_prediction(prediction: NewPrediction) -> None:
    """Raise ValueError unless ``prediction`` can be stored as it is: a well-formed prediction
    id, finite scores, a timezone-aware ``created_at`` and a 1-D embedding or none."""
    if not is_prediction_id(prediction.prediction_id):
        raise ValueError(f"{prediction.prediction_id!r} is not a prediction id (32 lowercase hex digits)")
    scores = [prediction.score, prediction.margin, prediction.entropy, *(score for _, score in prediction.top_k)]
    if not all(isinstance(s, int | float) and math.isfinite(s) for s in scores):
        raise ValueError(f"prediction {prediction.prediction_id}: scores, margin and entropy must be finite numbers")
    check_aware(prediction.created_at, "created_at")
    encode_embedding(prediction)


def checked_image(image_id: str, data: bytes) -> bytes:
    """A kept image's bytes as read back, if they are still the bytes of ``image_id`` (its
    SHA-256). Backends write kept images without flushing each to disk (a sample kept for review
    is not worth a disk flush per prediction), so a power cut can leave a file of the right size
    with the wrong bytes: this check is what keeps those from being shown or labelled.

    Raises:
        DamagedImageError: they are not.
    """
    if hashlib.sha256(data).hexdigest() != image_id:
        problem = f"kept image {image_id} is damaged (its bytes no longer match its SHA-256)"
        log.warning("kept predictions: %s; treated as gone", problem)
        raise DamagedImageError(problem)
    return data


def check_aware(moment: datetime, name: str) -> None:
    """Raise ValueError if ``moment`` is naive (its time zone unknown: it cannot be ordered)."""
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ValueError(f"{name} must be timezone-aware, got {moment.isoformat()}")


#: The columns of the ``predictions`` table, in the order both backends read and write them.
COLUMNS = "id, image_id, version, label, score, margin, entropy, top_k, created_at, dim, vector"

#: The SQL ``ORDER BY`` of each review order, least certain first, ties newest first (then by id,
#: so that the order is total); the same text on SQLite and Postgres.
_REVIEW_ORDER_SQL: dict[str, str] = {
    "margin": "margin ASC, created_at DESC, id DESC",
    "entropy": "entropy DESC, created_at DESC, id DESC",
}


def review_order_sql(order: ReviewOrder, limit: int) -> str:
    """The ``ORDER BY`` clause of :meth:`PredictionStore.unlabelled`'s ``order``, once ``order``
    and ``limit`` are checked (ValueError otherwise)."""
    if order not in _REVIEW_ORDER_SQL:
        raise ValueError(f"order must be one of {sorted(_REVIEW_ORDER_SQL)}, got {order!r}")
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
        raise ValueError(f"limit must be a whole number, 0 or more, got {limit!r}")
    return _REVIEW_ORDER_SQL[order]


def check_max_items(max_items: int | None) -> None:
    """Raise ValueError unless ``max_items`` (of :meth:`PredictionStore.prune`) is None or >= 0."""
    if max_items is not None and (isinstance(max_items, bool) or not isinstance(max_items, int) or max_items < 0):
        raise ValueError(f"max_items must be None or a whole number, 0 or more, got {max_items!r}")


def encode_top_k(top_k: Sequence[tuple[str, float]]) -> str:
    """The top-k as stored: a JSON list of ``[label, score]``, best first."""
    return json.dumps([[str(label), float(score)] for label, score in top_k])


def decode_top_k(stored: str | list[Any]) -> tuple[tuple[str, float], ...]:
    """:func:`encode_top_k`'s JSON (or the list a JSONB column decodes to) as the record's tuples."""
    items = json.loads(stored) if isinstance(stored, str) else stored
    return tuple((str(label), float(score)) for label, score in items)


def encode_embedding(prediction: NewPrediction) -> tuple[int | None, bytes | None]:
    """``(dim, bytes)`` of the prediction's embedding as raw little-endian float32 (the embedding
    cache's encoding), or ``(None, None)`` without one.

    Raises:
        ValueError: the embedding is not a non-empty 1-D array.
    """
    if prediction.embedding is None:
        return None, None
    ((_, dim, blob),) = encode_vectors({prediction.prediction_id: prediction.embedding}, prediction.version or "?")
    return dim, blob


def decode_embedding(prediction_id: str, dim: int | None, blob: bytes | None) -> np.ndarray | None:
    """The stored embedding as a writable float32 array; None if there is none, or if its bytes
    do not hold ``dim`` values (damaged: logged, and the prediction is still usable without it)."""
    if dim is None or blob is None:
        return None
    vector = decode_vector(dim, bytes(blob))
    if vector is None:
        log.warning("kept predictions: %s has a damaged embedding; ignoring it", prediction_id)
    return vector
