"""A faster graph for a version made before the dynamo exporter: the same head on the same stock
pretrained backbone, exported again, checked against the old version and registered as a new one.

    .venv/bin/python -m training reexport --version v2 --data ../shared/data/hymenoptera/train

Versions are immutable, so the old one is left as it is and keeps serving until the new one is
activated. Only versions whose backbone is the stock pretrained one (the bootstrap version, ``fit
--strategy head`` and the head-only retrains made from them) can be rebuilt: their backbone's
weights come from the pretrained checkpoint, matched by the spec's weight fingerprint, and their
head is read from the graph. A fine-tuned backbone's weights exist only in its graph; such a
version needs a new ``fit``, whose export is the fast graph already. A version whose graph is
already the dynamo exporter's, fine-tuned or not, is left alone.

The new graph is checked twice: against torch, as every export (:func:`training.export.export_onnx`),
and against the old graph on the version's own images (its training images found in the label
store or under ``--data`` by content hash; the sample photos and ``--data`` for the bootstrap
version, which has none): the same top-1 for every image, logits within :data:`LOGITS_ATOL_VS_OLD`
and embeddings within :data:`EMBEDDING_ATOL_VS_OLD`. It then goes through the retrain job's
promotion gate (:func:`models.retrain.promotion_gate`) on those images, and replaces the old
version as the active one only if that was active. The new version keeps the old one's training
embeddings (same backbone weights, same fingerprint, so the embedding cache stays valid), details
(fit's split stays reproducible for ``quantize``) and, if the old one had an INT8 variant and the
new graph's passes the INT8 gate, an INT8 variant of its own.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.errors import DatasetError, ExportError, InputError, ModelError
from models.hardware import cpu_count
from models.int8 import MAX_CALIBRATION_IMAGES, check_int8, quantize_onnx
from models.onnx_io import check_onnx_contract, cpu_session, read_head, run_in_batches
from models.preprocess import decode_image, preprocess_image
from models.retrain import RetrainParams, promotion_gate
from store.labels import LabelStore
from store.registry import INT8_ONNX_FILENAME, INT8_REPORT_FILENAME, ModelRegistry, ModelVersion, graph_exporter

from .backbones import Backbone, BackboneError, create_backbone
from .data import load_labelled
from .export import DYNAMO, LOGITS_ATOL, ParityResult, export_onnx
from .pipeline import PARITY_IMAGES, SAMPLES_DIR

log = logging.getLogger(__name__)

#: Largest logit difference allowed between the old and the new graph: each is within
#: :data:`training.export.LOGITS_ATOL` of torch.
LOGITS_ATOL_VS_OLD = 2 * LOGITS_ATOL
#: Largest embedding difference allowed between the old and the new graph. Embeddings are the
#: pooled features (a few units at most); two faithful exports of lite0 differ by about 1e-5.
EMBEDDING_ATOL_VS_OLD = 1e-4
#: Most images the old and the new graph are compared on (and the INT8 variant calibrated on).
MAX_IMAGES = MAX_CALIBRATION_IMAGES


class ReexportRefused(InputError):
    """The version cannot be exported again (a fine-tuned or unknown backbone, no images of its
    own to check on); nothing was registered."""


@dataclass(frozen=True)
class CheckImages:
    """Preprocessed images (N, 3, S, S) to compare the graphs on, with the version's targets for
    them (indices into its labels) or None when they are not labelled."""

    inputs: np.ndarray
    targets: np.ndarray | None
    source: str  #: what the images are, for people


@dataclass(frozen=True)
class ReexportResult:
    """What :func:`reexport_version` did. ``version`` is None when nothing was needed."""

    version: str | None
    source: str  #: the version exported again
    active: bool  #: whether ``version`` is the active version now
    parity: dict[str, Any] | None  #: the new graph against the old one
    gate: dict[str, Any] | None
    int8: dict[str, Any] | None  #: the INT8 variant's figures, if the old version had one
    note: str  #: one line for people
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"version": self.version, "from": self.source, "active": self.active, "parity": self.parity,
                "gate": self.gate, "int8": self.int8, "note": self.note}


def reexport_version(
    registry: ModelRegistry, labels: LabelStore, version: str, data: Path | None = None, *,
    max_images: int = MAX_IMAGES, seed: int = 0, progress: bool = True,
) -> ReexportResult:
    """Register a new version with ``version``'s head on its freshly exported stock backbone,
    checked against ``version`` on its own images, and activate it if ``version`` is active and
    the promotion gate passes (see the module docstring)."""
    if max_images < 2:
        raise ValueError("max_images must be at least 2")
    started = time.perf_counter()
    old = registry.get(version)
    if graph_exporter(old.info) == DYNAMO:
        return ReexportResult(None, version, False, None, None, None,
                              f"version {version}'s graph is already from the {DYNAMO} exporter; nothing to do")
    old.verify()
    torch.set_num_threads(cpu_count())  # torch's default counts the host's cores, not a container's quota
    backbone = stock_backbone(old)
    weight, bias = read_head(old.onnx_path)
    if weight.shape != (old.spec.num_classes, backbone.embedding_size):
        raise ModelError(f"version {version}'s head is {weight.shape}, its spec says "
                         f"({old.spec.num_classes}, {backbone.embedding_size})")
    backbone.set_head(weight, bias)
    images = own_images(old, labels, data, max_images=max_images, seed=seed, progress=progress)
    log.info("exporting %s again with %s's head; checking on %s", old.spec.backbone, version, images.source)
    with tempfile.TemporaryDirectory(prefix="transfer-serve-reexport-") as tmp:
        workdir = Path(tmp)
        onnx_path = workdir / "model.onnx"
        # the dynamo exporter alone: the TorchScript fallback would make the graph the old one has
        export_parity = export_onnx(backbone.model, onnx_path, images.inputs[:PARITY_IMAGES], exporters=(DYNAMO,))
        parity, (old_top1, new_top1) = compare_graphs(old.onnx_path, onnx_path, images.inputs)
        gate = _gate(old_top1, new_top1, images, version, parity)
        metrics = {**old.metrics, "reexport": {"from": version, "parity": parity, "gate": gate,
                                               "images": len(images.inputs), "image_source": images.source}}
        details = {**(old.info.get("details") or {}), "onnx_parity": export_parity.as_dict(),
                   "reexported_from": version}
        embeddings, targets = old.training_embeddings()
        new = registry.register(
            onnx_file=onnx_path, spec=old.spec, metrics=metrics, embeddings=embeddings,
            embedding_targets=targets, embedding_hashes=old.training_hashes(), parent=version,
            dataset_fingerprint=old.info.get("dataset_fingerprint"), details=details,
            report_dir=_report(old, workdir / "report", export_parity, parity, gate, images.source),
        )
        log.info("registered %s: %s's head on a %s export of %s", new.version, version, DYNAMO, old.spec.backbone)
        int8 = _add_int8(registry, new, images, workdir) if old.has_int8() else None
    active = False
    if gate["passed"] and registry.active_version() == version:
        registry.activate(new.version)
        active = True
    note = (f"registered {new.version} from {version} ({DYNAMO} exporter); "
            + (f"{new.version} is active" if active else
               f"{new.version} is not active: activate it with POST /admin/models/{new.version}/activate"))
    return ReexportResult(new.version, version, active, parity, gate, int8, note,
                          round(time.perf_counter() - started, 1))


def stock_backbone(version: ModelVersion) -> Backbone:
    """The version's backbone rebuilt from its pretrained weights, if those are the weights its
    graph holds (same fingerprint); :class:`ReexportRefused` otherwise."""
    arch = version.spec.backbone
    fit_again = ("to get the faster graph, fit it again with `python -m training fit --data DIR` (its export is "
                 "the fast graph), or keep serving it as it is")
    try:
        backbone = create_backbone(arch)
    except BackboneError as exc:
        raise ReexportRefused(f"version {version.version}'s backbone {arch!r} cannot be rebuilt from stock "
                              f"pretrained weights ({exc}); {fit_again}") from exc
    if backbone.fingerprint() != version.spec.backbone_fingerprint:
        raise ReexportRefused(
            f"version {version.version}'s backbone was fine-tuned or is not the stock pretrained {arch}: its weight "
            f"fingerprint {version.spec.backbone_fingerprint[:12]}... differs from the pretrained weights' "
            f"{backbone.fingerprint()[:12]}..., so its weights exist only in its graph and cannot be exported "
            f"again; {fit_again}")
    return backbone


def own_images(version: ModelVersion, labels: LabelStore, data: Path | None, *, max_images: int = MAX_IMAGES,
               seed: int = 0, progress: bool = True) -> CheckImages:
    """The version's own images, preprocessed: those of the label store and of ``data`` (a
    labelled folder or CSV manifest) whose content hash is among its training images', labelled
    with its stored targets; for a version that records none (the bootstrap version), the sample
    photos and every image of ``data``, unlabelled. At most ``max_images`` (a seeded sample)."""
    known = {h: int(t) for h, t in zip(version.training_hashes(), version.training_embeddings()[1], strict=True)
             if h}
    readers: dict[str, Callable[[], bytes]] = {}
    for image in labels.images():
        if image.image_id in known:
            readers[image.image_id] = partial(labels.read, image.image_id)
    in_store = len(readers)
    if not known:
        for sample in sorted(SAMPLES_DIR.glob("*.jpg")):
            readers[hashlib.sha256(sample.read_bytes()).hexdigest()] = sample.read_bytes
    if data is not None:
        # decoded once to hash and check them; only the chosen ones are preprocessed
        dataset = load_labelled(data, lambda image: None, progress=progress, require_trainable=False)
        for path, digest in zip(dataset.paths, dataset.content_hashes, strict=True):
            if not known or digest in known:
                readers.setdefault(digest, path.read_bytes)
    if not known:
        source = f"the sample photos{f' and the images under {data}' if data else ''}, unlabelled"
    elif not readers:
        raise ReexportRefused(
            f"none of the {len(known)} images version {version.version} was trained on are in the label store"
            f"{f' or under {data}' if data else ''}; pass --data with the labelled folder or CSV manifest it was "
            "fitted on, so the new graph can be checked against it on its own images")
    else:
        source = (f"version {version.version}'s training images ({in_store} in the label store"
                  f"{f', {len(readers) - in_store} more under {data}' if data else ''})")
    if len(readers) < 2:
        raise DatasetError(f"only one image of version {version.version}'s own was found; the check needs at least "
                           "two: pass --data with the folder it was fitted on")
    chosen = sorted(readers)
    if len(chosen) > max_images:
        rng = np.random.default_rng(seed)
        chosen = sorted(rng.choice(chosen, max_images, replace=False).tolist())
        source += f", a sample of {max_images} (seed {seed})"
    config = version.spec.preprocess
    inputs = np.stack([preprocess_image(decode_image(readers[h]()), config) for h in chosen])
    targets = np.array([known[h] for h in chosen], np.int64) if known else None
    return CheckImages(inputs, targets, source)


def compare_graphs(old_graph: Path, new_graph: Path, inputs: np.ndarray) -> tuple[dict[str, Any],
                                                                                tuple[np.ndarray, np.ndarray]]:
    """Run both graphs on ``inputs`` with onnxruntime; :class:`ExportError` unless every image
    gets the same top-1 and logits and embeddings agree within the limits. Returns the figures
    and both graphs' top-1 answers."""
    old_logits, old_embeddings = run_in_batches(cpu_session(old_graph), inputs, batch_size=16)
    new_logits, new_embeddings = run_in_batches(cpu_session(new_graph), inputs, batch_size=16)
    old_top1, new_top1 = old_logits.argmax(1), new_logits.argmax(1)
    figures: dict[str, Any] = {
        "images": len(inputs),
        "max_logit_diff": float(np.abs(new_logits - old_logits).max()),
        "max_embedding_diff": float(np.abs(new_embeddings - old_embeddings).max()),
        "top1_agreement": float((old_top1 == new_top1).mean()),
    }
    log.info("new graph against the old on %d images: max logit diff %.2e, max embedding diff %.2e, top-1 "
             "agreement %.4f", len(inputs), figures["max_logit_diff"], figures["max_embedding_diff"],
             figures["top1_agreement"])
    if (figures["top1_agreement"] < 1.0 or figures["max_logit_diff"] > LOGITS_ATOL_VS_OLD
            or figures["max_embedding_diff"] > EMBEDDING_ATOL_VS_OLD):
        raise ExportError(
            f"the new graph differs from the old one on its own images: top-1 agreement "
            f"{figures['top1_agreement']:.4f} (must be 1.0), max logit difference {figures['max_logit_diff']:.2e} "
            f"(limit {LOGITS_ATOL_VS_OLD:.0e}), max embedding difference {figures['max_embedding_diff']:.2e} "
            f"(limit {EMBEDDING_ATOL_VS_OLD:.0e}); nothing was registered")
    return figures, (old_top1, new_top1)


def _gate(old_top1: np.ndarray, new_top1: np.ndarray, images: CheckImages, version: str,
          parity: dict[str, Any]) -> dict[str, Any]:
    """The retrain job's promotion gate on the labelled images; without labels the figure is
    the agreement with the old graph, which :func:`compare_graphs` requires to be total."""
    if images.targets is None:
        agreement = parity["top1_agreement"]
        return {"passed": agreement == 1.0, "labelled_images": 0,
                "reason": f"no labelled images: top-1 agreement with {version} {agreement:.4f} on "
                          f"{len(old_top1)} images"}
    accuracy = float((new_top1 == images.targets).mean())
    previous = float((old_top1 == images.targets).mean())
    passed, reason = promotion_gate(accuracy, previous, len(images.targets), RetrainParams())
    return {"passed": passed, "labelled_images": len(images.targets), "accuracy": accuracy,
            "previous_accuracy": previous, "reason": reason}


def _report(old: ModelVersion, destination: Path, export_parity: ParityResult, parity: dict[str, Any],
            gate: dict[str, Any], source: str) -> Path | None:
    """The old version's report with a note on the re-export, or None if it has none."""
    if not old.report_dir.is_dir():
        return None
    shutil.copytree(old.report_dir, destination)
    report = destination / "report.md"
    if report.is_file():
        with report.open("a") as out:
            out.write(
                f"\n## Re-exported from {old.version}\n\n"
                f"The same head on the same backbone weights, exported again with the {export_parity.exporter} "
                f"exporter (max logit difference to torch {export_parity.max_logit_diff:.2e} on "
                f"{export_parity.images} images). Against {old.version}'s graph on {source}: max logit "
                f"difference {parity['max_logit_diff']:.2e}, max embedding difference "
                f"{parity['max_embedding_diff']:.2e}, top-1 agreement {parity['top1_agreement']:.4f}. "
                f"Promotion gate: {gate['reason']}. The figures above are {old.version}'s.\n")
    return destination


def _add_int8(registry: ModelRegistry, version: ModelVersion, images: CheckImages, workdir: Path) -> dict[str, Any]:
    """Give the new version an INT8 variant of its own graph, calibrated and checked on
    ``images``, if it passes the INT8 gate; else keep it fp32 and say so."""
    path = workdir / INT8_ONNX_FILENAME
    quantize_onnx(version.onnx_path, path, images.inputs)
    check_onnx_contract(path, version.spec)
    check = check_int8(version.onnx_path, path, images.inputs, images.targets)
    figures = {"from": None, "calibration_images": len(images.inputs), "check_source": images.source,
               **check.as_dict(), "added": check.passed}
    if not check.passed:
        log.warning("version %s gets no INT8 variant (it is registered in fp32): its INT8 graph scores %.4f against "
                    "fp32's %.4f on %s, more than %.1f points lower", version.version, check.int8_accuracy,
                    check.fp32_accuracy, images.source, 100 * check.max_accuracy_loss)
        return figures
    report = workdir / INT8_REPORT_FILENAME
    report.write_text(json.dumps(figures, indent=2))
    registry.add_files(version.version, {INT8_ONNX_FILENAME: path, INT8_REPORT_FILENAME: report})
    log.info("added an INT8 variant to %s: top-1 accuracy %.4f (fp32 %.4f) on %s", version.version,
             check.int8_accuracy, check.fp32_accuracy, images.source)
    return figures
