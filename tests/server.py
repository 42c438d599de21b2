"""Start and stop a real ``bentoml serve`` process for tests (and benchmarks)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
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

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


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
    port = free_port()
    bentoml = Path(sys.executable).with_name("bentoml")
    return start_command(
        [str(bentoml), "serve", target, "--host", "127.0.0.1", "--port", str(port)],
        port, log_path, {"TRANSFER_SERVE_HOME": str(home), **(env or {})},
    )


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
