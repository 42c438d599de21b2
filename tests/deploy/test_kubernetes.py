"""The Kubernetes manifests (``deploy/kubernetes``), checked offline: every object of the base and
of each overlay, as kustomize renders it, validates against the Kubernetes API schemas of
:data:`KUBERNETES_VERSION` (kubernetes-validate, strict: an unknown or misspelt field fails), and
holds what the service needs (probes, worker-sizing CPU limit, Secrets, one writer per volume,
shared state for several replicas, the trainer Job).

The overlays are rendered by :func:`render`, a small Python implementation of exactly the kustomize
features these kustomizations use: ``resources`` (files and directories), ``patches`` given by
``path`` (strategic merge by kind and name: maps merge, ``null`` removes a field, the name-keyed
lists ``containers``, ``initContainers``, ``env`` and ``volumes`` merge by name in kustomize's order,
a document with ``$patch: delete`` removes its object) and ``images``. It refuses anything else (a
field of the kustomization, a list it does not model) rather than render it differently from
kustomize, and :func:`test_render_matches_kustomize` compares it with ``kubectl kustomize`` on every
kustomization (kubectl is installed on the machines the suite runs on; the rendering needs no
cluster).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from models.hardware import cgroup_cpu_limit
from tests.support.paths import ROOT

Manifest = dict[str, Any]

KUBE = ROOT / "deploy" / "kubernetes"
#: the API the manifests must be valid for (their preStop sleep action needs 1.30 or later)
KUBERNETES_VERSION = "1.32"
#: every kustomization, relative to KUBE; "." is the base as `kubectl apply -k deploy/kubernetes` sees it
KUSTOMIZATIONS = (".", "base", "overlays/scale-out", "overlays/scale-out/trainer", "overlays/gpu")
SERVING = (".", "base", "overlays/scale-out", "overlays/gpu")  # those with the serving Deployment
DEPLOYMENT = "transfer-serve"
PORT = 3000
#: the service's own state and shared-state settings: never a literal value in a manifest
SECRET_ENV = ("TRANSFER_SERVE_ADMIN_TOKEN",)
SHARED_STATE_ENV = (
    "TRANSFER_SERVE_DATABASE_URL", "TRANSFER_SERVE_OBJECT_STORE",
    "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL",
)
TRAINER_ARGS = ["python", "-m", "training", "fit", "--data", "/images", "--activate"]
UID = 10001
SCRATCH = "/tmp"  # noqa: S108 - a mount path the manifests must have, not a file this test writes


# ---------------------------------------------------------------- a kustomize subset


class Unsupported(Exception):
    """A kustomization uses a feature :func:`render` does not implement: extend it, and check it
    against ``kubectl kustomize``."""


#: lists that strategic merge patches merge by a key (the Kubernetes API's patchMergeKey); the
#: renderer refuses a patch that touches any other list
MERGE_KEYS = {"containers": "name", "initContainers": "name", "env": "name", "volumes": "name"}
KUSTOMIZATION_FIELDS = {"apiVersion", "kind", "resources", "patches", "images"}


def load_documents(path: Path) -> list[Manifest]:
    with path.open() as f:
        return [doc for doc in yaml.safe_load_all(f) if doc is not None]


def render(directory: Path) -> list[Manifest]:
    """The objects ``kubectl kustomize DIRECTORY`` prints, for the features listed in the module's
    docstring (in kustomize's order within merged lists; the order of objects is not kustomize's)."""
    (kustomization,) = load_documents(directory / "kustomization.yaml")
    if unknown := set(kustomization) - KUSTOMIZATION_FIELDS:
        raise Unsupported(f"{directory}: kustomization fields {sorted(unknown)}")
    objects: list[Manifest] = []
    for entry in kustomization.get("resources", []):
        path = directory / entry
        objects += render(path) if path.is_dir() else load_documents(path)
    for patch in kustomization.get("patches", []):
        if set(patch) != {"path"}:
            raise Unsupported(f"{directory}: a patch given by {sorted(patch)}, not by path alone")
        for document in load_documents(directory / patch["path"]):
            objects = apply_patch(objects, document)
    for image in kustomization.get("images", []):
        for obj in objects:
            set_image(obj, image)
    return objects


def apply_patch(objects: list[Manifest], patch: Manifest) -> list[Manifest]:
    key = (patch["kind"], patch["metadata"]["name"])
    matches = [i for i, obj in enumerate(objects) if (obj["kind"], obj["metadata"]["name"]) == key]
    if len(matches) != 1:
        raise Unsupported(f"patch for {key} matches {len(matches)} objects")
    (index,) = matches
    directive = patch.get("$patch")
    if directive == "delete":
        return objects[:index] + objects[index + 1:]
    if directive is not None:
        raise Unsupported(f"$patch: {directive}")
    return objects[:index] + [merge(objects[index], patch, "")] + objects[index + 1:]


def merge(base: Any, patch: Any, field: str) -> Any:
    if isinstance(patch, dict):
        if "$patch" in patch:
            raise Unsupported(f"$patch inside {field}")
        result = dict(base) if isinstance(base, dict) else {}
        for name, value in patch.items():
            if value is None:
                result.pop(name, None)
            else:
                result[name] = merge(result.get(name), value, name)
        return result
    if isinstance(patch, list):
        if field not in MERGE_KEYS:
            raise Unsupported(f"a patch of the list {field!r}")
        key = MERGE_KEYS[field]
        base_items = {item[key]: item for item in base or []}
        # kustomize (kyaml) puts the patch's items first, in its order, then the base's others
        merged = [merge(base_items.get(item[key]), item, "") for item in patch]
        return merged + [item for item in base or [] if item[key] not in {i[key] for i in patch}]
    return patch


def split_image(reference: str) -> tuple[str, str]:
    """("registry:5000/transfer-serve", "cpu") from "registry:5000/transfer-serve:cpu"."""
    if "@" in reference:
        raise Unsupported(f"an image by digest: {reference}")
    name, colon, tag = reference.rpartition(":")
    return (name, tag) if colon and "/" not in tag else (reference, "")


def set_image(obj: Any, image: dict[str, str]) -> None:
    if unknown := set(image) - {"name", "newName", "newTag"}:
        raise Unsupported(f"images fields {sorted(unknown)}")
    if isinstance(obj, list):
        for item in obj:
            set_image(item, image)
    elif isinstance(obj, dict):
        for field in ("containers", "initContainers"):
            for container in obj.get(field, []):
                name, tag = split_image(container["image"])
                if name == image["name"]:
                    tag = image.get("newTag", tag)
                    container["image"] = image.get("newName", name) + (f":{tag}" if tag else "")
        for value in obj.values():
            set_image(value, image)


# ---------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[Manifest]]:
    return {name: render(KUBE / name) for name in KUSTOMIZATIONS}


def find(objects: list[Manifest], kind: str, name: str | None = None) -> list[Manifest]:
    return [obj for obj in objects if obj["kind"] == kind and name in (None, obj["metadata"]["name"])]


def one(objects: list[Manifest], kind: str, name: str | None = None) -> Manifest:
    (obj,) = find(objects, kind, name)
    return obj


def pod_spec(obj: Manifest) -> Manifest:
    spec: Manifest = obj["spec"]["template"]["spec"]
    return spec


def container(obj: Manifest) -> Manifest:
    (main,) = pod_spec(obj)["containers"]
    return main


def env_of(main: Manifest) -> dict[str, Manifest]:
    return {var["name"]: var for var in main.get("env", [])}


def secret_ref(var: Manifest) -> tuple[str, str]:
    """(Secret, key) of a variable set from a Secret; fails for a literal value or another source."""
    assert "value" not in var, f"{var['name']} has a literal value: it must come from a Secret"
    ref = var["valueFrom"]["secretKeyRef"]
    return ref["name"], ref["key"]


def serving_deployment(objects: list[Manifest]) -> Manifest:
    return one(objects, "Deployment", DEPLOYMENT)


def volume_at(obj: Manifest, mount_path: str) -> Manifest:
    """The pod's volume that its container mounts at MOUNT_PATH."""
    (name,) = [mount["name"] for mount in container(obj)["volumeMounts"] if mount["mountPath"] == mount_path]
    (volume,) = [volume for volume in pod_spec(obj)["volumes"] if volume["name"] == name]
    return volume


def base_directories(directory: Path) -> list[Path]:
    (kustomization,) = load_documents(directory / "kustomization.yaml")
    paths = [(directory / entry).resolve() for entry in kustomization.get("resources", [])]
    return [path for path in paths if path.is_dir()]


def kustomization_files(directory: Path) -> set[Path]:
    """The kustomization file of DIRECTORY and every file it or its bases name."""
    (kustomization,) = load_documents(directory / "kustomization.yaml")
    files = {(directory / "kustomization.yaml").resolve()}
    names = list(kustomization.get("resources", [])) + [p["path"] for p in kustomization.get("patches", [])]
    for name in names:
        path = (directory / name).resolve()
        files |= kustomization_files(path) if path.is_dir() else {path}
    return files


# ---------------------------------------------------------------- schemas


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_every_object_is_valid(rendered: dict[str, list[Manifest]], name: str) -> None:
    objects = rendered[name]
    assert objects
    for obj in objects:
        try:
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            where = "/".join(str(p) for p in e.path)
            pytest.fail(f"{name}: {obj['kind']}/{obj['metadata']['name']} at {where}: {e.message}")


@pytest.mark.parametrize("path", sorted(KUBE.rglob("*.example.yaml")), ids=lambda p: str(p.relative_to(KUBE)))
def test_example_secrets_are_valid_and_complete(rendered: dict[str, list[Manifest]], path: Path) -> None:
    """Each example Secret validates and has every key the manifests read from it (the README's
    `kubectl create secret` commands are written from these)."""
    (secret,) = load_documents(path)
    kubernetes_validate.validate(secret, KUBERNETES_VERSION, strict=True)
    referenced = {
        secret_ref(var)
        for objects in rendered.values()
        for obj in objects if obj["kind"] in ("Deployment", "Job")
        for var in env_of(container(obj)).values() if "secretKeyRef" in var.get("valueFrom", {})
    }
    keys = {key for name, key in referenced if name == secret["metadata"]["name"]}
    assert keys, f"{path.name}: no manifest reads Secret {secret['metadata']['name']}"
    assert keys <= set(secret["stringData"]), f"{path.name} lacks {sorted(keys - set(secret['stringData']))}"


def test_every_file_is_used() -> None:
    """A YAML file that no kustomization names (and that is not an example) would never be applied."""
    used = set().union(*(kustomization_files(KUBE / name) for name in KUSTOMIZATIONS))
    examples = set(KUBE.rglob("*.example.yaml"))
    assert {p.resolve() for p in KUBE.rglob("*.yaml")} - examples - used == set()


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_render_matches_kustomize(rendered: dict[str, list[Manifest]], name: str) -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.fail("kubectl (with its built-in kustomize) is not on PATH: install it to check the rendering")
    output = subprocess.run([kubectl, "kustomize", str(KUBE / name)], capture_output=True, text=True,
                            timeout=120, check=True).stdout

    def by_identity(objects: list[Manifest]) -> dict[tuple[str, str], Manifest]:
        return {(obj["kind"], obj["metadata"]["name"]): obj for obj in objects}

    assert by_identity(rendered[name]) == by_identity([doc for doc in yaml.safe_load_all(output) if doc])


# ---------------------------------------------------------------- serving


@pytest.mark.parametrize("name", SERVING)
def test_probes_point_at_the_service(rendered: dict[str, list[Manifest]], name: str) -> None:
    main = container(serving_deployment(rendered[name]))
    ports = {port.get("name"): port["containerPort"] for port in main["ports"]}
    assert list(ports.values()) == [PORT]

    def probed(probe: str) -> tuple[str, int]:
        http = main[probe]["httpGet"]
        port = http["port"]
        return http["path"], ports[port] if isinstance(port, str) else port

    assert probed("readinessProbe") == ("/readyz", PORT)
    assert probed("livenessProbe") == ("/livez", PORT)
    assert probed("startupProbe") == ("/livez", PORT)
    startup = main["startupProbe"]
    budget = startup.get("initialDelaySeconds", 0) + startup.get("periodSeconds", 10) * startup["failureThreshold"]
    assert budget >= 120, "the first start on an empty volume can take ~2 minutes"


@pytest.mark.parametrize("name", SERVING)
def test_service_reaches_the_pods(rendered: dict[str, list[Manifest]], name: str) -> None:
    deployment = serving_deployment(rendered[name])
    (port,) = one(rendered[name], "Service", DEPLOYMENT)["spec"]["ports"]
    (container_port,) = container(deployment)["ports"]
    assert port["port"] == PORT and port["targetPort"] in (container_port["name"], container_port["containerPort"])
    selector = one(rendered[name], "Service", DEPLOYMENT)["spec"]["selector"]
    assert selector.items() <= deployment["spec"]["template"]["metadata"]["labels"].items()


def expected_workers(cores: int, cuda: bool) -> tuple[int, int]:
    """(HTTP workers, inference workers) the service derives from its cores (service/settings.py)."""
    return (1 if cores <= 2 else min(cores // 2, 8)), (1 if cuda else cores)


def worker_claim(directory: Path) -> tuple[int, bool, int, int]:
    """The nearest comment "N cores[ with CUDA]: H HTTP workers, I inference workers" in the files of
    DIRECTORY, else of its bases: what an operator reads about the sizing that applies there."""
    pattern = re.compile(r"(\d+) cores( with CUDA)?: (\d+) HTTP workers?, (\d+) inference workers?")
    claims = [m for path in sorted(directory.glob("*.yaml")) for m in pattern.finditer(path.read_text())]
    if len(claims) > 1:
        pytest.fail(f"{directory}: {len(claims)} worker statements, expected one")
    if claims:
        cores, cuda, http, inference = claims[0].groups()
        return int(cores), cuda is not None, int(http), int(inference)
    (base,) = base_directories(directory)
    return worker_claim(base)


@pytest.mark.parametrize("name", SERVING)
def test_cpu_limit_gives_the_stated_workers(rendered: dict[str, list[Manifest]], name: str, tmp_path: Path) -> None:
    """requests = limits = a whole number of cores, so the cgroup quota (what the service counts)
    is exactly those cores; the comment beside the limit states the workers the service starts."""
    main = container(serving_deployment(rendered[name]))
    resources = main["resources"]
    cpu = resources["limits"]["cpu"]
    assert resources["requests"]["cpu"] == cpu
    assert re.fullmatch(r"[1-9][0-9]*", str(cpu)), f"cpu {cpu!r}: whole cores, so the quota is not rounded up"
    # the quota the kubelet writes for this limit (cgroup v2: quota and period in microseconds)
    (tmp_path / "cpu.max").write_text(f"{int(cpu) * 100_000} 100000\n")
    cores = cgroup_cpu_limit(tmp_path)
    assert cores == int(cpu)
    cuda = "nvidia.com/gpu" in resources["limits"]
    claimed_cores, claimed_cuda, http, inference = worker_claim(KUBE / name)
    assert (claimed_cores, claimed_cuda) == (cores, cuda), f"{name}: the comment describes another size"
    assert (http, inference) == expected_workers(cores, cuda)
    # an explicit setting would override the derivation: then it must agree with the comment
    env = env_of(main)
    for variable, derived in (("TRANSFER_SERVE_WORKERS", http), ("TRANSFER_SERVE_INFERENCE_WORKERS", inference)):
        if variable in env:
            assert int(env[variable]["value"]) == derived
    memory = resources["requests"]["memory"], resources["limits"]["memory"]
    assert all(m.endswith("Gi") for m in memory) and int(memory[0][:-2]) <= int(memory[1][:-2])


@pytest.mark.parametrize("name", SERVING)
def test_admin_token_comes_from_a_secret(rendered: dict[str, list[Manifest]], name: str) -> None:
    env = env_of(container(serving_deployment(rendered[name])))
    for variable in SECRET_ENV:
        assert secret_ref(env[variable])


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_pods_run_unprivileged(rendered: dict[str, list[Manifest]], name: str) -> None:
    for obj in find(rendered[name], "Deployment") + find(rendered[name], "Job"):
        spec = pod_spec(obj)
        pod = spec["securityContext"]
        assert (pod["runAsUser"], pod["runAsGroup"], pod["fsGroup"], pod["runAsNonRoot"]) == (UID, UID, UID, True)
        assert spec["automountServiceAccountToken"] is False
        # a Service named transfer-serve would inject TRANSFER_SERVE_* variables into the pod
        assert spec["enableServiceLinks"] is False
        main = container(obj)
        context = main["securityContext"]
        assert context["allowPrivilegeEscalation"] is False
        assert context["readOnlyRootFilesystem"] is True
        assert context["capabilities"]["drop"] == ["ALL"]
        assert "emptyDir" in volume_at(obj, SCRATCH), "a read-only root needs a writable /tmp"
        assert volume_at(obj, "/data")


@pytest.mark.parametrize("name", SERVING)
def test_shutdown_drains(rendered: dict[str, list[Manifest]], name: str) -> None:
    deployment = serving_deployment(rendered[name])
    grace = pod_spec(deployment)["terminationGracePeriodSeconds"]
    assert grace == 30
    pause = container(deployment).get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
    assert pause < grace / 2, "the preStop pause must leave most of the grace period to the drain"


def test_base_is_one_writer_on_a_read_write_once_volume(rendered: dict[str, list[Manifest]]) -> None:
    assert rendered["."] == rendered["base"]
    objects = rendered["base"]
    deployment = serving_deployment(objects)
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    claim = one(objects, "PersistentVolumeClaim")
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert volume_at(deployment, "/data")["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]


# ---------------------------------------------------------------- scale out


def test_scale_out_runs_replicas_on_shared_state(rendered: dict[str, list[Manifest]]) -> None:
    objects = rendered["overlays/scale-out"]
    deployment = serving_deployment(objects)
    assert deployment["spec"]["replicas"] > 1
    strategy = deployment["spec"]["strategy"]
    assert strategy["type"] == "RollingUpdate" and strategy["rollingUpdate"]["maxUnavailable"] == 0
    env = env_of(container(deployment))
    shared = {variable: secret_ref(env[variable]) for variable in SHARED_STATE_ENV}
    assert len({secret for secret, _ in shared.values()}) == 1, "one Secret holds the shared-state settings"
    assert secret_ref(env["TRANSFER_SERVE_ADMIN_TOKEN"])
    # /data holds only local copies: no claim, an emptyDir per replica
    assert find(objects, "PersistentVolumeClaim") == []
    assert set(volume_at(deployment, "/data")) == {"name", "emptyDir"}
    # everything else about the pod is the base's
    base = serving_deployment(rendered["base"])
    assert container(deployment)["resources"] == container(base)["resources"]
    assert container(deployment)["image"] == container(base)["image"]


def test_disruption_budget_covers_the_serving_pods(rendered: dict[str, list[Manifest]]) -> None:
    objects = rendered["overlays/scale-out"]
    budget = one(objects, "PodDisruptionBudget")["spec"]
    replicas = serving_deployment(objects)["spec"]["replicas"]
    assert budget.get("maxUnavailable") == 1 or 0 < budget.get("minAvailable", 0) < replicas
    selector = budget["selector"]["matchLabels"]
    assert selector.items() <= serving_deployment(objects)["spec"]["template"]["metadata"]["labels"].items()
    # the trainer's pods must not count as serving capacity
    (job,) = find(rendered["overlays/scale-out/trainer"], "Job")
    assert not selector.items() <= job["spec"]["template"]["metadata"]["labels"].items()


def test_trainer_job_fits_on_the_shared_state(rendered: dict[str, list[Manifest]]) -> None:
    job = one(rendered["overlays/scale-out/trainer"], "Job")
    main = container(job)
    assert main["image"].rpartition(":")[2] == "trainer"
    assert main["image"].rpartition(":")[0].rpartition("/")[2] == "transfer-serve"
    assert main.get("args") == TRAINER_ARGS and "command" not in main, "the image's entry point (tini) stays"
    assert job["spec"]["backoffLimit"] >= 0 and job["spec"]["ttlSecondsAfterFinished"] > 0
    assert pod_spec(job)["restartPolicy"] == "Never"
    # the same connection settings as the replicas, from the same Secret
    serving = env_of(container(serving_deployment(rendered["overlays/scale-out"])))
    trainer = env_of(main)
    assert "TRANSFER_SERVE_ADMIN_TOKEN" not in trainer
    assert set(trainer) == set(serving) - {"TRANSFER_SERVE_ADMIN_TOKEN"}
    for variable in trainer:
        assert trainer[variable] == serving[variable]
    mounts = {mount["mountPath"]: mount for mount in main["volumeMounts"]}
    assert mounts["/images"].get("readOnly") is True


def test_gpu_overlay_requests_a_gpu(rendered: dict[str, list[Manifest]]) -> None:
    main = container(serving_deployment(rendered["overlays/gpu"]))
    assert main["image"] == "transfer-serve:gpu"
    assert main["resources"]["limits"]["nvidia.com/gpu"] == 1
    limits = {k: v for k, v in main["resources"]["limits"].items() if k != "nvidia.com/gpu"}
    assert limits == container(serving_deployment(rendered["base"]))["resources"]["limits"]
