"""The INT8 variant of the real network (efficientnet_lite0): a 2-class version made from the
bootstrapped graph with an ants/bees head fitted on real photos, quantised by the same code path
as ``python -m training quantize``, keeps the model contract and the predictions."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from models.head import fit_linear_head
from models.onnx_io import check_onnx_contract, cpu_session, read_head, replace_head, run_in_batches
from models.preprocess import decode_image, preprocess_image
from store.registry import INT8_ONNX_FILENAME
from store.state import open_state
from tests.conftest import make_subset
from training.quantize import quantize_version

pytestmark = pytest.mark.slow

PER_CLASS = 12


def test_real_network_int8_variant(bootstrapped_home: Path, hymenoptera: Path, tmp_path: Path) -> None:
    base = open_state(home=bootstrapped_home).registry.get("v1")
    folder = make_subset(hymenoptera, tmp_path / "photos", PER_CLASS)
    photos = sorted(folder.rglob("*.jpg"))
    labels = ("ants", "bees")
    targets = np.array([labels.index(p.parent.name) for p in photos])
    inputs = np.stack([preprocess_image(decode_image(p.read_bytes()), base.spec.preprocess)
                       for p in photos])
    _, embeddings = run_in_batches(cpu_session(base.onnx_path), inputs)
    head = fit_linear_head(embeddings, targets, 2, seed=0)
    graph = tmp_path / "ants-bees.onnx"
    replace_head(base.onnx_path, graph, head.weight, head.bias)
    registry = open_state(home=tmp_path / "home").registry
    registry.register(
        onnx_file=graph, spec=base.spec.model_copy(update={"labels": labels}), metrics={},
        embeddings=embeddings, embedding_targets=targets,
        embedding_hashes=[hashlib.sha256(p.read_bytes()).hexdigest() for p in photos],
        parent=None, dataset_fingerprint=None, details={"strategy": "retrain-head"},
    )

    result = quantize_version(registry, "v1", folder, progress=False)

    version = registry.get("v1")
    version.verify()
    check_onnx_contract(version.int8_onnx_path, version.spec)
    assert INT8_ONNX_FILENAME in version.manifest_files()
    assert result.calibration_images == result.check_images == 2 * PER_CLASS
    assert result.fp32_accuracy == 1.0  # the head was fitted on these very photos
    assert result.int8_accuracy >= result.fp32_accuracy - 0.005
    int8_weight, int8_bias = read_head(version.int8_onnx_path)  # the head stays float, unchanged
    assert np.array_equal(int8_weight, head.weight) and np.array_equal(int8_bias, head.bias)
    assert version.int8_onnx_path.stat().st_size < version.onnx_path.stat().st_size / 2  # int8 weights
    fp32_logits, fp32_embedding = run_in_batches(cpu_session(version.onnx_path), inputs)
    int8_logits, int8_embedding = run_in_batches(cpu_session(version.int8_onnx_path), inputs)
    assert int8_embedding.shape == fp32_embedding.shape
    assert (int8_logits.argmax(1) == fp32_logits.argmax(1)).all()
    cosine = (int8_embedding * fp32_embedding).sum(1) / (
        np.linalg.norm(int8_embedding, axis=1) * np.linalg.norm(fp32_embedding, axis=1))
    # the features survive quantisation, roughly (measured: cosine 0.87 to 0.96 with 24 calibration photos)
    assert cosine.min() > 0.8
