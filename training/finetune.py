"""Strategy ``finetune``: after the head warm-up (a linear head fitted on frozen embeddings, done
by the caller), train the whole network at a low learning rate, lower for the backbone than for
the head, with training augmentation; early stopping on validation loss; the best epoch kept.

Batch-norm layers stay in eval mode: with small batches and few images, updating their running
statistics hurts more than it helps, and the pretrained statistics are good ones.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image
from torch import nn

from models.preprocess import normalise_crops

from .backbones import Backbone
from .data import LabelledImages

log = logging.getLogger(__name__)


@dataclass
class FinetuneResult:
    history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int | None = None


def _train_transform(backbone: Backbone) -> Callable[[Image.Image], torch.Tensor]:
    """Augmentation on the thumbnail, then the normaliser every other path uses (the same
    float32 values as torchvision's ``ToTensor`` + ``Normalize``)."""
    from torchvision import transforms

    cfg = backbone.preprocess
    interpolation = transforms.InterpolationMode(cfg.interpolation)
    augment = transforms.Compose([
        transforms.RandomResizedCrop(cfg.input_size, scale=(0.5, 1.0), interpolation=interpolation),
        transforms.RandomHorizontalFlip(),
        transforms.ColorJitter(0.2, 0.2, 0.2),
    ])

    def transform(image: Image.Image) -> torch.Tensor:
        crop = np.asarray(augment(image))
        return torch.from_numpy(normalise_crops(crop[None], cfg)[0])

    return transform


def _freeze_batchnorm(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()


def _evaluate(model: nn.Module, inputs: np.ndarray, targets: np.ndarray, batch_size: int) -> tuple[float, float]:
    model.eval()
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    total_loss, correct = 0.0, 0
    with torch.inference_mode():
        for start in range(0, len(inputs), batch_size):
            x = torch.from_numpy(np.ascontiguousarray(inputs[start : start + batch_size]))
            y = torch.from_numpy(targets[start : start + batch_size])
            logits = model(x)
            total_loss += float(loss_fn(logits, y))
            correct += int((logits.argmax(1) == y).sum())
    return total_loss / len(inputs), correct / len(inputs)


def finetune(
    backbone: Backbone,
    dataset: LabelledImages,
    eval_inputs: np.ndarray,
    train_idx: np.ndarray,
    val_idx: np.ndarray,
    *,
    epochs: int = 6,
    batch_size: int = 16,
    backbone_lr: float = 3e-5,
    head_lr: float = 3e-4,
    patience: int = 2,
    seed: int = 0,
    progress: bool = True,
) -> FinetuneResult:
    """Fine-tune ``backbone.model`` in place; on return it holds the best epoch's weights."""
    from tqdm import tqdm

    if epochs < 1:
        raise ValueError("epochs must be at least 1")
    model = backbone.model
    head = model.get_classifier()
    head_ids = {id(p) for p in head.parameters()}
    optimizer = torch.optim.AdamW(
        [
            {"params": [p for p in model.parameters() if id(p) not in head_ids], "lr": backbone_lr},
            {"params": list(head.parameters()), "lr": head_lr},
        ],
        weight_decay=1e-4,
    )
    augment = _train_transform(backbone)
    loss_fn = nn.CrossEntropyLoss()
    generator = torch.Generator().manual_seed(seed)
    targets = dataset.targets
    val_inputs, val_targets = eval_inputs[val_idx], targets[val_idx]

    best_loss, _ = _evaluate(model, val_inputs, val_targets, 32)
    best_state = copy.deepcopy(model.state_dict())
    result = FinetuneResult(best_epoch=0)
    stale = 0
    for epoch in range(1, epochs + 1):
        model.train()
        _freeze_batchnorm(model)
        order = train_idx[torch.randperm(len(train_idx), generator=generator).numpy()]
        seen, loss_sum, correct = 0, 0.0, 0
        batches = range(0, len(order), batch_size)
        for start in tqdm(batches, desc=f"finetune epoch {epoch}/{epochs}", unit="batch", disable=not progress):
            chunk = order[start : start + batch_size]
            x = torch.stack([augment(dataset.items[i][1]) for i in chunk])
            y = torch.from_numpy(targets[chunk])
            optimizer.zero_grad(set_to_none=True)
            logits = model(x)
            loss = loss_fn(logits, y)
            loss.backward()
            optimizer.step()
            seen += len(chunk)
            loss_sum += float(loss.detach()) * len(chunk)
            correct += int((logits.argmax(1) == y).sum())
        val_loss, val_accuracy = _evaluate(model, val_inputs, val_targets, 32)
        result.history.append({
            "epoch": float(epoch),
            "train_loss": loss_sum / seen,
            "train_accuracy": correct / seen,
            "val_loss": val_loss,
            "val_accuracy": val_accuracy,
        })
        log.info("epoch %d: train loss %.4f, val loss %.4f, val accuracy %.3f",
                 epoch, loss_sum / seen, val_loss, val_accuracy)
        if val_loss < best_loss:
            best_loss, best_state, result.best_epoch, stale = val_loss, copy.deepcopy(model.state_dict()), epoch, 0
        else:
            stale += 1
            if stale >= patience:
                log.info("early stopping after epoch %d (best epoch %s)", epoch, result.best_epoch)
                break
    model.load_state_dict(best_state)
    model.eval()
    return result
