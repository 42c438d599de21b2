"""``python -m training reexport`` (``training/reexport.py``) on the real network: an "old" head-only
version made as before the dynamo exporter (efficientnet_lite0, a head on real ants/bees photos,
the TorchScript graph, an INT8 variant), exported again through the command line's function and
``training.cli.main``. Real files, a real registry and label store, real onnxruntime sessions."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from models.onnx_io import check_onnx_contract, cpu_session, read_head, run_in_batches
from models.preprocess import decode_image, preprocess_image
from models.spec import ModelSpec
from store.registry import INT8_REPORT_FILENAME, ModelRegistry, graph_exporter
from store.state import open_state
from tests.support.cli import last_json
from tests.support.images import make_subset
from tests.support.models import register_tiny
from tests.support.stores import MAX_PIXELS
from training.backbones import Backbone, ClassifierWithEmbedding, create_backbone
from training.cli import main
from training.data import load_labelled, stratified_split
from training.export import TORCHSCRIPT, export_onnx
from training.quantize import quantize_version
from training.reexport import LOGITS_ATOL_VS_OLD, ReexportResult, reexport_version

pytestmark = pytest.mark.slow

PER_CLASS = 6
#: photos per class also put into the label store; the others are found only under --data
IN_STORE = 3
LABELS = ("ants", "bees")


@dataclass(frozen=True)
class Old:
    """The state directory holding the old version v1 (active, with an INT8 variant), the photo
    folder it was "fitted" on, and what it was made from."""

    home: Path
    folder: Path
    photos: list[Path]
    inputs: np.ndarray  # the photos, preprocessed
    targets: np.ndarray
    weight: np.ndarray
    bias: np.ndarray
    spec: ModelSpec
    details: dict
    files: dict[str, bytes]  # v1's files as registered

    @property
    def registry(self) -> ModelRegistry:
        return open_state(home=self.home).registry


def old_graph(backbone: Backbone, inputs: np.ndarray, targets: np.ndarray, path: Path) -> tuple[np.ndarray, ...]:
    """A deterministic head (class means' directions, unit scale: logits of a few units, as a
    head fitted on many images has) on ``backbone``, exported as before: TorchScript."""
    with torch.inference_mode():
        _, embeddings = ClassifierWithEmbedding(backbone.model)(torch.from_numpy(inputs))
    means = np.stack([embeddings.numpy()[targets == c].mean(0) for c in range(len(LABELS))])
    weight = means - means.mean(0)
    weight = (4 * weight / np.linalg.norm(weight, axis=1, keepdims=True)).astype(np.float32)
    bias = np.array([0.5, -0.5], np.float32)
    backbone.reset_head(len(LABELS))
    backbone.set_head(weight, bias)
    parity = export_onnx(backbone.model, path, inputs[:4], exporters=(TORCHSCRIPT,))
    assert parity.exporter == TORCHSCRIPT
    return weight, bias, embeddings.numpy()


@pytest.fixture(scope="module")
def old(tmp_path_factory: pytest.TempPathFactory, hymenoptera: Path) -> Old:
    root = tmp_path_factory.mktemp("reexport")
    folder = make_subset(hymenoptera, root / "photos", PER_CLASS)
    photos = sorted(folder.rglob("*.jpg"))
    targets = np.array([LABELS.index(p.parent.name) for p in photos])
    backbone = create_backbone()
    inputs = np.stack([preprocess_image(decode_image(p.read_bytes()), backbone.preprocess) for p in photos])
    weight, bias, embeddings = old_graph(backbone, inputs, targets, root / "old.onnx")
    spec = ModelSpec(labels=LABELS, preprocess=backbone.preprocess, backbone=backbone.name,
                     backbone_fingerprint=backbone.fingerprint(), embedding_size=backbone.embedding_size)
    # fit's details, from before the exporter was recorded
    held_out = len(stratified_split(targets, 0.2, 0)[1])
    details = {"strategy": "head", "backbone": backbone.name, "data": str(folder), "images": len(photos),
               "train_images": len(photos) - held_out, "held_out_images": held_out, "seed": 0, "val_fraction": 0.2,
               "onnx_parity": {"images": 4, "max_logit_diff": 2e-5, "max_embedding_diff": 7e-6,
                               "top1_agreement": 1.0}}
    report = root / "report"
    report.mkdir()
    (report / "report.md").write_text("# head fit on photos\n")
    state = open_state(home=root / "home")
    state.registry.register(
        onnx_file=root / "old.onnx", spec=spec, metrics={"accuracy": 1.0}, embeddings=embeddings,
        embedding_targets=targets, embedding_hashes=[hashlib.sha256(p.read_bytes()).hexdigest() for p in photos],
        parent=None, dataset_fingerprint=load_labelled(folder, lambda image: 0, progress=False).fingerprint(),
        details=details, report_dir=report,
    )
    quantize_version(state.registry, "v1", folder, progress=False)
    for label in LABELS:
        for photo in [p for p in photos if p.parent.name == label][:IN_STORE]:
            state.labels.add(photo.read_bytes(), label, max_pixels=MAX_PIXELS)
    v1 = state.registry.get("v1")
    assert state.registry.active_version() == "v1" and v1.has_int8()
    files = {name: (v1.path / name).read_bytes() for name in v1.manifest_files()}
    return Old(root / "home", folder, photos, inputs, targets, weight, bias, spec, details, files)


@pytest.fixture(scope="module")
def reexported(old: Old) -> ReexportResult:
    state = open_state(home=old.home)
    return reexport_version(state.registry, state.labels, "v1", old.folder, progress=False)


def ops(path: Path) -> set[str]:
    import onnx

    return {node.op_type for node in onnx.load(str(path)).graph.node}


def test_the_new_version_has_the_fast_graph_with_the_same_head_and_answers(
    old: Old, reexported: ReexportResult,
) -> None:
    assert reexported.version == "v2" and reexported.source == "v1"
    new, v1 = old.registry.get("v2"), old.registry.get("v1")
    new.verify()
    assert graph_exporter(v1.info) == TORCHSCRIPT and graph_exporter(new.info) == "dynamo"
    # the TF-"same" padding is no longer computed from the input's shape at run time
    assert "Ceil" in ops(v1.onnx_path) and "Ceil" not in ops(new.onnx_path)
    assert new.spec == v1.spec == old.spec
    weight, bias = read_head(new.onnx_path)
    assert np.array_equal(weight, old.weight) and np.array_equal(bias, old.bias)

    old_logits, old_embeddings = run_in_batches(cpu_session(v1.onnx_path), old.inputs)
    new_logits, new_embeddings = run_in_batches(cpu_session(new.onnx_path), old.inputs)
    assert np.array_equal(new_logits.argmax(1), old_logits.argmax(1))
    assert np.abs(new_logits - old_logits).max() <= LOGITS_ATOL_VS_OLD
    assert np.abs(new_embeddings - old_embeddings).max() < 1e-4
    assert (new_logits.argmax(1) == old.targets).mean() >= 0.75  # a real head, not a constant

    info = new.info
    assert info["parent"] == "v1" and info["dataset_fingerprint"] == v1.info["dataset_fingerprint"]
    details = info["details"]
    assert details["reexported_from"] == "v1" and details["onnx_parity"]["exporter"] == "dynamo"
    for key in ("strategy", "seed", "val_fraction", "held_out_images", "data"):  # quantize reproduces fit's split
        assert details[key] == old.details[key]
    # same backbone weights: the old version's training embeddings stay valid
    for mine, theirs in zip(new.training_embeddings(), v1.training_embeddings(), strict=True):
        assert np.array_equal(mine, theirs)
    assert new.training_hashes() == v1.training_hashes()

    assert new.metrics["accuracy"] == 1.0  # the old version's figures, plus the re-export's
    figures = new.metrics["reexport"]
    assert figures["from"] == "v1" and figures["images"] == len(old.photos)
    assert f"{2 * IN_STORE} in the label store, {len(old.photos) - 2 * IN_STORE} more under" in figures["image_source"]
    assert figures["parity"] == reexported.parity and reexported.parity is not None
    assert reexported.parity["top1_agreement"] == 1.0
    assert "Re-exported from v1" in (new.report_dir / "report.md").read_text()


def test_the_old_version_is_untouched_and_still_serves(old: Old, reexported: ReexportResult) -> None:
    v1 = old.registry.get("v1")
    v1.verify()
    assert {name: (v1.path / name).read_bytes() for name in v1.manifest_files()} == old.files
    logits, _ = run_in_batches(cpu_session(v1.onnx_path), old.inputs)
    int8_logits, _ = run_in_batches(cpu_session(v1.int8_onnx_path), old.inputs)
    assert np.array_equal(logits.argmax(1), int8_logits.argmax(1))
    assert "v1" in [v.version for v in old.registry.versions()]


def test_it_goes_live_through_the_gate_when_the_old_version_was_live(old: Old, reexported: ReexportResult) -> None:
    assert reexported.active and old.registry.active_version() == "v2"
    assert old.registry.active_pointer().previous[0] == "v1"  # type: ignore[union-attr]
    gate = reexported.gate
    assert gate is not None and gate["passed"] and gate["labelled_images"] == len(old.photos)
    assert gate["accuracy"] == gate["previous_accuracy"]
    assert f"on {len(old.photos)} held-out images" in gate["reason"]  # promotion_gate's own words


def test_an_int8_variant_is_made_for_the_new_graph(old: Old, reexported: ReexportResult) -> None:
    new, v1 = old.registry.get("v2"), old.registry.get("v1")
    assert new.has_int8()
    check_onnx_contract(new.int8_onnx_path, new.spec)
    assert new.int8_onnx_path.read_bytes() != v1.int8_onnx_path.read_bytes()
    assert "Ceil" not in ops(new.int8_onnx_path)
    weight, bias = read_head(new.int8_onnx_path)  # the head stays float
    assert np.array_equal(weight, old.weight) and np.array_equal(bias, old.bias)
    report = json.loads((new.path / INT8_REPORT_FILENAME).read_text())
    assert report["added"] and report["labelled"] and report["calibration_images"] == len(old.photos)
    assert reexported.int8 == report
    fp32, _ = run_in_batches(cpu_session(new.onnx_path), old.inputs)
    int8, _ = run_in_batches(cpu_session(new.int8_onnx_path), old.inputs)
    assert np.array_equal(fp32.argmax(1), int8.argmax(1))


def test_a_version_whose_graph_is_already_from_dynamo_is_left_alone(
    old: Old, reexported: ReexportResult, capsys: pytest.CaptureFixture[str],
) -> None:
    before = [v.version for v in old.registry.versions()]
    assert main(["--home", str(old.home), "reexport", "--version", "v2", "--json"]) == 0
    out = last_json(capsys.readouterr().out)
    assert out["version"] is None and out["from"] == "v2" and "already" in out["note"]
    assert [v.version for v in old.registry.versions()] == before


def test_a_fine_tuned_backbone_is_refused(old: Old, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    registry = old.registry
    v1 = registry.get("v1")
    embeddings, targets = v1.training_embeddings()
    tuned = registry.register(
        onnx_file=v1.onnx_path, spec=v1.spec.model_copy(update={"backbone_fingerprint": "f" * 64}), metrics={},
        embeddings=embeddings, embedding_targets=targets, parent=None, dataset_fingerprint=None,
        details={"strategy": "finetune"},
    )
    before = len(registry.versions())

    assert main(["--home", str(old.home), "reexport", "--version", tuned.version, "--data", str(old.folder)]) == 2

    err = capsys.readouterr().err
    assert f"version {tuned.version}'s backbone was fine-tuned or is not the stock pretrained" in err
    assert "exist only in its graph" in err and "python -m training fit" in err
    assert len(registry.versions()) == before


def test_a_backbone_that_cannot_be_rebuilt_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    registry = open_state(home=tmp_path / "home").registry
    register_tiny(registry, tmp_path)  # backbone "tiny-test-net": no such timm model

    assert main(["--home", str(tmp_path / "home"), "reexport", "--version", "v1"]) == 2

    err = capsys.readouterr().err
    assert "backbone 'tiny-test-net' cannot be rebuilt from stock pretrained weights" in err
    assert len(registry.versions()) == 1


def test_a_version_whose_images_cannot_be_found_is_refused(
    old: Old, hymenoptera: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    registry = old.registry
    v1 = registry.get("v1")
    embeddings, targets = v1.training_embeddings()
    elsewhere = make_subset(hymenoptera, tmp_path / "elsewhere", PER_CLASS, offset=PER_CLASS)
    trained_on = registry.register(  # "trained" on photos that are neither in the store nor under --data
        onnx_file=v1.onnx_path, spec=v1.spec, metrics={}, embeddings=embeddings, embedding_targets=targets,
        embedding_hashes=[hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(elsewhere.rglob("*.jpg"))],
        parent=None, dataset_fingerprint=None, details={"strategy": "head"},
    )
    before = len(registry.versions())

    assert main(["--home", str(old.home), "reexport", "--version", trained_on.version,
                 "--data", str(old.folder)]) == 2

    err = capsys.readouterr().err
    assert f"none of the {len(old.photos)} images version {trained_on.version} was trained on are in the label " \
           f"store or under {old.folder}; pass --data" in err
    assert len(registry.versions()) == before


def test_a_new_graph_that_differs_from_the_old_one_is_not_registered(
    old: Old, tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    """A version whose graph holds other weights than its spec's fingerprint names: the stock
    backbone rebuilds and exports fine, but against the old graph its embeddings differ."""
    backbone = create_backbone()
    with torch.no_grad():
        backbone.model.conv_head.weight[0] += 0.05  # one output channel of the last convolution
    backbone.reset_head(len(LABELS))
    backbone.set_head(old.weight, old.bias)
    export_onnx(backbone.model, tmp_path / "other.onnx", old.inputs[:4], exporters=(TORCHSCRIPT,))
    registry = old.registry
    embeddings, targets = registry.get("v1").training_embeddings()
    other = registry.register(
        onnx_file=tmp_path / "other.onnx", spec=old.spec, metrics={}, embeddings=embeddings,
        embedding_targets=targets, embedding_hashes=registry.get("v1").training_hashes(), parent=None,
        dataset_fingerprint=None, details={"strategy": "head"},
    )
    before = len(registry.versions())

    assert main(["--home", str(old.home), "reexport", "--version", other.version]) == 1

    err = capsys.readouterr().err
    assert "the new graph differs from the old one on its own images" in err
    assert "max embedding difference" in err and "nothing was registered" in err
    assert len(registry.versions()) == before


def test_an_inactive_bootstrap_version_is_checked_unlabelled_and_its_successor_stays_inactive(
    old: Old, reexported: ReexportResult, tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    """The bootstrap version records no training images: the sample photos and the images under
    --data, unlabelled, are the check; it is not the active version, so neither is the new one."""
    from training.backbones import imagenet_labels
    from training.pipeline import SAMPLES_DIR

    backbone = create_backbone()
    samples = sorted(SAMPLES_DIR.glob("*.jpg"))
    inputs = np.stack([preprocess_image(decode_image(p.read_bytes()), backbone.preprocess) for p in samples])
    export_onnx(backbone.model, tmp_path / "bootstrap.onnx", inputs, exporters=(TORCHSCRIPT,))
    registry = old.registry
    boot = registry.register(  # as bootstrap() registered it before the dynamo exporter
        onnx_file=tmp_path / "bootstrap.onnx",
        spec=ModelSpec(labels=tuple(imagenet_labels()), preprocess=backbone.preprocess, backbone=backbone.name,
                       backbone_fingerprint=backbone.fingerprint(), embedding_size=backbone.embedding_size),
        metrics={"note": "pretrained ImageNet-1k classifier, not evaluated on local data"},
        embeddings=np.zeros((0, backbone.embedding_size), np.float32), embedding_targets=np.zeros(0, np.int64),
        parent=None, dataset_fingerprint=None, details={"strategy": "bootstrap", "backbone": backbone.name},
    )
    active = registry.active_version()
    assert active != boot.version

    assert main(["--home", str(old.home), "reexport", "--version", boot.version, "--data", str(old.folder)]) == 0

    new = registry.get(registry.versions()[-1].version)
    out = capsys.readouterr().out
    assert f"registered {new.version} from {boot.version}" in out
    assert f"against {boot.version} on {len(samples) + len(old.photos)} images" in out
    assert "promotion gate passed: no labelled images: top-1 agreement" in out
    assert f"{new.version} is not active; activate it with POST /admin/models/{new.version}/activate" in out
    assert registry.active_version() == active
    figures = new.metrics["reexport"]
    assert figures["gate"]["labelled_images"] == 0 and figures["images"] == len(samples) + len(old.photos)
    assert figures["image_source"].startswith("the sample photos and the images under")
    assert new.metrics["note"].startswith("pretrained ImageNet-1k")
    assert new.info["details"] == {"strategy": "bootstrap", "backbone": backbone.name,
                                   "reexported_from": boot.version,
                                   "onnx_parity": new.info["details"]["onnx_parity"]}
    assert new.spec == boot.spec and graph_exporter(new.info) == "dynamo"
    assert not new.has_int8() and not new.report_dir.exists()  # its origin had neither
    old_logits, _ = run_in_batches(cpu_session(boot.onnx_path), inputs)
    new_logits, _ = run_in_batches(cpu_session(new.onnx_path), inputs)
    assert np.array_equal(old_logits.argmax(1), new_logits.argmax(1))
