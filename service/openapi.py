"""The API document at ``GET /docs.json``: BentoML's, generated from the routes, completed where
its generator cannot know.

BentoML generates the document from the ``@bentoml.api`` signatures (``/predict``'s request body
and result model) and merges the admin app's (FastAPI: generated from its route declarations and
response models). :func:`complete_document` adds only what neither generator can see:

- OpenAPI 3.1: the schemas pydantic 2 writes are JSON Schema 2020-12 (``null`` in ``anyOf``),
  but BentoML labels the document 3.0.2;
- ``/predict``'s error responses: BentoML's decorator takes none and lists its generic
  400/404/500; what the route answers is declared beside it (``service.service.PREDICT_ERRORS``);
- FastAPI's 422 ``HTTPValidationError`` on every route with parameters: the admin app answers
  validation errors with the one error body, and routes without a request body cannot fail
  validation (their path parameters are plain strings), so those 422s point to ``Error`` or go;
- the infrastructure routes BentoML serves but documents without a body (``/livez``,
  ``/readyz`` and its 503, ``/metrics``) or not at all (``/docs.json``, ``/schema.json``, ``/``).

:class:`OpenAPIDocument` serves it (and redirects ``/docs`` to BentoML's API page at ``/``);
:class:`JSONRoutingErrors` answers the 404/405 of BentoML's own router with the error body.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Awaitable, Callable, Iterator, Mapping
from typing import Any

from .errors import routing_error, send_error

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

OPENAPI_VERSION = "3.1.0"
SCHEMAS = "#/components/schemas/"
_ERROR = {"$ref": SCHEMAS + "Error"}
_TEXT = {"text/plain": {"schema": {"type": "string"}}}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith(SCHEMAS):
            yield ref[len(SCHEMAS):]
        for value in node.values():
            yield from _refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from _refs(value)


def _referenced(paths: dict[str, Any], schemas: dict[str, Any]) -> dict[str, Any]:
    """The schemas the paths refer to, transitively."""
    found: dict[str, Any] = {}
    pending = list(_refs(paths))
    while pending:
        name = pending.pop()
        if name not in found and name in schemas:
            found[name] = schemas[name]
            pending.extend(_refs(schemas[name]))
    return dict(sorted(found.items()))


def _validation_errors(operation: dict[str, Any], *, unprocessable: bool) -> None:
    """FastAPI's 422 on every route with parameters: worded as ours where the route can answer
    it (``unprocessable``: a body that parses but cannot be used), removed where it cannot."""
    for status, response in list(operation["responses"].items()):
        schema = (response.get("content") or {}).get("application/json", {}).get("schema", {})
        if schema.get("$ref") == SCHEMAS + "HTTPValidationError":
            if "requestBody" in operation and unprocessable:
                operation["responses"][status] = _json(_ERROR, "Well-formed but unusable input")
            else:
                del operation["responses"][status]


def _infrastructure(paths: dict[str, Any]) -> dict[str, Any]:
    infra: dict[str, Any] = {}
    for path in ("/livez", "/healthz", "/readyz", "/metrics"):
        operation = copy.deepcopy(paths[path]["get"])
        operation["operationId"] = path.strip("/")
        operation["responses"] = {"200": {"description": "OK", "content": _TEXT}}
        infra[path] = {"get": operation}
    infra["/readyz"]["get"]["responses"]["503"] = {
        "description": "Not ready: no model version loaded and warmed up yet", "content": _TEXT}
    documents = (("/docs.json", "openapi", "This document"),
                 ("/schema.json", "bentoml_schema",
                  "BentoML's description of the service's APIs (what BentoML's Python client reads)"))
    for path, operation_id, description in documents:
        infra[path] = {"get": {"tags": ["Infrastructure"], "operationId": operation_id, "description": description,
                               "responses": {"200": _json({"type": "object"}, description)}}}
    infra["/"] = {"get": {
        "tags": ["Infrastructure"], "operationId": "api_page", "description": "Interactive API page (Swagger UI)",
        "responses": {"200": {"description": "HTML page", "content": {"text/html": {"schema": {"type": "string"}}}}}}}
    return infra


def complete_document(generated: dict[str, Any], predict_errors: Mapping[int, str]) -> dict[str, Any]:
    """BentoML's document (``Service.openapi_spec.asdict()``) with the additions above."""
    document = copy.deepcopy(generated)
    document["openapi"] = OPENAPI_VERSION
    document["info"].update(title="transfer-serve", version=package_version(), description=(
        "Image classification with a model you can retrain. Every client error is a 4xx JSON body "
        '`{"error": "..."}` that says what to fix. `/admin/*` routes need `Authorization: Bearer '
        "<TRANSFER_SERVE_ADMIN_TOKEN>`."))
    document["info"].pop("contact", None)
    paths = document["paths"]
    predict = paths["/predict"]["post"]
    predict["requestBody"]["required"] = True
    predict.pop("x-bentoml-name", None)
    ok = {str(status): response for status, response in predict["responses"].items()}["200"]
    predict["responses"] = {"200": ok, **{str(status): _json(_ERROR, text)
                                          for status, text in sorted(predict_errors.items())}}
    for path, item in paths.items():
        for operation in item.values():
            # the Open Inference Protocol answers every bad request 400, never 422
            _validation_errors(operation, unprocessable=not path.startswith("/v2"))
    paths.update(_infrastructure(paths))
    if "/v2/" in paths:  # the mounted app's root: served at /v2 itself (service.open_inference_routes.RootPath)
        paths["/v2"] = paths.pop("/v2/")
    document["tags"] = [
        *document.get("tags", []),
        {"name": "Admin", "description": "Labels, retraining, model versions (bearer token)"},
        {"name": "Open Inference Protocol",
         "description": "KServe V2 REST (/v2) with Triton's binary tensor data and classification extensions; "
                        "no token"},
    ]
    components = document.setdefault("components", {})
    components["schemas"] = _referenced(paths, components.get("schemas", {}))
    return document


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("transfer-serve")
    except PackageNotFoundError:
        return "0+unknown"


class OpenAPIDocument:
    """ASGI middleware: ``GET /docs.json`` answers :func:`complete_document` (built on first use
    and kept: the routes do not change while the process runs); ``GET /docs`` redirects to the
    API page BentoML serves at ``/``."""

    def __init__(self, app: Any, service: Any, predict_errors: Mapping[int, str]) -> None:
        self.app = app
        self.service = service
        self.predict_errors = predict_errors
        self._body: bytes | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] == "/docs" and scope.get("method") in ("GET", "HEAD"):
            await send({"type": "http.response.start", "status": 307,
                        "headers": [(b"location", b"/"), (b"content-length", b"0")]})
            await send({"type": "http.response.body", "body": b""})
            return
        if scope["type"] != "http" or scope["path"] != "/docs.json" or scope.get("method") not in ("GET", "HEAD"):
            await self.app(scope, receive, send)
            return
        if self._body is None:
            self._body = json.dumps(complete_document(self.service.openapi_spec.asdict(), self.predict_errors)).encode()
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(self._body)).encode())]})
        await send({"type": "http.response.body", "body": self._body if scope["method"] == "GET" else b""})


class JSONRoutingErrors:
    """ASGI middleware: a plain-text 404 or 405 (what Starlette's router answers for an unknown
    path or a method a route does not take; BentoML gives no way to configure it) is sent as the
    error body, like every other client error. JSON responses pass through unchanged."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") == "HEAD":
            await self.app(scope, receive, send)
            return
        held: Message | None = None

        async def send_json_instead(message: Message) -> None:
            nonlocal held
            if message["type"] == "http.response.start" and message["status"] in (404, 405):
                headers = dict(message.get("headers") or [])
                if headers.get(b"content-type", b"").startswith(b"text/plain"):
                    held = message
                    return
            if held is None:
                await send(message)
                return
            if message.get("more_body", False):
                return  # Starlette's text is replaced whole
            allowed = dict(held.get("headers") or []).get(b"allow", b"").decode("latin-1")
            await send_error(send, routing_error(held["status"], scope["method"], scope["path"], allowed))

        await self.app(scope, receive, send_json_instead)
