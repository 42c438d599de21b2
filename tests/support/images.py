"""Images for tests: the real photos (the hymenoptera folder's helpers) and small images made in
memory, each kind written once."""

from __future__ import annotations

import hashlib
import io
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image


def jpeg_files(root: Path, label: str) -> list[Path]:
    """The JPEGs of one class folder of an ImageFolder layout, sorted by name."""
    return sorted((root / label).glob("*.jpg"))


def make_subset(source: Path, dest: Path, per_class: int, offset: int = 0) -> Path:
    """A labelled folder of symlinks to ``per_class`` real photos of each class."""
    for class_dir in sorted(p for p in source.iterdir() if p.is_dir()):
        target = dest / class_dir.name
        target.mkdir(parents=True, exist_ok=True)
        for photo in jpeg_files(source, class_dir.name)[offset : offset + per_class]:
            (target / photo.name).symlink_to(photo)
    return dest


def small_photos(root: Path, label: str, start: int, count: int, max_bytes: int = 250_000) -> list[bytes]:
    """``count`` real photos of ``label`` under ``max_bytes`` each, from the ``start``-th on
    (tests take disjoint ranges so that each sees only its own images)."""
    small = [p.read_bytes() for p in jpeg_files(root, label) if p.stat().st_size <= max_bytes]
    chosen = small[start : start + count]
    assert len(chosen) == count, f"not enough {label} photos under {max_bytes} bytes"
    return chosen


def encode(image: Image.Image, fmt: str, **params: Any) -> bytes:
    """``image`` saved in format ``fmt`` (Pillow's save options as keywords)."""
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def png_chunk(kind: bytes, body: bytes) -> bytes:
    """One PNG chunk (length, type, data, CRC), for PNGs built by hand."""
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def noise_png(width: int, height: int, seed: int = 0, **params: Any) -> bytes:
    """A PNG of random pixels: distinct bytes for each seed (``compress_level=0``: about
    3 * width * height bytes, incompressible)."""
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return encode(Image.fromarray(pixels), "PNG", **params)


def blank_png(width: int, height: int, mode: str = "RGB") -> bytes:
    """A PNG of one colour (Pillow's default, black) in ``mode``: tiny on disk whatever its size."""
    return encode(Image.new(mode, (width, height)), "PNG")


def grey_png(level: int, side: int = 8) -> bytes:
    """A flat grey RGB square."""
    return encode(Image.new("RGB", (side, side), (level, level, level)), "PNG")


#: colours of the solid-colour photos: a model whose embedding is the mean colour tells them apart
COLOURS = {"red": (230, 20, 20), "blue": (20, 20, 230), "green": (20, 230, 20)}


def colour_photo(colour: tuple[int, int, int], seed: int) -> bytes:
    """A solid-colour 8x8 PNG with a little noise, so every one has its own bytes (and hash)."""
    rng = np.random.default_rng(seed)
    pixels = np.clip(np.array(colour) + rng.integers(-15, 16, size=(8, 8, 3)), 0, 255).astype(np.uint8)
    return encode(Image.fromarray(pixels), "PNG")


def colour_photos(colour: str, n: int, *, held: bool | None = None, start: int = 0) -> list[bytes]:
    """``n`` photos of a colour of :data:`COLOURS`; with ``held`` given, only ones on that side of
    the retrain's fixed held-out split."""
    from models.retrain import is_held_out

    out: list[bytes] = []
    seed = start
    while len(out) < n:
        data = colour_photo(COLOURS[colour], seed)
        seed += 1
        if held is None or is_held_out(hashlib.sha256(data).hexdigest()) == held:
            out.append(data)
    return out
