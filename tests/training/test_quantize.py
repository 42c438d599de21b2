"""``training/quantize.py`` (the INT8 variant of a version), unit level on a tiny real ONNX model:
real onnxruntime quantisation and sessions, a real registry, real image files; and, marked slow,
on the real network (efficientnet_lite0 with an ants/bees head fitted on real photos)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from models.errors import DatasetError, ModelError
from models.head import fit_linear_head
from models.onnx_io import check_onnx_contract, cpu_session, read_head, replace_head, run_in_batches
from models.preprocess import decode_image, preprocess_image
from models.spec import ONNX_EMBEDDING, ONNX_LOGITS
from store.local.registry import DirectoryRegistry
from store.registry import INT8_ONNX_FILENAME
from store.state import open_state
from tests.support.images import make_subset
from tests.support.models import GREYS, TINY_SIZE, grey_folder, tiny_spec, write_conv_onnx, write_tiny_onnx
from training.quantize import INT8_REPORT_FILENAME, QuantizationRefused, quantize_version


def test_quantize_adds_a_checked_int8_variant_that_keeps_the_contract(
    grey_version: tuple[DirectoryRegistry, Path],
) -> None:
    registry, folder = grey_version
    manifest_mode = (registry.get("v1").path / "manifest.json").stat().st_mode
    result = quantize_version(registry, "v1", folder, progress=False)
    version = registry.get("v1")
    # readable like the rest of the version (a service may run as another user)
    assert version.int8_onnx_path.stat().st_mode == version.onnx_path.stat().st_mode
    assert (version.path / "manifest.json").stat().st_mode == manifest_mode
    assert {INT8_ONNX_FILENAME, INT8_REPORT_FILENAME} <= version.manifest_files().keys()
    version.verify()  # the manifest's new checksums hold, and the variant meets the spec
    check_onnx_contract(version.int8_onnx_path, version.spec)
    import onnx

    graph = onnx.load(str(version.int8_onnx_path)).graph
    ops = {node.op_type for node in graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops  # QDQ format
    assert [o.name for o in graph.output] == [ONNX_LOGITS, ONNX_EMBEDDING]
    conv_weight_scales = [init for init in graph.initializer if init.name.startswith("CW") and "scale" in init.name]
    assert conv_weight_scales and conv_weight_scales[0].dims == [3]  # one scale per output channel
    head = next(node for node in graph.node if ONNX_LOGITS in node.output)
    assert head.op_type == "Gemm"  # the head stays float

    assert result.calibration_images == result.check_images == 10
    assert "calibration images" in result.check_source
    assert result.fp32_accuracy == 1.0 and result.int8_accuracy == 1.0 and result.top1_agreement == 1.0
    assert json.loads((version.path / INT8_REPORT_FILENAME).read_text())["int8_accuracy"] == 1.0
    inputs = np.random.default_rng(0).normal(size=(4, 3, TINY_SIZE, TINY_SIZE)).astype(np.float32)
    fp32, _ = run_in_batches(cpu_session(version.onnx_path), inputs)
    int8, _ = run_in_batches(cpu_session(version.int8_onnx_path), inputs)
    assert np.abs(fp32 - int8).max() < 0.2  # close to fp32, yet not the fp32 graph
    assert version.int8_onnx_path.read_bytes() != version.onnx_path.read_bytes()

    with pytest.raises(ModelError, match="already has an INT8 variant"):  # a version changes once
        quantize_version(registry, "v1", folder, progress=False)


def test_a_variant_that_misses_the_accuracy_limit_is_not_written(grey_version: tuple[DirectoryRegistry, Path]) -> None:
    registry, folder = grey_version
    manifest = (registry.get("v1").path / "manifest.json").read_bytes()
    # no variant can be more accurate than a perfect fp32 model: a negative allowance refuses it
    with pytest.raises(QuantizationRefused, match="nothing was written"):
        quantize_version(registry, "v1", folder, progress=False, max_accuracy_loss=-0.01)
    version = registry.get("v1")
    assert (version.path / "manifest.json").read_bytes() == manifest
    assert not version.int8_onnx_path.exists()


def test_calibration_needs_the_versions_own_images(
    grey_version: tuple[DirectoryRegistry, Path], tmp_path: Path,
) -> None:
    registry, _ = grey_version
    strangers, _, _ = grey_folder(tmp_path / "others", {"cat": [5, 15], "dog": [200, 220]})
    with pytest.raises(DatasetError, match="none of the 4 images .* are among the 10 images"):
        quantize_version(registry, "v1", strangers, progress=False)
    bootstrap_like = registry.register(
        onnx_file=write_tiny_onnx(tmp_path / "tiny.onnx"), spec=tiny_spec(), metrics={},
        embeddings=np.zeros((0, 3), np.float32), embedding_targets=np.zeros(0, np.int64), parent=None,
        dataset_fingerprint=None,
    )
    with pytest.raises(DatasetError, match="records no training images"):
        quantize_version(registry, bootstrap_like.version, strangers, progress=False)


def test_fit_versions_calibrate_on_the_training_split_and_check_on_the_held_out_one(tmp_path: Path) -> None:
    from training.data import load_labelled

    folder, hashes, targets = grey_folder(tmp_path / "images", GREYS)
    fingerprint = load_labelled(folder, lambda image: 0, progress=False).fingerprint()
    registry = DirectoryRegistry(tmp_path / "home")
    registry.register(
        onnx_file=write_conv_onnx(tmp_path / "conv.onnx"), spec=tiny_spec(), metrics={},
        embeddings=np.zeros((10, 3), np.float32), embedding_targets=np.array(targets), embedding_hashes=hashes,
        parent=None, dataset_fingerprint=fingerprint,
        details={"strategy": "head", "seed": 3, "val_fraction": 0.4, "held_out_images": 4},
    )
    result = quantize_version(registry, "v1", folder, progress=False)
    assert (result.calibration_images, result.check_images) == (6, 4)
    assert result.check_source.startswith("fit's held-out split (4 images, seed 3)")


# -- the real network (slow) ----------------------------------------------------------------------

PER_CLASS = 12


@pytest.mark.slow
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
