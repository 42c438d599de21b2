"""``service/service.py`` (the BentoML services: ``POST /predict``, the ops routes, the HTTP and
inference workers), real server level: real ``bentoml serve`` processes with the bootstrapped
model and real HTTP clients.

- ``/predict``: results, formats, order, batching, and every bad input a 4xx with a message that
  says what to fix;
- hostile input: decompression bombs in every accepted format, truncated JPEGs, absurd aspect
  ratios, bogus EXIF, hostile file names, BentoML's internal pickle transport. Every case is a
  clear 4xx or, for images that are valid however odd, a 200 with the result the shared
  preprocessing gives (cases covered elsewhere are not repeated: every EXIF orientation and
  garbage EXIF at the decoder are in ``tests/models/test_preprocess.py``; hostile labels in
  ``test_admin.py``);
- readiness follows the model: 503 on an empty store, ready once a version is active, no restart;
- a worker killed with SIGKILL under concurrent load is replaced by BentoML's supervisor, and
  requests fail only as the service promises (the figures for docs/reliability.md come from
  ``python -m bench.kill_worker``).
"""

from __future__ import annotations

import asyncio
import base64
import io
import os
import re
import signal
import struct
import subprocess
import sys
import time
import uuid
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import numpy as np
import psutil
import pytest
from PIL import Image

from models.onnx_io import cpu_session, run_in_batches, softmax
from models.preprocess import decode_and_crop, normalise_crops
from service.limits import MAX_FILENAME_BYTES
from store.state import open_state
from tests.support.hostile import (
    HOSTILE_NAMES,
    PHOTO,
    PHOTO_JPEG,
    assert_client_error,
    post_raw,
    written_anywhere,
)
from tests.support.images import blank_png, encode, jpeg_files, png_chunk
from tests.support.load import Load
from tests.support.paths import CHELSEA, COFFEE, ROOT
from tests.support.polling import eventually
from tests.support.server import Server, serving, start_server, subprocess_env, wait_until
from tests.support.workers import WORKER_TARGETS, worker_pid

CAT_CLASSES = {"tabby, tabby cat", "tiger cat", "Persian cat", "Siamese cat, Siamese", "Egyptian cat"}


def png(width: int, height: int, mode: str = "RGB") -> bytes:
    return blank_png(width, height, mode)


def post(client: httpx.Client, *files: tuple[str, bytes], **data: object) -> httpx.Response:
    return client.post("/predict", files=[("images", f) for f in files], data=data or None)


def test_predicts_one_image(client: httpx.Client) -> None:
    response = post(client, ("chelsea.jpg", CHELSEA))
    assert response.status_code == 200, response.text
    (result,) = response.json()
    assert result["label"] in CAT_CLASSES
    assert result["model_version"] == "v1"
    assert len(result["top_k"]) == 5  # the default
    scores = [entry["score"] for entry in result["top_k"]]
    assert scores == sorted(scores, reverse=True) and 0 < sum(scores) <= 1.0001
    assert result["top_k"][0] == {"label": result["label"], "score": result["score"]}


def test_many_images_come_back_in_order(client: httpx.Client) -> None:
    response = post(client, ("a.jpg", COFFEE), ("b.jpg", CHELSEA), ("c.jpg", COFFEE), top_k=2)
    assert response.status_code == 200, response.text
    labels = [r["label"] for r in response.json()]
    assert labels[0] == labels[2] == "espresso" and labels[1] in CAT_CLASSES
    assert all(len(r["top_k"]) == 2 for r in response.json())


def test_top_k_is_capped_at_the_number_of_labels(client: httpx.Client) -> None:
    (result,) = post(client, ("chelsea.jpg", CHELSEA), top_k=5000).json()
    assert len(result["top_k"]) == 1000
    assert sum(entry["score"] for entry in result["top_k"]) == pytest.approx(1.0, abs=1e-3)


def test_other_image_formats_are_accepted(client: httpx.Client) -> None:
    image = Image.open(io.BytesIO(CHELSEA)).reduce(2)  # BMP of the full photo exceeds the test limit
    for fmt in ("PNG", "WEBP", "GIF", "BMP"):
        buffer = io.BytesIO()
        image.save(buffer, format=fmt)
        response = post(client, (f"chelsea.{fmt.lower()}", buffer.getvalue()))
        assert response.status_code == 200, (fmt, response.text)


# -- bad input: every case a 4xx with a message that says what to fix ---------------------------

def assert_error(response: httpx.Response, status: int, *fragments: str) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    text = str(body)
    for fragment in fragments:
        assert re.search(fragment, text), (fragment, body)
    return body


def test_non_image_bytes(client: httpx.Client) -> None:
    body = assert_error(post(client, ("notes.txt", b"hello, I am not an image")), 422,
                        "image 0", "notes.txt", "not a recognised image")
    assert body["image"] == 0 and body["filename"] == "notes.txt"


def test_the_bad_file_in_a_multi_image_request_is_named(client: httpx.Client) -> None:
    truncated = COFFEE[: len(COFFEE) // 2]
    body = assert_error(post(client, ("good.jpg", CHELSEA), ("cut.jpg", truncated)), 422, "image 1", "cut.jpg")
    assert body["image"] == 1


def test_empty_file(client: httpx.Client) -> None:
    assert_error(post(client, ("empty.jpg", b"")), 400, "image 0", "empty")


def test_no_files(client: httpx.Client) -> None:
    assert_error(client.post("/predict", data={"top_k": "3"}), 400, "images")
    assert_error(client.post("/predict", json={}), 400, "images")


def test_too_many_files(client: httpx.Client) -> None:
    files = [(f"{i}.jpg", COFFEE) for i in range(9)]
    assert_error(post(client, *files), 413, "9 images", "limit is 8")


def test_file_over_the_byte_limit(client: httpx.Client) -> None:
    big = jpeg_files(ROOT.parent / "shared/data/hymenoptera/train", "bees")
    large = max(big, key=lambda p: p.stat().st_size).read_bytes()
    padded = large + b"\0" * (300_001 - len(large)) if len(large) <= 300_000 else large
    assert_error(post(client, ("big.jpg", padded)), 413, "big.jpg", "limit is 300000 bytes")


def test_request_body_over_the_limit_is_refused_before_reading(client: httpx.Client) -> None:
    files = [(f"{i}.bin", b"\xff" * 290_000) for i in range(8)]  # 2.3 MB in all
    assert_error(post(client, *files), 413, "the limit is 2000000 bytes")


def test_image_over_the_pixel_limit(client: httpx.Client) -> None:
    assert_error(post(client, ("wide.png", png(2500, 2000, "1"))), 413, "wide.png", "pixels")


def test_decompression_bomb(client: httpx.Client) -> None:
    bomb = png(30000, 30000, "1")  # 900 megapixels in a ~100 KB file
    assert len(bomb) < 300_000
    assert_error(post(client, ("bomb.png", bomb)), 413, "bomb.png")


@pytest.mark.parametrize("top_k", ["0", "-2", "abc", "1.5"])
def test_bad_top_k(client: httpx.Client, top_k: str) -> None:
    assert_error(post(client, ("chelsea.jpg", CHELSEA), top_k=top_k), 400, "top_k")


def test_no_client_input_produces_a_500(client: httpx.Client) -> None:
    odd = [
        client.post("/predict", content=b"garbage", headers={"content-type": "multipart/form-data; boundary=x"}),
        client.post("/predict", content=b"{not json", headers={"content-type": "application/json"}),
        client.post("/predict", files=[("images", ("x.jpg", b"\xff\xd8\xff"))]),
        client.post("/predict", files=[("wrong_field", ("x.jpg", CHELSEA))]),
        client.post("/predict", files={"images": (None, "just text")}),
        client.post("/predict", content=b"images=abc", headers={"content-type": "application/x-www-form-urlencoded"}),
        client.post("/predict", content=b"hello", headers={"content-type": "text/plain"}),
        client.post("/predict", content=b"\xff\xfe", headers={"content-type": "application/json"}),
    ]
    assert [r.status_code for r in odd if r.status_code >= 500] == [], [r.text for r in odd]
    assert all(400 <= r.status_code < 500 for r in odd)


def test_a_form_over_the_parsers_part_limits_is_a_413_not_a_500(client: httpx.Client) -> None:
    # BentoML parses forms with Starlette's limits (1000 files, 1000 fields) and answered a form
    # over either with a 500 (found by tests/service/test_openapi.py)
    files = [("images", (f"{i}.jpg", b"x")) for i in range(1001)]
    assert_error(client.post("/predict", files=files), 413, "1001 images", "limit is 8")
    fields = {f"field{i}": "x" for i in range(1001)}
    assert_error(client.post("/predict", data=fields, files=[("images", ("c.jpg", CHELSEA))]), 413,
                 "1001 form fields")


def test_routing_errors_are_json(client: httpx.Client) -> None:
    # BentoML's router answered these in plain text (found by tests/service/test_openapi.py)
    wrong_method = assert_error(client.get("/predict"), 405, "GET is not allowed on /predict; it takes POST")
    assert wrong_method == {"error": "GET is not allowed on /predict; it takes POST"}
    assert client.get("/predict").headers["allow"] == "POST"
    assert_error(client.get("/no-such-route"), 404, "no route /no-such-route", "docs.json")
    assert_error(client.get("/admin/jobs/a%0Ab"), 404, "no route")  # a newline: the /admin mount does not match


# -- ops routes ---------------------------------------------------------------------------------

def test_ops_routes(client: httpx.Client) -> None:
    assert client.get("/livez").status_code == 200
    assert client.get("/readyz").status_code == 200
    assert client.post("/predict", files={"images": ("c.jpg", CHELSEA)}).status_code == 200  # a batch to count
    metrics = client.get("/metrics")
    assert metrics.status_code == 200 and "bentoml_service_adaptive_batch_size" in metrics.text
    schema = client.get("/docs.json").json()
    assert "/predict" in schema["paths"]
    docs = client.get("/docs")
    assert docs.status_code == 307 and docs.headers["location"] == "/"
    page = client.get("/docs", follow_redirects=True)
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]


# -- concurrency: distinct images, each its own correct result, and real batches ----------------

def batch_sizes(metrics_text: str) -> tuple[float, float]:
    total = count = 0.0
    for line in metrics_text.splitlines():
        if line.startswith("bentoml_service_adaptive_batch_size_sum{") and 'method_name="infer"' in line:
            total += float(line.rsplit(" ", 1)[1])
        if line.startswith("bentoml_service_adaptive_batch_size_count{") and 'method_name="infer"' in line:
            count += float(line.rsplit(" ", 1)[1])
    return total, count


def test_concurrent_requests_are_batched_and_each_gets_its_own_result(
    server, client: httpx.Client, bootstrapped_home: Path, hymenoptera: Path
) -> None:
    photos = [p.read_bytes() for p in jpeg_files(hymenoptera, "ants")[:12] + jpeg_files(hymenoptera, "bees")[:12]]
    version = open_state(home=bootstrapped_home).registry.get("v1")
    inputs = normalise_crops(  # as served
        np.stack([decode_and_crop(b, version.spec.preprocess) for b in photos]),
        version.spec.preprocess)
    logits, _ = run_in_batches(cpu_session(version.onnx_path), inputs, batch_size=1)
    expected = softmax(logits)
    before = batch_sizes(client.get("/metrics").text)

    async def send_all() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as http:
            return await asyncio.gather(*(
                http.post("/predict", files=[("images", (f"{i}.jpg", b))], data={"top_k": "1"})
                for i, b in enumerate(photos)
            ))

    responses = asyncio.run(send_all())
    for i, response in enumerate(responses):
        assert response.status_code == 200, response.text
        (result,) = response.json()
        assert result["label"] == version.spec.labels[int(expected[i].argmax())], i
        assert result["score"] == pytest.approx(float(expected[i].max()), abs=1e-4)
    after = batch_sizes(client.get("/metrics").text)
    requests, batches = after[0] - before[0], after[1] - before[1]
    assert requests == len(photos)
    assert requests / batches > 1, f"{requests} requests ran in {batches} batches: no batching"


# -- hostile input ----------------------------------------------------------------------------------


def post_one(client: httpx.Client, name: str, data: bytes) -> httpx.Response:
    return client.post("/predict", files=[("images", (name, data))])


class Reference:
    """What the served model (the bootstrap v1) must answer for image bytes, computed here with
    the same shared preprocessing and the same ONNX graph, no HTTP."""

    def __init__(self, home: Path) -> None:
        version = open_state(home=home).registry.get("v1")
        self.labels = version.spec.labels
        self.preprocess = version.spec.preprocess
        self.session = cpu_session(version.onnx_path)

    def probabilities(self, data: bytes) -> np.ndarray:
        inputs = normalise_crops(decode_and_crop(data, self.preprocess)[None],
                                 self.preprocess)  # the service's path
        logits = self.session.run(None, {self.session.get_inputs()[0].name: inputs})[0]
        return softmax(logits)[0]

    def assert_served(self, response: httpx.Response, data: bytes) -> None:
        """``response`` is a 200 whose top-k labels and scores are those of ``data``."""
        assert response.status_code == 200, response.text
        (result,) = response.json()
        expected = self.probabilities(data)
        best = [self.labels[i] for i in np.argsort(-expected)[: len(result["top_k"])]]
        assert result["label"] == best[0]
        for entry in result["top_k"]:
            assert entry["score"] == pytest.approx(float(expected[self.labels.index(entry["label"])]), abs=1e-4)
        assert {e["label"] for e in result["top_k"]} <= set(best) | {  # ties at the k-th place
            self.labels[i] for i in np.flatnonzero(expected >= expected[self.labels.index(best[-1])] - 1e-4)}


def scores(response: httpx.Response) -> dict[str, float]:
    assert response.status_code == 200, response.text
    (result,) = response.json()
    return {entry["label"]: entry["score"] for entry in result["top_k"]}


@pytest.fixture(scope="module")
def reference(bootstrapped_home: Path) -> Reference:
    return Reference(bootstrapped_home)


# -- decompression bombs: the pixel count in the header is refused before decoding ---------------


def _jpeg_claiming(width: int, height: int) -> bytes:
    data = bytearray(encode(Image.new("RGB", (16, 16)), "JPEG"))
    sof = data.find(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def _gif_claiming(width: int, height: int) -> bytes:
    data = encode(Image.new("P", (1, 1)), "GIF")
    return data[:6] + struct.pack("<HH", width, height) + data[10:]


def _bmp_claiming(width: int, height: int) -> bytes:
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, 0, 0, 0, 0, 0, 0)
    return b"BM" + struct.pack("<IHHI", 14 + len(info), 0, 0, 14 + len(info)) + info


def _webp_claiming(width: int, height: int) -> bytes:
    data = bytearray(encode(Image.new("RGB", (4, 4)), "WEBP", lossless=True))
    at = data.find(b"VP8L") + 9  # chunk id, size, the 0x2f signature byte: then 14 + 14 bits
    bits = int.from_bytes(data[at : at + 4], "little") & ~((1 << 28) - 1)
    data[at : at + 4] = (bits | (width - 1) | (height - 1) << 14).to_bytes(4, "little")
    return bytes(data)


def _tiff_claiming(width: int, height: int) -> bytes:
    data = bytearray(encode(Image.new("1", (4, 4)), "TIFF"))
    (ifd,) = struct.unpack_from("<I", data, 4)
    (count,) = struct.unpack_from("<H", data, ifd)
    for entry in range(ifd + 2, ifd + 2 + 12 * count, 12):
        tag = struct.unpack_from("<H", data, entry)[0]
        if tag in (256, 257):  # ImageWidth, ImageLength: rewritten as LONG values
            struct.pack_into("<HHII", data, entry, tag, 4, 1, width if tag == 256 else height)
    return bytes(data)


BOMBS = {  # headers of tiny files rewritten to claim gigapixels
    "bomb.jpg": lambda: _jpeg_claiming(65000, 65000),
    "bomb.gif": lambda: _gif_claiming(65535, 65535),
    "bomb.webp": lambda: _webp_claiming(16383, 16383),
    "bomb.tiff": lambda: _tiff_claiming(100_000, 100_000),
    "bomb.bmp": lambda: _bmp_claiming(100_000, 100_000),
}


@pytest.mark.parametrize("name", BOMBS)
def test_pixel_bombs_in_every_format_are_413(client: httpx.Client, name: str) -> None:
    data = BOMBS[name]()
    assert len(data) < 1000  # small on the wire, gigapixels once decoded
    body = assert_client_error(post_one(client, name, data), 413, "pixels", "the limit is 4,000,000 pixels", name)
    assert body["image"] == 0 and body["filename"] == name


@pytest.mark.parametrize("chunk", [b"zTXt", b"iCCP"])
def test_compressed_metadata_bombs_are_refused(client: httpx.Client, chunk: bytes) -> None:
    # 20 MB of metadata deflated into ~20 KB, in front of an 8x8 picture
    payload = b"name\x00\x00" + zlib.compress(b"\x00" * 20_000_000, 9)
    small = encode(Image.new("RGB", (8, 8)), "PNG")
    bomb = small[:33] + png_chunk(chunk, payload) + small[33:]  # after the 8-byte signature + IHDR
    assert len(bomb) < 300_000
    assert_client_error(post_one(client, "meta.png", bomb), 422, "image 0", "meta.png", "too large")


def test_pixel_data_that_inflates_far_beyond_the_image_is_decoded_as_the_image(
    client: httpx.Client, reference: Reference
) -> None:
    # a 1000x1000 greyscale PNG whose IDAT inflates to 50 MB: only the image's 1 MB is used
    header = png_chunk(b"IHDR", struct.pack(">IIBBBBB", 1000, 1000, 8, 0, 0, 0, 0))
    pixels = png_chunk(b"IDAT", zlib.compress(b"\x00" * 50_000_000, 9))
    bomb = b"\x89PNG\r\n\x1a\n" + header + pixels + png_chunk(b"IEND", b"")
    assert len(bomb) < 300_000
    reference.assert_served(post_one(client, "inflating.png", bomb), bomb)


# -- truncated JPEGs ------------------------------------------------------------------------------


@pytest.mark.parametrize("progressive", [False, True], ids=["baseline", "progressive"])
@pytest.mark.parametrize("keep", [2, 20, 0.01, 0.3, 0.9, -2], ids=lambda k: f"keep-{k}")
def test_truncated_jpegs_are_422(client: httpx.Client, keep: float, progressive: bool) -> None:
    data = encode(PHOTO, "JPEG", quality=90, progressive=progressive)
    end = int(keep) if isinstance(keep, int) else int(len(data) * keep)
    cut = data[:end]  # -2: everything but the end-of-image marker
    body = assert_client_error(post_one(client, "cut.jpg", cut), 422, "image 0", "cut.jpg")
    # two bytes are too few even to tell the format; beyond that the decoder says what is wrong
    assert any(w in body["error"] for w in ("corrupt", "truncated", "not a recognised image")), body


# -- valid but odd images: a correct 200 ----------------------------------------------------------


@pytest.mark.parametrize("size", [(1, 20000), (20000, 1), (1, 4_000_000), (3, 1)], ids=str)
def test_absurd_aspect_ratios_are_classified_like_the_shared_preprocessing(
    client: httpx.Client, reference: Reference, size: tuple[int, int]
) -> None:
    width, height = size
    if width * height <= 100_000:  # noise: every pixel matters
        strip = np.random.default_rng(0).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    else:  # a ramp (noise would not fit the upload limit)
        strip = np.linspace(0, 255, height, dtype=np.uint8)[:, None, None].repeat(3, axis=2)
    data = encode(Image.fromarray(strip), "PNG")
    assert len(data) < 300_000  # the test server's upload limit
    reference.assert_served(post_one(client, "strip.png", data), data)


def _exif(orientation_entry: bytes, next_ifd: int = 0) -> bytes:
    """A big-endian TIFF block with one IFD holding ``orientation_entry`` (tag 0x0112)."""
    return b"Exif\x00\x00MM\x00\x2a" + struct.pack(">IH", 8, 1) + orientation_entry + struct.pack(">I", next_ifd)


def _short(value: int) -> bytes:
    return struct.pack(">HHIHH", 0x0112, 3, 1, value, 0)


BOGUS_EXIF = {
    "orientation-0": _exif(_short(0)),
    "orientation-9": _exif(_short(9)),
    "orientation-65535": _exif(_short(65535)),
    "ascii-6": _exif(struct.pack(">HHI", 0x0112, 2, 2) + b"6\x00\x00\x00"),
    "count-0": _exif(struct.pack(">HHI", 0x0112, 3, 0) + b"\x00" * 4),
    "count-2^31": _exif(struct.pack(">HHII", 0x0112, 3, 0x7FFFFFFF, 8)),
    "offset-out-of-file": _exif(struct.pack(">HHII", 0x0112, 3, 4, 0x7FFFFFF0)),
    "not-tiff": b"Exif\x00\x00" + b"garbage" * 10,
}


@pytest.mark.parametrize("name", BOGUS_EXIF)
def test_bogus_exif_leaves_the_photo_as_stored(client: httpx.Client, reference: Reference, name: str) -> None:
    with_exif = encode(PHOTO, "JPEG", quality=90, exif=BOGUS_EXIF[name])
    response = post_one(client, f"{name}.jpg", with_exif)
    assert scores(response) == pytest.approx(scores(post_one(client, "plain.jpg", PHOTO_JPEG)), abs=1e-4)
    reference.assert_served(response, PHOTO_JPEG)


def test_a_valid_orientation_in_a_self_referencing_ifd_is_applied(client: httpx.Client) -> None:
    # the IFD's "next" offset points back at itself: a loop a naive parser never leaves
    looped = encode(PHOTO, "JPEG", quality=90, exif=_exif(_short(6), next_ifd=8))
    stored_pixels = Image.open(io.BytesIO(PHOTO_JPEG)).convert("RGB")
    upright = encode(stored_pixels.transpose(Image.Transpose.ROTATE_270), "PNG")  # what orientation 6 means
    rotated = scores(post_one(client, "looped.jpg", looped))
    assert rotated == pytest.approx(scores(post_one(client, "upright.png", upright)), abs=1e-4)
    assert rotated != pytest.approx(scores(post_one(client, "plain.jpg", PHOTO_JPEG)), abs=1e-3)  # it did rotate


# -- file names ------------------------------------------------------------------------------------


def traversal_name(tag: str) -> str:
    return f"../../../../../../../tmp/{tag}.jpg"


@pytest.mark.parametrize("template", HOSTILE_NAMES)
def test_hostile_file_names_are_only_echoed_never_used(client: httpx.Client, template: str) -> None:
    tag = f"hostile-{uuid.uuid4().hex[:12]}"
    name = template.format(tag=tag)
    ok = post_raw(client, "/predict", [(name, PHOTO_JPEG)])
    assert ok.status_code == 200, ok.text
    bad = post_raw(client, "/predict", [(name, b"not an image at all")])
    body = assert_client_error(bad, 422, "image 0", "not a recognised image")
    assert "/" not in body["filename"] and "\r" not in body["filename"] and "\n" not in body["filename"]
    assert written_anywhere(tag) == []


@pytest.mark.parametrize("name", ["x" * (MAX_FILENAME_BYTES + 1) + ".jpg", "\u00e9" * 150 + ".jpg", "a\x00b.jpg"],
                         ids=["long-ascii", "long-utf8", "nul"])
def test_unusable_file_names_are_400_not_500(client: httpx.Client, name: str) -> None:
    # BentoML names its temporary copy of an upload after the client's file name: over the file
    # system's 255-byte limit that was an OSError and a 500
    response = post_raw(client, "/predict", [(name, PHOTO_JPEG)])
    body = assert_client_error(response, 400, "image 0", "file name", "rename")
    assert "NUL" in body["error"] if "\x00" in name else "bytes long" in body["error"]
    at_limit = "y" * (MAX_FILENAME_BYTES - 4) + ".jpg"
    assert post_raw(client, "/predict", [(at_limit, PHOTO_JPEG)]).status_code == 200


# -- BentoML's internal transport ------------------------------------------------------------------


def test_the_internal_pickle_transport_is_not_reachable(client: httpx.Client) -> None:
    """BentoML's calls between its own services send pickles; the public port refuses that media
    type before anything reads the body, and does not route the inference service's API."""
    evil = b"cos\nsystem\n(S'touch /tmp/should-never-exist'\ntR."
    refused = client.post("/predict", content=evil, headers={"content-type": "application/vnd.bentoml+pickle"})
    assert_client_error(refused, 415, "unsupported content type")
    for media_type in ("application/vnd.bentoml+pickle", "application/json"):
        assert client.post("/infer", content=evil, headers={"content-type": media_type}).status_code == 404
    assert not Path("/tmp/should-never-exist").exists()  # noqa: S108 - a path the payload names


# -- readiness --------------------------------------------------------------------------------------


@pytest.mark.slow
def test_not_ready_until_a_model_exists_then_ready_without_restart(tmp_path: Path) -> None:
    # both protocols; /v2 under a model name of the operator's choosing
    home = tmp_path / "empty-home"
    server = start_server(home, tmp_path / "serve.log", {"TRANSFER_SERVE_OIP_MODEL_NAME": "espresso-or-not"})
    coffee = (ROOT / "training/samples/coffee.jpg").read_bytes()
    v2_infer = {"inputs": [{"name": "images", "datatype": "BYTES", "shape": [1], "parameters": {
        "content_type": "base64"}, "data": [base64.b64encode(coffee).decode()]}], "outputs": [{"name": "label"}]}
    try:
        wait_until(server, "/livez")
        assert httpx.get(server.url + "/readyz").status_code == 503
        response = httpx.post(server.url + "/predict",
                              files=[("images", ("c.jpg", (ROOT / "training/samples/chelsea.jpg").read_bytes()))])
        assert response.status_code == 503 and "bootstrap" in response.json()["error"]
        assert httpx.get(server.url + "/v2/health/live").status_code == 200
        for response in (httpx.get(server.url + "/v2/health/ready"),
                         httpx.get(server.url + "/v2/models/espresso-or-not/ready"),
                         httpx.post(server.url + "/v2/models/espresso-or-not/infer", json=v2_infer)):
            assert response.status_code == 503 and "bootstrap" in response.json()["error"], response.text
        subprocess.run([sys.executable, "-m", "training", "bootstrap"], cwd=ROOT,
                       env=subprocess_env(home), check=True, capture_output=True)
        wait_until(server, "/readyz", timeout=30)
        response = httpx.post(server.url + "/predict",
                              files=[("images", ("c.jpg", (ROOT / "training/samples/coffee.jpg").read_bytes()))])
        assert response.status_code == 200 and response.json()[0]["label"] == "espresso"
        wait_until(server, "/v2/health/ready", timeout=30)  # each HTTP worker follows the pointer on its own
        answer = httpx.post(server.url + "/v2/models/espresso-or-not/infer", json=v2_infer)
        assert answer.status_code == 200 and answer.json()["outputs"][0]["data"] == ["espresso"], answer.text
        assert answer.json()["model_name"] == "espresso-or-not" and answer.json()["model_version"] == "v1"
        unknown = httpx.get(server.url + "/v2/models/transfer-serve")
        assert unknown.status_code == 404 and "'espresso-or-not'" in unknown.json()["error"]
        assert "serving model version v1" in server.log()
        assert "CPUExecutionProvider" in server.log()
    finally:
        server.stop()


# -- a worker killed under load ---------------------------------------------------------------------

CLIENTS = 6
ONE_INFERENCE_WORKER = {"TRANSFER_SERVE_WORKERS": "1", "TRANSFER_SERVE_INFERENCE_WORKERS": "1",
                        "TRANSFER_SERVE_INTRA_OP_THREADS": "1"}


@pytest.fixture(scope="module")
def kill_server(bootstrapped_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with serving(bootstrapped_home, tmp_path_factory.mktemp("kill") / "serve.log", ONE_INFERENCE_WORKER) as server:
        yield server


def kill_under_load(server: Server, target: str, load: Load) -> tuple[int, int, float, float]:
    """SIGKILL the ``target`` worker ("inference" or "http", see
    :data:`tests.support.workers.WORKER_TARGETS`) once predictions flow, wait for its replacement
    to be up, ready and answering. Returns the killed and the new pid, and when (the load's clock,
    perf_counter) it was killed and the service was ready again."""
    label, ready_line = WORKER_TARGETS[target]
    victim = worker_pid(server, label)
    assert victim is not None, f"no {label} in the server's process tree"
    eventually(lambda: load.successes_sent_after(0) >= 2 * CLIENTS, timeout=120, interval=0.1,
               message="predictions before the kill")
    log_offset = server.log_path.stat().st_size
    killed_at = time.perf_counter()
    os.kill(victim, signal.SIGKILL)
    eventually(lambda: worker_pid(server, label) not in (None, victim), timeout=60, interval=0.1,
               message="a replacement process")
    replacement = worker_pid(server, label)
    assert replacement is not None
    eventually(lambda: ready_line in server.log_path.read_bytes()[log_offset:].decode(errors="replace"),
               timeout=120, interval=0.1, message=f"the replacement {label} up")
    wait_until(server, "/readyz", 200, timeout=60)
    ready_at = time.perf_counter()
    eventually(lambda: load.successes_sent_after(ready_at) >= 2 * CLIENTS, timeout=120, interval=0.1,
               message="predictions after the replacement")
    return victim, replacement, killed_at, ready_at


def test_a_killed_inference_worker_is_replaced_and_serves(
    kill_server: Server, hymenoptera: Path, record_property: Callable[[str, object], None]
) -> None:
    photos = [p.read_bytes() for p in jpeg_files(hymenoptera, "ants")[:6] + jpeg_files(hymenoptera, "bees")[:6]]
    with Load(kill_server.url, photos, clients=CLIENTS) as load:
        victim, replacement, killed_at, ready_at = kill_under_load(kill_server, "inference", load)

    assert replacement != victim
    assert not psutil.pid_exists(victim) or psutil.Process(victim).status() == psutil.STATUS_ZOMBIE
    after_kill = [a for a in load.answers if a.done >= killed_at]
    failed = [a for a in after_kill if a.status != 200]
    record_property("requests_after_kill", len(after_kill))
    record_property("failed_during_replacement", len(failed))
    print(f"\n{len(failed)} of {len(after_kill)} requests answered after the kill failed; "
          f"replacement ready {ready_at - killed_at:.1f} s after the kill")
    # What a client may see while the only inference worker is replaced: a 503 telling it to
    # retry. Not a 500, not a closed connection, not a malformed 200.
    unexpected = [a for a in failed if a.status != 503 or "retry" not in a.body]
    assert unexpected == [], unexpected[:3]
    before_kill = [a for a in load.answers if a.done < killed_at]
    assert all(a.status == 200 for a in before_kill), [a for a in before_kill if a.status != 200][:3]
    for answer in (a for a in load.answers if a.sent >= ready_at):
        assert answer.status == 200, answer
        (result,) = httpx.Response(200, content=answer.body).json()
        assert result["model_version"] == "v1" and result["top_k"]
    with httpx.Client(base_url=kill_server.url, timeout=60) as http:
        assert http.get("/readyz").status_code == 200
        assert http.post("/predict", files=[("images", ("a.jpg", photos[0]))]).status_code == 200


def test_a_killed_http_worker_is_replaced_and_only_requests_in_flight_fail(
    kill_server: Server, hymenoptera: Path, record_property: Callable[[str, object], None]
) -> None:
    photos = [p.read_bytes() for p in jpeg_files(hymenoptera, "bees")[6:12]]
    with Load(kill_server.url, photos, clients=CLIENTS) as load:
        _, _, killed_at, ready_at = kill_under_load(kill_server, "http", load)

    failed = [a for a in load.answers if a.status != 200]
    record_property("failed_with_the_http_worker", len(failed))
    print(f"\n{len(failed)} of {len(load.answers)} requests failed; the HTTP worker was replaced "
          f"{ready_at - killed_at:.1f} s after the kill")
    # Only what the killed process held can be lost: at most one request per client, cut off
    # without an answer (never a wrong one); new connections wait for the new worker.
    assert all(a.status is None and a.sent < ready_at for a in failed), failed[:3]
    assert len(failed) <= CLIENTS
    assert all(a.status == 200 for a in load.answers if a.sent >= ready_at)
