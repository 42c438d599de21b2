"""``store/local/registry.py``, unit level with tiny real ONNX models: the single-machine model
registry (plain directories and a pointer file), its activation history and fall-back from a
corrupted active version, and derived files added to a version once (an INT8 variant)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from models.errors import ModelError, VersionNotFoundError
from models.onnx_io import cpu_session, run_in_batches
from store.local.registry import COMPLETE_MARKER, DirectoryRegistry
from store.registry import INT8_ONNX_FILENAME, graph_exporter
from tests.support.models import (
    damage,
    pointer,
    register_tiny,
    registry_with,
    tiny_spec,
    write_conv_onnx,
    write_tiny_onnx,
)


def test_round_trip_and_first_version_becomes_active(tmp_path: Path) -> None:
    registry = DirectoryRegistry(tmp_path / "home")
    assert registry.versions() == [] and registry.active_version() is None
    v1 = register_tiny(registry, tmp_path)
    assert v1.version == "v1"
    assert registry.active_version() == "v1"
    again = DirectoryRegistry(tmp_path / "home").get("v1")  # a fresh instance reads it back
    assert again.spec == tiny_spec()
    assert again.metrics == {"accuracy": 0.5}
    assert again.info["dataset_fingerprint"] == "abc"
    assert (again.report_dir / "report.md").read_text() == "# report\n"
    embeddings, targets = again.training_embeddings()
    assert embeddings.dtype == np.float32 and embeddings.shape == (4, 3)
    assert targets.tolist() == [0, 1, 0, 1]
    assert again.training_hashes() == ["", "", "", ""]
    logits, embedding = run_in_batches(cpu_session(again.onnx_path), np.ones((2, 3, 4, 4), np.float32))
    assert logits.shape == (2, 2) and np.allclose(embedding, 1.0)


def test_versions_are_plain_directories_under_the_home(tmp_path: Path) -> None:
    registry = DirectoryRegistry(tmp_path / "home")
    register_tiny(registry, tmp_path)
    path = registry.get("v1").path
    assert path == tmp_path / "home" / "versions" / "v1"
    listed = set(json.loads((path / "manifest.json").read_text())["files"])
    assert {p.name for p in path.iterdir()} == {
        *listed - {"report/report.md"}, "report", "manifest.json", COMPLETE_MARKER}
    assert [p.name for p in registry.versions_dir.iterdir()] == ["v1"]  # no staging directory left


def test_later_versions_stay_inactive_until_activated(tmp_path: Path) -> None:
    registry = DirectoryRegistry(tmp_path / "home")
    register_tiny(registry, tmp_path)
    v2 = register_tiny(registry, tmp_path, parent="v1")
    assert [v.version for v in registry.versions()] == ["v1", "v2"]
    assert registry.active_version() == "v1"
    assert v2.info["parent"] == "v1"
    registry.activate("v2")
    assert registry.active_version() == "v2"
    pointer = json.loads((tmp_path / "home" / "active_version.json").read_text())
    assert pointer["version"] == "v2"
    registry.activate("v1")  # roll back
    assert registry.active().version == "v1"  # type: ignore[union-attr]


def test_register_with_activate_flag(tmp_path: Path) -> None:
    registry = DirectoryRegistry(tmp_path / "home")
    register_tiny(registry, tmp_path)
    register_tiny(registry, tmp_path, activate=True)
    assert registry.active_version() == "v2"


@pytest.mark.parametrize("name", ["v9", "latest", "../v1", ""])
def test_unknown_versions_raise_not_found(tmp_path: Path, name: str) -> None:
    registry = DirectoryRegistry(tmp_path / "home")
    register_tiny(registry, tmp_path)
    with pytest.raises(VersionNotFoundError):
        registry.get(name)
    with pytest.raises(VersionNotFoundError):
        registry.activate(name)
    assert registry.active_version() == "v1"


def test_an_incomplete_version_is_invisible_its_number_not_reused_and_removed_by_the_next_registration(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    registry = DirectoryRegistry(tmp_path / "home")
    register_tiny(registry, tmp_path)
    register_tiny(registry, tmp_path)
    cut_short = registry.get("v2").path
    (cut_short / COMPLETE_MARKER).unlink()  # as if the writer died mid-way
    assert [v.version for v in registry.versions()] == ["v1"]
    with pytest.raises(VersionNotFoundError):
        registry.activate("v2")
    assert cut_short.is_dir()  # looking does not delete
    with caplog.at_level("WARNING", logger="store.local.registry"):
        assert register_tiny(registry, tmp_path).version == "v3"
    assert not cut_short.exists()  # its disk space is given back
    assert "removing v2: a registration that was cut short" in caplog.text
    assert [v.version for v in registry.versions()] == ["v1", "v3"]
    assert register_tiny(registry, tmp_path).version == "v4"


@pytest.mark.parametrize("damaged", ["model.onnx", "spec.json", "embeddings.npy"])
def test_a_corrupted_version_cannot_be_activated(tmp_path: Path, damaged: str) -> None:
    registry = DirectoryRegistry(tmp_path / "home")
    register_tiny(registry, tmp_path)
    v2 = register_tiny(registry, tmp_path)
    with (v2.path / damaged).open("r+b") as fh:
        fh.seek(10)
        fh.write(b"\x00garbage\x00")
    with pytest.raises(ModelError, match="corrupted"):
        registry.activate("v2")
    assert registry.active_version() == "v1"


def test_an_onnx_file_that_contradicts_the_spec_is_not_registered(tmp_path: Path) -> None:
    registry = DirectoryRegistry(tmp_path / "home")
    three_classes = write_tiny_onnx(tmp_path / "three.onnx", num_classes=3)
    with pytest.raises(ModelError, match="logits"):
        register_tiny(registry, tmp_path, onnx_file=three_classes)
    assert registry.versions() == []
    assert list(registry.versions_dir.iterdir()) == []


def test_bad_embeddings_are_refused(tmp_path: Path) -> None:
    registry = DirectoryRegistry(tmp_path / "home")
    with pytest.raises(ModelError, match="embeddings"):
        register_tiny(registry, tmp_path, embeddings=np.zeros((4, 5), np.float32))
    with pytest.raises(ModelError, match="index"):
        register_tiny(registry, tmp_path, embedding_targets=np.array([0, 1, 2, 0]))
    assert registry.versions() == []


def test_embeddings_are_never_unpickled(tmp_path: Path) -> None:
    registry = DirectoryRegistry(tmp_path / "home")
    version = register_tiny(registry, tmp_path)
    np.save(version.path / "embeddings.npy", np.array([{"evil": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ModelError, match="embeddings.npy is unreadable.*pickle"):
        version.training_embeddings()


# -- activation history and falling back from a corrupted active version ------------------------

def test_the_pointer_remembers_earlier_activations_most_recent_first(tmp_path: Path) -> None:
    registry = registry_with(tmp_path, 3)  # v1 active on registration
    for name in ("v3", "v2", "v3"):
        registry.activate(name)
    assert pointer(registry)["version"] == "v3"
    assert pointer(registry)["previous"] == ["v2", "v1"]  # no duplicates, never the active one
    assert "fallback_from" not in pointer(registry)


def test_fall_back_picks_the_most_recently_active_version_that_verifies(tmp_path: Path) -> None:
    registry = registry_with(tmp_path, 4)
    for name in ("v2", "v3", "v4"):  # history: v3, v2, v1
        registry.activate(name)
    damage(registry.get("v4").path)
    damage(registry.get("v3").path, "spec.json")  # the most recent one is damaged too
    result = registry.fall_back("v4", "model.onnx is corrupted")
    assert (result.version, result.switched, result.failed) == ("v2", True, "v4")
    assert registry.active_version() == "v2"
    record = pointer(registry)
    assert record["fallback_from"] == {"version": "v4", "reason": "model.onnx is corrupted"}
    assert record["previous"][0] == "v4"  # kept: once repaired it may be activated again
    registry.activate("v1")  # an ordinary activation clears the fall-back note
    assert "fallback_from" not in pointer(registry)


def test_without_history_the_newest_version_that_verifies_wins(tmp_path: Path) -> None:
    registry = registry_with(tmp_path, 3)
    registry.activate("v1")
    (registry.home / "active_version.json").write_text(json.dumps({"version": "v1"}))  # an old-style pointer
    damage(registry.get("v1").path)
    result = registry.fall_back("v1", "corrupted")
    assert (result.version, result.switched) == ("v3", True)
    assert registry.active_version() == "v3"


def test_fall_back_is_idempotent_and_leaves_a_moved_pointer_alone(tmp_path: Path) -> None:
    registry = registry_with(tmp_path, 3)
    registry.activate("v3")
    damage(registry.get("v3").path)
    first = registry.fall_back("v3", "corrupted")
    assert (first.version, first.switched) == ("v1", True)
    before = pointer(registry)
    again = registry.fall_back("v3", "corrupted")  # a second worker that saw v3 fail
    assert (again.version, again.switched) == ("v1", False)
    assert pointer(registry) == before  # not rewritten
    registry.activate("v2")  # someone activated another version meanwhile
    late = registry.fall_back("v3", "corrupted")
    assert (late.version, late.switched) == ("v2", False)
    assert registry.active_version() == "v2"


def test_workers_falling_back_at_once_agree_and_only_one_moves_the_pointer(tmp_path: Path) -> None:
    import threading

    registry = registry_with(tmp_path, 3)
    registry.activate("v2")
    registry.activate("v3")
    damage(registry.get("v3").path)
    barrier = threading.Barrier(6)
    results = []

    def worker() -> None:  # each with its own registry and lock file handle, as separate workers have
        own = DirectoryRegistry(tmp_path / "home")
        barrier.wait()
        results.append(own.fall_back("v3", "corrupted"))

    threads = [threading.Thread(target=worker) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert {r.version for r in results} == {"v2"}
    assert sum(r.switched for r in results) == 1
    assert registry.active_version() == "v2" and pointer(registry)["previous"] == ["v3", "v1"]


def test_when_nothing_verifies_the_pointer_stays_and_nothing_is_chosen(tmp_path: Path) -> None:
    registry = registry_with(tmp_path, 2)
    registry.activate("v2")
    damage(registry.get("v1").path)
    damage(registry.get("v2").path, "spec.json")
    before = pointer(registry)
    result = registry.fall_back("v2", "corrupted")
    assert (result.version, result.switched) == (None, False)
    assert pointer(registry) == before


def test_an_unreadable_pointer_falls_back_to_the_newest_good_version(tmp_path: Path) -> None:
    registry = registry_with(tmp_path, 2)
    (registry.home / "active_version.json").write_text("{torn")
    with pytest.raises(ModelError, match="unreadable"):
        registry.active_version()
    result = registry.fall_back(None, "unreadable pointer")
    assert (result.version, result.switched) == ("v2", True)
    assert registry.active_version() == "v2"


@pytest.mark.parametrize("manifest", ["{not json", '{"files": "nope"}', "[]", '{"files": {}}'])
def test_a_damaged_manifest_fails_verification_with_a_model_error(tmp_path: Path, manifest: str) -> None:
    registry = registry_with(tmp_path, 2)
    (registry.get("v2").path / "manifest.json").write_text(manifest)
    with pytest.raises(ModelError, match="manifest.json"):
        registry.activate("v2")
    assert registry.active_version() == "v1"


# -- files added to a version once --------------------------------------------------------------


def test_only_a_variant_that_meets_the_spec_is_added_and_a_damaged_one_fails_verify(
    grey_version: tuple[DirectoryRegistry, Path], tmp_path: Path
) -> None:
    registry, _ = grey_version
    wrong = write_tiny_onnx(tmp_path / "three-classes.onnx", num_classes=3)
    with pytest.raises(ModelError, match="does not match its spec"):
        registry.add_files("v1", {INT8_ONNX_FILENAME: wrong})
    assert INT8_ONNX_FILENAME not in registry.get("v1").manifest_files()
    registry.add_files("v1", {INT8_ONNX_FILENAME: write_conv_onnx(tmp_path / "stand-in.onnx")})
    version = registry.get("v1")
    version.verify()
    with version.int8_onnx_path.open("r+b") as fh:
        fh.seek(10)
        fh.write(b"\xff")
    with pytest.raises(ModelError, match="model.int8.onnx is corrupted"):
        version.verify()


@pytest.mark.parametrize(("details", "exporter"), [
    ({"onnx_parity": {"exporter": "dynamo"}}, "dynamo"),  # fit and bootstrap: their parity check says
    ({"exporter": "dynamo", "strategy": "retrain-head"}, "dynamo"),  # a retrain: its parent's
    ({"onnx_parity": {"max_logit_diff": 1e-6}}, "torchscript"),  # made before versions recorded it
    (None, "torchscript"),
])
def test_a_versions_exporter_is_what_it_records_or_the_one_older_versions_had(details, exporter) -> None:
    assert graph_exporter({"details": details}) == exporter
