"""Hostile input over HTTP, against real `bentoml serve` processes: decompression bombs in every
accepted format, truncated JPEGs, absurd aspect ratios, bogus EXIF, hostile file names and labels,
and BentoML's internal pickle transport. Every case is a clear 4xx, or, for images that are
valid however odd, a 200 with the result the shared preprocessing gives; and uploads never write
anything whose name or place comes from the client.

Cases already covered elsewhere are not repeated: a PNG pixel bomb and a truncated JPEG in a
multi-image request (test_predict.py), labels with '/', '..', NUL and a Cyrillic look-alike
(test_admin.py), every EXIF orientation and garbage EXIF at the decoder (unit/test_preprocess.py).
"""

from __future__ import annotations

import hashlib
import io
import struct
import tempfile
import uuid
import zlib
from pathlib import Path

import httpx
import numpy as np
import psutil
import pytest
from PIL import Image

from models.onnx_io import cpu_session, softmax
from models.preprocess import decode_and_crop, normalise_crops
from store.state import open_state
from service.limits import MAX_FILENAME_BYTES
from tests.conftest import ROOT
from tests.http.test_admin import admin, admin_server  # noqa: F401 - the admin server fixtures, reused
from tests.server import Server

def encode(image: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


PHOTO = Image.open(ROOT / "training/samples/chelsea.jpg").convert("RGB").reduce(2)  # 226 x 150
PHOTO_JPEG = encode(PHOTO, "JPEG", quality=90)


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def post(client: httpx.Client, name: str, data: bytes) -> httpx.Response:
    return client.post("/predict", files=[("images", (name, data))])


def multipart(files: list[tuple[str, bytes]], **fields: str) -> tuple[bytes, dict[str, str]]:
    """A multipart body with each file name written as it is (UTF-8): httpx would escape NUL,
    CR, LF, quotes and backslashes, and the point here is what the server does with them."""
    boundary = uuid.uuid4().hex
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{key}"\r\n\r\n{value}\r\n'.encode()
             for key, value in fields.items()]
    for name, data in files:
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="images"; filename="'.encode()
                     + name.encode() + b'"\r\nContent-Type: application/octet-stream\r\n\r\n' + data + b"\r\n")
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    return body, {"content-type": f"multipart/form-data; boundary={boundary}"}


def post_raw(client: httpx.Client, path: str, files: list[tuple[str, bytes]], **fields: str) -> httpx.Response:
    body, headers = multipart(files, **fields)
    return client.post(path, content=body, headers=headers)


def assert_client_error(response: httpx.Response, status: int, *fragments: str) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert isinstance(body.get("error"), str) and body["error"], body
    for fragment in fragments:
        assert fragment in body["error"], (fragment, body)
    return body


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
    body = assert_client_error(post(client, name, data), 413, "pixels", "the limit is 4,000,000 pixels", name)
    assert body["image"] == 0 and body["filename"] == name


@pytest.mark.parametrize("chunk", [b"zTXt", b"iCCP"])
def test_compressed_metadata_bombs_are_refused(client: httpx.Client, chunk: bytes) -> None:
    # 20 MB of metadata deflated into ~20 KB, in front of an 8x8 picture
    payload = b"name\x00\x00" + zlib.compress(b"\x00" * 20_000_000, 9)
    small = encode(Image.new("RGB", (8, 8)), "PNG")
    bomb = small[:33] + png_chunk(chunk, payload) + small[33:]  # after the 8-byte signature + IHDR
    assert len(bomb) < 300_000
    assert_client_error(post(client, "meta.png", bomb), 422, "image 0", "meta.png", "too large")


def test_pixel_data_that_inflates_far_beyond_the_image_is_decoded_as_the_image(
    client: httpx.Client, reference: Reference
) -> None:
    # a 1000x1000 greyscale PNG whose IDAT inflates to 50 MB: only the image's 1 MB is used
    header = png_chunk(b"IHDR", struct.pack(">IIBBBBB", 1000, 1000, 8, 0, 0, 0, 0))
    pixels = png_chunk(b"IDAT", zlib.compress(b"\x00" * 50_000_000, 9))
    bomb = b"\x89PNG\r\n\x1a\n" + header + pixels + png_chunk(b"IEND", b"")
    assert len(bomb) < 300_000
    reference.assert_served(post(client, "inflating.png", bomb), bomb)


# -- truncated JPEGs ------------------------------------------------------------------------------


@pytest.mark.parametrize("progressive", [False, True], ids=["baseline", "progressive"])
@pytest.mark.parametrize("keep", [2, 20, 0.01, 0.3, 0.9, -2], ids=lambda k: f"keep-{k}")
def test_truncated_jpegs_are_422(client: httpx.Client, keep: float, progressive: bool) -> None:
    data = encode(PHOTO, "JPEG", quality=90, progressive=progressive)
    end = int(keep) if isinstance(keep, int) else int(len(data) * keep)
    cut = data[:end]  # -2: everything but the end-of-image marker
    body = assert_client_error(post(client, "cut.jpg", cut), 422, "image 0", "cut.jpg")
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
    reference.assert_served(post(client, "strip.png", data), data)


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
    response = post(client, f"{name}.jpg", with_exif)
    assert scores(response) == pytest.approx(scores(post(client, "plain.jpg", PHOTO_JPEG)), abs=1e-4)
    reference.assert_served(response, PHOTO_JPEG)


def test_a_valid_orientation_in_a_self_referencing_ifd_is_applied(client: httpx.Client) -> None:
    # the IFD's "next" offset points back at itself: a loop a naive parser never leaves
    looped = encode(PHOTO, "JPEG", quality=90, exif=_exif(_short(6), next_ifd=8))
    stored_pixels = Image.open(io.BytesIO(PHOTO_JPEG)).convert("RGB")
    upright = encode(stored_pixels.transpose(Image.Transpose.ROTATE_270), "PNG")  # what orientation 6 means
    rotated = scores(post(client, "looped.jpg", looped))
    assert rotated == pytest.approx(scores(post(client, "upright.png", upright)), abs=1e-4)
    assert rotated != pytest.approx(scores(post(client, "plain.jpg", PHOTO_JPEG)), abs=1e-3)  # it did rotate


# -- file names ------------------------------------------------------------------------------------


def traversal_name(tag: str) -> str:
    return f"../../../../../../../tmp/{tag}.jpg"


def _written_anywhere(tag: str, *roots: Path) -> list[Path]:
    """Files or folders named with ``tag`` directly in /tmp, the repository, or under ``roots``."""
    found = [hit for folder in (Path(tempfile.gettempdir()), ROOT, ROOT.parent) for hit in folder.glob(f"*{tag}*")]
    return found + [hit for root in roots for hit in root.rglob(f"*{tag}*")]


HOSTILE_NAMES = ["../../../../../../../tmp/{tag}.jpg", "/etc/{tag}", "..\\..\\{tag}.jpg", "{tag}\u2215..\u2215x.jpg",
                 "{tag}/", ".", "..", "{tag}\r\nX-Injected: 1.jpg", "\u202e{tag}gpj.exe"]


@pytest.mark.parametrize("template", HOSTILE_NAMES)
def test_hostile_file_names_are_only_echoed_never_used(client: httpx.Client, template: str) -> None:
    tag = f"hostile-{uuid.uuid4().hex[:12]}"
    name = template.format(tag=tag)
    ok = post_raw(client, "/predict", [(name, PHOTO_JPEG)])
    assert ok.status_code == 200, ok.text
    bad = post_raw(client, "/predict", [(name, b"not an image at all")])
    body = assert_client_error(bad, 422, "image 0", "not a recognised image")
    assert "/" not in body["filename"] and "\r" not in body["filename"] and "\n" not in body["filename"]
    assert _written_anywhere(tag) == []


@pytest.mark.parametrize("name", ["x" * (MAX_FILENAME_BYTES + 1) + ".jpg", "\u00e9" * 150 + ".jpg", "a\x00b.jpg"],
                         ids=["long-ascii", "long-utf8", "nul"])
def test_unusable_file_names_are_400_not_500(client: httpx.Client, name: str) -> None:
    # BentoML names its temporary copy of an upload after the client's file name: over the file
    # system's 255-byte limit that was an OSError and a 500
    body = assert_client_error(post_raw(client, "/predict", [(name, PHOTO_JPEG)]), 400, "image 0", "file name", "rename")
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
    assert not Path("/tmp/should-never-exist").exists()


# -- the admin API: labels and file names never pick a path -----------------------------------------


def state_dir(server: Server) -> Path:
    return Path(psutil.Process(server.process.pid).environ()["TRANSFER_SERVE_HOME"])


def files_under(root: Path) -> set[Path]:
    return {p.relative_to(root) for p in root.rglob("*") if p.is_file()}


DATABASE_FILES = {"transfer-serve.db", "transfer-serve.db-wal", "transfer-serve.db-shm"}


@pytest.mark.parametrize("label", [
    "a\\b", "ants/../bees", "/etc", "../../labels", "a\u2215b", "a\uff0fb", "\u202eants", "ants\u200b",
    "bees\u00a0", "\uff41nts", "ants\t", "ants\n", ".",
])
def test_hostile_labels_are_422_and_store_nothing(admin: httpx.Client, admin_server: Server, label: str) -> None:  # noqa: F811
    home = state_dir(admin_server)
    before = files_under(home)
    counts = admin.get("/admin/labels").json()["counts"]
    response = admin.post("/admin/labels", data={"label": label}, files=[("images", ("a.jpg", PHOTO_JPEG))])
    assert_client_error(response, 422, "label")
    assert {p for p in files_under(home) ^ before if p.name not in DATABASE_FILES} == set()
    assert admin.get("/admin/labels").json()["counts"] == counts


def test_a_label_sent_as_a_file_is_400(admin: httpx.Client) -> None:  # noqa: F811
    response = admin.post("/admin/labels", files=[("label", ("ants", b"ants")), ("images", ("a.jpg", PHOTO_JPEG))])
    assert_client_error(response, 400, "'label' does not take files")


def test_uploaded_files_are_stored_by_content_whatever_their_names(admin: httpx.Client, admin_server: Server) -> None:  # noqa: F811
    home = state_dir(admin_server)
    tag = f"hostile-{uuid.uuid4().hex[:12]}"
    names = [template.format(tag=tag) for template in HOSTILE_NAMES if "{tag}" in template]
    photos = [encode(PHOTO.rotate(i * 7), "JPEG", quality=85) for i in range(len(names))]  # distinct bytes
    before = files_under(home)
    response = post_raw(admin, "/admin/labels", list(zip(names, photos)), label="hostile names")
    assert response.status_code == 200, response.text
    stored = response.json()["stored"]
    expected_ids = [hashlib.sha256(data).hexdigest() for data in photos]
    assert [entry["image_id"] for entry in stored] == expected_ids
    for entry in stored:
        assert "/" not in entry["filename"] and "\n" not in entry["filename"]
    new_files = {p for p in files_under(home) - before if p.name not in DATABASE_FILES}
    assert new_files == {Path("labels/images") / i[:2] / i for i in expected_ids}
    for image_id, data in zip(expected_ids, photos):
        assert (home / "labels/images" / image_id[:2] / image_id).read_bytes() == data
    assert _written_anywhere(tag, home.parent) == []
    for image_id in expected_ids:  # leave the store as it was for the other tests on this server
        assert admin.delete(f"/admin/labels/{image_id}").status_code == 200


@pytest.mark.parametrize("name", ["z" * 300 + ".jpg", "a\x00b.jpg"], ids=["long", "nul"])
def test_unusable_file_names_on_the_admin_api_are_400(admin: httpx.Client, admin_server: Server, name: str) -> None:  # noqa: F811
    home = state_dir(admin_server)
    before = files_under(home)
    response = post_raw(admin, "/admin/labels", [(name, PHOTO_JPEG)], label="cats")
    assert_client_error(response, 400, "image 0", "file name")
    assert {p for p in files_under(home) ^ before if p.name not in DATABASE_FILES} == set()
