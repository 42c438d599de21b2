"""Keeping predictions for review without slowing ``/predict`` down.

An HTTP worker offers each predicted image with probability ``TRANSFER_SERVE_KEEP_PREDICTIONS``;
an offer only puts the image's bytes and results on a bounded queue (:meth:`PredictionKeeper.offer`
never blocks, and says whether it was taken: only a taken offer gets a ``prediction_id`` in the
response). One background thread per worker drains the queue in small batches into the state
(:class:`store.predictions.PredictionStore`, shared when replicas share state), and every few
seconds removes what is over ``TRANSFER_SERVE_KEEP_MAX_ITEMS`` or older than
``TRANSFER_SERVE_KEEP_MAX_DAYS``.

What is dropped is counted (``transfer_serve_kept_predictions``): offers that find the queue full,
and batches the state cannot take. A state that cannot take writes (disk full, read-only) stops
keeping with one ERROR line; predictions go on, and keeping is tried again every
:data:`RETRY_AFTER_S` (one INFO line when it works again).
"""

from __future__ import annotations

import logging
import queue
import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import numpy as np

from models.review import margin, normalised_entropy
from store.errors import StoreUnavailable, storage_failure
from store.predictions import NewPrediction, PredictionStore, new_prediction_id

from .metrics import count_kept

log = logging.getLogger(__name__)

#: Predictions written per transaction: fewer commits under load, small enough to stay quick.
WRITE_BATCH = 32
#: How long the writer gathers offers into a batch after the first: each write opens the
#: database and commits once, so under load a full batch costs far less per prediction than one
#: written the moment it arrives (bench/README.md, "Keeping predictions for review").
GATHER_S = 1.0
#: How often the writer applies the retention limits, and how long it waits for work meanwhile.
PRUNE_EVERY_S = 5.0
#: After the state refused a write: how long keeping pauses before it tries again.
RETRY_AFTER_S = 60.0
#: Labels and scores stored per kept prediction (the review page shows them as choices).
KEPT_TOP_K = 5


@dataclass(frozen=True)
class Offer:
    """What the request path hands over: the rest (hash, uncertainty, top-k) is worked out by
    the writer thread."""

    prediction_id: str
    image: bytes
    version: str
    labels: Sequence[str]
    probabilities: np.ndarray  # (C,)
    embedding: np.ndarray | None  # (E,)
    created_at: datetime


def to_new_prediction(offer: Offer) -> NewPrediction:
    """The record the store keeps for an offer."""
    probabilities = offer.probabilities[None, :]
    best = np.argsort(-offer.probabilities)[:KEPT_TOP_K]
    return NewPrediction(
        prediction_id=offer.prediction_id, image=offer.image,
        version=offer.version, label=offer.labels[int(best[0])], score=float(offer.probabilities[best[0]]),
        margin=float(margin(probabilities)[0]), entropy=float(normalised_entropy(probabilities)[0]),
        top_k=tuple((offer.labels[int(i)], float(offer.probabilities[i])) for i in best),
        created_at=offer.created_at, embedding=offer.embedding)


class PredictionKeeper:
    """The sampling, the bounded queue and the writer thread of one HTTP worker."""

    def __init__(self, open_store: Callable[[], PredictionStore], *, fraction: float, max_items: int,
                 max_days: float, queue_size: int, rng: random.Random | None = None) -> None:
        self.open_store = open_store  # opened in the writer thread, on first use
        self.fraction = fraction
        self.max_items = max_items
        self.max_age = timedelta(days=max_days)
        self._queue: queue.Queue[Offer | None] = queue.Queue(maxsize=queue_size)
        # not for security: which images are kept; the ids come from the OS's CSPRNG
        self._rng = rng or random.Random()  # noqa: S311
        self._paused_until = 0.0  # monotonic time; after a refused write
        self._problem = ""  # the last failure logged, so each is logged once
        self._thread: threading.Thread | None = None

    @property
    def enabled(self) -> bool:
        return self.fraction > 0

    def new_id(self) -> str | None:
        """A prediction id if this image is to be kept (sampled, and keeping not paused), else None."""
        if not self.enabled or self._rng.random() >= self.fraction:
            return None
        if time.monotonic() < self._paused_until:
            count_kept("dropped_storage")
            return None
        return new_prediction_id()

    def offer(self, offer: Offer) -> bool:
        """Queue ``offer`` for writing; False (and counted) if the queue is full. Never blocks."""
        try:
            self._queue.put_nowait(offer)
        except queue.Full:
            count_kept("dropped_queue_full")
            return False
        return True

    def start(self) -> None:
        if self.enabled and self._thread is None:
            self._thread = threading.Thread(target=self._write_loop, name="prediction-keeper", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Write what is queued, then end the writer (at most ``timeout`` seconds)."""
        if self._thread is not None:
            try:
                self._queue.put(None, timeout=timeout)
            except queue.Full:
                return
            self._thread.join(timeout)
            self._thread = None

    # -- the writer thread ----------------------------------------------------------------------

    def _write_loop(self) -> None:
        store: PredictionStore | None = None
        last_prune = 0.0
        while True:
            batch, stop = self._next_batch()
            try:
                store = store or self.open_store()
                if batch:
                    self._write(store, batch)
                if time.monotonic() - last_prune >= PRUNE_EVERY_S:
                    last_prune = time.monotonic()
                    store.prune(max_items=self.max_items, older_than=datetime.now(UTC) - self.max_age)
            except Exception as exc:  # noqa: BLE001 - keeping must never stop predictions, nor this thread
                self._failed(exc, len(batch))
            if stop:
                return

    def _next_batch(self) -> tuple[list[Offer], bool]:
        """Up to :data:`WRITE_BATCH` offers (waiting at most :data:`PRUNE_EVERY_S` for the first,
        then at most :data:`GATHER_S` for the rest), and whether :meth:`stop` asked the thread to
        end (then at once, with what is queued)."""
        batch: list[Offer] = []
        try:
            item = self._queue.get(timeout=PRUNE_EVERY_S)
            gathered_by = time.monotonic() + GATHER_S
            while item is not None:
                batch.append(item)
                if len(batch) >= WRITE_BATCH:
                    break
                item = self._queue.get(timeout=max(0.0, gathered_by - time.monotonic()))
        except queue.Empty:
            return batch, False
        return batch, item is None

    def _write(self, store: PredictionStore, batch: list[Offer]) -> None:
        store.add_many([to_new_prediction(offer) for offer in batch])
        count_kept("kept", len(batch))
        if self._problem:
            log.info("keeping predictions again (%d written)", len(batch))
            self._problem = ""

    def _failed(self, exc: Exception, dropped: int) -> None:
        failure = storage_failure(exc, "keeping predictions")
        if failure is not None:
            count_kept("dropped_storage", dropped)
            self._paused_until = time.monotonic() + RETRY_AFTER_S
            problem = f"keeping predictions stopped: {failure}; predictions go on, keeping is retried every " \
                      f"{RETRY_AFTER_S:.0f} s"
            level = logging.ERROR
        else:
            count_kept("dropped_error", dropped)
            what = "the state is unreachable" if isinstance(exc, StoreUnavailable) else "keeping predictions failed"
            problem = f"{what} ({exc}); {dropped} prediction(s) not kept; predictions go on"
            level = logging.WARNING
        if problem != self._problem:  # one line per problem, not one per batch
            log.log(level, problem)
        self._problem = problem
