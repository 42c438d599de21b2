"""The INT8 variant end to end on a tiny real ONNX model: real onnxruntime quantisation and
sessions, a real registry, real image files; and the runtime's choice of variant."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from models.errors import DatasetError, ModelError
from models.onnx_io import check_onnx_contract, cpu_session, run_in_batches
from store.local.registry import DirectoryRegistry
from store.registry import INT8_ONNX_FILENAME
from models.spec import ONNX_EMBEDDING, ONNX_INPUT, ONNX_LOGITS
from tests.conftest import TINY_SIZE, tiny_spec, write_tiny_onnx
from training.cli import main as cli_main
from training.quantize import INT8_REPORT_FILENAME, QuantizationRefused, quantize_version


def write_conv_onnx(path: Path) -> Path:
    """Like the tiny model of tests/conftest.py, with a 1x1 Conv + Relu in front, so quantising
    has weights per channel and activations to calibrate; the head separates dark from light."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    conv = numpy_helper.from_array((np.eye(3, dtype=np.float32) * 0.5 + 0.1).reshape(3, 3, 1, 1), "CW")
    conv_b = numpy_helper.from_array(np.full(3, 3.0, np.float32), "CB")  # keeps normalised pixels positive
    head = numpy_helper.from_array(np.array([[-1, -1, -1], [1, 1, 1]], np.float32), "W")
    head_b = numpy_helper.from_array(np.array([8.0, -8.0], np.float32), "B")
    nodes = [
        helper.make_node("Conv", [ONNX_INPUT, "CW", "CB"], ["conv"], name="conv"),
        helper.make_node("Relu", ["conv"], ["relu"], name="relu"),
        helper.make_node("GlobalAveragePool", ["relu"], ["pooled"], name="pool"),
        helper.make_node("Flatten", ["pooled"], [ONNX_EMBEDDING], axis=1, name="flatten"),
        helper.make_node("Gemm", [ONNX_EMBEDDING, "W", "B"], [ONNX_LOGITS], transB=1, name="head"),
    ]
    graph = helper.make_graph(
        nodes, "tiny-conv",
        [helper.make_tensor_value_info(ONNX_INPUT, TensorProto.FLOAT, ["batch", 3, TINY_SIZE, TINY_SIZE])],
        [helper.make_tensor_value_info(ONNX_LOGITS, TensorProto.FLOAT, ["batch", 2]),
         helper.make_tensor_value_info(ONNX_EMBEDDING, TensorProto.FLOAT, ["batch", 3])],
        initializer=[conv, conv_b, head, head_b],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def png(gray: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (gray, gray, gray)).save(buffer, format="PNG")
    return buffer.getvalue()


def image_folder(root: Path, grays: dict[str, list[int]]) -> tuple[Path, list[str], list[int]]:
    """One subfolder per label of flat grey PNGs; returns (folder, their sha256, label index)."""
    hashes, targets = [], []
    for index, (label, values) in enumerate(sorted(grays.items())):
        (root / label).mkdir(parents=True, exist_ok=True)
        for value in values:
            data = png(value)
            (root / label / f"{value}.png").write_bytes(data)
            hashes.append(hashlib.sha256(data).hexdigest())
            targets.append(index)
    return root, hashes, targets


#: dark images are "cat" (label 0), light ones "dog"
GRAYS = {"cat": [0, 20, 40, 60, 80], "dog": [170, 190, 210, 230, 250]}


@pytest.fixture
def fitted(tmp_path: Path) -> tuple[DirectoryRegistry, Path]:
    """A registry whose v1 (the conv model) was "trained" on the images of a folder: its stored
    hashes and targets are theirs, its details say it was not fit's split (so the check runs on
    the calibration images)."""
    folder, hashes, targets = image_folder(tmp_path / "images", GRAYS)
    registry = DirectoryRegistry(tmp_path / "home")
    registry.register(
        onnx_file=write_conv_onnx(tmp_path / "conv.onnx"), spec=tiny_spec(), metrics={"accuracy": 1.0},
        embeddings=np.zeros((len(hashes), 3), np.float32), embedding_targets=np.array(targets),
        embedding_hashes=hashes, parent=None, dataset_fingerprint=None, details={"strategy": "retrain"},
    )
    return registry, folder


def test_quantize_adds_a_checked_int8_variant_that_keeps_the_contract(fitted: tuple[DirectoryRegistry, Path]) -> None:
    registry, folder = fitted
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


def test_a_variant_that_misses_the_accuracy_limit_is_not_written(fitted: tuple[DirectoryRegistry, Path]) -> None:
    registry, folder = fitted
    manifest = (registry.get("v1").path / "manifest.json").read_bytes()
    # no variant can be more accurate than a perfect fp32 model: a negative allowance refuses it
    with pytest.raises(QuantizationRefused, match="nothing was written"):
        quantize_version(registry, "v1", folder, progress=False, max_accuracy_loss=-0.01)
    version = registry.get("v1")
    assert (version.path / "manifest.json").read_bytes() == manifest
    assert not version.int8_onnx_path.exists()


def test_calibration_needs_the_versions_own_images(fitted: tuple[DirectoryRegistry, Path], tmp_path: Path) -> None:
    registry, _ = fitted
    strangers, _, _ = image_folder(tmp_path / "others", {"cat": [5, 15], "dog": [200, 220]})
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

    folder, hashes, targets = image_folder(tmp_path / "images", GRAYS)
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


def test_only_a_variant_that_meets_the_spec_is_added_and_a_damaged_one_fails_verify(
    fitted: tuple[DirectoryRegistry, Path], tmp_path: Path
) -> None:
    registry, _ = fitted
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


# -- the runtime's choice ---------------------------------------------------------------------


def runtime(registry: DirectoryRegistry, variant: str):
    from service.runtime import ModelRuntime
    from service.settings import Settings

    return ModelRuntime(Settings(home=registry.home, providers="cpu", inference_workers=1, intra_op_threads=1,
                                 max_batch_size=2, model_variant=variant), registry)


def runtime_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and r.name == "service.runtime"]


def test_the_runtime_serves_the_chosen_variant_and_names_it(
    fitted: tuple[DirectoryRegistry, Path], caplog: pytest.LogCaptureFixture
) -> None:
    registry, folder = fitted
    quantize_version(registry, "v1", folder, progress=False)
    crops = np.stack([np.full((TINY_SIZE, TINY_SIZE, 3), 30, np.uint8), np.full((TINY_SIZE, TINY_SIZE, 3), 220, np.uint8)])
    served = {}
    for variant in ("fp32", "int8"):
        worker = runtime(registry, variant)
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


def test_int8_asked_for_a_version_without_one_serves_fp32_with_one_warning(
    fitted: tuple[DirectoryRegistry, Path], caplog: pytest.LogCaptureFixture
) -> None:
    registry, _ = fitted
    worker = runtime(registry, "int8")
    with caplog.at_level("INFO"):
        assert worker.refresh()
    assert worker.loaded is not None and worker.loaded.variant == "fp32"
    [warning] = runtime_warnings(caplog)
    assert "has no INT8 variant" in warning and "python -m training quantize --version v1" in warning


def test_fp16_is_converted_at_load_named_and_close_to_fp32(
    fitted: tuple[DirectoryRegistry, Path], caplog: pytest.LogCaptureFixture
) -> None:
    registry, _ = fitted
    crops = np.stack([np.full((TINY_SIZE, TINY_SIZE, 3), 30, np.uint8), np.full((TINY_SIZE, TINY_SIZE, 3), 220, np.uint8)])
    fp32 = runtime(registry, "fp32")
    assert fp32.refresh()
    worker = runtime(registry, "fp16")
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


def test_the_variant_setting_takes_fp32_int8_or_fp16_only(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from pydantic import ValidationError

    from service.settings import Settings

    monkeypatch.setenv("TRANSFER_SERVE_MODEL_VARIANT", "int8")
    assert Settings(home=tmp_path).model_variant == "int8"
    monkeypatch.setenv("TRANSFER_SERVE_MODEL_VARIANT", "fp16")
    assert Settings(home=tmp_path).model_variant == "fp16"
    monkeypatch.delenv("TRANSFER_SERVE_MODEL_VARIANT")
    assert Settings(home=tmp_path).model_variant == "fp32"
    monkeypatch.setenv("TRANSFER_SERVE_MODEL_VARIANT", "int4")
    with pytest.raises(ValidationError, match="model_variant"):
        Settings(home=tmp_path)


# -- the command line -------------------------------------------------------------------------


def test_cli_quantize(fitted: tuple[DirectoryRegistry, Path], capsys: pytest.CaptureFixture[str]) -> None:
    registry, folder = fitted
    home = str(registry.home)
    assert cli_main(["--home", home, "models", "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["versions"][0]["int8"] is False
    assert cli_main(["--home", home, "quantize", "--version", "v9", "--data", str(folder)]) == 2
    assert "no model version 'v9'" in capsys.readouterr().err
    assert cli_main(["--home", home, "quantize", "--version", "v1", "--data", str(folder),
                     "--calibration-images", "0"]) == 2
    assert "--calibration-images must be at least 1" in capsys.readouterr().err
    assert cli_main(["--home", home, "quantize", "--version", "v1", "--data", str(folder),
                     "--calibration-images", "4", "--json"]) == 0
    figures = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert figures["version"] == "v1" and figures["calibration_images"] == 4 and figures["check_images"] == 4
    assert cli_main(["--home", home, "quantize", "--version", "v1", "--data", str(folder)]) == 1
    assert "already has an INT8 variant" in capsys.readouterr().err
    assert cli_main(["--home", home, "models", "--json"]) == 0
    [row] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["versions"]
    assert row["version"] == "v1" and row["int8"] is True


# -- a head-only retrain inherits the parent's INT8 backbone ----------------------------------


def test_a_retrain_of_a_version_with_an_int8_variant_gets_one_with_its_new_head(
    fitted: tuple[DirectoryRegistry, Path]
) -> None:
    from models.onnx_io import read_head
    from models.retrain import RetrainParams
    from service.retrain import retrain
    from store.state import open_state

    registry, folder = fitted
    state = open_state(home=registry.home)
    store = state.labels
    for label, grays in {"cat": range(0, 100, 7), "dog": range(150, 256, 7)}.items():
        for gray in grays:
            store.add(png(gray), label, max_pixels=10_000)
    # a version without a variant begets one without (served as fp32, with the runtime's warning)
    plain = retrain(state, registry.home, RetrainParams(force=True), lambda *_: None, threads=1)
    assert plain.state == "succeeded" and "int8" not in plain.metrics
    assert INT8_ONNX_FILENAME not in registry.get(plain.version).manifest_files()

    quantize_version(registry, "v1", folder, progress=False)
    registry.activate("v1")
    result = retrain(state, registry.home, RetrainParams(force=True), lambda *_: None, threads=1)
    assert result.state == "succeeded"
    child = registry.get(result.version)
    assert child.info["parent"] == "v1" and registry.active_version() == child.version
    assert INT8_ONNX_FILENAME in child.manifest_files()
    child.verify()
    weight, bias = read_head(child.onnx_path)
    int8_weight, int8_bias = read_head(child.int8_onnx_path)
    assert np.array_equal(weight, int8_weight) and np.array_equal(bias, int8_bias)  # the new head
    parent_weight, _ = read_head(registry.get("v1").int8_onnx_path)
    assert not np.array_equal(weight, parent_weight)
    figures = result.metrics["int8"]
    assert figures["added"] and figures["from"] == "v1" and figures["check_images"] > 0
    assert figures["int8_accuracy"] >= figures["fp32_accuracy"] - 0.005
    assert json.loads((child.path / INT8_REPORT_FILENAME).read_text()) == figures
