"""The shared backend: several replicas, one deployment. State and coordination in Postgres
(labels, embeddings, jobs with leases, the version catalogue, activations, replicas, kept
predictions), immutable files in an object store (labelled and kept images by content hash,
version files), and in each replica's
``TRANSFER_SERVE_HOME`` only its verified local copies of versions, job logs and scratch files.
"""

from __future__ import annotations

from functools import cached_property

from ..backend import Backend
from ..settings import StoreSettings
from .database import PostgresDatabase
from .embeddings import PostgresEmbeddingCache
from .jobs import PostgresJobStore
from .labels import PostgresLabelStore
from .objects import ObjectStore, open_object_store
from .predictions import PostgresPredictionStore
from .registry import SharedRegistry


class SharedBackend(Backend):
    """The stores of a shared deployment; the schema is created or migrated when the first store
    opens, the connection pool on first use, in each process."""

    def __init__(self, settings: StoreSettings) -> None:
        if settings.database_url is None:
            raise ValueError("the shared backend needs TRANSFER_SERVE_DATABASE_URL")
        self.settings = settings
        self._database_url = settings.database_url.get_secret_value()

    @cached_property
    def _database(self) -> PostgresDatabase:
        return PostgresDatabase.open(self._database_url)

    @cached_property
    def _objects(self) -> ObjectStore:
        return open_object_store(self.settings.object_store, self.settings.home)

    def open_registry(self) -> SharedRegistry:
        return SharedRegistry(self._database, self._objects, self.settings.home)

    def open_labels(self) -> PostgresLabelStore:
        return PostgresLabelStore(self._database, self._objects)

    def open_embeddings(self) -> PostgresEmbeddingCache:
        return PostgresEmbeddingCache(self._database)

    def open_jobs(self) -> PostgresJobStore:
        return PostgresJobStore(self._database, self.settings.home, self.settings.replica_id,
                                self.settings.job_lease_s)

    def open_predictions(self) -> PostgresPredictionStore:
        return PostgresPredictionStore(self._database, self._objects)
