"""Labelled image sources: an ImageFolder-style directory (one subfolder per class) or a CSV
manifest (``path,label``; relative paths are relative to the CSV file).

Every image is decoded once, with the same decoder the service uses. Files that cannot be read
or are not images are skipped and counted, never fatal; what cannot be trained on at all (an
empty folder, a single class, a class with fewer than two images) raises :class:`DatasetError`.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import os
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import numpy as np
from PIL import Image

from models.errors import DatasetError, InputError
from models.preprocess import DEFAULT_MAX_PIXELS, decode_image

log = logging.getLogger(__name__)
T = TypeVar("T")

MIN_IMAGES_PER_CLASS = 2


@dataclass(frozen=True)
class ImageRecord:
    path: Path
    label: str


@dataclass
class LabelledImages:
    """Decoded, usable images with integer targets into ``classes`` (sorted label names)."""

    classes: list[str]
    paths: list[Path]
    targets: np.ndarray  # (N,) int64
    items: list  # one decoded item per path (what ``transform`` returned)
    content_hashes: list[str]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)

    def __len__(self) -> int:
        return len(self.paths)

    def class_counts(self) -> dict[str, int]:
        counts = np.bincount(self.targets, minlength=len(self.classes))
        return {c: int(n) for c, n in zip(self.classes, counts, strict=True)}

    def fingerprint(self) -> str:
        """sha256 over the sorted (content hash, label) pairs: same images, same labels, same
        fingerprint, whatever the file names or order."""
        pairs = sorted(zip(self.content_hashes, (self.classes[t] for t in self.targets), strict=True))
        return hashlib.sha256("\n".join(f"{h} {label}" for h, label in pairs).encode()).hexdigest()


def scan_source(source: str | os.PathLike[str]) -> list[ImageRecord]:
    """List the (path, label) records of a labelled folder or a CSV manifest."""
    root = Path(source)
    if root.is_file() and root.suffix.lower() == ".csv":
        return _scan_manifest(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: no such directory or CSV manifest")
    records = [
        ImageRecord(path, class_dir.name)
        for class_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        for path in sorted(class_dir.rglob("*"))
        if path.is_file() and not path.name.startswith(".")
    ]
    if not records:
        raise DatasetError(
            f"{root} holds no images: expected one subfolder per class, each with image files"
        )
    return records


def _scan_manifest(manifest: Path) -> list[ImageRecord]:
    records = []
    with manifest.open(newline="") as fh:
        for lineno, row in enumerate(csv.reader(fh), start=1):
            if not row or (lineno == 1 and [c.strip().lower() for c in row[:2]] == ["path", "label"]):
                continue
            if len(row) < 2 or not row[0].strip() or not row[1].strip():
                raise DatasetError(f"{manifest}:{lineno}: expected 'path,label', got {row!r}")
            path = Path(row[0].strip())
            records.append(ImageRecord(path if path.is_absolute() else manifest.parent / path, row[1].strip()))
    if not records:
        raise DatasetError(f"{manifest} lists no images")
    return records


def load_labelled(
    source: str | os.PathLike[str],
    transform: Callable[[Image.Image], T],
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    progress: bool = True,
    require_trainable: bool = True,
) -> LabelledImages:
    """Decode every image of ``source`` and apply ``transform`` to it (for example the eval
    preprocessing); skip unreadable files; unless told otherwise, check there is enough to
    train on."""
    from tqdm import tqdm

    records = scan_source(source)
    usable: list[tuple[ImageRecord, T, str]] = []
    skipped: list[tuple[str, str]] = []
    for record in tqdm(records, desc="reading images", unit="img", disable=not progress):
        try:
            data = record.path.read_bytes()
            item = transform(decode_image(data, max_pixels=max_pixels))
        except (OSError, InputError) as exc:
            skipped.append((str(record.path), str(exc)))
            log.warning("skipping %s: %s", record.path, exc)
            continue
        usable.append((record, item, hashlib.sha256(data).hexdigest()))
    classes = sorted({record.label for record, _, _ in usable})
    if require_trainable:
        check_trainable(Counter(record.label for record, _, _ in usable), source)
    elif not usable:
        raise DatasetError(f"{source}: no usable images")
    index = {label: i for i, label in enumerate(classes)}
    return LabelledImages(
        classes=classes,
        paths=[record.path for record, _, _ in usable],
        targets=np.array([index[record.label] for record, _, _ in usable], dtype=np.int64),
        items=[item for _, item, _ in usable],
        content_hashes=[digest for _, _, digest in usable],
        skipped=skipped,
    )


def check_trainable(counts: Counter[str] | dict[str, int], source: object) -> None:
    """Raise :class:`DatasetError` unless there are two or more classes, each with at least
    ``MIN_IMAGES_PER_CLASS`` usable images."""
    if not counts:
        raise DatasetError(f"{source}: no usable images")
    if len(counts) < 2:
        raise DatasetError(
            f"{source}: only one class ({next(iter(counts))}); a classifier needs at least two"
        )
    small = {label: n for label, n in counts.items() if n < MIN_IMAGES_PER_CLASS}
    if small:
        raise DatasetError(
            f"{source}: every class needs at least {MIN_IMAGES_PER_CLASS} usable images "
            f"(one to train on, one to validate); too few in {small}"
        )


def stratified_split(
    targets: Sequence[int] | np.ndarray, val_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, validation): about ``val_fraction`` of each class held out, at least one
    image per class on each side, reproducible for a given seed."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError("val_fraction must be between 0 and 1")
    targets = np.asarray(targets)
    rng = np.random.default_rng(seed)
    train: list[int] = []
    val: list[int] = []
    for cls in np.unique(targets):
        members = np.flatnonzero(targets == cls)
        rng.shuffle(members)
        if len(members) < 2:
            raise DatasetError(f"class {cls} has {len(members)} image(s); a split needs two")
        n_val = min(len(members) - 1, max(1, round(len(members) * val_fraction)))
        val.extend(members[:n_val])
        train.extend(members[n_val:])
    return np.sort(np.array(train, dtype=np.int64)), np.sort(np.array(val, dtype=np.int64))
