"""The BentoML services: ``TransferServe`` (HTTP API: uploads, decoding, preprocessing) and
``Inference`` (onnxruntime behind BentoML's adaptive batching).

Serve with ``bentoml serve service.service:TransferServe``. The split is what lets both cores
work: HTTP workers decode and preprocess images in threads while the inference worker runs the
batches that BentoML's dispatcher forms from all concurrent requests.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, cast

import bentoml
import numpy as np
from pydantic import Field

from models.errors import InputError
from models.preprocess import SUPPORTED_FORMATS, decode_and_crop
from models.spec import ModelSpec
from store.state import open_state

from .active import ActiveVersion, Ran
from .admin import admin_gate, create_admin_app
from .errors import GUARDED, STATUS_TEXT, ApiError, api_error
from .keeper import Offer, PredictionKeeper
from .limits import RequestGuard, display_name
from .metrics import observe_predictions
from .open_inference_routes import PREFIX as OIP_PREFIX
from .open_inference_routes import RootPath, create_open_inference_app
from .openapi import JSONRoutingErrors, OpenAPIDocument, package_version
from .predict import Prediction, build_predictions
from .settings import get_settings
from .ui import create_ui_app

os.environ.setdefault("BENTOML_DO_NOT_TRACK", "True")
log = logging.getLogger("transfer_serve")
# BentoML leaves the root logger at WARNING; our start-up lines (model version, provider) are INFO.
for _name in ("transfer_serve", "service", "models"):
    logging.getLogger(_name).setLevel(logging.INFO)
settings = get_settings()
state = open_state(settings)  # each store opens on first use, in the process that uses it


@bentoml.service(
    name="transfer_serve_inference",
    workers=settings.inference_workers,
    traffic={"timeout": 60},
    # The three settings below keep the internal /infer call cheap; what each cost is measured in
    # bench/README.md, "Serving choices measured on the way".
    # BentoML 1.4.31+ recycles the caller's connection pool every 100 requests / 300 s and aborts
    # the calls in flight on it; connections to our own inference worker need no recycling.
    runner_connection={"max_requests": 10**9, "max_age": 1e9},
    # no access-log line per internal call: the HTTP service logs every client request already
    logging={"access": {"enabled": False}},
    # nor an OpenTelemetry span per internal call; /predict is traced
    tracing={"excluded_urls": ["/infer"]},
)
class Inference:
    """Runs preprocessed batches through the active model version's onnxruntime session."""

    def __init__(self) -> None:
        from .runtime import ModelRuntime

        self.runtime = ModelRuntime(settings, state.registry)
        self.runtime.start()

    def __is_ready__(self) -> bool:
        return self.runtime.loaded is not None

    # Two batchable APIs, because BentoML batches per API: requests that need the embedding (kept
    # predictions, /v2 requests asking for it) share batches with each other, the rest with
    # /predict, which then never copies, sends or parses embedding columns it does not use
    # (what that saves is within the benchmark's spread: bench/README.md, "Open Inference Protocol").
    @bentoml.api(batchable=True, max_batch_size=settings.max_batch_size, max_latency_ms=settings.max_latency_ms)
    def infer(self, batch: np.ndarray) -> np.ndarray:
        """uint8 crops (N, S, S, 3) -> (N, 1 + C): column 0 is the number of the model version
        that ran the batch (v7 -> 7.0), the next C are softmax probabilities. Crops, not float
        tensors, cross the process boundary: a quarter of the bytes to copy and parse."""
        model, probabilities = self.runtime.infer(batch)
        return _rows(model.number, probabilities)

    @bentoml.api(batchable=True, max_batch_size=settings.max_batch_size, max_latency_ms=settings.max_latency_ms)
    def infer_with_embeddings(self, batch: np.ndarray) -> np.ndarray:
        """:meth:`infer`'s (N, 1 + C) and then the backbone's embedding: (N, 1 + C + E)."""
        model, probabilities, embeddings = self.runtime.infer_with_embeddings(batch)
        return _rows(model.number, probabilities, embeddings)


def _rows(version_number: int, *columns: np.ndarray) -> np.ndarray:
    """One float32 row per image: the version's number, then ``columns`` side by side."""
    version_column = np.full((len(columns[0]), 1), version_number, dtype=np.float32)
    return np.concatenate([version_column, *(c.astype(np.float32) for c in columns)], axis=1)


#: What /predict answers besides 200, for its entry in the API document (BentoML's decorator
#: declares no error responses): the request guard's refusals and the route's own.
PREDICT_ERRORS = {
    **{status: STATUS_TEXT[status] for status in GUARDED},
    400: "Malformed multipart body; no files; an empty file; `images` sent as text; a file in another field; "
         "`top_k` not an integer >= 1",
    422: "A file that is not a readable image (named by `image` and `filename`)",
    503: STATUS_TEXT[503],
}


@bentoml.service(
    name="transfer_serve",
    workers=settings.workers,
    traffic={"timeout": 60},
)
class TransferServe:
    """Image classification over HTTP."""

    inference = bentoml.depends(Inference)

    def __init__(self) -> None:
        self.active = ActiveVersion(state.registry)
        self.active.start()
        if settings.admin_token is None:
            log.warning("TRANSFER_SERVE_ADMIN_TOKEN is not set: every /admin route answers 403")
        try:
            failed = state.jobs.fail_orphans()  # jobs cut short by a stop or crash
        except Exception as exc:  # noqa: BLE001 - predictions need none of this: serve anyway
            log.error("could not check the job history in %s (%s); predictions are served, admin "
                      "routes will say what is wrong with the state directory", settings.home, exc)
            failed = 0
        if failed:
            log.warning("%d retrain job(s) were running when the service stopped: marked failed", failed)
        self.keeper = PredictionKeeper(lambda: state.predictions, fraction=settings.keep_predictions,
                                       max_items=settings.keep_max_items, max_days=settings.keep_max_days,
                                       queue_size=settings.keep_queue)
        self.keeper.start()
        if self.keeper.enabled:
            log.info("keeping %g of predicted images for review (at most %d, for %g days)", settings.keep_predictions,
                     settings.keep_max_items, settings.keep_max_days)
        # decoding and resizing release the GIL: threads give real parallelism here
        self.pool = ThreadPoolExecutor(max_workers=max(2, settings.intra_op_threads), thread_name_prefix="decode")

    async def decode_images(self, blobs: list[bytes], spec: ModelSpec,
                              refusal: Callable[[InputError, int], ApiError]) -> np.ndarray:
        """Decode and centre-crop every image in the decode threads; ``refusal`` turns an image's
        error into what the client is answered (the two protocols word and number it their way)."""
        loop = asyncio.get_running_loop()

        def one(index: int) -> np.ndarray:
            try:
                # fast=True: reduced-scale JPEG decode + crop-window resize, within ~1 level of the
                # exact (timm) crops training evaluated with; see models/preprocess.py
                return decode_and_crop(blobs[index], spec.preprocess, max_pixels=settings.max_pixels, fast=True)
            except InputError as exc:
                raise refusal(exc, index) from None

        arrays = await asyncio.gather(*(loop.run_in_executor(self.pool, one, i) for i in range(len(blobs))))
        return np.stack(arrays)

    async def inference_ready(self) -> bool:
        """Whether the inference workers have a model loaded (their ``/readyz``)."""
        is_ready = getattr(self.inference, "is_ready", None)  # a RemoteProxy; in process, the instance itself
        if is_ready is None:
            return bool(self.inference.__is_ready__())
        return bool(await is_ready(5))

    async def run_model(self, crops_for: Callable[[ModelSpec], Awaitable[np.ndarray]], *,
                        version: str | None = None, embeddings: bool = False) -> Ran:
        """The one path from a request to the model, shared by ``/predict`` and the Open Inference
        Protocol's routes (so their requests form the same batches): ``crops_for(spec)`` makes the
        uint8 crops for the active version's spec (called again only if a swap changed the
        preprocessing), the batchable :meth:`Inference.infer` (or, with ``embeddings``,
        :meth:`Inference.infer_with_embeddings`) runs them, and a swap between the two is retried,
        so every row comes from one version with the preprocessing it was made for.
        ``version``: only that version may run (404 naming the one served otherwise)."""
        run = self.inference.to_async.infer_with_embeddings if embeddings else self.inference.to_async.infer
        crops: tuple[object, np.ndarray] | None = None
        for attempt in range(3):
            active, spec = self.active.current()
            if version is not None and version != active:
                raise ApiError(404, f"model version {version} is not being served; {active} is")
            if crops is None or crops[0] != spec.preprocess:  # decode once unless it changed
                crops = (spec.preprocess, await crops_for(spec))
            try:
                output = await run(crops[1])
            except Exception as exc:  # noqa: BLE001 - any failure of the internal call
                # Inference is idempotent: a keep-alive connection closed under us, or a
                # worker being replaced, is worth one more try before the client sees it.
                log.warning("inference call failed (attempt %d): %s", attempt + 1, exc)
                if attempt == 2:
                    raise ApiError(503, "the model is not available right now; retry shortly") from None
                await asyncio.sleep(0.05)
                await asyncio.to_thread(self.active.refresh)  # a new version may have come
                continue
            numbers = set(output[:, 0].astype(int).tolist())
            ran = f"v{numbers.pop()}"
            ran_spec = self.active.spec_of(ran)
            # A swap between preprocessing and inference: results are only valid if the
            # version that ran uses the same preprocessing and all images ran on it.
            if not numbers and ran_spec.preprocess == spec.preprocess and version in (None, ran):
                classes = ran_spec.num_classes
                return Ran(ran, ran_spec, output[:, 1:1 + classes], output[:, 1 + classes:] if embeddings else None)
            await asyncio.to_thread(self.active.refresh)
        raise ApiError(503, "the active model changed during the request; retry")

    def _keep(self, blobs: list[bytes], version: str, spec: ModelSpec, probabilities: np.ndarray,
              embeddings: np.ndarray | None, predictions: list[dict[str, Any]]) -> None:
        """Offer the sampled images to the keeper; those it takes get their ``prediction_id``."""
        now = datetime.now(UTC)
        for index, result in enumerate(predictions):
            prediction_id = self.keeper.new_id()
            embedding = embeddings[index] if embeddings is not None else None
            if prediction_id and self.keeper.offer(Offer(prediction_id, blobs[index], version, spec.labels,
                                                         probabilities[index], embedding, now)):
                result["prediction_id"] = prediction_id

    @bentoml.on_shutdown
    async def write_queued_predictions(self) -> None:
        """On a graceful stop, write what is still queued for keeping (bounded: the keeper's timeout)."""
        await asyncio.to_thread(self.keeper.stop)

    @bentoml.api(route="/predict")
    async def predict(
        self,
        images: Annotated[list[Path], Field(
            description=f"one or more image files ({', '.join(SUPPORTED_FORMATS)}): at most {settings.max_files} "
                        f"files of at most {settings.max_file_bytes} bytes and {settings.max_pixels} pixels each, "
                        f"{settings.max_request_bytes} bytes in all",
            json_schema_extra={"minItems": 1, "maxItems": settings.max_files})],
        top_k: Annotated[int, Field(
            ge=1, description="how many labels to return per image (capped at the number of labels)")
        ] = settings.default_top_k,
    ) -> list[Prediction]:
        """Classify one or more images; one result per image, in the order sent."""
        from starlette.responses import JSONResponse

        try:
            if not images:
                raise ApiError(400, "no images: send one or more files in the multipart field 'images'")
            blobs = [path.read_bytes() for path in images]  # sizes and count: checked by the request guard

            def refusal(exc: InputError, index: int) -> ApiError:
                return api_error(exc, image=index, filename=display_name(images[index]))

            # kept predictions store their embedding (the review queue spreads near-duplicates with it)
            ran = await self.run_model(lambda spec: self.decode_images(blobs, spec, refusal),
                                       embeddings=self.keeper.enabled)
            # sent as built: BentoML would validate and re-serialise list[Prediction]
            predictions = build_predictions(ran.probabilities, ran.spec.labels, top_k, ran.version)
            observe_predictions(ran.version, predictions)
            if self.keeper.enabled:
                self._keep(blobs, ran.version, ran.spec, ran.probabilities, ran.embeddings, predictions)
            return JSONResponse(predictions)  # type: ignore[return-value]
        except ApiError as exc:
            return exc.response()  # type: ignore[return-value]


# @bentoml.service made the class a bentoml.Service, which its type hints do not tell mypy
_service = cast("bentoml.Service[TransferServe]", TransferServe)
_service.add_asgi_middleware(RequestGuard, max_bytes=settings.max_request_bytes, max_files=settings.max_files,
                             max_file_bytes=settings.max_file_bytes, before_body=admin_gate(settings))
_service.mount_asgi_app(create_admin_app(settings, state), path="/admin", name="admin")
_service.mount_asgi_app(create_ui_app(), path="/ui", name="ui")
_service.mount_asgi_app(create_open_inference_app(settings, bentoml.get_current_service, package_version()),
                        path=OIP_PREFIX, name="open_inference")
_service.add_asgi_middleware(RootPath)
_service.add_asgi_middleware(OpenAPIDocument, service=TransferServe, predict_errors=PREDICT_ERRORS)
_service.add_asgi_middleware(JSONRoutingErrors)  # 404/405 as {"error": ...}, not plain text
