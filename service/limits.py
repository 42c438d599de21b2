"""ASGI middleware guarding the API routes before BentoML parses a request.

- A declared ``Content-Length`` over the limit is answered 413 before a byte of the body is read;
  a body without one is counted as it streams and cut off at the limit, so no oversized upload is
  ever held whole.
- The body's framing is checked here (multipart that does not parse, JSON that does not decode,
  a content type the route cannot take): BentoML would answer those with a 500, and no client
  input may produce a 500. The checked body is then replayed to the application unchanged.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


async def send_json(send: Send, status: int, body: dict[str, Any]) -> None:
    payload = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(payload)).encode())]})
    await send({"type": "http.response.body", "body": payload})


class _Rejected(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class RequestGuard:
    def __init__(
        self, app: Any, max_bytes: int, paths: tuple[str, ...] = ("/predict", "/admin"),
        file_fields: frozenset[str] = frozenset({"images"}),
    ) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.paths = paths
        self.file_fields = file_fields

    async def _read_body(self, scope: Scope, receive: Receive) -> bytes:
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            raise _Rejected(413, f"request body is {int(declared)} bytes; the limit is {self.max_bytes} bytes")
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _Rejected(400, "the client disconnected before sending the whole body")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                raise _Rejected(413, f"request body is larger than the {self.max_bytes}-byte limit")
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def _check_framing(self, scope: Scope, body: bytes) -> None:
        content_type = dict(scope.get("headers") or []).get(b"content-type", b"").decode("latin-1")
        media_type = content_type.split(";")[0].strip().lower()
        if media_type in ("multipart/form-data", "application/x-www-form-urlencoded"):
            from starlette.datastructures import UploadFile
            from starlette.requests import Request

            async def replay() -> Message:
                return {"type": "http.request", "body": body, "more_body": False}

            try:
                form = await Request(scope, replay).form(max_files=10_000, max_fields=10_000)
            except Exception as exc:  # starlette raises MultiPartException, python-multipart others
                raise _Rejected(400, f"malformed multipart body: {exc}") from None
            try:
                for key, value in form.multi_items():
                    is_file = isinstance(value, UploadFile)
                    if is_file and key not in self.file_fields:
                        raise _Rejected(400, f"field '{key}' does not take files; send images in the "
                                             f"field '{sorted(self.file_fields)[0]}'")
                    if not is_file and key in self.file_fields:
                        raise _Rejected(400, f"field '{key}' must hold files (multipart file parts), not text")
            finally:
                await form.close()
        elif media_type in ("application/json", ""):
            if body.strip():
                try:
                    json.loads(body)
                except ValueError as exc:
                    raise _Rejected(400, f"malformed JSON body: {exc}") from None
        else:
            raise _Rejected(415, f"unsupported content type '{media_type}': send multipart/form-data "
                                 "(files) or application/json")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") != "POST" or not scope["path"].startswith(self.paths):
            await self.app(scope, receive, send)
            return
        try:
            body = await self._read_body(scope, receive)
            await self._check_framing(scope, body)
        except _Rejected as exc:
            await send_json(send, exc.status, {"error": str(exc)})
            return
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if sent:
                return await receive()  # after the body: wait for the disconnect as usual
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)
