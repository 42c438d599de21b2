"""Start and stop a real ``bentoml serve`` process for tests (and benchmarks)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Server:
    url: str
    process: subprocess.Popen[bytes]
    log_path: Path
    bentoml_home: Path | None = None  # private to this server; removed by stop()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 20) -> None:
        """Stop the server and every process it started. BentoML's supervisor puts each worker
        in a process group of its own, so the workers are collected first and any that outlive
        their supervisor are killed by pid."""
        import psutil

        try:
            workers = psutil.Process(self.process.pid).children(recursive=True)
        except psutil.Error:
            workers = []
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        _, alive = psutil.wait_procs(workers, timeout=5)
        for process in alive:
            with contextlib.suppress(psutil.Error):
                process.kill()
        psutil.wait_procs(alive, timeout=5)
        if self.bentoml_home is not None:
            shutil.rmtree(self.bentoml_home, ignore_errors=True)


def start_command(command: Sequence[str], port: int, log_path: Path,
                  env: Mapping[str, str] | None = None) -> Server:
    """Run ``command`` (anything that serves HTTP on ``port`` of 127.0.0.1) from the repository
    root, in its own process group so that ``Server.stop`` ends it and all its children."""
    full_env = {**os.environ, "BENTOML_DO_NOT_TRACK": "True", **(env or {})}
    with log_path.open("wb") as log:  # the child keeps its own descriptor
        process = subprocess.Popen(
            list(command), cwd=ROOT, env=full_env, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return Server(f"http://127.0.0.1:{port}", process, log_path)


def start_server(home: Path, log_path: Path, env: Mapping[str, str] | None = None,
                 target: str = "service.service:TransferServe") -> Server:
    """``bentoml serve TARGET`` on a free port. Each server gets a private ``BENTOML_HOME``
    unless ``env`` names one: ``bentoml serve`` wipes ``$BENTOML_HOME/prometheus_multiproc_dir``
    when it starts, so servers sharing one would reset each other's ``/metrics``."""
    port = free_port()
    bentoml = Path(sys.executable).with_name("bentoml")
    private = None if env and "BENTOML_HOME" in env else Path(tempfile.mkdtemp(prefix="bentoml-home-"))
    server = start_command(
        # the keep-alive timeout scripts/serve and the container use (not uvicorn's racy 5 s)
        [str(bentoml), "serve", target, "--host", "127.0.0.1", "--port", str(port), "--timeout-keep-alive", "75"],
        port, log_path,
        {"TRANSFER_SERVE_HOME": str(home), **({"BENTOML_HOME": str(private)} if private else {}), **(env or {})},
    )
    server.bentoml_home = private
    return server


@contextlib.contextmanager
def serving(home: Path, log_path: Path, env: Mapping[str, str] | None = None,
            target: str = "service.service:TransferServe", timeout: float = 180) -> Iterator[Server]:
    """A ready server (``/readyz`` 200) for the block; stopped however the block ends."""
    server = start_server(home, log_path, env, target)
    try:
        wait_until(server, timeout=timeout)
        yield server
    finally:
        server.stop()


def wait_until(server: Server, path: str = "/readyz", status: int = 200, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"server exited with {server.process.returncode}:\n{server.log()[-3000:]}")
        try:
            if httpx.get(server.url + path, timeout=2).status_code == status:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    raise TimeoutError(f"{path} did not answer {status} within {timeout}s:\n{server.log()[-3000:]}")


@dataclass
class Answer:
    sent: float
    done: float
    status: int | None  # None: no HTTP answer at all
    body: str


class Load:
    """``clients`` threads posting single photos to ``/predict`` back to back until stopped;
    every answer is recorded with when it was sent and received (a failed connection too)."""

    def __init__(self, url: str, photos: list[bytes], clients: int) -> None:
        self.url = url
        self.photos = photos
        self.clients = clients
        self.answers: list[Answer] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._client, args=(i,), daemon=True) for i in range(clients)]

    def _client(self, index: int) -> None:
        with httpx.Client(base_url=self.url, timeout=120) as http:
            position = index
            while not self._stop.is_set():
                photo = self.photos[position % len(self.photos)]
                position += self.clients
                sent = time.monotonic()
                try:
                    response = http.post("/predict", files=[("images", ("photo.jpg", photo))])
                    answer = Answer(sent, time.monotonic(), response.status_code, response.text)
                except httpx.HTTPError as exc:
                    answer = Answer(sent, time.monotonic(), None, f"{type(exc).__name__}: {exc}")
                with self._lock:
                    self.answers.append(answer)

    def successes_sent_after(self, moment: float) -> int:
        with self._lock:
            return sum(a.status == 200 and a.sent >= moment for a in self.answers)

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=150)


def wait_for_job(http: httpx.Client, job_id: str, timeout: float = 90) -> dict:
    """The retrain job ``job_id`` once it has ended (any state but queued/running)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = http.get(f"/admin/jobs/{job_id}").json()
        if job["state"] not in ("queued", "running"):
            return job
        time.sleep(0.2)
    raise TimeoutError(f"job {job_id} still {job['state']} after {timeout}s")
