"""Photos moved into another domain: five corruptions of an RGB image, each at two severities,
with Pillow and numpy only. The tests use them to make "new domain" uploads; the domain
adaptation benchmark (``bench/adapt_bench.py``) scores adaptation under each.

- ``contrast``: each channel's pixels pulled towards that channel's mean, their distance from it
  kept at half (mild) or a quarter (strong);
- ``fog``: the image blended with flat grey, 70 % image (mild) or 45 % (strong);
- ``noise``: additive Gaussian noise of standard deviation 20 (mild) or 40 (strong) levels, drawn
  from ``seed``, so the same call gives the same pixels;
- ``blur``: Gaussian blur of radius 2 (mild) or 4 (strong) pixels;
- ``jpeg``: re-encoded as a JPEG of quality 20 (mild) or 8 (strong).
"""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Literal

import numpy as np
from PIL import Image, ImageFilter

from models.preprocess import decode_image
from tests.support.images import encode

Severity = Literal["mild", "strong"]
SEVERITIES: tuple[Severity, ...] = ("mild", "strong")
GREY = 128.0


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.float32)


def _image(pixels: np.ndarray) -> Image.Image:
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8))


def contrast(image: Image.Image, level: float, seed: int) -> Image.Image:
    x = _pixels(image)
    mean = x.mean(axis=(0, 1), keepdims=True)
    return _image(mean + level * (x - mean))


def fog(image: Image.Image, level: float, seed: int) -> Image.Image:
    return _image(level * _pixels(image) + (1.0 - level) * GREY)


def noise(image: Image.Image, level: float, seed: int) -> Image.Image:
    x = _pixels(image)
    return _image(x + np.random.default_rng(seed).normal(0.0, level, x.shape))


def blur(image: Image.Image, level: float, seed: int) -> Image.Image:
    return image.convert("RGB").filter(ImageFilter.GaussianBlur(level))


def jpeg(image: Image.Image, level: float, seed: int) -> Image.Image:
    data = encode(image.convert("RGB"), "JPEG", quality=int(level))
    return Image.open(io.BytesIO(data)).convert("RGB")


#: name -> (corruption(image, level, seed), {severity: level})
CORRUPTIONS: dict[str, tuple[Callable[[Image.Image, float, int], Image.Image], dict[Severity, float]]] = {
    "contrast": (contrast, {"mild": 0.5, "strong": 0.25}),
    "fog": (fog, {"mild": 0.70, "strong": 0.45}),
    "noise": (noise, {"mild": 20.0, "strong": 40.0}),
    "blur": (blur, {"mild": 2.0, "strong": 4.0}),
    "jpeg": (jpeg, {"mild": 20.0, "strong": 8.0}),
}


def corrupt(image: Image.Image, name: str, severity: Severity, seed: int = 0) -> Image.Image:
    """``image`` (any mode; the result is RGB, same size) under corruption ``name`` of
    :data:`CORRUPTIONS` at ``severity``; ``seed`` draws the noise (the others ignore it)."""
    if name not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {name!r}; known: {', '.join(CORRUPTIONS)}")
    function, levels = CORRUPTIONS[name]
    if severity not in levels:
        raise ValueError(f"unknown severity {severity!r}; known: {', '.join(SEVERITIES)}")
    return function(image, levels[severity], seed)


def corrupt_bytes(data: bytes, name: str, severity: Severity, seed: int = 0, *,
                  fmt: Literal["JPEG", "PNG"] = "PNG") -> bytes:
    """Image bytes decoded as the service decodes them (upright RGB), corrupted by
    :func:`corrupt`, and encoded as ``fmt``: PNG keeps the corrupted pixels exactly; JPEG (quality
    95) is smaller and adds a little compression of its own."""
    corrupted = corrupt(decode_image(data), name, severity, seed)
    return encode(corrupted, fmt, **({"quality": 95} if fmt == "JPEG" else {}))
