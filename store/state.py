"""The one factory of stores: :func:`open_state` reads the settings, picks the backend, and hands
out each store on first use (a serving worker that only reads the registry never opens the
database)."""

from __future__ import annotations

import os
from functools import cached_property
from pathlib import Path

from .backend import Backend
from .embeddings import EmbeddingCache
from .jobs import JobStore
from .labels import LabelStore
from .predictions import PredictionStore
from .registry import ModelRegistry
from .settings import StoreSettings


class State:
    """The stores of one deployment, each opened when first used and kept for the process."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend

    @cached_property
    def registry(self) -> ModelRegistry:
        return self.backend.open_registry()

    @cached_property
    def labels(self) -> LabelStore:
        return self.backend.open_labels()

    @cached_property
    def embeddings(self) -> EmbeddingCache:
        return self.backend.open_embeddings()

    @cached_property
    def jobs(self) -> JobStore:
        return self.backend.open_jobs()

    @cached_property
    def predictions(self) -> PredictionStore:
        return self.backend.open_predictions()


def open_state(settings: StoreSettings | None = None, *, home: str | os.PathLike[str] | None = None) -> State:
    """The stores the settings describe (read from the environment if not given; ``home``
    overrides their state directory): the shared backend when a database URL is set, else the
    single-machine one in ``settings.home``."""
    settings = settings or StoreSettings()
    if home is not None:
        settings = settings.model_copy(update={"home": Path(home).expanduser().resolve()})
    settings.home.mkdir(parents=True, exist_ok=True)
    if settings.shared:
        from .shared import SharedBackend

        return State(SharedBackend(settings))
    from .local import LocalBackend

    return State(LocalBackend(settings.home))
