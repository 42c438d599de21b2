"""Hostile input for the HTTP tests: a real photo to wrap it around, multipart bodies written
byte for byte (file names as a client sends them, not as httpx would escape them), and the names
that try to pick a path."""

from __future__ import annotations

import tempfile
import uuid
from pathlib import Path

import httpx
from PIL import Image

from tests.support.images import encode
from tests.support.paths import ROOT, SAMPLES

PHOTO = Image.open(SAMPLES / "chelsea.jpg").convert("RGB").reduce(2)  # 226 x 150
PHOTO_JPEG = encode(PHOTO, "JPEG", quality=90)


def multipart(files: list[tuple[str, bytes]], **fields: str) -> tuple[bytes, dict[str, str]]:
    """A multipart body with each file name written as it is (UTF-8): httpx would escape NUL,
    CR, LF, quotes and backslashes, and the point here is what the server does with them."""
    boundary = uuid.uuid4().hex
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{key}"\r\n\r\n{value}\r\n'.encode()
             for key, value in fields.items()]
    for name, data in files:
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="images"; filename="'.encode()
                     + name.encode() + b'"\r\nContent-Type: application/octet-stream\r\n\r\n' + data + b"\r\n")
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    return body, {"content-type": f"multipart/form-data; boundary={boundary}"}


def post_raw(client: httpx.Client, path: str, files: list[tuple[str, bytes]], **fields: str) -> httpx.Response:
    body, headers = multipart(files, **fields)
    return client.post(path, content=body, headers=headers)


def assert_client_error(response: httpx.Response, status: int, *fragments: str) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert isinstance(body.get("error"), str) and body["error"], body
    for fragment in fragments:
        assert fragment in body["error"], (fragment, body)
    return body


def written_anywhere(tag: str, *roots: Path) -> list[Path]:
    """Files or folders named with ``tag`` directly in /tmp, the repository, or under ``roots``."""
    found = [hit for folder in (Path(tempfile.gettempdir()), ROOT, ROOT.parent) for hit in folder.glob(f"*{tag}*")]
    return found + [hit for root in roots for hit in root.rglob(f"*{tag}*")]


HOSTILE_NAMES = ["../../../../../../../tmp/{tag}.jpg", "/etc/{tag}", "..\\..\\{tag}.jpg", "{tag}\u2215..\u2215x.jpg",
                 "{tag}/", ".", "..", "{tag}\r\nX-Injected: 1.jpg", "\u202e{tag}gpj.exe"]
