"""Readiness follows the model: 503 on an empty store, ready once a version becomes active,
without a restart."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.conftest import ROOT, subprocess_env
from tests.server import start_server, wait_until

pytestmark = pytest.mark.slow


def test_not_ready_until_a_model_exists_then_ready_without_restart(tmp_path: Path) -> None:
    home = tmp_path / "empty-home"
    server = start_server(home, tmp_path / "serve.log")
    try:
        wait_until(server, "/livez")
        assert httpx.get(server.url + "/readyz").status_code == 503
        response = httpx.post(server.url + "/predict",
                              files=[("images", ("c.jpg", (ROOT / "training/samples/chelsea.jpg").read_bytes()))])
        assert response.status_code == 503 and "bootstrap" in response.json()["error"]
        subprocess.run([sys.executable, "-m", "training", "bootstrap"], cwd=ROOT,
                       env=subprocess_env(home), check=True, capture_output=True)
        wait_until(server, "/readyz", timeout=30)
        response = httpx.post(server.url + "/predict",
                              files=[("images", ("c.jpg", (ROOT / "training/samples/coffee.jpg").read_bytes()))])
        assert response.status_code == 200 and response.json()[0]["label"] == "espresso"
        assert "serving model version v1" in server.log()
        assert "CPUExecutionProvider" in server.log()
    finally:
        server.stop()
