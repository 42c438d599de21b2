"""``store/local/database.py``, unit level on real SQLite files: the connection settings and
transactions, one database for every store, and the schema version (ordered migrations, applied
once, all or none, and a database from a newer release refused rather than misread)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from store.local import database
from store.local import database as db
from store.local.database import MIGRATIONS, Database, migrate, schema_version
from store.schema import Migration, SchemaTooNewError
from tests.support.stores import embedding_cache, label_store

STEPS = (
    Migration(1, "a table", ("CREATE TABLE a (x INTEGER)",)),
    Migration(2, "a column", ("ALTER TABLE a ADD COLUMN y TEXT", "CREATE INDEX a_by_y ON a(y)")),
    Migration(3, "another table", ("CREATE TABLE b (z INTEGER)",)),
)


def tables(conn: sqlite3.Connection) -> set[str]:
    return {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}


def test_a_new_database_gets_every_table_and_the_newest_version(tmp_path: Path) -> None:
    db = Database.open(tmp_path / "home")
    with db.connect() as conn:
        assert schema_version(conn) == MIGRATIONS[-1].version
        assert {"images", "embeddings", "jobs"} <= tables(conn)
    assert db.path == tmp_path / "home" / database.DATABASE_FILENAME


def test_missing_steps_run_in_order_and_only_once(tmp_path: Path) -> None:
    with database.connected(tmp_path / "x.db") as conn:
        assert migrate(conn, STEPS[:1]) == [1]
        conn.execute("INSERT INTO a (x) VALUES (7)")
        assert migrate(conn, STEPS) == [2, 3]
        assert migrate(conn, STEPS) == []
        assert schema_version(conn) == 3 and tables(conn) == {"a", "b"}
        assert conn.execute("SELECT x, y FROM a").fetchall() == [(7, None)]  # rows kept


def test_a_failing_step_leaves_the_database_as_it_was(tmp_path: Path) -> None:
    broken = (*STEPS[:2], Migration(3, "broken", ("CREATE TABLE b (z INTEGER)", "CREATE TABLE a (x INTEGER)")))
    with database.connected(tmp_path / "x.db") as conn:
        migrate(conn, STEPS[:1])
        with pytest.raises(sqlite3.OperationalError, match="already exists"):
            migrate(conn, broken)
        assert schema_version(conn) == 1 and tables(conn) == {"a"}  # neither step 2 nor 3 stayed
        assert [row[1] for row in conn.execute("PRAGMA table_info(a)")] == ["x"]


def test_a_database_from_a_newer_release_is_refused(tmp_path: Path) -> None:
    with database.connected(tmp_path / "x.db") as conn:
        migrate(conn, STEPS)
        with pytest.raises(SchemaTooNewError, match="schema version 3, newer than the 2") as caught:
            migrate(conn, STEPS[:2])
        assert "restore a backup" in str(caught.value)
        assert schema_version(conn) == 3


def test_migrations_must_be_numbered_in_order(tmp_path: Path) -> None:
    with database.connected(tmp_path / "x.db") as conn, pytest.raises(ValueError, match="numbered"):
        migrate(conn, (STEPS[0], STEPS[2]))


def test_the_shipped_migrations_are_numbered_in_order() -> None:
    assert [m.version for m in MIGRATIONS] == list(range(1, len(MIGRATIONS) + 1))


def test_connect_settings_and_transaction_rollback(tmp_path: Path) -> None:
    path = db.database_path(tmp_path / "new" / "home")
    assert path == tmp_path / "new" / "home" / "transfer-serve.db"
    with db.connected(path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL
        assert conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1
        assert conn.execute("PRAGMA busy_timeout").fetchone()[0] == 30_000
        assert conn.isolation_level is None
        conn.execute("CREATE TABLE t (x INTEGER)")
        with pytest.raises(RuntimeError), db.transaction(conn):
            conn.execute("INSERT INTO t VALUES (1)")
            raise RuntimeError("boom")
        assert not conn.in_transaction
        with db.transaction(conn):
            conn.execute("INSERT INTO t VALUES (2)")
        assert conn.execute("SELECT x FROM t").fetchall() == [(2,)]


def test_embeddings_and_labels_share_one_database(tmp_path: Path) -> None:
    home = tmp_path / "home"
    store, cache = label_store(home), embedding_cache(home)
    assert store.database.path == cache.database.path == db.database_path(home)
    with store.database.connect() as conn:
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"images", "embeddings"} <= tables
