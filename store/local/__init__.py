"""The single-machine backend: everything in one state directory, ``TRANSFER_SERVE_HOME``.

``transfer-serve.db`` (SQLite, WAL: labels, embeddings, jobs, kept predictions), ``labels/images/``
(labelled image files by content hash), ``kept/images/`` (kept predictions' images, likewise),
``versions/vN/`` (model versions) and ``active_version.json`` (the active pointer). Every process on
the machine may open it at once.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

from ..backend import Backend
from .database import Database
from .embeddings import SqliteEmbeddingCache
from .jobs import SqliteJobStore
from .labels import SqliteLabelStore
from .predictions import SqlitePredictionStore
from .registry import DirectoryRegistry


class LocalBackend(Backend):
    """The stores of one state directory; the database is created or migrated when the first
    store that needs it opens."""

    def __init__(self, home: Path) -> None:
        self.home = Path(home)

    @cached_property
    def _database(self) -> Database:
        return Database.open(self.home)

    def open_registry(self) -> DirectoryRegistry:
        return DirectoryRegistry(self.home)

    def open_labels(self) -> SqliteLabelStore:
        return SqliteLabelStore(self.home, self._database)

    def open_embeddings(self) -> SqliteEmbeddingCache:
        return SqliteEmbeddingCache(self._database)

    def open_jobs(self) -> SqliteJobStore:
        return SqliteJobStore(self.home, self._database)

    def open_predictions(self) -> SqlitePredictionStore:
        return SqlitePredictionStore(self.home, self._database)
