"""The admin API, mounted at ``/admin`` on the HTTP service: label store, retrain jobs, model
versions. A Starlette app (BentoML APIs are POST-only; these routes need GET, DELETE and path
parameters), behind one bearer-token middleware that guards every route.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
from functools import cached_property
from typing import Any

from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from models.errors import InputError, ModelError, VersionNotFoundError
from models.preprocess import decode_image
from models.registry import ModelRegistry

from .jobs import JobConflict, JobStore, launch
from .labels import LabelStore, validate_label
from .limits import send_json
from .predict import display_name
from .retrain import RetrainParams, RetrainRefused, check_retrainable
from .settings import Settings, get_settings

log = logging.getLogger(__name__)


class AdminAuth:
    """``Authorization: Bearer <token>`` on every request: 401 without one, 403 with a wrong
    one (constant-time comparison), 403 for everything when no token is configured. The token
    is never logged or echoed."""

    def __init__(self, app: Any, token: str | None) -> None:
        self.app = app
        self._token = token.encode() if token else None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self._token is None:
            await send_json(send, 403, {"error": "the admin API is disabled: set TRANSFER_SERVE_ADMIN_TOKEN "
                                                 "on the server to enable it"})
            return
        header = dict(scope.get("headers") or []).get(b"authorization", b"")
        scheme, _, credentials = header.partition(b" ")
        if not header or scheme.lower() != b"bearer" or not credentials.strip():
            await send({"type": "http.response.start", "status": 401,
                        "headers": [(b"content-type", b"application/json"), (b"www-authenticate", b"Bearer")]})
            await send({"type": "http.response.body",
                        "body": b'{"error": "missing bearer token: send the header Authorization: Bearer <token>"}'})
            return
        if not hmac.compare_digest(credentials.strip(), self._token):
            await send_json(send, 403, {"error": "wrong admin token"})
            return
        await self.app(scope, receive, send)


def error(status: int, message: str, **extra: Any) -> JSONResponse:
    return JSONResponse({"error": message, **extra}, status_code=status)


class Admin:
    """Route handlers; stores are opened per process on first use."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    @cached_property
    def registry(self) -> ModelRegistry:
        return ModelRegistry(self.settings.home)

    @cached_property
    def store(self) -> LabelStore:
        return LabelStore(self.settings.home)

    @cached_property
    def jobs(self) -> JobStore:
        return JobStore(self.settings.home)

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
        stored = []
        for name, data in blobs:
            try:
                result = await asyncio.to_thread(self.store.add, data, label, max_pixels=self.settings.max_pixels)
            except OSError as exc:  # disk full, read-only volume: the operator must act
                log.error("label store write failed: %s", exc)
                return error(507, f"could not store the image: {exc.strerror or exc}")
            entry = {"image_id": result.image_id, "label": result.label, "status": result.status, "filename": name}
            if result.status == "moved":
                entry["previous_label"] = result.previous_label
                entry["note"] = f"these bytes were labelled '{result.previous_label}'; now '{result.label}'"
            stored.append(entry)
        return JSONResponse({"stored": stored, "counts": self.store.counts()})

    def _not_in_active(self) -> tuple[str | None, int]:
        active = self.registry.active()
        known = set(active.training_hashes()) if active else set()
        ids = [image.image_id for image in self.store.images()]
        return (active.version if active else None), sum(1 for i in ids if i not in known)

    async def list_labels(self, request: Request) -> JSONResponse:
        counts = self.store.counts()
        active, pending = await asyncio.to_thread(self._not_in_active)
        return JSONResponse({"counts": counts, "total": sum(counts.values()),
                             "not_in_active_model": pending, "active_version": active})

    async def delete_label(self, request: Request) -> JSONResponse:
        image_id = request.path_params["image_id"]
        if not await asyncio.to_thread(self.store.delete, image_id):
            return error(404, f"no labelled image '{display_name(image_id)}'")
        return JSONResponse({"deleted": image_id, "counts": self.store.counts()})

    # -- retrain jobs -------------------------------------------------------------------------

    async def start_retrain(self, request: Request) -> JSONResponse:
        body = await request.body()
        try:
            params = RetrainParams.model_validate(json.loads(body) if body.strip() else {})
        except (ValueError, ValidationError) as exc:
            detail = exc.errors(include_context=False, include_input=False) if isinstance(exc, ValidationError) else str(exc)
            return error(422, "invalid retrain parameters", detail=detail)
        parent = self.registry.active()
        try:
            await asyncio.to_thread(check_retrainable, self.store, parent)
            job = self.jobs.create(params.model_dump(), parent.version if parent else None)
        except RetrainRefused as exc:
            return error(422, str(exc))
        except JobConflict as exc:
            return error(409, str(exc), job=exc.job)
        pid = launch(self.settings.home, job["id"])
        self.jobs.update(job["id"], pid=pid)
        log.info("retrain job %s started (pid %d)", job["id"], pid)
        return JSONResponse(self._job_view(self.jobs.get(job["id"]) or job), status_code=202)

    @staticmethod
    def _job_view(job: dict[str, Any]) -> dict[str, Any]:
        keys = ("id", "state", "phase", "progress", "metrics", "version", "parent", "error",
                "params", "created_at", "updated_at", "finished_at")
        return {key: job.get(key) for key in keys}

    async def get_job(self, request: Request) -> JSONResponse:
        job = await asyncio.to_thread(self.jobs.get, request.path_params["job_id"])
        if job is None:
            return error(404, f"no retrain job '{display_name(request.path_params['job_id'])}'")
        return JSONResponse(self._job_view(job))

    # -- model versions -----------------------------------------------------------------------

    async def list_models(self, request: Request) -> JSONResponse:
        active = self.registry.active_version()
        versions = []
        for version in self.registry.versions():
            summary = version.summary()
            versions.append({key: summary[key] for key in ("version", "created_at", "labels", "metrics", "parent")}
                            | {"active": version.version == active, "strategy": summary["strategy"]})
        return JSONResponse({"active": active, "versions": versions})

    async def activate(self, request: Request) -> JSONResponse:
        version = request.path_params["version"]
        try:
            await asyncio.to_thread(self.registry.activate, version)
        except VersionNotFoundError as exc:
            return error(404, str(exc))
        except ModelError as exc:
            return error(409, f"version {display_name(version)} cannot be activated: {exc}")
        return JSONResponse({"active": version})


async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
    log.exception("admin route %s failed", request.url.path, exc_info=exc)
    return error(500, "internal error; the server log has the details")


def create_admin_app(settings: Settings | None = None) -> Any:
    settings = settings or get_settings()
    admin = Admin(settings)
    app = Starlette(routes=[
        Route("/labels", admin.add_labels, methods=["POST"]),
        Route("/labels", admin.list_labels, methods=["GET"]),
        Route("/labels/{image_id}", admin.delete_label, methods=["DELETE"]),
        Route("/retrain", admin.start_retrain, methods=["POST"]),
        Route("/jobs/{job_id}", admin.get_job, methods=["GET"]),
        Route("/models", admin.list_models, methods=["GET"]),
        Route("/models/{version}/activate", admin.activate, methods=["POST"]),
    ], exception_handlers={Exception: _internal_error})
    token = settings.admin_token.get_secret_value() if settings.admin_token else None
    return AdminAuth(app, token)
