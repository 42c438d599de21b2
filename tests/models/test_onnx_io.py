"""``models/onnx_io.py``, unit level on tiny real ONNX models: the contract check, replacing and
verifying an exported graph's head, the GPU input path checked on the CPU with real onnxruntime
sessions (uint8 crops normalised inside the graph, :func:`models.onnx_io.pixels_input_graph`;
IO binding, :func:`models.onnx_io.run_bound`); and, marked slow, the real network's fp16 and
uint8-input graphs against fp32 on the hymenoptera photos."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from models.errors import ModelError
from models.onnx_io import (
    PIXELS_INPUT,
    check_onnx_contract,
    cpu_session,
    pixels_input_graph,
    read_head,
    replace_head,
    run_bound,
    run_in_batches,
    serving_graph,
    verify_head,
)
from models.preprocess import decode_and_crop, decode_image, normalise_crops, preprocess_image
from models.spec import ONNX_EMBEDDING, ONNX_INPUT, ONNX_LOGITS, PreprocessConfig
from service.providers import CPU
from store.state import open_state
from tests.support.models import TINY_SIZE, tiny_crops, tiny_spec, write_conv_onnx, write_tiny_onnx

# not ImageNet's: a graph that ignored mean or std, or swapped channels, would not pass
CONFIG = PreprocessConfig(input_size=TINY_SIZE, crop_pct=1.0, mean=(0.2, 0.5, 0.7), std=(0.3, 0.1, 0.25))


def session(graph: bytes | str) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(graph, options, providers=[CPU])


@pytest.fixture
def conv_onnx(tmp_path: Path) -> Path:
    return write_conv_onnx(tmp_path / "conv.onnx")


# -- the contract and the head ------------------------------------------------------------------


def test_check_onnx_contract_rejects_non_onnx_bytes(tmp_path: Path) -> None:
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a protobuf at all")
    with pytest.raises(ModelError, match="not a valid ONNX model"):
        check_onnx_contract(junk, tiny_spec())


def test_replace_head_with_more_classes(tmp_path: Path) -> None:
    source = write_tiny_onnx(tmp_path / "src.onnx")
    weight, bias = read_head(source)
    assert weight.shape == (2, 3) and bias.shape == (2,)
    new_w = np.arange(12, dtype=np.float32).reshape(4, 3) / 10
    new_b = np.array([0.1, -0.2, 0.3, 0.0], np.float32)
    replace_head(source, tmp_path / "new.onnx", new_w, new_b)
    check_onnx_contract(tmp_path / "new.onnx", tiny_spec(labels=("a", "b", "c", "d")))
    x = np.random.default_rng(0).normal(size=(5, 3, 4, 4)).astype(np.float32)
    assert verify_head(tmp_path / "new.onnx", new_w, new_b, x) < 1e-5
    _, old_embedding = run_in_batches(cpu_session(source), x)
    _, new_embedding = run_in_batches(cpu_session(tmp_path / "new.onnx"), x)
    np.testing.assert_array_equal(old_embedding, new_embedding)
    np.testing.assert_array_equal(read_head(tmp_path / "new.onnx")[0], new_w)


def test_verify_head_catches_a_mismatch(tmp_path: Path) -> None:
    source = write_tiny_onnx(tmp_path / "src.onnx")
    weight, bias = read_head(source)
    x = np.ones((2, 3, 4, 4), np.float32)
    with pytest.raises(ModelError, match="does not match"):
        verify_head(source, weight, bias + 0.5, x)


def test_verify_head_allows_float32_rounding_of_large_heads(tmp_path: Path) -> None:
    # heads fitted on a few images reach logits in the hundreds; float32 rounding of such sums
    # exceeds any fixed absolute tolerance, while a wrong head misses by far more
    source = write_tiny_onnx(tmp_path / "src.onnx")
    rng = np.random.default_rng(1)
    weight = (rng.normal(size=(2, 3)) * 3e4).astype(np.float32)
    bias = (rng.normal(size=2) * 1e3).astype(np.float32)
    replace_head(source, tmp_path / "big.onnx", weight, bias)
    x = rng.normal(size=(8, 3, 4, 4)).astype(np.float32)
    assert verify_head(tmp_path / "big.onnx", weight, bias, x) > 1e-5  # beyond the old fixed bound
    with pytest.raises(ModelError, match="does not match"):
        verify_head(tmp_path / "big.onnx", weight, bias * 1.01, x)


def test_replace_head_refuses_wrong_shapes(tmp_path: Path) -> None:
    source = write_tiny_onnx(tmp_path / "src.onnx")
    with pytest.raises(ValueError, match="embedding size"):
        replace_head(source, tmp_path / "x.onnx", np.zeros((2, 5), np.float32), np.zeros(2, np.float32))
    with pytest.raises(ValueError, match="head must be"):
        replace_head(source, tmp_path / "x.onnx", np.zeros((2, 3), np.float32), np.zeros(3, np.float32))


# -- the GPU input path, on the CPU ---------------------------------------------------------------


def test_the_pixels_graph_takes_uint8_crops_and_computes_what_the_host_did(conv_onnx: Path) -> None:
    pixels = session(serving_graph(conv_onnx, pixels=CONFIG))
    (only,) = pixels.get_inputs()
    assert (only.name, only.type, only.shape[1:]) == (PIXELS_INPUT, "tensor(uint8)", [TINY_SIZE, TINY_SIZE, 3])
    assert [o.name for o in pixels.get_outputs()] == [ONNX_LOGITS, ONNX_EMBEDDING]
    batch = tiny_crops(5)
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
    batch = tiny_crops(8, seed=1)
    plain = cpu_session(conv_onnx, intra_op_threads=1)
    want = plain.run([ONNX_LOGITS], {ONNX_INPUT: normalise_crops(batch, CONFIG)})[0]
    half = session(serving_graph(conv_onnx, fp16=True, pixels=CONFIG))
    got = half.run([ONNX_LOGITS], {PIXELS_INPUT: batch})[0]
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-2, atol=5e-2)  # half precision inside


def test_io_binding_gives_what_run_gives(conv_onnx: Path) -> None:
    pixels = session(serving_graph(conv_onnx, pixels=CONFIG))
    for count in (1, 3, 8):  # a new output buffer per batch size
        batch = tiny_crops(count, seed=count)
        bound = run_bound(pixels, {PIXELS_INPUT: batch}, ONNX_LOGITS, (count, 2))
        assert bound.shape == (count, 2) and bound.dtype == np.float32
        np.testing.assert_array_equal(bound, pixels.run([ONNX_LOGITS], {PIXELS_INPUT: batch})[0])
    # a non-contiguous view is bound from a contiguous copy, not misread
    view = tiny_crops(4, seed=9)[::2]
    np.testing.assert_array_equal(run_bound(pixels, {PIXELS_INPUT: view}, ONNX_LOGITS, (2, 2)),
                                  pixels.run([ONNX_LOGITS], {PIXELS_INPUT: np.ascontiguousarray(view)})[0])


# -- the real network (slow) ----------------------------------------------------------------------


@pytest.mark.slow
def test_fp16_agrees_with_fp32_on_the_hymenoptera_photos(bootstrapped_home: Path, hymenoptera: Path) -> None:
    version = open_state(home=bootstrapped_home).registry.get("v1")
    photos = sorted(hymenoptera.rglob("*.jpg"))
    inputs = np.stack([preprocess_image(decode_image(p.read_bytes()), version.spec.preprocess)
                       for p in photos])
    options = ort.SessionOptions()
    options.log_severity_level = 3
    half = ort.InferenceSession(serving_graph(version.onnx_path, fp16=True), options,
                                providers=["CPUExecutionProvider"])
    assert [i.name for i in half.get_inputs()] == [ONNX_INPUT] and half.get_inputs()[0].type == "tensor(float)"
    assert [o.name for o in half.get_outputs()] == [ONNX_LOGITS, ONNX_EMBEDDING]
    assert {o.type for o in half.get_outputs()} == {"tensor(float)"}
    fp32_logits, _ = run_in_batches(cpu_session(version.onnx_path), inputs)
    fp16_logits, fp16_embeddings = run_in_batches(half, inputs)
    agreement = float((fp32_logits.argmax(1) == fp16_logits.argmax(1)).mean())
    print(f"\nfp16 vs fp32 on {len(inputs)} photos: top-1 agreement {agreement:.4f}, "
          f"largest logit difference {np.abs(fp32_logits - fp16_logits).max():.4f}")
    assert agreement >= 0.99
    assert np.abs(fp32_logits - fp16_logits).max() < 0.5  # half precision, not another model
    assert fp16_embeddings.dtype == np.float32


@pytest.mark.slow
def test_the_gpu_input_graph_agrees_with_the_host_path_on_the_hymenoptera_photos(
    bootstrapped_home: Path, hymenoptera: Path
) -> None:
    """uint8 crops in, normalised inside the graph (what GPU sessions are given): the real
    network's logits as from the host's float32 input, so layout and channel order are right."""
    version = open_state(home=bootstrapped_home).registry.get("v1")
    config = version.spec.preprocess
    crops = np.stack([decode_and_crop(p.read_bytes(), config) for p in sorted(hymenoptera.rglob("*.jpg"))[:32]])
    options = ort.SessionOptions()
    options.log_severity_level = 3
    pixels = ort.InferenceSession(serving_graph(version.onnx_path, pixels=config), options,
                                  providers=["CPUExecutionProvider"])
    want = cpu_session(version.onnx_path).run([ONNX_LOGITS], {ONNX_INPUT: normalise_crops(crops, config)})[0]
    got = run_bound(pixels, {PIXELS_INPUT: crops}, ONNX_LOGITS, want.shape)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    assert (got.argmax(1) == want.argmax(1)).all()
