"""The model runtime of an inference worker: the active version's onnxruntime session, kept
current.

A watcher thread polls the registry's active pointer; when it changes, the new version is
verified, loaded and warmed up off the request path, then swapped in with one reference
assignment. A batch runs entirely on the session it started with, so every result names the
version that produced it and no request ever waits for a model load.

A version that fails verification (a file differs from its checksum manifest, the graph does not
match the spec) is never served: the registry falls back to the last good version
(:meth:`store.registry.ModelRegistry.fall_back`), whichever worker gets there first logs one
ERROR line that names the bad version, what is wrong with it and the version served instead, and
every worker loads that one. If no version verifies, nothing is served (not ready).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from models.errors import ModelError
from models.onnx_io import CPU_RUN_SLICE, PIXELS_INPUT, run_bound, serving_graph, softmax
from models.preprocess import normalise_crops
from models.spec import ONNX_EMBEDDING, ONNX_INPUT, ONNX_LOGITS, ModelSpec
from store.registry import HEARTBEAT_S, ModelRegistry, ModelVersion

from .providers import CPU, session_providers
from .settings import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadedModel:
    version: str
    number: int
    spec: ModelSpec
    session: Any  # onnxruntime.InferenceSession
    providers: tuple[str, ...]
    variant: str = "fp32"  # which graph of the version: fp32 (model.onnx), int8 (model.int8.onnx), fp16
    #: takes uint8 crops and normalises them on the device, run with IO binding (GPU providers)
    pixels_input: bool = False


def feeds_pixels(providers: list[tuple[str, dict[str, Any]]]) -> bool:
    """Whether a session on ``providers`` gets uint8 crops (normalised inside the graph, on the
    device) and IO binding: on a GPU provider, where it cuts the bytes copied to the device to a
    quarter and the host's float32 pass; on the CPU the graph would do the same arithmetic the
    host does now, so the CPU keeps the plain float32 input."""
    return providers[0][0] != CPU


def served_variant(setting: str, has_int8: bool, on_cpu: bool) -> str:
    """Which graph of a version ``TRANSFER_SERVE_MODEL_VARIANT=setting`` serves: ``auto`` is the
    INT8 variant on the CPU provider when the version has one (it passed the INT8 gate when it was
    added), fp32 otherwise and on GPUs, where INT8 QDQ graphs gain nothing; ``int8`` falls back to
    fp32 for a version without one."""
    if setting == "auto":
        return "int8" if has_int8 and on_cpu else "fp32"
    if setting == "int8":
        return "int8" if has_int8 else "fp32"
    return setting


class ModelNotLoaded(RuntimeError):
    """No model version is loaded yet (empty store, or the active one failed to load)."""


class ModelRuntime:
    def __init__(self, settings: Settings, registry: ModelRegistry, *, poll_seconds: float = 0.5) -> None:
        self.settings = settings
        self.registry = registry
        self.poll_seconds = poll_seconds
        self._loaded: LoadedModel | None = None
        # the pointer (version, activated_at) that last failed: not retried until it changes
        self._failed_pointer: tuple[str, str] | None = None
        self._watcher: threading.Thread | None = None

    # -- loading ------------------------------------------------------------------------------

    def _session(self, version: ModelVersion) -> LoadedModel:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = self.settings.intra_op_threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        providers = session_providers(self.settings)
        variant, path = self._variant(version, providers[0][0] == CPU)
        if variant == "fp16" and providers[0][0] == CPU:
            log.warning("TRANSFER_SERVE_MODEL_VARIANT=fp16 on the CPU provider: correct but slower than fp32 "
                        "(float16 pays off on GPUs)")
        pixels = feeds_pixels(providers)
        if variant == "fp16" or pixels:
            graph: str | bytes = serving_graph(path, fp16=variant == "fp16",
                                               pixels=version.spec.preprocess if pixels else None)
        else:
            graph = str(path)
        session = ort.InferenceSession(
            graph, options,
            providers=[name for name, _ in providers], provider_options=[opts for _, opts in providers],
        )
        size = version.spec.preprocess.input_size
        for batch in sorted({1, min(8, self.settings.max_batch_size)}):  # warm-up
            if pixels:
                run_bound(session, {PIXELS_INPUT: np.zeros((batch, size, size, 3), np.uint8)}, ONNX_LOGITS,
                          (batch, version.spec.num_classes))
            else:
                session.run([ONNX_LOGITS], {ONNX_INPUT: np.zeros((batch, 3, size, size), np.float32)})
        return LoadedModel(version.version, version.number, version.spec, session,
                           tuple(session.get_providers()), variant, pixels)

    def _variant(self, version: ModelVersion, on_cpu: bool) -> tuple[str, Path]:
        """The graph to serve (:func:`served_variant`) and its file; fp16 is converted from the
        verified fp32 graph as it loads."""
        variant = served_variant(self.settings.model_variant, version.has_int8(), on_cpu)
        if self.settings.model_variant == "int8" and variant != "int8":
            log.warning("TRANSFER_SERVE_MODEL_VARIANT=int8, but model version %s has no INT8 variant: serving its "
                        "fp32 model (add one with `python -m training quantize --version %s --data DIR`)",
                        version.version, version.version)
        return variant, version.int8_onnx_path if variant == "int8" else version.onnx_path

    def refresh(self) -> bool:
        """Load the active version if it is not the loaded one. True if a new one went live.

        A version that fails verification is replaced by the last good one (at most a few
        rounds, should the fall-back target fail too while we look at it)."""
        for _ in range(3):
            try:
                pointer = self.registry.active_pointer()
            except ModelError as exc:
                key = ("", str(exc))
                if key == self._failed_pointer or not self._fall_back(None, str(exc), key):
                    return False
                continue
            if pointer is None:
                return False
            active = pointer.version
            key = (active, str(pointer.activated_at))
            current = self._loaded
            if (current is not None and current.version == active) or key == self._failed_pointer:
                return False
            started = time.perf_counter()
            try:
                version = self.registry.get(active)
                version.verify()
            except ModelError as exc:
                if not self._fall_back(active, str(exc), key):
                    return False
                continue
            try:
                loaded = self._session(version)
            except Exception as exc:  # noqa: BLE001 - any failure here must leave the old model serving
                self._failed_pointer = key
                log.error("could not load model version %s, still serving %s: %s",
                          active, current.version if current else "nothing", exc)
                return False
            self._loaded = loaded  # the swap: one reference assignment
            self._failed_pointer = None
            log.info("serving model version %s (%d labels) on %s; variant %s%s; loaded and warmed up in %.2fs",
                     loaded.version, loaded.spec.num_classes, ", ".join(loaded.providers), loaded.variant,
                     "; uint8 crops normalised on the device, IO binding" if loaded.pixels_input else "",
                     time.perf_counter() - started)
            return True
        return False

    def _fall_back(self, failed: str | None, reason: str, key: tuple[str, str]) -> bool:
        """Make the registry point at the last good version instead of ``failed``. True if the
        pointer now names another version to load."""
        what = f"model version {failed}" if failed else "the active model pointer"
        try:
            result = self.registry.fall_back(failed, reason)
        except Exception as exc:  # noqa: BLE001 - a broken state directory must not kill the worker
            result = None
            log.error("%s failed verification (%s) and falling back failed: %s", what, reason, exc)
        if result is None or result.version is None:
            self._failed_pointer = key
            current = self._loaded
            if result is not None:
                log.error("%s failed verification (%s) and no other stored version verifies: still "
                          "serving %s; %s until a good version is activated with "
                          "POST /admin/models/{version}/activate", what, reason,
                          current.version if current else "nothing",
                          "serving on" if current else "not ready")
            return False
        if result.switched:
            log.error("MODEL FALLBACK: %s failed verification (%s); now serving %s instead. Repair or "
                      "remove it, or activate another version with POST /admin/models/{version}/activate",
                      what, reason, result.version)
        else:
            log.info("%s failed verification (%s); another worker already switched to %s",
                     what, reason, result.version)
        return True

    def start(self) -> None:
        """Load the active version now, then keep watching the pointer in the background."""
        try:
            self.refresh()
        except Exception as exc:  # noqa: BLE001 - the watcher retries: not ready until it loads one
            log.warning("cannot load the active model version yet (%s); retrying", exc)
        if self._loaded is None and self._failed_pointer is None:
            log.warning("no model version is loaded from %s yet; run `python -m training bootstrap` (in the "
                        "trainer image, on the same state) if none is active. Not ready until one is.",
                        self.settings.home)
        if self._loaded is not None:
            # announce what this replica serves before it says it is ready: a replica that answers
            # predictions is listed in GET /admin/models at once, not one watcher round later
            # (until then a stopped replica's record under the same id would still be shown)
            try:
                self._heartbeat()
            except Exception as exc:  # noqa: BLE001 - the watcher reports again
                log.warning("cannot report what this replica serves yet (%s); retrying", exc)
        self._watcher = threading.Thread(target=self._watch, name="model-watcher", daemon=True)
        self._watcher.start()

    def _heartbeat(self) -> None:
        loaded = self._loaded
        self.registry.report_serving(self.settings.replica_id, loaded.version if loaded else None,
                                     loaded.variant if loaded else None)

    def _watch(self) -> None:
        """Wake on an activation (or a short poll), load what is active, and say what this replica
        serves every :data:`HEARTBEAT_S`. While the state cannot be reached, the loaded model
        keeps serving."""
        last_beat, trouble = 0.0, ""
        while True:  # a daemon thread: it ends with the worker
            try:
                self.registry.wait_for_change(self.poll_seconds)
                swapped = self.refresh()
                if swapped or time.monotonic() - last_beat >= HEARTBEAT_S:
                    self._heartbeat()
                    last_beat = time.monotonic()
            except Exception as exc:  # noqa: BLE001 - serve what is loaded until the state answers again
                if str(exc) != trouble:
                    log.warning("cannot follow the active model version (%s); still serving %s", exc,
                                self._loaded.version if self._loaded else "nothing")
                trouble = str(exc)
                time.sleep(self.poll_seconds)
            else:
                if trouble:
                    log.info("following the active model version again")
                trouble = ""

    # -- serving ------------------------------------------------------------------------------

    @property
    def loaded(self) -> LoadedModel | None:
        return self._loaded

    def infer(self, crops: np.ndarray) -> tuple[LoadedModel, np.ndarray]:
        """Softmax probabilities (N, C) of a batch of uint8 crops (N, S, S, 3) from
        :func:`models.preprocess.decode_and_crop`, and the model that made them."""
        model, probabilities, _ = self._run(crops, embeddings=False)
        return model, probabilities

    def infer_with_embeddings(self, crops: np.ndarray) -> tuple[LoadedModel, np.ndarray, np.ndarray]:
        """:meth:`infer`, and the backbone's embeddings (N, E) of the same run (the graph computes
        them anyway: fetching them costs only the copy)."""
        model, probabilities, embeddings = self._run(crops, embeddings=True)
        assert embeddings is not None  # noqa: S101 - asked for above
        return model, probabilities, embeddings

    def _run(self, crops: np.ndarray, *, embeddings: bool) -> tuple[LoadedModel, np.ndarray, np.ndarray | None]:
        model = self._loaded
        if model is None:
            raise ModelNotLoaded("no model version is loaded yet")
        size = model.spec.preprocess.input_size
        if crops.ndim != 4 or crops.shape[1:] != (size, size, 3):
            raise ValueError(f"batch shape {crops.shape} does not fit {model.version} ({size}, {size}, 3)")
        if model.pixels_input and not embeddings:
            logits = run_bound(model.session, {PIXELS_INPUT: crops}, ONNX_LOGITS, (len(crops), model.spec.num_classes))
            return model, softmax(logits), None
        outputs = [ONNX_LOGITS, ONNX_EMBEDDING] if embeddings else [ONNX_LOGITS]
        if model.pixels_input:
            results = [model.session.run(outputs, {PIXELS_INPUT: crops})]
        else:  # the CPU provider: the batch in cache-sized slices, each normalised just before its run
            results = [model.session.run(outputs, {ONNX_INPUT: normalise_crops(crops[start:start + CPU_RUN_SLICE],
                                                                                model.spec.preprocess)})
                       for start in range(0, len(crops), CPU_RUN_SLICE)]
        logits = np.concatenate([result[0] for result in results])
        vectors = np.concatenate([result[1] for result in results]) if embeddings else None
        return model, softmax(logits), vectors
