"""``python -m training adapt``: a version adapted to a folder of unlabelled images of a new domain
and judged on a labelled folder of it, in process. The arithmetic is :mod:`models.adapt`, as in
the service's adapt job (``service/adapt.py``, which training does not import); here the images
come from folders, embeddings go through the same embedding cache, and the new version is fp32
(``python -m training quantize`` adds an INT8 variant)."""

from __future__ import annotations

import hashlib
import logging
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from models.adapt import AdaptParams, adapt_head, check_adaptable, target_fingerprint
from models.errors import InputError
from models.extract import extract
from models.onnx_io import replace_head, verify_head
from models.preprocess import decode_image, preprocess_image
from store.labels import check_image
from store.registry import ModelVersion, graph_exporter, parent_model
from store.state import State

from .data import scan_source

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Adapted:
    version: str
    active: bool
    metrics: dict[str, Any]


def folder_images(folder: Path, *, max_pixels: int) -> dict[str, bytes]:
    """Every readable image under ``folder`` (recursively; other files skipped with a warning), by
    content: the same bytes twice are one image."""
    if not folder.is_dir():
        raise InputError(f"{folder} is not a folder of images")
    found: dict[str, bytes] = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")):
        try:
            checked = check_image(path.read_bytes(), max_pixels=max_pixels)
        except InputError as exc:
            log.warning("skipping %s: %s", path, exc)
            continue
        found[checked.image_id] = checked.data
    return found


def labelled_images(source: Path) -> tuple[dict[str, bytes], dict[str, str]]:
    """A labelled folder or CSV manifest by content: (bytes, label) per image id."""
    images: dict[str, bytes] = {}
    labels: dict[str, str] = {}
    for record in scan_source(source):
        data = record.path.read_bytes()
        image_id = hashlib.sha256(data).hexdigest()
        images[image_id], labels[image_id] = data, record.label
    return images, labels


def embed(state: State, version: ModelVersion, images: dict[str, bytes],
          threads: int) -> tuple[dict[str, np.ndarray], int]:
    """Embeddings of ``images`` with the version's graph, through the embedding cache, and how
    many were computed."""
    fingerprint = version.spec.backbone_fingerprint
    found = state.embeddings.get_many(list(images), fingerprint)
    missing = [i for i in images if i not in found]
    for batch, _, embeddings in extract(version.onnx_path, missing, images.__getitem__, version.spec.preprocess,
                                        workers=threads):
        computed = dict(zip(batch, embeddings, strict=True))
        state.embeddings.put_many(computed, fingerprint)
        found.update(computed)
    return found, len(missing)


def _stack(vectors: dict[str, np.ndarray], ids: Sequence[str], size: int) -> np.ndarray:
    return np.stack([vectors[i] for i in ids]) if ids else np.zeros((0, size), np.float32)


def adapt_folder(state: State, home: Path, version_name: str, data: Path, labelled: Path | None,
                 params: AdaptParams, *, max_pixels: int, threads: int) -> Adapted:
    """Register ``version_name`` adapted to the images in ``data``; it goes live if the gate on
    the ``labelled`` images (or ``force``) lets it."""
    started = time.perf_counter()
    parent = state.registry.get(version_name)
    model = parent_model(parent)
    targets = folder_images(data, max_pixels=max_pixels)
    check_adaptable(model, len(targets))
    judges, judge_labels = labelled_images(labelled) if labelled is not None else ({}, {})
    vectors, computed = embed(state, parent, {**targets, **judges}, threads)
    target_ids, judge_ids = sorted(targets), sorted(judges)
    size = parent.spec.embedding_size
    result = adapt_head(model, _stack(vectors, target_ids, size), _stack(vectors, judge_ids, size),
                        [judge_labels[i] for i in judge_ids], params)
    metrics = {**result.metrics, "target_fingerprint": target_fingerprint(target_ids),
               "embeddings_computed": computed, "embeddings_cached": len(vectors) - computed}
    with tempfile.TemporaryDirectory(dir=home) as tmp:
        onnx_path = Path(tmp) / "model.onnx"
        replace_head(parent.onnx_path, onnx_path, result.weight, result.bias)
        sample = np.stack([preprocess_image(decode_image(targets[i]), parent.spec.preprocess) for i in target_ids[:4]])
        metrics["head_check_max_diff"] = verify_head(onnx_path, result.weight, result.bias, sample)
        _, training_targets = parent.training_embeddings()
        version = state.registry.register(
            onnx_file=onnx_path, spec=parent.spec, metrics=metrics, embeddings=result.embeddings,
            embedding_targets=training_targets, embedding_hashes=parent.training_hashes(), parent=parent.version,
            dataset_fingerprint=None,
            details={"strategy": f"adapt-{params.method}", "exporter": graph_exporter(parent.info),
                     "job_params": params.model_dump(),
                     "target": {"fingerprint": metrics["target_fingerprint"], "images": len(target_ids)},
                     "seconds": round(time.perf_counter() - started, 2)},
        )
    if result.promote:
        state.registry.activate(version.version)
    metrics["seconds"] = round(time.perf_counter() - started, 2)
    return Adapted(version.version, result.promote, metrics)
