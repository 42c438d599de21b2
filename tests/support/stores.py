"""The single-machine backend's stores opened on a directory, and what they hold on disk."""

from __future__ import annotations

from pathlib import Path

from store.local import database as db
from store.local.database import Database
from store.local.embeddings import SqliteEmbeddingCache
from store.local.labels import SqliteLabelStore

#: a pixel limit no test photo reaches
MAX_PIXELS = 40_000_000


def label_store(home: Path) -> SqliteLabelStore:
    return SqliteLabelStore(home, Database.open(home))


def embedding_cache(home: Path) -> SqliteEmbeddingCache:
    return SqliteEmbeddingCache(Database.open(home))


def stored_files(store: SqliteLabelStore) -> list[Path]:
    """The image files the store holds (not its hidden temporary or set-aside files)."""
    return sorted(p for p in store.images_dir.rglob("*") if p.is_file() and not p.name.startswith("."))


def leftovers(store: SqliteLabelStore) -> list[Path]:
    """Temporary or set-aside files: everything hidden under the images directory."""
    return sorted(p for p in store.images_dir.rglob(".*"))


def row_count(store: SqliteLabelStore) -> int:
    with store.database.connect() as conn:
        return int(conn.execute("SELECT COUNT(*) FROM images").fetchone()[0])


def integrity(path: Path) -> str:
    """SQLite's ``PRAGMA integrity_check`` of the database file: ``"ok"`` when intact."""
    with db.connected(path) as conn:
        return str(conn.execute("PRAGMA integrity_check").fetchone()[0])


def add_labelled(home: Path, label: str, blobs: list[bytes]) -> None:
    """Each image stored under ``label`` in the label store of the state in ``home``."""
    from store.state import open_state

    store = open_state(home=home).labels
    for data in blobs:
        store.add(data, label, max_pixels=10_000)
