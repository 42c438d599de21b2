"""Failures of the state itself, told apart from everything else.

A write the state cannot take (disk full, quota, file size limit, read-only or unwritable volume)
is an operator's problem, not a client's: :func:`storage_failure` recognises one, from the OS or
from SQLite, and :class:`StorageError` carries it with what was being written and what the
operator should do. The service answers it with 507 on admin routes.

A shared database or object store that cannot be reached is :class:`StoreUnavailable`: nothing
was written, and the same request succeeds once it is back (the service answers 503 with
``Retry-After``).
"""

from __future__ import annotations

import errno
import os
import shutil
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager

from models.errors import TransferServeError

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


#: What the stores' backends raise when the state itself failed (an unwritable volume, a damaged
#: or unreachable database), besides :class:`StorageError`: :func:`storage_failure` tells which
#: of these are the operator's to fix. Callers catch these, never a backend's own types by name.
BACKEND_ERRORS: tuple[type[Exception], ...] = (OSError, sqlite3.Error)


class StoreUnavailable(TransferServeError):
    """The shared database or object store cannot be reached right now; nothing was written."""

    def __init__(self, what: str, cause: BaseException | str) -> None:
        super().__init__(f"{what} cannot be reached ({cause}); nothing was written: retry shortly")
        self.what = what


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
                for strerror, errno_code in _STRERRORS.items():
                    if strerror in text:
                        problem, hint = _ERRNO_HINTS[errno_code]
                        return StorageError(operation, problem, hint, strerror)
        elif isinstance(current, OSError) and current.errno in _ERRNO_HINTS:
            problem, hint = _ERRNO_HINTS[current.errno]
            return StorageError(operation, problem, hint, current.strerror or errno.errorcode[current.errno])
        current = current.__cause__ or current.__context__
    return None


@contextmanager
def storage_errors(operation: str) -> Iterator[None]:
    """Run the block; a failed write to the state directory in it (see :func:`storage_failure`)
    comes out as a :class:`StorageError` naming ``operation``, anything else as it was."""
    try:
        yield
    except (OSError, sqlite3.Error) as exc:
        failure = storage_failure(exc, operation)
        if failure is None:
            raise
        raise failure from exc
