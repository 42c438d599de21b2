"""Project level (``store/`` and ``training/cli.py`` on a real old state directory): a state
directory written by eb365a9 (BentoML's store layout, an unversioned database, the pointer file)
opens in today's code without loss: every version, the active version and its history, every
label, embedding and job, with the tables added since (kept predictions) created beside them
(``tests/fixtures/README.md`` says how the fixture was written, by the old code itself)."""

from __future__ import annotations

import hashlib
import json
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from store.local import database
from store.local.registry import COMPLETE_MARKER
from store.state import State, open_state
from tests.support.backends import kept
from tests.support.cli import last_json
from tests.support.paths import ROOT
from training.cli import main as cli_main

FIXTURES = ROOT / "tests" / "fixtures"


@pytest.fixture(scope="module")
def expected() -> dict[str, Any]:
    return json.loads((FIXTURES / "state-eb365a9.expected.json").read_text())


@pytest.fixture
def old_home(tmp_path: Path) -> Path:
    home = tmp_path / "home"
    home.mkdir()
    with tarfile.open(FIXTURES / "state-eb365a9.tar.gz") as archive:
        archive.extractall(home, filter="data")
    assert (home / "bentoml/models/transfer-serve/v1/model.yaml").is_file()  # really the old layout
    with database.connected(home / database.DATABASE_FILENAME) as conn:
        assert database.schema_version(conn) == 0
    return home


@pytest.fixture
def upgraded(old_home: Path) -> State:
    return open_state(home=old_home)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_every_version_survives_with_its_files_and_checksums(upgraded: State, old_home: Path,
                                                             expected: dict[str, Any]) -> None:
    registry = upgraded.registry
    assert [v.version for v in registry.versions()] == expected["version_order"] == ["v1", "v2", "v3"]
    for name, old in expected["versions"].items():
        version = registry.get(name)
        assert version.path == old_home / "versions" / name
        version.verify()  # every file matches the manifest, the graphs match the spec
        assert version.manifest_files() == old["manifest"]
        for file, digest in old["manifest"].items():
            assert sha256(version.path / file) == digest
        assert (version.path / COMPLETE_MARKER).read_text() == old["complete_marker"]
        assert version.has_int8() is old["has_int8"]
        assert version.info == old["info"] and version.metrics == old["metrics"]
        assert version.info["parent"] == old["parent"]
        assert list(version.spec.labels) == old["labels"]
        assert version.spec.model_dump(mode="json") == old["spec"]
        summary = version.summary()
        assert summary.pop("exporter") == "torchscript"  # added since: what every older graph was made by
        assert summary == old["summary"]
        embeddings, targets = version.training_embeddings()
        assert embeddings.tolist() == old["training"]["embeddings"]
        assert targets.tolist() == old["training"]["targets"]
        assert version.training_hashes() == old["training"]["hashes"]


def test_bentoml_layout_is_gone_once_moved(upgraded: State, old_home: Path) -> None:
    upgraded.registry.versions()
    assert not (old_home / "bentoml").exists()
    assert sorted(p.name for p in (old_home / "versions").iterdir()) == ["v1", "v2", "v3"]


def test_the_active_version_and_its_history_survive(upgraded: State, expected: dict[str, Any]) -> None:
    pointer = upgraded.registry.active_pointer()
    assert pointer is not None
    assert pointer.version == expected["active_version"] == "v2"
    assert list(pointer.previous) == expected["pointer"]["previous"] == ["v3", "v1"]
    assert pointer.activated_at == expected["pointer"]["activated_at"]
    assert pointer.fallback_from is None


def test_every_label_survives_and_the_deleted_image_stays_gone(upgraded: State, expected: dict[str, Any]) -> None:
    labels = upgraded.labels
    old = expected["labels"]
    assert {image.image_id: image.label for image in labels.images()} == {
        image_id: row["label"] for image_id, row in old["images"].items()}
    assert labels.counts() == old["counts"]
    for image_id in old["images"]:
        assert hashlib.sha256(labels.read(image_id)).hexdigest() == image_id
    assert old["deleted"] not in {image.image_id for image in labels.images()}
    assert labels.add(labels.read(old["moved"]), "bees", max_pixels=10_000).status == "unchanged"


def test_every_embedding_survives_bit_for_bit(upgraded: State, expected: dict[str, Any]) -> None:
    cache = upgraded.embeddings
    for backbone, vectors in expected["embeddings"].items():
        found = cache.get_many(list(vectors), backbone)
        assert set(found) == set(vectors) and cache.count(backbone) == len(vectors)
        for image_id, values in vectors.items():
            assert np.array_equal(found[image_id], np.array(values, np.float32))


def test_every_job_survives(upgraded: State, expected: dict[str, Any]) -> None:
    for job_id, old in expected["jobs"].items():
        job = upgraded.jobs.get(job_id)
        assert job is not None
        # every job of that release was a retrain: the column added since says so
        assert job.model_dump() == {**{key: value for key, value in old.items() if key != "pid"}, "kind": "retrain"}
        assert job.pid == old["pid"]
    assert {state: upgraded.jobs.get(job_id).state  # type: ignore[union-attr]
            for state, job_id in expected["jobs_by_outcome"].items()} == {
        "succeeded": "succeeded", "rejected": "rejected", "failed": "failed"}


def test_the_database_gets_its_schema_version_and_keeps_its_rows(upgraded: State, old_home: Path,
                                                                  expected: dict[str, Any]) -> None:
    _ = upgraded.labels  # opens (and migrates) the database
    with database.connected(old_home / database.DATABASE_FILENAME) as conn:
        assert database.schema_version(conn) == database.MIGRATIONS[-1].version
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        schema = dict(conn.execute("SELECT name, sql FROM sqlite_master WHERE sql IS NOT NULL").fetchall())
    # the tables were adopted as they were, not recreated: migration 2 only added its columns
    added = {"images": ", domain TEXT)", "embeddings": ")", "jobs": ", kind TEXT NOT NULL DEFAULT 'retrain')"}
    for name, columns in added.items():
        old_sql = expected["database"]["schema"][name]
        assert old_sql.endswith(")") and schema[name] == old_sql[:-1] + columns, (name, schema[name])
    # migration 3 (kept predictions) added its tables and indexes beside them
    assert database.MIGRATIONS[-1].version >= 3
    assert {"kept_images", "predictions", "predictions_by_created_at", "predictions_by_image",
            "predictions_by_margin", "predictions_by_entropy"} <= set(schema)


def test_the_upgraded_state_keeps_working(upgraded: State, tmp_path: Path) -> None:
    from tests.support.models import tiny_spec, write_tiny_onnx

    registry = upgraded.registry
    registry.activate("v3")
    pointer = registry.active_pointer()
    assert pointer is not None and (pointer.version, pointer.previous) == ("v3", ("v2", "v1"))
    new = registry.register(
        onnx_file=write_tiny_onnx(tmp_path / "t.onnx"), spec=tiny_spec(("ants", "bees")), metrics={},
        embeddings=np.zeros((0, 3), np.float32), embedding_targets=np.zeros(0, np.int64),
        parent="v3", dataset_fingerprint=None,
    )
    assert new.version == "v4"  # numbering continues above the old versions
    job = upgraded.jobs.create({}, "v3")
    assert upgraded.jobs.get(job.id) == job
    prediction = kept(1)
    upgraded.predictions.add_many([prediction])
    assert [p.prediction_id for p in upgraded.predictions.unlabelled(order="margin", limit=5)] == [
        prediction.prediction_id]


def test_the_cli_lists_the_upgraded_versions(old_home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["--home", str(old_home), "models", "--json"]) == 0
    listing = last_json(capsys.readouterr().out)
    assert listing["active"] == "v2"
    assert [(row["version"], row["int8"]) for row in listing["versions"]] == [
        ("v1", False), ("v2", True), ("v3", False)]
