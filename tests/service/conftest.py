"""Fixtures of the service's tests: real ``bentoml serve`` processes on copies of the bootstrapped
state directory (one per session each: starting one takes seconds), and, for the in-process
tests, a state directory whose v1 is a tiny model that tells colours apart."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from models.onnx_io import replace_head
from store.state import open_state
from tests.support.admin import AUTH, MAX_REQUEST_BYTES, STORAGE_ENV
from tests.support.models import tiny_spec, write_tiny_onnx
from tests.support.server import LIMITS, Server, serving


@pytest.fixture(scope="session")
def server(bootstrapped_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The bootstrapped model behind small limits (:data:`tests.support.server.LIMITS`), so every
    limit can be hit cheaply; no admin token (read-only tests of ``/predict`` and the ops routes)."""
    with serving(bootstrapped_home, tmp_path_factory.mktemp("server") / "serve.log", LIMITS) as running:
        yield running


@pytest.fixture
def client(server: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=60) as http:
        yield http


@pytest.fixture(scope="session")
def storage_server(bootstrapped_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A server on its own copy of the bootstrapped home, with the admin token and a 2 MB request
    limit: the storage tests (uploads under load, a damaged state directory, bodies over the limit).
    Its tests leave the store consistent and check what they add against what was there before."""
    root = tmp_path_factory.mktemp("storage")
    home = root / "home"
    shutil.copytree(bootstrapped_home, home)
    env = {**STORAGE_ENV, "TRANSFER_SERVE_MAX_REQUEST_BYTES": str(MAX_REQUEST_BYTES)}
    with serving(home, root / "serve.log", env) as running:
        yield running


@pytest.fixture
def storage_admin(storage_server: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=storage_server.url, timeout=60, headers=AUTH) as http:
        yield http


@pytest.fixture
def colour_home(tmp_path: Path) -> Path:
    """v1: the tiny graph with a red/blue head that is right, trained on 4 embeddings (its
    embedding is an image's mean colour: solid-colour photos,
    :func:`tests.support.images.colour_photos`, are separable)."""
    home = tmp_path / "home"
    graph = write_tiny_onnx(tmp_path / "tiny.onnx")
    weight = np.array([[1.0, 0.0, -1.0], [-1.0, 0.0, 1.0]], np.float32)  # red vs blue by R - B
    replace_head(graph, tmp_path / "v1.onnx", weight, np.zeros(2, np.float32))
    embeddings = np.array([[2, -1.8, -1.6], [2.1, -1.7, -1.5], [-1.9, -1.8, 2.3], [-1.8, -1.7, 2.4]], np.float32)
    open_state(home=home).registry.register(
        onnx_file=tmp_path / "v1.onnx", spec=tiny_spec(("red", "blue")), metrics={},
        embeddings=embeddings, embedding_targets=np.array([0, 0, 1, 1]),
        embedding_hashes=["a" * 64, "b" * 64, "c" * 64, "d" * 64], parent=None, dataset_fingerprint=None,
    )
    return home
