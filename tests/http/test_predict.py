"""POST /predict and the ops routes against a real `bentoml serve` process."""

from __future__ import annotations

import asyncio
import io
import re
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from models.onnx_io import cpu_session, run_in_batches, softmax
from models.preprocess import decode_and_crop, normalise_crops
from store.state import open_state
from tests.conftest import ROOT, jpeg_files

CHELSEA = (ROOT / "training/samples/chelsea.jpg").read_bytes()
COFFEE = (ROOT / "training/samples/coffee.jpg").read_bytes()
CAT_CLASSES = {"tabby, tabby cat", "tiger cat", "Persian cat", "Siamese cat, Siamese", "Egyptian cat"}


def png(width: int, height: int, mode: str = "RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, (width, height)).save(buffer, format="PNG")
    return buffer.getvalue()


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
    # over either with a 500 (found by tests/http/test_fuzz.py)
    files = [("images", (f"{i}.jpg", b"x")) for i in range(1001)]
    assert_error(client.post("/predict", files=files), 413, "1001 images", "limit is 8")
    fields = {f"field{i}": "x" for i in range(1001)}
    assert_error(client.post("/predict", data=fields, files=[("images", ("c.jpg", CHELSEA))]), 413,
                 "1001 form fields")


def test_routing_errors_are_json(client: httpx.Client) -> None:
    # BentoML's router answered these in plain text (found by tests/http/test_fuzz.py)
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
