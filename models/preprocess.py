"""Image bytes to network input, with numpy and Pillow only (the service needs no torch).

:func:`decode_image` turns untrusted bytes into an upright RGB image (pixel limit checked on the
header before any pixel is decoded, EXIF orientation applied, every mode converted with its real
meaning; failures are :class:`~models.errors.InputError`, a 4xx in the service). Then the spec's
transform, computed two ways. :func:`preprocess_image`, the training transform, is timm's
centre-crop eval transform bit for bit: training, evaluation and the export and quantisation
checks use it. :func:`decode_and_crop`, the serving path (the service, and the retrain job's
embedding, so a head is fitted on the crops it will be served), makes the uint8 crop cheaply:
large JPEGs decoded at reduced scale, only the crop window resampled, within a level of the
exact crop on average (``tests/models/test_preprocess.py``; measured: bench/README.md). The choice
is the caller's, not a spec field: training must reproduce timm, serving may trade a fraction of
a level for CPU. :func:`normalisation_table` is the one place mean, std and 255 turn levels into
network input, looked up on the host (:func:`normalise_crops`) and inside the device graph
(:func:`models.onnx_io.pixels_input_graph`).
"""

from __future__ import annotations

import functools
import io
import logging
from dataclasses import dataclass

import numpy as np
from PIL import ExifTags, Image, JpegImagePlugin, UnidentifiedImageError

from models.errors import ImageDecodeError, ImageTooLargeError
from models.spec import PreprocessConfig

logger = logging.getLogger(__name__)

#: Default pixel-count limit for one decoded image (about a 7300 x 5500 photo).
DEFAULT_MAX_PIXELS = 40_000_000

#: Formats :func:`decode_image` accepts. Pillow would otherwise try every plugin it has on
#: untrusted bytes, including EPS (which shells out to Ghostscript) and rarely used decoders
#: with a history of CVEs; photos and screenshots come in these. (Multi-picture JPEGs from
#: phones, MPO, are opened by the JPEG plugin; naming "MPO" here would make Image.open raise.)
SUPPORTED_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "GIF", "WEBP", "AVIF", "BMP", "TIFF", "PPM")

# Our own limit (checked on the header size in decode_image) replaces Pillow's global
# MAX_IMAGE_PIXELS guard. Left in place, Pillow's check would fire first and refuse images that
# a configured max_pixels above its default (~89 M) allows, and toggling the global around each
# open would race between threads. Set once, here, at import.
Image.MAX_IMAGE_PIXELS = None

_RESAMPLE: dict[str, Image.Resampling] = {
    # The same PIL filters torchvision's InterpolationMode maps to for PIL images.
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}

# EXIF orientation -> the transpose that displays the image upright (as ImageOps.exif_transpose).
_EXIF_TRANSPOSE: dict[int, Image.Transpose] = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}

_GREY16_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N", "I"})
_PREMULTIPLIED_MODES = frozenset({"La", "RGBa"})

# A 1 x 100000 strip is a few hundred bytes as a PNG but would resize to 256 x 25.6 M pixels.
# When the resized image would exceed both bounds below, only the crop window is resampled.
# Everything else (any aspect ratio up to 16:1, and more for small crops) takes the full
# resize, which is bit-exact with torchvision.
_FULL_RESIZE_MAX_PIXELS = 4 * 1024 * 1024
_FULL_RESIZE_MAX_ASPECT = 16

#: Fast path: a JPEG is decoded at 1/2, 1/4 or 1/8 scale only while its shorter side stays at
#: least this many times the resize target (2 x 256 = 512 pixels for the default model), so the
#: final resample still reduces by 2x or more and keeps its anti-aliasing doing the real work.
FAST_DECODE_MARGIN = 2

#: Fast path: ``reducing_gap`` for :meth:`PIL.Image.Image.resize`: images more than this many
#: times the target size are first box-reduced by an integer factor (cheap), leaving at least this
#: ratio for the filter. Pillow documents 3.0 as indistinguishable from the plain resize in most
#: cases; it matters for large non-JPEG images (and JPEGs beyond what 1/8 scale covers).
FAST_REDUCING_GAP = 3.0

# Which edge of an image ends up where after each transpose: new (left, top, right, bottom)
# as indices into the old (left, top, right, bottom). Used to carry the part of a reduced-scale
# JPEG that holds the picture (its last row/column may be partly padding) through the EXIF
# transpose.
_EDGES_AFTER_TRANSPOSE: dict[Image.Transpose, tuple[int, int, int, int]] = {
    Image.Transpose.FLIP_LEFT_RIGHT: (2, 1, 0, 3),
    Image.Transpose.FLIP_TOP_BOTTOM: (0, 3, 2, 1),
    Image.Transpose.ROTATE_180: (2, 3, 0, 1),
    Image.Transpose.ROTATE_90: (1, 2, 3, 0),  # counter-clockwise: the top edge becomes the left
    Image.Transpose.ROTATE_270: (3, 0, 1, 2),  # clockwise: the left edge becomes the top
    Image.Transpose.TRANSPOSE: (1, 0, 3, 2),
    Image.Transpose.TRANSVERSE: (3, 2, 1, 0),
}
_SWAPS_AXES = frozenset({Image.Transpose.ROTATE_90, Image.Transpose.ROTATE_270,
                         Image.Transpose.TRANSPOSE, Image.Transpose.TRANSVERSE})


@dataclass(frozen=True)
class _Decoded:
    """An upright RGB image, possibly decoded at reduced scale.

    ``size`` is the upright size of the full-resolution picture (what the exact path would have
    decoded); ``content`` is the region of ``image``, in its own pixel coordinates, that holds
    that whole picture: ``(0, 0, width, height)`` unless the JPEG was decoded at 1/s scale with a
    size not divisible by s, where the last decoded row or column covers fewer source pixels.
    """

    image: Image.Image
    size: tuple[int, int]
    content: tuple[float, float, float, float]


def image_media_type(data: bytes) -> str:
    """The MIME type of image bytes from their header (``image/jpeg``...), or
    ``application/octet-stream`` if Pillow does not recognise them. Reads the header only."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            return Image.MIME.get(image.format or "", "application/octet-stream")
    except (OSError, ValueError, Image.DecompressionBombError):
        return "application/octet-stream"


def decode_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode untrusted image bytes into an upright RGB image.

    The pixel count in the header is checked against ``max_pixels`` before any pixel data is
    decoded. Multi-frame files (GIF, TIFF, APNG, MPO) yield their first frame. EXIF orientation
    is applied; an unreadable or nonsensical orientation leaves the image as stored.

    Raises:
        ImageDecodeError: empty, unrecognised, corrupt or truncated data, or an unconvertible mode.
        ImageTooLargeError: more than ``max_pixels`` pixels.
        ValueError: ``max_pixels`` is not positive.
    """
    return _decode(data, max_pixels=max_pixels, min_short_side=None).image


def _decode(data: bytes, *, max_pixels: int, min_short_side: int | None) -> _Decoded:
    """:func:`decode_image`; with ``min_short_side``, a JPEG whose shorter side is at least
    twice that is decoded at the smallest 1/2, 1/4 or 1/8 scale that keeps the shorter side at
    ``min_short_side`` or more (libjpeg scales while decoding: less work, less memory). Every
    check (pixel limit on the header size, corruption, EXIF, mode) is the same as without."""
    if max_pixels < 1:
        raise ValueError(f"max_pixels must be positive, got {max_pixels}")
    if not data:
        raise ImageDecodeError("the image is empty (0 bytes); send the file's contents")

    try:
        image = Image.open(io.BytesIO(data), formats=SUPPORTED_FORMATS)
    except UnidentifiedImageError as exc:
        raise ImageDecodeError(
            f"not a recognised image ({len(data):,} bytes starting {data[:16]!r}); "
            f"supported formats: {', '.join(SUPPORTED_FORMATS)}"
        ) from exc
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # Only reachable if something reset Image.MAX_IMAGE_PIXELS after our import (a warning
        # arrives here as an exception under warnings filter "error").
        raise ImageTooLargeError(f"image refused as too large: {exc}") from exc
    except MemoryError:
        raise
    except Exception as exc:
        # Plugins raise a zoo of types (SyntaxError, OSError, struct.error, ...) on malformed
        # headers; all of them mean the same thing to a caller.
        raise ImageDecodeError(f"the image header is corrupt: {exc}") from exc

    width, height = image.size
    if width * height > max_pixels:
        raise ImageTooLargeError(
            f"image is {width}x{height} = {width * height:,} pixels; "
            f"the limit is {max_pixels:,} pixels"
        )
    if width < 1 or height < 1:
        raise ImageDecodeError(f"image has no pixels ({width}x{height})")
    content = (0.0, 0.0, float(width), float(height))
    if (
        min_short_side is not None
        and isinstance(image, JpegImagePlugin.JpegImageFile)  # JPEG and MPO
        and min(width, height) >= 2 * min_short_side
    ):
        # Pillow picks the scale s in (8, 4, 2, 1) with s <= shorter side // min_short_side and
        # sizes the image ceil(width / s) x ceil(height / s); draft returns the region holding
        # the picture, (0, 0, width / s, height / s). None: the file cannot be drafted (several
        # tiles), decoded at full size as usual.
        drafted = image.draft(None, (min_short_side, min_short_side))
        if drafted is not None:
            _, _, right, bottom = drafted[1]
            content = (0.0, 0.0, float(right), float(bottom))
    try:
        # Force the full decode now so corruption and truncation surface here, as
        # ImageDecodeError, rather than later in resize.
        image.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageTooLargeError(f"image refused as too large: {exc}") from exc
    except MemoryError:
        raise
    except Exception as exc:
        raise ImageDecodeError(
            f"the {image.format} image ({width}x{height}) is corrupt or truncated: {exc}"
        ) from exc
    method = _exif_transpose_method(image)
    if method is None:
        return _Decoded(to_rgb(image), (width, height), content)
    left, top, right, bottom = content
    margins = (left, top, image.width - right, image.height - bottom)
    upright = image.transpose(method)
    new_left, new_top, new_right, new_bottom = (margins[i] for i in _EDGES_AFTER_TRANSPOSE[method])
    return _Decoded(
        to_rgb(upright),
        (height, width) if method in _SWAPS_AXES else (width, height),
        (new_left, new_top, upright.width - new_right, upright.height - new_bottom),
    )


def _exif_transpose_method(image: Image.Image) -> Image.Transpose | None:
    """The transpose that displays ``image`` upright as its EXIF (or XMP) orientation asks.

    Same mapping as ImageOps.exif_transpose, without its metadata rewriting (we keep pixels
    only) or its full copy of every image that needs no transpose.
    """
    try:
        orientation = image.getexif().get(ExifTags.Base.Orientation, 1)
    except MemoryError:
        raise
    except Exception as exc:  # noqa: BLE001 - any EXIF parsing failure means the same
        # Garbage EXIF must not make an otherwise good photo unusable.
        logger.warning("ignoring unreadable EXIF data (%s: %s)", type(exc).__name__, exc)
        return None
    method = _EXIF_TRANSPOSE.get(orientation) if isinstance(orientation, int) else None
    if method is None and orientation != 1:
        logger.warning("ignoring invalid EXIF orientation %r", orientation)
    return method


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB, keeping what the pixel values mean.

    Transparency (alpha bands, palette alpha, a ``transparency`` key) is composited onto white.
    16-bit greyscale is scaled from 0..65535 to 0..255 (Pillow's own ``convert`` clips it).
    Float (``F``) images in 0..1 are scaled to 0..255; otherwise taken as 0..255 and clipped.

    Raises:
        ImageDecodeError: the mode has no conversion to RGB.
    """
    mode = image.mode
    if mode == "RGB" and "transparency" not in image.info:
        return image
    if mode in _GREY16_MODES:
        return _grey16_to_rgb(image)
    if mode == "F":
        return _float_to_rgb(image)
    if mode in _PREMULTIPLIED_MODES:
        return _premultiplied_to_rgb(image)
    try:
        if image.has_transparency_data:
            return _composite_on_white(image.convert("RGBA"))
        return image.convert("RGB")
    except ValueError as exc:
        raise ImageDecodeError(f"cannot convert image mode {mode!r} to RGB: {exc}") from exc


def _composite_on_white(rgba: Image.Image) -> Image.Image:
    background = Image.new("RGB", rgba.size, (255, 255, 255))
    background.paste(rgba, mask=rgba.getchannel("A"))
    return background


def _grey16_to_rgb(image: Image.Image) -> Image.Image:
    # Pillow decodes 16-bit greyscale PNG/TIFF/PGM to I;16* (older versions: I). Mode I can
    # also hold 32-bit TIFF data; values outside the 16-bit range are clipped.
    values = np.asarray(image).astype(np.int64)
    if image.mode == "I":
        values = np.clip(values, 0, 65535)
    # Round to nearest: 65535 -> 255, 32768 -> 128 (never a tie: 257 is odd). fromarray infers
    # L from 2-D uint8 (and RGB from (H, W, 3) uint8); its mode argument is deprecated in some
    # Pillow versions, so it is never passed here.
    grey = Image.fromarray(((values + 128) // 257).astype(np.uint8))
    transparent = image.info.get("transparency")
    if isinstance(transparent, int):
        alpha = np.where(np.asarray(image) == transparent, 0, 255).astype(np.uint8)
        rgba = Image.merge("RGBA", (grey, grey, grey, Image.fromarray(alpha)))
        return _composite_on_white(rgba)
    return grey.convert("RGB")


def _float_to_rgb(image: Image.Image) -> Image.Image:
    values = np.nan_to_num(np.asarray(image, dtype=np.float32), nan=0.0, posinf=255.0, neginf=0.0)
    if values.size and values.min() >= 0.0 and values.max() <= 1.0:
        # Float images from scientific tools are normalised to 0..1; Pillow's own convert
        # would turn those all but black.
        values = values * 255.0
    grey = np.clip(np.rint(values), 0, 255).astype(np.uint8)
    return Image.fromarray(grey).convert("RGB")


def _premultiplied_to_rgb(image: Image.Image) -> Image.Image:
    # Pillow cannot convert La at all; for both, compositing premultiplied colour over white
    # is just colour + (255 - alpha), exact in integers.
    pixels = np.asarray(image).astype(np.int16)
    colour, alpha = pixels[..., :-1], pixels[..., -1:]
    rgb = np.broadcast_to(colour + (255 - alpha), (*pixels.shape[:2], 3))
    return Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8))


def _centre_crop_origin(size: int, crop: int) -> int:
    """Top (or left) of torchvision's CenterCrop window; negative where it pads with zeros."""
    if crop > size:
        return -((crop - size) // 2)
    return round((size - crop) / 2.0)  # Python's round, as torchvision: half to even


def _resized_size(width: int, height: int, resize_size: int) -> tuple[int, int]:
    """torchvision ``Resize(int)``: the shorter side becomes ``resize_size``, the longer one
    keeps the aspect ratio (truncated, as torchvision does)."""
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(resize_size * long / short)
    return (resize_size, new_long) if width <= height else (new_long, resize_size)


def _resample_crop_window(
    image: Image.Image,
    config: PreprocessConfig,
    size: tuple[int, int],
    content: tuple[float, float, float, float],
    *,
    reducing_gap: float | None,
) -> Image.Image:
    """Resize + centre crop computing only the crop window's pixels.

    The geometry (resized size, crop origin) is torchvision's for a picture of ``size``;
    ``content`` is where that picture lies in ``image`` (smaller than ``size`` when it was
    decoded at reduced scale), and the window is mapped into it.
    """
    new_w, new_h = _resized_size(*size, config.resize_size)
    crop = config.input_size
    left = _centre_crop_origin(new_w, crop)
    top = _centre_crop_origin(new_h, crop)
    x0, y0 = max(left, 0), max(top, 0)
    x1, y1 = min(left + crop, new_w), min(top + crop, new_h)
    content_left, content_top, content_right, content_bottom = content
    if (new_w, new_h) == image.size and content == (0.0, 0.0, *map(float, image.size)):
        window = image.crop((x0, y0, x1, y1))  # no resize at all: the exact pixels
    else:
        scale_x = (content_right - content_left) / new_w
        scale_y = (content_bottom - content_top) / new_h
        window = image.resize(
            (x1 - x0, y1 - y0),
            _RESAMPLE[config.interpolation],
            box=(
                content_left + x0 * scale_x,
                content_top + y0 * scale_y,
                content_left + x1 * scale_x,
                content_top + y1 * scale_y,
            ),
            reducing_gap=reducing_gap,
        )
    if (x0, y0, x1, y1) == (left, top, left + crop, top + crop):
        return window
    padded = Image.new("RGB", (crop, crop), (0, 0, 0))
    padded.paste(window, (x0 - left, y0 - top))
    return padded


def _exact_crop(image: Image.Image, config: PreprocessConfig) -> np.ndarray:
    """torchvision ``Resize(resize_size)`` then ``CenterCrop(input_size)``: uint8 (S, S, 3)."""
    width, height = image.size
    if width < 1 or height < 1:
        raise ImageDecodeError(f"image has no pixels ({width}x{height})")
    if image.mode != "RGB" or "transparency" in image.info:
        image = to_rgb(image)
    new_w, new_h = _resized_size(width, height, config.resize_size)
    crop = config.input_size
    left = _centre_crop_origin(new_w, crop)
    top = _centre_crop_origin(new_h, crop)

    new_short = config.resize_size
    budget = max(_FULL_RESIZE_MAX_PIXELS, _FULL_RESIZE_MAX_ASPECT * new_short * new_short)
    if new_w * new_h <= budget:
        resized = (
            image
            if (new_w, new_h) == (width, height)
            else image.resize((new_w, new_h), _RESAMPLE[config.interpolation])
        )
        # PIL fills the part of a crop box outside the image with zeros, which is exactly
        # torchvision's zero padding when the image is smaller than the crop.
        return np.asarray(resized.crop((left, top, left + crop, top + crop)))

    # Extreme aspect ratio: resample only the crop window, in source coordinates. Pillow's
    # filter still reads source pixels outside the box, but its filter positions and
    # fixed-point weights come out slightly differently, so pixels may differ from
    # crop-after-resize by a few levels (nearest: by one source pixel). Such images are far
    # from anything trained on; bounded memory matters more for them than bit-exactness.
    return np.asarray(_resample_crop_window(
        image, config, (width, height), (0.0, 0.0, float(width), float(height)), reducing_gap=None
    ))


def decode_and_crop(
    data: bytes, config: PreprocessConfig, *,
    max_pixels: int = DEFAULT_MAX_PIXELS, fast: bool = True,
) -> np.ndarray:
    """Image bytes -> uint8 crop (input_size, input_size, 3), the serving path: what the service
    sends between processes (a quarter of the network input's bytes) for :func:`normalise_crops`.

    The default, ``fast=True``, decodes a large JPEG at 1/2, 1/4 or 1/8 scale while its shorter
    side stays at least :data:`FAST_DECODE_MARGIN` times ``config.resize_size``, and resamples
    only the crop window with :data:`FAST_REDUCING_GAP`. ``fast=False`` gives the exact crop that
    :func:`preprocess_image` normalises, to measure the fast one against. Errors and messages are
    the same on both: the pixel limit applies to the header's size, whatever scale is decoded.
    """
    if not fast:
        return _exact_crop(decode_image(data, max_pixels=max_pixels), config)
    decoded = _decode(
        data, max_pixels=max_pixels, min_short_side=FAST_DECODE_MARGIN * config.resize_size
    )
    return np.asarray(_resample_crop_window(
        decoded.image, config, decoded.size, decoded.content, reducing_gap=FAST_REDUCING_GAP
    ))


def normalisation_table(config: PreprocessConfig) -> np.ndarray:
    """(3, 256) float32, read-only: the network input value of each 8-bit level, per channel.

    The one definition of the normalisation, ``(v / 255 - mean) / std`` in float32 as ``ToTensor``
    + ``Normalize`` compute it. The host (:func:`normalise_crops`) and the device graph
    (:func:`models.onnx_io.pixels_input_graph`) both look values up in it, so they cannot differ.
    """
    return _normalisation_table(config.mean, config.std)


@functools.lru_cache(maxsize=32)
def _normalisation_table(
    mean: tuple[float, float, float], std: tuple[float, float, float]
) -> np.ndarray:
    levels = np.arange(256, dtype=np.float32) / np.float32(255.0)
    mean_arr, std_arr = (np.asarray(v, dtype=np.float32)[:, None] for v in (mean, std))
    table = (levels[None, :] - mean_arr) / std_arr
    table.setflags(write=False)
    return table


def normalise_crops(crops: np.ndarray, config: PreprocessConfig) -> np.ndarray:
    """uint8 crops (N, S, S, 3) -> the network input, float32 (N, 3, S, S), by
    :func:`normalisation_table` (one gather per channel instead of three float passes)."""
    if crops.dtype != np.uint8 or crops.ndim != 4 or crops.shape[3] != 3:
        raise ValueError(f"expected uint8 crops (N, S, S, 3), got {crops.dtype} {crops.shape}")
    table = normalisation_table(config)
    out = np.empty((crops.shape[0], 3, crops.shape[1], crops.shape[2]), dtype=np.float32)
    for channel in range(3):
        # mode="clip" lets take() write straight into `out` (indices are 0..255 anyway).
        np.take(table[channel], crops[..., channel], out=out[:, channel], mode="clip")
    return out


def preprocess_image(image: Image.Image, config: PreprocessConfig) -> np.ndarray:
    """The training transform: resize, centre-crop and normalise ``image`` as timm's eval
    transform does. Returns a C-contiguous float32 array (3, input_size, input_size); non-RGB
    images are converted with :func:`to_rgb` first."""
    return normalise_crops(_exact_crop(image, config)[None], config)[0]
