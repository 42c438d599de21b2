"""The request guard: ASGI middleware that checks every POST to ``/predict``, ``/admin`` and ``/v2``
before BentoML or FastAPI parses it, and the one place uploads are checked.

- The admin token is checked first (``before_body``), so a caller without it cannot make the
  server buffer an upload.
- A declared ``Content-Length`` over the limit is answered 413 before a byte of the body is read;
  a body without one is counted as it streams and cut off at the limit, so no oversized upload is
  ever held whole. The 413 closes the connection (``Connection: close``): otherwise the server
  would go on receiving, and discarding, the rest of the body, however large.
- The body's framing is checked (multipart that does not parse, JSON that does not decode, a
  content type the route cannot take): the frameworks would answer some of those with a 500, and
  no client input may produce a 500. ``/v2`` bodies (JSON, or JSON then binary tensor data) are
  only bounded and their content type checked: the protocol's parser checks the rest.
- Uploads: at most ``max_files`` files, only in the field ``images``, none empty, none over
  ``max_file_bytes``, and no file name the server could not use for its temporary copy. Routes
  then only decode what passed.

The checked body is replayed to the application unchanged. A file part that cannot be buffered
(Starlette spools parts over 1 MiB to the temporary directory, which may be full) is the server's
fault: 507 on admin routes, 503 elsewhere.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from .errors import ApiError, send_error

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

log = logging.getLogger(__name__)

GUARDED_PATHS = ("/predict", "/admin", "/v2")
#: The Open Inference Protocol's routes: their bodies are JSON, or JSON then binary tensor data,
#: which the protocol's own parser checks (service/open_inference.py).
OIP_PREFIX = "/v2"
FILE_FIELD = "images"
#: Starlette's own limit on a form's fields, which it answers with a text/plain 400.
MAX_FIELDS = 1000
#: The longest client file name (its last path component, in UTF-8 bytes) accepted. BentoML keeps
#: each /predict upload in a temporary file named "tmp" + 8 characters + that name, which must fit
#: the file system's 255-byte limit on a name: longer names made BentoML fail with a 500.
MAX_FILENAME_BYTES = 200
_BENTOML_TEMP_PREFIX = re.compile(r"^tmp[a-z0-9_]{8}")


def display_name(path: Path | str) -> str:
    """A client's file name (or any client-given text), safe to echo back, never used as a path.
    BentoML stores each /predict upload as a temporary file named 'tmp' + 8 random characters +
    the client's base name: that prefix is dropped."""
    name = _BENTOML_TEMP_PREFIX.sub("", Path(str(path)).name)
    return "".join(ch if ch.isprintable() else "?" for ch in name)[:100]


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


class _BodyUnread(ApiError):
    """A refusal sent before the whole body was read: the connection is closed after it."""


class RequestGuard:
    def __init__(self, app: Any, *, max_bytes: int, max_files: int, max_file_bytes: int,
                 before_body: Callable[[Scope, Send], Awaitable[bool]] | None = None) -> None:
        self.app = app
        # run before the body is read; True if it answered the request itself
        self.before_body = before_body
        self.max_bytes = max_bytes
        self.max_files = max_files
        self.max_file_bytes = max_file_bytes

    async def _read_body(self, scope: Scope, receive: Receive) -> bytes:
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            raise _BodyUnread(413, f"request body is {int(declared)} bytes; the limit is {self.max_bytes} bytes")
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise ApiError(400, "the client disconnected before sending the whole body")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                raise _BodyUnread(413, f"request body is larger than the {self.max_bytes}-byte limit")
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    @staticmethod
    def _spool_failure(scope: Scope, exc: OSError) -> ApiError:
        """The server, not the client, is at fault: a 5xx, with what to do for the operator on
        admin routes; clients of the other routes are only told to retry."""
        import tempfile

        where = tempfile.gettempdir()
        log.error("could not buffer an upload to %s in %s: %s", scope["path"], where, exc)
        if scope["path"].startswith("/admin"):
            return ApiError(507, f"could not buffer the upload in the server's temporary directory {where} "
                                 f"({exc.strerror or exc}); nothing was stored. To fix: free space there or "
                                 "point TMPDIR at a volume with room, then send the request again.")
        return ApiError(503, "the server cannot receive uploads right now (its temporary storage is "
                             "full); retry later")

    async def _check_form(self, scope: Scope, body: bytes) -> None:
        from starlette.datastructures import UploadFile
        from starlette.requests import Request

        async def replay() -> Message:
            return {"type": "http.request", "body": body, "more_body": False}

        try:
            form = await Request(scope, replay).form(max_files=10_000, max_fields=10_000)
        except OSError as exc:  # file parts over 1 MiB are spooled to the temporary directory
            raise self._spool_failure(scope, exc) from None
        except Exception as exc:  # noqa: BLE001 - Starlette raises MultiPartException, python-multipart others
            raise ApiError(400, f"malformed multipart body: {exc}") from None
        try:
            parts = form.multi_items()
            files = sum(isinstance(value, UploadFile) for _, value in parts)
            if files > self.max_files:
                raise ApiError(413, f"{files} images in one request; the limit is {self.max_files}. Split the request.")
            if len(parts) - files > MAX_FIELDS:
                raise ApiError(413, f"{len(parts) - files} form fields in one request; the limit is {MAX_FIELDS}")
            index = 0
            for key, value in parts:
                if not isinstance(value, UploadFile):
                    if key == FILE_FIELD:
                        raise ApiError(400, f"field '{key}' must hold files (multipart file parts), not text")
                    continue
                if problem := filename_problem(value.filename):
                    raise ApiError(400, f"image {index}: the file name {problem}; rename the file "
                                        f"(at most {MAX_FILENAME_BYTES} bytes, no NUL byte)")
                if key != FILE_FIELD:
                    raise ApiError(400, f"field '{key}' does not take files; send images in the field '{FILE_FIELD}'")
                self._check_file(index, display_name(value.filename or f"image-{index}"), value.size or 0)
                index += 1
        finally:
            await form.close()

    def _check_file(self, index: int, name: str, size: int) -> None:
        if size == 0:
            raise ApiError(400, f"image {index} ('{name}') is empty", image=index, filename=name)
        if size > self.max_file_bytes:
            raise ApiError(413, f"image {index} ('{name}') is {size} bytes; the limit is {self.max_file_bytes} bytes",
                           image=index, filename=name)

    async def _check_framing(self, scope: Scope, body: bytes) -> None:
        headers = dict(scope.get("headers") or [])
        content_type = headers.get(b"content-type", b"").decode("latin-1")
        media_type = content_type.split(";")[0].strip().lower()
        if scope["path"] == OIP_PREFIX or scope["path"].startswith(OIP_PREFIX + "/"):
            encoding = headers.get(b"content-encoding", b"identity").decode("latin-1").strip().lower()
            if encoding not in ("identity", ""):
                raise ApiError(415, f"unsupported content encoding '{encoding}': send the body uncompressed")
            if media_type not in ("application/json", "application/octet-stream", ""):
                raise ApiError(415, f"unsupported content type '{media_type}': send application/json, or "
                                    "application/octet-stream with binary tensor data")
            return
        if media_type in ("multipart/form-data", "application/x-www-form-urlencoded"):
            await self._check_form(scope, body)
        elif media_type in ("application/json", ""):
            if body.strip():
                try:
                    json.loads(body)
                except ValueError as exc:
                    raise ApiError(400, f"malformed JSON body: {exc}") from None
        else:
            raise ApiError(415, f"unsupported content type '{media_type}': send multipart/form-data "
                                "(files) or application/json")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") != "POST" or not scope["path"].startswith(GUARDED_PATHS):
            await self.app(scope, receive, send)
            return
        if self.before_body is not None and await self.before_body(scope, send):
            return
        try:
            body = await self._read_body(scope, receive)
            await self._check_framing(scope, body)
        except ApiError as exc:
            await send_error(send, exc, close=isinstance(exc, _BodyUnread))
            return
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if sent:
                return await receive()  # after the body: wait for the disconnect as usual
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)
