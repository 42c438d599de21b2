"""Fixtures of the storage tests that run on every backend: a real Postgres server and a real S3
API (moto's server), each started once per session on 127.0.0.1, and ``deployment``, the settings
of a fresh deployment of the backend a test is parametrized with (see
:mod:`tests.support.backends`)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.postgres import PostgresServer
from tests.support.s3 import S3Server


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    server = PostgresServer()
    yield server
    server.close()


@pytest.fixture(scope="session")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    server = S3Server(tmp_path_factory.mktemp("s3") / "moto.log")
    yield server
    server.stop()


@pytest.fixture
def deployment(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, object]:
    """Settings for two replicas of one fresh deployment of the backend ``request.param``: a new
    home (``local``), or a new database on the shared server and a new directory
    (``postgres+directory``) or bucket (``postgres+s3``) for the objects."""
    kind = request.param
    if kind == "local":
        return {"home": tmp_path / "home"}
    postgres: PostgresServer = request.getfixturevalue("postgres")
    name = "t" + uuid.uuid4().hex[:12]
    settings: dict[str, object] = {"database_url": postgres.create_database(name), "job_lease_s": 1.0}
    if kind == "postgres+s3":
        s3: S3Server = request.getfixturevalue("s3")
        s3.create_bucket(name)
        for key, value in s3.env().items():
            monkeypatch.setenv(key, value)
        settings["object_store"] = f"s3://{name}/deployment"
    else:
        (tmp_path / "shared").mkdir()
        settings["object_store"] = f"file://{tmp_path / 'shared'}"
    return settings
