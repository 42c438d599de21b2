"""The Open Inference Protocol's routes (KServe V2 REST, with Triton's binary tensor data and
classification extensions), mounted at ``/v2`` on the HTTP service, unauthenticated like
``/predict``, so Triton's and KServe's clients work unchanged.

One model, named by ``TRANSFER_SERVE_OIP_MODEL_NAME``, whose version is the registry's active one.
It takes one input per request: ``images`` (BYTES [N]: encoded image files, decoded and
centre-cropped as ``/predict`` does) or ``pixels`` (UINT8 [N, S, S, 3]: crops a client made
itself with the version's preprocessing); and it has three outputs: ``probabilities`` (FP32
[N, C]), ``label`` (BYTES [N], the most probable) and ``embedding`` (FP32 [N, E]). The requests go
through the service instance's own path to the model (:meth:`service.service.TransferServe.run_model`),
so they share batches, the version swap and the limits with ``/predict``.

The bodies are parsed and built by :mod:`service.open_inference`; this module only routes. The
request guard (:mod:`service.limits`) has already bounded the body's size when a route runs.
"""

# No `from __future__ import annotations`: FastAPI reads the routes' annotations at run time.
import logging
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, Literal, Protocol, cast

import numpy as np
from fastapi import FastAPI, Path, Request, Response
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse

from models.errors import InputError
from models.spec import ModelSpec

from .active import ActiveVersion, Ran
from .errors import GUARDED, ApiError, api_error, api_error_handler, documented, http_error_handler
from .metrics import observe_predictions
from .open_inference import (
    DATATYPES,
    EXTENSIONS,
    InputTensor,
    OipError,
    OutputTensor,
    RequestedOutput,
    check_outputs,
    classification_output,
    encode_infer_response,
    model_metadata,
    parse_infer_request,
    server_metadata,
    tensor_metadata,
)
from .predict import build_predictions
from .settings import Settings

log = logging.getLogger(__name__)

PREFIX = "/v2"
#: The server's name in ``GET /v2`` (the model's is a setting).
SERVER_NAME = "transfer-serve"
IMAGES_INPUT = "images"
PIXELS_INPUT = "pixels"
OUTPUTS = ("probabilities", "label", "embedding")
TAGS: list[Any] = ["Open Inference Protocol"]
BINARY = "application/octet-stream"


class Backend(Protocol):
    """What the routes need of the running service (:class:`service.service.TransferServe`)."""

    active: ActiveVersion

    async def run_model(self, crops_for: Callable[[ModelSpec], Awaitable[np.ndarray]], *,
                        version: str | None = None, embeddings: bool = False) -> Ran: ...

    async def decode_images(self, blobs: list[bytes], spec: ModelSpec,
                            refusal: Callable[[InputError, int], ApiError]) -> np.ndarray: ...

    async def inference_ready(self) -> bool: ...


# -- the response bodies, as documented (the codec builds them) ----------------------------------

class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str] = Field(description="the protocol extensions this server implements")


class Live(BaseModel):
    live: bool


class Ready(BaseModel):
    ready: bool


class TensorMetadata(BaseModel):
    name: str
    datatype: Literal[DATATYPES]  # type: ignore[valid-type]
    shape: list[int] = Field(description="-1 for a variable dimension")


class ModelMetadata(BaseModel):
    name: str
    versions: list[str] = Field(description="the version served (the registry's active one)")
    platform: str
    inputs: list[TensorMetadata] = Field(description="a request sends one of them")
    outputs: list[TensorMetadata]


class ModelReady(BaseModel):
    name: str
    ready: bool


class OutputData(BaseModel):
    name: str
    datatype: Literal[DATATYPES]  # type: ignore[valid-type]
    shape: list[int]
    data: list[Any] | None = Field(None, description="the elements, row-major (absent when sent as binary data)")
    parameters: dict[str, Any] | None = Field(None, description="binary_data_size when sent as binary data")


class InferResponse(BaseModel):
    model_name: str
    model_version: str = Field(description="the version that ran the request")
    id: str | None = Field(None, description="the request's id, echoed")
    outputs: list[OutputData]


_TENSOR_PARAMETERS = {"type": "object", "properties": {
    "binary_data_size": {"type": "integer", "minimum": 0},
    "content_type": {"type": "string", "description": "\"base64\": BYTES elements sent as base64 strings"}}}
#: The infer request's JSON (read by the codec, not by FastAPI: binary tensor data follows it).
INFER_REQUEST_SCHEMA: dict[str, Any] = {
    "type": "object", "required": ["inputs"], "properties": {
        "id": {"type": "string"},
        "parameters": {"type": "object", "properties": {"binary_data_output": {"type": "boolean"}}},
        "inputs": {"type": "array", "minItems": 1, "maxItems": 1, "items": {
            "type": "object", "required": ["name", "datatype", "shape"], "properties": {
                "name": {"type": "string", "enum": [IMAGES_INPUT, PIXELS_INPUT]},
                "datatype": {"type": "string", "enum": ["BYTES", "UINT8"]},
                "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}},
                "data": {"type": "array"},
                "parameters": _TENSOR_PARAMETERS}}},
        "outputs": {"type": "array", "minItems": 1, "items": {
            "type": "object", "required": ["name"], "properties": {
                "name": {"type": "string", "enum": list(OUTPUTS)},
                "parameters": {"type": "object", "properties": {
                    "binary_data": {"type": "boolean"}, "classification": {"type": "integer", "minimum": 0}}}}}},
    }}


async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
    log.exception("%s %s failed", request.method, request.url.path, exc_info=exc)
    return ApiError(500, "internal error; the server log has the details").response()


def _shown(text: str) -> str:
    """Client-given text, safe to echo in a message."""
    return "".join(ch if ch.isprintable() else "?" for ch in text)[:100]


def served_version(requested: str | None) -> str | None:
    """A version as a client names it in a URL: ``v3`` or Triton's plain ``3``."""
    if requested is None:
        return None
    return f"v{requested}" if requested.isascii() and requested.isdigit() else _shown(requested)


def create_open_inference_app(settings: Settings, backend: Callable[[], Backend], server_version: str) -> FastAPI:
    """The ``/v2`` app; ``backend()`` is the running service instance (looked up per request: the
    app is built before BentoML creates the instance)."""
    model_name = settings.oip_model_name
    app = FastAPI(title="transfer-serve Open Inference Protocol", openapi_url=None, docs_url=None, redoc_url=None,
                  exception_handlers={ApiError: api_error_handler, HTTPException: http_error_handler,
                                      RequestValidationError: http_error_handler, Exception: _internal_error})

    def model_named(name: str) -> None:
        if name != model_name:
            raise ApiError(404, f"no model '{_shown(name)}': this server serves '{model_name}'")

    def active(version: str | None) -> tuple[str, ModelSpec]:
        current, spec = backend().active.current()
        wanted = served_version(version)
        if wanted is not None and wanted != current:
            raise ApiError(404, f"model version {wanted} is not being served; {current} is")
        return current, spec

    ModelName = Annotated[str, Path(description="TRANSFER_SERVE_OIP_MODEL_NAME", examples=[model_name])]
    ModelVersion = Annotated[str, Path(description="the version served, as the registry names it (v3) or as a "
                                                   "number (3)", examples=["v1"])]

    @app.get("/", operation_id="oip_server_metadata", summary="Server metadata", tags=TAGS,
             response_model=ServerMetadata)
    async def server() -> dict[str, Any]:
        return server_metadata(SERVER_NAME, server_version, EXTENSIONS)

    @app.get("/health/live", operation_id="oip_live", summary="Server live", tags=TAGS, response_model=Live)
    async def live() -> dict[str, Any]:
        return {"live": True}

    @app.get("/health/ready", operation_id="oip_ready", summary="Server ready", tags=TAGS, response_model=Ready,
             responses=documented(503))
    async def ready() -> dict[str, Any]:
        active(None)  # 503 while no version is active
        if not await backend().inference_ready():
            raise ApiError(503, "the model is loading: retry shortly")
        return {"ready": True}

    def metadata(name: str, version: str | None) -> dict[str, Any]:
        model_named(name)
        current, spec = active(version)
        size = spec.preprocess.input_size
        return model_metadata(name, versions=[current], inputs=[
            tensor_metadata(IMAGES_INPUT, "BYTES", [-1]),
            tensor_metadata(PIXELS_INPUT, "UINT8", [-1, size, size, 3]),
        ], outputs=[
            tensor_metadata("probabilities", "FP32", [-1, spec.num_classes]),
            tensor_metadata("label", "BYTES", [-1]),
            tensor_metadata("embedding", "FP32", [-1, spec.embedding_size]),
        ])

    not_found = documented(404, 503, s404="No model of that name, or the version is not the one served")

    @app.get("/models/{name}", operation_id="oip_model_metadata", summary="Model metadata", tags=TAGS,
             response_model=ModelMetadata, responses=not_found)
    async def model(name: ModelName) -> dict[str, Any]:
        return metadata(name, None)

    @app.get("/models/{name}/versions/{version}", operation_id="oip_model_version_metadata",
             summary="Model version metadata", tags=TAGS, response_model=ModelMetadata, responses=not_found)
    async def model_version(name: ModelName, version: ModelVersion) -> dict[str, Any]:
        return metadata(name, version)

    async def model_ready(name: str, version: str | None) -> dict[str, Any]:
        model_named(name)
        active(version)
        return {"name": name, "ready": await backend().inference_ready()}

    @app.get("/models/{name}/ready", operation_id="oip_model_ready", summary="Model ready", tags=TAGS,
             response_model=ModelReady, responses=not_found)
    async def ready_model(name: ModelName) -> dict[str, Any]:
        return await model_ready(name, None)

    @app.get("/models/{name}/versions/{version}/ready", operation_id="oip_model_version_ready",
             summary="Model version ready", tags=TAGS, response_model=ModelReady, responses=not_found)
    async def ready_model_version(name: ModelName, version: ModelVersion) -> dict[str, Any]:
        return await model_ready(name, version)

    async def infer(request: Request, name: str, version: str | None) -> Response:
        model_named(name)
        body = await request.body()  # bounded by the request guard
        try:
            parsed = parse_infer_request(body, json_length=request.headers.get("inference-header-content-length"))
            check_outputs(parsed.outputs, OUTPUTS)
            crops_for = _crops_for(parsed.inputs, settings, backend())
            outputs = parsed.outputs or [RequestedOutput(output, parsed.binary_data_output) for output in OUTPUTS]
            for output in outputs:
                if output.class_count and output.name != "probabilities":
                    raise OipError(f"classification applies to output 'probabilities', not '{output.name}'")
        except OipError as exc:
            raise api_error(exc) from None
        ran = await backend().run_model(crops_for, version=served_version(version),
                                        embeddings=any(output.name == "embedding" for output in outputs))
        observe_predictions(ran.version, build_predictions(ran.probabilities, ran.spec.labels, 1, ran.version))
        try:
            content, headers = encode_infer_response(model_name=name, model_version=ran.version,
                                                     request_id=parsed.id,
                                                     outputs=[_output(output, ran) for output in outputs])
        except OipError as exc:
            raise api_error(exc) from None
        return Response(content, headers=headers)

    infer_body = {"requestBody": {"required": True, "content": {
        "application/json": {"schema": INFER_REQUEST_SCHEMA},
        BINARY: {"schema": {"type": "string", "format": "binary",
                            "description": "the JSON request, then the inputs' binary data; "
                                           "Inference-Header-Content-Length gives the JSON's length"}}}}}
    infer_responses: dict[int | str, dict[str, Any]] = {
        200: {"description": "The outputs: JSON, or JSON then binary data (application/octet-stream with "
                             "Inference-Header-Content-Length)",
              "content": {BINARY: {"schema": {"type": "string", "format": "binary"}}}},
        **documented(*GUARDED, 404, 503,
                     s400="A body that does not parse; an unknown input or output; a wrong datatype or shape; "
                          "malformed binary framing; an image that cannot be decoded",
                     s404="No model of that name, or the version is not the one served",
                     s413="Too large: the body, an image, or more images than one request takes")}

    @app.post("/models/{name}/infer", operation_id="oip_infer", summary="Inference", tags=TAGS,
              response_model=InferResponse, responses=infer_responses, openapi_extra=infer_body)
    async def infer_active(request: Request, name: ModelName) -> Response:
        return await infer(request, name, None)

    @app.post("/models/{name}/versions/{version}/infer", operation_id="oip_infer_version",
              summary="Inference on a version", tags=TAGS, response_model=InferResponse,
              responses=infer_responses, openapi_extra=infer_body)
    async def infer_version(request: Request, name: ModelName, version: ModelVersion) -> Response:
        return await infer(request, name, version)

    return app


def _crops_for(inputs: list[InputTensor], settings: Settings,
               backend: Backend) -> Callable[[ModelSpec], Awaitable[np.ndarray]]:
    """How to make the request's uint8 crops for a version's spec (:meth:`Backend.run_model`)."""
    if len(inputs) != 1:
        raise OipError(f"send one input, '{IMAGES_INPUT}' (BYTES: encoded image files) or '{PIXELS_INPUT}' "
                       f"(UINT8 [N, S, S, 3] crops), not {len(inputs)}")
    tensor = inputs[0]
    if tensor.name == IMAGES_INPUT:
        return _images(tensor, settings, backend)
    if tensor.name == PIXELS_INPUT:
        return _pixels(tensor, settings)
    raise OipError(f"the model has no input '{_shown(tensor.name)}': send '{IMAGES_INPUT}' (BYTES: encoded image "
                   f"files) or '{PIXELS_INPUT}' (UINT8 [N, S, S, 3] crops)")


def _count(tensor: InputTensor, settings: Settings) -> int:
    count = tensor.shape[0] if tensor.shape else 0
    if count < 1:
        raise OipError(f"input '{tensor.name}' holds no images (shape {tensor.shape})")
    if count > settings.max_files:
        raise ApiError(413, f"{count} images in one request; the limit is {settings.max_files}. Split the request.")
    return count


def _images(tensor: InputTensor, settings: Settings, backend: Backend) -> Callable[[ModelSpec], Awaitable[np.ndarray]]:
    if tensor.datatype != "BYTES":
        raise OipError(f"input '{IMAGES_INPUT}' must be BYTES (encoded image files), not {tensor.datatype}; "
                       f"send crops as '{PIXELS_INPUT}' (UINT8)")
    if len(tensor.shape) not in (1, 2) or (len(tensor.shape) == 2 and tensor.shape[1] != 1):
        raise OipError(f"input '{IMAGES_INPUT}' must have shape [N] (or [N, 1]): one encoded image per element, "
                       f"not {tensor.shape}")
    _count(tensor, settings)
    blobs = cast("list[bytes]", tensor.data)  # BYTES data is a list (the codec's contract)
    for index, blob in enumerate(blobs):
        if not blob:
            raise OipError(f"input '{IMAGES_INPUT}' element {index} is empty")
        if len(blob) > settings.max_file_bytes:
            raise ApiError(413, f"input '{IMAGES_INPUT}' element {index} is {len(blob)} bytes; the limit is "
                                f"{settings.max_file_bytes} bytes")

    def refusal(exc: InputError, index: int) -> ApiError:
        return ApiError(400, f"input '{IMAGES_INPUT}' element {index}: {exc}")

    async def crops_for(spec: ModelSpec) -> np.ndarray:
        return await backend.decode_images(blobs, spec, refusal)

    return crops_for


def _pixels(tensor: InputTensor, settings: Settings) -> Callable[[ModelSpec], Awaitable[np.ndarray]]:
    if tensor.datatype != "UINT8":
        raise OipError(f"input '{PIXELS_INPUT}' must be UINT8 crops, not {tensor.datatype}; send encoded image "
                       f"files as '{IMAGES_INPUT}' (BYTES)")
    count = _count(tensor, settings)
    crops = cast("np.ndarray", tensor.data)  # numeric data is an array (the codec's contract)

    async def crops_for(spec: ModelSpec) -> np.ndarray:
        size = spec.preprocess.input_size
        if list(crops.shape) != [count, size, size, 3]:
            raise ApiError(400, f"input '{PIXELS_INPUT}' has shape {list(crops.shape)}; this model takes "
                                f"[N, {size}, {size}, 3] (uint8 RGB crops, made with its preprocessing)")
        return crops

    return crops_for


def _output(requested: RequestedOutput, ran: Ran) -> OutputTensor:
    name, binary = requested.name, requested.binary_data
    if name == "probabilities":
        probabilities = np.ascontiguousarray(ran.probabilities, dtype=np.float32)
        if requested.class_count:
            return classification_output(name, probabilities, ran.spec.labels, requested.class_count, binary=binary)
        return OutputTensor.from_array(name, probabilities, binary=binary)
    if name == "label":
        best = ran.probabilities.argmax(axis=1).tolist()
        return OutputTensor(name, "BYTES", [len(best)], [ran.spec.labels[i].encode() for i in best], binary)
    assert ran.embeddings is not None  # noqa: S101 - asked for whenever "embedding" is an output
    return OutputTensor.from_array(name, np.ascontiguousarray(ran.embeddings, dtype=np.float32), binary=binary)


class RootPath:
    """ASGI middleware: ``/v2`` itself is the server metadata route. Mounted apps answer their
    mount point with a redirect to ``/v2/``, which Triton's client does not follow."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"] == PREFIX:
            scope = {**scope, "path": PREFIX + "/", "raw_path": (PREFIX + "/").encode()}
        await self.app(scope, receive, send)
