"""``training/backbones.py``, real network level (slow): the offline weights' mapping onto timm's
model fails loudly on a mismatch, and checkpoints load with ``weights_only``."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch

from training.backbones import create_backbone

pytestmark = pytest.mark.slow


def test_weights_mapping_fails_loudly_on_mismatch() -> None:
    import timm

    from training.backbones import BackboneError, _map_state_dict_in_order

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
