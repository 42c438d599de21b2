"""``service/retrain.py`` (the retrain job), at two levels.

Unit, in process, on a tiny real ONNX model whose embedding is an image's mean colour: solid-colour
photos are separable, so every outcome of the gate can be staged exactly; the failure reasons a
job records; a version with an INT8 variant begets one with its new head. Real server (slow): a
job that cannot write its model (a file size limit) fails and registers nothing; a retrain through
the admin API on a Lite1 and on a Lite2 bootstrap (their input sides, 240 and 260) ends with the
new version live."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from models.head import LinearHead
from models.int8 import MAX_CALIBRATION_IMAGES
from models.onnx_io import read_head
from models.preprocess import decode_image, preprocess_image
from models.retrain import RetrainParams
from service.retrain import RetrainResult, add_int8_variant, failure_reason, retrain
from store import errors
from store.local.registry import DirectoryRegistry
from store.registry import INT8_ONNX_FILENAME, ModelVersion
from store.state import State, open_state
from tests.support.admin import (
    AUTH,
    STORAGE_ENV,
    assert_507,
    assert_nothing_registered,
    assert_store_consistent,
    failed_retrain,
    predicts,
    upload,
    upload_blobs,
    wait_for_version,
)
from tests.support.images import colour_photos, grey_png, jpeg_files, noise_png, small_photos
from tests.support.net import free_port
from tests.support.server import Server, serving, start_command, wait_for_job, wait_until
from tests.support.stores import add_labelled
from training.backbones import OFFLINE_BACKBONES
from training.quantize import INT8_REPORT_FILENAME, quantize_version


def state_of(home: Path) -> State:
    return open_state(home=home)


def run(home: Path, **params: object) -> RetrainResult:
    phases: list[str] = []
    result = retrain(state_of(home), home, RetrainParams(**params), lambda phase, _: phases.append(phase),
                     threads=1)
    assert phases[0] == "embedding" and "verifying" in phases
    return result


# -- the job, in process ------------------------------------------------------------------------


def test_promotes_a_version_that_is_not_worse_and_keeps_old_classes(colour_home: Path) -> None:
    add_labelled(colour_home, "red", colour_photos("red", 6))
    add_labelled(colour_home, "green", colour_photos("green", 6))  # a new label: a new class
    result = run(colour_home)
    assert result.state == "succeeded" and result.version == "v2"
    registry = state_of(colour_home).registry
    assert registry.active_version() == "v2"
    v2 = registry.get("v2")
    assert v2.spec.labels == ("red", "blue", "green")  # blue kept from v1's own embeddings
    assert v2.info["parent"] == "v1"
    metrics = result.metrics
    assert metrics["from_parent"] == 4 and metrics["embeddings_computed"] == 12
    assert metrics["candidate"]["held_out"] == metrics["active"]["held_out"] > 0
    # the new graph is v1's backbone with the new head
    weight, bias = read_head(v2.onnx_path)
    assert weight.shape == (3, 3)
    assert metrics["head_check_max_diff"] < 1e-5
    hashes = set(v2.training_hashes())
    assert {"a" * 64, "c" * 64} <= hashes and len(hashes) == 16  # 4 from v1 + 12 stored


def test_second_job_hits_the_embedding_cache(colour_home: Path) -> None:
    add_labelled(colour_home, "red", colour_photos("red", 4))
    add_labelled(colour_home, "blue", colour_photos("blue", 4))
    run(colour_home)
    add_labelled(colour_home, "blue", colour_photos("blue", 2, start=100))
    metrics = run(colour_home).metrics
    assert metrics["embeddings_cached"] == 8 and metrics["embeddings_computed"] == 2
    assert state_of(colour_home).embeddings.count("0" * 64) == 10


def test_a_worse_candidate_is_kept_inactive_and_the_job_is_rejected(colour_home: Path) -> None:
    # held-out images carry true labels; the training ones are swapped: the candidate learns
    # the opposite of the truth, the active model is right
    add_labelled(colour_home, "red", colour_photos("red", 3, held=True) + colour_photos("blue", 6, held=False))
    add_labelled(colour_home, "blue",
                 colour_photos("blue", 3, held=True) + colour_photos("red", 6, held=False))
    result = run(colour_home)
    assert result.state == "rejected"
    assert result.metrics["candidate"]["accuracy"] < result.metrics["active"]["accuracy"] == 1.0
    registry = state_of(colour_home).registry
    assert registry.active_version() == "v1"
    assert registry.get(result.version).metrics["promoted"] is False  # kept, with its metrics
    forced = run(colour_home, force=True)
    assert forced.state == "succeeded" and registry.active_version() == forced.version


def test_tolerance_lets_a_slightly_worse_candidate_through(colour_home: Path) -> None:
    add_labelled(colour_home, "red", colour_photos("red", 3, held=True) + colour_photos("blue", 6, held=False))
    add_labelled(colour_home, "blue",
                 colour_photos("blue", 3, held=True) + colour_photos("red", 6, held=False))
    assert run(colour_home, tolerance=1.0).state == "succeeded"


# -- what a failed job records ----------------------------------------------------------------------


def test_retrain_failure_reasons_say_what_was_left() -> None:
    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/state/tmp/model.onnx")
    exporting = failure_reason(full, "exporting")
    assert exporting.startswith("writing the new model version failed: the state directory is out of space")
    assert "no model version was registered" in exporting
    storage_failure = errors.storage_failure(full, "activating the new version v2")
    assert storage_failure is not None
    activating = failure_reason(storage_failure, "activating")
    assert "v2" in activating and "registered but not active" in activating
    assert failure_reason(ValueError("bad"), "fitting") == "ValueError: bad"


# -- a head-only retrain inherits the parent's INT8 backbone ----------------------------------


def add_greys(state: State) -> None:
    for label, grays in {"cat": range(0, 100, 7), "dog": range(150, 256, 7)}.items():
        for gray in grays:
            state.labels.add(grey_png(gray), label, max_pixels=10_000)


def assert_int8_has_the_new_head(version: ModelVersion) -> None:
    """The version's INT8 graph is listed, verifies and carries the very head of its fp32 graph
    (the head stays float in both)."""
    assert INT8_ONNX_FILENAME in version.manifest_files()
    version.verify()
    weight, bias = read_head(version.onnx_path)
    int8_weight, int8_bias = read_head(version.int8_onnx_path)
    assert np.array_equal(weight, int8_weight) and np.array_equal(bias, int8_bias)


def test_a_retrain_of_a_version_with_an_int8_variant_gets_one_with_its_new_head(
    grey_version: tuple[DirectoryRegistry, Path]
) -> None:
    registry, folder = grey_version
    state = open_state(home=registry.home)
    add_greys(state)
    # a version without a variant begets one without (served as fp32, with the runtime's warning)
    plain = retrain(state, registry.home, RetrainParams(force=True), lambda *_: None, threads=1)
    assert plain.state == "succeeded" and "int8" not in plain.metrics and plain.metrics["variants"] == ["fp32"]
    assert INT8_ONNX_FILENAME not in registry.get(plain.version).manifest_files()

    quantize_version(registry, "v1", folder, progress=False)
    registry.activate("v1")
    result = retrain(state, registry.home, RetrainParams(force=True), lambda *_: None, threads=1)
    assert result.state == "succeeded"
    child = registry.get(result.version)
    assert child.info["parent"] == "v1" and registry.active_version() == child.version
    assert_int8_has_the_new_head(child)
    weight, _ = read_head(child.onnx_path)
    parent_weight, _ = read_head(registry.get("v1").int8_onnx_path)
    assert not np.array_equal(weight, parent_weight)
    figures = result.metrics["int8"]
    assert figures["added"] and figures["from"] == "v1" and figures["check_images"] > 0
    assert figures["int8_accuracy"] >= figures["fp32_accuracy"] - 0.005
    assert json.loads((child.path / INT8_REPORT_FILENAME).read_text()) == figures


def test_on_a_cpu_host_a_version_without_a_parent_variant_gets_one_calibrated_on_its_images(
    grey_version: tuple[DirectoryRegistry, Path]
) -> None:
    registry, _ = grey_version
    state = open_state(home=registry.home)
    add_greys(state)
    assert not registry.get("v1").has_int8()
    result = retrain(state, registry.home, RetrainParams(force=True), lambda *_: None, threads=1, int8=True)
    child = registry.get(result.version)
    figures = result.metrics["int8"]
    assert figures["added"] and figures["from"] is None
    assert 0 < figures["calibration_images"] <= MAX_CALIBRATION_IMAGES
    assert figures["labelled"] and figures["check_images"] == result.metrics["candidate"]["held_out"] > 0
    assert figures["int8_accuracy"] >= figures["fp32_accuracy"] - 0.005
    assert result.metrics["variants"] == ["fp32", "int8"]
    assert_int8_has_the_new_head(child)


def test_a_calibrated_variant_that_loses_accuracy_is_dropped_and_the_version_kept_in_fp32(
    grey_version: tuple[DirectoryRegistry, Path], caplog: pytest.LogCaptureFixture
) -> None:
    """Calibrated on dark images alone, INT8 clips every light image to dark: it loses half the
    answers, so the gate drops it."""
    registry, _ = grey_version
    v1 = registry.get("v1")
    weight, bias = read_head(v1.onnx_path)
    head = LinearHead(weight, bias)
    dark, light = (np.stack([preprocess_image(decode_image(grey_png(level)), v1.spec.preprocess) for level in levels])
                   for levels in (range(0, 60, 5), range(170, 256, 7)))
    check = (np.concatenate([dark, light]), np.array([0] * len(dark) + [1] * len(light)))
    with tempfile.TemporaryDirectory() as tmp, caplog.at_level("WARNING"):
        figures = add_int8_variant(registry, v1, v1, head, check, dark, Path(tmp), threads=1)
    assert not figures["added"] and figures["fp32_accuracy"] == 1.0 and figures["int8_accuracy"] < 0.9
    assert any("gets no INT8 variant (it is registered and served in fp32)" in r.getMessage() for r in caplog.records)
    assert INT8_ONNX_FILENAME not in registry.get("v1").manifest_files()
    registry.get("v1").verify()


# -- a file size limit (RLIMIT_FSIZE): the retrain job cannot write its model ----------------------

FSIZE_LIMIT = 4 << 20  # above BentoML's 1 MiB metric files and the database, below an 18 MB model

LAUNCH_WITH_FSIZE = (
    "import os, resource, sys; lim = int(sys.argv[1]); "
    "resource.setrlimit(resource.RLIMIT_FSIZE, (lim, lim)); os.execv(sys.argv[2], sys.argv[2:])"
)


@contextlib.contextmanager
def serving_with_file_size_limit(home: Path, log_path: Path, limit: int) -> Iterator[Server]:
    """``bentoml serve`` (and so every retrain job it starts) with RLIMIT_FSIZE = ``limit``:
    a write past it fails with EFBIG (Python ignores SIGXFSZ)."""
    port = free_port()
    bentoml_home = Path(tempfile.mkdtemp(prefix="bentoml-home-"))
    bentoml = Path(sys.executable).with_name("bentoml")
    server = start_command(
        [sys.executable, "-c", LAUNCH_WITH_FSIZE, str(limit), str(bentoml), "serve",
         "service.service:TransferServe", "--host", "127.0.0.1", "--port", str(port)],
        port, log_path, {**STORAGE_ENV, "TRANSFER_SERVE_HOME": str(home), "BENTOML_HOME": str(bentoml_home)},
    )
    server.bentoml_home = bentoml_home
    try:
        wait_until(server, timeout=180)
        yield server
    finally:
        server.stop()


@pytest.mark.slow
def test_retrain_that_cannot_write_its_model_fails_and_registers_nothing(
    bootstrapped_home: Path, tmp_path: Path, hymenoptera: Path
) -> None:
    home = tmp_path / "home"
    shutil.copytree(bootstrapped_home, home)
    with serving_with_file_size_limit(home, tmp_path / "serve.log", FSIZE_LIMIT) as server, \
            httpx.Client(base_url=server.url, timeout=60, headers=AUTH) as http:
        assert upload_blobs(http, "ants", *small_photos(hymenoptera, "ants", 40, 3)).status_code == 200
        assert upload_blobs(http, "bees", *small_photos(hymenoptera, "bees", 40, 3)).status_code == 200
        job = failed_retrain(http)
        assert job["error"].startswith("writing the new model version failed: the state directory "
                                       "cannot take a file this large"), job["error"]
        assert "no model version was registered" in job["error"] and "ulimit" in job["error"]
        assert job["version"] is None
        models = http.get("/admin/models").json()
        assert models["active"] == "v1" and [v["version"] for v in models["versions"]] == ["v1"]
        assert_nothing_registered(home)
        assert predicts(http) == "v1"

        # an upload part over 1 MiB is spooled to the temporary directory, under the same limit
        big = noise_png(1300, 1300, compress_level=0)
        assert len(big) > FSIZE_LIMIT
        spooled = http.post("/admin/labels", data={"label": "ants"}, files=[("images", ("big.png", big))])
        assert_507(spooled, "temporary directory", "nothing was stored", "To fix")
        client_side = http.post("/predict", files=[("images", ("big.png", big))])
        assert client_side.status_code == 503 and "retry" in client_side.json()["error"]
        assert "tmp" not in client_side.json()["error"]  # clients are not told about the server's disks
        assert predicts(http) == "v1"
    assert len(assert_store_consistent(home)) == 6


@pytest.mark.slow
@pytest.mark.parametrize("backbone,input_size", [("efficientnet_lite1", 240), ("efficientnet_lite2", 260)])
def test_a_retrain_through_the_admin_api_on_a_larger_backbones_bootstrap(
    backbone: str, input_size: int, bootstrapped_home_of, tmp_path: Path, hymenoptera: Path
) -> None:
    home = tmp_path / "home"
    shutil.copytree(bootstrapped_home_of(backbone), home)
    ants, bees = jpeg_files(hymenoptera, "ants"), jpeg_files(hymenoptera, "bees")
    with serving(home, tmp_path / "serve.log", STORAGE_ENV) as server, \
            httpx.Client(base_url=server.url, timeout=60, headers=AUTH) as http:
        assert predicts(http) == "v1"
        assert upload(http, "ants", ants[:16]).status_code == 200
        assert upload(http, "bees", bees[:16]).status_code == 200
        job = wait_for_job(http, http.post("/admin/retrain").json()["id"], timeout=240)
        assert job["state"] == "succeeded" and job["version"] == "v2", job
        assert job["metrics"]["embeddings_computed"] == 32 and "fp32" in job["metrics"]["variants"]
        wait_for_version(http, "v2", timeout=30)
        # photos the job never saw, sent whole: the service crops them to the version's input side
        right = 0
        for label, photos in (("ants", ants[40:50]), ("bees", bees[40:50])):
            response = http.post("/predict", files=[("images", (p.name, p.read_bytes())) for p in photos])
            assert response.status_code == 200, response.text
            assert {a["model_version"] for a in response.json()} == {"v2"}
            right += sum(a["label"] == label for a in response.json())
        assert right >= 16  # 80 %; a wrong input side or preprocessing gives chance
    v2 = state_of(home).registry.get("v2")
    v2.verify()
    assert v2.spec.backbone == OFFLINE_BACKBONES[backbone].arch and v2.spec.preprocess.input_size == input_size
    assert v2.info["parent"] == "v1" and v2.spec.labels == ("ants", "bees")
