"""Real ``bentoml serve`` processes for the tests and the benchmarks: started on a free port of
127.0.0.1 in a process group of their own, waited for, and stopped with every process they
started, however the block that uses them ends."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import httpx

from tests.support.net import free_port
from tests.support.paths import ROOT
from tests.support.polling import eventually

#: small upload limits, so that every limit can be hit cheaply (the HTTP tests' shared server)
LIMITS = {
    "TRANSFER_SERVE_MAX_FILES": "8",
    "TRANSFER_SERVE_MAX_FILE_BYTES": "300000",
    "TRANSFER_SERVE_MAX_REQUEST_BYTES": "2000000",
    "TRANSFER_SERVE_MAX_PIXELS": "4000000",
}


def subprocess_env(home: Path) -> dict[str, str]:
    """This process's environment with ``TRANSFER_SERVE_HOME`` set to ``home``."""
    env = dict(os.environ)
    env["TRANSFER_SERVE_HOME"] = str(home)
    return env


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
                  env: Mapping[str, str] | None = None, *, checkout: Path = ROOT) -> Server:
    """Run ``command`` (anything that serves HTTP on ``port`` of 127.0.0.1) from the root of
    ``checkout`` (this repository by default), in its own process group so that ``Server.stop``
    ends it and all its children."""
    full_env = {**os.environ, "BENTOML_DO_NOT_TRACK": "True", **(env or {})}
    with log_path.open("wb") as log:  # the child keeps its own descriptor
        process = subprocess.Popen(
            list(command), cwd=checkout, env=full_env, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return Server(f"http://127.0.0.1:{port}", process, log_path)


def start_server(home: Path, log_path: Path, env: Mapping[str, str] | None = None,
                 target: str = "service.service:TransferServe", *, checkout: Path = ROOT) -> Server:
    """``bentoml serve TARGET`` on a free port. Each server gets a private ``BENTOML_HOME``
    unless ``env`` names one: ``bentoml serve`` wipes ``$BENTOML_HOME/prometheus_multiproc_dir``
    when it starts, so servers sharing one would reset each other's ``/metrics``. Another
    ``checkout`` of the project is served with its own ``.venv`` (a benchmark's baseline)."""
    port = free_port()
    bentoml = Path(sys.executable).with_name("bentoml") if checkout == ROOT else checkout / ".venv/bin/bentoml"
    private = None if env and "BENTOML_HOME" in env else Path(tempfile.mkdtemp(prefix="bentoml-home-"))
    server = start_command(
        # the keep-alive timeout scripts/serve and the container use (not uvicorn's racy 5 s)
        [str(bentoml), "serve", target, "--host", "127.0.0.1", "--port", str(port), "--timeout-keep-alive", "75"],
        port, log_path,
        {"TRANSFER_SERVE_HOME": str(home), **({"BENTOML_HOME": str(private)} if private else {}), **(env or {})},
        checkout=checkout,
    )
    server.bentoml_home = private
    return server


@contextlib.contextmanager
def serving(home: Path, log_path: Path, env: Mapping[str, str] | None = None,
            target: str = "service.service:TransferServe", timeout: float = 180, *,
            checkout: Path = ROOT) -> Iterator[Server]:
    """A ready server (``/readyz`` 200) for the block; stopped however the block ends."""
    server = start_server(home, log_path, env, target, checkout=checkout)
    try:
        wait_until(server, timeout=timeout)
        yield server
    finally:
        server.stop()


def wait_until(server: Server, path: str = "/readyz", status: int = 200, timeout: float = 120) -> None:
    """Until ``GET path`` answers ``status``; an error at once if the server exits."""

    def answers() -> bool:
        if server.process.poll() is not None:
            raise RuntimeError(f"server exited with {server.process.returncode}:\n{server.log()[-3000:]}")
        try:
            return httpx.get(server.url + path, timeout=2).status_code == status
        except httpx.TransportError:
            return False

    eventually(answers, timeout=timeout, interval=0.3,
               message=lambda: f"{path} did not answer {status}:\n{server.log()[-3000:]}")


def wait_for_job(http: httpx.Client, job_id: str, timeout: float = 90) -> dict[str, Any]:
    """The retrain job ``job_id`` once it has ended (any state but queued/running)."""
    seen: dict[str, Any] = {}

    def ended() -> dict[str, Any] | Literal[False]:
        seen.update(http.get(f"/admin/jobs/{job_id}").json())
        return dict(seen) if seen["state"] not in ("queued", "running") else False

    return eventually(ended, timeout=timeout, interval=0.2,
                      message=lambda: f"job {job_id} still {seen.get('state')}")
