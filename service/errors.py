"""Every error the HTTP API answers: one exception type (:class:`ApiError`), one body
(``{"error": "...", ...}``, :class:`Error`), and the status each domain error maps to.

Routes raise :class:`ApiError`; the layers below them raise domain errors
(:class:`~models.errors.InputError` and its kinds), which :func:`api_error` turns into the status
and message a client sees. ASGI middleware that answers before any framework runs (the request
guard, the admin token check) sends the same body with :func:`send_error`.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Match

from models.adapt import AdaptRefused
from models.errors import ImageDecodeError, ImageTooLargeError, InputError
from models.retrain import RetrainRefused
from store.jobs import Job
from store.labels import ImageNotFoundError, InvalidLabelError

from .open_inference import OipTooLargeError

Message = dict[str, Any]
Send = Callable[[Message], Awaitable[None]]


class Error(BaseModel):
    """Every client error (and 503/507): a message that says what was wrong and what to do."""

    model_config = ConfigDict(extra="forbid")

    error: str = Field(description="what was wrong and what to fix")
    detail: Any = Field(None, description="validation details, where a validator produced them")
    image: int | None = Field(None, ge=0, description="index of the image at fault in a multi-image request")
    filename: str | None = Field(None, description="its file name as the client sent it")
    job: Job | None = Field(None, description="409 from POST /admin/retrain: the job already queued or running")


class ApiError(Exception):
    """An answer other than success: HTTP ``status`` and the :class:`Error` body's fields."""

    def __init__(self, status: int, message: str, *, headers: dict[str, str] | None = None, **extra: Any) -> None:
        super().__init__(message)
        self.status = status
        self.headers = headers
        self.extra = extra

    def body(self) -> dict[str, Any]:
        return error_body(str(self), **self.extra)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def error_body(message: str, **extra: Any) -> dict[str, Any]:
    """The one error body: ``{"error": message}`` plus whichever :class:`Error` fields apply."""
    return {"error": message, **{key: value for key, value in extra.items() if value is not None}}


#: The status of each kind of bad input; :class:`InputError` itself is 400.
_INPUT_STATUS: tuple[tuple[type[InputError], int], ...] = (
    (ImageTooLargeError, 413),
    (OipTooLargeError, 413),
    (ImageDecodeError, 422),
    (InvalidLabelError, 422),
    (RetrainRefused, 422),
    (AdaptRefused, 422),
    (ImageNotFoundError, 404),
)


def input_status(exc: InputError) -> int:
    """The HTTP status for a domain error about a caller's input."""
    return next((status for kind, status in _INPUT_STATUS if isinstance(exc, kind)), 400)


def api_error(exc: InputError, *, image: int | None = None, filename: str | None = None) -> ApiError:
    """``exc`` as the client sees it; for one image of several, the message and body name it."""
    if image is None:
        return ApiError(input_status(exc), str(exc))
    return ApiError(input_status(exc), f"image {image} ('{filename}'): {exc}", image=image, filename=filename)


def routing_error(status: int, method: str, path: str, allowed: str = "") -> ApiError:
    """A router's refusal (404: no such route; 405: ``method`` is not one of ``allowed``)."""
    if status == 405:
        return ApiError(405, f"{method} is not allowed on {path}; it takes {allowed}", headers={"Allow": allowed})
    return ApiError(404, f"no route {path}: GET /docs.json lists the routes")


async def api_error_handler(request: Request, exc: Exception) -> JSONResponse:
    """A FastAPI exception handler: an :class:`ApiError` raised by a route, as its response."""
    if not isinstance(exc, ApiError):
        raise exc
    return exc.response()


async def http_error_handler(request: Request, exc: Exception) -> JSONResponse:
    """A FastAPI exception handler: the router's refusals (no such route, a method the route does
    not take) as the same bodies as BentoML's router gives (service/openapi.py)."""
    status = exc.status_code if isinstance(exc, HTTPException) else 400
    if status not in (404, 405):
        return ApiError(status, exc.detail if isinstance(exc, HTTPException) else str(exc)).response()
    # one route per method here, and Starlette's Allow names only the first that matched the path
    allowed = ", ".join(sorted({method for route in request.app.routes
                                if route.matches(request.scope)[0] != Match.NONE
                                for method in getattr(route, "methods", None) or ()} - {"HEAD"}))
    return routing_error(status, request.method, request.url.path, allowed).response()


async def send_error(send: Send, error: ApiError, *, close: bool = False,
                     headers: list[tuple[bytes, bytes]] | None = None) -> None:
    """Send ``error`` from plain ASGI middleware; ``close`` ends the connection after it (for a
    request whose body is left unread: the server would otherwise read all of it to reuse the
    connection)."""
    payload = json.dumps(error.body()).encode()
    raw = [*(headers or []), *((k.lower().encode(), v.encode()) for k, v in (error.headers or {}).items()),
           (b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    if close:
        raw.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": error.status, "headers": raw})
    await send({"type": "http.response.body", "body": payload})


def documented(*statuses: int, **descriptions: str) -> dict[int | str, dict[str, Any]]:
    """OpenAPI responses (FastAPI's ``responses=``) for error statuses, all with the
    :class:`Error` body; ``descriptions`` (keyed ``s404``) replace the generic text."""
    return {status: {"model": Error, "description": descriptions.get(f"s{status}", STATUS_TEXT[status])}
            for status in statuses}


STATUS_TEXT = {
    400: "Malformed request: a body that does not parse, a missing or misplaced field, an invalid parameter",
    401: "No bearer token: send `Authorization: Bearer <token>`",
    403: "Wrong admin token, or the admin API is disabled (no TRANSFER_SERVE_ADMIN_TOKEN on the server)",
    404: "No such resource",
    409: "Conflict with the current state",
    413: "Too large: the request body, a file, the number of files, or an image's pixels",
    415: "Unsupported content type: send multipart/form-data or application/json",
    422: "Well-formed but unusable input",
    503: "No model version is loaded yet, the model was being replaced, or (admin routes) the shared database or "
         "object store cannot be reached: retry shortly (Retry-After says when)",
    507: "The state directory (or the temporary directory) could not take a write: disk full, read-only "
         "volume; the body says what to fix",
}
#: What the request guard (service/limits.py) answers on every POST before the route runs.
GUARDED = (400, 413, 415)
