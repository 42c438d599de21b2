"""The active model version as an HTTP worker sees it: its name and spec (labels, preprocessing),
kept current by a background thread, so that ``/predict`` reads them from memory and never waits
on the state (a shared database may be down: predictions go on with what is loaded).

The thread wakes when the registry announces an activation (or after a short poll), reads the
pointer and makes sure the version's files are on this machine. The spec of a version that an
inference worker reports having run is read from this machine's copy, which that worker fetched
before it swapped.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from models.errors import ModelError
from models.spec import ModelSpec
from store.registry import ModelRegistry

from .errors import ApiError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Ran:
    """What one request's images gave: the version that ran them, its spec, and per image its
    softmax probabilities (N, C) and, if the caller asked for them, backbone embedding (N, E)."""

    version: str
    spec: ModelSpec
    probabilities: np.ndarray
    embeddings: np.ndarray | None


class ActiveVersion:
    def __init__(self, registry: ModelRegistry, *, poll_seconds: float = 0.5) -> None:
        self.registry = registry
        self.poll_seconds = poll_seconds
        self._current: tuple[str, ModelSpec] | ApiError = ApiError(503, "the service is starting: retry shortly")
        self._lock = threading.Lock()
        self._spec_cache = lru_cache(maxsize=64)(self._read_spec)  # versions are immutable: cache forever

    def start(self) -> None:
        self.refresh()
        threading.Thread(target=self._follow, name="active-version", daemon=True).start()

    def current(self) -> tuple[str, ModelSpec]:
        """The active version and its spec; :class:`ApiError` 503 while there is none to serve."""
        current = self._current
        if isinstance(current, ApiError):
            raise current
        return current

    def spec_of(self, version: str) -> ModelSpec:
        """The spec of a version this machine holds; 503 if it cannot be read (a damaged version is
        replaced by the last good one as soon as the inference workers notice)."""
        try:
            return self._spec_cache(version)
        except ModelError as exc:
            log.warning("model version %s cannot be used: %s", version, exc)
            raise ApiError(503, f"model version {version} is damaged (the server log says how); the service is "
                                "switching to the last good version: retry shortly") from None

    def _read_spec(self, version: str) -> ModelSpec:
        copy = self.registry.local_copy(version) or self.registry.get(version)
        return copy.spec

    def refresh(self) -> None:
        """Read the pointer now. If the state cannot be reached, what is known stays in use."""
        try:
            pointer = self.registry.active_pointer()
        except ModelError as exc:
            log.warning("%s", exc)
            self._current = ApiError(503, "the active model pointer is unreadable; the service is switching to "
                                          "the last good version: retry shortly")
            return
        if pointer is None:
            self._current = ApiError(503, "no model version is active yet: run `python -m training bootstrap` "
                                          "(in the trainer image, on the same state)")
            return
        current = self._current
        if isinstance(current, tuple) and current[0] == pointer.version:
            return
        with self._lock:
            try:
                self._current = (pointer.version, self.spec_of(pointer.version))
            except ApiError as exc:
                self._current = exc

    def _follow(self) -> None:
        trouble = ""
        while True:  # a daemon thread: it ends with the worker
            try:
                self.registry.wait_for_change(self.poll_seconds)
                self.refresh()
            except Exception as exc:  # noqa: BLE001 - serve what is known until the state answers again
                if str(exc) != trouble:
                    log.warning("cannot follow the active model version (%s); serving what was active", exc)
                trouble = str(exc)
                threading.Event().wait(self.poll_seconds)
            else:
                if trouble:
                    log.info("following the active model version again")
                trouble = ""
