"""onnxruntime execution providers, chosen explicitly.

``auto`` picks CUDA only when a GPU is really usable (the CUDA driver initialises and reports a
device), not merely because the GPU build of onnxruntime lists the provider: on a CPU-only host
that build would otherwise try CUDA and log errors. Options are set deliberately rather than left
to defaults.
"""

from __future__ import annotations

import logging
from typing import Any

from models.hardware import cuda_device_count

from .settings import Settings

log = logging.getLogger(__name__)

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
TENSORRT = "TensorrtExecutionProvider"

ProviderList = list[tuple[str, dict[str, Any]]]


class ProviderError(RuntimeError):
    """The configured provider cannot run on this host."""


def cuda_options(settings: Settings) -> dict[str, Any]:
    options: dict[str, Any] = {
        "device_id": settings.cuda_device_id,
        # EXHAUSTIVE benchmarks every conv algorithm per new input shape: best steady state but
        # seconds of stall whenever the batcher forms a new batch size; HEURISTIC is the default.
        "cudnn_conv_algo_search": settings.cudnn_conv_algo_search,
        "cudnn_conv_use_max_workspace": "1",
        # grow the arena by what is asked, not by doubling: batch sizes vary under adaptive batching
        "arena_extend_strategy": "kSameAsRequested",
        "do_copy_in_default_stream": "1",
    }
    if settings.gpu_mem_limit_mb:
        options["gpu_mem_limit"] = str(settings.gpu_mem_limit_mb * 1024 * 1024)
    return options


def tensorrt_options(settings: Settings) -> dict[str, Any]:
    cache = settings.home / "tensorrt-cache"
    return {
        "device_id": settings.cuda_device_id,
        "trt_engine_cache_enable": "True",
        "trt_engine_cache_path": str(cache),
        "trt_timing_cache_enable": "True",
        "trt_timing_cache_path": str(cache),
    }


def select_providers(settings: Settings, available: list[str], gpus: int) -> ProviderList:
    """The provider list for ``settings.providers``, given what onnxruntime offers and how many
    GPUs the driver sees. CPU is always last, as the fallback for unsupported nodes."""
    choice = settings.providers
    cpu: ProviderList = [(CPU, {})]
    if choice == "cpu" or (choice == "auto" and not (gpus and CUDA in available)):
        return cpu
    if not gpus:
        raise ProviderError(f"TRANSFER_SERVE_PROVIDERS={choice} but no usable GPU was found")
    if CUDA not in available:
        raise ProviderError(f"TRANSFER_SERVE_PROVIDERS={choice} but this onnxruntime has no CUDA provider "
                            f"({available})")
    if settings.cuda_device_id >= gpus:
        raise ProviderError(f"TRANSFER_SERVE_CUDA_DEVICE_ID={settings.cuda_device_id} but only {gpus} GPU(s) present")
    chosen: ProviderList = [(CUDA, cuda_options(settings))] + cpu
    if choice == "tensorrt":
        if TENSORRT not in available:
            raise ProviderError("TRANSFER_SERVE_PROVIDERS=tensorrt but this onnxruntime has no TensorRT provider")
        (settings.home / "tensorrt-cache").mkdir(parents=True, exist_ok=True)
        chosen.insert(0, (TENSORRT, tensorrt_options(settings)))
    return chosen


def serves_on_cpu(settings: Settings) -> bool:
    """Whether sessions on this host run on the CPU provider (without loading any CUDA library)."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    gpus = cuda_device_count() if CUDA in available else 0
    return select_providers(settings, available, gpus)[0][0] == CPU


def session_providers(settings: Settings) -> ProviderList:
    """Providers for this host: asks onnxruntime and the CUDA driver."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    gpus = cuda_device_count() if CUDA in available else 0
    chosen = select_providers(settings, available, gpus)
    if settings.providers == "auto" and chosen[0][0] == CPU and CUDA in available:
        # the GPU image on a node without a GPU (or without the NVIDIA runtime): say where it runs
        log.info("no usable GPU (this onnxruntime has the CUDA provider, the driver reports no device): "
                 "serving on the CPU")
    if chosen[0][0] != CPU and hasattr(ort, "preload_dlls"):
        # Load CUDA/cuDNN from the nvidia-* wheels (onnxruntime-gpu[cuda,cudnn], or torch's), so
        # no system CUDA is needed.
        ort.preload_dlls()
    return chosen
