"""``models/preprocess.py``, unit level: timm parity, mode conversion, EXIF, limits, errors, and
the fast path against the exact one (on every hymenoptera photo, and with the bootstrap model).

The parity tests compare against timm's own eval transform, so they fail if our resize, crop or
normalisation drifts from what the network was trained with. Every other test builds its images
in memory with Pillow (or writes a PNG by hand) and checks actual pixel values.
"""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from models.errors import ImageDecodeError, ImageTooLargeError
from models.preprocess import (
    DEFAULT_MAX_PIXELS,
    decode_and_crop,
    decode_image,
    image_media_type,
    normalisation_table,
    normalise_crops,
    preprocess_image,
    to_rgb,
)
from models.spec import PreprocessConfig
from tests.support.images import encode, png_chunk

# ---------------------------------------------------------------------------------- helpers


def handmade_png(width: int, height: int, bit_depth: int, colour_type: int, idat: bytes) -> bytes:
    """A PNG built byte by byte, for things Pillow will not write (16-bit RGB, bogus sizes)."""
    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", header)
        + png_chunk(b"IDAT", idat)
        + png_chunk(b"IEND", b"")
    )


def sample_photos(hymenoptera: Path) -> list[Path]:
    return [
        *sorted(hymenoptera.glob("ants/*.jpg"))[:3],
        *sorted(hymenoptera.glob("bees/*.jpg"))[:3],
    ]


@pytest.fixture(scope="module")
def photo_bytes(hymenoptera: Path) -> bytes:
    return sample_photos(hymenoptera)[0].read_bytes()


def rgb_pixels(data: bytes) -> np.ndarray:
    image = decode_image(data)
    assert image.mode == "RGB"
    return np.asarray(image).astype(int)


# ------------------------------------------------------------------------- parity with timm


@pytest.fixture(scope="module")
def reference_photos(hymenoptera: Path) -> list[tuple[str, Image.Image]]:
    skimage_data = pytest.importorskip("skimage.data")
    photos = [(p.name, decode_image(p.read_bytes())) for p in sample_photos(hymenoptera)]
    photos.append(("chelsea", Image.fromarray(skimage_data.chelsea())))
    photos.append(("coffee", Image.fromarray(skimage_data.coffee())))
    rng = np.random.default_rng(0)
    # Noise at odd sizes exercises the rounding of resize lengths and crop offsets.
    for height, width in [(301, 257), (257, 301), (1, 1), (3, 97), (225, 224)]:
        noise = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        photos.append((f"noise {width}x{height}", Image.fromarray(noise)))
    return photos


@pytest.mark.parametrize(
    ("input_size", "crop_pct", "interpolation"),
    [
        (224, 0.875, "bicubic"),
        (192, 0.95, "bilinear"),
        (160, 1.0, "nearest"),
        (224, 0.9, "lanczos"),
    ],
)
def test_matches_timm_eval_transform(
    input_size: int,
    crop_pct: float,
    interpolation: str,
    reference_photos: list[tuple[str, Image.Image]],
) -> None:
    timm_data = pytest.importorskip("timm.data")
    config = PreprocessConfig(
        input_size=input_size,
        crop_pct=crop_pct,
        interpolation=interpolation,
        mean=(0.5, 0.45, 0.4) if interpolation == "bilinear" else (0.485, 0.456, 0.406),
    )
    reference = timm_data.create_transform(
        input_size=input_size,
        interpolation=interpolation,
        crop_pct=crop_pct,
        mean=config.mean,
        std=config.std,
        crop_mode="center",
    )
    for name, photo in reference_photos:
        ours = preprocess_image(photo, config)
        assert ours.shape == (3, input_size, input_size), name
        assert ours.dtype == np.float32 and ours.flags.c_contiguous, name
        expected = reference(photo).numpy()
        np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-5, err_msg=name)


def test_extreme_aspect_ratio_stays_close_to_timm_without_a_huge_resize() -> None:
    timm_data = pytest.importorskip("timm.data")
    config = PreprocessConfig()
    reference = timm_data.create_transform(
        input_size=224,
        interpolation="bicubic",
        crop_pct=0.875,
        crop_mode="center",
        mean=config.mean,
        std=config.std,
    )
    # A smooth 2 x 300 strip: the full resize would be 256 x 38400 pixels. Our crop-window
    # resize may differ by rounding, but not in substance.
    ramp = np.linspace(0, 255, 300, dtype=np.float32)[:, None, None] * np.ones((1, 2, 3))
    strip = Image.fromarray(ramp.astype(np.uint8))
    ours = preprocess_image(strip, config)
    np.testing.assert_allclose(ours, reference(strip).numpy(), rtol=0, atol=0.1)

    # A 1 x 100000 strip would be 256 x 25.6 M pixels if resized whole.
    tall = Image.new("RGB", (1, 100_000), (10, 200, 30))
    out = preprocess_image(tall, config)
    expected = (np.array([10, 200, 30]) / 255 - np.array(config.mean)) / np.array(config.std)
    np.testing.assert_allclose(out[:, 112, 112], expected, atol=1e-5)


def test_normalisation_and_layout() -> None:
    config = PreprocessConfig(
        input_size=8, crop_pct=1.0, mean=(0.1, 0.2, 0.3), std=(0.5, 0.25, 2.0)
    )
    image = Image.new("RGB", (8, 8), (255, 0, 51))
    out = preprocess_image(image, config)
    assert out.shape == (3, 8, 8)
    np.testing.assert_allclose(out[0], (1.0 - 0.1) / 0.5, atol=1e-6)
    np.testing.assert_allclose(out[1], (0.0 - 0.2) / 0.25, atol=1e-6)
    np.testing.assert_allclose(out[2], (0.2 - 0.3) / 2.0, atol=1e-6)


def test_one_pixel_image() -> None:
    data = encode(Image.new("RGB", (1, 1), (200, 100, 50)), "PNG")
    out = preprocess_image(decode_image(data), PreprocessConfig())
    assert out.shape == (3, 224, 224)
    assert out.dtype == np.float32
    assert np.isfinite(out).all()
    assert np.ptp(out, axis=(1, 2)).max() == 0  # one colour stretched over the whole crop


def test_non_rgb_image_given_to_preprocess_image_is_converted() -> None:
    config = PreprocessConfig(input_size=4, crop_pct=1.0)
    grey = preprocess_image(Image.new("L", (4, 4), 128), config)
    rgb = preprocess_image(Image.new("RGB", (4, 4), (128, 128, 128)), config)
    np.testing.assert_array_equal(grey, rgb)


def test_centre_crop_pads_with_zeros_like_torchvision() -> None:
    # Unreachable through a valid PreprocessConfig (crop_pct <= 1 keeps the resized image at
    # least as large as the crop), so the helper is checked directly against torchvision.
    functional = pytest.importorskip("torchvision.transforms.functional")
    from models.preprocess import _centre_crop_origin

    rng = np.random.default_rng(1)
    image = Image.fromarray(rng.integers(1, 256, (5, 8, 3), dtype=np.uint8))
    for crop in (6, 7, 9, 10):
        left, top = _centre_crop_origin(8, crop), _centre_crop_origin(5, crop)
        ours = np.asarray(image.crop((left, top, left + crop, top + crop)))
        expected = np.asarray(functional.center_crop(image, [crop, crop]))
        np.testing.assert_array_equal(ours, expected)


# --------------------------------------------------------------------------- mode conversion


def test_bilevel_and_greyscale() -> None:
    bilevel = Image.new("1", (2, 1))
    bilevel.putpixel((1, 0), 1)
    assert rgb_pixels(encode(bilevel, "PNG")).tolist() == [[[0, 0, 0], [255, 255, 255]]]
    grey = Image.new("L", (2, 1))
    grey.putdata([7, 200])
    assert rgb_pixels(encode(grey, "PNG")).tolist() == [[[7, 7, 7], [200, 200, 200]]]


@pytest.mark.parametrize("fmt", ["PNG", "GIF"])
def test_palette_with_and_without_transparency(fmt: str) -> None:
    palette = Image.new("P", (2, 1))
    palette.putpalette([255, 0, 0, 0, 0, 255])
    palette.putdata([0, 1])
    assert rgb_pixels(encode(palette, fmt)).tolist() == [[[255, 0, 0], [0, 0, 255]]]
    # Index 1 transparent: it must come out white, not its palette colour or black.
    assert rgb_pixels(encode(palette, fmt, transparency=1)).tolist() == [
        [[255, 0, 0], [255, 255, 255]]
    ]


def test_palette_with_alpha_palette() -> None:
    rgba = Image.new("RGBA", (2, 1))
    rgba.putdata([(0, 255, 0, 255), (0, 255, 0, 0)])
    quantised = rgba.quantize()
    assert quantised.mode == "P"
    assert np.asarray(to_rgb(quantised)).tolist() == [[[0, 255, 0], [255, 255, 255]]]


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_alpha_is_composited_on_white(mode: str) -> None:
    image = Image.new("RGBA", (3, 1))
    image.putdata([(0, 0, 0, 255), (0, 0, 0, 0), (0, 0, 0, 128)])
    pixels = rgb_pixels(encode(image.convert(mode), "PNG"))
    assert pixels[0, 0].tolist() == [0, 0, 0]
    assert pixels[0, 1].tolist() == [255, 255, 255]
    assert np.abs(pixels[0, 2] - 127).max() <= 1  # half-transparent black over white


def test_palette_alpha_mode_pa() -> None:
    image = Image.new("PA", (2, 1))
    image.putpalette([255, 0, 0])
    image.putdata([(0, 255), (0, 0)])
    assert np.asarray(to_rgb(image)).tolist() == [[[255, 0, 0], [255, 255, 255]]]
    tiff = encode(image, "TIFF")
    assert rgb_pixels(tiff).tolist() == [[[255, 0, 0], [255, 255, 255]]]


def test_premultiplied_alpha_modes() -> None:
    half = Image.new("RGBA", (1, 1), (255, 0, 0, 128))
    # Premultiplied red at alpha 128 over white: 128 + 127 red, 0 + 127 green/blue.
    assert np.asarray(to_rgb(half.convert("RGBa"))).tolist() == [[[255, 127, 127]]]
    grey = Image.frombytes("La", (1, 1), bytes([64, 128]))
    assert np.asarray(to_rgb(grey)).tolist() == [[[191, 191, 191]]]


def test_rgb_with_transparent_colour_key() -> None:
    image = Image.new("RGB", (2, 1), (1, 2, 3))
    image.putpixel((0, 0), (9, 9, 9))
    pixels = rgb_pixels(encode(image, "PNG", transparency=(1, 2, 3)))
    assert pixels.tolist() == [[[9, 9, 9], [255, 255, 255]]]


@pytest.mark.parametrize("fmt", ["JPEG", "TIFF"])
def test_cmyk(fmt: str) -> None:
    image = Image.new("CMYK", (8, 8), (255, 0, 0, 0))  # pure cyan
    pixels = rgb_pixels(encode(image, fmt, **({"quality": 95} if fmt == "JPEG" else {})))
    assert np.abs(pixels - np.array([0, 255, 255])).max() <= 3
    black = rgb_pixels(encode(Image.new("CMYK", (8, 8), (0, 0, 0, 255)), fmt))
    assert black.max() <= 3


def test_ycbcr() -> None:
    red = Image.new("RGB", (8, 8), (255, 0, 0)).convert("YCbCr")
    assert red.mode == "YCbCr"
    assert np.abs(np.asarray(to_rgb(red)).astype(int) - [255, 0, 0]).max() <= 2
    tiff = encode(red, "TIFF")
    assert np.abs(rgb_pixels(tiff) - [255, 0, 0]).max() <= 2


GREY16 = np.array([[0, 257, 32768, 65535]], dtype=np.uint16)
GREY16_AS_8 = [0, 1, 128, 255]


@pytest.mark.parametrize(("mode", "fmt"), [("I;16", "PNG"), ("I;16B", "TIFF"), ("I;16", "TIFF")])
def test_sixteen_bit_greyscale_is_scaled_not_clipped(mode: str, fmt: str) -> None:
    raw = GREY16.astype(">u2" if mode == "I;16B" else "<u2").tobytes()
    image = Image.frombytes(mode, (4, 1), raw)
    pixels = rgb_pixels(encode(image, fmt))
    assert pixels[0, :, 0].tolist() == GREY16_AS_8
    assert (pixels == pixels[..., :1]).all()  # grey stays grey


def test_thirty_two_bit_int_mode_i() -> None:
    image = Image.fromarray(GREY16.astype(np.int32))
    assert image.mode == "I"
    assert rgb_pixels(encode(image, "TIFF"))[0, :, 0].tolist() == GREY16_AS_8


def test_sixteen_bit_greyscale_png_transparency() -> None:
    image = Image.frombytes("I;16", (4, 1), GREY16.astype("<u2").tobytes())
    pixels = rgb_pixels(encode(image, "PNG", transparency=257))
    assert pixels[0, :, 0].tolist() == [0, 255, 128, 255]


def test_float_mode() -> None:
    unit = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32))
    assert unit.mode == "F"
    assert rgb_pixels(encode(unit, "TIFF"))[0, :, 0].tolist() == [0, 128, 255]
    byte_range = Image.fromarray(np.array([[-3.0, 100.0, 300.0]], dtype=np.float32))
    assert rgb_pixels(encode(byte_range, "TIFF"))[0, :, 0].tolist() == [0, 100, 255]


def test_sixteen_bit_rgb_png() -> None:
    # Pillow will not write 16-bit RGB, so build one: two pixels, 0xFFFF/0x8000/0x0000 and black.
    row = b"\x00" + struct.pack(">6H", 0xFFFF, 0x8000, 0x0000, 0, 0, 0)
    data = handmade_png(2, 1, 16, 2, zlib.compress(row))
    pixels = rgb_pixels(data)
    assert np.abs(pixels[0, 0] - [255, 128, 0]).max() <= 1
    assert pixels[0, 1].tolist() == [0, 0, 0]


def test_lab_and_hsv_are_converted() -> None:
    white = Image.new("LAB", (1, 1), (255, 128, 128))
    assert np.abs(np.asarray(to_rgb(white)).astype(int) - 255).max() <= 2
    red = Image.new("HSV", (1, 1), (0, 255, 255))
    assert np.asarray(to_rgb(red)).tolist() == [[[255, 0, 0]]]


def test_first_frame_of_animated_gif() -> None:
    frames = [Image.new("RGB", (4, 4), colour) for colour in [(255, 0, 0), (0, 0, 255)]]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:], duration=10)
    assert rgb_pixels(buffer.getvalue())[0, 0].tolist() == [255, 0, 0]


def test_first_page_of_multipage_tiff() -> None:
    pages = [Image.new("L", (4, 4), value) for value in (10, 240)]
    buffer = io.BytesIO()
    pages[0].save(buffer, "TIFF", save_all=True, append_images=pages[1:])
    assert rgb_pixels(buffer.getvalue())[0, 0].tolist() == [10, 10, 10]


# ------------------------------------------------------------------------------ orientation


def jpeg_with_orientation(orientation: int) -> bytes:
    # 40 wide, 20 high, a red block in the stored top-left corner.
    image = Image.new("RGB", (40, 20), (255, 255, 255))
    image.paste((255, 0, 0), (0, 0, 10, 10))
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(image, "JPEG", quality=95, exif=exif.tobytes())


def is_red(pixel: np.ndarray) -> bool:
    return bool(pixel[0] > 200 and pixel[1] < 60 and pixel[2] < 60)


def test_exif_orientation_6_rotates_clockwise() -> None:
    image = decode_image(jpeg_with_orientation(6))
    assert image.size == (20, 40)
    pixels = np.asarray(image)
    # Rotating 90 degrees clockwise moves the top-left corner to the top-right.
    assert is_red(pixels[2, 17])
    assert not is_red(pixels[2, 2])


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_agrees_with_pillow(orientation: int) -> None:
    data = jpeg_with_orientation(orientation)
    expected = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
    np.testing.assert_array_equal(np.asarray(decode_image(data)), np.asarray(expected))


@pytest.mark.parametrize("orientation", [0, 9, 99, 65535])
def test_bogus_exif_orientation_is_ignored(orientation: int) -> None:
    image = decode_image(jpeg_with_orientation(orientation))
    assert image.size == (40, 20)
    assert is_red(np.asarray(image)[2, 2])


GARBAGE_EXIF = b"MM\x00\x2a\xff\xff\xff\xffgarbage"


def test_garbage_exif_block_is_ignored() -> None:
    # PNG keeps EXIF unparsed until we ask for the orientation; Pillow's complaint (a warning,
    # an exception under this suite's filterwarnings=error) must not cost us the image.
    image = Image.new("RGB", (40, 20), (0, 128, 0))
    image.putpixel((0, 0), (255, 0, 0))
    decoded = decode_image(encode(image, "PNG", exif=GARBAGE_EXIF))
    assert decoded.size == (40, 20)
    assert np.asarray(decoded)[0, 0].tolist() == [255, 0, 0]


# Pillow's JPEG plugin parses EXIF inside Image.open (for the DPI) and warns there; in
# production that warning is only printed, which is what this marker reproduces.
@pytest.mark.filterwarnings("ignore:Corrupt EXIF data:UserWarning")
def test_garbage_exif_block_in_jpeg_is_ignored() -> None:
    image = Image.new("RGB", (40, 20), (0, 128, 0))
    data = encode(image, "JPEG", exif=b"Exif\x00\x00" + GARBAGE_EXIF)
    assert decode_image(data).size == (40, 20)


# --------------------------------------------------------------------------- size limits


def test_pixel_bomb_is_refused_from_the_header() -> None:
    # A real, valid 1-bit 20000 x 20000 PNG (400 M pixels) that compresses to ~50 KB.
    compressor = zlib.compressobj(9)
    row = bytes(1 + 20_000 // 8)
    idat = b"".join(compressor.compress(row * 1000) for _ in range(20)) + compressor.flush()
    bomb = handmade_png(20_000, 20_000, 1, 0, idat)
    assert len(bomb) < 200_000
    with pytest.raises(ImageTooLargeError, match=r"20000x20000.*10,000,000"):
        decode_image(bomb, max_pixels=10_000_000)


def test_size_is_checked_before_decoding() -> None:
    # The header claims 100000 x 100000 but the pixel data is one byte: decoding would fail
    # (or try to allocate 10 G pixels), so getting ImageTooLargeError proves we never decoded.
    claim = handmade_png(100_000, 100_000, 8, 2, zlib.compress(b"\x00"))
    with pytest.raises(ImageTooLargeError, match="100000x100000"):
        decode_image(claim)
    with pytest.raises(ImageTooLargeError):
        decode_and_crop(claim, PreprocessConfig())


def test_small_limit_on_a_normal_photo(photo_bytes: bytes) -> None:
    data = photo_bytes
    width, height = decode_image(data).size
    with pytest.raises(ImageTooLargeError, match=f"{width}x{height}.*limit is 1,000 pixels"):
        decode_image(data, max_pixels=1000)
    assert decode_image(data, max_pixels=width * height).size == (width, height)


def test_our_limit_replaces_pillows_global_one(monkeypatch: pytest.MonkeyPatch) -> None:
    data = encode(Image.new("RGB", (100, 100)), "PNG")
    # Our import disabled Pillow's global guard: our limit (default or raised) is the one in force.
    assert Image.MAX_IMAGE_PIXELS is None
    assert decode_image(data, max_pixels=DEFAULT_MAX_PIXELS * 10).size == (100, 100)
    # Should something re-enable it, Pillow's refusal still reaches callers as ours.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(ImageTooLargeError):
        decode_image(data)


def test_max_pixels_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_pixels"):
        decode_image(encode(Image.new("RGB", (1, 1)), "PNG"), max_pixels=0)


# ------------------------------------------------------------------------- decode errors


def test_empty_bytes() -> None:
    with pytest.raises(ImageDecodeError, match="empty"):
        decode_image(b"")


def test_random_bytes() -> None:
    noise = np.random.default_rng(2).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    with pytest.raises(ImageDecodeError, match=r"not a recognised image.*supported formats"):
        decode_image(noise)


def test_text_file() -> None:
    with pytest.raises(ImageDecodeError, match=r"not a recognised image.*hello"):
        decode_image(b"hello, this is not a picture\n")


def test_truncated_jpeg(photo_bytes: bytes) -> None:
    data = photo_bytes
    with pytest.raises(ImageDecodeError, match=r"JPEG.*corrupt or truncated"):
        decode_image(data[: len(data) // 2])


def test_truncated_png() -> None:
    noise = np.random.default_rng(3).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    data = encode(Image.fromarray(noise), "PNG")
    with pytest.raises(ImageDecodeError, match="PNG"):
        decode_image(data[: len(data) // 2])


def test_format_outside_the_allowed_list_is_refused() -> None:
    icon = encode(Image.new("RGB", (16, 16)), "ICO")
    assert Image.open(io.BytesIO(icon)).format == "ICO"  # Pillow itself would read it
    with pytest.raises(ImageDecodeError, match="supported formats"):
        decode_image(icon)


def test_errors_are_input_errors() -> None:
    # The service maps InputError (a ValueError) to 4xx; decode errors must stay inside it.
    from models.errors import InputError

    with pytest.raises(InputError):
        decode_image(b"xx")


# ------------------------------------------------------------------------- normalisation


def test_normalised_batch_shape_dtype_and_order() -> None:
    config = PreprocessConfig(input_size=32, crop_pct=1.0)
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    items = [encode(Image.new("RGB", (40, 30), colour), "PNG") for colour in colours]
    batch = normalise_crops(np.stack([decode_and_crop(data, config) for data in items]), config)
    assert batch.shape == (3, 3, 32, 32)
    assert batch.dtype == np.float32 and batch.flags.c_contiguous
    for index in range(len(items)):
        assert batch[index, :, 16, 16].argmax() == index  # the channel that is lit


def test_crop_then_normalise_equals_preprocess_image_exactly(hymenoptera: Path) -> None:
    """The service sends uint8 crops between processes and normalises in the inference worker:
    on the exact crop, the result must be bit-identical to the training transform's."""
    config = PreprocessConfig(input_size=224, crop_pct=0.875, interpolation="bicubic", mean=(0.5,) * 3, std=(0.5,) * 3)
    blobs = [p.read_bytes() for p in sorted((hymenoptera / "bees").glob("*.jpg"))[:3]]
    crops = np.stack([decode_and_crop(data, config, fast=False) for data in blobs])
    assert crops.dtype == np.uint8 and crops.shape == (3, 224, 224, 3)
    expected = np.stack([preprocess_image(decode_image(data), config) for data in blobs])
    np.testing.assert_array_equal(normalise_crops(crops, config), expected)
    with pytest.raises(ValueError, match="uint8 crops"):
        normalise_crops(crops.astype(np.float32), config)
    table = normalisation_table(config)  # shared by every caller: nobody may change it
    assert table.shape == (3, 256) and table.dtype == np.float32 and not table.flags.writeable


# ------------------------------------------------------- fast path (the service's) vs exact
#
# The service decodes with fast=True (reduced-scale JPEG decoding, reducing_gap, crop-window
# resampling); training and evaluation use the exact path above. The bound: the mean absolute
# difference of the uint8 crops stays under 1 level (of 255) per image. For scale, re-saving a
# hymenoptera photo as JPEG quality 95 moves its exact crop by 1.7 levels on average (0.5 to 3.3;
# bench/preprocess_bench.py prints it), and a crop misplaced by one pixel moves a photo by several
# levels, so the bound separates "resampled a little differently" from "wrong".

FAST_MEAN_BOUND = 1.0
LARGE = (4000, 3000)


def mean_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


@pytest.fixture(scope="module")
def hymenoptera_crops(hymenoptera: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """name -> (exact crop, fast crop) for every training photo, default (bootstrap) config."""
    config = PreprocessConfig()
    out = {}
    for path in sorted(p for p in hymenoptera.rglob("*") if p.suffix.lower() in {".jpg", ".png", ".gif"}):
        data = path.read_bytes()
        out[f"{path.parent.name}/{path.name}"] = (
            decode_and_crop(data, config, fast=False),
            decode_and_crop(data, config, fast=True),
        )
    return out


def photo_mosaic(hymenoptera: Path, size: tuple[int, int]) -> Image.Image:
    """A 12 MP image with real-photo detail at full resolution everywhere: 8 x 8 real photos,
    each at about its own size (upscaling one photo would leave little for resampling to get
    wrong)."""
    photos = sorted(hymenoptera.glob("*/*.jpg"))[::3][:64]
    tile_w, tile_h = size[0] // 8 + 1, size[1] // 8 + 1
    mosaic = Image.new("RGB", size)
    for index, path in enumerate(photos):
        tile = decode_image(path.read_bytes()).resize((tile_w, tile_h), Image.Resampling.BICUBIC)
        mosaic.paste(tile, ((index % 8) * tile_w, (index // 8) * tile_h))
    return mosaic


@pytest.fixture(scope="module")
def odd_mosaic(hymenoptera: Path) -> Image.Image:
    # 4001 x 3003: not divisible by 4, so the 1/4-scale decode's last row and column only
    # partly cover the picture, which the fast path's geometry has to account for.
    return photo_mosaic(hymenoptera, (4001, 3003))


@pytest.fixture(scope="module")
def odd_mosaic_jpeg(odd_mosaic: Image.Image) -> bytes:
    return encode(odd_mosaic, "JPEG", quality=90)


def with_orientation(jpeg: bytes, orientation: int) -> bytes:
    """``jpeg`` with an EXIF APP1 segment holding ``orientation`` (no re-encoding)."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    payload = exif.tobytes()  # starts with b"Exif\0\0"
    return jpeg[:2] + b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload + jpeg[2:]


def test_fast_path_stays_close_to_exact_on_every_hymenoptera_photo(
    hymenoptera_crops: dict[str, tuple[np.ndarray, np.ndarray]], hymenoptera: Path
) -> None:
    assert len(hymenoptera_crops) > 200
    diffs = {}
    for name, (exact, fast) in hymenoptera_crops.items():
        assert fast.shape == exact.shape == (224, 224, 3) and fast.dtype == np.uint8, name
        diffs[name] = mean_abs_diff(exact, fast)
    worst = max(diffs, key=diffs.__getitem__)
    assert diffs[worst] < FAST_MEAN_BOUND, (worst, diffs[worst])
    # Most photos are about 500 x 375: no reduced decoding, only the crop window's resampling
    # rounds differently; on average far below the bound (measured: 0.01).
    assert np.mean(list(diffs.values())) < 0.1
    # The default is the serving (fast) path.
    data, config = sample_photos(hymenoptera)[0].read_bytes(), PreprocessConfig()
    np.testing.assert_array_equal(decode_and_crop(data, config), decode_and_crop(data, config, fast=True))


@pytest.mark.parametrize("kind", ["upscaled photo", "photo mosaic"])
def test_fast_path_on_a_12_megapixel_jpeg(kind: str, hymenoptera: Path) -> None:
    from models.preprocess import _decode

    if kind == "upscaled photo":
        source = decode_image(sample_photos(hymenoptera)[0].read_bytes())
        image = source.resize(LARGE, Image.Resampling.BICUBIC)
    else:
        image = photo_mosaic(hymenoptera, LARGE)
    data = encode(image, "JPEG", quality=90)
    config = PreprocessConfig()
    # Decoded at 1/4 scale: 750 rows is the least that keeps 2 x 256 (1/8 would give 375).
    assert _decode(data, max_pixels=DEFAULT_MAX_PIXELS, min_short_side=512).image.size == (1000, 750)
    exact = decode_and_crop(data, config, fast=False)
    fast = decode_and_crop(data, config, fast=True)
    assert fast.shape == (224, 224, 3)
    assert mean_abs_diff(exact, fast) < FAST_MEAN_BOUND  # measured: 0.17 upscaled, 0.46 mosaic


@pytest.mark.parametrize("orientation", range(1, 9))
def test_fast_path_keeps_exif_orientation_and_geometry(orientation: int, odd_mosaic_jpeg: bytes) -> None:
    """Every orientation of a reduced-scale decode lands on the same pixels as the exact path
    (a wrong edge after the transpose shifts the crop by part of a pixel: 2 to 5 levels here)."""
    from models.preprocess import _decode

    data = with_orientation(odd_mosaic_jpeg, orientation)
    assert decode_image(data).size == ((3003, 4001) if orientation >= 5 else (4001, 3003))
    decoded = _decode(data, max_pixels=DEFAULT_MAX_PIXELS, min_short_side=512)
    upright = (3003, 4001) if orientation >= 5 else (4001, 3003)
    assert decoded.size == upright
    assert decoded.image.size == ((751, 1001) if orientation >= 5 else (1001, 751))
    config = PreprocessConfig()
    exact = decode_and_crop(data, config, fast=False)
    fast = decode_and_crop(data, config, fast=True)
    assert mean_abs_diff(exact, fast) < FAST_MEAN_BOUND  # measured: 0.42-0.43


@pytest.mark.parametrize("kind", ["greyscale", "CMYK", "progressive", "MPO"])
def test_fast_path_on_other_kinds_of_jpeg(kind: str, odd_mosaic: Image.Image) -> None:
    """Reduced-scale decoding keeps each JPEG flavour's mode conversion (and MPO's first frame)."""
    from models.preprocess import _decode

    image = odd_mosaic.crop((0, 0, 2401, 1601))  # decoded at 1/2 scale: 1201 x 801
    if kind == "greyscale":
        data = encode(image.convert("L"), "JPEG", quality=90)
    elif kind == "CMYK":
        data = encode(image.convert("CMYK"), "JPEG", quality=90)
    elif kind == "progressive":
        data = encode(image, "JPEG", quality=90, progressive=True)
    else:
        data = encode(image, "MPO", save_all=True, append_images=[ImageOps.invert(image)])
        assert Image.open(io.BytesIO(data)).format == "MPO"
    decoded = _decode(data, max_pixels=DEFAULT_MAX_PIXELS, min_short_side=512)
    assert decoded.image.size == (1201, 801) and decoded.image.mode == "RGB"
    config = PreprocessConfig()
    exact = decode_and_crop(data, config, fast=False)
    assert mean_abs_diff(exact, decode_and_crop(data, config, fast=True)) < FAST_MEAN_BOUND


def test_fast_crop_of_a_large_image_that_is_not_a_jpeg(odd_mosaic: Image.Image) -> None:
    """No reduced decoding here: reducing_gap box-reduces 3003 rows by 3 before the filter."""
    config = PreprocessConfig()
    ppm = encode(odd_mosaic, "PPM")  # lossless and quick to write
    png = encode(odd_mosaic.crop((0, 0, 1600, 1200)), "PNG", compress_level=1)
    for data in (ppm, png):
        exact = decode_and_crop(data, config, fast=False)
        assert mean_abs_diff(exact, decode_and_crop(data, config, fast=True)) < FAST_MEAN_BOUND


@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear", "nearest", "lanczos"])
def test_fast_crop_of_small_and_odd_images(
    interpolation: str, reference_photos: list[tuple[str, Image.Image]]
) -> None:
    """Upscaling, zero padding (1 x 1, 3 x 97) and off-by-one sizes, each interpolation."""
    config = PreprocessConfig(interpolation=interpolation)
    for name, image in reference_photos:
        data = encode(image, "PNG")  # lossless: the pixels of the reference image
        exact = decode_and_crop(data, config, fast=False)
        fast = decode_and_crop(data, config, fast=True)
        assert fast.shape == exact.shape, name
        # Uniform noise is the worst case for resampling differences (every pixel an edge;
        # measured up to 0.93 with lanczos); a misplaced crop would be ~85 levels on noise.
        bound = 2.0 if name.startswith("noise") else FAST_MEAN_BOUND
        assert mean_abs_diff(exact, fast) < bound, name


def test_fast_path_fails_exactly_like_the_exact_path(photo_bytes: bytes, odd_mosaic_jpeg: bytes) -> None:
    from models.errors import InputError

    large = odd_mosaic_jpeg
    bomb = handmade_png(100_000, 100_000, 8, 2, zlib.compress(b""))
    cases = {
        "empty": (b"", DEFAULT_MAX_PIXELS),
        "not an image": (b"hello, this is not a picture\n", DEFAULT_MAX_PIXELS),
        "truncated small JPEG": (photo_bytes[: len(photo_bytes) // 2], DEFAULT_MAX_PIXELS),
        # decoded at 1/4 scale on the fast path: truncation must still be an error
        "truncated 12 MP JPEG": (large[: len(large) // 2], DEFAULT_MAX_PIXELS),
        # the limit applies to the header's size, not the reduced size decoded
        "12 MP JPEG over the pixel limit": (large, 4001 * 3003 - 1),
        "pixel bomb": (bomb, DEFAULT_MAX_PIXELS),
    }
    for name, (data, max_pixels) in cases.items():
        errors = []
        for fast in (False, True):
            with pytest.raises(InputError) as caught:
                decode_and_crop(data, PreprocessConfig(), max_pixels=max_pixels, fast=fast)
            errors.append((type(caught.value), str(caught.value)))
        assert errors[0] == errors[1], name
    assert decode_and_crop(large, PreprocessConfig(), max_pixels=4001 * 3003, fast=True).shape == (224, 224, 3)


def test_fast_path_gives_the_bootstrap_model_the_same_top1(
    bootstrapped_home: Path,
    hymenoptera_crops: dict[str, tuple[np.ndarray, np.ndarray]],
    odd_mosaic_jpeg: bytes,
) -> None:
    """The real ImageNet model on the photos where the two paths differ most (and on the 12 MP
    mosaic, upright and rotated), not on all 245: the rest differ by (nearly) nothing."""
    from models.onnx_io import cpu_session, run_in_batches, softmax
    from store.state import open_state

    registry = open_state(home=bootstrapped_home).registry
    version = registry.get(registry.active_version() or "v1")
    config = version.spec.preprocess
    # hymenoptera_crops was made with PreprocessConfig(): the same crops (mean/std come later)
    assert (config.input_size, config.resize_size, config.interpolation) == (224, 256, "bicubic")
    ranked = sorted(hymenoptera_crops.values(), key=lambda pair: -mean_abs_diff(*pair))[:40]
    exact = [pair[0] for pair in ranked]
    fast = [pair[1] for pair in ranked]
    for data in (odd_mosaic_jpeg, with_orientation(odd_mosaic_jpeg, 6)):
        exact.append(decode_and_crop(data, config, fast=False))
        fast.append(decode_and_crop(data, config, fast=True))
    session = cpu_session(version.onnx_path)
    p_exact = softmax(run_in_batches(session, normalise_crops(np.stack(exact), config))[0])
    p_fast = softmax(run_in_batches(session, normalise_crops(np.stack(fast), config))[0])
    agree = p_exact.argmax(axis=1) == p_fast.argmax(axis=1)
    # Nearly all: two labels within a hair of each other may swap (1000 ImageNet classes).
    assert agree.sum() >= len(agree) - 1, np.flatnonzero(~agree)
    top = p_exact.argmax(axis=1)
    rows = np.arange(len(top))
    # measured 0.023 here; up to 0.054 on a blurry upscaled photo where the model is unsure
    assert np.abs(p_exact[rows, top] - p_fast[rows, top]).max() < 0.1


@pytest.mark.parametrize(("fmt", "media_type"), [("JPEG", "image/jpeg"), ("PNG", "image/png"), ("WEBP", "image/webp"),
                                                 ("GIF", "image/gif")])
def test_the_media_type_comes_from_the_image_header(fmt: str, media_type: str) -> None:
    assert image_media_type(encode(Image.new("RGB", (8, 8)), fmt)) == media_type


@pytest.mark.parametrize("data", [b"", b"<svg onload=alert(1)>", b"\xff\xd8\xff" + b"\0" * 10])
def test_bytes_that_are_no_image_are_an_octet_stream(data: bytes) -> None:
    assert image_media_type(data) == "application/octet-stream"
