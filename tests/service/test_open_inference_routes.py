"""``service/open_inference_routes.py`` (the Open Inference Protocol's ``/v2`` routes), real
server level: the session's ``bentoml serve`` with the bootstrapped model and small limits
(``tests/service/conftest.py``), driven by Triton's own client (``tritonclient.http``) and, where
a client would not send what is tested, by raw HTTP.

- tritonclient end to end: metadata and health, BYTES inputs with binary data on and off (base64
  in JSON), UINT8 crops, subsets of outputs with binary data per output, the classification
  extension, the request id, concurrent requests mixed with ``/predict``;
- results for BYTES inputs equal ``/predict``'s on the same photos;
- conformance: every route and every status code the routes promise (400 for every bad request,
  404 for unknown models and versions, 413, 415), and never a 5xx.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.http as tritonclient_http

from models.preprocess import decode_and_crop
from service.open_inference import EXTENSIONS
from store.state import open_state
from tests.support.paths import CHELSEA, COFFEE
from tests.support.server import LIMITS, Server

MODEL = "transfer-serve"  # TRANSFER_SERVE_OIP_MODEL_NAME's default
INFER = f"/v2/models/{MODEL}/infer"
MAX_FILES = int(LIMITS["TRANSFER_SERVE_MAX_FILES"])
MAX_FILE_BYTES = int(LIMITS["TRANSFER_SERVE_MAX_FILE_BYTES"])
MAX_REQUEST_BYTES = int(LIMITS["TRANSFER_SERVE_MAX_REQUEST_BYTES"])
#: Same crops and model on both routes; only the batch they shared with other requests differs.
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def photos(hymenoptera: Path) -> list[bytes]:
    """Six hymenoptera photos under the server's file limit, ants and bees."""
    found = []
    for label in ("ants", "bees"):
        files = sorted(p for p in (hymenoptera / label).glob("*.jpg") if p.stat().st_size <= MAX_FILE_BYTES)
        found += [p.read_bytes() for p in files[:3]]
    return found


@pytest.fixture
def triton(server: Server) -> Iterator[Any]:
    client = tritonclient_http.InferenceServerClient(server.url.removeprefix("http://"), concurrency=8,
                                                     network_timeout=60, connection_timeout=60)
    try:
        yield client
    finally:
        client.close()


@pytest.fixture(scope="module")
def labels(bootstrapped_home: Path) -> list[str]:
    return list(open_state(home=bootstrapped_home).registry.get("v1").spec.labels)


def images_input(blobs: list[bytes], *, binary: bool) -> Any:
    if binary:
        tensor = tritonclient_http.InferInput("images", [len(blobs)], "BYTES")
        return tensor.set_data_from_numpy(np.array(blobs, dtype=np.object_), binary_data=True)
    # JSON strings: raw image bytes are not UTF-8, so base64 (request parameter content_type "base64")
    tensor = tritonclient_http.InferInput("images", [len(blobs)], "BYTES")
    encoded = np.array([base64.b64encode(blob).decode() for blob in blobs], dtype=np.object_)
    return tensor.set_data_from_numpy(encoded, binary_data=False)


def text(element: bytes | str) -> str:
    """A BYTES element as tritonclient gives it: bytes from binary data, str from JSON."""
    return element if isinstance(element, str) else element.decode()


def crops_of(blobs: list[bytes], bootstrapped_home: Path) -> np.ndarray:
    spec = open_state(home=bootstrapped_home).registry.get("v1").spec
    return np.stack([decode_and_crop(blob, spec.preprocess, fast=True) for blob in blobs])


def predict(client: httpx.Client, blobs: list[bytes]) -> list[dict[str, Any]]:
    response = client.post("/predict", files=[("images", (f"{i}.jpg", blob)) for i, blob in enumerate(blobs)],
                           data={"top_k": "5"})
    assert response.status_code == 200, response.text
    return response.json()


def assert_matches_predict(probabilities: np.ndarray, predicted: list[dict[str, Any]], labels: list[str]) -> None:
    for row, result in zip(probabilities, predicted, strict=True):
        assert labels[int(row.argmax())] == result["label"]
        for entry in result["top_k"]:
            assert abs(row[labels.index(entry["label"])] - entry["score"]) <= TOLERANCE


# -- tritonclient ---------------------------------------------------------------------------------

def test_health_and_metadata(triton: Any, labels: list[str]) -> None:
    assert triton.is_server_live() and triton.is_server_ready()
    assert triton.is_model_ready(MODEL) and triton.is_model_ready(MODEL, "v1") and triton.is_model_ready(MODEL, "1")
    server = triton.get_server_metadata()
    assert server["name"] == "transfer-serve" and server["extensions"] == list(EXTENSIONS)
    metadata = triton.get_model_metadata(MODEL)
    assert metadata == triton.get_model_metadata(MODEL, "v1")
    assert metadata == {"name": MODEL, "versions": ["v1"], "platform": "onnx_onnxv1", "inputs": [
        {"name": "images", "datatype": "BYTES", "shape": [-1]},
        {"name": "pixels", "datatype": "UINT8", "shape": [-1, 224, 224, 3]},
    ], "outputs": [
        {"name": "probabilities", "datatype": "FP32", "shape": [-1, len(labels)]},
        {"name": "label", "datatype": "BYTES", "shape": [-1]},
        {"name": "embedding", "datatype": "FP32", "shape": [-1, 1280]},
    ]}


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json-base64"])
def test_bytes_inputs_give_what_predict_gives(triton: Any, client: httpx.Client, photos: list[bytes],
                                              labels: list[str], binary: bool) -> None:
    outputs = [tritonclient_http.InferRequestedOutput(name, binary_data=binary)
               for name in ("probabilities", "label", "embedding")]
    result = triton.infer(MODEL, [images_input(photos, binary=binary)], outputs=outputs, request_id="req-7",
                          parameters=None if binary else {"content_type": "base64"})
    response = result.get_response()
    assert (response["model_name"], response["model_version"], response["id"]) == (MODEL, "v1", "req-7")
    probabilities = result.as_numpy("probabilities")
    assert probabilities.dtype == np.float32 and probabilities.shape == (len(photos), len(labels))
    assert np.allclose(probabilities.sum(axis=1), 1, atol=1e-4)
    assert [text(label) for label in result.as_numpy("label")] == \
        [labels[i] for i in probabilities.argmax(axis=1)]
    embedding = result.as_numpy("embedding")
    assert embedding.dtype == np.float32 and embedding.shape == (len(photos), 1280) and np.isfinite(embedding).all()
    assert_matches_predict(probabilities, predict(client, photos), labels)


def test_uint8_crops_give_what_encoded_images_give(triton: Any, photos: list[bytes],
                                                   bootstrapped_home: Path) -> None:
    crops = crops_of(photos, bootstrapped_home)
    pixels = tritonclient_http.InferInput("pixels", list(crops.shape), "UINT8").set_data_from_numpy(crops)
    from_pixels = triton.infer(MODEL, [pixels]).as_numpy("probabilities")
    from_images = triton.infer(MODEL, [images_input(photos, binary=True)]).as_numpy("probabilities")
    assert np.abs(from_pixels - from_images).max() <= TOLERANCE


def test_a_subset_of_outputs_each_with_its_own_binary_data(triton: Any, labels: list[str]) -> None:
    outputs = [tritonclient_http.InferRequestedOutput("label", binary_data=False),
               tritonclient_http.InferRequestedOutput("embedding", binary_data=True)]
    result = triton.infer(MODEL, [images_input([CHELSEA, COFFEE], binary=True)], outputs=outputs)
    response = result.get_response()
    assert [output["name"] for output in response["outputs"]] == ["label", "embedding"]
    label, embedding = response["outputs"]
    assert label["data"] == [text(entry) for entry in result.as_numpy("label")]
    assert "data" not in embedding and embedding["parameters"]["binary_data_size"] == 2 * 1280 * 4
    assert result.as_numpy("probabilities") is None


def test_the_classification_extension(triton: Any, labels: list[str]) -> None:
    outputs = [tritonclient_http.InferRequestedOutput("probabilities", binary_data=False, class_count=3)]
    result = triton.infer(MODEL, [images_input([CHELSEA, COFFEE], binary=True)], outputs=outputs)
    top = result.as_numpy("probabilities")
    assert top.shape == (2, 3)
    full = triton.infer(MODEL, [images_input([CHELSEA, COFFEE], binary=True)]).as_numpy("probabilities")
    for row, entries in zip(full, top, strict=True):
        best = np.argsort(-row, kind="stable")[:3]
        for index, entry in zip(best, entries, strict=True):
            score, position, label = text(entry).split(":", 2)
            assert (int(position), label) == (index, labels[index])
            assert abs(float(score) - row[index]) <= TOLERANCE + 1e-6  # six decimals


def test_concurrent_requests_of_both_protocols_each_get_their_own_result(
        triton: Any, client: httpx.Client, photos: list[bytes], labels: list[str]) -> None:
    expected = triton.infer(MODEL, [images_input(photos, binary=True)]).as_numpy("probabilities")

    def one_predict(index: int) -> tuple[int, dict[str, Any]]:
        with httpx.Client(base_url=client.base_url, timeout=60) as http:
            return index, predict(http, [photos[index]])[0]

    with ThreadPoolExecutor(8) as pool:
        # /predict from threads while tritonclient's greenlets (which run while this thread waits
        # on their results) send their requests: both protocols in flight at once
        predicted = [pool.submit(one_predict, index) for index in list(range(len(photos))) * 2]
        pending = [(index, triton.async_infer(MODEL, [images_input([photos[index]], binary=True)]))
                   for index in list(range(len(photos))) * 4]
        for index, request in pending:
            got = request.get_result().as_numpy("probabilities")[0]
            assert np.abs(got - expected[index]).max() <= TOLERANCE
        for future in predicted:
            index, result = future.result()
            assert_matches_predict(expected[index:index + 1], [result], labels)


# -- conformance: every route and status code -------------------------------------------------------

def infer_body(inputs: list[dict[str, Any]], **fields: Any) -> bytes:
    return json.dumps({"inputs": inputs, **fields}).encode()


def b64_images(*blobs: bytes) -> dict[str, Any]:
    return {"name": "images", "datatype": "BYTES", "shape": [len(blobs)],
            "data": [base64.b64encode(blob).decode() for blob in blobs], "parameters": {"content_type": "base64"}}


def binary_request(header: dict[str, Any], tail: bytes) -> tuple[bytes, dict[str, str]]:
    raw = json.dumps(header).encode()
    return raw + tail, {"Inference-Header-Content-Length": str(len(raw)), "Content-Type": "application/octet-stream"}


def test_every_route_answers(client: httpx.Client) -> None:
    for path in ("/v2", "/v2/health/live", "/v2/health/ready", f"/v2/models/{MODEL}",
                 f"/v2/models/{MODEL}/versions/v1", f"/v2/models/{MODEL}/versions/1", f"/v2/models/{MODEL}/ready",
                 f"/v2/models/{MODEL}/versions/v1/ready"):
        response = client.get(path)
        assert response.status_code == 200, (path, response.text)
        assert response.headers["content-type"] == "application/json", path
    for path in (INFER, f"/v2/models/{MODEL}/versions/v1/infer", f"/v2/models/{MODEL}/versions/1/infer"):
        response = client.post(path, content=infer_body([b64_images(CHELSEA)]),
                               headers={"Content-Type": "application/json"})
        assert response.status_code == 200, (path, response.text)
        assert response.json()["model_version"] == "v1"


@pytest.mark.parametrize(("path", "method", "message"), [
    ("/v2/models/nope", "GET", "no model 'nope': this server serves 'transfer-serve'"),
    ("/v2/models/nope/ready", "GET", "no model 'nope'"),
    ("/v2/models/nope/infer", "POST", "no model 'nope'"),
    (f"/v2/models/{MODEL}/versions/v9", "GET", "model version v9 is not being served; v1 is"),
    (f"/v2/models/{MODEL}/versions/7/ready", "GET", "model version v7 is not being served; v1 is"),
    (f"/v2/models/{MODEL}/versions/v9/infer", "POST", "model version v9 is not being served; v1 is"),
    ("/v2/models", "GET", "no route"),
])
def test_unknown_models_versions_and_routes_are_404(client: httpx.Client, path: str, method: str,
                                                    message: str) -> None:
    response = client.request(method, path, content=infer_body([b64_images(CHELSEA)]) if method == "POST" else None)
    assert response.status_code == 404, response.text
    assert message in response.json()["error"]


def crops_input(shape: list[int]) -> dict[str, Any]:
    return {"name": "pixels", "datatype": "UINT8", "shape": shape, "data": [0] * int(np.prod(shape))}


@pytest.mark.parametrize(("body", "headers", "message"), [
    (b"{not json", {}, "does not parse"),
    (infer_body([{"name": "images", "datatype": "UINT8", "shape": [1], "data": [1]}]), {},
     "'images' must be BYTES"),
    (infer_body([{"name": "pixels", "datatype": "FP32", "shape": [1], "data": [1.0]}]), {}, "must be UINT8"),
    (infer_body([{"name": "images", "datatype": "BYTES", "shape": [3], "data": ["a"]}]), {},
     "data has 1 elements but shape [3] holds 3"),
    (infer_body([crops_input([1, 8, 8, 3])]), {}, "this model takes [N, 224, 224, 3]"),
    (infer_body([b64_images(CHELSEA)], outputs=[{"name": "logits"}]), {}, "the model has no output 'logits'"),
    (infer_body([b64_images(CHELSEA)], outputs=[{"name": "label", "parameters": {"classification": 2}}]), {},
     "classification applies to output 'probabilities'"),
    (infer_body([{**b64_images(CHELSEA), "name": "image"}]), {}, "no input 'image'"),
    (infer_body([b64_images(CHELSEA), crops_input([1, 224, 224, 3])]), {}, "send one input"),
    (infer_body([b64_images(b"not an image")]), {}, "input 'images' element 0"),
    (infer_body([{"name": "images", "datatype": "BYTES", "shape": [1], "data": ["%%%"],
                  "parameters": {"content_type": "base64"}}]), {}, "not valid base64"),
    (infer_body([{"name": "images", "datatype": "BYTES", "shape": [0], "data": []}]), {}, "holds no images"),
    (*binary_request({"inputs": [{"name": "images", "datatype": "BYTES", "shape": [1],
                                  "parameters": {"binary_data_size": 100}}]}, b"\x04\x00\x00\x00abcd"),
     "binary_data_size is 100 but only 8 bytes"),
    (*binary_request({"inputs": [{"name": "images", "datatype": "BYTES", "shape": [1],
                                  "parameters": {"binary_data_size": 8}}]}, b"\xff\x00\x00\x00abcd"),
     "says 255 bytes"),
    (b'{"inputs": []}garbage', {"Inference-Header-Content-Length": "zz"}, "Inference-Header-Content-Length"),
], ids=["json", "images-uint8", "pixels-fp32", "shape-vs-data", "wrong-crop-size", "unknown-output",
        "classification-on-label", "unknown-input", "two-inputs", "undecodable", "bad-base64", "no-images",
        "binary-cut-short", "bytes-length-lies", "bad-header-length"])
def test_bad_requests_are_400_with_a_message(client: httpx.Client, body: bytes, headers: dict[str, str],
                                             message: str) -> None:
    response = client.post(INFER, content=body, headers=headers)
    assert response.status_code == 400, response.text
    assert response.headers["content-type"] == "application/json"
    assert message in response.json()["error"]


def test_limits_are_413_and_content_types_415(client: httpx.Client) -> None:
    big = client.post(INFER, content=b"x" * (MAX_REQUEST_BYTES + 1))
    assert big.status_code == 413 and "limit" in big.json()["error"]
    many = client.post(INFER, content=infer_body([b64_images(*[CHELSEA] * (MAX_FILES + 1))]))
    assert many.status_code == 413 and f"the limit is {MAX_FILES}" in many.json()["error"]
    image = client.post(INFER, content=infer_body([b64_images(b"\xff" * (MAX_FILE_BYTES + 1))]))
    assert image.status_code == 413 and f"the limit is {MAX_FILE_BYTES} bytes" in image.json()["error"]
    text = client.post(INFER, content=b"{}", headers={"Content-Type": "text/plain"})
    assert text.status_code == 415 and "application/octet-stream" in text.json()["error"]
    gzip = client.post(INFER, content=b"{}", headers={"Content-Encoding": "gzip"})
    assert gzip.status_code == 415


def test_methods_a_route_does_not_take_are_405(client: httpx.Client) -> None:
    response = client.get(INFER)
    assert response.status_code == 405 and response.json()["error"].startswith("GET is not allowed")


def test_versions_are_named_as_the_registry_names_them_or_by_number() -> None:
    from service.open_inference_routes import served_version

    assert [served_version(v) for v in ("v3", "3", None, "x\x00y")] == ["v3", "v3", None, "x?y"]
