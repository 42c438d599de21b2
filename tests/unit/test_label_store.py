"""The label store, the embedding cache, the database helpers and the folder importer, on a real
SQLite file: content addressing, label rules, deduplication, deletes that cannot escape the
store, and correctness under concurrent threads and processes."""

from __future__ import annotations

import hashlib
import io
import json
import multiprocessing
import random
import shutil
import sys
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from models.errors import ImageDecodeError, ImageTooLargeError, InputError
from service.errors import input_status
from store.labels import ImageNotFoundError, InvalidLabelError, validate_label
from store.local import database as db
from store.local.database import Database
from store.local.embeddings import SqliteEmbeddingCache
from store.local.labels import SqliteLabelStore
from training.importer import import_folder
from tests.conftest import jpeg_files

MAX_PIXELS = 40_000_000


def png(seed: int, size: tuple[int, int] = (6, 5)) -> bytes:
    """A tiny distinct PNG (width x height = ``size``)."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def label_store(home: Path) -> SqliteLabelStore:
    return SqliteLabelStore(home, Database.open(home))


def embedding_cache(home: Path) -> SqliteEmbeddingCache:
    return SqliteEmbeddingCache(Database.open(home))


def total(store: SqliteLabelStore) -> int:
    return len(store.images())


def stored_files(store: SqliteLabelStore) -> list[Path]:
    return sorted(p for p in store.images_dir.rglob("*") if p.is_file() and not p.name.startswith("."))


def leftovers(store: SqliteLabelStore) -> list[Path]:
    """Temporary or set-aside files: everything hidden under the images directory."""
    return sorted(p for p in store.images_dir.rglob(".*"))


def row_count(store: SqliteLabelStore) -> int:
    with store.database.connect() as conn:
        return conn.execute("SELECT COUNT(*) FROM images").fetchone()[0]


def integrity(path: Path) -> str:
    with db.connected(path) as conn:
        return conn.execute("PRAGMA integrity_check").fetchone()[0]


@pytest.fixture
def store(tmp_path: Path) -> SqliteLabelStore:
    return label_store(tmp_path / "home")


@pytest.fixture(scope="module")
def photos(hymenoptera: Path) -> list[bytes]:
    return [p.read_bytes() for p in jpeg_files(hymenoptera, "ants")[:2] + jpeg_files(hymenoptera, "bees")[:2]]


# -- database helpers ---------------------------------------------------------------------------


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


# -- storing and reading ------------------------------------------------------------------------


def test_store_and_read_round_trip_by_content_address(store: SqliteLabelStore, photos: list[bytes]) -> None:
    data = photos[0]
    result = store.add(data, "ants", max_pixels=MAX_PIXELS)
    digest = hashlib.sha256(data).hexdigest()
    width, height = Image.open(io.BytesIO(data)).size
    assert (result.image_id, result.label, result.status, result.previous_label) == (digest, "ants", "stored", None)
    assert (result.width, result.height) == (width, height)

    path = store.path_of(digest)
    assert path == store.home / "labels" / "images" / digest[:2] / digest
    assert stored_files(store) == [path]  # nothing named after the client's file, no extension
    assert path.read_bytes() == data
    assert store.read(digest) == data
    assert [(i.image_id, i.label) for i in store.images()] == [(digest, "ants")]
    assert leftovers(store) == []


def test_same_bytes_again_is_unchanged_or_moved(store: SqliteLabelStore, photos: list[bytes]) -> None:
    first = store.add(photos[0], "ants", max_pixels=MAX_PIXELS)
    again = store.add(photos[0], "ants", max_pixels=MAX_PIXELS)
    assert (again.status, again.previous_label, again.image_id) == ("unchanged", None, first.image_id)
    moved = store.add(photos[0], "bees", max_pixels=MAX_PIXELS)
    assert (moved.status, moved.label, moved.previous_label) == ("moved", "bees", "ants")
    assert store.counts() == {"bees": 1}
    assert len(stored_files(store)) == 1


def test_counts_and_total(store: SqliteLabelStore, photos: list[bytes]) -> None:
    assert (store.counts(), total(store), store.images()) == ({}, 0, [])
    for data, label in zip(photos, ["ants", "ants", "bees", "wasp"]):
        store.add(data, label, max_pixels=MAX_PIXELS)
    store.add(png(1), "wasp", max_pixels=MAX_PIXELS)
    assert store.counts() == {"ants": 2, "bees": 1, "wasp": 2}
    assert total(store) == 5
    ids = [i.image_id for i in store.images()]
    assert ids == sorted(ids) and len(ids) == 5


def test_read_unknown_or_malformed_id_is_not_found(store: SqliteLabelStore) -> None:
    with pytest.raises(ImageNotFoundError, match="no stored image") as info:
        store.read("0" * 64)
    assert input_status(info.value) == 404
    with pytest.raises(ImageNotFoundError, match="not an image id"):
        store.read("../../etc/passwd")


# -- deleting -----------------------------------------------------------------------------------


def test_delete_removes_row_and_file(store: SqliteLabelStore, photos: list[bytes]) -> None:
    keep = store.add(photos[1], "ants", max_pixels=MAX_PIXELS)
    gone = store.add(photos[0], "ants", max_pixels=MAX_PIXELS)
    assert store.delete(gone.image_id) is True
    assert not store.path_of(gone.image_id).exists()
    assert store.images() == [store.images()[0]] and store.images()[0].image_id == keep.image_id
    assert store.delete(gone.image_id) is False
    assert store.delete("f" * 64) is False  # well formed, unknown
    assert leftovers(store) == []
    # stored again after a delete: a new image
    assert store.add(photos[0], "bees", max_pixels=MAX_PIXELS).status == "stored"


@pytest.mark.parametrize(
    "bad_id",
    ["../../etc/passwd", "", "A" * 64, "0" * 63, "0" * 65, "0" * 64 + "\n", "../" + "0" * 61, "0" * 62 + "/."],
)
def test_delete_malformed_id_touches_nothing(store: SqliteLabelStore, photos: list[bytes], bad_id: str) -> None:
    # "../../etc/passwd" joined as images/<first 2>/<id> would land exactly on this file.
    sentinel = store.home.parent / "etc" / "passwd"
    sentinel.parent.mkdir()
    sentinel.write_text("root")
    store.add(photos[0], "ants", max_pixels=MAX_PIXELS)
    assert store.delete(bad_id) is False
    assert sentinel.read_text() == "root"
    assert total(store) == 1 and len(stored_files(store)) == 1


# -- label rules --------------------------------------------------------------------------------


@pytest.mark.parametrize("label", ["ants", "Golden Retriever", "a.b-c_d", "x" * 64, "7", "...", "a b"])
def test_valid_labels(label: str) -> None:
    assert validate_label(label) == label


@pytest.mark.parametrize(
    ("label", "message"),
    [
        ("", "empty"),
        ("x" * 65, "65 characters long; the most is 64"),
        ("a/b", r"may only contain letters, digits, space, '-', '_' and '.' \(found '/', U\+002F SOLIDUS\)"),
        ("a\\b", "REVERSE SOLIDUS"),
        ("ant\x00", r"found U\+0000"),
        ("bee\n", r"found U\+000A"),
        ("..", "not allowed"),
        (".", "not allowed"),
        ("\u0430nts", "U+0430 CYRILLIC SMALL LETTER A".replace("+", r"\+")),  # Cyrillic а
        ("caf\u00e9", "LATIN SMALL LETTER E WITH ACUTE"),
        (" ants", "may not start or end with a space"),
        ("ants ", "may not start or end with a space"),
        ("a\tb", r"U\+0009"),
    ],
)
def test_invalid_labels_are_refused_with_the_rule(store: SqliteLabelStore, label: str, message: str) -> None:
    with pytest.raises(InvalidLabelError, match=message) as info:
        validate_label(label)
    assert isinstance(info.value, InputError) and input_status(info.value) == 422
    with pytest.raises(InvalidLabelError):
        store.add(png(0), label, max_pixels=MAX_PIXELS)
    assert total(store) == 0 and stored_files(store) == []


# -- bad image bytes ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [b"", b"definitely not an image", b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, "truncated"],
    ids=["empty", "text", "png-header-only", "truncated-jpeg"],
)
def test_corrupt_bytes_store_nothing(store: SqliteLabelStore, photos: list[bytes], data: bytes | str) -> None:
    if data == "truncated":
        data = photos[0][: len(photos[0]) // 3]
    assert isinstance(data, bytes)
    with pytest.raises(ImageDecodeError):
        store.add(data, "ants", max_pixels=MAX_PIXELS)
    assert row_count(store) == 0
    assert list(store.images_dir.rglob("*")) == []  # no file, no temporary file, no folder


def test_too_many_pixels_stores_nothing(store: SqliteLabelStore) -> None:
    with pytest.raises(ImageTooLargeError):
        store.add(png(0, size=(100, 100)), "ants", max_pixels=9_999)
    assert row_count(store) == 0 and list(store.images_dir.rglob("*")) == []


# -- concurrency --------------------------------------------------------------------------------


def test_concurrent_adds_from_threads(store: SqliteLabelStore) -> None:
    images = [png(seed) for seed in range(30)]
    rng = random.Random(0)
    jobs = [(images[i % 30], rng.choice(["ants", "bees", "wasps"])) for i in range(100)]
    rng.shuffle(jobs)
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda job: store.add(job[0], job[1], max_pixels=MAX_PIXELS), jobs))

    assert Counter(r.status for r in results)["stored"] == 30  # each image stored exactly once
    assert row_count(store) == 30
    files = stored_files(store)
    assert len(files) == 30
    assert {p.name for p in files} == {hashlib.sha256(d).hexdigest() for d in images}
    assert all(hashlib.sha256(p.read_bytes()).hexdigest() == p.name for p in files)
    labels_tried: dict[str, set[str]] = {}
    for data, label in jobs:
        labels_tried.setdefault(hashlib.sha256(data).hexdigest(), set()).add(label)
    assert all(i.label in labels_tried[i.image_id] for i in store.images())
    assert leftovers(store) == []
    assert integrity(store.database.path) == "ok"


def test_concurrent_add_and_delete_keep_rows_and_files_in_step(store: SqliteLabelStore) -> None:
    data = png(7)
    image_id = hashlib.sha256(data).hexdigest()
    stop = threading.Event()
    orphan_rows = 0

    def churn(delete: bool) -> None:
        while not stop.is_set():
            if delete:
                store.delete(image_id)
            else:
                store.add(data, "ants", max_pixels=MAX_PIXELS)

    def check() -> None:
        # Whenever nobody holds the write lock, a row must have its file.
        nonlocal orphan_rows
        with store.database.connect() as conn:
            while not stop.is_set():
                with db.transaction(conn):
                    row = conn.execute("SELECT 1 FROM images WHERE id = ?", (image_id,)).fetchone()
                    orphan_rows += row is not None and not store.path_of(image_id).is_file()

    switch_interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # interleave the threads as finely as the interpreter allows
    try:
        with ThreadPoolExecutor(5) as pool:
            futures = [pool.submit(churn, delete) for delete in (True, False, True, False)]
            futures.append(pool.submit(check))
            threading.Event().wait(1.0)
            stop.set()
            for future in futures:
                future.result()
    finally:
        sys.setswitchinterval(switch_interval)
    assert orphan_rows == 0
    assert (total(store) == 1) == store.path_of(image_id).is_file()
    assert leftovers(store) == []
    store.add(data, "ants", max_pixels=MAX_PIXELS)
    assert store.read(image_id) == data


def _add_from_process(home: str, images: list[bytes], barrier: object, out: str) -> None:
    """Runs in a spawned process: wait for the others, then add every image."""
    barrier.wait(timeout=60)  # type: ignore[attr-defined]
    store = label_store(Path(home))  # all four create the database and schema at the same time
    statuses = [store.add(data, "ants" if i % 2 else "bees", max_pixels=MAX_PIXELS).status
                for i, data in enumerate(images)]
    Path(out).write_text(json.dumps(statuses))


def test_concurrent_adds_from_processes(tmp_path: Path) -> None:
    home = tmp_path / "home"
    images = [png(seed) for seed in range(10)]
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(4)
    outs = [tmp_path / f"statuses-{n}.json" for n in range(4)]
    procs = [ctx.Process(target=_add_from_process, args=(str(home), images, barrier, str(out))) for out in outs]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=60)
    assert [proc.exitcode for proc in procs] == [0, 0, 0, 0]
    for proc in procs:
        proc.close()

    statuses = Counter(s for out in outs for s in json.loads(out.read_text()))
    assert statuses == {"stored": 10, "unchanged": 30}
    store = label_store(home)
    assert row_count(store) == 10 and len(stored_files(store)) == 10
    assert store.counts() == {"ants": 5, "bees": 5}
    assert leftovers(store) == []
    assert integrity(store.database.path) == "ok"


# -- embedding cache ----------------------------------------------------------------------------


def test_embedding_cache_round_trip_is_bit_exact(tmp_path: Path) -> None:
    cache = embedding_cache(tmp_path / "home")
    special = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 1e-45, 3.4e38, 1 / 3], dtype=np.float32)
    vectors = {"a" * 64: special, "b" * 64: np.random.default_rng(0).normal(size=1280).astype(np.float32)}
    cache.put_many(vectors, "backbone-1")
    got = cache.get_many(["a" * 64, "b" * 64, "c" * 64], "backbone-1")
    assert set(got) == {"a" * 64, "b" * 64}
    for key, vector in vectors.items():
        assert got[key].dtype == np.float32 and got[key].shape == vector.shape
        assert got[key].tobytes() == vector.tobytes()
    got["a" * 64][0] = 5.0  # callers get their own writable copy
    assert cache.get_many(["a" * 64], "backbone-1")["a" * 64][0] == 0.0


def test_embedding_cache_keeps_backbones_apart(tmp_path: Path) -> None:
    cache = embedding_cache(tmp_path / "home")
    cache.put_many({"a" * 64: np.ones(4, np.float32)}, "backbone-1")
    assert cache.get_many(["a" * 64], "backbone-2") == {}
    cache.put_many({"a" * 64: np.full(8, 2.0, np.float32)}, "backbone-2")
    assert cache.get_many(["a" * 64], "backbone-1")["a" * 64].tolist() == [1.0] * 4
    assert cache.get_many(["a" * 64], "backbone-2")["a" * 64].tolist() == [2.0] * 8
    cache.put_many({"a" * 64: np.zeros(4, np.float32)}, "backbone-1")  # replaces
    assert cache.get_many(["a" * 64], "backbone-1")["a" * 64].tolist() == [0.0] * 4
    assert (cache.count("backbone-1"), cache.count("backbone-2"), cache.count("other")) == (1, 1, 0)
    with pytest.raises(ValueError, match="1-D"):
        cache.put_many({"b" * 64: np.ones((2, 2), np.float32)}, "backbone-1")
    assert cache.count("backbone-1") == 1


def test_embedding_cache_many_ids(tmp_path: Path) -> None:
    cache = embedding_cache(tmp_path / "home")
    rng = np.random.default_rng(1)
    ids = [f"{n:064x}" for n in range(1300)]
    stored = {i: rng.normal(size=16).astype(np.float32) for i in ids[::2]}
    cache.put_many(stored, "bb")
    got = cache.get_many(ids + ids[:10], "bb")
    assert set(got) == set(stored) and cache.count("bb") == 650
    assert all(np.array_equal(got[i], v) for i, v in stored.items())


def test_embeddings_and_labels_share_one_database(tmp_path: Path) -> None:
    home = tmp_path / "home"
    store, cache = label_store(home), embedding_cache(home)
    assert store.database.path == cache.database.path == db.database_path(home)
    with store.database.connect() as conn:
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"images", "embeddings"} <= tables


# -- folder import ------------------------------------------------------------------------------


def test_import_folder_counts_and_skips(store: SqliteLabelStore, hymenoptera: Path, tmp_path: Path) -> None:
    root = tmp_path / "data"
    ants, bees = jpeg_files(hymenoptera, "ants")[:3], jpeg_files(hymenoptera, "bees")[:3]
    for label, photos in (("ants", ants), ("bees", bees + ants[:1]), ("caf\u00e9", bees[:1])):
        (root / label).mkdir(parents=True)
        for photo in photos:
            shutil.copy(photo, root / label / photo.name)
    (root / "ants" / "notes.txt").write_text("not an image")

    summary = import_folder(root, store, max_pixels=MAX_PIXELS, progress=False)
    # ants[0] is also in bees/: stored under ants, then moved to bees (the later folder wins)
    assert (summary.stored, summary.moved, summary.unchanged) == (6, 1, 0)
    assert sorted(Path(p).name for p, _ in summary.skipped) == [bees[0].name, "notes.txt"]
    reasons = dict((Path(p).name, r) for p, r in summary.skipped)
    assert "not a recognised image" in reasons["notes.txt"] and "may only contain" in reasons[bees[0].name]
    assert store.counts() == {"ants": 2, "bees": 4}
    assert summary.to_dict()["skipped"] == 2 and "6 stored" in summary.describe()

    again = import_folder(root, store, max_pixels=MAX_PIXELS, progress=False)
    assert (again.stored, again.unchanged, again.moved, len(again.skipped)) == (0, 5, 2, 2)
    assert total(store) == 6
