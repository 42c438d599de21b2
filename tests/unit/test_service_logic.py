"""Pure logic of the service: settings, provider selection, upload checks, top-k, the request
guard middleware (driven through httpx's ASGI transport)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import numpy as np
import pytest
from pydantic import ValidationError

from service.limits import RequestGuard, display_name
from service.predict import Prediction, build_predictions
from service.providers import CPU, CUDA, TENSORRT, ProviderError, select_providers
from models.hardware import cpu_count
from service.settings import Settings


def settings(**overrides: object) -> Settings:
    return Settings(**overrides)  # type: ignore[arg-type]


# -- settings -------------------------------------------------------------------------------------

def test_defaults_are_derived_from_the_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    s = settings()
    assert s.workers >= 1
    assert s.inference_workers * s.intra_op_threads <= cpu_count()


def test_read_from_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TRANSFER_SERVE_HOME", str(tmp_path))
    monkeypatch.setenv("TRANSFER_SERVE_MAX_FILES", "3")
    monkeypatch.setenv("TRANSFER_SERVE_PROVIDERS", "cpu")
    s = Settings()
    assert s.home == tmp_path.resolve() and s.max_files == 3 and s.providers == "cpu"


def test_more_threads_than_cores_is_refused() -> None:
    with pytest.raises(ValidationError, match="exceeds"):
        settings(inference_workers=1, intra_op_threads=cpu_count() + 1)


@pytest.mark.parametrize("field,value", [("providers", "gpu"), ("max_files", 0), ("max_files", 1001),
                                         ("admin_token", "short"), ("max_batch_size", 1)])
def test_bad_values_fail_fast(field: str, value: object) -> None:
    with pytest.raises(ValidationError):
        settings(**{field: value})


def test_admin_token_is_secret() -> None:
    s = settings(admin_token="a" * 32)
    assert "a" * 32 not in repr(s) and "a" * 32 not in str(s.model_dump())


# -- providers ------------------------------------------------------------------------------------

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


# -- uploads and results --------------------------------------------------------------------------

def test_display_names_are_safe_to_echo() -> None:
    assert display_name("/tmp/x/tmpab12cd_3photo.jpg") == "photo.jpg"
    assert display_name("a\x00b\nc.jpg") == "a?b?c.jpg"
    assert len(display_name("x" * 500)) == 100


def test_build_predictions_orders_and_caps_top_k() -> None:
    probabilities = np.array([[0.1, 0.6, 0.3], [0.5, 0.2, 0.3]], np.float32)
    first, second = build_predictions(probabilities, ["a", "b", "c"], top_k=2, version="v3")
    assert first["label"] == "b" and [e["label"] for e in first["top_k"]] == ["b", "c"]
    assert second["label"] == "a" and second["model_version"] == "v3"
    (capped, _) = build_predictions(probabilities, ["a", "b", "c"], top_k=10, version="v3")
    assert [e["label"] for e in capped["top_k"]] == ["b", "c", "a"]
    assert capped["score"] == pytest.approx(0.6)
    Prediction.model_validate(capped)  # the shape the OpenAPI schema promises


# -- request guard --------------------------------------------------------------------------------

async def echo_app(scope, receive, send) -> None:  # type: ignore[no-untyped-def]
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": str(len(body)).encode()})


def guarded(max_bytes: int = 1000, max_files: int = 2, max_file_bytes: int = 100) -> httpx.AsyncClient:
    app = RequestGuard(echo_app, max_bytes=max_bytes, max_files=max_files, max_file_bytes=max_file_bytes)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


def run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(coro)


def test_guard_passes_a_valid_body_through_unchanged() -> None:
    async def go() -> httpx.Response:
        async with guarded() as http:
            return await http.post("/predict", files=[("images", ("a.jpg", b"abc"))], data={"top_k": "2"})

    response = run(go())
    assert response.status_code == 200 and int(response.text) > 3


def test_guard_refuses_declared_and_streamed_oversize() -> None:
    async def chunks():  # no Content-Length: streamed
        for _ in range(20):
            yield b"x" * 100

    async def go() -> tuple[httpx.Response, httpx.Response]:
        async with guarded() as http:
            declared = await http.post("/predict", content=b"x" * 1001, headers={"content-type": "application/json"})
            streamed = await http.post("/predict", content=chunks(), headers={"content-type": "application/json"})
            return declared, streamed

    declared, streamed = run(go())
    assert declared.status_code == 413 and "1001 bytes" in declared.json()["error"]
    assert streamed.status_code == 413 and "limit" in streamed.json()["error"]


@pytest.mark.parametrize(
    "content,content_type,status,message",
    [
        (b"garbage", "multipart/form-data; boundary=x", 400, "malformed multipart"),
        (b"{oops", "application/json", 400, "malformed JSON"),
        (b"hi", "text/plain", 415, "unsupported content type"),
    ],
)
def test_guard_refuses_malformed_bodies(content: bytes, content_type: str, status: int, message: str) -> None:
    async def go() -> httpx.Response:
        async with guarded() as http:
            return await http.post("/predict", content=content, headers={"content-type": content_type})

    response = run(go())
    assert response.status_code == status and message in response.json()["error"]


def test_guard_checks_the_count_size_emptiness_and_field_of_uploads() -> None:
    def files(*parts: tuple[str, str, bytes]) -> list[tuple[str, tuple[str, bytes]]]:
        return [(field, (name, data)) for field, name, data in parts]

    async def go() -> list[httpx.Response]:
        async with guarded() as http:
            return [await http.post("/predict", files=upload) for upload in (
                files(("images", "a.jpg", b"x"), ("images", "b.jpg", b"x"), ("images", "c.jpg", b"x")),
                files(("images", "ok.jpg", b"x" * 10), ("images", "big.jpg", b"x" * 101)),
                files(("images", "empty.jpg", b"")),
                files(("photo", "a.jpg", b"x")),
            )]

    too_many, too_big, empty, wrong_field = run(go())
    assert too_many.status_code == 413 and "3 images in one request; the limit is 2" in too_many.json()["error"]
    assert too_big.status_code == 413 and too_big.json() == {
        "error": "image 1 ('big.jpg') is 101 bytes; the limit is 100 bytes", "image": 1, "filename": "big.jpg"}
    assert empty.status_code == 400 and empty.json() == {
        "error": "image 0 ('empty.jpg') is empty", "image": 0, "filename": "empty.jpg"}
    assert wrong_field.status_code == 400 and "field 'photo' does not take files" in wrong_field.json()["error"]


def test_guard_leaves_other_routes_alone() -> None:
    async def go() -> httpx.Response:
        async with guarded(max_bytes=10) as http:
            return await http.post("/metrics", content=b"x" * 100)

    assert run(go()).status_code == 200
