"""The service's OpenAPI document, served at ``GET /docs.json`` (and so shown by the API page
at ``/``).

BentoML generates a document for the ``@bentoml.api`` routes only, with its own generic error
responses; it knows nothing of the admin API (a Starlette app mounted at ``/admin``) nor of the
``{"error": ...}`` bodies our request guard and handlers answer with. This module keeps what
BentoML derives from the API signatures (the ``/predict`` request body and result models, so
the signature stays the one source of the input schema) and adds every other route, every
status code each route really returns, a response schema for each, and the admin bearer-token
security scheme. :class:`OpenAPIDocument` is an ASGI middleware that answers ``GET /docs.json``
with that document in place of BentoML's; every other request passes through untouched.
:class:`JSONRoutingErrors` makes the routing errors of BentoML's own router (an unknown path, a
method a route does not take) the ``{"error": ...}`` bodies the document promises, instead of
Starlette's plain text.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.json_schema import models_json_schema

from models.retrain import RetrainParams

from .settings import Settings

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

OPENAPI_VERSION = "3.1.0"  # pydantic emits JSON Schema 2020-12 (nullable as anyOf null), as 3.1 has it
REF = "#/components/schemas/{model}"
SECURITY_SCHEME = "adminToken"
ADMIN_TAG = "Admin"
APP_TAG = "Service APIs"  # BentoML's tag names, kept so its UI groups our routes with its own
INFRA_TAG = "Infrastructure"


# -- response bodies (what the handlers in service/admin.py and service/predict.py return) -------

class RetrainJob(BaseModel):
    model_config = ConfigDict(extra="allow")

    id: str = Field(description="job id (32 hex digits)")
    state: Literal["queued", "running", "succeeded", "rejected", "failed"]
    phase: str = Field(description="what the job is doing now (queued, starting, embedding, fitting, ...)")
    progress: float = Field(ge=0.0, le=1.0)
    metrics: dict[str, Any] | None = Field(
        description="the candidate's and the active model's accuracy on the same held-out images, "
        "counts, and the promotion gate's reason; null until the job has evaluated")
    version: str | None = Field(description="the version the job produced, once written")
    parent: str | None = Field(description="the version it was retrained from")
    error: str | None = Field(description="why the job failed")
    params: dict[str, Any] | None = Field(description="the retrain parameters it runs with")
    created_at: str
    updated_at: str
    finished_at: str | None


class Error(BaseModel):
    """Every client error (and 503/507): a message that says what was wrong and what to do."""

    model_config = ConfigDict(extra="allow")

    error: str = Field(description="what was wrong and what to fix")
    detail: Any = Field(None, description="validation details, where a validator produced them")
    image: int | None = Field(None, ge=0, description="index of the image at fault in a multi-image request")
    filename: str | None = Field(None, description="its file name as the client sent it")
    job: RetrainJob | None = Field(None, description="409 from POST /admin/retrain: the job already queued or running")


class StoredImage(BaseModel):
    image_id: str = Field(pattern="^[0-9a-f]{64}$", description="SHA-256 of the image bytes")
    label: str
    status: Literal["stored", "unchanged", "moved"]
    filename: str
    previous_label: str | None = Field(None, description="only for status 'moved'")
    note: str | None = Field(None, description="only for status 'moved'")


class LabelsStored(BaseModel):
    stored: list[StoredImage] = Field(description="one entry per uploaded image, in order")
    counts: dict[str, int] = Field(description="images per label in the store, after this upload")


class LabelSummary(BaseModel):
    counts: dict[str, int] = Field(description="images per label")
    total: int = Field(ge=0)
    not_in_active_model: int | None = Field(None, ge=0, description="labelled images the active version was not "
                                           "trained on (null when the active version's files cannot be read)")
    active_version: str | None


class LabelDeleted(BaseModel):
    deleted: str = Field(description="the image id")
    counts: dict[str, int]


class ModelSummary(BaseModel):
    """A version's summary; a damaged version (files unreadable) has only ``version``,
    ``active`` and ``error``."""

    version: str
    active: bool
    created_at: str | None = None
    labels: list[str] | None = None
    metrics: dict[str, Any] | None = None
    parent: str | None = None
    strategy: str | None = Field(None, description="how it was trained (head, finetune, retrain, ...)")
    error: str | None = Field(None, description="what is wrong with a damaged version")


class ModelList(BaseModel):
    active: str | None = Field(description="the active version; null before the first is registered")
    versions: list[ModelSummary] = Field(description="oldest first")
    fallback_from: dict[str, Any] | None = Field(
        None, description="present when the version activated last failed verification and the service "
        "fell back to the last good one: that version and the reason")


class Activated(BaseModel):
    active: str


MODELS: tuple[type[BaseModel], ...] = (Error, RetrainJob, StoredImage, LabelsStored, LabelSummary, LabelDeleted,
                                       ModelSummary, ModelList, Activated, RetrainParams)

# -- building blocks ------------------------------------------------------------------------------

_STATUS_TEXT = {
    400: "Malformed request: a body that does not parse, a missing or misplaced field, an invalid parameter",
    401: "No bearer token: send `Authorization: Bearer <token>`",
    403: "Wrong admin token, or the admin API is disabled (no TRANSFER_SERVE_ADMIN_TOKEN on the server)",
    404: "No such resource",
    409: "Conflict with the current state",
    413: "Too large: the request body, a file, the number of files, or an image's pixels",
    415: "Unsupported content type: send multipart/form-data or application/json",
    422: "Well-formed but unusable input",
    503: "No model version is loaded yet, or the model was being replaced: retry shortly",
    507: "The state directory (or the temporary directory) could not take a write: disk full, read-only "
         "volume; the body says what to fix",
}


def _ref(model: type[BaseModel] | str) -> dict[str, str]:
    return {"$ref": REF.format(model=model if isinstance(model, str) else model.__name__)}


def _json(schema: dict[str, Any], description: str, links: dict[str, Any] | None = None) -> dict[str, Any]:
    response: dict[str, Any] = {"description": description, "content": {"application/json": {"schema": schema}}}
    if links:
        response["links"] = links
    return response


def _errors(*statuses: int, **descriptions: str) -> dict[str, Any]:
    """Error responses, all with the ``{"error": ...}`` body; ``descriptions`` (keyed ``s404``)
    replace the generic text where a route says more."""
    return {str(status): _json(_ref(Error), descriptions.get(f"s{status}", _STATUS_TEXT[status]))
            for status in statuses}


_GUARDED = (400, 413, 415)  # RequestGuard answers these on every POST before the route runs
_ADMIN = (401, 403, 507)  # every admin route: the token check, and a state directory that fails


def _admin(operation_id: str, summary: str, responses: dict[str, Any], **more: Any) -> dict[str, Any]:
    return {"tags": [ADMIN_TAG], "operationId": operation_id, "summary": summary,
            "security": [{SECURITY_SCHEME: []}], "responses": responses, **more}


def _path_parameter(name: str, description: str, pattern: str, example: str) -> dict[str, Any]:
    # The pattern documents the form of real ids; the routes take any string (404 if unknown).
    return {"name": name, "in": "path", "required": True, "description": description,
            "schema": {"type": "string", "pattern": pattern}, "example": example}


def _refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/components/schemas/"):
            yield ref.rsplit("/", 1)[1]
        for value in node.values():
            yield from _refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from _refs(value)


def _referenced(node: Any, schemas: dict[str, Any]) -> dict[str, Any]:
    """The components ``node`` refers to, transitively."""
    found: dict[str, Any] = {}
    pending = list(_refs(node))
    while pending:
        name = pending.pop()
        if name not in found and name in schemas:
            found[name] = schemas[name]
            pending.extend(_refs(schemas[name]))
    return found


# -- the document ---------------------------------------------------------------------------------

def _predict(base: dict[str, Any], settings: Settings) -> dict[str, Any]:
    operation = copy.deepcopy(base["paths"]["/predict"]["post"])
    schema = operation["requestBody"]["content"]["multipart/form-data"]["schema"]
    images = schema["properties"]["images"]
    images.update(minItems=1, maxItems=settings.max_files)
    images["description"] = (
        f"one or more image files (JPEG, PNG, GIF, WebP, AVIF, BMP, TIFF, PPM): at most {settings.max_files} "
        f"files of at most {settings.max_file_bytes} bytes and {settings.max_pixels} pixels each, "
        f"{settings.max_request_bytes} bytes in all")
    operation["requestBody"]["required"] = True
    ok = {str(status): response for status, response in operation["responses"].items()}["200"]
    ok["description"] = "One result per image, in the order sent"
    operation["responses"] = {"200": ok, **_errors(
        400, 413, 415, 422, 503,
        s400="Malformed multipart body; no files; an empty file; `images` sent as text; a file in another "
             "field; `top_k` not an integer >= 1",
        s422="A file that is not a readable image (named by `image` and `filename`)",
    )}
    operation["summary"] = "Classify images"
    operation.pop("x-bentoml-name", None)
    return operation


def _infra(base: dict[str, Any]) -> dict[str, Any]:
    text = {"text/plain": {"schema": {"type": "string"}}}
    paths: dict[str, Any] = {}
    for path in ("/livez", "/healthz", "/readyz", "/metrics"):
        operation = copy.deepcopy(base["paths"][path]["get"])
        operation["operationId"] = path.strip("/")
        operation["responses"] = {"200": {"description": "OK", "content": text}}
        paths[path] = {"get": operation}
    paths["/readyz"]["get"]["responses"]["503"] = {
        "description": "Not ready: no model version loaded and warmed up yet", "content": text}
    paths["/docs.json"] = {"get": {
        "tags": [INFRA_TAG], "operationId": "openapi", "description": "This document",
        "responses": {"200": {"description": "OpenAPI document",
                              "content": {"application/json": {"schema": {"type": "object"}}}}}}}
    paths["/schema.json"] = {"get": {
        "tags": [INFRA_TAG], "operationId": "bentoml_schema",
        "description": "BentoML's description of the service's APIs (what BentoML's Python client reads)",
        "responses": {"200": {"description": "Service schema",
                              "content": {"application/json": {"schema": {"type": "object"}}}}}}}
    paths["/"] = {"get": {
        "tags": [INFRA_TAG], "operationId": "api_page", "description": "Interactive API page (Swagger UI)",
        "responses": {"200": {"description": "HTML page", "content": {"text/html": {"schema": {"type": "string"}}}}}}}
    return paths


def _admin_paths(max_files: int, max_file_bytes: int) -> dict[str, Any]:
    image_id = _path_parameter("image_id", "a labelled image's id, as POST /admin/labels returned it",
                               "^[0-9a-f]{64}$", "0" * 64)
    job_id = _path_parameter("job_id", "a retrain job's id, as POST /admin/retrain returned it",
                             "^[0-9a-f]{32}$", "0" * 32)
    version = _path_parameter("version", "a model version", "^v[0-9]+$", "v1")
    label = {
        "type": "string", "minLength": 1, "maxLength": 64,
        "pattern": "^[A-Za-z0-9._-]([A-Za-z0-9 ._-]*[A-Za-z0-9._-])?$",
        "description": "the images' class: 1-64 ASCII letters, digits, space, '-', '_', '.'; no leading or "
                       "trailing space; not '.' or '..' (422 otherwise)",
    }
    upload = {
        "type": "object", "required": ["label", "images"],
        "properties": {
            "label": label,
            "images": {"type": "array", "minItems": 1, "maxItems": max_files,
                       "items": {"type": "string", "format": "binary"},
                       "description": f"one or more image files (at most {max_files}, {max_file_bytes} bytes "
                                      "each), checked as /predict checks them; all are checked before any is "
                                      "stored"},
        },
    }
    job_link = {"GetRetrainJob": {"operationId": "admin_get_job",
                                  "parameters": {"job_id": "$response.body#/id"}}}
    return {
        "/admin/labels": {
            "post": _admin(
                "admin_add_labels", "Label images",
                {"200": _json(_ref(LabelsStored), "Stored, deduplicated by content", links={
                    "DeleteLabelledImage": {"operationId": "admin_delete_label",
                                            "parameters": {"image_id": "$response.body#/stored/0/image_id"}}}),
                 **_errors(*_GUARDED, *_ADMIN, 422,
                           s400="Malformed multipart body; no images; an empty file; a file in a field other "
                                "than `images`, or text in `images`",
                           s422="Missing or invalid label, or a file that is not a readable image")},
                requestBody={"required": True, "content": {"multipart/form-data": {"schema": upload}}}),
            "get": _admin("admin_list_labels", "Label counts",
                          {"200": _json(_ref(LabelSummary), "Images per label"), **_errors(*_ADMIN)}),
        },
        "/admin/labels/{image_id}": {
            "delete": _admin("admin_delete_label", "Delete a labelled image",
                             {"200": _json(_ref(LabelDeleted), "Deleted"),
                              **_errors(*_ADMIN, 404, s404="No labelled image with that id")},
                             parameters=[image_id]),
        },
        "/admin/retrain": {
            "post": _admin(
                "admin_start_retrain", "Start a head-only retrain job",
                {"202": _json(_ref(RetrainJob), "The job, queued", links=job_link),
                 **_errors(*_GUARDED, *_ADMIN, 422,
                           s422="Invalid parameters, or nothing to train on (no labels, one class, a label "
                                "with fewer than 2 images)"),
                 "409": _json(_ref(Error), "A job is already queued or running (it is in `job`)", links={
                     "GetRunningJob": {"operationId": "admin_get_job",
                                       "parameters": {"job_id": "$response.body#/job/id"}}})},
                requestBody={"required": False, "content": {"application/json": {"schema": _ref(RetrainParams)}}}),
        },
        "/admin/jobs/{job_id}": {
            "get": _admin("admin_get_job", "A retrain job",
                          {"200": _json(_ref(RetrainJob), "The job"),
                           **_errors(*_ADMIN, 404, s404="No job with that id")},
                          parameters=[job_id]),
        },
        "/admin/models": {
            "get": _admin("admin_list_models", "Model versions",
                          {"200": _json(_ref(ModelList), "Every version, oldest first", links={
                              "ActivateVersion": {"operationId": "admin_activate",
                                                  "parameters": {"version": "$response.body#/versions/0/version"}}}),
                           **_errors(*_ADMIN)}),
        },
        "/admin/models/{version}/activate": {
            "post": _admin("admin_activate", "Promote or roll back to a version",
                           {"200": _json(_ref(Activated), "Now active"),
                            **_errors(*_GUARDED, *_ADMIN, 404, 409, s404="No such version",
                                      s409="The version's files fail their checksums or the model contract")},
                           parameters=[version]),
        },
    }


def build_document(bentoml_document: dict[str, Any], settings: Settings) -> dict[str, Any]:
    """The full document, from BentoML's (``Service.openapi_spec.asdict()``)."""
    predict = _predict(bentoml_document, settings)
    _, definitions = models_json_schema([(model, "serialization") for model in MODELS], ref_template=REF)
    schemas = {**_referenced(predict, bentoml_document["components"]["schemas"]), **definitions["$defs"]}
    return {
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": "transfer-serve",
            "version": _package_version(),
            "description": (
                "Image classification with a model you can retrain. Every client error is a 4xx JSON body "
                '`{"error": "..."}` that says what to fix. `/admin/*` routes need `Authorization: Bearer '
                "<TRANSFER_SERVE_ADMIN_TOKEN>`."),
        },
        "servers": [{"url": "."}],
        "tags": [{"name": APP_TAG, "description": "Classification"},
                 {"name": ADMIN_TAG, "description": "Labels, retraining, model versions (bearer token)"},
                 {"name": INFRA_TAG, "description": "Health, readiness, metrics, this document"}],
        "paths": {"/predict": {"post": predict}, **_admin_paths(settings.max_files, settings.max_file_bytes),
                  **_infra(bentoml_document)},
        "components": {
            "schemas": schemas,
            "securitySchemes": {SECURITY_SCHEME: {
                "type": "http", "scheme": "bearer",
                "description": "the server's TRANSFER_SERVE_ADMIN_TOKEN; admin routes answer 401 without a "
                               "token, 403 with a wrong one or when the server has none"}},
        },
    }


def _package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("transfer-serve")
    except PackageNotFoundError:
        return "0+unknown"


class OpenAPIDocument:
    """ASGI middleware: ``GET /docs.json`` answers the full document (built on first use and
    kept: the routes do not change while the process runs); ``GET /docs`` redirects to the API
    page BentoML serves at ``/``."""

    def __init__(self, app: Any, service: Any, settings: Settings, path: str = "/docs.json") -> None:
        self.app = app
        self.service = service
        self.settings = settings
        self.path = path
        self._body: bytes | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] == "/docs" and scope.get("method") in ("GET", "HEAD"):
            # BentoML serves its API page at /; /docs is where people (and DESIGN.md) look for it
            await send({"type": "http.response.start", "status": 307,
                        "headers": [(b"location", b"/"), (b"content-length", b"0")]})
            await send({"type": "http.response.body", "body": b""})
            return
        if scope["type"] != "http" or scope["path"] != self.path or scope.get("method") not in ("GET", "HEAD"):
            await self.app(scope, receive, send)
            return
        if self._body is None:
            document = build_document(self.service.openapi_spec.asdict(), self.settings)
            self._body = json.dumps(document).encode()
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(self._body)).encode())]})
        await send({"type": "http.response.body", "body": self._body if scope["method"] == "GET" else b""})


class JSONRoutingErrors:
    """ASGI middleware: a plain-text 404 or 405 (what Starlette's router answers for an unknown
    path or a method a route does not take; BentoML gives no way to configure it) is sent as
    ``{"error": ...}`` like every other client error. JSON responses pass through unchanged."""

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
            status = held["status"]
            path = scope["path"]
            if status == 404:
                error = f"no route {path}: GET /docs.json lists the routes"
            else:
                allowed = dict(held.get("headers") or []).get(b"allow", b"").decode("latin-1")
                error = f"{scope['method']} is not allowed on {path}; it takes {allowed}"
            body = json.dumps({"error": error}).encode()
            headers = [(key, value) for key, value in held.get("headers") or []
                       if key not in (b"content-type", b"content-length")]
            await send({"type": "http.response.start", "status": status,
                        "headers": [*headers, (b"content-type", b"application/json"),
                                    (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})

        await self.app(scope, receive, send_json_instead)
