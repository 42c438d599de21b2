"""The admin API, mounted at ``/admin`` on the HTTP service: label store, retrain jobs, model
versions.

A FastAPI app: each route declares its response model (the class it returns) and every status it
answers, so the OpenAPI document is generated from the routes (BentoML merges a mounted FastAPI
app's document into ``/docs.json``). FastAPI's own answers are mapped onto the API's contract:
its validation errors, 404s and 405s become the same ``{"error": ...}`` bodies and status codes as
every other refusal (:mod:`service.errors`). One ASGI middleware checks the bearer token on every
request, unknown routes included, before any route runs.
"""

# No `from __future__ import annotations`: FastAPI reads the routes' annotations at run time, and
# some refer to fields built from the settings inside create_admin_app.
import asyncio
import functools
import hmac
import logging
from collections.abc import Callable
from enum import Enum
from typing import Annotated, Any

from fastapi import Body, FastAPI, File, Form, Path, Query, Request, Response, Security, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.security import HTTPBearer
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse

from models.adapt import MIN_TARGET_IMAGES, AdaptParams, AdaptRefused, AlignmentMethod, check_adaptable
from models.errors import InputError, ModelError, VersionNotFoundError
from models.preprocess import SUPPORTED_FORMATS, image_media_type
from models.retrain import RetrainParams, RetrainRefused
from models.review import CANDIDATE_FACTOR, MAX_CANDIDATES, spread_out
from store.errors import BACKEND_ERRORS, StorageError, StoreUnavailable, storage_failure
from store.jobs import Job, JobConflict, JobKind
from store.labels import LABEL_PATTERN, MAX_LABEL_LENGTH, CheckedImage, check_image, validate_domain, validate_label
from store.predictions import KeptPrediction, PredictionNotFoundError, ReviewOrder
from store.registry import parent_model
from store.state import State

from .adapt import save_targets
from .errors import (
    GUARDED,
    ApiError,
    Error,
    Send,
    api_error,
    api_error_handler,
    documented,
    http_error_handler,
    send_error,
)
from .jobs import launch, retrainable_parent
from .limits import display_name
from .providers import serves_on_cpu
from .runtime import served_variant
from .schemas import (
    Activated,
    Feedback,
    LabelDeleted,
    LabelsStored,
    LabelSummary,
    ModelList,
    ModelSummary,
    PredictionDeleted,
    Replica,
    ReviewItem,
    ReviewQueue,
    StoredImage,
)
from .settings import Settings

log = logging.getLogger(__name__)

SECURITY_SCHEME = "adminToken"
TAGS: list[str | Enum] = ["Admin"]
#: What the state raises when a write fails: StorageError, or a backend's own error.
STATE_ERRORS: tuple[type[Exception], ...] = (StorageError, *BACKEND_ERRORS)


class AdminAuth:
    """``Authorization: Bearer <token>`` on every request: 401 without one, 403 with a wrong
    one (constant-time comparison), 403 for everything when no token is configured. The token
    is never logged or echoed. :meth:`refused` is also run by the request guard before it reads
    an upload, so a caller without the token cannot make the server buffer a body."""

    def __init__(self, app: Any, token: str | None) -> None:
        self.app = app
        self._token = token.encode() if token else None

    async def refused(self, scope: dict[str, Any], send: Send, *, close: bool = False) -> bool:
        """Answer 401 or 403 and return True unless the request carries the token. ``close``:
        end the connection after the answer (the request's body is left unread)."""
        if self._token is None:
            await send_error(send, ApiError(403, "the admin API is disabled: set TRANSFER_SERVE_ADMIN_TOKEN on "
                                                 "the server to enable it"), close=close)
            return True
        header = dict(scope.get("headers") or []).get(b"authorization", b"")
        scheme, _, credentials = header.partition(b" ")
        if not header or scheme.lower() != b"bearer" or not credentials.strip():
            await send_error(send, ApiError(401, "missing bearer token: send the header Authorization: Bearer <token>"),
                             close=close, headers=[(b"www-authenticate", b"Bearer")])
            return True
        if not hmac.compare_digest(credentials.strip(), self._token):
            await send_error(send, ApiError(403, "wrong admin token"), close=close)
            return True
        return False

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Send) -> None:
        if scope["type"] == "http" and await self.refused(scope, send):
            return
        await self.app(scope, receive, send)


def admin_token(settings: Settings) -> str | None:
    return settings.admin_token.get_secret_value() if settings.admin_token else None


def admin_gate(settings: Settings, prefix: str = "/admin") -> Any:
    """For the request guard: refuse a request under ``prefix`` without the admin token before
    its body is read (closing the connection, so the unread body is not drained either)."""
    auth = AdminAuth(None, admin_token(settings))

    async def gate(scope: dict[str, Any], send: Send) -> bool:
        path = scope["path"]
        if path != prefix and not path.startswith(prefix + "/"):
            return False
        return await auth.refused(scope, send, close=True)

    return gate


def storage_error(exc: StorageError, outcome: str) -> ApiError:
    """507 Insufficient Storage for a write the state directory could not take: what failed,
    ``outcome`` (what was and was not done), and what the operator should do. Logged, since the
    operator may not be the one who sent the request."""
    log.error("%s; %s", exc, outcome)
    return ApiError(507, f"{exc.operation} failed: the state directory {exc.problem} ({exc.cause}); "
                         f"{outcome}. To fix: {exc.hint}, then send the request again.")


def _id_parameter(description: str, pattern: str, example: str) -> Any:
    # the pattern documents the form of real ids; the routes take any string (404 if unknown)
    return Path(description=description, json_schema_extra={"pattern": pattern}, examples=[example])


ImageId = Annotated[str, _id_parameter("a labelled image's id, as POST /admin/labels returned it",
                                       "^[0-9a-f]{64}$", "0" * 64)]
JobId = Annotated[str, _id_parameter("a retrain job's id, as POST /admin/retrain returned it",
                                     "^[0-9a-f]{32}$", "0" * 32)]
Version = Annotated[str, _id_parameter("a model version", "^v[0-9]+$", "v1")]
PredictionId = Annotated[str, _id_parameter("a kept prediction's id, as /predict returned it", "^[0-9a-f]{32}$",
                                            "0" * 32)]
#: Most items one review request returns.
MAX_REVIEW_ITEMS = 100


# -- the framework's own answers, mapped onto the API's contract ------------------------------------

#: A required form field FastAPI found missing: the status and message the contract gives it.
_MISSING_FIELDS = {
    "images": ApiError(400, "no images: send one or more files in the multipart field 'images'"),
    "label": ApiError(422, "missing form field 'label' (the images' class name)"),
}


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    """FastAPI's 422 ``{"detail": [...]}``: a missing upload field as the contract words it, any
    other invalid input as a 422 naming what is wrong (``detail``: pydantic's list, without the
    echoed input)."""
    errors = exc.errors()
    upload = "json" not in request.headers.get("content-type", "")  # the form routes' fields, not a JSON body's
    for error in errors:
        field = error.get("loc", ())[-1:]
        if upload and error.get("type") == "missing" and field and field[0] in _MISSING_FIELDS:
            return _MISSING_FIELDS[field[0]].response()
    detail = [{"loc": [part for part in error.get("loc", ()) if part != "body"], "msg": error.get("msg"),
               "type": error.get("type")} for error in errors]
    what = "retrain parameters" if request.url.path.endswith("/retrain") else "request"
    problems = "; ".join(f"{'.'.join(map(str, d['loc'])) or 'body'}: {d['msg']}" for d in detail)
    return ApiError(422, f"invalid {what}: {problems}", detail=detail).response()


#: What a client that met an unreachable database or object store should wait before retrying.
RETRY_AFTER_S = 5


async def _unavailable(request: Request, exc: StoreUnavailable) -> JSONResponse:
    log.warning("admin route %s: %s", request.url.path, exc)
    return ApiError(503, str(exc), headers={"Retry-After": str(RETRY_AFTER_S)}).response()


async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
    log.exception("admin route %s failed", request.url.path, exc_info=exc)
    return ApiError(500, "internal error; the server log has the details").response()


async def _storage_or_internal_error(request: Request, exc: Exception) -> JSONResponse:
    """Any admin route: a write (or open) the state directory cannot take is a 507 for the
    operator, with what to do; any other failure of the state is an internal error."""
    failure = storage_failure(exc, f"{request.method} {request.url.path}")
    if failure is None:
        return await _internal_error(request, exc)
    log.error("admin route %s: %s", request.url.path, failure, exc_info=exc)
    return ApiError(507, f"{failure}. The request did not complete: fix the state directory, then send it "
                         "again.").response()


def create_admin_app(settings: Settings, state: State) -> FastAPI:
    """The admin app for ``settings`` on the stores of ``state``, token check included."""
    bearer = HTTPBearer(scheme_name=SECURITY_SCHEME, auto_error=False,
                        description="the server's TRANSFER_SERVE_ADMIN_TOKEN; admin routes answer 401 without a "
                                    "token, 403 with a wrong one or when the server has none")
    app = FastAPI(title="transfer-serve admin", openapi_url=None, docs_url=None, redoc_url=None,
                  dependencies=[Security(bearer)], responses=documented(401, 403, 503, 507),
                  exception_handlers={
                      ApiError: api_error_handler, RequestValidationError: _validation_error,
                      HTTPException: http_error_handler,
                      StoreUnavailable: _unavailable, StorageError: _storage_or_internal_error,
                      **dict.fromkeys(BACKEND_ERRORS, _storage_or_internal_error), Exception: _internal_error})
    images_field = File(
        description=f"one or more image files ({', '.join(SUPPORTED_FORMATS)}; at most {settings.max_files}, "
                    f"{settings.max_file_bytes} bytes each), checked as /predict checks them; all are checked "
                    "before any is stored",
        # format binary, as /predict's files are documented (and fuzzed), not FastAPI's contentMediaType
        json_schema_extra={"minItems": 1, "maxItems": settings.max_files,
                           "items": {"type": "string", "format": "binary"}})
    label_field = Form(
        description="the images' class: 1-64 ASCII letters, digits, space, '-', '_', '.'; no leading or trailing "
                    "space; not '.' or '..' (422 otherwise)",
        json_schema_extra={"minLength": 1, "maxLength": MAX_LABEL_LENGTH, "pattern": LABEL_PATTERN})
    domain_field = Form(
        description="optional domain tag (where the images come from: a camera, a site), named as labels are; "
                    "labelled images of a domain judge versions adapted to it (POST /admin/adapt)",
        json_schema_extra={"minLength": 1, "maxLength": MAX_LABEL_LENGTH, "pattern": LABEL_PATTERN})

    @app.post("/labels", operation_id="admin_add_labels", summary="Label images", tags=TAGS,
              response_model=LabelsStored, response_model_exclude_unset=True,
              responses={200: {"description": "Stored, deduplicated by content", "links": {
                  "DeleteLabelledImage": {"operationId": "admin_delete_label",
                                          "parameters": {"image_id": "$response.body#/stored/0/image_id"}}}},
                         **documented(*GUARDED, 422,
                                      s400="Malformed multipart body; no images; an empty file; a file in a "
                                           "field other than `images`, or text in `images`",
                                      s422="Missing or invalid label, or a file that is not a readable image")})
    async def add_labels(label: Annotated[str, label_field],
                         images: Annotated[list[UploadFile], images_field],
                         domain: Annotated[str | None, domain_field] = None) -> LabelsStored:
        try:
            validate_label(label)
            validate_domain(domain)
        except InputError as exc:
            raise api_error(exc) from None
        names, checked = await _checked_uploads(images)
        results = await _store_labels(checked, label, domain)
        counts = await asyncio.to_thread(state.labels.counts)
        return LabelsStored(stored=[StoredImage.of(result, name) for name, result in zip(names, results, strict=True)],
                            counts=counts)

    async def _checked_uploads(images: list[UploadFile]) -> tuple[list[str], list[CheckedImage]]:
        """Every upload decoded and within the pixel limit (a 422 naming the first that is not),
        with its display name: all are checked before any is used."""
        names, checked = [], []
        for index, upload in enumerate(images):
            names.append(display_name(upload.filename or f"image-{index}"))
            data = await upload.read()
            try:
                checked.append(await asyncio.to_thread(check_image, data, max_pixels=settings.max_pixels))
            except InputError as exc:
                raise api_error(exc, image=index, filename=names[-1]) from None
        return names, checked

    async def _store_labels(checked: list[CheckedImage], label: str, domain: str | None) -> Any:
        try:  # all or none: a write the state directory cannot take leaves nothing behind
            return await asyncio.to_thread(state.labels.add_many, checked, label, domain)
        except StorageError as exc:  # disk full, read-only volume: the operator must act
            raise storage_error(exc, f"none of the {len(checked)} image(s) of this request was stored") from None

    def _not_in_active() -> tuple[str | None, int]:
        active = state.registry.active()
        known = set(active.training_hashes()) if active else set()
        ids = [image.image_id for image in state.labels.images()]
        return (active.version if active else None), sum(1 for i in ids if i not in known)

    @app.get("/labels", operation_id="admin_list_labels", summary="Label counts", tags=TAGS,
             response_model=LabelSummary, responses={200: {"description": "Images per label"}})
    async def list_labels() -> LabelSummary:
        counts = await asyncio.to_thread(state.labels.counts)
        try:
            active, pending = await asyncio.to_thread(_not_in_active)
        except ModelError as exc:  # the counts stand; what the active model knows cannot be told
            log.warning("GET /admin/labels: %s", exc)
            active, pending = None, None
        return LabelSummary(counts=counts, total=sum(counts.values()), not_in_active_model=pending,
                            active_version=active, domains=await asyncio.to_thread(state.labels.domain_counts))

    @app.delete("/labels/{image_id}", operation_id="admin_delete_label", summary="Delete a labelled image",
                tags=TAGS, response_model=LabelDeleted,
                responses={200: {"description": "Deleted"}, **documented(404, s404="No labelled image with that id")})
    async def delete_label(image_id: ImageId) -> LabelDeleted:
        if not await asyncio.to_thread(state.labels.delete, image_id):
            raise ApiError(404, f"no labelled image '{display_name(image_id)}'")
        return LabelDeleted(deleted=image_id, counts=await asyncio.to_thread(state.labels.counts))

    @app.post("/retrain", operation_id="admin_start_retrain", summary="Start a head-only retrain job", tags=TAGS,
              status_code=202, response_model=Job,
              responses={202: {"description": "The job, queued", "links": {
                  "GetRetrainJob": {"operationId": "admin_get_job", "parameters": {"job_id": "$response.body#/id"}}}},
                         409: {"model": Error, "description": "A job is already queued or running (it is in `job`)",
                               "links": {"GetRunningJob": {"operationId": "admin_get_job",
                                                           "parameters": {"job_id": "$response.body#/job/id"}}}},
                         **documented(*GUARDED, 422, s422="Invalid parameters, or nothing to train on (no labels, "
                                                          "one class, a label with fewer than 2 images)")})
    async def start_retrain(params: Annotated[RetrainParams | None, Body()] = None) -> Job:
        params = params or RetrainParams()
        return await _start_job("retrain", params.model_dump(),
                                lambda: retrainable_parent(state.registry, state.labels).version)

    async def _start_job(kind: JobKind, params: dict[str, Any], parent_of: Callable[[], str],
                         prepare: Callable[[str], None] | None = None) -> Job:
        """Choose the job's parent version (422 with the reason if the job cannot run, 409 if
        the active version is damaged), create the job (409 if one is queued or running),
        ``prepare`` its files, start its process; a write the state cannot take fails the job
        with the reason (507)."""
        try:
            parent = await asyncio.to_thread(parent_of)
            job = await asyncio.to_thread(state.jobs.create, params, parent, kind)
        except (RetrainRefused, AdaptRefused) as exc:
            raise api_error(exc) from None
        except ModelError as exc:  # the active version is damaged: nothing to start from
            raise ApiError(409, f"cannot {kind} from the active model version: {exc}; activate a good version "
                                "(GET /admin/models) and retry") from None
        except JobConflict as exc:
            raise ApiError(409, str(exc), job=exc.job.model_dump()) from None
        except STATE_ERRORS as exc:  # a write the state cannot take is the operator's
            failure = storage_failure(exc, f"starting the {kind} job")
            if failure is None:
                raise
            raise storage_error(failure, "no job was started") from None
        try:
            if prepare is not None:
                await asyncio.to_thread(prepare, job.id)
            pid = launch(state.jobs, settings.home, job.id)
        except OSError as exc:  # its files or log cannot be written (or no process can start)
            failure = storage_failure(exc, f"starting the {kind} job")
            reason = str(failure or f"the {kind} process could not be started: {exc}")
            try:
                await asyncio.to_thread(state.jobs.fail, job.id, reason)
            except BACKEND_ERRORS:
                log.warning("could not mark %s job %s failed (%s)", kind, job.id, reason)
            if failure is None:
                raise
            raise storage_error(failure, f"job {job.id} did not start (it is marked failed)") from None
        try:
            await asyncio.to_thread(state.jobs.set_pid, job.id, pid)
        except BACKEND_ERRORS as exc:
            failure = storage_failure(exc, f"recording the {kind} job's process")
            if failure is None:
                raise
            # the job cannot record its progress either: it fails, and is marked failed once gone
            raise storage_error(failure, f"job {job.id} cannot run and will be marked failed") from None
        log.info("%s job %s started (pid %d)", kind, job.id, pid)
        return await asyncio.to_thread(state.jobs.get, job.id) or job

    @app.post("/adapt", operation_id="admin_start_adapt", summary="Adapt to a new image domain without labels",
              tags=TAGS, status_code=202, response_model=Job,
              responses={202: {"description": "The job, queued", "links": {
                  "GetAdaptJob": {"operationId": "admin_get_job", "parameters": {"job_id": "$response.body#/id"}}}},
                         409: {"model": Error, "description": "A job is already queued or running (it is in `job`), "
                                                              "or the active version is damaged"},
                         **documented(*GUARDED, 422,
                                      s400="Malformed multipart body; no images; an empty file; a file in a "
                                           "field other than `images`, or text in `images`",
                                      s422=f"Fewer than {MIN_TARGET_IMAGES} different images, a file that is not a "
                                           "readable image, invalid parameters, no active version or one without "
                                           "training embeddings")})
    async def start_adapt(images: Annotated[list[UploadFile], images_field],
                          domain: Annotated[str | None, domain_field] = None,
                          method: Annotated[AlignmentMethod, Form(description="diagonal (default): each embedding "
                                            "dimension's mean and spread; coral: full covariance, regularised")]
                          = "diagonal",
                          force: Annotated[bool, Form(description="put the adapted version live even without "
                                                                  "labelled images of the domain to judge it")] = False,
                          tolerance: Annotated[float, Form(ge=0.0, le=1.0, description="accuracy on the domain's "
                                                           "labelled images it may lose and still go live")] = 0.0,
                          ) -> Job:
        try:
            validate_domain(domain)
            params = AdaptParams(method=method, domain=domain, force=force, tolerance=tolerance)
        except (InputError, ValueError) as exc:
            raise api_error(exc if isinstance(exc, InputError) else InputError(str(exc))) from None
        _, checked = await _checked_uploads(images)
        targets = {image.image_id: image.data for image in checked}  # the same bytes twice are one image
        return await _start_job("adapt", params.model_dump(), functools.partial(_adaptable_parent, len(targets)),
                                functools.partial(_save_targets, targets=targets))

    def _adaptable_parent(target_images: int) -> str:
        active = state.registry.active()
        if active is None:
            raise AdaptRefused("no active model version to adapt: run `python -m training bootstrap` (in the "
                               "trainer image, on the same state) and retrain it on labelled images")
        check_adaptable(parent_model(active), target_images)
        return active.version

    def _save_targets(job_id: str, targets: dict[str, bytes]) -> None:
        save_targets(settings.home, job_id, targets)

    @app.get("/jobs/{job_id}", operation_id="admin_get_job", summary="A retrain job", tags=TAGS,
             response_model=Job,
             responses={200: {"description": "The job"}, **documented(404, s404="No job with that id")})
    async def get_job(job_id: JobId) -> Job:
        job = await asyncio.to_thread(state.jobs.get, job_id)
        if job is None:
            raise ApiError(404, f"no retrain job '{display_name(job_id)}'")
        return job

    @app.get("/models", operation_id="admin_list_models", summary="Model versions", tags=TAGS,
             response_model=ModelList, response_model_exclude_unset=True,
             responses={200: {"description": "Every version, oldest first", "links": {"ActivateVersion": {
                 "operationId": "admin_activate", "parameters": {"version": "$response.body#/versions/0/version"}}}}})
    async def list_models() -> ModelList:
        return await asyncio.to_thread(_model_list)

    # asked once, in the listing's thread: it imports onnxruntime, which only the listing needs here
    on_cpu = functools.cache(lambda: serves_on_cpu(settings))

    def _model_list() -> ModelList:
        try:
            pointer = state.registry.active_pointer()
        except ModelError as exc:
            log.error("%s", exc)
            pointer = None
        active = pointer.version if pointer else None
        versions = []
        for version in state.registry.versions():
            try:
                summary = version.summary()
            except ModelError as exc:  # a damaged version is listed, with what is wrong with it
                versions.append(ModelSummary(version=version.version, active=version.version == active, error=str(exc)))
                continue
            has_int8 = version.has_int8()
            versions.append(ModelSummary(
                version=version.version, active=version.version == active, created_at=summary["created_at"],
                labels=summary["labels"], metrics=summary["metrics"], parent=summary["parent"],
                strategy=summary["strategy"], exporter=summary["exporter"],
                variants=["fp32", "int8"] if has_int8 else ["fp32"],
                serves=served_variant(settings.model_variant, has_int8, on_cpu())))
        try:
            replicas = [Replica(id=r.id, version=r.version, variant=r.variant, last_seen=r.last_seen)
                        for r in state.registry.replicas()]
        except STATE_ERRORS as exc:  # the versions stand; who serves what cannot be told
            log.warning("GET /admin/models: cannot read the replicas' heartbeats: %s", exc)
            replicas = []
        listing = ModelList(active=active, versions=versions, replicas=replicas)
        if pointer and pointer.fallback_from:  # why the active version is not the one activated
            listing.fallback_from = dict(pointer.fallback_from)
        return listing

    @app.post("/models/{version}/activate", operation_id="admin_activate", summary="Promote or roll back to a version",
              tags=TAGS, response_model=Activated,
              responses={200: {"description": "Now active"},
                         **documented(*GUARDED, 404, 409, s404="No such version",
                                      s409="The version's files fail their checksums or the model contract")})
    async def activate(version: Version) -> Activated:
        try:
            await asyncio.to_thread(state.registry.activate, version)
        except VersionNotFoundError as exc:
            raise ApiError(404, str(exc)) from None
        except ModelError as exc:
            raise ApiError(409, f"version {display_name(version)} cannot be activated: {exc}") from None
        return Activated(active=version)

    # -- kept predictions: the review queue and feedback -------------------------------------------

    @app.get("/review", operation_id="admin_review", summary="Kept predictions to review, least certain first",
             tags=TAGS, response_model=ReviewQueue,
             responses={200: {"description": "Unlabelled kept predictions", "links": {"GetPredictionImage": {
                 "operationId": "admin_prediction_image",
                 "parameters": {"prediction_id": "$response.body#/items/0/prediction_id"}}}},
                        **documented(422, s422=f"limit outside 1..{MAX_REVIEW_ITEMS}, or an unknown order")})
    async def review(limit: Annotated[int, Query(ge=1, le=MAX_REVIEW_ITEMS, description="most items")] = 20,
                     order: Annotated[ReviewOrder, Query(description="margin: smallest top-1 minus top-2 score "
                                                         "first; entropy: highest entropy of the scores first")]
                     = "margin") -> ReviewQueue:
        def queue() -> ReviewQueue:
            pool = min(limit * CANDIDATE_FACTOR, MAX_CANDIDATES)
            candidates = state.predictions.unlabelled(order=order, limit=pool)
            chosen = [candidates[i] for i in spread_out([c.embedding for c in candidates], limit)]
            return ReviewQueue(items=[_review_item(kept) for kept in chosen], kept=state.predictions.count())

        return await asyncio.to_thread(queue)

    @app.post("/feedback", operation_id="admin_feedback", summary="Label a kept prediction's image", tags=TAGS,
              response_model=LabelsStored, response_model_exclude_unset=True,
              responses={200: {"description": "Stored in the label store, as POST /admin/labels stores"},
                         **documented(*GUARDED, 404, 422, s404="No kept prediction with that id",
                                      s422="Missing or invalid label, domain or prediction id")})
    async def feedback(body: Feedback) -> LabelsStored:
        try:
            validate_label(body.label)
            validate_domain(body.domain)
            data = await asyncio.to_thread(state.predictions.read_image, body.prediction_id)
        except PredictionNotFoundError:
            raise ApiError(404, f"no kept prediction '{display_name(body.prediction_id)}' (removed, or never kept)") \
                from None
        except InputError as exc:
            raise api_error(exc) from None
        try:
            checked = await asyncio.to_thread(check_image, data, max_pixels=settings.max_pixels)
        except InputError as exc:  # kept under a larger pixel limit than this server's
            raise api_error(exc) from None
        results = await _store_labels([checked], body.label, body.domain)
        counts = await asyncio.to_thread(state.labels.counts)
        return LabelsStored(stored=[StoredImage.of(results[0], f"prediction-{body.prediction_id}")], counts=counts)

    @app.delete("/predictions/{prediction_id}", operation_id="admin_delete_prediction",
                summary="Delete a kept prediction", tags=TAGS, response_model=PredictionDeleted,
                responses={200: {"description": "Deleted, with its image unless another kept prediction has it"},
                           **documented(404, s404="No kept prediction with that id")})
    async def delete_prediction(prediction_id: PredictionId) -> PredictionDeleted:
        if not await asyncio.to_thread(state.predictions.delete, prediction_id):
            raise ApiError(404, f"no kept prediction '{display_name(prediction_id)}'")
        return PredictionDeleted(deleted=prediction_id)

    @app.get("/predictions/{prediction_id}/image", operation_id="admin_prediction_image",
             summary="A kept prediction's image", tags=TAGS, response_class=Response,
             responses={200: {"description": "The image's bytes as the client sent them",
                              "content": {"image/*": {"schema": {"type": "string", "format": "binary"}}}},
                        **documented(404, s404="No kept prediction with that id")})
    async def prediction_image(prediction_id: PredictionId) -> Response:
        try:
            data = await asyncio.to_thread(state.predictions.read_image, prediction_id)
        except PredictionNotFoundError:
            raise ApiError(404, f"no kept prediction '{display_name(prediction_id)}'") from None
        # users' images: never cached by a proxy or the browser, never sniffed into another type
        return Response(data, media_type=image_media_type(data),
                        headers={"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff",
                                 "Content-Security-Policy": "default-src 'none'"})

    app.add_middleware(AdminAuth, token=admin_token(settings))
    return app


def _review_item(kept: KeptPrediction) -> ReviewItem:
    return ReviewItem(prediction_id=kept.prediction_id, image_id=kept.image_id, label=kept.label, score=kept.score,
                      margin=kept.margin, entropy=kept.entropy,
                      top_k=[{"label": label, "score": score} for label, score in kept.top_k],
                      model_version=kept.version, created_at=kept.created_at.isoformat())
