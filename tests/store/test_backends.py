"""The storage interfaces on every backend: SQLite + files, Postgres + a shared directory,
Postgres + S3 (moto's server). The same calls must give the same answers; where replicas share
state, what one writes the other reads. Real servers, started by the tests on 127.0.0.1 (fixtures
in ``conftest.py``, helpers in :mod:`tests.support.backends`)."""

from __future__ import annotations

import hashlib
import json
import tarfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from models.errors import ModelError, VersionNotFoundError
from store.errors import StoreUnavailable
from store.jobs import JobConflict
from store.labels import InvalidLabelError, check_image
from store.maintenance import copy_home, prune_versions, seed_registry
from store.settings import StoreSettings
from store.shared import SharedBackend
from store.state import State, open_state
from tests.support.backends import BACKENDS, kept, parametrized, png, replica
from tests.support.models import registry_with, tiny_spec, write_tiny_onnx
from tests.support.paths import ROOT
from tests.support.postgres import PostgresServer
from tests.support.s3 import S3Server


def register(state: State, tmp_path: Path, seed: int = 0, **overrides: object) -> str:
    kwargs: dict[str, object] = dict(
        onnx_file=write_tiny_onnx(tmp_path / f"tiny-{seed}.onnx", seed=seed), spec=tiny_spec(), metrics={"a": seed},
        embeddings=np.zeros((2, 3), np.float32), embedding_targets=np.array([0, 1]), parent=None,
        dataset_fingerprint=None)
    kwargs.update(overrides)
    return state.registry.register(**kwargs).version  # type: ignore[arg-type]


@parametrized
def test_labels_written_by_one_replica_are_read_by_the_other(deployment: dict[str, object], tmp_path: Path) -> None:
    a, b = replica(deployment, tmp_path, "a"), replica(deployment, tmp_path, "b")
    if "home" in deployment:  # one machine: both "replicas" are the same home
        b = a
    first = a.labels.add_many([check_image(png(1), max_pixels=10**6), check_image(png(2), max_pixels=10**6)], "ants")
    assert [r.status for r in first] == ["stored", "stored"]
    assert b.labels.counts() == {"ants": 2}
    moved = b.labels.add(png(1), "bees", max_pixels=10**6)
    assert (moved.status, moved.previous_label) == ("moved", "ants")
    assert a.labels.counts() == {"ants": 1, "bees": 1}
    assert a.labels.read(moved.image_id) == png(1)
    assert b.labels.delete(moved.image_id) and not a.labels.delete(moved.image_id)
    assert [image.label for image in a.labels.images()] == ["ants"]


@parametrized
def test_a_domain_tag_is_kept_replaced_by_a_new_one_and_left_by_an_upload_without_one(
    deployment: dict[str, object], tmp_path: Path
) -> None:
    a, b = replica(deployment, tmp_path, "a"), replica(deployment, tmp_path, "b")
    if "home" in deployment:
        b = a
    night = a.labels.add(png(11), "ants", max_pixels=10**6, domain="night camera")
    a.labels.add(png(12), "bees", max_pixels=10**6)
    assert night.status == "stored"
    assert {i.image_id: i.domain for i in b.labels.images()} == {night.image_id: "night camera",
                                                                  check_image(png(12), max_pixels=10**6).image_id: None}
    assert b.labels.domain_counts() == {"night camera": {"ants": 1}}
    assert b.labels.add(png(11), "ants", max_pixels=10**6).status == "unchanged"  # no domain: the tag stays
    assert a.labels.domain_counts() == {"night camera": {"ants": 1}}
    moved = b.labels.add(png(11), "bees", max_pixels=10**6, domain="fog")  # a new tag replaces the old
    assert moved.status == "moved" and a.labels.domain_counts() == {"fog": {"bees": 1}}
    with pytest.raises(InvalidLabelError, match="domain: .*name 'a/b' may only contain"):
        a.labels.add(png(13), "ants", max_pixels=10**6, domain="a/b")
    assert a.labels.counts() == {"bees": 2}  # the refused upload stored nothing


@parametrized
def test_a_job_records_its_kind(deployment: dict[str, object], tmp_path: Path) -> None:
    state = replica(deployment, tmp_path, "a")
    adapt = state.jobs.create({"method": "diagonal"}, "v1", kind="adapt")
    assert adapt.kind == "adapt" and state.jobs.get(adapt.id).kind == "adapt"  # type: ignore[union-attr]
    state.jobs.mark_running(adapt.id, 0)
    state.jobs.finish(adapt.id, "rejected", "v2", {})
    assert state.jobs.create({}, "v1").kind == "retrain"


@parametrized
def test_the_same_image_uploaded_to_two_replicas_at_once_is_stored_once(deployment: dict[str, object],
                                                                         tmp_path: Path) -> None:
    replicas = [replica(deployment, tmp_path, name) for name in ("a", "b")]
    if "home" in deployment:
        replicas = [replicas[0], replicas[0]]
    data = png(7)
    results: list[str] = []
    barrier = threading.Barrier(2)

    def upload(state: State) -> None:
        barrier.wait()
        results.append(state.labels.add(data, "ants", max_pixels=10**6).status)

    threads = [threading.Thread(target=upload, args=(state,)) for state in replicas]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(results) == ["stored", "unchanged"]
    assert replicas[1].labels.counts() == {"ants": 1}


@parametrized
def test_embeddings_round_trip_bit_for_bit(deployment: dict[str, object], tmp_path: Path) -> None:
    state = replica(deployment, tmp_path, "a")
    special = np.array([0.0, -0.0, np.inf, -np.inf, 1e-45, 3.4e38, 1 / 3], dtype=np.float32)
    state.embeddings.put_many({"a" * 64: special}, "bb")
    state.embeddings.put_many({"a" * 64: special, "b" * 64: np.ones(7, np.float32)}, "bb")  # replaces
    found = state.embeddings.get_many(["a" * 64, "b" * 64, "c" * 64], "bb")
    assert set(found) == {"a" * 64, "b" * 64} and found["a" * 64].tobytes() == special.tobytes()
    assert state.embeddings.count("bb") == 2 and state.embeddings.get_many(["a" * 64], "other") == {}


@parametrized
def test_one_retrain_at_a_time_per_deployment(deployment: dict[str, object], tmp_path: Path) -> None:
    replicas = [replica(deployment, tmp_path, name) for name in ("a", "b")]
    if "home" in deployment:
        replicas = [replicas[0], replicas[0]]
    outcomes: list[object] = []
    barrier = threading.Barrier(2)

    def start(state: State) -> None:
        barrier.wait()
        try:
            outcomes.append(state.jobs.create({}, "v1"))
        except JobConflict as exc:
            outcomes.append(exc)

    threads = [threading.Thread(target=start, args=(state,)) for state in replicas]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    conflicts = [o for o in outcomes if isinstance(o, JobConflict)]
    created = [o for o in outcomes if not isinstance(o, JobConflict)]
    assert len(conflicts) == 1 and len(created) == 1
    assert conflicts[0].job.id == created[0].id  # type: ignore[attr-defined]  # the 409 names the running job


@parametrized
def test_a_finished_job_is_never_failed_afterwards(deployment: dict[str, object], tmp_path: Path) -> None:
    state = replica(deployment, tmp_path, "a")
    job = state.jobs.create({"force": True}, "v1")
    state.jobs.mark_running(job.id, 0)
    state.jobs.finish(job.id, "succeeded", "v2", {"gate": "forced"})
    assert not state.jobs.fail(job.id, "too late")
    finished = state.jobs.get(job.id)
    assert finished is not None and (finished.state, finished.version, finished.metrics) == (
        "succeeded", "v2", {"gate": "forced"})


@pytest.mark.parametrize("deployment", BACKENDS[1:], indirect=True)
def test_a_job_whose_replica_stops_renewing_its_lease_is_failed_by_another(deployment: dict[str, object],
                                                                           tmp_path: Path) -> None:
    a, b = replica(deployment, tmp_path, "a"), replica(deployment, tmp_path, "b")
    job = a.jobs.create({}, "v1")
    a.jobs.mark_running(job.id, 1)  # a's process, which b cannot see
    assert a.jobs.renew_lease(job.id) and not b.jobs.renew_lease(job.id)  # only its own replica renews
    assert b.jobs.get(job.id).state == "running"  # type: ignore[union-attr]
    time.sleep(1.5)  # the lease (1 s in these tests) runs out
    failed = b.jobs.get(job.id)
    assert failed is not None and failed.state == "failed" and "stopped renewing its lease" in (failed.error or "")
    assert "(a)" in (failed.error or "") and not a.jobs.renew_lease(job.id)  # the job learns it must stop
    b.jobs.create({}, "v1")  # the deployment can retrain again


@parametrized
def test_versions_and_the_active_pointer_are_shared(deployment: dict[str, object], tmp_path: Path) -> None:
    a, b = replica(deployment, tmp_path, "a"), replica(deployment, tmp_path, "b")
    if "home" in deployment:
        b = a
    assert register(a, tmp_path, 1) == "v1" and register(b, tmp_path, 2, parent="v1") == "v2"
    assert b.registry.active_version() == "v1"  # the first one registered became active
    b.registry.activate("v2")
    pointer = a.registry.active_pointer()
    assert pointer is not None and (pointer.version, pointer.previous) == ("v2", ("v1",))
    version = a.registry.get("v2")
    version.verify()
    assert version.info["parent"] == "v1" and version.metrics == {"a": 2}
    assert [v.summary()["version"] for v in b.registry.versions()] == ["v1", "v2"]
    with pytest.raises(VersionNotFoundError):
        a.registry.get("v9")


@pytest.mark.parametrize("deployment", BACKENDS[1:], indirect=True)
def test_a_damaged_local_copy_is_fetched_again_and_the_pointer_stays(deployment: dict[str, object],
                                                                      tmp_path: Path) -> None:
    a, b = replica(deployment, tmp_path, "a"), replica(deployment, tmp_path, "b")
    register(a, tmp_path, 1)
    register(a, tmp_path, 2, activate=True)
    copy = b.registry.get("v2")
    (copy.path / "model.onnx").write_bytes(b"damaged on this replica only")
    with pytest.raises(ModelError, match="corrupted"):
        copy.verify()
    result = b.registry.fall_back("v2", "model.onnx is corrupted")
    assert (result.version, result.switched) == ("v2", False)
    b.registry.get("v2").verify()
    assert a.registry.active_version() == "v2"  # the shared pointer did not move


@parametrized
def test_derived_files_reach_every_replica(deployment: dict[str, object], tmp_path: Path) -> None:
    a, b = replica(deployment, tmp_path, "a"), replica(deployment, tmp_path, "b")
    if "home" in deployment:
        b = a
    register(a, tmp_path, 1)
    assert not b.registry.get("v1").has_int8()
    int8 = write_tiny_onnx(tmp_path / "int8.onnx", seed=5)
    a.registry.add_files("v1", {"model.int8.onnx": int8})
    copy = b.registry.get("v1")
    assert copy.has_int8() and copy.int8_onnx_path.read_bytes() == int8.read_bytes()
    copy.verify()
    with pytest.raises(ModelError, match="immutable"):
        b.registry.add_files("v1", {"model.int8.onnx": int8})


@parametrized
def test_prune_keeps_the_active_version_its_history_and_the_newest(deployment: dict[str, object],
                                                                    tmp_path: Path) -> None:
    state = replica(deployment, tmp_path, "a")
    for seed in range(1, 6):
        register(state, tmp_path, seed)
    state.registry.activate("v2")  # history: v1; active v2
    assert prune_versions(state.registry, 1, dry_run=True) == ["v3", "v4"]
    assert [v.version for v in state.registry.versions()] == ["v1", "v2", "v3", "v4", "v5"]
    assert prune_versions(state.registry, 1) == ["v3", "v4"]
    assert [v.version for v in state.registry.versions()] == ["v1", "v2", "v5"]
    assert register(state, tmp_path, 9) == "v6"  # numbers are never reused
    with pytest.raises(ModelError, match="active"):
        state.registry.delete("v2")


@parametrized
def test_an_empty_state_is_seeded_with_the_images_model_once(deployment: dict[str, object], tmp_path: Path) -> None:
    seed_registry_ = registry_with(tmp_path / "seed", 2)
    seed_registry_.activate("v2")
    seed_home = tmp_path / "seed" / "home"
    state = replica(deployment, tmp_path, "a")
    seeded = seed_registry(seed_home, state.registry)
    assert seeded is not None and seeded.version == "v1"
    assert state.registry.active_version() == "v1"
    original = seed_registry_.get("v2")
    assert seeded.onnx_path.read_bytes() == original.onnx_path.read_bytes()
    assert seeded.spec == original.spec and seeded.metrics == original.metrics
    assert np.array_equal(seeded.training_embeddings()[0], original.training_embeddings()[0])
    assert seeded.info["details"]["seeded_from"].endswith("(v2)")
    assert seed_registry(seed_home, state.registry) is None  # a state with a version is left alone
    assert [v.version for v in state.registry.versions()] == ["v1"]


def test_seeding_from_a_home_without_an_active_version_says_so(tmp_path: Path) -> None:
    empty_seed = tmp_path / "seed"
    open_state(home=empty_seed)  # an empty single-machine home: a database, no version
    with pytest.raises(ModelError, match="no active model version"):
        seed_registry(empty_seed, open_state(home=tmp_path / "target").registry)
    assert open_state(home=tmp_path / "target").registry.versions() == []


@parametrized
def test_heartbeats_list_the_live_replicas(deployment: dict[str, object], tmp_path: Path) -> None:
    a, b = replica(deployment, tmp_path, "a"), replica(deployment, tmp_path, "b")
    if "home" in deployment:
        b = a
    a.registry.report_serving("a", "v1", "fp32")
    b.registry.report_serving("b", "v1", "int8")
    assert [(r.id, r.version, r.variant) for r in a.registry.replicas()] == [("a", "v1", "fp32"), ("b", "v1", "int8")]


# -- an unreachable state ----------------------------------------------------------------------------

def test_a_stopped_database_is_unavailable_writes_nothing_and_recovers(tmp_path: Path) -> None:
    server = PostgresServer()
    try:
        (tmp_path / "shared").mkdir()
        settings = StoreSettings(home=tmp_path / "a", database_url=server.url(),
                                 object_store=f"file://{tmp_path / 'shared'}")
        state = open_state(settings)
        state.labels.add(png(1), "ants", max_pixels=10**6)
        server.stop()
        with pytest.raises(StoreUnavailable, match="the database cannot be reached"):
            state.labels.add(png(2), "ants", max_pixels=10**6)
        with pytest.raises(StoreUnavailable):
            state.jobs.create({}, "v1")
        server.start()
        assert state.labels.counts() == {"ants": 1}  # the same objects work again, no restart
        state.labels.add(png(2), "ants", max_pixels=10**6)
        assert state.labels.counts() == {"ants": 2}
    finally:
        server.close()


def test_a_stopped_object_store_is_unavailable_and_no_row_is_left(postgres: PostgresServer, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    server = S3Server(tmp_path / "moto.log")
    try:
        for key, value in server.env().items():
            monkeypatch.setenv(key, value)
        server.create_bucket("objects-down")
        settings = StoreSettings(home=tmp_path / "a", database_url=postgres.create_database("objects_down"),
                                 object_store="s3://objects-down/p")
        state = open_state(settings)
        state.labels.add(png(1), "ants", max_pixels=10**6)
        server.stop()
        with pytest.raises(StoreUnavailable, match="object store"):
            state.labels.add(png(2), "bees", max_pixels=10**6)
        assert state.labels.counts() == {"ants": 1}  # the row of the failed upload was rolled back
    finally:
        server.stop()


# -- settings ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("env,message", [
    ({"TRANSFER_SERVE_DATABASE_URL": "mysql://u:hunter2secret@h/db"}, "must start with postgresql://"),
    ({"TRANSFER_SERVE_DATABASE_URL": "postgresql:///db"}, "names no host"),
    ({"TRANSFER_SERVE_OBJECT_STORE": "s3://b/p"}, "need a shared database too"),
    ({"TRANSFER_SERVE_DATABASE_URL": "postgresql://h/db", "TRANSFER_SERVE_OBJECT_STORE": "ftp://x"}, "file:///path"),
    ({"TRANSFER_SERVE_DATABASE_URL": "postgresql://h/db", "TRANSFER_SERVE_OBJECT_STORE": "s3://"}, "names no bucket"),
])
def test_settings_say_what_is_wrong_and_never_echo_the_password(env: dict[str, str], message: str,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ValidationError) as caught:
        StoreSettings()
    assert message in str(caught.value) and "hunter2secret" not in str(caught.value)


def test_the_database_url_is_a_secret() -> None:
    settings = StoreSettings(database_url="postgresql://user:hunter2secret@db.example:5432/ts?sslmode=require")
    assert "hunter2secret" not in repr(settings) and "hunter2secret" not in str(settings.model_dump())
    assert settings.redacted_database_url() == "postgresql://user@db.example:5432/ts"


# -- moving a single-machine deployment --------------------------------------------------------------

@pytest.mark.parametrize("deployment", BACKENDS[1:], indirect=True)
def test_copy_a_single_machine_home_into_the_shared_state(deployment: dict[str, object], tmp_path: Path) -> None:
    source = tmp_path / "old"
    source.mkdir()
    with tarfile.open(ROOT / "tests/fixtures/state-eb365a9.tar.gz") as archive:
        archive.extractall(source, filter="data")
    expected = json.loads((ROOT / "tests/fixtures/state-eb365a9.expected.json").read_text())
    predictions = [kept(1, 0), kept(1, 1, embedding=np.array([1 / 3, -0.0], np.float32)), kept(2, 2)]
    open_state(home=source).predictions.add_many(predictions)  # kept since the upgrade
    target = SharedBackend(StoreSettings(home=tmp_path / "replica", **deployment))  # type: ignore[arg-type]

    dry = copy_home(source, target, dry_run=True)
    assert dry.versions_copied == ["v1", "v2", "v3"] and dry.labels == {"stored": 5} and dry.predictions_copied == 3
    assert target.open_registry().versions() == [] and target.open_labels().counts() == {}  # nothing written
    assert target.open_predictions().count() == 0 and "would copy" in dry.describe()
    first = copy_home(source, target)
    again = copy_home(source, target)
    assert (first.versions_copied, again.versions_copied, again.versions_present) == (
        ["v1", "v2", "v3"], [], ["v1", "v2", "v3"])
    assert (first.jobs_copied, again.jobs_present, again.labels) == (3, 3, {"unchanged": 5})
    assert (first.predictions_copied, first.predictions_present, again.predictions_copied,
            again.predictions_present) == (3, 0, 0, 3)
    assert "3 kept prediction(s) (0 already there)" in first.describe()

    state = State(target)
    pointer = state.registry.active_pointer()
    assert pointer is not None and (pointer.version, list(pointer.previous)) == ("v2", ["v3", "v1"])
    for name, old in expected["versions"].items():
        copy = state.registry.get(name)
        copy.verify()
        assert copy.manifest_files() == old["manifest"] and copy.has_int8() is old["has_int8"]
    assert state.labels.counts() == expected["labels"]["counts"]
    for image_id in expected["labels"]["images"]:
        assert hashlib.sha256(state.labels.read(image_id)).hexdigest() == image_id
    for backbone, vectors in expected["embeddings"].items():
        assert state.embeddings.count(backbone) == len(vectors)
    for job_id, old in expected["jobs"].items():
        assert state.jobs.get(job_id).state == old["state"]  # type: ignore[union-attr]
    assert register(state, tmp_path, 9) == "v4"  # numbering continues above the copied versions
    assert state.predictions.count() == 3
    for prediction in predictions:
        carried = state.predictions.get(prediction.prediction_id)
        assert (carried.image_id, carried.label, carried.margin, carried.top_k, carried.created_at) == (
            prediction.image_id, prediction.label, prediction.margin, prediction.top_k, prediction.created_at)
        assert carried.embedding is not None and prediction.embedding is not None
        assert carried.embedding.tobytes() == prediction.embedding.tobytes()
        assert state.predictions.read_image(prediction.prediction_id) == prediction.image
