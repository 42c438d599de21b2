"""``service/openapi.py`` (the API document at ``/docs.json``), real server level: the document
describes every route, and property-based fuzzing of the whole HTTP API from it: every operation,
the admin ones with a valid bearer token, positive and negative inputs, then linked sequences
(upload -> delete, retrain -> job, models -> activate). Checks: no server error, and every
response's status code, content type and body as the document declares.

It runs against its own `bentoml serve` on a copy of the bootstrapped state directory, so the
destructive admin operations (retrain, activate, delete) change nothing another test sees. A fixed
seed and a bounded number of examples keep it deterministic in what it sends and under a minute;
``python -m bench.fuzz`` is the long run.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path

import httpx
import pytest

from tests.support.fuzzing import file_fields_get, fuzz, real_images, upload_bytes
from tests.support.server import LIMITS, Server, serving

log = logging.getLogger(__name__)

TOKEN = "fuzz-admin-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
MAX_EXAMPLES = 20  # per operation, for each of positive and negative inputs
STATEFUL_EXAMPLES = 10  # linked sequences of up to 6 calls
INFRA = {("GET", path) for path in ("/livez", "/healthz", "/readyz", "/metrics", "/docs.json", "/schema.json", "/")}


@pytest.fixture(scope="module")
def fuzz_server(bootstrapped_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("fuzz")
    home = root / "home"
    shutil.copytree(bootstrapped_home, home)  # retrain, activate and delete touch only this copy
    with serving(home, root / "serve.log", {**LIMITS, "TRANSFER_SERVE_ADMIN_TOKEN": TOKEN}) as server:
        yield server


@pytest.fixture(scope="module")
def document(fuzz_server: Server) -> dict:
    response = httpx.get(fuzz_server.url + "/docs.json", timeout=30)
    assert response.status_code == 200 and response.headers["content-type"] == "application/json"
    return response.json()


def operations(document: dict) -> set[tuple[str, str]]:
    return {(method.upper(), path) for path, item in document["paths"].items() for method in item}


def test_the_document_describes_every_route(fuzz_server: Server, document: dict, tmp_path: Path) -> None:
    from service.admin import create_admin_app
    from service.open_inference_routes import PREFIX, create_open_inference_app
    from service.settings import Settings
    from store.state import open_state

    admin = create_admin_app(Settings(home=tmp_path, admin_token=TOKEN), open_state(home=tmp_path))
    routes = {(method, "/admin" + route.path) for route in admin.routes  # type: ignore[attr-defined]  # all APIRoute
              for method in route.methods - {"HEAD"}}  # type: ignore[attr-defined]
    oip = create_open_inference_app(Settings(home=tmp_path), lambda: None, "0")  # type: ignore[arg-type,return-value]
    routes |= {(method, (PREFIX + route.path).rstrip("/")) for route in oip.routes  # type: ignore[attr-defined]
               for method in route.methods - {"HEAD"}}  # type: ignore[attr-defined]
    bentoml_apis = httpx.get(fuzz_server.url + "/schema.json", timeout=30).json()["routes"]  # BentoML's own list
    routes |= {("POST", api["route"]) for api in bentoml_apis}
    assert operations(document) == routes | INFRA
    for path, item in document["paths"].items():
        for method, operation in item.items():
            responses = operation["responses"]
            assert any(status.startswith("2") for status in responses), (method, path)
            for status, response in responses.items():
                assert "content" in response, (method, path, status)  # every response has a declared body
                if status.startswith(("4", "5")) and ("GET", path) not in INFRA:  # /readyz 503 is BentoML's text
                    schema = response["content"]["application/json"]["schema"]
                    assert schema == {"$ref": "#/components/schemas/Error"}, (method, path, status)
            if path.startswith("/v2"):  # the protocol answers bad requests 400, never 422
                assert "422" not in responses, (method, path)
            if path.startswith("/admin"):
                assert operation["security"] == [{"adminToken": []}]
                assert {"401", "403"} <= set(responses), (method, path)
            if method == "post" and path != "/docs.json":
                assert {"400", "413", "415"} <= set(responses), (method, path)  # the request guard's


def test_fuzz_every_operation(fuzz_server: Server, document: dict, hymenoptera: Path) -> None:
    photos = real_images([hymenoptera], max_bytes=int(LIMITS["TRANSFER_SERVE_MAX_FILE_BYTES"]))
    labelled: dict[str, Sequence[bytes]] = {
        label: [p.read_bytes() for p in sorted((hymenoptera / label).glob("*.jpg"))[:3]] for label in ("ants", "bees")}
    with file_fields_get(upload_bytes(photos)):
        report = fuzz(fuzz_server.url, AUTH, max_examples=MAX_EXAMPLES, seed=0,
                      stateful_examples=STATEFUL_EXAMPLES, labelled=labelled)
    log.info("fuzzing:\n%s", report.table())
    failures = report.failures()
    assert not failures, f"{len(failures)} distinct failure(s):\n" + "\n".join(failures)
    assert report.server_errors == 0
    # It reached every operation and got past the input checks where it matters: real images
    # were classified and garbage refused, uploads stored and refused, a retrain job started.
    # (schemathesis leaves out the document's own URL, GET /docs.json)
    assert {tuple(label.split(" ", 1)) for label in report.operations} == operations(document) - {("GET", "/docs.json")}
    seen = {label: set(stats.statuses) for label, stats in report.operations.items()}
    assert {200, 422} <= seen["POST /predict"], seen["POST /predict"]
    assert {200, 422} <= seen["POST /admin/labels"], seen["POST /admin/labels"]
    assert 202 in seen["POST /admin/retrain"], seen["POST /admin/retrain"]
    # random tensors are refused (a 200 needs a real image or 150528 crop values), never with a 5xx
    assert 400 in seen["POST /v2/models/{name}/infer"], seen["POST /v2/models/{name}/infer"]
