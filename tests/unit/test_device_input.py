"""The GPU input path, checked on the CPU with real onnxruntime sessions on a tiny real model:
uint8 crops normalised inside the graph (:func:`models.onnx_io.pixels_input_graph`), IO binding
(:func:`models.onnx_io.run_bound`), and the runtime's choice of path by provider."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from models.onnx_io import PIXELS_INPUT, cpu_session, pixels_input_graph, run_bound, serving_graph
from models.preprocess import normalise_crops
from models.spec import ONNX_EMBEDDING, ONNX_INPUT, ONNX_LOGITS, PreprocessConfig
from service.providers import CPU, CUDA, TENSORRT
from service.runtime import ModelRuntime, feeds_pixels
from service.settings import Settings
from store.local.registry import DirectoryRegistry
from tests.conftest import TINY_SIZE
from tests.unit.test_quantize import write_conv_onnx
from tests.unit.test_registry import registry_with

# not ImageNet's: a graph that ignored mean or std, or swapped channels, would not pass
CONFIG = PreprocessConfig(input_size=TINY_SIZE, crop_pct=1.0, mean=(0.2, 0.5, 0.7), std=(0.3, 0.1, 0.25))


def session(graph: bytes | str) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(graph, options, providers=[CPU])


def crops(count: int, seed: int = 0) -> np.ndarray:
    # every channel different, so a wrong channel order or layout shows
    return np.random.default_rng(seed).integers(0, 256, (count, TINY_SIZE, TINY_SIZE, 3), dtype=np.uint8)


@pytest.fixture
def conv_onnx(tmp_path: Path) -> Path:
    return write_conv_onnx(tmp_path / "conv.onnx")


def test_the_pixels_graph_takes_uint8_crops_and_computes_what_the_host_did(conv_onnx: Path) -> None:
    pixels = session(serving_graph(conv_onnx, pixels=CONFIG))
    (only,) = pixels.get_inputs()
    assert (only.name, only.type, only.shape[1:]) == (PIXELS_INPUT, "tensor(uint8)", [TINY_SIZE, TINY_SIZE, 3])
    assert [o.name for o in pixels.get_outputs()] == [ONNX_LOGITS, ONNX_EMBEDDING]
    batch = crops(5)
    plain = cpu_session(conv_onnx, intra_op_threads=1)
    want_logits, want_embedding = plain.run([ONNX_LOGITS, ONNX_EMBEDDING], {ONNX_INPUT: normalise_crops(batch, CONFIG)})
    got_logits, got_embedding = pixels.run([ONNX_LOGITS, ONNX_EMBEDDING], {PIXELS_INPUT: batch})
    # the same network input (see below); sessions with other thread counts may sum differently
    np.testing.assert_allclose(got_embedding, want_embedding, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(got_logits, want_logits, rtol=1e-6, atol=1e-5)


def test_the_pixels_graph_normalises_with_the_hosts_table(conv_onnx: Path) -> None:
    """Not the same arithmetic written twice: the graph looks every level up in the table the host
    normalises with (``normalisation_table``), so both give the network the same float32 input."""
    import onnx
    from onnx import TensorProto, helper

    model = pixels_input_graph(onnx.load(conv_onnx), CONFIG)
    normalised = helper.make_tensor_value_info("pixels_normalised", TensorProto.FLOAT, None)
    model.graph.output.append(normalised)
    size = TINY_SIZE  # every level 0..255 in every channel
    levels = np.resize(np.arange(256, dtype=np.uint8), (256 // size**2 + 1, size, size))
    batch = np.stack([levels, 255 - levels, np.roll(levels, 1)], axis=-1)
    got = session(model.SerializeToString()).run(["pixels_normalised"], {PIXELS_INPUT: batch})[0]
    np.testing.assert_array_equal(got, normalise_crops(batch, CONFIG))


def test_pixels_and_fp16_combine(conv_onnx: Path) -> None:
    batch = crops(8, seed=1)
    want = cpu_session(conv_onnx, intra_op_threads=1).run([ONNX_LOGITS], {ONNX_INPUT: normalise_crops(batch, CONFIG)})[0]
    half = session(serving_graph(conv_onnx, fp16=True, pixels=CONFIG))
    got = half.run([ONNX_LOGITS], {PIXELS_INPUT: batch})[0]
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-2, atol=5e-2)  # half precision inside


def test_io_binding_gives_what_run_gives(conv_onnx: Path) -> None:
    pixels = session(serving_graph(conv_onnx, pixels=CONFIG))
    for count in (1, 3, 8):  # a new output buffer per batch size
        batch = crops(count, seed=count)
        bound = run_bound(pixels, {PIXELS_INPUT: batch}, ONNX_LOGITS, (count, 2))
        assert bound.shape == (count, 2) and bound.dtype == np.float32
        np.testing.assert_array_equal(bound, pixels.run([ONNX_LOGITS], {PIXELS_INPUT: batch})[0])
    # a non-contiguous view is bound from a contiguous copy, not misread
    view = crops(4, seed=9)[::2]
    np.testing.assert_array_equal(run_bound(pixels, {PIXELS_INPUT: view}, ONNX_LOGITS, (2, 2)),
                                  pixels.run([ONNX_LOGITS], {PIXELS_INPUT: np.ascontiguousarray(view)})[0])


@pytest.mark.parametrize(("providers", "expected"), [
    ([(CUDA, {"device_id": 0}), (CPU, {})], True),
    ([(TENSORRT, {}), (CUDA, {}), (CPU, {})], True),
    ([(CPU, {})], False),
])
def test_gpu_providers_get_uint8_crops_and_io_binding(providers: list, expected: bool) -> None:
    assert feeds_pixels(providers) is expected


def runtime(registry: DirectoryRegistry) -> ModelRuntime:
    return ModelRuntime(Settings(home=registry.home, providers="cpu", inference_workers=1, intra_op_threads=1,
                                 max_batch_size=4), registry)


def test_the_runtime_on_the_gpu_path_answers_as_on_the_cpu_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The whole GPU input path (graph, warm-up, IO binding, softmax) run on the CPU provider by
    choosing it as a GPU provider would be chosen."""
    registry = registry_with(tmp_path, 1)
    batch = crops(3, seed=4)
    plain = runtime(registry)
    assert plain.refresh()
    assert plain.loaded is not None and not plain.loaded.pixels_input
    _, want = plain.infer(batch)

    monkeypatch.setattr("service.runtime.feeds_pixels", lambda providers: True)
    device = runtime(registry)
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

    plain = runtime(registry_with(tmp_path, 1))
    assert plain.refresh() and plain.loaded is not None
    sizes: list[int] = []

    class Counting:
        def __init__(self, inner: ort.InferenceSession) -> None:
            self.inner = inner

        def run(self, outputs: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
            sizes.append(len(feeds[ONNX_INPUT]))
            return self.inner.run(outputs, feeds)

    plain._loaded = dataclasses.replace(plain.loaded, session=Counting(plain.loaded.session))
    batch = crops(5, seed=7)
    _, got = plain.infer(batch)
    assert CPU_RUN_SLICE == 2 and sizes == [2, 2, 1]
    one_by_one = np.concatenate([plain.infer(batch[i:i + 1])[1] for i in range(len(batch))])
    np.testing.assert_allclose(got, one_by_one, rtol=1e-6, atol=1e-7)
