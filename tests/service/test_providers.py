"""``service/providers.py``, unit level: onnxruntime execution providers chosen explicitly (CPU
unless a GPU is really usable; TensorRT only when asked for), with clear errors for the impossible
choices."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from service.providers import CPU, CUDA, TENSORRT, ProviderError, select_providers
from service.settings import Settings


def settings(**overrides: Any) -> Settings:
    return Settings(**overrides)


ALL = [TENSORRT, CUDA, CPU]


def names(providers: list) -> list[str]:
    return [name for name, _ in providers]


def test_auto_without_a_gpu_is_cpu_only_even_with_the_gpu_build() -> None:
    assert names(select_providers(settings(), ALL, gpus=0)) == [CPU]


def test_auto_with_a_gpu_uses_cuda_with_deliberate_options() -> None:
    chosen = select_providers(settings(cuda_device_id=1, gpu_mem_limit_mb=512), ALL, gpus=2)
    assert names(chosen) == [CUDA, CPU]
    options = chosen[0][1]
    assert options["device_id"] == 1
    assert options["cudnn_conv_algo_search"] == "HEURISTIC"
    assert options["arena_extend_strategy"] == "kSameAsRequested"
    assert options["gpu_mem_limit"] == str(512 * 1024 * 1024)


def test_cpu_choice_ignores_the_gpu() -> None:
    assert names(select_providers(settings(providers="cpu"), ALL, gpus=1)) == [CPU]


def test_tensorrt_is_opt_in_with_its_cache_under_home(tmp_path: Path) -> None:
    chosen = select_providers(settings(providers="tensorrt", home=tmp_path), ALL, gpus=1)
    assert names(chosen) == [TENSORRT, CUDA, CPU]
    assert chosen[0][1]["trt_engine_cache_path"] == str(tmp_path / "tensorrt-cache")
    assert (tmp_path / "tensorrt-cache").is_dir()


@pytest.mark.parametrize(
    "choice,available,gpus,message",
    [
        ("cuda", ALL, 0, "no usable GPU"),
        ("cuda", [CPU], 1, "no CUDA provider"),
        ("tensorrt", [CUDA, CPU], 1, "no TensorRT"),
    ],
)
def test_impossible_choices_are_clear_errors(choice: str, available: list[str], gpus: int, message: str) -> None:
    with pytest.raises(ProviderError, match=message):
        select_providers(settings(providers=choice), available, gpus)


def test_device_id_beyond_the_gpus() -> None:
    with pytest.raises(ProviderError, match="only 1 GPU"):
        select_providers(settings(providers="cuda", cuda_device_id=3), ALL, gpus=1)
