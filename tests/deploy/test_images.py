"""The images, built from the working tree and run on a real Docker engine the way operators run
them: the CPU serving image on an empty named volume as uid 10001 with a read-only root and one
CPU, through its life (health, predictions, labels and a retrain, stop and start, the trainer
beside it); the state directory it cannot write; the GPU image's CUDA libraries and its CPU
fallback; the single-node compose stack. Containers are reached only on 127.0.0.1."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.admin import AUTH, TOKEN, predicts, upload
from tests.support.cli import last_json
from tests.support.docker import (
    APP_UID,
    DOCKER,
    BuiltImages,
    Container,
    build_images,
    docker,
    running,
    unique,
    volume,
)
from tests.support.images import jpeg_files, small_photos
from tests.support.net import free_port
from tests.support.paths import CHELSEA, HYMENOPTERA, ROOT
from tests.support.polling import eventually
from tests.support.server import wait_for_job

#: the goal for the CPU serving image (issue 14)
CPU_IMAGE_LIMIT_BYTES = 1_000_000_000
#: the CUDA provider's only dependency from outside the image: the driver's library, which the
#: NVIDIA container runtime mounts
FROM_THE_DRIVER = {"libcuda.so.1"}
#: options of a serving container as an operator hardens it
HARDENED = ["--user", f"{APP_UID}:{APP_UID}", "--read-only", "--cpus", "1", "--stop-timeout", "30",
            "--tmpfs", "/tmp:rw,size=512m",  # noqa: S108 (the container's own /tmp)
            "-e", f"TRANSFER_SERVE_ADMIN_TOKEN={TOKEN}"]


@pytest.fixture(scope="module")
def images() -> BuiltImages:
    return build_images(["cpu", "trainer", "gpu"])


def predicted_label(container: Container, photo: bytes = CHELSEA) -> tuple[str, str]:
    with container.client() as http:
        response = http.post("/predict", files=[("images", ("photo.jpg", photo))])
    assert response.status_code == 200, response.text
    return response.json()[0]["label"], response.json()[0]["model_version"]


def in_image(image: str, script: str, *options: str) -> str:
    """Output of a shell script run in a throwaway container of ``image``."""
    return docker("run", "--rm", *options, "--entrypoint", "sh", image, "-c", script).stdout


# ---------------------------------------------------------------- what the images hold


def test_the_cpu_serving_image_is_lean_and_torch_free(images: BuiltImages) -> None:
    assert images.size_bytes("cpu") < CPU_IMAGE_LIMIT_BYTES, f"{images.size_bytes('cpu') / 1e9:.2f} GB"
    found = in_image(images.tags["cpu"], "python -c \"import importlib.util as u; print(' '.join(m for m in "
                     "('torch', 'torchvision', 'timm', 'training') if u.find_spec(m)))\"; "
                     "find / -xdev -name 'libcudart*' -o -xdev -name 'libcudnn*' | head -3")
    assert found.strip() == "", f"the CPU serving image holds {found!r}"


def test_the_trainer_is_the_serving_environment_plus_torch(images: BuiltImages) -> None:
    versions = in_image(images.tags["trainer"], "python -c \"import torch, timm, onnxruntime, service, store, "
                        "training; print(torch.__version__, onnxruntime.__version__)\"")
    dockerfile = (ROOT / "Dockerfile").read_text()
    torch_pin = re.search(r"^ARG TORCH_VERSION=(\S+)", dockerfile, re.M)
    ort_pin = re.search(r"^ARG ONNXRUNTIME_VERSION=(\S+)", dockerfile, re.M)
    assert torch_pin and ort_pin
    torch_version, ort_version = versions.split()
    assert (torch_version.split("+")[0], ort_version) == (torch_pin[1], ort_pin[1])  # 2.14.1+cu130: the CUDA build


# ---------------------------------------------------------------- one serving container's life


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A labelled folder of real photos (12 ants, 12 bees) that uid 10001 can read, to mount."""
    root = tmp_path_factory.mktemp("images")
    for label in ("ants", "bees"):
        (root / label).mkdir()
        for photo in jpeg_files(HYMENOPTERA, label)[20:32]:
            shutil.copy(photo, root / label / photo.name)
    for path in [root, *root.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    return root


@pytest.fixture(scope="class")
def data_volume(images: BuiltImages) -> Iterator[str]:
    with volume() as name:
        yield name


@pytest.fixture(scope="class")
def journal() -> dict[str, str]:
    """What one test of the container's life leaves for the next (the retrain job's id)."""
    return {}


@pytest.fixture(scope="class")
def serving(images: BuiltImages, data_volume: str) -> Iterator[Container]:
    """The CPU serving image on an empty named volume, hardened; healthy before the first test."""
    with running(images.tags["cpu"], "-v", f"{data_volume}:/data", *HARDENED) as container:
        container.wait_healthy()
        yield container


class TestServingContainer:
    """In order: each test continues where the one before left the container and its volume."""

    def test_starts_healthy_on_an_empty_volume_with_the_built_in_model(self, serving: Container) -> None:
        assert serving.health() == "healthy"
        assert predicted_label(serving) == ("tiger cat", "v1")
        assert "seeded the state with v1" in serving.logs()

    def test_one_cpu_gives_one_inference_worker_and_one_http_worker(self, serving: Container) -> None:
        log = serving.logs()
        assert log.count("serving model version v1") == 1, log[-3000:]
        assert len(re.findall(r"\[entry_service:transfer_serve:\d+\] Service transfer_serve initialized", log)) == 1

    def test_labels_and_a_retrain_through_the_admin_api(self, serving: Container, journal: dict[str, str]) -> None:
        with serving.client(headers=AUTH) as http:
            for label in ("ants", "bees"):
                blobs = small_photos(HYMENOPTERA, label, 0, 8)
                response = http.post("/admin/labels", data={"label": label},
                                     files=[("images", (f"{i}.jpg", b)) for i, b in enumerate(blobs)])
                assert response.status_code == 200, response.text
            started = http.post("/admin/retrain")
            assert started.status_code == 202, started.text
            journal["job"] = started.json()["id"]
            job = wait_for_job(http, journal["job"], timeout=180)
            assert job["state"] == "succeeded" and job["version"] == "v2", job
            eventually(lambda: predicts(http) == "v2", timeout=30, interval=0.5)
        label, _ = predicted_label(serving, (HYMENOPTERA / "bees" / jpeg_files(HYMENOPTERA, "bees")[40].name)
                                   .read_bytes())
        assert label in ("ants", "bees")

    def test_docker_stop_ends_it_cleanly_and_a_start_keeps_its_state(self, serving: Container,
                                                                       journal: dict[str, str]) -> None:
        with serving.client(headers=AUTH) as http:
            before = (http.get("/admin/models").json()["active"], http.get("/admin/labels").json()["counts"],
                      http.get(f"/admin/jobs/{journal['job']}").json())
        docker("stop", "-t", "30", serving.name, timeout=60)
        state = serving.inspect()["State"]
        # within the grace period: Docker's SIGKILL when it runs out would make the exit code 137
        assert (state["ExitCode"], state["OOMKilled"]) == (0, False), (state, serving.logs()[-3000:])
        docker("start", serving.name)
        serving.wait_healthy()
        with serving.client(headers=AUTH) as http:
            after = (http.get("/admin/models").json()["active"], http.get("/admin/labels").json()["counts"],
                     http.get(f"/admin/jobs/{journal['job']}").json())
        assert after == before and before[0] == "v2" and before[1] == {"ants": 8, "bees": 8}
        assert predicted_label(serving)[1] == "v2"

    def test_the_trainer_fits_on_a_mounted_folder_and_the_serving_container_swaps(
            self, serving: Container, images: BuiltImages, data_volume: str, photos: Path) -> None:
        result = docker("run", "--rm", "--user", f"{APP_UID}:{APP_UID}", "-v", f"{data_volume}:/data",
                        "-v", f"{photos}:/images:ro", images.tags["trainer"],
                        "python", "-m", "training", "fit", "--data", "/images", "--activate", "--json",
                        timeout=900)
        fitted = last_json(result.stdout)
        version = fitted["version"]
        assert version == "v3", fitted
        with serving.client() as http:
            eventually(lambda: predicts(http) == version, timeout=30, interval=0.5,
                       message=lambda: f"the serving container still serves {predicts(http)}, not {version}")
        with serving.client(headers=AUTH) as http:
            assert http.get("/admin/models").json()["active"] == version


# ---------------------------------------------------------------- a volume it cannot use


def test_a_bind_mount_the_app_user_cannot_write_gets_the_entrypoints_message(images: BuiltImages,
                                                                             tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o755)  # root's, as a host directory usually is
    with running(images.tags["cpu"], "-v", f"{state}:/data", publish=False) as container:
        assert container.wait_exited() == 1
        log = container.logs()
    assert f"the state directory /data is not writable by uid {APP_UID}" in log, log
    assert f"chown -R {APP_UID}:{APP_UID}" in log
    assert list(state.iterdir()) == []


# ---------------------------------------------------------------- the GPU image, without a GPU


def test_the_cuda_provider_finds_every_library_it_links_against_in_the_image(images: BuiltImages) -> None:
    """A provider listing proves nothing: resolve the CUDA provider's libraries, and cuDNN's, which
    onnxruntime loads by name at run time, with the dynamic linker as it will run them."""
    report = in_image(images.tags["gpu"], """
        set -e
        capi=$(python -c 'import onnxruntime, os; print(os.path.dirname(onnxruntime.__file__))')/capi
        cudnn=$(ldconfig -p | awk '/libcudnn[a-z_]*\\.so\\.9 /{print $NF}')
        for lib in "$capi"/libonnxruntime_providers_cuda.so $cudnn; do
            echo "== $lib"; ldd "$lib"
        done""")
    sections = dict(re.findall(r"== (\S+)\n(.*?)(?=\n== |\Z)", report, re.S))
    provider = next(lib for lib in sections if lib.endswith("libonnxruntime_providers_cuda.so"))
    cudnn = [lib for lib in sections if "libcudnn" in lib]
    assert cudnn, f"no cuDNN 9 on the linker's path:\n{report}"
    for lib, ldd in sections.items():
        missing = set(re.findall(r"^\s*(\S+) => not found", ldd, re.M))
        assert missing <= FROM_THE_DRIVER, f"{lib} misses {missing - FROM_THE_DRIVER}"
    linked = set(re.findall(r"^\s*(\S+) =>", sections[provider], re.M))
    assert {"libcublas.so.13", "libcublasLt.so.13", "libcudart.so.13", "libcurand.so.10"} <= linked


def test_the_gpu_image_without_a_gpu_serves_on_the_cpu_and_says_so(images: BuiltImages) -> None:
    with volume() as data, running(images.tags["gpu"], "-v", f"{data}:/data", "--cpus", "1") as container:
        container.wait_healthy()
        assert predicted_label(container) == ("tiger cat", "v1")
        log = container.logs()
    assert "no usable GPU" in log and "serving on the CPU" in log, log[-3000:]
    assert "on CPUExecutionProvider" in log


# ---------------------------------------------------------------- the single-node compose stack


def test_the_single_node_compose_stack_serves(images: BuiltImages) -> None:
    project = unique("ts-compose")
    port = free_port()
    env = {**os.environ, "TRANSFER_SERVE_ADMIN_TOKEN": TOKEN, "TRANSFER_SERVE_PUBLISH": "127.0.0.1",
           "TRANSFER_SERVE_PORT": str(port)}
    compose = ["docker-compose", "-p", project, "-f", str(ROOT / "compose.yaml"), "--profile", "cpu"]
    subprocess.run([*compose, "up", "-d", "--no-build"], check=True, env=env, cwd=ROOT, capture_output=True,
                   timeout=300)
    try:
        (name,) = subprocess.run([DOCKER, "ps", "-q", "--filter", f"label=com.docker.compose.project={project}"],
                                 check=True, capture_output=True, text=True).stdout.split()
        container = Container(name, port)
        container.wait_healthy()
        assert predicted_label(container) == ("tiger cat", "v1")
        with container.client() as http:
            assert upload(http, "ants", jpeg_files(HYMENOPTERA, "ants")[:1]).status_code == 401
    finally:
        subprocess.run([*compose, "down", "-v", "-t", "30"], check=False, env=env, cwd=ROOT, capture_output=True,
                       timeout=300)
