"""A real Docker engine for the image tests: the images built once per run, containers and volumes
that are removed however a test ends, reached only through ports published on 127.0.0.1.

The engine, the base image and the wheelhouse are made ready by ``scripts/docker-setup``, which
the test command runs first; here a missing engine is a failure that says what to run, never a
skip."""

from __future__ import annotations

import json
import os
import subprocess
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from tests.support.net import free_port
from tests.support.paths import ROOT
from tests.support.polling import eventually

#: Debian's CLI: with DOCKER_BUILDKIT=1 it builds with the engine's BuildKit (RUN --mount, and only
#: the stages a target needs); the `docker` some machines have first on PATH has no buildx
DOCKER = "/usr/bin/docker"
BASE_IMAGE = os.environ.get("TRANSFER_SERVE_BASE_IMAGE", "transfer-serve-base:bookworm")
#: the label every image of the Dockerfile carries
PROJECT_LABEL = "org.opencontainers.image.title=transfer-serve"
#: the tags the tests build (and the compose file and manifests name)
IMAGES = {"cpu": "transfer-serve:cpu", "gpu": "transfer-serve:gpu", "trainer": "transfer-serve:trainer"}
#: the app user of every image (Dockerfile)
APP_UID = 10001


def docker(*args: str, timeout: float = 120, check: bool = True, input_: str | None = None,
           env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Runs the Docker CLI; a failure (with ``check``) says the command and what it printed."""
    result = subprocess.run([DOCKER, *args], capture_output=True, text=True, timeout=timeout, input=input_,
                            env={**os.environ, **(env or {})}, check=False)
    if check and result.returncode != 0:
        raise AssertionError(f"docker {' '.join(args)} exited {result.returncode}:\n"
                             f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


def require_engine() -> None:
    if not os.path.exists(DOCKER) or docker("info", check=False, timeout=30).returncode != 0:
        pytest.fail("no Docker engine answers: run `bash scripts/docker-setup` (the test command does)")
    if docker("image", "inspect", BASE_IMAGE, check=False).returncode != 0:
        pytest.fail(f"the base image {BASE_IMAGE} is missing: run `bash scripts/docker-setup`")


@dataclass
class BuiltImages:
    tags: dict[str, str]

    def size_bytes(self, target: str) -> int:
        return int(json.loads(docker("image", "inspect", self.tags[target]).stdout)[0]["Size"])


def build_images(targets: Sequence[str]) -> BuiltImages:
    """Builds the targets from the working tree, on the base image made from Debian packages, and
    removes this project's untagged images; BuildKit's cache makes a rebuild of unchanged code
    take seconds."""
    require_engine()
    for target in targets:
        docker("build", "--build-arg", f"PYTHON_IMAGE={BASE_IMAGE}", "--target", target, "-t", IMAGES[target],
               str(ROOT), timeout=1800, env={"DOCKER_BUILDKIT": "1"})
    # the images these tags held before: a rebuilt trainer leaves gigabytes behind otherwise
    docker("image", "prune", "--force", "--filter", f"label={PROJECT_LABEL}")
    return BuiltImages({t: IMAGES[t] for t in targets})


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


@dataclass
class Container:
    """A container started by :func:`running`; its port 3000 published on 127.0.0.1."""

    name: str
    port: int | None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self, **kwargs: Any) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=60, **kwargs)

    def inspect(self) -> dict[str, Any]:
        return dict(json.loads(docker("inspect", self.name).stdout)[0])

    def logs(self) -> str:
        result = docker("logs", self.name)
        return result.stdout + result.stderr

    def health(self) -> str:
        state = self.inspect()["State"]
        return str(state.get("Health", {}).get("Status", state["Status"]))

    def wait_healthy(self, timeout: float = 240) -> None:
        """Until Docker's health check says healthy; a container that exits or turns unhealthy
        fails at once, with its log."""

        def healthy() -> bool:
            state = self.inspect()["State"]
            if state["Status"] == "exited" or state.get("Health", {}).get("Status") == "unhealthy":
                pytest.fail(f"{self.name} is {state['Status']}/{state.get('Health', {}).get('Status')}:\n"
                            f"{self.logs()[-4000:]}")
            return bool(state.get("Health", {}).get("Status") == "healthy")

        eventually(healthy, timeout=timeout, interval=1,
                   message=lambda: f"{self.name} not healthy after {timeout} s:\n{self.logs()[-4000:]}")

    def wait_exited(self, timeout: float = 120) -> int:
        eventually(lambda: self.inspect()["State"]["Status"] == "exited", timeout=timeout, interval=0.5,
                   message=lambda: f"{self.name} still running:\n{self.logs()[-3000:]}")
        return int(self.inspect()["State"]["ExitCode"])


@contextmanager
def running(image: str, *args: str, name: str | None = None, publish: bool = True,
            command: Sequence[str] = ()) -> Iterator[Container]:
    """``docker run -d`` of ``image`` with ``args`` (options before the image) and ``command``;
    the container is removed afterwards."""
    container = Container(name or unique("transfer-serve-test"), free_port() if publish else None)
    ports = ["-p", f"127.0.0.1:{container.port}:3000"] if publish else []
    docker("run", "-d", "--name", container.name, *ports, *args, image, *command)
    try:
        yield container
    finally:
        docker("rm", "-f", "-v", container.name, check=False)


@contextmanager
def volume(name: str | None = None) -> Iterator[str]:
    """A new, empty named volume, removed afterwards."""
    name = name or unique("transfer-serve-test-data")
    docker("volume", "create", name)
    try:
        yield name
    finally:
        docker("volume", "rm", "-f", name, check=False)
