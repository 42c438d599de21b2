"""The project's SQLite database: one file, ``$TRANSFER_SERVE_HOME/transfer-serve.db``, shared by
the serving workers, the retrain job and the CLI.

Every process and every thread opens its own connection (:func:`connected`) and closes it when
done; a connection is never shared, so ``check_same_thread`` keeps its default. The database runs
in WAL mode, so readers never block the one writer, and connections are in autocommit mode:
a read-modify-write goes inside :func:`transaction`, which starts with ``BEGIN IMMEDIATE`` so the
write lock is taken before the read and two writers cannot both act on a stale read. A writer
that finds the lock held waits up to :data:`BUSY_TIMEOUT_S` for it. Each store creates its own
tables (``CREATE TABLE IF NOT EXISTS``) when constructed.

A write the state directory cannot take (disk full, quota, file size limit, read-only or
unwritable volume) is an operator's problem, not a client's: :func:`storage_failure` recognises
one, from the OS or from SQLite, and :class:`StorageError` carries it with what was being written
and what the operator should do.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

from models.errors import TransferServeError

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


# -- storage failures -------------------------------------------------------------------------

#: What each errno means for the state directory, and what the operator can do about it.
_ERRNO_HINTS = {
    errno.ENOSPC: ("is out of space", "free space on the volume holding TRANSFER_SERVE_HOME"),
    errno.EDQUOT: ("is over its disk quota", "raise the quota or free space on the volume"),
    errno.EFBIG: ("cannot take a file this large (file size limit)",
                  "raise the file size limit (ulimit -f) of the service"),
    errno.EROFS: ("is on a read-only file system", "mount the volume holding TRANSFER_SERVE_HOME read-write"),
    errno.EACCES: ("is not writable by the service", "make TRANSFER_SERVE_HOME writable by the service's user"),
    errno.EPERM: ("is not writable by the service (permission or immutable flag)",
                  "make TRANSFER_SERVE_HOME writable by the service's user"),
    errno.EIO: ("had an I/O error", "check the disk and the volume holding TRANSFER_SERVE_HOME"),
    errno.ENOTDIR: ("is damaged (a file is where a directory should be)",
                    "repair TRANSFER_SERVE_HOME (see the server log for the path)"),
    errno.EEXIST: ("is damaged (a file is where a directory should be)",
                   "repair TRANSFER_SERVE_HOME (see the server log for the path)"),
}
_SQLITE_HINTS = {
    "SQLITE_FULL": _ERRNO_HINTS[errno.ENOSPC],
    "SQLITE_READONLY": ("holds a database the service cannot write (read-only file or volume)",
                        "make TRANSFER_SERVE_HOME and its database files writable"),
    "SQLITE_CANTOPEN": ("holds a database the service cannot open", "make TRANSFER_SERVE_HOME readable and writable"),
    "SQLITE_IOERR": ("could not be written (disk I/O error: out of space, a file size limit, or a failing disk)",
                     "check free space, the file size limit and the disk of TRANSFER_SERVE_HOME"),
    "SQLITE_PERM": _ERRNO_HINTS[errno.EACCES],
}
# shutil.copytree gathers the errors of the files it copies as text; recognise them by wording
_STRERRORS = {os.strerror(code): code for code in _ERRNO_HINTS if code not in (errno.ENOTDIR, errno.EEXIST)}


class StorageError(TransferServeError):
    """A write to the state directory failed for a reason the operator must fix.

    ``operation`` says what was being written, ``problem`` what is wrong with the state
    directory, ``hint`` what to do, ``cause`` the system's own words.
    """

    def __init__(self, operation: str, problem: str, hint: str, cause: str) -> None:
        super().__init__(f"{operation} failed: the state directory {problem} ({cause}); {hint}")
        self.operation, self.problem, self.hint, self.cause = operation, problem, hint, cause


def storage_failure(exc: BaseException, operation: str) -> StorageError | None:
    """``exc`` as a :class:`StorageError` if it (or an exception it was raised from) is a failed
    write to the state directory, else None.

    Recognised: an ``OSError`` whose errno means no space, a quota, a file size limit, a
    read-only or unwritable volume, an I/O error or a damaged directory; an SQLite error whose
    code means the database is full, read-only, cannot be opened or could not be written; a
    ``shutil.Error`` (from copying a tree) made of such errors. ``StorageError`` itself is
    returned as it is.
    """
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, StorageError):
            return current
        if isinstance(current, sqlite3.Error):
            name = getattr(current, "sqlite_errorname", "") or ""
            for code, (problem, hint) in _SQLITE_HINTS.items():
                if name == code or name.startswith(code + "_"):
                    return StorageError(operation, problem, hint, f"SQLite: {current}")
        elif isinstance(current, shutil.Error):
            for entry in current.args[0] if current.args and isinstance(current.args[0], list) else []:
                text = str(entry[-1]) if isinstance(entry, tuple) and entry else str(entry)
                for strerror, code in _STRERRORS.items():
                    if strerror in text:
                        problem, hint = _ERRNO_HINTS[code]
                        return StorageError(operation, problem, hint, strerror)
        elif isinstance(current, OSError) and current.errno in _ERRNO_HINTS:
            problem, hint = _ERRNO_HINTS[current.errno]
            return StorageError(operation, problem, hint, current.strerror or errno.errorcode[current.errno])
        current = current.__cause__ or current.__context__
    return None
