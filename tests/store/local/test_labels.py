"""``store/local/labels.py``, unit level on a real SQLite file and real image files: content
addressing, deduplication, deletes that cannot escape the store, uploads stored all or none when a
write fails, and correctness under concurrent threads and processes."""

from __future__ import annotations

import errno
import hashlib
import io
import json
import multiprocessing
import os
import random
import sys
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from PIL import Image

from models.errors import ImageDecodeError, ImageTooLargeError
from service.errors import input_status
from store import errors
from store.labels import ImageNotFoundError, check_image
from store.local import database as db
from store.local.labels import SqliteLabelStore
from store.state import open_state
from tests.support.admin import assert_store_consistent, sha
from tests.support.images import jpeg_files, noise_png, small_photos
from tests.support.stores import MAX_PIXELS, integrity, label_store, leftovers, row_count, stored_files


def png(seed: int, size: tuple[int, int] = (6, 5)) -> bytes:
    """A tiny distinct PNG (width x height = ``size``)."""
    return noise_png(*size, seed=seed)


def total(store: SqliteLabelStore) -> int:
    return len(store.images())


@pytest.fixture
def store(tmp_path: Path) -> SqliteLabelStore:
    return label_store(tmp_path / "home")


@pytest.fixture(scope="module")
def photos(hymenoptera: Path) -> list[bytes]:
    return [p.read_bytes() for p in jpeg_files(hymenoptera, "ants")[:2] + jpeg_files(hymenoptera, "bees")[:2]]


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
    for data, label in zip(photos, ["ants", "ants", "bees", "wasp"], strict=True):
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


# -- a write that fails ---------------------------------------------------------------------------


def test_a_failed_write_stores_nothing_of_the_upload(tmp_path: Path, hymenoptera: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import store.files as files_module

    store = open_state(home=tmp_path / "home").labels
    kept, first, second = small_photos(hymenoptera, "ants", 0, 3)
    store.add(kept, "ants", max_pixels=10**8)
    real_write = files_module.write_atomic
    calls = []

    def write_then_fill_the_disk(path: Path, data: bytes, *, durable: bool = True) -> None:
        calls.append(path.name)
        if len(calls) > 1:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        real_write(path, data, durable=durable)

    monkeypatch.setattr(files_module, "write_atomic", write_then_fill_the_disk)
    with pytest.raises(errors.StorageError) as caught:
        store.add_many([check_image(first, max_pixels=10**8), check_image(second, max_pixels=10**8)], "bees")
    assert "storing the labelled images failed" in str(caught.value)
    assert "out of space" in str(caught.value) and "free space" in caught.value.hint
    assert calls == [sha(first), sha(second)]  # the first was written, then removed again
    assert assert_store_consistent(tmp_path / "home") == {sha(kept): "ants"}
