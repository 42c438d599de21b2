"""The single-machine backend's SQLite database: one file, ``$TRANSFER_SERVE_HOME/transfer-serve.db``,
shared by the serving workers, the retrain job and the CLI.

Every process and every thread opens its own connection (:meth:`Database.connect`) and closes it
when done; a connection is never shared, so ``check_same_thread`` keeps its default. The database
runs in WAL mode, so readers never block the one writer, and connections are in autocommit mode:
a read-modify-write goes inside :func:`transaction`, which starts with ``BEGIN IMMEDIATE`` so the
write lock is taken before the read and two writers cannot both act on a stale read. A writer
that finds the lock held waits up to :data:`BUSY_TIMEOUT_S` for it.

The schema has a version, SQLite's ``PRAGMA user_version``, and :data:`MIGRATIONS` lists the
steps from each version to the next, in order. :meth:`Database.open` runs the missing ones in one
``BEGIN IMMEDIATE`` transaction, so processes starting together migrate once, and a database
written by a newer release (a higher version than this code knows) is refused rather than
misread. A database from before versioning (version 0, written by eb365a9 and earlier) has
exactly migration 1's tables, which that step creates only where missing.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import sqlite3
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from ..errors import storage_errors
from ..schema import Migration, apply_missing, check_numbering

log = logging.getLogger(__name__)

DATABASE_FILENAME = "transfer-serve.db"

#: How long a connection waits for another writer's lock before raising "database is locked".
BUSY_TIMEOUT_S = 30.0


def database_path(home: Path) -> Path:
    """Where the database lives inside the state directory."""
    return Path(home) / DATABASE_FILENAME


def connect(path: Path) -> sqlite3.Connection:
    """Open the database at ``path`` (creating it and its parent directories if missing).

    The connection is in autocommit mode (``isolation_level=None``), with WAL journaling,
    ``synchronous=NORMAL`` (durable at each checkpoint, never corrupt), foreign keys enforced and
    a 30 s busy timeout. Use it from the thread that opened it only, and close it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    conn: sqlite3.Connection | None = None
    try:
        conn = sqlite3.connect(path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
        conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
        _use_wal(conn)
        conn.execute("PRAGMA synchronous = NORMAL")
        conn.execute("PRAGMA foreign_keys = ON")
    except BaseException as exc:
        if conn is not None:
            conn.close()
        # SQLite says only "unable to open database file" or "disk I/O error" when a WAL
        # database's -shm file cannot be created; say why when the volume is the reason
        if isinstance(exc, sqlite3.Error) and (code := _volume_problem(path)):
            raise OSError(code, os.strerror(code), str(path)) from exc
        raise
    return conn


#: Less free space than this when a connection cannot be opened: the volume is full (the -shm
#: file SQLite must create takes 32 KiB).
_MIN_FREE_BYTES = 64 * 1024


def _volume_problem(path: Path) -> int | None:
    """EROFS or ENOSPC if the volume holding ``path`` is read-only or (nearly) full."""
    try:
        stats = os.statvfs(path.parent)
    except OSError:
        return None
    if stats.f_flag & os.ST_RDONLY:
        return errno.EROFS
    if stats.f_bavail * stats.f_frsize < _MIN_FREE_BYTES:
        return errno.ENOSPC
    return None


def _use_wal(conn: sqlite3.Connection) -> None:
    # WAL mode is a property of the database file and persists, so only the first connection
    # ever switches it. That switch needs an exclusive lock, and SQLite answers "locked"
    # without calling the busy handler when another process is opening the same fresh file at
    # the same instant; retry for as long as the busy timeout would have waited.
    deadline = time.monotonic() + BUSY_TIMEOUT_S
    while True:
        try:
            (mode,) = conn.execute("PRAGMA journal_mode").fetchone()
            if str(mode).lower() != "wal":
                conn.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.01)


@contextlib.contextmanager
def connected(path: Path) -> Iterator[sqlite3.Connection]:
    """:func:`connect`, yielding the connection and closing it afterwards.

    (``with sqlite3.Connection`` only ends a transaction; it never closes the connection.)
    """
    conn = connect(path)
    try:
        yield conn
    finally:
        conn.close()


@contextlib.contextmanager
def transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """``BEGIN IMMEDIATE`` ... ``COMMIT``; ``ROLLBACK`` if the block (or the commit) raises.

    The write lock is held from the start, so reads inside the block see the state the block's
    writes will be applied to.
    """
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


# -- schema versions ----------------------------------------------------------------------------

MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "labelled images, the embedding cache and retrain jobs (the unversioned schema of eb365a9)", (
        """CREATE TABLE IF NOT EXISTS images (
            id TEXT PRIMARY KEY,          -- sha256 of the file's bytes, lowercase hex
            label TEXT NOT NULL,
            size INTEGER,                 -- bytes
            width INTEGER,                -- pixels, after EXIF orientation
            height INTEGER,
            created_at TEXT,              -- ISO 8601, UTC
            updated_at TEXT
        )""",
        """CREATE TABLE IF NOT EXISTS embeddings (
            image_id TEXT NOT NULL,       -- sha256 of the image bytes, lowercase hex
            backbone TEXT NOT NULL,       -- fingerprint of the backbone graph and weights
            dim INTEGER NOT NULL,
            vector BLOB NOT NULL,         -- dim float32 values, little-endian
            PRIMARY KEY (image_id, backbone)
        )""",
        """CREATE TABLE IF NOT EXISTS jobs (
            id TEXT PRIMARY KEY,
            state TEXT NOT NULL,
            phase TEXT NOT NULL,
            progress REAL NOT NULL DEFAULT 0,
            params TEXT NOT NULL DEFAULT '{}',
            metrics TEXT,
            version TEXT,
            parent TEXT,
            error TEXT,
            pid INTEGER,
            created_at TEXT NOT NULL,
            updated_at TEXT NOT NULL,
            finished_at TEXT
        )""",
    )),
    Migration(2, "a domain tag per labelled image; a kind per job (retrain, adapt)", (
        "ALTER TABLE images ADD COLUMN domain TEXT",
        "ALTER TABLE jobs ADD COLUMN kind TEXT NOT NULL DEFAULT 'retrain'",
    )),
    Migration(3, "kept predictions and their images", (
        """CREATE TABLE kept_images (
            id TEXT PRIMARY KEY,          -- sha256 of the bytes; the file is kept/images/<2 hex>/<id>
            size INTEGER NOT NULL,        -- bytes
            created_at TEXT NOT NULL      -- ISO 8601, UTC
        )""",
        """CREATE TABLE predictions (
            id TEXT PRIMARY KEY,          -- 32 lowercase hex, random
            image_id TEXT NOT NULL REFERENCES kept_images (id),
            version TEXT NOT NULL,        -- the model version that answered
            label TEXT NOT NULL,
            score REAL NOT NULL,
            margin REAL NOT NULL,         -- top-1 score minus top-2 score
            entropy REAL NOT NULL,        -- normalised to [0, 1]
            top_k TEXT NOT NULL,          -- JSON list of [label, score], best first
            created_at TEXT NOT NULL,     -- ISO 8601 UTC, microseconds, fixed width: text order is time order
            dim INTEGER,                  -- the embedding, if the worker sent one:
            vector BLOB                   -- dim float32 values, little-endian
        )""",
        "CREATE INDEX predictions_by_created_at ON predictions (created_at)",
        "CREATE INDEX predictions_by_image ON predictions (image_id, created_at)",
        "CREATE INDEX predictions_by_margin ON predictions (margin)",
        "CREATE INDEX predictions_by_entropy ON predictions (entropy)",
    )),
)


def schema_version(conn: sqlite3.Connection) -> int:
    (version,) = conn.execute("PRAGMA user_version").fetchone()
    return int(version)


def migrate(conn: sqlite3.Connection, migrations: Sequence[Migration] = MIGRATIONS) -> list[int]:
    """Bring the database to the newest schema version; returns the versions applied (none if
    it was current). All missing steps and the new version number commit together.

    Raises:
        SchemaTooNewError: the database's version is above every migration this code knows.
    """
    latest = check_numbering(migrations)
    if schema_version(conn) == latest:  # the common case: no write lock needed
        return []
    with transaction(conn):
        current = schema_version(conn)  # another process may have migrated meanwhile
        applied = apply_missing(conn, migrations, current, f"the database {_database_file(conn)}")
        conn.execute(f"PRAGMA user_version = {latest}")
    return applied


def _database_file(conn: sqlite3.Connection) -> str:
    row = conn.execute("PRAGMA database_list").fetchone()
    return str(row[2]) if row else "(in memory)"


class Database:
    """The database file of one state directory, migrated to the current schema when opened.
    Hands out a new connection per use: safe across threads and processes."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    @classmethod
    def open(cls, home: Path) -> Database:
        """The database of ``home``, created or migrated as needed.

        Raises:
            StorageError: the state directory cannot hold or write the database.
            SchemaTooNewError: a newer release wrote it.
        """
        database = cls(database_path(home))
        with storage_errors("opening the database"), database.connect() as conn:
            applied = migrate(conn)
        if applied:
            log.info("database %s migrated to schema version %d (applied %s)", database.path, applied[-1],
                     ", ".join(map(str, applied)))
        return database

    @contextlib.contextmanager
    def connect(self) -> Iterator[sqlite3.Connection]:
        """A new connection (see :func:`connect`), closed when the block ends."""
        with connected(self.path) as conn:
            yield conn

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """A new connection inside ``BEGIN IMMEDIATE`` ... ``COMMIT`` (see :func:`transaction`)."""
        with connected(self.path) as conn, transaction(conn):
            yield conn
