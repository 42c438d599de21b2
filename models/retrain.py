"""Head-only retraining, the arithmetic: which labels the new head has, which images it is judged
on, the fitted head, and the promotion gate that decides whether it goes live.

A new linear head is fitted on ALL labelled images plus the parent version's own training
embeddings (no class is forgotten; new labels become new classes), and the new and the parent
model are compared on the same held-out images, fixed per image by its hash so that successive
retrains compare on the same ones. Torch-free and store-free: the retrain job
(``service/retrain.py``) reads the stores, hands the arrays to :func:`retrain_head`, and writes
back what it returns.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from .errors import InputError
from .head import HeadParams, LinearHead, fit_linear_head
from .metrics import classification_metrics

#: Share of the labelled images held out to compare the new head with the active one.
HELD_OUT_FRACTION = 0.2


class GateParams(BaseModel):
    """What the promotion gate (:func:`promotion_gate`) is told by a job's caller."""

    model_config = ConfigDict(extra="forbid")

    force: bool = Field(False, description="activate the new version even if it is worse")
    tolerance: float = Field(0.0, ge=0.0, le=1.0, description="accuracy the new version may lose and still go live")


class RetrainParams(GateParams):
    """Optional JSON body of ``POST /admin/retrain``."""

    steps: int = Field(300, ge=10, le=5000, description="head optimisation steps")
    learning_rate: float = Field(0.05, gt=0.0, le=1.0)
    l2: float = Field(1e-3, ge=0.0, le=10.0, description="L2 regularisation of the head")


class RetrainRefused(InputError):
    """The store does not hold enough to train on."""


@dataclass(frozen=True)
class ParentModel:
    """What a retrain needs of the version it starts from: its labels and head, and the
    embeddings, targets (indices into ``labels``) and image hashes ('' where unknown) it was
    trained on."""

    version: str
    labels: tuple[str, ...]
    weight: np.ndarray  # (C, D)
    bias: np.ndarray  # (C,)
    embeddings: np.ndarray  # (N, D)
    targets: np.ndarray  # (N,)
    hashes: Sequence[str]  # (N,)


def usable_labels(parent_labels: Sequence[str], parent_targets: np.ndarray,
                  store_counts: Mapping[str, int]) -> list[str]:
    """The new version's labels: the parent's that still have training data (in the parent's
    order), then new ones (sorted). Parent labels without any data (e.g. the bootstrap model's
    1000 ImageNet classes) cannot be fitted and are dropped."""
    with_data = {parent_labels[t] for t in set(parent_targets.tolist())} | set(store_counts)
    kept = [label for label in parent_labels if label in with_data]
    return kept + sorted(set(store_counts) - set(kept))


def check_retrainable(store_counts: Mapping[str, int], parent_labels: Sequence[str],
                      parent_targets: np.ndarray) -> None:
    """:class:`RetrainRefused` with the reason if a retrain cannot produce a classifier."""
    if not store_counts:
        raise RetrainRefused("no labelled images: upload some with POST /admin/labels first")
    small = {label: n for label, n in store_counts.items() if n < 2}
    if small:
        raise RetrainRefused(f"every label needs at least 2 images; too few: {small}")
    labels = usable_labels(parent_labels, parent_targets, store_counts)
    if len(labels) < 2:
        raise RetrainRefused(f"only one class ({labels[0]}); a classifier needs at least two: label images of "
                             "another class")


def is_held_out(image_id: str, fraction: float = HELD_OUT_FRACTION) -> bool:
    """Whether the image belongs to the held-out evaluation split.

    Decided by the first 32 bits of its hash (64 lowercase hex digits), so the answer never
    changes for an image and about ``fraction`` of all images are held out, independently of their
    labels.
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be between 0 and 1, got {fraction}")
    if len(image_id) != 64 or any(c not in "0123456789abcdef" for c in image_id):
        raise ValueError(f"{image_id!r} is not an image id (64 lowercase hex digits)")
    return int(image_id[:8], 16) / 16**8 < fraction


def split_held_out(labels_by_id: Mapping[str, str]) -> tuple[list[str], list[str]]:
    """(train, held-out) image ids; a class whose images are all held out trains on them."""
    held = {i for i in labels_by_id if is_held_out(i)}
    for label in set(labels_by_id.values()):
        members = {i for i, member_label in labels_by_id.items() if member_label == label}
        if members <= held:
            held -= members
    return [i for i in labels_by_id if i not in held], sorted(held)


def promotion_gate(candidate_accuracy: float, active_accuracy: float, held_out: int,
                   params: GateParams, judged_on: str = "held-out images") -> tuple[bool, str]:
    """Whether the new version goes live, and why: it may lose at most ``tolerance`` of the
    active version's accuracy on the ``held_out`` images both are judged on (``force``
    overrides; without such images only ``force`` promotes). ``judged_on`` names those images
    in the reason."""
    if not held_out:
        promote, reason = params.force, f"no {judged_on} to compare on"
    else:
        promote = params.force or candidate_accuracy >= active_accuracy - params.tolerance
        reason = (f"candidate accuracy {candidate_accuracy:.4f} vs active {active_accuracy:.4f} "
                  f"(tolerance {params.tolerance}) on {held_out} {judged_on}")
    return promote, reason + (" (forced)" if params.force else "")


@dataclass(frozen=True)
class HeadRetrain:
    """A retrained head, how it compares with the parent, and what the new version stores."""

    labels: list[str]
    head: LinearHead
    train_ids: list[str]
    held_ids: list[str]
    promote: bool
    metrics: dict[str, Any]
    #: the new version's own training data: everything it was fitted or judged on
    embeddings: np.ndarray
    targets: np.ndarray
    hashes: list[str]


def _accuracy(predicted: list[str], truth: list[str]) -> float:
    return float(np.mean([p == t for p, t in zip(predicted, truth, strict=True)])) if truth else 0.0


def retrain_head(parent: ParentModel, vectors: Mapping[str, np.ndarray], labels_by_id: Mapping[str, str],
                 params: RetrainParams) -> HeadRetrain:
    """Fit the new head on the labelled images (``vectors``: their embeddings by image id,
    ``labels_by_id``: their labels) and the parent's training embeddings of images not in the
    store, and judge it against the parent's head on the held-out images."""
    labels = usable_labels(parent.labels, parent.targets, dict.fromkeys(labels_by_id.values(), 1))
    index = {label: i for i, label in enumerate(labels)}
    train_ids, held_ids = split_held_out(labels_by_id)

    keep = [k for k, h in enumerate(parent.hashes)
            if h not in labels_by_id and parent.labels[parent.targets[k]] in index]
    parent_x = parent.embeddings[keep]
    parent_y = np.array([index[parent.labels[parent.targets[k]]] for k in keep], np.int64)
    store_x = np.stack([vectors[i] for i in train_ids]) if train_ids else parent_x[:0]
    store_y = np.array([index[labels_by_id[i]] for i in train_ids], np.int64)
    train_x, train_y = np.concatenate([parent_x, store_x]), np.concatenate([parent_y, store_y])
    held_x = np.stack([vectors[i] for i in held_ids]) if held_ids else np.zeros((0, train_x.shape[1]), np.float32)
    held_truth = [labels_by_id[i] for i in held_ids]
    held_y = np.array([index[t] for t in held_truth], np.int64)

    head = fit_linear_head(
        train_x, train_y, len(labels),
        params=HeadParams(steps=params.steps, learning_rate=params.learning_rate, l2=params.l2),
        validation=(held_x, held_y) if held_ids else None,
    )
    candidate_pred = [labels[k] for k in head.logits(held_x).argmax(1)] if held_ids else []
    active_pred = [parent.labels[k] for k in (held_x @ parent.weight.T + parent.bias).argmax(1)] if held_ids else []
    candidate_acc, active_acc = _accuracy(candidate_pred, held_truth), _accuracy(active_pred, held_truth)
    promote, gate = promotion_gate(candidate_acc, active_acc, len(held_ids), params)
    metrics = {
        # rows: the held-out images' labels, columns: the candidate's answers, both in `labels` order
        "candidate": {"accuracy": candidate_acc, "held_out": len(held_ids),
                      "confusion_matrix": classification_metrics(
                          [index[t] for t in held_truth], [index[p] for p in candidate_pred],
                          labels)["confusion_matrix"] if held_ids else []},
        "active": {"version": parent.version, "accuracy": active_acc, "held_out": len(held_ids)},
        "train_images": int(len(train_y)),
        "from_parent": len(keep),
        "labels": labels,
        "dropped_labels": len([label for label in parent.labels if label not in index]),
        "promoted": bool(promote),
        "gate": gate,
    }
    own_ids = train_ids + held_ids
    own_x = np.stack([vectors[i] for i in own_ids]) if own_ids else parent_x[:0]
    own_y = np.array([index[labels_by_id[i]] for i in own_ids], np.int64)
    return HeadRetrain(
        labels=labels, head=head, train_ids=train_ids, held_ids=held_ids, promote=promote, metrics=metrics,
        embeddings=np.concatenate([parent_x, own_x]), targets=np.concatenate([parent_y, own_y]),
        hashes=[parent.hashes[k] for k in keep] + own_ids,
    )
