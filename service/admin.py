"""The admin API, mounted at ``/admin`` on the HTTP service: label store, retrain jobs, model
versions. A Starlette app (BentoML APIs are POST-only; these routes need GET, DELETE and path
parameters), behind one bearer-token middleware that guards every route.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Match, Route

from models.errors import InputError, ModelError, VersionNotFoundError
from models.preprocess import decode_image
from models.retrain import RetrainParams, RetrainRefused
from store.errors import BACKEND_ERRORS, StorageError, storage_failure
from store.jobs import JobConflict
from store.labels import validate_label
from store.state import State, open_state

from .jobs import launch, retrainable_parent
from .limits import send_json
from .predict import display_name
from .settings import Settings, get_settings

log = logging.getLogger(__name__)


class AdminAuth:
    """``Authorization: Bearer <token>`` on every request: 401 without one, 403 with a wrong
    one (constant-time comparison), 403 for everything when no token is configured. The token
    is never logged or echoed. :meth:`refused` is also run by the request guard before it reads
    an upload, so a caller without the token cannot make the server buffer a body."""

    def __init__(self, app: Any, token: str | None) -> None:
        self.app = app
        self._token = token.encode() if token else None

    async def refused(self, scope: dict[str, Any], send: Any, *, close: bool = False) -> bool:
        """Answer 401 or 403 and return True unless the request carries the token. ``close``:
        end the connection after the answer (the request's body is left unread)."""
        if self._token is None:
            await send_json(send, 403, {"error": "the admin API is disabled: set TRANSFER_SERVE_ADMIN_TOKEN "
                                                 "on the server to enable it"}, close=close)
            return True
        header = dict(scope.get("headers") or []).get(b"authorization", b"")
        scheme, _, credentials = header.partition(b" ")
        if not header or scheme.lower() != b"bearer" or not credentials.strip():
            await send_json(send, 401, {"error": "missing bearer token: send the header Authorization: Bearer <token>"},
                            close=close, headers=[(b"www-authenticate", b"Bearer")])
            return True
        if not hmac.compare_digest(credentials.strip(), self._token):
            await send_json(send, 403, {"error": "wrong admin token"}, close=close)
            return True
        return False

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and await self.refused(scope, send):
            return
        await self.app(scope, receive, send)


def error(status: int, message: str, **extra: Any) -> JSONResponse:
    return JSONResponse({"error": message, **extra}, status_code=status)


def storage_error(exc: StorageError, outcome: str) -> JSONResponse:
    """507 Insufficient Storage for a write the state directory could not take: what failed,
    ``outcome`` (what was and was not done), and what the operator should do. Logged, since the
    operator may not be the one who sent the request."""
    log.error("%s; %s", exc, outcome)
    return error(507, f"{exc.operation} failed: the state directory {exc.problem} ({exc.cause}); "
                      f"{outcome}. To fix: {exc.hint}, then send the request again.")


class Admin:
    """Route handlers; stores are opened per process on first use."""

    def __init__(self, settings: Settings, state: State) -> None:
        self.settings = settings
        self.state = state

    # -- labels -------------------------------------------------------------------------------

    async def add_labels(self, request: Request) -> JSONResponse:
        form = await request.form(max_files=self.settings.max_files + 1)
        try:
            label = form.get("label")
            if not isinstance(label, str):
                return error(422, "missing form field 'label' (the images' class name)")
            try:
                validate_label(label)
            except InputError as exc:
                return error(422, str(exc))
            files = [f for f in form.getlist("images") if isinstance(f, UploadFile)]
            if not files:
                return error(400, "no images: send one or more files in the multipart field 'images'")
            if len(files) > self.settings.max_files:
                return error(413, f"{len(files)} images in one request; the limit is {self.settings.max_files}")
            blobs = []
            for index, upload in enumerate(files):  # validate all before storing any
                data = await upload.read()
                name = display_name(upload.filename or f"image-{index}")
                if not data:
                    return error(400, f"image {index} ('{name}') is empty", image=index, filename=name)
                if len(data) > self.settings.max_file_bytes:
                    return error(413, f"image {index} ('{name}') is {len(data)} bytes; the limit is "
                                      f"{self.settings.max_file_bytes} bytes", image=index, filename=name)
                try:
                    await asyncio.to_thread(decode_image, data, max_pixels=self.settings.max_pixels)
                except InputError as exc:
                    status = 413 if getattr(exc, "status_code", 400) == 413 else 422
                    return error(status, f"image {index} ('{name}'): {exc}", image=index, filename=name)
                blobs.append((name, data))
        finally:
            await form.close()
        try:  # all or none: a write the state directory cannot take leaves nothing behind
            results = await asyncio.to_thread(self.state.labels.add_many, [data for _, data in blobs], label,
                                              max_pixels=self.settings.max_pixels)
        except StorageError as exc:  # disk full, read-only volume: the operator must act
            return storage_error(exc, f"none of the {len(blobs)} image(s) of this request was stored")
        counts = await asyncio.to_thread(self.state.labels.counts)
        stored = []
        for (name, _), result in zip(blobs, results):
            entry = {"image_id": result.image_id, "label": result.label, "status": result.status, "filename": name}
            if result.status == "moved":
                entry["previous_label"] = result.previous_label
                entry["note"] = f"these bytes were labelled '{result.previous_label}'; now '{result.label}'"
            stored.append(entry)
        return JSONResponse({"stored": stored, "counts": counts})

    def _not_in_active(self) -> tuple[str | None, int]:
        active = self.state.registry.active()
        known = set(active.training_hashes()) if active else set()
        ids = [image.image_id for image in self.state.labels.images()]
        return (active.version if active else None), sum(1 for i in ids if i not in known)

    async def list_labels(self, request: Request) -> JSONResponse:
        counts = self.state.labels.counts()
        try:
            active, pending = await asyncio.to_thread(self._not_in_active)
        except ModelError as exc:  # the counts stand; what the active model knows cannot be told
            log.warning("GET /admin/labels: %s", exc)
            active, pending = None, None
        return JSONResponse({"counts": counts, "total": sum(counts.values()),
                             "not_in_active_model": pending, "active_version": active})

    async def delete_label(self, request: Request) -> JSONResponse:
        image_id = request.path_params["image_id"]
        if not await asyncio.to_thread(self.state.labels.delete, image_id):
            return error(404, f"no labelled image '{display_name(image_id)}'")
        return JSONResponse({"deleted": image_id, "counts": self.state.labels.counts()})

    # -- retrain jobs -------------------------------------------------------------------------

    async def start_retrain(self, request: Request) -> JSONResponse:
        body = await request.body()
        try:
            params = RetrainParams.model_validate(json.loads(body) if body.strip() else {})
        except (ValueError, ValidationError) as exc:
            detail = exc.errors(include_context=False, include_input=False) if isinstance(exc, ValidationError) else str(exc)
            return error(422, "invalid retrain parameters", detail=detail)
        try:
            parent = await asyncio.to_thread(retrainable_parent, self.state.registry, self.state.labels)
            job = await asyncio.to_thread(self.state.jobs.create, params.model_dump(), parent.version)
        except RetrainRefused as exc:
            return error(422, str(exc))
        except JobConflict as exc:
            return error(409, str(exc), job=exc.job.model_dump())
        except ModelError as exc:  # the active version is damaged: nothing to retrain from
            return error(409, f"cannot retrain from the active model version: {exc}; activate a good "
                              "version (GET /admin/models) and retry")
        except (StorageError, *BACKEND_ERRORS) as exc:  # a write the state cannot take is the operator's: 507
            failure = storage_failure(exc, "starting the retrain job")
            if failure is None:
                raise
            return storage_error(failure, "no job was started")
        try:
            pid = launch(self.state.jobs, self.settings.home, job.id)
        except OSError as exc:  # the job's log file cannot be created (or no process can start)
            failure = storage_failure(exc, "starting the retrain job")
            reason = str(failure or f"the retrain process could not be started: {exc}")
            with contextlib.suppress(*BACKEND_ERRORS):
                await asyncio.to_thread(self.state.jobs.fail, job.id, reason)
            if failure is None:
                raise
            return storage_error(failure, f"job {job.id} did not start (it is marked failed)")
        try:
            await asyncio.to_thread(self.state.jobs.set_pid, job.id, pid)
        except BACKEND_ERRORS as exc:
            failure = storage_failure(exc, "recording the retrain job's process")
            if failure is None:
                raise
            # the job cannot record its progress either: it fails, and is marked failed once gone
            return storage_error(failure, f"job {job.id} cannot run and will be marked failed")
        log.info("retrain job %s started (pid %d)", job.id, pid)
        return JSONResponse((self.state.jobs.get(job.id) or job).model_dump(), status_code=202)

    async def get_job(self, request: Request) -> JSONResponse:
        job = await asyncio.to_thread(self.state.jobs.get, request.path_params["job_id"])
        if job is None:
            return error(404, f"no retrain job '{display_name(request.path_params['job_id'])}'")
        return JSONResponse(job.model_dump())

    # -- model versions -----------------------------------------------------------------------

    async def list_models(self, request: Request) -> JSONResponse:
        try:
            pointer = self.state.registry.active_pointer()
        except ModelError as exc:
            log.error("%s", exc)
            pointer = None
        active = pointer.version if pointer else None
        versions = []
        for version in self.state.registry.versions():
            try:
                summary = version.summary()
            except ModelError as exc:  # a damaged version is listed, with what is wrong with it
                versions.append({"version": version.version, "active": version.version == active, "error": str(exc)})
                continue
            versions.append({key: summary[key] for key in ("version", "created_at", "labels", "metrics", "parent")}
                            | {"active": version.version == active, "strategy": summary["strategy"]})
        body: dict[str, Any] = {"active": active, "versions": versions}
        if pointer and pointer.fallback_from:  # why the active version is not the one activated
            body["fallback_from"] = dict(pointer.fallback_from)
        return JSONResponse(body)

    async def activate(self, request: Request) -> JSONResponse:
        version = request.path_params["version"]
        try:
            await asyncio.to_thread(self.state.registry.activate, version)
        except VersionNotFoundError as exc:
            return error(404, str(exc))
        except ModelError as exc:
            return error(409, f"version {display_name(version)} cannot be activated: {exc}")
        return JSONResponse({"active": version})


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    """Starlette's own refusals (no such route, a method the route does not take) as JSON
    bodies like every other error, not its plain-text default."""
    status = exc.status_code if isinstance(exc, HTTPException) else 400
    headers = exc.headers if isinstance(exc, HTTPException) else None
    if status == 404:
        message = f"no admin route {request.url.path}: GET /docs.json lists the routes"
    elif status == 405:
        # one Route per method here, and Starlette's Allow names only the first that matched the path
        allowed = ", ".join(sorted({method for route in request.app.routes
                                    if route.matches(request.scope)[0] != Match.NONE
                                    for method in getattr(route, "methods", None) or ()} - {"HEAD"}))
        headers = {"Allow": allowed}
        message = f"{request.method} is not allowed on {request.url.path}; it takes {allowed}"
    else:
        message = exc.detail if isinstance(exc, HTTPException) else str(exc)
    return JSONResponse({"error": message}, status_code=status, headers=headers)


async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
    log.exception("admin route %s failed", request.url.path, exc_info=exc)
    return error(500, "internal error; the server log has the details")


async def _storage_or_internal_error(request: Request, exc: Exception) -> JSONResponse:
    """Any admin route: a write (or open) the state directory cannot take is a 507 for the
    operator, with what to do; any other failure of the state is an internal error."""
    failure = storage_failure(exc, f"{request.method} {request.url.path}")
    if failure is None:
        return await _internal_error(request, exc)
    log.error("admin route %s: %s", request.url.path, failure, exc_info=exc)
    return error(507, f"{failure}. The request did not complete: fix the state directory, then send it again.")


def create_admin_app(settings: Settings | None = None, state: State | None = None) -> Any:
    settings = settings or get_settings()
    admin = Admin(settings, state or open_state(settings))
    app = Starlette(routes=[
        Route("/labels", admin.add_labels, methods=["POST"]),
        Route("/labels", admin.list_labels, methods=["GET"]),
        Route("/labels/{image_id}", admin.delete_label, methods=["DELETE"]),
        Route("/retrain", admin.start_retrain, methods=["POST"]),
        Route("/jobs/{job_id}", admin.get_job, methods=["GET"]),
        Route("/models", admin.list_models, methods=["GET"]),
        Route("/models/{version}/activate", admin.activate, methods=["POST"]),
    ], exception_handlers={HTTPException: _http_error, StorageError: _storage_or_internal_error,
                           **dict.fromkeys(BACKEND_ERRORS, _storage_or_internal_error), Exception: _internal_error})
    return AdminAuth(app, admin_token(settings))


def admin_token(settings: Settings) -> str | None:
    return settings.admin_token.get_secret_value() if settings.admin_token else None


def admin_gate(settings: Settings, prefix: str = "/admin") -> Callable[..., Awaitable[bool]]:
    """For the request guard: refuse a request under ``prefix`` without the admin token before
    its body is read (closing the connection, so the unread body is not drained either)."""
    auth = AdminAuth(None, admin_token(settings))

    async def gate(scope: dict[str, Any], send: Any) -> bool:
        path = scope["path"]
        if path != prefix and not path.startswith(prefix + "/"):
            return False
        return await auth.refused(scope, send, close=True)

    return gate
