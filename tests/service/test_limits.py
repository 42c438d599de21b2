"""``service/limits.py`` (the request guard and the upload checks), at two levels: unit, the
guard driven through httpx's ASGI transport in front of an echo app; real server, bodies far over
the request limit refused while they stream in, on ``/predict`` and ``/admin/labels``, without the
server holding them (the limits as clients meet them on each route are in ``test_service.py``
and ``test_admin.py``)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from typing import Any, TypeVar

import httpx
import psutil
import pytest

from service.limits import RequestGuard, display_name
from tests.support.admin import AUTH, MAX_REQUEST_BYTES
from tests.support.server import Server

T = TypeVar("T")


def test_display_names_are_safe_to_echo() -> None:
    assert display_name("/tmp/x/tmpab12cd_3photo.jpg") == "photo.jpg"  # noqa: S108 - a name, not a file
    assert display_name("a\x00b\nc.jpg") == "a?b?c.jpg"
    assert len(display_name("x" * 500)) == 100


# -- request guard --------------------------------------------------------------------------------

async def echo_app(scope: dict[str, Any], receive: Callable[[], Awaitable[dict[str, Any]]],
                   send: Callable[[dict[str, Any]], Awaitable[None]]) -> None:
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
    # RequestGuard types the ASGI scope and messages as dict, httpx as MutableMapping: the same thing
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")  # type: ignore[arg-type]


def run(coro: Coroutine[Any, Any, T]) -> T:
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


def test_guard_bounds_open_inference_bodies_and_leaves_their_framing_to_the_protocol() -> None:
    infer = "/v2/models/m/infer"

    async def go() -> list[httpx.Response]:
        async with guarded() as http:
            return [
                await http.post(infer, content=b"x" * 1001),
                # JSON then binary tensor data: not JSON as a whole, and checked by the protocol's parser
                await http.post(infer, content=b'{"inputs": []}\x00\x01',
                                headers={"inference-header-content-length": "14"}),
                await http.post(infer, content=b"{}", headers={"content-type": "application/octet-stream"}),
                await http.post(infer, content=b"{}", headers={"content-type": "text/plain"}),
                await http.post(infer, content=b"{}", headers={"content-encoding": "gzip"}),
            ]

    too_big, binary, octet, text, gzip = run(go())
    assert too_big.status_code == 413 and "1001 bytes" in too_big.json()["error"]
    assert binary.status_code == 200 and binary.text == "16"
    assert octet.status_code == 200
    assert text.status_code == 415 and "application/octet-stream" in text.json()["error"]
    assert gzip.status_code == 415 and "content encoding 'gzip'" in gzip.json()["error"]


def test_guard_leaves_other_routes_alone() -> None:
    async def go() -> httpx.Response:
        async with guarded(max_bytes=10) as http:
            return await http.post("/metrics", content=b"x" * 100)

    assert run(go()).status_code == 200


def server_rss(server: Server) -> int:
    """Resident memory of the server and all its workers, in bytes."""
    root = psutil.Process(server.process.pid)
    return sum(p.memory_info().rss for p in [root, *root.children(recursive=True)])


# -- request bodies over the limit -----------------------------------------------------------------

GIB = 1 << 30


@pytest.mark.parametrize("path", ["/predict", "/admin/labels"])
@pytest.mark.parametrize("declared", [False, True], ids=["streamed", "declared"])
def test_a_huge_body_is_refused_while_it_streams(storage_server: Server, path: str, declared: bool) -> None:
    """1 GiB sent (chunked, or with its Content-Length): 413 after at most the limit is read,
    the connection closed so the client stops sending, and no memory held for it."""
    sent = 0

    def body() -> Iterator[bytes]:
        nonlocal sent
        chunk = bytes(1 << 20)
        while sent < GIB:
            sent += len(chunk)
            yield chunk

    headers = {**AUTH, "content-type": "multipart/form-data; boundary=x"}
    if declared:
        headers["content-length"] = str(GIB)
    rss_before = server_rss(storage_server)
    response = httpx.post(storage_server.url + path, content=body(), headers=headers, timeout=120)
    assert response.status_code == 413, response.text
    assert "limit" in response.json()["error"]
    assert response.headers["connection"] == "close"
    # what the client got to send: the limit plus what the sockets buffered, not the gigabyte
    assert sent < GIB // 8, f"the server read {sent >> 20} MiB of a body over a {MAX_REQUEST_BYTES}-byte limit"
    assert server_rss(storage_server) - rss_before < 200 << 20
