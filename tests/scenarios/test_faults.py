"""A scenario, real server level: faults around model versions, retrain processes and restarts,
against a real `bentoml serve` (1 HTTP and 2 inference workers) on real files. It drives
``service/jobs.py`` and ``service/retrain.py`` (the job killed), ``service/admin.py`` (activation
refused), ``service/runtime.py`` and ``store/local/registry.py`` (the fall-back at start-up): a
retrain process killed with SIGKILL mid-job while clients keep predicting, activation of a
corrupted version, a restart that must keep every piece of state, a restart on a corrupted active
version (falls back to the last good one), and a restart when no version verifies at all.

The tests run in order on one state directory (a copy of the session's bootstrapped home), each
building on what the one before left, as an operator's day would.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from store.state import open_state
from tests.support.admin import AUTH, TOKEN, predicted_versions, upload, wait_for_version
from tests.support.images import jpeg_files
from tests.support.load import Load
from tests.support.paths import CHELSEA
from tests.support.polling import eventually
from tests.support.server import Server, serving, start_server, wait_for_job, wait_until

pytestmark = pytest.mark.slow

ENV = {"TRANSFER_SERVE_WORKERS": "1", "TRANSFER_SERVE_INFERENCE_WORKERS": "2",
       "TRANSFER_SERVE_INTRA_OP_THREADS": "1", "TRANSFER_SERVE_ADMIN_TOKEN": TOKEN}
PER_CLASS = 32  # 64 images: 4 batches to embed, seconds of work in which to kill the job
FALLBACK_LINE = "MODEL FALLBACK"


@pytest.fixture(scope="module")
def home(bootstrapped_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    home = tmp_path_factory.mktemp("faults") / "home"
    shutil.copytree(bootstrapped_home, home)
    return home


@pytest.fixture(scope="module")
def first_server(home: Path) -> Iterator[Server]:
    """The server of the first tests; the restart test stops it (stopping twice is harmless)."""
    with serving(home, home.parent / "first.log", ENV) as server:
        yield server


@pytest.fixture(scope="module")
def seen() -> dict[str, Any]:
    """What earlier tests left for later ones (job ids)."""
    return {}


def version_dir(home: Path, version: str) -> Path:
    return home / "versions" / version


def flip_bytes(path: Path, count: int = 8) -> bytes:
    """Invert ``count`` bytes in the middle of ``path``; returns the original content."""
    original = path.read_bytes()
    middle = len(original) // 2
    flipped = bytes(b ^ 0xFF for b in original[middle:middle + count])
    path.write_bytes(original[:middle] + flipped + original[middle + count:])
    return original


def label_files(home: Path) -> dict[str, int]:
    """Every stored label image: name -> size. Files are named by the sha256 of their bytes."""
    files = {}
    for path in (home / "labels" / "images").rglob("*"):
        if path.is_file():
            assert hashlib.sha256(path.read_bytes()).hexdigest() == path.name, f"{path} is damaged"
            files[path.name] = path.stat().st_size
    return files


def process_gone(process: psutil.Process, timeout: float = 30) -> bool:
    """Exited within ``timeout`` seconds (a zombie not yet reaped by its parent counts as exited).

    A killed process is not gone at once: the kernel first tears down its memory, and while it
    does the process still shows as running, though its command line already reads empty (which
    is how the service may see it gone first and fail the job). On a loaded machine with a large
    process that takes a noticeable time, so this waits rather than looking once."""

    def exited() -> bool:
        try:
            return bool(process.status() == psutil.STATUS_ZOMBIE)
        except psutil.NoSuchProcess:
            return True

    try:
        return eventually(exited, timeout=timeout, interval=0.05)
    except TimeoutError:
        return False


# -- kill -9 the retrain process mid-job ----------------------------------------------------------

def test_a_retrain_process_killed_mid_job_fails_the_job_and_serving_never_stops(
    first_server: Server, home: Path, hymenoptera: Path, seen: dict[str, Any]
) -> None:
    with httpx.Client(base_url=first_server.url, timeout=60, headers=AUTH) as admin:
        assert upload(admin, "ants", jpeg_files(hymenoptera, "ants")[:PER_CLASS]).status_code == 200
        assert upload(admin, "bees", jpeg_files(hymenoptera, "bees")[:PER_CLASS]).status_code == 200
        with Load(first_server.url, [CHELSEA], clients=2) as stream:
            started = admin.post("/admin/retrain")
            assert started.status_code == 202, started.text
            job_id = started.json()["id"]
            job: dict[str, Any] = {}

            def mid_way() -> bool:  # kill it between batches of embeddings: real work, part of it done and cached
                job.update(admin.get(f"/admin/jobs/{job_id}").json())
                if job["state"] == "running" and job["phase"] == "embedding" and job["progress"] > 0.05:
                    return True
                if job["state"] not in ("queued", "running"):
                    pytest.fail(f"never caught the job mid-way (raise PER_CLASS): {job}")
                return False

            eventually(mid_way, timeout=60, interval=0.05,
                       message=lambda: f"never caught the job mid-way (raise PER_CLASS): {job}")
            pid = open_state(home=home).jobs.get(job_id).pid  # type: ignore[union-attr]
            assert pid is not None, "the running job has no process"
            process = psutil.Process(pid)
            assert "service.job_process" in process.cmdline() and job_id in process.cmdline()
            os.kill(pid, signal.SIGKILL)
            failed = wait_for_job(admin, job_id, timeout=30)
            assert process_gone(process)
            for _ in range(5):  # the stream goes on after the kill too
                predicted_versions(admin, 1)
        assert failed["state"] == "failed", failed
        assert "killed" in failed["error"] and "start a new job" in failed["error"], failed
        assert failed["version"] is None and failed["finished_at"]
        assert len(stream.answers) >= 5
        served = [(a.status, json.loads(a.body)[0]["model_version"] if a.status == 200 else a.body)
                  for a in stream.answers]
        assert [r for r in served if r != (200, "v1")] == []  # zero failed predictions

        listing = admin.get("/admin/models").json()
        assert listing["active"] == "v1" and [v["version"] for v in listing["versions"]] == ["v1"]
        store = home / "versions"
        assert sorted(p.name for p in store.iterdir() if p.is_dir()) == ["v1"]  # nothing half-written
        assert not list(home.glob("transfer-serve-retrain-*")), "the killed job's scratch directory is left"

        retry = wait_for_job(admin, admin.post("/admin/retrain").json()["id"])
        assert retry["state"] == "succeeded" and retry["version"] == "v2", retry
        assert retry["metrics"]["embeddings_computed"] + retry["metrics"]["embeddings_cached"] == 2 * PER_CLASS
        assert retry["metrics"]["embeddings_cached"] >= 16  # the killed job's finished batches were kept
        assert admin.get("/admin/models").json()["active"] == "v2"
        wait_for_version(admin, "v2")  # every inference worker swapped
        seen["jobs"] = [job_id, retry["id"]]


# -- a corrupted stored version cannot be activated ------------------------------------------------

@pytest.mark.parametrize("damaged", ["model.onnx", "spec.json"])
def test_activating_a_corrupted_version_is_refused_with_the_reason(
    first_server: Server, home: Path, damaged: str
) -> None:
    path = version_dir(home, "v1") / damaged  # v1 is inactive now: v2 serves
    original = flip_bytes(path)
    try:
        with httpx.Client(base_url=first_server.url, timeout=60, headers=AUTH) as admin:
            refused = admin.post("/admin/models/v1/activate")
            assert refused.status_code == 409, refused.text
            message = refused.json()["error"]
            assert "v1" in message and damaged in message and "corrupted" in message, message
            listing = admin.get("/admin/models")  # a damaged version is listed, not a 500
            assert listing.status_code == 200 and listing.json()["active"] == "v2"
            assert "fallback_from" not in listing.json()
            assert {v for v, _ in predicted_versions(admin, 4)} == {"v2"}
    finally:
        path.write_bytes(original)


def test_a_repaired_version_can_be_activated_again(first_server: Server) -> None:
    with httpx.Client(base_url=first_server.url, timeout=60, headers=AUTH) as admin:
        assert admin.post("/admin/models/v1/activate").json() == {"active": "v1"}
        assert admin.post("/admin/models/v2/activate").json() == {"active": "v2"}  # v1 is the last one before
        assert admin.get("/admin/models").json()["active"] == "v2"


# -- restarts --------------------------------------------------------------------------------------

def snapshot(http: httpx.Client, home: Path, job_ids: list[str]) -> dict[str, Any]:
    """What must survive a restart. The listing's ``replicas`` are heartbeats (their ``last_seen``
    moves on by design), so they are left out here and checked on their own."""
    models = http.get("/admin/models").json()
    models.pop("replicas")
    return {
        "labels": http.get("/admin/labels").json(),
        "models": models,
        "jobs": [http.get(f"/admin/jobs/{job_id}").json() for job_id in job_ids],
        "pointer": json.loads((home / "active_version.json").read_text()),
        "label_files": label_files(home),
    }


def test_a_restart_keeps_labels_versions_the_active_pointer_and_job_history(
    first_server: Server, home: Path, seen: dict[str, Any]
) -> None:
    with httpx.Client(base_url=first_server.url, timeout=60, headers=AUTH) as admin:
        before = snapshot(admin, home, seen["jobs"])
    first_server.stop()
    assert before["labels"]["counts"] == {"ants": PER_CLASS, "bees": PER_CLASS}
    assert len(before["label_files"]) == 2 * PER_CLASS
    assert [job["state"] for job in before["jobs"]] == ["failed", "succeeded"]
    assert before["pointer"]["version"] == "v2" and before["pointer"]["previous"][0] == "v1"

    with serving(home, home.parent / "second.log", ENV) as second, \
            httpx.Client(base_url=second.url, timeout=60, headers=AUTH) as admin:
        after = snapshot(admin, home, seen["jobs"])
        assert {v for v, _ in predicted_versions(admin, 4)} == {"v2"}
        assert after == before
        assert FALLBACK_LINE not in second.log()
        listing = admin.get("/admin/models").json()
        v2 = next(v for v in listing["versions"] if v["version"] == "v2")
        # the one replica, serving v2 in the variant the listing says (INT8 on this CPU where v2's passed the gate)
        assert v2["serves"] == ("int8" if "int8" in v2["variants"] else "fp32")
        assert [(r["version"], r["variant"]) for r in listing["replicas"]] == [("v2", v2["serves"])]


def test_a_restart_on_a_corrupted_active_version_serves_the_last_good_one(home: Path) -> None:
    flip_bytes(version_dir(home, "v2") / "model.onnx")
    server = start_server(home, home.parent / "third.log", ENV)
    statuses = []

    def ready() -> bool:  # clients that call during start-up see 503s, never a 500
        try:
            statuses.append(httpx.post(server.url + "/predict", files=[("images", ("c.jpg", CHELSEA))],
                                       timeout=30).status_code)
            return httpx.get(server.url + "/readyz", timeout=5).status_code == 200
        except httpx.TransportError:
            if server.process.poll() is not None:
                pytest.fail(server.log()[-3000:])
            return False

    try:
        eventually(ready, timeout=120, interval=0.2, message=lambda: f"not ready:\n{server.log()[-3000:]}")
        wait_until(server, timeout=5)
        assert set(statuses) <= {200, 503}, statuses
        with httpx.Client(base_url=server.url, timeout=60, headers=AUTH) as admin:
            assert {v for v, _ in predicted_versions(admin, 6)} == {"v1"}
            listing = admin.get("/admin/models").json()
            assert listing["active"] == "v1"
            assert listing["fallback_from"]["version"] == "v2"
            assert "model.onnx is corrupted" in listing["fallback_from"]["reason"]
            refused = admin.post("/admin/models/v2/activate")
            assert refused.status_code == 409 and "model.onnx is corrupted" in refused.json()["error"]
        lines = [line for line in server.log().splitlines() if FALLBACK_LINE in line]
        assert len(lines) == 1, lines  # one loud line, whichever worker got there first
        assert "ERROR" in lines[0] and "model version v2" in lines[0]
        assert "model.onnx is corrupted" in lines[0] and "now serving v1" in lines[0]
    finally:
        server.stop()


def test_a_restart_when_no_version_verifies_is_not_ready_and_says_why(home: Path) -> None:
    flip_bytes(version_dir(home, "v1") / "spec.json")  # v1 is active now; v2 is damaged already
    server = start_server(home, home.parent / "fourth.log", ENV)
    try:
        wait_until(server, "/livez")
        eventually(lambda: "no other stored version verifies" in server.log(), timeout=60, interval=0.2,
                   message=lambda: server.log()[-3000:])
        assert httpx.get(server.url + "/readyz", timeout=5).status_code == 503
        response = httpx.post(server.url + "/predict", files=[("images", ("c.jpg", CHELSEA))], timeout=30)
        assert response.status_code == 503, response.text
        assert "v1" in response.json()["error"] and "retry" in response.json()["error"]
        listing = httpx.get(server.url + "/admin/models", headers=AUTH, timeout=30)
        assert listing.status_code == 200 and listing.json()["active"] == "v1"
        assert "spec.json" in next(v for v in listing.json()["versions"] if v["version"] == "v1")["error"]
        # nothing to retrain from: a 409 that says why, not a 500
        retrain = httpx.post(server.url + "/admin/retrain", headers=AUTH, timeout=30)
        assert retrain.status_code == 409, retrain.text
        assert "cannot retrain from the active model version" in retrain.json()["error"]
        assert "spec.json" in retrain.json()["error"]
        # the label counts still answer when the active version's arrays cannot be read
        hashes = version_dir(home, "v1") / "embedding_hashes.npy"
        hashes.write_bytes(hashes.read_bytes()[:40])  # truncated
        labels = httpx.get(server.url + "/admin/labels", headers=AUTH, timeout=30)
        assert labels.status_code == 200, labels.text
        assert labels.json()["not_in_active_model"] is None and labels.json()["total"] >= 0
        assert FALLBACK_LINE not in server.log()
    finally:
        server.stop()
