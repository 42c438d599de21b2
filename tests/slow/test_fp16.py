"""The fp16 variant (for GPUs) against fp32, measured on the CPU: the same contract (float32 in,
``logits`` and ``embedding`` float32 out) and the same top-1 on the hymenoptera photos."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from models.onnx_io import cpu_session, run_in_batches, serving_graph
from models.preprocess import decode_image, preprocess_image
from models.spec import ONNX_EMBEDDING, ONNX_INPUT, ONNX_LOGITS
from store.state import open_state

pytestmark = pytest.mark.slow


def test_fp16_agrees_with_fp32_on_the_hymenoptera_photos(bootstrapped_home: Path, hymenoptera: Path) -> None:
    version = open_state(home=bootstrapped_home).registry.get("v1")
    photos = sorted(hymenoptera.rglob("*.jpg"))
    inputs = np.stack([preprocess_image(decode_image(p.read_bytes()), version.spec.preprocess)
                       for p in photos])
    options = ort.SessionOptions()
    options.log_severity_level = 3
    half = ort.InferenceSession(serving_graph(version.onnx_path, fp16=True), options, providers=["CPUExecutionProvider"])
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


def test_the_gpu_input_graph_agrees_with_the_host_path_on_the_hymenoptera_photos(
    bootstrapped_home: Path, hymenoptera: Path
) -> None:
    """uint8 crops in, normalised inside the graph (what GPU sessions are given): the real
    network's logits as from the host's float32 input, so layout and channel order are right."""
    from models.onnx_io import PIXELS_INPUT, run_bound, serving_graph
    from models.preprocess import decode_and_crop, normalise_crops

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
