"""Unlabelled domain adaptation, the arithmetic: map the embeddings of images from a new domain
(other cameras, light, compression, blur, noise) onto the statistics of the embeddings the head
was trained on, and fold that map into the head.

The map is affine, ``x -> A (x - m_tgt) + m_src``, so the head that sees mapped embeddings is a
plain linear head on the raw ones: ``W' = W A``, ``b' = b + W (m_src - A m_tgt)``. Nothing else of
the version changes (same backbone graph, same preprocessing), which is why adaptation needs no
torch and runs wherever a retrain job runs.

- ``diagonal`` (the default): ``A = diag(s_src / s_tgt)``, each embedding dimension's mean and
  standard deviation matched on its own;
- ``coral``: full-covariance alignment (CORAL), ``A = C_src^1/2 C_tgt^-1/2``. A few hundred images
  of 1280-dimensional embeddings give a singular covariance, so both are shrunk towards a scaled
  identity first.

``bench/adapt_bench.py`` measures both (and AdaBN on the backbone, which is not offered: it hurt
on every corruption measured) and sets :data:`MIN_TARGET_IMAGES`. The adapted version stores the
parent's training embeddings mapped into the target domain (the inverse map), so that its own
training embeddings have the target statistics: a retrain from it keeps the adaptation, and a
later adaptation starts from the domain it serves. Torch-free and store-free like
:mod:`models.retrain`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from pydantic import Field

from .errors import InputError
from .retrain import GateParams, ParentModel, promotion_gate

AlignmentMethod = Literal["diagonal", "coral"]

#: Fewer unlabelled target images than this are refused (422): below it, the per-dimension
#: statistics are too noisy to move the head in the right direction (bench/README.md, "Domain
#: adaptation", has the curve).
MIN_TARGET_IMAGES = 32
#: CORAL's shrinkage of each covariance towards ``trace / D`` times the identity (0: none, 1: the
#: diagonal of equal variances). The covariance of a few hundred 1280-d embeddings is singular, and
#: less shrinkage lost accuracy in the benchmark (bench/README.md).
CORAL_SHRINKAGE = 0.9


class AdaptParams(GateParams):
    """Parameters of an adaptation job (the form fields of ``POST /admin/adapt``)."""

    method: AlignmentMethod = Field("diagonal", description="diagonal: per-dimension mean and standard deviation; "
                                    "coral: full covariance (regularised)")
    domain: str | None = Field(None, description="the domain tag of the labelled images that judge the adapted "
                               "version (POST /admin/labels with the same `domain`); without any, only `force` "
                               "puts it live")


class AdaptRefused(InputError):
    """Adaptation cannot run on what it was given."""


@dataclass(frozen=True)
class Alignment:
    """The affine map ``x -> (x - target_mean) @ matrix.T + source_mean`` from target-domain
    embeddings onto the source statistics; ``matrix`` is (D,) for a diagonal map, (D, D) else."""

    method: AlignmentMethod
    matrix: np.ndarray
    inverse_matrix: np.ndarray
    source_mean: np.ndarray
    target_mean: np.ndarray

    def _times(self, matrix: np.ndarray, x: np.ndarray) -> np.ndarray:
        return x * matrix if matrix.ndim == 1 else x @ matrix.T

    def apply(self, embeddings: np.ndarray) -> np.ndarray:
        """Target-domain embeddings as the head trained on the source domain expects them."""
        x = np.asarray(embeddings, np.float64)
        return self._times(self.matrix, x - self.target_mean) + self.source_mean

    def invert(self, embeddings: np.ndarray) -> np.ndarray:
        """Source-domain embeddings moved into the target domain (the inverse of :meth:`apply`)."""
        x = np.asarray(embeddings, np.float64)
        return self._times(self.inverse_matrix, x - self.source_mean) + self.target_mean

    def fold(self, weight: np.ndarray, bias: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The head ``(W', b')`` whose logits on raw target embeddings equal ``(W, b)``'s on
        :meth:`apply`'d ones."""
        w = np.asarray(weight, np.float64)
        folded_w = w * self.matrix if self.matrix.ndim == 1 else w @ self.matrix
        shift = self.source_mean - self._times(self.matrix, self.target_mean)
        return folded_w.astype(np.float32), (np.asarray(bias, np.float64) + w @ shift).astype(np.float32)


def _check(source: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    source, target = np.asarray(source, np.float64), np.asarray(target, np.float64)
    if source.ndim != 2 or target.ndim != 2 or source.shape[1] != target.shape[1]:
        raise ValueError(f"need (N, D) source and target embeddings, got {source.shape} and {target.shape}")
    if len(source) < 2 or len(target) < 2:
        raise ValueError("statistics need at least two embeddings on each side")
    return source, target


def _std_floor(std: np.ndarray) -> np.ndarray:
    # a dimension (nearly) constant on the target images would get a huge scale from noise: it is
    # floored at a hundredth of the typical dimension's spread
    return np.maximum(std, 1e-2 * float(np.mean(std)) + 1e-12)


def diagonal_alignment(source: np.ndarray, target: np.ndarray) -> Alignment:
    """Each dimension's target mean and standard deviation mapped onto the source's."""
    source, target = _check(source, target)
    s_src, s_tgt = _std_floor(source.std(axis=0)), _std_floor(target.std(axis=0))
    return Alignment("diagonal", s_src / s_tgt, s_tgt / s_src, source.mean(axis=0), target.mean(axis=0))


def _shrunk_covariance(x: np.ndarray, shrinkage: float) -> np.ndarray:
    covariance = np.cov(x, rowvar=False)
    scale = float(np.trace(covariance)) / len(covariance)
    return (1.0 - shrinkage) * covariance + shrinkage * scale * np.eye(len(covariance))


def _square_roots(symmetric: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``M^1/2`` and ``M^-1/2`` of a symmetric positive semi-definite matrix, from one
    eigendecomposition (eigenvalues floored relative to the largest)."""
    values, vectors = np.linalg.eigh(symmetric)
    values = np.maximum(values, 1e-12 * float(values.max()))
    return (vectors * values**0.5) @ vectors.T, (vectors * values**-0.5) @ vectors.T


def coral_alignment(source: np.ndarray, target: np.ndarray, shrinkage: float = CORAL_SHRINKAGE) -> Alignment:
    """CORAL: the target covariance whitened and recoloured with the source's, both shrunk by
    ``shrinkage`` (0 < shrinkage <= 1) towards a scaled identity."""
    if not 0.0 < shrinkage <= 1.0:
        raise ValueError(f"shrinkage must be in (0, 1], got {shrinkage}")
    source, target = _check(source, target)
    src_root, src_inverse_root = _square_roots(_shrunk_covariance(source, shrinkage))
    tgt_root, tgt_inverse_root = _square_roots(_shrunk_covariance(target, shrinkage))
    return Alignment("coral", src_root @ tgt_inverse_root, tgt_root @ src_inverse_root, source.mean(axis=0),
                     target.mean(axis=0))


def align(method: AlignmentMethod, source: np.ndarray, target: np.ndarray) -> Alignment:
    return diagonal_alignment(source, target) if method == "diagonal" else coral_alignment(source, target)


def target_fingerprint(image_ids: Sequence[str]) -> str:
    """One id for a set of target images (their sha256 ids, in any order, duplicates once)."""
    return hashlib.sha256("\n".join(sorted(set(image_ids))).encode()).hexdigest()


def check_adaptable(parent: ParentModel, target_images: int) -> None:
    """:class:`AdaptRefused` with the reason if ``parent`` cannot be adapted to that many images."""
    if len(parent.embeddings) < 2:
        raise AdaptRefused(f"version {parent.version} stores no training embeddings to take the source statistics "
                           "from (the bootstrap model has none): retrain it on labelled images first")
    if target_images < MIN_TARGET_IMAGES:
        raise AdaptRefused(f"{target_images} unlabelled image(s) of the new domain; adaptation needs at least "
                           f"{MIN_TARGET_IMAGES} (different images: duplicates count once) to estimate its statistics")


@dataclass(frozen=True)
class HeadAdaptation:
    """An adapted head, how it compares with the parent's on labelled target images, and the
    training data the new version stores (the parent's, moved into the target domain)."""

    alignment: Alignment
    weight: np.ndarray
    bias: np.ndarray
    promote: bool
    metrics: dict[str, Any]
    embeddings: np.ndarray


def adapt_head(parent: ParentModel, target: np.ndarray, judge: np.ndarray, judge_labels: Sequence[str],
               params: AdaptParams) -> HeadAdaptation:
    """Align ``target`` (the unlabelled images' embeddings) with the parent's training
    embeddings, fold the map into the parent's head, and judge both heads on ``judge`` (labelled
    target-domain embeddings; their labels must be the parent's: others are left out, and
    counted)."""
    check_adaptable(parent, len(target))
    alignment = align(params.method, parent.embeddings, target)
    weight, bias = alignment.fold(parent.weight, parent.bias)
    index = {label: k for k, label in enumerate(parent.labels)}
    known = [k for k, label in enumerate(judge_labels) if label in index]
    truth = np.array([index[judge_labels[k]] for k in known], np.int64)
    judged = np.asarray(judge, np.float32)[known] if known else np.zeros((0, parent.weight.shape[1]), np.float32)
    candidate_acc = float(((judged @ weight.T + bias).argmax(1) == truth).mean()) if known else 0.0
    active_acc = float(((judged @ parent.weight.T + parent.bias).argmax(1) == truth).mean()) if known else 0.0
    what = f"labelled images of domain {params.domain!r}" if params.domain else "labelled target images"
    promote, gate = promotion_gate(candidate_acc, active_acc, len(known), params, judged_on=what)
    if not known and not params.force:
        gate += ("; give labelled images of the new domain (POST /admin/labels with a `domain` named in the "
                 "request, or --labelled on the command line), or set force")
    metrics = {
        "method": params.method,
        "target_images": len(target),
        "candidate": {"accuracy": candidate_acc, "judged_on": len(known)},
        "active": {"version": parent.version, "accuracy": active_acc, "judged_on": len(known)},
        "domain": params.domain,
        "unknown_labels_left_out": len(judge_labels) - len(known),
        "promoted": bool(promote),
        "gate": gate,
    }
    return HeadAdaptation(alignment, weight, bias, promote, metrics,
                          alignment.invert(parent.embeddings).astype(np.float32))
