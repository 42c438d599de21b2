"""The shared backend's Postgres database: a connection pool per process, the schema and its
version, and the translation of "cannot reach the database" into
:class:`~store.errors.StoreUnavailable`.

The schema has a version (table ``schema_version``) and :data:`MIGRATIONS` lists the steps from
each version to the next, in order. :meth:`PostgresDatabase.open` runs the missing ones in one
transaction that first takes an advisory lock, so replicas starting together migrate once; a
database written by a newer release is refused rather than misread.

Connections are checked when taken from the pool (a restarted server leaves dead ones behind), and
taking one waits at most :data:`CONNECT_TIMEOUT_S`: an admin request while the database is down
fails in seconds with a 503, and the next one after it is back succeeds, without a restart.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from typing import Any

from ..errors import StoreUnavailable
from ..schema import Migration, apply_missing, check_numbering

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 3
#: pg_advisory_xact_lock key of schema migrations (any constant; ours is "tsrv" in ASCII)
MIGRATION_LOCK = 0x74737276
#: the channel every activation is announced on (Postgres LISTEN/NOTIFY)
ACTIVE_CHANNEL = "transfer_serve_active"

MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "labels, embeddings, jobs with leases, the version catalogue, activations, replicas", (
        """CREATE TABLE images (
            id TEXT PRIMARY KEY,              -- sha256 of the bytes; the object is images/<2 hex>/<id>
            label TEXT NOT NULL,
            size INTEGER NOT NULL,
            width INTEGER NOT NULL,
            height INTEGER NOT NULL,
            created_at TEXT NOT NULL,
            updated_at TEXT NOT NULL
        )""",
        """CREATE TABLE embeddings (
            image_id TEXT NOT NULL,
            backbone TEXT NOT NULL,
            dim INTEGER NOT NULL,
            vector BYTEA NOT NULL,            -- dim float32 values, little-endian
            PRIMARY KEY (image_id, backbone)
        )""",
        """CREATE TABLE jobs (
            id TEXT PRIMARY KEY,
            state TEXT NOT NULL,
            phase TEXT NOT NULL,
            progress DOUBLE PRECISION NOT NULL DEFAULT 0,
            params JSONB NOT NULL DEFAULT '{}',
            metrics JSONB,
            version TEXT,
            parent TEXT,
            error TEXT,
            pid INTEGER,
            replica TEXT NOT NULL,            -- where the job runs
            lease_until TIMESTAMPTZ NOT NULL, -- renewed by the job; past it, anyone fails the job
            created_at TEXT NOT NULL,
            updated_at TEXT NOT NULL,
            finished_at TEXT
        )""",
        # one retrain at a time per deployment: a second queued or running job cannot be inserted
        "CREATE UNIQUE INDEX jobs_one_active ON jobs ((true)) WHERE state IN ('queued', 'running')",
        "CREATE SEQUENCE version_numbers",
        """CREATE TABLE versions (
            number INTEGER PRIMARY KEY,       -- vN; the row makes the version visible
            created_at TEXT NOT NULL,
            manifest JSONB NOT NULL,          -- file -> sha256, every file in versions/vN/ of the object store
            info JSONB NOT NULL,
            metrics JSONB NOT NULL,
            spec JSONB NOT NULL
        )""",
        """CREATE TABLE activations (
            id BIGSERIAL PRIMARY KEY,         -- the newest row names the active version
            version TEXT NOT NULL,
            activated_at TEXT NOT NULL,
            fallback_from JSONB
        )""",
        """CREATE TABLE replicas (
            id TEXT PRIMARY KEY,
            version TEXT,
            variant TEXT,
            last_seen TIMESTAMPTZ NOT NULL
        )""",
    )),
    Migration(2, "a domain tag per labelled image; a kind per job (retrain, adapt)", (
        "ALTER TABLE images ADD COLUMN domain TEXT",
        "ALTER TABLE jobs ADD COLUMN kind TEXT NOT NULL DEFAULT 'retrain'",
    )),
    Migration(3, "kept predictions and their images", (
        """CREATE TABLE kept_images (
            id TEXT PRIMARY KEY,              -- sha256 of the bytes; the object is kept/<2 hex>/<id>
            size INTEGER NOT NULL,
            created_at TIMESTAMPTZ NOT NULL
        )""",
        """CREATE TABLE predictions (
            id TEXT PRIMARY KEY,              -- 32 lowercase hex, random
            image_id TEXT NOT NULL REFERENCES kept_images (id),
            version TEXT NOT NULL,            -- the model version that answered
            label TEXT NOT NULL,
            score DOUBLE PRECISION NOT NULL,
            margin DOUBLE PRECISION NOT NULL, -- top-1 score minus top-2 score
            entropy DOUBLE PRECISION NOT NULL,-- normalised to [0, 1]
            top_k JSONB NOT NULL,             -- list of [label, score], best first
            created_at TIMESTAMPTZ NOT NULL,
            dim INTEGER,                      -- the embedding, if the worker sent one:
            vector BYTEA                      -- dim float32 values, little-endian
        )""",
        "CREATE INDEX predictions_by_created_at ON predictions (created_at)",
        "CREATE INDEX predictions_by_image ON predictions (image_id, created_at)",
        "CREATE INDEX predictions_by_margin ON predictions (margin)",
        "CREATE INDEX predictions_by_entropy ON predictions (entropy)",
    )),
)


def unavailable(exc: BaseException) -> StoreUnavailable:
    return StoreUnavailable("the database", type(exc).__name__ + (f": {str(exc).splitlines()[0]}" if str(exc) else ""))


class PostgresDatabase:
    """The shared database of a deployment; connections from a pool opened on first use."""

    def __init__(self, url: str, *, max_connections: int = 4) -> None:
        self._url = url  # holds the password: never logged
        self._max_connections = max_connections
        self._pool: Any = None

    @property
    def pool(self) -> Any:
        if self._pool is None:
            from psycopg_pool import ConnectionPool

            self._pool = ConnectionPool(
                self._url, min_size=0, max_size=self._max_connections, open=True, timeout=CONNECT_TIMEOUT_S,
                check=ConnectionPool.check_connection, name="transfer-serve",
                kwargs={"autocommit": True, "connect_timeout": CONNECT_TIMEOUT_S})
        return self._pool

    @contextlib.contextmanager
    def connect(self) -> Iterator[Any]:
        """A pooled connection in autocommit mode, with rows as dicts."""
        import psycopg
        from psycopg.rows import dict_row
        from psycopg_pool import PoolTimeout

        try:
            with self.pool.connection() as conn:
                conn.row_factory = dict_row
                yield conn
        except (PoolTimeout, psycopg.OperationalError, psycopg.InterfaceError) as exc:
            raise unavailable(exc) from exc

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Any]:
        """A pooled connection inside one transaction (committed when the block ends)."""
        with self.connect() as conn, conn.transaction():
            yield conn

    def listener(self) -> Any:
        """A connection of its own (not pooled), for LISTEN; None if the database cannot be reached."""
        import psycopg

        try:
            conn = psycopg.connect(self._url, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S)
            conn.execute(f"LISTEN {ACTIVE_CHANNEL}")
        except psycopg.Error as exc:
            log.warning("cannot listen for activations (%s); polling instead", unavailable(exc))
            return None
        return conn

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()

    @classmethod
    def open(cls, url: str) -> PostgresDatabase:
        """The database at ``url``, its schema created or migrated as needed."""
        database = cls(url)
        with database.connect() as conn:
            applied = migrate(conn)
        if applied:
            log.info("database migrated to schema version %d (applied %s)", applied[-1], ", ".join(map(str, applied)))
        return database


def migrate(conn: Any, migrations: Sequence[Migration] = MIGRATIONS) -> list[int]:
    """Bring the database to the newest schema version, under an advisory lock; returns the
    versions applied."""
    latest = check_numbering(migrations)
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
        conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
        row = conn.execute("SELECT version FROM schema_version").fetchone()
        applied = apply_missing(conn, migrations, int(row["version"]) if row else 0, "the database")
        if row is None:
            conn.execute("INSERT INTO schema_version (version) VALUES (%s)", (latest,))
        elif applied:
            conn.execute("UPDATE schema_version SET version = %s", (latest,))
    return applied
