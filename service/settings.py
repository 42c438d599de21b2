"""Service settings: one pydantic-settings class, read from ``TRANSFER_SERVE_*`` environment
variables, validated at start-up (a bad value stops the service with a message, not a 500 later).
"""

from __future__ import annotations

import logging
from functools import lru_cache
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator

from models.hardware import cpu_count, cuda_device_count
from store.settings import StoreSettings

log = logging.getLogger(__name__)


class Settings(StoreSettings):
    """Every knob of the service, the stores' own (:class:`store.settings.StoreSettings`)
    included. Environment variable = ``TRANSFER_SERVE_`` + field name in capitals
    (``max_files`` is ``TRANSFER_SERVE_MAX_FILES``)."""

    workers: int = Field(0, ge=0, le=64,
                         description="HTTP worker processes (decode + preprocess); 0 = derived from the cores")
    inference_workers: int = Field(
        0, ge=0, le=64,
        description="onnxruntime worker processes (adaptive batching happens in each); 0 = one per "
        "core on a CPU host (single-thread sessions in parallel beat one session with a thread per "
        "core, whose threads spin: bench/README.md), 1 with CUDA",
    )
    intra_op_threads: int = Field(0, ge=0, le=256,
                                  description="onnxruntime threads per inference worker; 0 = cores / inference_workers")
    max_batch_size: int = Field(32, ge=2, le=1024, description="largest batch the adaptive batcher forms (at least 2: "
                                "BentoML refuses a batchable API of 1)")
    max_latency_ms: int = Field(
        10_000, ge=10, le=60_000,
        description="BentoML's max_latency_ms: a deadline, not a batching window (BentoML adapts "
        "the window itself); a request that would wait longer is shed with 503",
    )
    providers: Literal["auto", "cpu", "cuda", "tensorrt"] = Field(
        "auto", description="auto: CUDA when a usable GPU is present, else CPU"
    )
    model_variant: Literal["auto", "fp32", "int8", "fp16"] = Field(
        "auto", description="which graph of the active version to serve: auto (the version's INT8 variant on the "
        "CPU provider when it has one, which passed the INT8 gate; fp32 otherwise and on GPUs), fp32 (model.onnx), "
        "int8 (model.int8.onnx; fp32 with a warning where a version has none), or fp16 (converted from model.onnx "
        "at load time; for GPUs, slow on CPUs)",
    )
    cuda_device_id: int = Field(0, ge=0)
    cudnn_conv_algo_search: Literal["EXHAUSTIVE", "HEURISTIC", "DEFAULT"] = "HEURISTIC"
    gpu_mem_limit_mb: int = Field(0, ge=0, description="CUDA arena limit in MiB; 0 = no limit")
    # at most 1000: BentoML parses /predict forms with Starlette's default limit of 1000 files
    max_files: int = Field(64, ge=1, le=1000, description="most images in one /predict or /admin/labels request")
    max_file_bytes: int = Field(10 * 1024 * 1024, ge=1024, description="largest single upload (413 above)")
    max_request_bytes: int = Field(64 * 1024 * 1024, ge=1024, description="largest request body (413 above)")
    max_pixels: int = Field(40_000_000, ge=1, description="largest decoded image, width x height (413 above)")
    default_top_k: int = Field(5, ge=1)
    keep_predictions: float = Field(
        0.0, ge=0.0, le=1.0,
        description="fraction of predicted images kept for review (per image; 0 = none, 1 = all). These are users' "
        "images: keep only what your users agreed to, and bound them with the two settings below")
    keep_max_items: int = Field(10_000, ge=1, description="most kept predictions; the oldest go first")
    keep_max_days: float = Field(30.0, gt=0.0, description="kept predictions older than this many days are removed")
    keep_queue: int = Field(256, ge=1, le=100_000,
                            description="predictions waiting to be written; what does not fit is dropped (and counted)")
    oip_model_name: str = Field(
        "transfer-serve", min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
        description="the model's name on the Open Inference Protocol routes (/v2/models/{name}/...)")
    admin_token: SecretStr | None = Field(
        None, description="bearer token for /admin/*; unset = admin routes refuse every call")

    @field_validator("admin_token")
    @classmethod
    def _token_strength(cls, v: SecretStr | None) -> SecretStr | None:
        if v is not None and v.get_secret_value() == "":
            return None
        if v is not None and len(v.get_secret_value()) < 16:
            raise ValueError("TRANSFER_SERVE_ADMIN_TOKEN must be at least 16 characters")
        return v

    @model_validator(mode="after")
    def _derive(self) -> Settings:
        cores = cpu_count()
        if self.workers == 0:
            self.workers = 1 if cores <= 2 else min(cores // 2, 8)
        if self.inference_workers == 0:
            gpu = self.providers in ("cuda", "tensorrt") or (self.providers == "auto" and cuda_device_count() > 0)
            self.inference_workers = 1 if gpu else cores  # one GPU context, or a process per core
        if self.intra_op_threads == 0:
            self.intra_op_threads = max(1, cores // self.inference_workers)
        if self.inference_workers * self.intra_op_threads > cores:
            raise ValueError(
                f"inference_workers x intra_op_threads = {self.inference_workers * self.intra_op_threads} "
                f"exceeds the {cores} cores: lower TRANSFER_SERVE_INTRA_OP_THREADS"
            )
        return self


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
