"""ASGI middleware guarding the API routes before BentoML parses a request.

- A declared ``Content-Length`` over the limit is answered 413 before a byte of the body is read;
  a body without one is counted as it streams and cut off at the limit, so no oversized upload is
  ever held whole. The 413 closes the connection (``Connection: close``): otherwise the server
  would go on receiving, and discarding, the rest of the body, however large.
- The body's framing is checked here (multipart that does not parse, JSON that does not decode,
  a content type the route cannot take): BentoML would answer those with a 500, and no client
  input may produce a 500. The checked body is then replayed to the application unchanged.
- A file part whose file name BentoML could not use for its temporary copy (over
  ``MAX_FILENAME_BYTES``, or with a NUL byte) is a 400 here; BentoML answered it with a 500.
- A file part that cannot be buffered (Starlette spools parts over 1 MiB to the temporary
  directory, which may be full) is the server's fault: 507 on admin routes, 503 elsewhere.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Awaitable, Callable
from typing import Any

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

log = logging.getLogger(__name__)

#: The longest client file name (its last path component, in UTF-8 bytes) accepted. BentoML keeps
#: each /predict upload in a temporary file named "tmp" + 8 characters + that name, which must fit
#: the file system's 255-byte limit on a name: longer names made BentoML fail with a 500.
MAX_FILENAME_BYTES = 200


def filename_problem(filename: str | None) -> str | None:
    """What is wrong with a client's file name for an upload, or None if nothing is."""
    if not filename:
        return None
    if "\x00" in filename:
        return "contains a NUL byte"
    size = len(os.path.basename(filename).encode("utf-8", "surrogatepass"))
    if size > MAX_FILENAME_BYTES:
        return f"is {size} bytes long; the limit is {MAX_FILENAME_BYTES} bytes"
    return None


async def send_json(send: Send, status: int, body: dict[str, Any], *, close: bool = False,
                    headers: list[tuple[bytes, bytes]] | None = None) -> None:
    """Send ``body`` as a JSON response; ``close`` ends the connection after it (for a request
    whose body is left unread: uvicorn would otherwise read all of it to reuse the connection)."""
    payload = json.dumps(body).encode()
    headers = [*(headers or []), (b"content-type", b"application/json"),
               (b"content-length", str(len(payload)).encode())]
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})


class _Rejected(Exception):
    def __init__(self, status: int, message: str, *, body_unread: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.body_unread = body_unread


class RequestGuard:
    def __init__(
        self, app: Any, max_bytes: int, paths: tuple[str, ...] = ("/predict", "/admin"),
        file_fields: frozenset[str] = frozenset({"images"}), max_files: int = 1000, max_fields: int = 1000,
        before_body: Callable[[Scope, Send], Awaitable[bool]] | None = None,
    ) -> None:
        self.app = app
        # run before the body is read; True if it answered the request itself (the admin token
        # check: a caller without the token must not get to make the server buffer its upload)
        self.before_body = before_body
        self.max_bytes = max_bytes
        # BentoML and the admin routes parse forms with Starlette's limits (1000 files, 1000
        # fields by default) and answer a form over them with a 500 or a text/plain 400.
        self.max_files = max_files
        self.max_fields = max_fields
        self.paths = paths
        self.file_fields = file_fields

    async def _read_body(self, scope: Scope, receive: Receive) -> bytes:
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            raise _Rejected(413, f"request body is {int(declared)} bytes; the limit is {self.max_bytes} bytes",
                            body_unread=True)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _Rejected(400, "the client disconnected before sending the whole body")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                raise _Rejected(413, f"request body is larger than the {self.max_bytes}-byte limit",
                                body_unread=True)
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    @staticmethod
    def _spool_failure(scope: Scope, exc: OSError) -> _Rejected:
        """The server, not the client, is at fault: a 5xx, with what to do for the operator on
        admin routes; clients of the other routes are only told to retry."""
        import tempfile

        where = tempfile.gettempdir()
        log.error("could not buffer an upload to %s in %s: %s", scope["path"], where, exc)
        if scope["path"].startswith("/admin"):
            return _Rejected(507, f"could not buffer the upload in the server's temporary directory {where} "
                                  f"({exc.strerror or exc}); nothing was stored. To fix: free space there or "
                                  "point TMPDIR at a volume with room, then send the request again.")
        return _Rejected(503, "the server cannot receive uploads right now (its temporary storage is "
                              "full); retry later")

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
            except OSError as exc:  # file parts over 1 MiB are spooled to the temporary directory
                raise self._spool_failure(scope, exc) from None
            except Exception as exc:  # starlette raises MultiPartException, python-multipart others
                raise _Rejected(400, f"malformed multipart body: {exc}") from None
            try:
                parts = form.multi_items()
                files = sum(isinstance(value, UploadFile) for _, value in parts)
                if files > self.max_files:
                    raise _Rejected(413, f"{files} images in one request; the limit is {self.max_files}. "
                                         "Split the request.")
                if len(parts) - files > self.max_fields:
                    raise _Rejected(413, f"{len(parts) - files} form fields in one request; the limit is "
                                         f"{self.max_fields}")
                images = 0
                for key, value in parts:
                    is_file = isinstance(value, UploadFile)
                    if is_file and (problem := filename_problem(value.filename)):
                        raise _Rejected(400, f"image {images}: the file name {problem}; rename the file "
                                             f"(at most {MAX_FILENAME_BYTES} bytes, no NUL byte)")
                    images += is_file
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
        if self.before_body is not None and await self.before_body(scope, send):
            return
        try:
            body = await self._read_body(scope, receive)
            await self._check_framing(scope, body)
        except _Rejected as exc:
            await send_json(send, exc.status, {"error": str(exc)}, close=exc.body_unread)
            return
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if sent:
                return await receive()  # after the body: wait for the disconnect as usual
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)
