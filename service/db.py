"""The project's SQLite database: one file, ``$TRANSFER_SERVE_HOME/transfer-serve.db``, shared by
the serving workers, the retrain job and the CLI.

Every process and every thread opens its own connection (:func:`connected`) and closes it when
done; a connection is never shared, so ``check_same_thread`` keeps its default. The database runs
in WAL mode, so readers never block the one writer, and connections are in autocommit mode:
a read-modify-write goes inside :func:`transaction`, which starts with ``BEGIN IMMEDIATE`` so the
write lock is taken before the read and two writers cannot both act on a stale read. A writer
that finds the lock held waits up to :data:`BUSY_TIMEOUT_S` for it. Each store creates its own
tables (``CREATE TABLE IF NOT EXISTS``) when constructed.
"""

from __future__ import annotations

import contextlib
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

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
    conn = sqlite3.connect(path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
    try:
        conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
        _use_wal(conn)
        conn.execute("PRAGMA synchronous = NORMAL")
        conn.execute("PRAGMA foreign_keys = ON")
    except BaseException:
        conn.close()
        raise
    return conn


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
