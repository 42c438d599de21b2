"""``store/predictions.py`` on every backend (SQLite + files, Postgres + a shared directory,
Postgres + S3): kept predictions round-trip (embeddings bit-for-bit), each image is stored once and
goes with the last prediction using it, the review queue leaves out labelled images, prunes remove
the oldest first, and an add that fails keeps nothing. Real servers and files; the stored images are
checked where they live (a file, an object)."""

from __future__ import annotations

import hashlib
import threading
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pytest

from store.errors import StorageError, StoreUnavailable
from store.labels import check_image
from store.local.predictions import SqlitePredictionStore
from store.predictions import (
    DamagedImageError,
    PredictionNotFoundError,
    PredictionStore,
)
from store.shared.database import MIGRATIONS, PostgresDatabase, migrate
from store.shared.objects import FileObjectStore, ObjectStore
from store.shared.predictions import PostgresPredictionStore, kept_image_key
from store.state import State
from tests.support.backends import T0, kept, parametrized, png, replica
from tests.support.postgres import PostgresServer


def stored_images(store: PredictionStore) -> set[str]:
    """The ids of the images the store holds where it keeps them (files, objects)."""
    if isinstance(store, SqlitePredictionStore):
        files = [p for p in store.images_dir.rglob("*") if p.is_file() and p.parent != store.images_dir]
        assert all(p == store.path_of(p.name) for p in files)  # kept/images/<2 hex>/<sha256>, nothing set aside
        return {p.name for p in files}
    assert isinstance(store, PostgresPredictionStore)
    keys = store.objects.keys("kept/")
    ids = {key.rsplit("/", 1)[-1] for key in keys}
    assert keys == sorted(kept_image_key(image_id) for image_id in ids)  # kept/<2 hex>/<sha256>
    return ids


def two_replicas(deployment: dict[str, object], tmp_path: Path) -> tuple[State, State]:
    a, b = replica(deployment, tmp_path, "a"), replica(deployment, tmp_path, "b")
    return (a, a) if "home" in deployment else (a, b)


@parametrized
def test_a_kept_prediction_round_trips(deployment: dict[str, object], tmp_path: Path) -> None:
    a, b = two_replicas(deployment, tmp_path)
    special = np.array([0.0, -0.0, np.inf, -np.inf, 1e-45, 3.4e38, 1 / 3], dtype=np.float32)
    local_time = datetime(2026, 3, 1, 13, 30, 0, 123456, tzinfo=timezone(timedelta(hours=2)))
    first = kept(1, embedding=special, margin=0.125)
    second = replace(kept(2), created_at=local_time, embedding=None)
    a.predictions.add_many([first, second])

    got = b.predictions.get(first.prediction_id)
    assert (got.prediction_id, got.image_id, got.version, got.label) == (
        first.prediction_id, first.image_id, "v1", "ants")
    assert (got.score, got.margin, got.entropy, got.top_k) == (first.score, 0.125, 0.5, first.top_k)
    assert got.created_at == T0 and got.created_at.utcoffset() == timedelta(0)
    assert got.embedding is not None and got.embedding.tobytes() == special.tobytes()
    assert got.embedding.dtype == np.float32 and got.embedding.flags.writeable
    other = b.predictions.get(second.prediction_id)
    assert other.embedding is None and other.created_at == local_time and other.created_at.tzinfo is not None
    assert b.predictions.read_image(first.prediction_id) == png(1)
    assert b.predictions.count() == 2 and stored_images(b.predictions) == {first.image_id, second.image_id}


@parametrized
def test_an_image_is_stored_once_and_goes_with_its_last_prediction(deployment: dict[str, object],
                                                                   tmp_path: Path) -> None:
    a, b = two_replicas(deployment, tmp_path)
    once, twice, other = kept(1), kept(1, 1), kept(2)
    a.predictions.add_many([once])
    b.predictions.add_many([twice, other])
    assert stored_images(a.predictions) == {once.image_id, other.image_id}

    assert b.predictions.delete(once.prediction_id)
    assert not a.predictions.delete(once.prediction_id)  # gone already
    assert stored_images(a.predictions) == {once.image_id, other.image_id}  # twice still uses it
    assert a.predictions.read_image(twice.prediction_id) == png(1)
    with pytest.raises(PredictionNotFoundError):
        a.predictions.read_image(once.prediction_id)

    assert a.predictions.delete(twice.prediction_id)
    assert stored_images(b.predictions) == {other.image_id}  # the file / object is really gone
    assert b.predictions.count() == 1


@parametrized
def test_a_prediction_id_already_kept_is_left_as_it_was(deployment: dict[str, object], tmp_path: Path) -> None:
    state = replica(deployment, tmp_path, "a")
    original = kept(1)
    state.predictions.add_many([original, kept(2, prediction_id=original.prediction_id, label="bees")])
    state.predictions.add_many([kept(3, prediction_id=original.prediction_id, label="wasps")])  # a retried call
    assert state.predictions.count() == 1 and state.predictions.get(original.prediction_id).label == "ants"
    assert stored_images(state.predictions) == {original.image_id}  # nothing of the ignored ones


@parametrized
def test_unknown_and_malformed_ids_are_not_found(deployment: dict[str, object], tmp_path: Path) -> None:
    state = replica(deployment, tmp_path, "a")
    stored = kept(1)
    state.predictions.add_many([stored])
    for bad_id in ["0" * 32, "", "../" + stored.prediction_id[3:], stored.prediction_id.upper(),
                   stored.prediction_id[:-1], stored.prediction_id + "0", stored.image_id, 123, None]:
        with pytest.raises(PredictionNotFoundError):
            state.predictions.get(bad_id)  # type: ignore[arg-type]
        with pytest.raises(PredictionNotFoundError):
            state.predictions.read_image(bad_id)  # type: ignore[arg-type]
        assert state.predictions.delete(bad_id) is False  # type: ignore[arg-type]
    assert state.predictions.count() == 1 and state.predictions.get(stored.prediction_id).label == "ants"


def test_the_image_id_is_the_sha256_of_the_image_whatever_the_caller_passes() -> None:
    prediction = kept(1)
    assert prediction.image_id == hashlib.sha256(png(1)).hexdigest()
    assert replace(prediction, image=png(2)).image_id == hashlib.sha256(png(2)).hexdigest()


@parametrized
def test_a_damaged_kept_image_reads_as_gone_not_as_other_bytes(
    deployment: dict[str, object], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Kept images are not flushed to disk one by one: after a power cut a file can have the right
    # size and the wrong bytes. Those must never be shown or turned into a label.
    state = replica(deployment, tmp_path, "a")
    damaged, intact = kept(1), kept(2)
    state.predictions.add_many([damaged, intact])
    garbage = bytes(len(damaged.image))
    store = state.predictions
    if isinstance(store, SqlitePredictionStore):
        store.path_of(damaged.image_id).write_bytes(garbage)
    else:
        assert isinstance(store, PostgresPredictionStore)
        store.objects.put(kept_image_key(damaged.image_id), garbage)
    with pytest.raises(DamagedImageError, match="damaged"):
        store.read_image(damaged.prediction_id)
    assert "damaged" in caplog.text
    assert store.read_image(intact.prediction_id) == intact.image
    assert store.get(damaged.prediction_id).label == "ants"  # the record itself is still there


@parametrized
def test_unlabelled_is_the_newest_prediction_of_each_unlabelled_image_least_certain_first(
    deployment: dict[str, object], tmp_path: Path
) -> None:
    state = replica(deployment, tmp_path, "a")
    a_old = kept(1, 0, margin=0.01, entropy=0.99)  # a's older prediction: never a candidate
    a_new = kept(1, 5, margin=0.4, entropy=0.3)
    b = kept(2, 1, margin=0.2, entropy=0.9)
    labelled = kept(3, 2, margin=0.05, entropy=0.95)  # its image is in the label store
    d = kept(4, 6, margin=0.4, entropy=0.3)  # ties with a_new, newer
    state.predictions.add_many([a_old, a_new, b, labelled, d])
    state.labels.add_many([check_image(png(3), max_pixels=10**6)], "ants")

    by_margin = state.predictions.unlabelled(order="margin", limit=10)
    assert [p.prediction_id for p in by_margin] == [b.prediction_id, d.prediction_id, a_new.prediction_id]
    by_entropy = state.predictions.unlabelled(order="entropy", limit=10)
    assert [p.prediction_id for p in by_entropy] == [b.prediction_id, d.prediction_id, a_new.prediction_id]
    assert by_margin[0].embedding is not None and by_margin[0].embedding.tolist() == [2.0, 2.0, 2.0]
    assert [p.prediction_id for p in state.predictions.unlabelled(order="margin", limit=2)] == [
        b.prediction_id, d.prediction_id]
    assert state.predictions.unlabelled(order="entropy", limit=0) == []

    state.predictions.add_many([kept(2, 7, margin=0.9, entropy=0.1)])  # b's image, predicted again
    assert [p.margin for p in state.predictions.unlabelled(order="margin", limit=10)] == [0.4, 0.4, 0.9]
    assert [p.entropy for p in state.predictions.unlabelled(order="entropy", limit=10)] == [0.3, 0.3, 0.1]
    with pytest.raises(ValueError, match="order"):
        state.predictions.unlabelled(order="score", limit=1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="limit"):
        state.predictions.unlabelled(order="margin", limit=-1)


@parametrized
def test_prune_removes_the_old_then_the_oldest_beyond_the_limit_with_their_images(
    deployment: dict[str, object], tmp_path: Path
) -> None:
    state = replica(deployment, tmp_path, "a")
    store = state.predictions
    predictions = [kept(1, 0), kept(2, 1), kept(1, 2), kept(3, 3), kept(4, 4)]
    store.add_many(predictions)
    assert store.prune(max_items=5, older_than=T0 - timedelta(days=1)) == 0  # nothing due
    assert store.prune(max_items=None, older_than=None) == 0 and store.count() == 5

    assert store.prune(max_items=None, older_than=T0 + timedelta(minutes=1, seconds=30)) == 2
    remaining = {p.prediction_id for p in predictions[2:]}
    assert {p.prediction_id for p in store.unlabelled(order="margin", limit=10)} == remaining
    # png(2)'s only prediction went, png(1)'s newer one stays
    assert stored_images(store) == {predictions[i].image_id for i in (2, 3, 4)}

    assert store.prune(max_items=2, older_than=T0) == 1  # the oldest of the three
    assert store.count() == 2 and stored_images(store) == {predictions[i].image_id for i in (3, 4)}
    with pytest.raises(PredictionNotFoundError):
        store.read_image(predictions[2].prediction_id)
    assert store.prune(max_items=0, older_than=None) == 2 and stored_images(store) == set()

    with pytest.raises(ValueError, match="max_items"):
        store.prune(max_items=-1, older_than=None)
    with pytest.raises(ValueError, match="timezone-aware"):
        store.prune(max_items=None, older_than=datetime(2026, 1, 1))  # naive: refused


@parametrized
def test_a_prediction_that_cannot_be_stored_is_refused_before_anything_is_written(
    deployment: dict[str, object], tmp_path: Path
) -> None:
    store = replica(deployment, tmp_path, "a").predictions
    good = kept(1)
    broken = [
        replace(kept(2), prediction_id="not-an-id"),
        replace(kept(2), created_at=datetime(2026, 1, 1)),  # naive
        replace(kept(2), margin=float("nan")),
        replace(kept(2), embedding=np.zeros((2, 2), np.float32)),
    ]
    for bad in broken:
        with pytest.raises(ValueError):
            store.add_many([good, bad])
    assert store.count() == 0 and stored_images(store) == set()


class _FailingSecondPut(ObjectStore):
    """An object store whose second write fails as an unreachable S3 does."""

    def __init__(self, inner: ObjectStore) -> None:
        self.inner, self.description, self.puts = inner, inner.description, 0

    def put(self, key: str, data: bytes) -> None:
        self.puts += 1
        if self.puts > 1:
            raise StoreUnavailable(self.description, "SlowDown")
        self.inner.put(key, data)

    def put_file(self, key: str, path: Path) -> None:
        raise NotImplementedError

    def get(self, key: str) -> bytes:
        return self.inner.get(key)

    def download(self, key: str, path: Path) -> None:
        self.inner.download(key, path)

    def exists(self, key: str) -> bool:
        return self.inner.exists(key)

    def delete(self, key: str) -> None:
        self.inner.delete(key)

    def keys(self, prefix: str) -> list[str]:
        return self.inner.keys(prefix)


@parametrized
def test_a_failed_add_keeps_nothing(deployment: dict[str, object], tmp_path: Path) -> None:
    state = replica(deployment, tmp_path, "a")
    store = state.predictions
    earlier = kept(9)
    store.add_many([earlier])
    first, second = sorted([kept(1), kept(2)], key=lambda p: p.image_id)  # every backend writes them in this order
    assert first.image_id[:2] != second.image_id[:2]
    # where the second image must go, a file stands instead of a directory (a damaged volume)
    if isinstance(store, SqlitePredictionStore):
        blocker: Path | None = store.images_dir / second.image_id[:2]
    else:
        assert isinstance(store, PostgresPredictionStore)
        blocker = tmp_path / "shared" / "kept" / second.image_id[:2] if "file://" in str(
            deployment["object_store"]) else None
        if blocker is None:
            store.objects = _FailingSecondPut(store.objects)
    if blocker is not None:
        blocker.parent.mkdir(parents=True, exist_ok=True)
        blocker.write_bytes(b"not a directory")

    with pytest.raises((StorageError, StoreUnavailable)) as caught:
        store.add_many([first, second])
    if isinstance(caught.value, StorageError):
        assert "keeping the predictions failed" in str(caught.value) and "damaged" in caught.value.problem
    if blocker is not None:  # mend the state (the blocker is no image of the store's)
        blocker.unlink()
    else:
        assert isinstance(store, PostgresPredictionStore) and isinstance(store.objects, _FailingSecondPut)
        store.objects = store.objects.inner
    assert store.count() == 1 and stored_images(store) == {earlier.image_id}  # the first image was removed again
    with pytest.raises(PredictionNotFoundError):
        store.get(first.prediction_id)
    store.add_many([first, second])  # the same call succeeds once the state is mended
    assert store.count() == 3 and store.read_image(second.prediction_id) == second.image


def test_a_shared_database_of_schema_2_is_migrated_and_keeps_its_rows(postgres: PostgresServer,
                                                                       tmp_path: Path) -> None:
    url = postgres.create_database("schema_2")
    old = PostgresDatabase(url)
    try:
        with old.connect() as conn:
            assert migrate(conn, MIGRATIONS[:2]) == [1, 2]
            conn.execute("INSERT INTO images (id, label, size, width, height, created_at, updated_at)"
                         " VALUES (%s, 'ants', 1, 1, 1, 'then', 'then')", (kept(3).image_id,))
    finally:
        old.close()
    database = PostgresDatabase.open(url)  # what a replica of this release does when it starts
    try:
        with database.connect() as conn:
            assert conn.execute("SELECT version FROM schema_version").fetchone()["version"] == MIGRATIONS[-1].version
            assert conn.execute("SELECT COUNT(*) AS n FROM images").fetchone()["n"] == 1
        store = PostgresPredictionStore(database, FileObjectStore(tmp_path))
        predictions = [kept(1), kept(3)]
        store.add_many(predictions)
        assert [p.prediction_id for p in store.unlabelled(order="entropy", limit=5)] == [predictions[0].prediction_id]
    finally:
        database.close()


@parametrized
def test_adds_and_deletes_of_the_same_image_on_two_replicas_leave_every_row_its_image(
    deployment: dict[str, object], tmp_path: Path
) -> None:
    replicas = two_replicas(deployment, tmp_path)
    barrier = threading.Barrier(2)
    errors: list[BaseException] = []

    def churn(state: State, offset: int) -> None:
        try:
            barrier.wait()
            for i in range(15):
                prediction = kept(1, offset + i)
                state.predictions.add_many([prediction])
                if i % 3:  # most go again at once, racing the other replica's add
                    assert state.predictions.delete(prediction.prediction_id)
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=churn, args=(state, 100 * n)) for n, state in enumerate(replicas)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    store = replicas[0].predictions
    remaining = store.unlabelled(order="margin", limit=100)
    assert store.count() == 10 and len(remaining) == 1  # 5 kept by each, one image
    assert store.read_image(remaining[0].prediction_id) == png(1)
    assert stored_images(store) == {remaining[0].image_id}
