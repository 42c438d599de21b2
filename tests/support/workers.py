"""The worker processes of a ``bentoml serve`` tree: their names, and finding one to kill."""

from __future__ import annotations

import contextlib
from typing import Any

from tests.support.server import Server

#: which worker to kill -> (its process label, the log line that says its replacement is ready)
WORKER_TARGETS: dict[str, tuple[str, str]] = {
    "inference": ("transfer_serve_inference#1", "[service:transfer_serve_inference:1] serving model version"),
    "http": ("transfer_serve#1", "[entry_service:transfer_serve:1] Service transfer_serve initialized"),
}


def process_label(process: Any) -> str:
    """A readable name for a process (a ``psutil.Process``) of a ``bentoml serve`` tree: the
    service a worker runs and its number (``transfer_serve_inference#1``), else its pid."""
    import psutil

    try:
        cmdline = process.cmdline()
    except psutil.Error:  # gone, or not ours to read
        return str(process.pid)
    if "--service-name" in cmdline:
        index = cmdline.index("--service-name")
        name = cmdline[index + 1] if index + 1 < len(cmdline) else "?"
        worker = cmdline[cmdline.index("--worker-id") + 1] if "--worker-id" in cmdline else "?"
        return f"{name}#{worker}"
    return str(process.pid)


def worker_pid(server: Server, label: str) -> int | None:
    """The pid of the server's worker process with ``label`` (``transfer_serve#1``), if alive."""
    import psutil

    with contextlib.suppress(psutil.Error):
        for process in psutil.Process(server.process.pid).children(recursive=True):
            if process_label(process) == label and process.status() != psutil.STATUS_ZOMBIE:
                return int(process.pid)
    return None
