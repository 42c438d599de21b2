"""Storage under load and under faults, against real `bentoml serve` processes (issue 6):

- 100 concurrent label uploads, many of them the same bytes with the same or another label:
  every distinct image is stored exactly once (files on disk = rows in the database = distinct
  hashes) and the label history is consistent;
- bodies far over the request limit are refused while they stream in, on /predict and
  /admin/labels, without the server holding them (or reading the rest of them);
- a state directory that cannot take a write: a file where a directory should be, a file size
  limit (RLIMIT_FSIZE) too small for a model version, a full volume (tmpfs) and a read-only one.
  Admin writes answer 507 with what failed and what to do, nothing is half-written (no row, no
  file, no temporary file, no model version), a retrain job ends ``failed`` with the reason,
  /predict keeps answering, and once the volume is fixed everything works again.

The tmpfs scenarios need ``mount`` (root with CAP_SYS_ADMIN) and are skipped without it; the
others run anywhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import io
import os
import random
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import psutil
import pytest
from PIL import Image

from service.retrain import failure_reason
from store import errors
from store.labels import check_image
from store.local import database as db
from store.state import open_state
from tests.conftest import ROOT, jpeg_files
from tests.server import Server, free_port, serving, start_command, wait_for_job, wait_until

TOKEN = "test-admin-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
CHELSEA = (ROOT / "training/samples/chelsea.jpg").read_bytes()
MAX_REQUEST_BYTES = 2_000_000
ENV = {"TRANSFER_SERVE_ADMIN_TOKEN": TOKEN, "TRANSFER_SERVE_WORKERS": "2",
       "TRANSFER_SERVE_INFERENCE_WORKERS": "1", "TRANSFER_SERVE_INTRA_OP_THREADS": "1"}
MODEL_DIR = Path("versions")


# -- helpers ---------------------------------------------------------------------------------------

def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def photos(hymenoptera: Path, label: str, start: int, count: int, max_bytes: int = 250_000) -> list[bytes]:
    """``count`` real photos of ``label`` under ``max_bytes`` each, from the ``start``-th on
    (tests take disjoint ranges so that each sees only its own images)."""
    small = [p.read_bytes() for p in jpeg_files(hymenoptera, label) if p.stat().st_size <= max_bytes]
    chosen = small[start : start + count]
    assert len(chosen) == count, f"not enough {label} photos under {max_bytes} bytes"
    return chosen


def noise_png(side: int, seed: int = 0) -> bytes:
    """An incompressible PNG of about 3 * side**2 bytes."""
    pixels = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", compress_level=0)
    return buffer.getvalue()


def store_state(home: Path) -> tuple[dict[str, str], set[str], list[Path]]:
    """What the label store holds: rows (id -> label), content files, and hidden (temporary or
    set-aside) files."""
    open_state(home=home).labels  # opening the store creates the database and its schema
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
    on_disk = sorted(p.name for p in (home / MODEL_DIR).iterdir() if p.is_dir())
    assert on_disk == ["v1"], f"model store holds {on_disk}"
    leftovers = [p.name for p in home.iterdir() if p.name.startswith("transfer-serve-retrain-")]
    assert not leftovers, f"retrain staging left behind: {leftovers}"


def upload(http: httpx.Client, label: str, *blobs: bytes) -> httpx.Response:
    return http.post("/admin/labels", data={"label": label},
                     files=[("images", (f"{i}.jpg", b)) for i, b in enumerate(blobs)])


def predicts(http: httpx.Client) -> str:
    """The serving model version, after checking that /predict answers."""
    response = http.post("/predict", files=[("images", ("chelsea.jpg", CHELSEA))])
    assert response.status_code == 200, response.text
    return response.json()[0]["model_version"]


def failed_retrain(http: httpx.Client) -> dict:
    """Start a retrain (accepted), wait for it, and return it: it must have failed."""
    started = http.post("/admin/retrain")
    assert started.status_code == 202, started.text
    job = wait_for_job(http, started.json()["id"], timeout=120)
    assert job["state"] == "failed", job
    return job


def assert_507(response: httpx.Response, *phrases: str) -> str:
    assert response.status_code == 507, response.text
    message = response.json()["error"]
    for phrase in phrases:
        assert phrase in message, f"{phrase!r} not in {message!r}"
    return message


def server_rss(server: Server) -> int:
    """Resident memory of the server and all its workers, in bytes."""
    root = psutil.Process(server.process.pid)
    return sum(p.memory_info().rss for p in [root, *root.children(recursive=True)])


def server_home(server: Server) -> Path:
    """The state directory a server was started on (from its environment)."""
    return Path(psutil.Process(server.process.pid).environ()["TRANSFER_SERVE_HOME"])


@pytest.fixture(scope="module")
def storage_server(bootstrapped_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("storage")
    home = root / "home"
    shutil.copytree(bootstrapped_home, home)
    with serving(home, root / "serve.log", {**ENV, "TRANSFER_SERVE_MAX_REQUEST_BYTES": str(MAX_REQUEST_BYTES)}) as server:
        yield server


@pytest.fixture
def admin(storage_server: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=storage_server.url, timeout=60, headers=AUTH) as http:
        yield http


# -- pure logic: failures injected at the write call ------------------------------------------------

def test_a_failed_write_stores_nothing_of_the_upload(tmp_path: Path, hymenoptera: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import store.local.labels as labels_module

    store = open_state(home=tmp_path / "home").labels
    kept, first, second = photos(hymenoptera, "ants", 0, 3)
    store.add(kept, "ants", max_pixels=10**8)
    real_write = labels_module.write_atomic
    calls = []

    def write_then_fill_the_disk(path: Path, data: bytes) -> None:
        calls.append(path.name)
        if len(calls) > 1:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        real_write(path, data)

    monkeypatch.setattr(labels_module, "write_atomic", write_then_fill_the_disk)
    with pytest.raises(errors.StorageError) as caught:
        store.add_many([check_image(first, max_pixels=10**8), check_image(second, max_pixels=10**8)], "bees")
    assert "storing the labelled images failed" in str(caught.value)
    assert "out of space" in str(caught.value) and "free space" in caught.value.hint
    assert calls == [sha(first), sha(second)]  # the first was written, then removed again
    assert assert_store_consistent(tmp_path / "home") == {sha(kept): "ants"}


@pytest.mark.parametrize("code,problem", [
    (errno.ENOSPC, "out of space"), (errno.EDQUOT, "quota"), (errno.EFBIG, "file size limit"),
    (errno.EROFS, "read-only"), (errno.EACCES, "not writable"), (errno.EPERM, "not writable"),
])
def test_write_errors_name_the_problem_and_the_fix(code: int, problem: str) -> None:
    failure = errors.storage_failure(OSError(code, os.strerror(code)), "writing x")
    assert failure is not None and problem in failure.problem
    assert str(failure).startswith("writing x failed: the state directory") and failure.hint
    assert errors.storage_failure(OSError(errno.ECONNRESET, "reset"), "writing x") is None
    assert errors.storage_failure(ValueError("not storage"), "writing x") is None


def test_database_errors_are_storage_failures(tmp_path: Path) -> None:
    path = tmp_path / "ro.db"
    with db.connected(path) as conn:
        conn.execute("CREATE TABLE t (x)")
    read_only = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        with pytest.raises(sqlite3.OperationalError) as caught:
            read_only.execute("INSERT INTO t VALUES (1)")
    finally:
        read_only.close()
    failure = errors.storage_failure(caught.value, "recording")
    assert failure is not None and "cannot write" in failure.problem
    with pytest.raises(sqlite3.OperationalError) as cannot_open:
        sqlite3.connect(tmp_path / "missing" / "x.db").execute("SELECT 1")
    assert errors.storage_failure(cannot_open.value, "opening") is not None
    with pytest.raises(sqlite3.OperationalError) as syntax:
        sqlite3.connect(":memory:").execute("SELEC 1")
    assert errors.storage_failure(syntax.value, "querying") is None


def test_retrain_failure_reasons_say_what_was_left() -> None:
    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/state/tmp/model.onnx")
    exporting = failure_reason(full, "exporting")
    assert exporting.startswith("writing the new model version failed: the state directory is out of space")
    assert "no model version was registered" in exporting
    activating = failure_reason(errors.storage_failure(full, "activating the new version v2"), "activating")  # type: ignore[arg-type]
    assert "v2" in activating and "registered but not active" in activating
    assert failure_reason(ValueError("bad"), "fitting") == "ValueError: bad"


# -- concurrent uploads ----------------------------------------------------------------------------

def test_concurrent_uploads_store_each_distinct_image_once(storage_server: Server, admin: httpx.Client,
                                                           hymenoptera: Path) -> None:
    home = server_home(storage_server)
    before = assert_store_consistent(home)
    distinct = photos(hymenoptera, "ants", 0, 10) + photos(hymenoptera, "bees", 0, 10)
    labels = ["ants", "bees", "wasps"]
    rng = random.Random(6)
    # 100 requests: 85 of one image (each image about 5 times, with a random label of three),
    # 15 of two images, among them the same bytes twice in one request
    plan: list[tuple[str, list[bytes]]] = [(rng.choice(labels), [distinct[i % 20]]) for i in range(85)]
    plan += [(rng.choice(labels), [distinct[i], distinct[(i * 7) % 20]]) for i in range(10)]
    plan += [(rng.choice(labels), [distinct[i], distinct[i]]) for i in range(5)]
    rng.shuffle(plan)

    async def send_all() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=len(plan), max_keepalive_connections=0)
        async with httpx.AsyncClient(base_url=storage_server.url, headers=AUTH, timeout=120, limits=limits) as http:
            return await asyncio.gather(*(
                http.post("/admin/labels", data={"label": label},
                          files=[("images", (f"{n}.jpg", blob)) for n, blob in enumerate(blobs)])
                for label, blobs in plan
            ))

    responses = asyncio.run(send_all())
    failed = [(r.status_code, r.text[:300]) for r in responses if r.status_code != 200]
    assert not failed, f"{len(failed)} of {len(plan)} uploads failed: {failed[:5]}"

    ids = {sha(blob) for blob in distinct}
    stored: Counter[str] = Counter()
    # label flow per image: stored as L (+1 into L), moved A -> B (-1 A, +1 B); what remains is
    # the final label, so a lost or doubled update shows up as a wrong balance
    balance: dict[str, Counter[str]] = defaultdict(Counter)
    tried: dict[str, set[str]] = defaultdict(set)
    for (label, blobs), response in zip(plan, responses):
        entries = response.json()["stored"]
        assert [e["image_id"] for e in entries] == [sha(b) for b in blobs]
        for entry in entries:
            image_id = entry["image_id"]
            tried[image_id].add(label)
            assert entry["label"] == label
            if entry["status"] == "stored":
                stored[image_id] += 1
                balance[image_id][label] += 1
            elif entry["status"] == "moved":
                assert entry["previous_label"] != label
                balance[image_id][entry["previous_label"]] -= 1
                balance[image_id][label] += 1
            else:
                assert entry["status"] == "unchanged"
    assert stored == Counter({image_id: 1 for image_id in ids}), "each distinct image is stored exactly once"

    rows = assert_store_consistent(home)
    assert set(rows) == set(before) | ids and len(rows) == len(before) + 20
    for image_id in ids:
        assert rows[image_id] in tried[image_id]
        assert +balance[image_id] == Counter({rows[image_id]: 1}), f"label history of {image_id[:12]} does not add up"
    listing = admin.get("/admin/labels").json()
    assert listing["total"] == len(rows)
    assert listing["counts"] == dict(Counter(rows.values()))
    assert listing["not_in_active_model"] == len(rows)  # the bootstrap model was trained on none


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


# -- a damaged state directory (no privileges needed) ---------------------------------------------

def test_a_file_where_a_directory_should_be(storage_server: Server, admin: httpx.Client, hymenoptera: Path) -> None:
    """The image's shard directory is a file: the upload is refused with 507, all or nothing;
    other images still store, and once the file is gone the image stores too."""
    home = server_home(storage_server)
    before = assert_store_consistent(home)
    images = home / "labels" / "images"
    candidates = photos(hymenoptera, "bees", 10, 30)
    fine = candidates[0]
    blocked = next(b for b in candidates[1:] if not (images / sha(b)[:2]).exists() and sha(b)[:2] != sha(fine)[:2])
    obstacle = images / sha(blocked)[:2]
    obstacle.write_bytes(b"not a directory")
    try:
        message = assert_507(upload(admin, "wasps", fine, blocked),
                             "storing the labelled images failed", "a file is where a directory should be",
                             "none of the 2 image(s) of this request was stored", "To fix")
        assert TOKEN not in message
        assert assert_store_consistent(home) == before  # the first image's file was removed again
        assert predicts(admin) == "v1"
        assert upload(admin, "wasps", fine).json()["stored"][0]["status"] == "stored"
    finally:
        obstacle.unlink()
    assert upload(admin, "wasps", blocked).json()["stored"][0]["status"] == "stored"
    assert assert_store_consistent(home) == {**before, sha(fine): "wasps", sha(blocked): "wasps"}


# -- a file size limit (RLIMIT_FSIZE): the retrain job cannot write its model ----------------------

FSIZE_LIMIT = 4 << 20  # above BentoML's 1 MiB metric files and the database, below an 18 MB model

LAUNCH_WITH_FSIZE = (
    "import os, resource, sys; lim = int(sys.argv[1]); "
    "resource.setrlimit(resource.RLIMIT_FSIZE, (lim, lim)); os.execv(sys.argv[2], sys.argv[2:])"
)


@contextlib.contextmanager
def serving_with_file_size_limit(home: Path, log_path: Path, limit: int) -> Iterator[Server]:
    """``bentoml serve`` (and so every retrain job it starts) with RLIMIT_FSIZE = ``limit``:
    a write past it fails with EFBIG (Python ignores SIGXFSZ)."""
    port = free_port()
    bentoml_home = Path(tempfile.mkdtemp(prefix="bentoml-home-"))
    bentoml = Path(sys.executable).with_name("bentoml")
    server = start_command(
        [sys.executable, "-c", LAUNCH_WITH_FSIZE, str(limit), str(bentoml), "serve",
         "service.service:TransferServe", "--host", "127.0.0.1", "--port", str(port)],
        port, log_path, {**ENV, "TRANSFER_SERVE_HOME": str(home), "BENTOML_HOME": str(bentoml_home)},
    )
    server.bentoml_home = bentoml_home
    try:
        wait_until(server, timeout=180)
        yield server
    finally:
        server.stop()


@pytest.mark.slow
def test_retrain_that_cannot_write_its_model_fails_and_registers_nothing(
    bootstrapped_home: Path, tmp_path: Path, hymenoptera: Path
) -> None:
    home = tmp_path / "home"
    shutil.copytree(bootstrapped_home, home)
    with serving_with_file_size_limit(home, tmp_path / "serve.log", FSIZE_LIMIT) as server, \
            httpx.Client(base_url=server.url, timeout=60, headers=AUTH) as http:
        assert upload(http, "ants", *photos(hymenoptera, "ants", 40, 3)).status_code == 200
        assert upload(http, "bees", *photos(hymenoptera, "bees", 40, 3)).status_code == 200
        job = failed_retrain(http)
        assert job["error"].startswith("writing the new model version failed: the state directory "
                                       "cannot take a file this large"), job["error"]
        assert "no model version was registered" in job["error"] and "ulimit" in job["error"]
        assert job["version"] is None
        models = http.get("/admin/models").json()
        assert models["active"] == "v1" and [v["version"] for v in models["versions"]] == ["v1"]
        assert_nothing_registered(home)
        assert predicts(http) == "v1"

        # an upload part over 1 MiB is spooled to the temporary directory, under the same limit
        big = noise_png(1300)
        assert len(big) > FSIZE_LIMIT
        spooled = http.post("/admin/labels", data={"label": "ants"}, files=[("images", ("big.png", big))])
        assert_507(spooled, "temporary directory", "nothing was stored", "To fix")
        client_side = http.post("/predict", files=[("images", ("big.png", big))])
        assert client_side.status_code == 503 and "retry" in client_side.json()["error"]
        assert "tmp" not in client_side.json()["error"]  # clients are not told about the server's disks
        assert predicts(http) == "v1"
    assert len(assert_store_consistent(home)) == 6


# -- a full, then read-only, volume (tmpfs; needs mount) --------------------------------------------

def run_mount(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["mount", *args], capture_output=True, text=True, check=False)


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    path.mkdir(parents=True)
    mounted = run_mount("-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)) if shutil.which("mount") else None
    if mounted is None or mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.strip() if mounted else 'no mount command'})")
    try:
        yield path
    finally:
        if subprocess.run(["umount", str(path)], check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], check=False)


def remount_read_only(volume: Path, timeout: float = 30) -> None:
    """``mount -o remount,ro``, retried while the volume is busy: the failed retrain job's
    process may still hold its log file open for writing for a moment after it reported."""
    deadline = time.monotonic() + timeout
    while True:
        remounted = run_mount("-o", "remount,ro", str(volume))
        if remounted.returncode == 0:
            return
        if "busy" not in remounted.stderr or time.monotonic() > deadline:
            raise AssertionError(f"cannot remount {volume} read-only: {remounted.stderr}")
        time.sleep(0.2)


def fill(volume: Path, name: str, leave: int) -> Path:
    """A file that takes all the free space of ``volume`` but ``leave`` bytes."""
    stats = os.statvfs(volume)
    free = stats.f_bavail * stats.f_frsize
    filler = volume / name
    with filler.open("wb") as fh:
        remaining = free - leave
        block = bytes(1 << 20)
        while remaining > 0:
            try:
                remaining -= fh.write(block[: min(len(block), remaining)])
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                break
    return filler


@pytest.mark.slow
def test_full_then_read_only_volume(bootstrapped_home: Path, tmp_path: Path, hymenoptera: Path) -> None:
    with tmpfs(tmp_path / "volume", "64m") as volume:
        home = volume / "home"
        shutil.copytree(bootstrapped_home, home)
        with serving(home, tmp_path / "serve.log", ENV) as server, \
                httpx.Client(base_url=server.url, timeout=60, headers=AUTH) as http:
            # 20 a class: with fewer, the job fails its head check before it registers anything
            ants = photos(hymenoptera, "ants", 0, 20, max_bytes=150_000)
            assert upload(http, "ants", *ants).status_code == 200
            assert upload(http, "bees", *photos(hymenoptera, "bees", 0, 20, max_bytes=150_000)).status_code == 200
            before = assert_store_consistent(home)
            big = noise_png(450)  # ~600 kB: more than the room left below, less than 1 MiB (not spooled)

            # room for the job's candidate model (18.6 MB, written to a temporary directory in
            # the state directory) but not for its registered copy: the copy into the model
            # store fails half-way, and no version, complete or not, may be left
            job_filler = fill(volume, "filler-job", leave=26 << 20)
            job = failed_retrain(http)
            assert job["error"].startswith("writing the new model version failed: the state directory is "
                                           "out of space"), job["error"]
            assert "no model version was registered" in job["error"] and job["version"] is None
            assert_nothing_registered(home)
            assert [v["version"] for v in http.get("/admin/models").json()["versions"]] == ["v1"]
            assert predicts(http) == "v1"

            # nearly full: room for the database, not for this image (all or nothing: the small
            # one that fitted is removed again)
            filler = fill(volume, "filler", leave=256 << 10)
            assert_507(upload(http, "bees", CHELSEA, big), "storing the labelled images failed",
                       "out of space", "No space left on device", "none of the 2 image(s)", "free space")
            assert assert_store_consistent(home) == before
            assert predicts(http) == "v1"

            # completely full: no image file fits, and the database cannot even be opened for a
            # write (SQLite cannot allocate its shared-memory file), so a relabel that writes no
            # file fails too, and so does starting a job
            last = fill(volume, "filler-2", leave=0)
            assert_507(upload(http, "bees", CHELSEA), "out of space")
            assert_507(upload(http, "wasps", ants[0]), "storing the labelled image failed", "out of space",
                       "none of the 1 image(s)")
            assert_507(http.post("/admin/retrain"), "starting the retrain job failed", "out of space",
                       "no job was started")
            assert predicts(http) == "v1"
            for path in (job_filler, filler, last):
                path.unlink()
            assert assert_store_consistent(home) == before

            # read-only volume (as with a volume mounted ro, or an fs remounted ro on errors)
            remount_read_only(volume)
            try:
                assert_507(upload(http, "bees", CHELSEA), "read-only", "none of the 1 image(s)")
                assert_507(http.delete(f"/admin/labels/{next(iter(before))}"), "read-only")
                assert_507(http.post("/admin/retrain"), "starting the retrain job failed", "read-only",
                           "no job was started")
                assert_507(http.get("/admin/labels"), "read-only")
                assert predicts(http) == "v1"
                # a (re)start on the read-only volume serves predictions and says what is wrong
                with serving(home, tmp_path / "serve-ro.log", ENV) as again, \
                        httpx.Client(base_url=again.url, timeout=60, headers=AUTH) as http_again:
                    assert predicts(http_again) == "v1"
                    assert_507(http_again.get("/admin/labels"), "read-only")
                assert "could not check the job history" in (tmp_path / "serve-ro.log").read_text()
            finally:
                remounted = run_mount("-o", "remount,rw", str(volume))
                assert remounted.returncode == 0, remounted.stderr

            # fixed: everything works again
            assert upload(http, "bees", CHELSEA).json()["stored"][0]["status"] == "stored"
            assert http.get("/admin/labels").json()["total"] == len(before) + 1
            assert predicts(http) == "v1"
        assert_store_consistent(home)
