"""``store/errors.py``, unit level: a write the state cannot take (from the OS or from SQLite) is
recognised as the operator's problem, named, and told how to fix; anything else is not."""

from __future__ import annotations

import errno
import os
import sqlite3
from pathlib import Path

import pytest

from store import errors
from store.local import database as db


@pytest.mark.parametrize("code,problem", [
    (errno.ENOSPC, "out of space"), (errno.EDQUOT, "quota"), (errno.EFBIG, "file size limit"),
    (errno.EROFS, "read-only"), (errno.EACCES, "not writable"), (errno.EPERM, "not writable"),
])
def test_write_errors_name_the_problem_and_the_fix(code: int, problem: str) -> None:
    failure = errors.storage_failure(OSError(code, os.strerror(code)), "writing x")
    assert failure is not None and problem in failure.problem
    assert str(failure).startswith("writing x failed: the state directory") and failure.hint
    assert errors.storage_failure(OSError(errno.ECONNRESET, "reset"), "writing x") is None
    assert errors.storage_failure(ValueError("not storage"), "writing x") is None


def test_database_errors_are_storage_failures(tmp_path: Path) -> None:
    path = tmp_path / "ro.db"
    with db.connected(path) as conn:
        conn.execute("CREATE TABLE t (x)")
    read_only = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        with pytest.raises(sqlite3.OperationalError) as caught:
            read_only.execute("INSERT INTO t VALUES (1)")
    finally:
        read_only.close()
    failure = errors.storage_failure(caught.value, "recording")
    assert failure is not None and "cannot write" in failure.problem
    with pytest.raises(sqlite3.OperationalError) as cannot_open:
        sqlite3.connect(tmp_path / "missing" / "x.db").execute("SELECT 1")
    assert errors.storage_failure(cannot_open.value, "opening") is not None
    with pytest.raises(sqlite3.OperationalError) as syntax:
        sqlite3.connect(":memory:").execute("SELEC 1")
    assert errors.storage_failure(syntax.value, "querying") is None
