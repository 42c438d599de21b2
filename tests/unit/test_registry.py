"""The model registry on a real BentoML store, with a tiny real ONNX model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from models.errors import ModelError, VersionNotFoundError
from models.onnx_io import check_onnx_contract, cpu_session, run_in_batches
from models.registry import COMPLETE_MARKER, ModelRegistry
from tests.conftest import tiny_spec, write_tiny_onnx


def register(registry: ModelRegistry, tmp_path: Path, **overrides: object):
    onnx_file = write_tiny_onnx(tmp_path / f"tiny-{len(registry.versions())}.onnx")
    report = tmp_path / "report"
    report.mkdir(exist_ok=True)
    (report / "report.md").write_text("# report\n")
    kwargs = dict(
        onnx_file=onnx_file, spec=tiny_spec(), metrics={"accuracy": 0.5},
        embeddings=np.arange(12, dtype=np.float32).reshape(4, 3),
        embedding_targets=np.array([0, 1, 0, 1]), parent=None, dataset_fingerprint="abc",
        details={"strategy": "head"}, report_dir=report,
    )
    kwargs.update(overrides)
    return registry.register(**kwargs)  # type: ignore[arg-type]


def test_round_trip_and_first_version_becomes_active(tmp_path: Path) -> None:
    registry = ModelRegistry(tmp_path / "home")
    assert registry.is_empty() and registry.active_version() is None
    v1 = register(registry, tmp_path)
    assert v1.version == "v1"
    assert registry.active_version() == "v1"
    again = ModelRegistry(tmp_path / "home").get("v1")  # a fresh instance reads it back
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


def test_versions_are_bentoml_models(tmp_path: Path) -> None:
    import bentoml
    from bentoml._internal.models import ModelStore

    registry = ModelRegistry(tmp_path / "home")
    register(registry, tmp_path)
    model = bentoml.models.get("transfer-serve:v1", _model_store=ModelStore(registry.store_path))
    assert Path(model.path) == registry.get("v1").path


def test_later_versions_stay_inactive_until_activated(tmp_path: Path) -> None:
    registry = ModelRegistry(tmp_path / "home")
    register(registry, tmp_path)
    v2 = register(registry, tmp_path, parent="v1")
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
    registry = ModelRegistry(tmp_path / "home")
    register(registry, tmp_path)
    register(registry, tmp_path, activate=True)
    assert registry.active_version() == "v2"


@pytest.mark.parametrize("name", ["v9", "latest", "../v1", ""])
def test_unknown_versions_raise_not_found(tmp_path: Path, name: str) -> None:
    registry = ModelRegistry(tmp_path / "home")
    register(registry, tmp_path)
    with pytest.raises(VersionNotFoundError):
        registry.get(name)
    with pytest.raises(VersionNotFoundError):
        registry.activate(name)
    assert registry.active_version() == "v1"


def test_an_incomplete_version_is_invisible_and_its_number_not_reused(tmp_path: Path) -> None:
    registry = ModelRegistry(tmp_path / "home")
    register(registry, tmp_path)
    register(registry, tmp_path)
    (registry.get("v2").path / COMPLETE_MARKER).unlink()  # as if the writer died mid-way
    assert [v.version for v in registry.versions()] == ["v1"]
    with pytest.raises(VersionNotFoundError):
        registry.activate("v2")
    assert register(registry, tmp_path).version == "v3"


@pytest.mark.parametrize("damaged", ["model.onnx", "spec.json", "embeddings.npy"])
def test_a_corrupted_version_cannot_be_activated(tmp_path: Path, damaged: str) -> None:
    registry = ModelRegistry(tmp_path / "home")
    register(registry, tmp_path)
    v2 = register(registry, tmp_path)
    with (v2.path / damaged).open("r+b") as fh:
        fh.seek(10)
        fh.write(b"\x00garbage\x00")
    with pytest.raises(ModelError, match="corrupted"):
        registry.activate("v2")
    assert registry.active_version() == "v1"


def test_an_onnx_file_that_contradicts_the_spec_is_not_registered(tmp_path: Path) -> None:
    registry = ModelRegistry(tmp_path / "home")
    three_classes = write_tiny_onnx(tmp_path / "three.onnx", num_classes=3)
    with pytest.raises(ModelError, match="logits"):
        register(registry, tmp_path, onnx_file=three_classes)
    assert registry.is_empty()
    assert not (registry.store_path / "transfer-serve").exists() or not any(
        (registry.store_path / "transfer-serve").iterdir()
    )


def test_check_onnx_contract_rejects_non_onnx_bytes(tmp_path: Path) -> None:
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a protobuf at all")
    with pytest.raises(ModelError, match="not a valid ONNX model"):
        check_onnx_contract(junk, tiny_spec())


def test_bad_embeddings_are_refused(tmp_path: Path) -> None:
    registry = ModelRegistry(tmp_path / "home")
    with pytest.raises(ModelError, match="embeddings"):
        register(registry, tmp_path, embeddings=np.zeros((4, 5), np.float32))
    with pytest.raises(ModelError, match="index"):
        register(registry, tmp_path, embedding_targets=np.array([0, 1, 2, 0]))
    assert registry.is_empty()


def test_embeddings_are_never_unpickled(tmp_path: Path) -> None:
    registry = ModelRegistry(tmp_path / "home")
    version = register(registry, tmp_path)
    np.save(version.path / "embeddings.npy", np.array([{"evil": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="pickle"):
        version.training_embeddings()
