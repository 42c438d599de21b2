"""One real `bentoml serve` process for the HTTP tests, on the bootstrapped model, with small
limits so every limit can be hit cheaply."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.server import Server, serving

LIMITS = {
    "TRANSFER_SERVE_MAX_FILES": "8",
    "TRANSFER_SERVE_MAX_FILE_BYTES": "300000",
    "TRANSFER_SERVE_MAX_REQUEST_BYTES": "2000000",
    "TRANSFER_SERVE_MAX_PIXELS": "4000000",
}


@pytest.fixture(scope="session")
def server(bootstrapped_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with serving(bootstrapped_home, tmp_path_factory.mktemp("server") / "serve.log", LIMITS) as running:
        yield running


@pytest.fixture
def client(server: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=60) as http:
        yield http
