"""``service/runtime.py`` (an inference worker's model runtime), unit level with tiny real ONNX
models and real onnxruntime sessions on the CPU: the choice of input path by provider (the GPU
path run on the CPU provider), batches run in cache-sized slices, the variant served (fp32, INT8,
fp16), and falling back from a corrupted active version (the real server's view of it is in
``tests/scenarios/test_faults.py``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from models.spec import ONNX_INPUT
from service.providers import CPU, CUDA, TENSORRT
from service.runtime import feeds_pixels, served_variant
from store.local.registry import DirectoryRegistry
from tests.support.models import (
    TINY_SIZE,
    damage,
    pointer,
    register_tiny,
    registry_with,
    tiny_crops,
    tiny_runtime,
)
from training.quantize import quantize_version

# -- the input path -----------------------------------------------------------------------------


@pytest.mark.parametrize(("providers", "expected"), [
    ([(CUDA, {"device_id": 0}), (CPU, {})], True),
    ([(TENSORRT, {}), (CUDA, {}), (CPU, {})], True),
    ([(CPU, {})], False),
])
def test_gpu_providers_get_uint8_crops_and_io_binding(providers: list, expected: bool) -> None:
    assert feeds_pixels(providers) is expected


def test_the_runtime_on_the_gpu_path_answers_as_on_the_cpu_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The whole GPU input path (graph, warm-up, IO binding, softmax) run on the CPU provider by
    choosing it as a GPU provider would be chosen."""
    registry = registry_with(tmp_path, 1)
    batch = tiny_crops(3, seed=4)
    plain = tiny_runtime(registry, max_batch_size=4)
    assert plain.refresh()
    assert plain.loaded is not None and not plain.loaded.pixels_input
    _, want = plain.infer(batch)

    monkeypatch.setattr("service.runtime.feeds_pixels", lambda providers: True)
    device = tiny_runtime(registry, max_batch_size=4)
    with caplog.at_level("INFO", logger="service.runtime"):
        assert device.refresh()
    assert device.loaded is not None and device.loaded.pixels_input
    assert "uint8 crops normalised on the device, IO binding" in caplog.text
    model, got = device.infer(batch)
    assert model.version == "v1"
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(got.sum(axis=1), 1.0, rtol=1e-6)


def test_the_cpu_path_runs_a_batch_in_cache_sized_slices(tmp_path: Path) -> None:
    """On the CPU provider a batch of 5 runs as calls of CPU_RUN_SLICE (2, 2, 1) images, and the
    answer is the one a call per crop gives, in order."""
    import dataclasses

    from models.onnx_io import CPU_RUN_SLICE

    plain = tiny_runtime(registry_with(tmp_path, 1), max_batch_size=4)
    assert plain.refresh() and plain.loaded is not None
    sizes: list[int] = []

    class Counting:
        def __init__(self, inner: ort.InferenceSession) -> None:
            self.inner = inner

        def run(self, outputs: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
            sizes.append(len(feeds[ONNX_INPUT]))
            return self.inner.run(outputs, feeds)

    plain._loaded = dataclasses.replace(plain.loaded, session=Counting(plain.loaded.session))
    batch = tiny_crops(5, seed=7)
    _, got = plain.infer(batch)
    assert CPU_RUN_SLICE == 2 and sizes == [2, 2, 1]
    one_by_one = np.concatenate([plain.infer(batch[i:i + 1])[1] for i in range(len(batch))])
    np.testing.assert_allclose(got, one_by_one, rtol=1e-6, atol=1e-7)


# -- the variant served -------------------------------------------------------------------------


def dark_and_light() -> np.ndarray:
    """A dark crop (the grey version's "cat") and a light one ("dog")."""
    return np.stack([np.full((TINY_SIZE, TINY_SIZE, 3), level, np.uint8) for level in (30, 220)])


def runtime_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and r.name == "service.runtime"]


def test_the_runtime_serves_the_chosen_variant_and_names_it(
    grey_version: tuple[DirectoryRegistry, Path], caplog: pytest.LogCaptureFixture
) -> None:
    registry, folder = grey_version
    quantize_version(registry, "v1", folder, progress=False)
    crops = dark_and_light()
    served = {}
    for variant in ("fp32", "int8"):
        worker = tiny_runtime(registry, model_variant=variant)
        with caplog.at_level("INFO"):
            caplog.clear()
            assert worker.refresh()
        assert worker.loaded is not None and worker.loaded.variant == variant
        assert any(r.getMessage().startswith("serving model version v1 (2 labels) on CPUExecutionProvider; "
                                             f"variant {variant};") for r in caplog.records)
        assert runtime_warnings(caplog) == []
        model, served[variant] = worker.infer(crops)
        assert model.version == "v1"  # responses name the version, whichever graph made them
    assert served["fp32"].argmax(1).tolist() == served["int8"].argmax(1).tolist() == [0, 1]
    assert not np.array_equal(served["fp32"], served["int8"])  # two different graphs answered


@pytest.mark.parametrize(("setting", "has_int8", "on_cpu", "served"), [
    ("auto", True, True, "int8"), ("auto", False, True, "fp32"), ("auto", True, False, "fp32"),
    ("int8", True, False, "int8"), ("int8", False, True, "fp32"), ("fp32", True, True, "fp32"),
    ("fp16", True, True, "fp16"),
])
def test_which_graph_each_setting_serves(setting: str, has_int8: bool, on_cpu: bool, served: str) -> None:
    assert served_variant(setting, has_int8, on_cpu) == served


def test_auto_serves_int8_on_the_cpu_where_a_version_has_one_and_fp32_where_not(
    grey_version: tuple[DirectoryRegistry, Path], caplog: pytest.LogCaptureFixture
) -> None:
    registry, folder = grey_version
    worker = tiny_runtime(registry, model_variant="auto")
    assert worker.refresh()
    assert worker.loaded is not None and worker.loaded.variant == "fp32"
    quantize_version(registry, "v1", folder, progress=False)
    worker = tiny_runtime(registry, model_variant="auto")
    with caplog.at_level("INFO"):
        assert worker.refresh()
    assert worker.loaded is not None and worker.loaded.variant == "int8"
    assert runtime_warnings(caplog) == []  # the default choosing is not a problem to warn of
    assert any("variant int8" in r.getMessage() for r in caplog.records)  # the start-up log names it


def test_int8_asked_for_a_version_without_one_serves_fp32_with_one_warning(
    grey_version: tuple[DirectoryRegistry, Path], caplog: pytest.LogCaptureFixture
) -> None:
    registry, _ = grey_version
    worker = tiny_runtime(registry, model_variant="int8")
    with caplog.at_level("INFO"):
        assert worker.refresh()
    assert worker.loaded is not None and worker.loaded.variant == "fp32"
    [warning] = runtime_warnings(caplog)
    assert "has no INT8 variant" in warning and "python -m training quantize --version v1" in warning


def test_fp16_is_converted_at_load_named_and_close_to_fp32(
    grey_version: tuple[DirectoryRegistry, Path], caplog: pytest.LogCaptureFixture
) -> None:
    registry, _ = grey_version
    crops = dark_and_light()
    fp32 = tiny_runtime(registry, model_variant="fp32")
    assert fp32.refresh()
    worker = tiny_runtime(registry, model_variant="fp16")
    with caplog.at_level("INFO"):
        assert worker.refresh()
    assert worker.loaded is not None and worker.loaded.variant == "fp16"
    [warning] = runtime_warnings(caplog)  # fp16 on a CPU works, but is no faster: say so
    assert "fp16 on the CPU provider" in warning
    model, probabilities = worker.infer(crops)
    _, reference = fp32.infer(crops)
    assert model.version == "v1" and probabilities.dtype == reference.dtype
    np.testing.assert_allclose(probabilities, reference, atol=1e-2)
    assert probabilities.argmax(1).tolist() == reference.argmax(1).tolist()
    assert not np.array_equal(probabilities, reference)  # really another graph


# -- falling back from a corrupted active version -----------------------------------------------


# -- what the replica reports -------------------------------------------------------------------

def test_a_started_worker_is_listed_with_what_it_serves_before_the_watcher_reports(tmp_path: Path) -> None:
    registry = registry_with(tmp_path, 2)
    registry.report_serving("host:3000", "v2", "fp32")  # a stopped replica's record under the same id
    runtime = tiny_runtime(registry, replica_id="host:3000")
    runtime.poll_seconds = 3600
    runtime.start()  # the watcher's first round is an hour away: start() itself reports
    [replica] = registry.replicas()
    assert (replica.id, replica.version, replica.variant) == ("host:3000", "v1", "fp32")


def errors_logged(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelname == "ERROR" and r.name == "service.runtime"]


def test_a_worker_starting_on_a_corrupted_active_version_serves_the_last_good_one(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    registry = registry_with(tmp_path, 2)
    registry.activate("v2")
    damage(registry.get("v2").path)
    runtime = tiny_runtime(registry)
    with caplog.at_level("INFO"):
        assert runtime.refresh()
    assert runtime.loaded is not None and runtime.loaded.version == "v1"
    assert registry.active_version() == "v1"
    [line] = errors_logged(caplog)  # one loud line: the bad version, what is wrong, what is served
    assert "MODEL FALLBACK" in line and "model version v2" in line
    assert "model.onnx is corrupted" in line and "now serving v1" in line
    model, probabilities = runtime.infer(np.zeros((1, 4, 4, 3), np.uint8))
    assert model.version == "v1" and probabilities.shape == (1, 2)
    second = tiny_runtime(registry)  # another worker starting later simply loads v1
    with caplog.at_level("INFO"):
        assert second.refresh()
    assert second.loaded is not None and second.loaded.version == "v1"
    assert len(errors_logged(caplog)) == 1


def test_a_pointer_moved_to_a_corrupted_version_is_moved_back(tmp_path: Path) -> None:
    registry = registry_with(tmp_path, 2)
    runtime = tiny_runtime(registry)
    assert runtime.refresh() and runtime.loaded.version == "v1"  # type: ignore[union-attr]
    registry.activate("v2")
    damage(registry.get("v2").path, "spec.json")  # damaged after it was verified
    assert not runtime.refresh()  # nothing new went live
    assert runtime.loaded.version == "v1"  # type: ignore[union-attr]
    assert registry.active_version() == "v1"
    assert pointer(registry)["fallback_from"]["version"] == "v2"


def test_when_nothing_verifies_a_worker_is_not_ready_until_a_good_version_is_activated(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    registry = registry_with(tmp_path, 2)
    damage(registry.get("v1").path)
    damage(registry.get("v2").path)
    runtime = tiny_runtime(registry)
    with caplog.at_level("INFO"):
        assert not runtime.refresh()
        assert not runtime.refresh()  # not retried (nor logged) until the pointer changes
    assert runtime.loaded is None
    [line] = errors_logged(caplog)
    assert "model version v1" in line and "no other stored version verifies" in line and "not ready" in line
    from service.runtime import ModelNotLoaded

    with pytest.raises(ModelNotLoaded):
        runtime.infer(np.zeros((1, 4, 4, 3), np.uint8))
    register_tiny(registry, tmp_path, activate=True)  # v3, good
    # (mypy keeps runtime.loaded narrowed to None by the assertion above, across the refresh)
    assert runtime.refresh() and runtime.loaded.version == "v3"  # type: ignore[attr-defined]


def test_a_worker_facing_an_unreadable_pointer_serves_the_newest_good_version(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    registry = registry_with(tmp_path, 2)
    damage(registry.get("v2").path)
    (registry.home / "active_version.json").write_text("{torn")
    runtime = tiny_runtime(registry)
    with caplog.at_level("INFO"):
        assert runtime.refresh()
    assert runtime.loaded is not None and runtime.loaded.version == "v1"
    [line] = errors_logged(caplog)
    assert "MODEL FALLBACK" in line and "active model pointer" in line and "now serving v1" in line
