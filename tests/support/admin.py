"""Talking to a real server's API as the HTTP tests do (the admin token, uploads, which version
answers), and checking what a state directory holds afterwards."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from store.local import database as db
from store.state import open_state
from tests.support.paths import CHELSEA
from tests.support.polling import eventually
from tests.support.server import Server, wait_for_job

TOKEN = "test-admin-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
#: the storage tests' servers: the admin token, 2 HTTP workers, 1 inference worker with 1 thread
STORAGE_ENV = {"TRANSFER_SERVE_ADMIN_TOKEN": TOKEN, "TRANSFER_SERVE_WORKERS": "2",
               "TRANSFER_SERVE_INFERENCE_WORKERS": "1", "TRANSFER_SERVE_INTRA_OP_THREADS": "1"}
#: the storage server's request limit
MAX_REQUEST_BYTES = 2_000_000


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def upload(http: httpx.Client, label: str, photos: list[Path]) -> httpx.Response:
    """``POST /admin/labels`` of the photo files, under their own names."""
    return http.post("/admin/labels", data={"label": label},
                     files=[("images", (p.name, p.read_bytes())) for p in photos])


def upload_blobs(http: httpx.Client, label: str, *blobs: bytes) -> httpx.Response:
    """``POST /admin/labels`` of image bytes, named ``0.jpg``, ``1.jpg``, ..."""
    return http.post("/admin/labels", data={"label": label},
                     files=[("images", (f"{i}.jpg", b)) for i, b in enumerate(blobs)])


def predicted_versions(http: httpx.Client, n: int = 10) -> list[tuple[str, str]]:
    """(model version, label) of ``n`` predictions of the sample cat photo, each checked to be a 200."""
    out = []
    for _ in range(n):
        response = http.post("/predict", files=[("images", ("c.jpg", CHELSEA))])
        assert response.status_code == 200, response.text
        out.append((response.json()[0]["model_version"], response.json()[0]["label"]))
    return out


def wait_for_version(http: httpx.Client, version: str, timeout: float = 5.0) -> float:
    """Seconds until 10 predictions in a row come from ``version`` (all workers swapped)."""
    started = time.monotonic()

    def all_switched() -> bool:
        try:
            versions = predicted_versions(http)
        except AssertionError as failed:  # a failed prediction fails the test: it is not retried
            pytest.fail(str(failed))
        return all(v == version for v, _ in versions)

    eventually(all_switched, timeout=timeout + 5, interval=0, message=f"workers did not all switch to {version}")
    return time.monotonic() - started


def predicts(http: httpx.Client) -> str:
    """The serving model version, after checking that /predict answers."""
    response = http.post("/predict", files=[("images", ("chelsea.jpg", CHELSEA))])
    assert response.status_code == 200, response.text
    return str(response.json()[0]["model_version"])


def failed_retrain(http: httpx.Client) -> dict[str, Any]:
    """Start a retrain (accepted), wait for it, and return it: it must have failed."""
    started = http.post("/admin/retrain")
    assert started.status_code == 202, started.text
    job = wait_for_job(http, started.json()["id"], timeout=120)
    assert job["state"] == "failed", job
    return job


def assert_507(response: httpx.Response, *phrases: str) -> str:
    """A 507 whose message holds every phrase; returns the message."""
    assert response.status_code == 507, response.text
    message = str(response.json()["error"])
    for phrase in phrases:
        assert phrase in message, f"{phrase!r} not in {message!r}"
    return message


def server_home(server: Server) -> Path:
    """The state directory a server was started on (from its environment)."""
    import psutil

    return Path(psutil.Process(server.process.pid).environ()["TRANSFER_SERVE_HOME"])


# -- what a single-machine state directory holds ----------------------------------------------------


def store_state(home: Path) -> tuple[dict[str, str], set[str], list[Path]]:
    """What the label store holds: rows (id -> label), content files, and hidden (temporary or
    set-aside) files."""
    _ = open_state(home=home).labels  # opening the store creates the database and its schema
    with db.connected(db.database_path(home)) as conn:
        rows = dict(conn.execute("SELECT id, label FROM images").fetchall())
    images = home / "labels" / "images"
    files = {p.name for p in images.glob("*/*") if p.is_file() and not p.name.startswith(".")}
    hidden = sorted(images.rglob(".*"))
    return rows, files, hidden


def assert_store_consistent(home: Path) -> dict[str, str]:
    """Every row has its file, every file its row, each file holds the bytes its name says, no
    temporary file is left, and the database is intact. Returns the rows."""
    rows, files, hidden = store_state(home)
    assert set(rows) == files, f"rows without files: {set(rows) - files}; files without rows: {files - set(rows)}"
    assert not hidden, f"temporary files left behind: {hidden}"
    for image_id in files:
        assert sha((home / "labels/images" / image_id[:2] / image_id).read_bytes()) == image_id
    with db.connected(db.database_path(home)) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    return rows


def assert_nothing_registered(home: Path) -> None:
    """Only the bootstrap version exists, on disk and in the registry's view; no staging left."""
    on_disk = sorted(p.name for p in (home / "versions").iterdir() if p.is_dir())
    assert on_disk == ["v1"], f"model store holds {on_disk}"
    leftovers = [p.name for p in home.iterdir() if p.name.startswith("transfer-serve-retrain-")]
    assert not leftovers, f"retrain staging left behind: {leftovers}"
