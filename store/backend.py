"""What a storage backend provides: one implementation of each store's interface."""

from __future__ import annotations

from abc import ABC, abstractmethod

from .embeddings import EmbeddingCache
from .jobs import JobStore
from .labels import LabelStore
from .predictions import PredictionStore
from .registry import ModelRegistry


class Backend(ABC):
    """Opens the stores of one deployment."""

    @abstractmethod
    def open_registry(self) -> ModelRegistry: ...

    @abstractmethod
    def open_labels(self) -> LabelStore: ...

    @abstractmethod
    def open_embeddings(self) -> EmbeddingCache: ...

    @abstractmethod
    def open_jobs(self) -> JobStore: ...

    @abstractmethod
    def open_predictions(self) -> PredictionStore: ...
