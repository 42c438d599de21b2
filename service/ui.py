"""The operators' page at ``/ui``: static files (``service/static/``: HTML, one ES module, one
style sheet) that drive the admin API from the browser. No build step and no server-side state:
the page signs in with the admin token, keeps it in the tab's ``sessionStorage`` and sends it as
``Authorization: Bearer`` on each admin call, so serving the files needs no token.

Only the files present in the directory when the app is created are served, looked up by exact
name (no path is ever joined with request input, so no traversal), and every answer carries a
strict Content-Security-Policy: scripts and styles from this origin only, no inline code, images
from this origin or ``blob:`` URLs (kept predictions are fetched with the token and shown as blobs),
and the page may not be framed.
"""

from __future__ import annotations

import mimetypes
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.routing import Route

from .errors import ApiError

STATIC = Path(__file__).with_name("static")

CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob:; connect-src 'self'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
#: Sent with every answer of the page's app, errors included.
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    # revalidate on each load: a new release's page never runs against a stale app.js
    "Cache-Control": "no-cache",
}
#: Media types of the page's files, so that nosniff never meets a guessed type.
MEDIA_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
               ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml", ".png": "image/png"}


class SecurityHeaders:
    """ASGI middleware: :data:`SECURITY_HEADERS` on every response (replacing any of the same name)."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self._headers = [(name.lower().encode(), value.encode()) for name, value in SECURITY_HEADERS.items()]
        self._names = {name for name, _ in self._headers}

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def with_headers(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                kept = [(k, v) for k, v in message.get("headers") or [] if k.lower() not in self._names]
                message = {**message, "headers": [*kept, *self._headers]}
            await send(message)

        await self.app(scope, receive, with_headers)


def create_ui_app(directory: Path = STATIC) -> Starlette:
    """The page's files as an ASGI app, to mount at ``/ui``: ``/`` (and the mount point itself)
    is ``index.html``; any other name must be a file directly in ``directory``."""
    files = {path.name: path for path in sorted(directory.iterdir()) if path.is_file()}
    if "index.html" not in files:
        raise FileNotFoundError(f"the operators' page has no index.html in {directory}")

    async def serve(request: Request) -> Response:
        name = request.path_params["name"] or "index.html"
        path = files.get(name)
        if path is None:
            return ApiError(404, f"no file '{name[:100]}' in the operators' page (GET /ui/ is the page)").response()
        media_type = MEDIA_TYPES.get(path.suffix) or mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        return FileResponse(path, media_type=media_type)

    return Starlette(routes=[Route("/{name:path}", serve, methods=["GET", "HEAD"])],
                     middleware=[Middleware(SecurityHeaders)])
