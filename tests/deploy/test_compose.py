"""The Docker Compose files, as Debian bookworm's docker-compose 1.29 reads them: `docker-compose
config` resolves each file (anchors merged, variables filled in, paths made absolute) and the tests
check what it resolved to: the single-node stack (`compose.yaml`) and the scale-out stack
(`deploy/compose/scale-out.yaml` with its `nginx.conf`). Nothing is built, pulled or started.
Without docker-compose the tests fail, naming the package to install."""

from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from service.settings import Settings
from tests.support.net import free_port
from tests.support.paths import ROOT
from tests.support.tools import required_tool

SINGLE_NODE = ROOT / "compose.yaml"
SCALE_OUT = ROOT / "deploy" / "compose" / "scale-out.yaml"
NGINX_CONF = ROOT / "deploy" / "compose" / "nginx.conf"
SERVING_TARGETS = ("cpu", "gpu")
#: every profile the files use: Compose v2's `config` leaves out the services of profiles not named
PROFILES = ("cpu", "gpu", "tools")
CONTAINER_TMP = "/tmp"  # noqa: S108 (the containers' own /tmp, a tmpfs)
#: what the files require (`${VAR:?...}`), each set to a value of the right shape
REQUIRED = {
    SINGLE_NODE: {"TRANSFER_SERVE_ADMIN_TOKEN": "compose-test-token-0123456789"},
    SCALE_OUT: {"TRANSFER_SERVE_ADMIN_TOKEN": "compose-test-token-0123456789",
                "POSTGRES_PASSWORD": "compose-test-pg-password", "MINIO_ROOT_USER": "compose-test-user",
                "MINIO_ROOT_PASSWORD": "compose-test-minio-password"},
}


@dataclass
class Mount:
    source: str
    target: str
    read_only: bool


@dataclass
class Port:
    host_ip: str
    published: int
    target: int


def docker_compose() -> str:
    return required_tool("docker-compose", "apt-get install docker-compose (Debian bookworm's 1.29, the oldest "
                         "version the compose files are written for)")


def run_config(file: Path, variables: dict[str, str], env_file: Path) -> subprocess.CompletedProcess[str]:
    """`docker-compose config` on ``file`` with only ``variables`` (and PATH) in its environment,
    and an empty env file: neither the caller's environment nor a `.env` can fill in a variable."""
    profiles = [arg for profile in PROFILES for arg in ("--profile", profile)]
    command = [docker_compose(), "--env-file", str(env_file), "-f", str(file), "-p", "transfer-serve-test",
               *profiles, "config"]
    return subprocess.run(command, env={"PATH": os.environ.get("PATH", os.defpath), **variables},
                          capture_output=True, text=True, timeout=120, check=False)


def resolved(file: Path, env_file: Path, **extra: str) -> dict[str, Any]:
    result = run_config(file, {**REQUIRED[file], **extra}, env_file)
    assert result.returncode == 0, f"docker-compose config {file.name} failed:\n{result.stderr}"
    config = yaml.safe_load(result.stdout)
    assert isinstance(config, dict)
    return config


def mounts(service: dict[str, Any]) -> list[Mount]:
    """The service's volumes, from the short form (1.29's output) or the long one (v2's)."""
    out = []
    for volume in service.get("volumes", []):
        if isinstance(volume, dict):
            out.append(Mount(str(volume["source"]), str(volume["target"]), bool(volume.get("read_only"))))
        else:
            source, target, *mode = str(volume).split(":")
            out.append(Mount(source, target, "ro" in "".join(mode).split(",")))
    return out


def mount_at(service: dict[str, Any], target: str) -> Mount:
    found = [m for m in mounts(service) if m.target == target]
    assert len(found) == 1, f"{len(found)} mounts at {target}: {mounts(service)}"
    return found[0]


def ports(service: dict[str, Any]) -> list[Port]:
    """The service's published ports, from ``IP:HOST:CONTAINER/proto`` (1.29) or the long form (v2)."""
    out = []
    for port in service.get("ports", []):
        if isinstance(port, dict):
            out.append(Port(str(port.get("host_ip", "")), int(port["published"]), int(port["target"])))
        else:
            host_ip, published, target = str(port).split("/")[0].rsplit(":", 2)
            out.append(Port(host_ip, int(published), int(target)))
    return out


def depends_on(service: dict[str, Any]) -> dict[str, str]:
    """Each service this one waits for, with the condition (the short form means started)."""
    value = service.get("depends_on", {})
    if isinstance(value, list):
        return dict.fromkeys(value, "service_started")
    return {name: spec.get("condition", "service_started") for name, spec in value.items()}


def serving(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The services that run a serving image (built from the cpu or gpu target)."""
    return {name: s for name, s in config["services"].items() if s.get("build", {}).get("target") in SERVING_TARGETS}


@pytest.fixture(scope="module")
def env_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("compose") / "empty.env"
    path.write_text("")
    return path


# ---------------------------------------------------------------- single node: compose.yaml


@pytest.fixture(scope="module")
def single_node(env_file: Path) -> dict[str, Any]:
    return resolved(SINGLE_NODE, env_file)


def test_single_node_serves_either_image_from_its_target(single_node: dict[str, Any]) -> None:
    services = serving(single_node)
    assert sorted(s["build"]["target"] for s in services.values()) == sorted(SERVING_TARGETS)
    for service in services.values():
        target = service["build"]["target"]
        assert Path(service["build"]["context"]) == ROOT
        assert service["image"] == f"transfer-serve:{target}"
        assert service["profiles"] == [target]  # one or the other, never both on the same volume
        token = service["environment"]["TRANSFER_SERVE_ADMIN_TOKEN"]
        assert token == REQUIRED[SINGLE_NODE]["TRANSFER_SERVE_ADMIN_TOKEN"]


def test_single_node_services_share_one_named_volume_at_data(single_node: dict[str, Any]) -> None:
    services = single_node["services"]
    assert {*serving(single_node), "trainer"} == set(services)
    sources = {name: mount_at(service, "/data").source for name, service in services.items()}
    assert len(set(sources.values())) == 1, sources
    assert set(sources.values()) <= set(single_node["volumes"])  # a named volume, not a host path
    assert not any(mount_at(service, "/data").read_only for service in services.values())


def test_single_node_gpu_service_reserves_an_nvidia_gpu(single_node: dict[str, Any]) -> None:
    by_target = {s["build"]["target"]: s for s in serving(single_node).values()}
    (device,) = by_target["gpu"]["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"] and device["count"] == 1
    assert "deploy" not in by_target["cpu"]


def test_single_node_serving_is_read_only_with_a_tmp_tmpfs(single_node: dict[str, Any]) -> None:
    for name, service in serving(single_node).items():
        assert service["read_only"] is True, name
        assert CONTAINER_TMP in service["tmpfs"], name
        assert service["restart"] == "unless-stopped", name
        assert service["stop_grace_period"] == "30s", name
        assert "healthcheck" not in service or "/readyz" in " ".join(service["healthcheck"]["test"]), name


def test_single_node_publishes_on_all_interfaces_by_default(single_node: dict[str, Any]) -> None:
    for name, service in serving(single_node).items():
        assert ports(service) == [Port("0.0.0.0", 3000, 3000)], name  # noqa: S104 (the documented default)


def test_single_node_publish_address_and_port_come_from_the_environment(env_file: Path) -> None:
    port = free_port()
    config = resolved(SINGLE_NODE, env_file, TRANSFER_SERVE_PUBLISH="127.0.0.1", TRANSFER_SERVE_PORT=str(port))
    for name, service in serving(config).items():
        assert ports(service) == [Port("127.0.0.1", port, 3000)], name


def test_single_node_trainer_reads_the_images_folder_read_only(single_node: dict[str, Any], env_file: Path,
                                                               tmp_path: Path) -> None:
    trainer = single_node["services"]["trainer"]
    assert trainer["profiles"] == ["tools"]  # `up` never starts it without --profile tools
    assert trainer["build"]["target"] == "trainer" and trainer["image"] == "transfer-serve:trainer"
    assert mount_at(trainer, "/images") == Mount(str(ROOT / "images"), "/images", True)
    assert "ports" not in trainer
    config = resolved(SINGLE_NODE, env_file, TRANSFER_SERVE_IMAGES=str(tmp_path))
    assert mount_at(config["services"]["trainer"], "/images") == Mount(str(tmp_path), "/images", True)


def test_config_without_the_admin_token_fails_naming_it(env_file: Path) -> None:
    result = run_config(SINGLE_NODE, {}, env_file)
    assert result.returncode != 0
    assert "TRANSFER_SERVE_ADMIN_TOKEN" in result.stderr and "set it" in result.stderr, result.stderr


# ---------------------------------------------------------------- scale out: deploy/compose/scale-out.yaml


@pytest.fixture(scope="module")
def scale_out(env_file: Path) -> dict[str, Any]:
    return resolved(SCALE_OUT, env_file)


@pytest.fixture(scope="module")
def replicas(scale_out: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return serving(scale_out)


def upstream_servers(conf: str) -> list[tuple[str, int]]:
    """(host, port) of each `server` in nginx.conf's upstream block, the one `proxy_pass` names."""
    (upstream,) = re.findall(r"^\s*proxy_pass\s+http://([\w-]+)\s*;", conf, re.MULTILINE)
    block = re.search(r"upstream\s+" + re.escape(upstream) + r"\s*\{(.*?)\}", conf, re.DOTALL)
    assert block is not None, f"no upstream {upstream} in {NGINX_CONF}"
    code = re.sub(r"#[^\n]*", "", block[1])
    return [(host, int(port)) for host, port in re.findall(r"^\s*server\s+([\w.-]+):(\d+)\b", code, re.MULTILINE)]


def nginx_directive(conf: str, name: str) -> list[str]:
    code = re.sub(r"#[^\n]*", "", conf)
    return re.findall(r"^\s*" + re.escape(name) + r"\s+([^;]*);", code, re.MULTILINE)


def test_scale_out_runs_several_replicas_on_the_same_shared_state(replicas: dict[str, dict[str, Any]],
                                                                  scale_out: dict[str, Any]) -> None:
    assert len(replicas) >= 2
    environments = [service["environment"] for service in replicas.values()]
    trainer = scale_out["services"]["trainer"]["environment"]
    for variable in ("TRANSFER_SERVE_DATABASE_URL", "TRANSFER_SERVE_OBJECT_STORE", "AWS_ENDPOINT_URL",
                     "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert len({env[variable] for env in [*environments, trainer]}) == 1, variable
    ids = [env["TRANSFER_SERVE_REPLICA_ID"] for env in environments]
    assert len(set(ids)) == len(ids), ids
    for env in environments:
        assert env["TRANSFER_SERVE_ADMIN_TOKEN"] == REQUIRED[SCALE_OUT]["TRANSFER_SERVE_ADMIN_TOKEN"]


def test_scale_out_state_variables_point_at_the_stack_s_postgres_and_minio(replicas: dict[str, dict[str, Any]],
                                                                           scale_out: dict[str, Any]) -> None:
    services = scale_out["services"]
    env = next(iter(replicas.values()))["environment"]
    database = urlsplit(env["TRANSFER_SERVE_DATABASE_URL"])
    postgres = services["postgres"]
    assert services[database.hostname or ""]["image"] == "postgres:15" and database.port == 5432
    assert database.scheme == "postgresql" and database.username == postgres["environment"]["POSTGRES_USER"]
    assert database.password == REQUIRED[SCALE_OUT]["POSTGRES_PASSWORD"] == postgres["environment"]["POSTGRES_PASSWORD"]
    assert database.path == "/" + postgres["environment"]["POSTGRES_DB"]
    store = urlsplit(env["TRANSFER_SERVE_OBJECT_STORE"])
    minio = services["minio"]
    assert store.scheme == "s3" and store.netloc == services["create-bucket"]["environment"]["BUCKET"]
    assert services[urlsplit(env["AWS_ENDPOINT_URL"]).hostname or ""] is minio
    assert (env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]) == (
        minio["environment"]["MINIO_ROOT_USER"], minio["environment"]["MINIO_ROOT_PASSWORD"])
    # named volumes: the state survives `down` (without -v)
    assert mount_at(postgres, "/var/lib/postgresql/data").source in scale_out["volumes"]
    assert mount_at(minio, "/data").source in scale_out["volumes"]


def test_scale_out_replicas_wait_for_healthy_postgres_and_minio(replicas: dict[str, dict[str, Any]],
                                                                scale_out: dict[str, Any]) -> None:
    for name, service in [*replicas.items(), ("trainer", scale_out["services"]["trainer"])]:
        waits = depends_on(service)
        assert waits["postgres"] == waits["minio"] == "service_healthy", (name, waits)
        assert waits["create-bucket"] == "service_completed_successfully", (name, waits)
    # service_healthy needs a health check to wait for
    assert "pg_isready" in scale_out["services"]["postgres"]["healthcheck"]["test"]
    assert scale_out["services"]["minio"]["healthcheck"]["test"]


def test_scale_out_replicas_start_one_first_on_an_empty_deployment(replicas: dict[str, dict[str, Any]]) -> None:
    # the first replica registers the built-in model; the others wait until it is ready
    waiting_for = {name: [d for d in depends_on(service) if d in replicas]
                   for name, service in replicas.items()}
    first = [name for name, others in waiting_for.items() if not others]
    assert len(first) == 1, waiting_for
    for name, service in replicas.items():
        if name not in first:
            assert depends_on(service)[first[0]] == "service_healthy", (name, waiting_for)


def test_scale_out_replicas_each_have_their_own_data_and_a_read_only_root(replicas: dict[str, dict[str, Any]],
                                                                          scale_out: dict[str, Any]) -> None:
    sources = [mount_at(service, "/data").source for service in replicas.values()]
    assert len(set(sources)) == len(sources) and set(sources) <= set(scale_out["volumes"]), sources
    for name, service in replicas.items():
        assert service["read_only"] is True and CONTAINER_TMP in service["tmpfs"], name
        assert service["restart"] == "unless-stopped" and service["stop_grace_period"] == "30s", name
        assert float(service["cpus"]) > 0, name  # a quota: the workers are sized from it, not from the host


def test_scale_out_trainer_is_a_tool_reading_images_read_only(scale_out: dict[str, Any]) -> None:
    trainer = scale_out["services"]["trainer"]
    assert trainer["profiles"] == ["tools"] and trainer["build"]["target"] == "trainer"
    assert mount_at(trainer, "/images").read_only


def test_only_the_load_balancer_publishes_a_port(scale_out: dict[str, Any]) -> None:
    published = {name: ports(service) for name, service in scale_out["services"].items() if ports(service)}
    assert published == {"load-balancer": [Port("0.0.0.0", 3000, 3000)]}  # noqa: S104 (the documented default)


def test_load_balancer_proxies_to_exactly_the_replicas(replicas: dict[str, dict[str, Any]],
                                                       scale_out: dict[str, Any]) -> None:
    balancer = scale_out["services"]["load-balancer"]
    assert mount_at(balancer, "/etc/nginx/nginx.conf") == Mount(str(NGINX_CONF), "/etc/nginx/nginx.conf", True)
    conf = NGINX_CONF.read_text()
    assert sorted(upstream_servers(conf)) == sorted((name, 3000) for name in replicas)
    assert nginx_directive(conf, "listen") == [str(ports(balancer)[0].target)]
    assert set(depends_on(balancer)) == set(replicas)


def test_load_balancer_takes_the_service_s_request_limit_and_never_resends_a_post() -> None:
    conf = NGINX_CONF.read_text()
    limit = Settings.model_fields["max_request_bytes"].default
    assert nginx_directive(conf, "client_max_body_size") == [f"{limit // 2**20}m"]
    assert f"{limit}-byte limit" in conf  # nginx's own 413 body names the same limit
    # connection errors only: with `timeout`, a GET a slow replica is still working on would go to
    # another; without `non_idempotent`, no POST that reached a replica is sent again
    assert nginx_directive(conf, "proxy_next_upstream") == ["error"]
    (read_timeout,) = nginx_directive(conf, "proxy_read_timeout")
    assert int(read_timeout.removesuffix("s")) >= 120
    assert nginx_directive(conf, "keepalive")  # connections to the replicas are reused


@pytest.mark.parametrize("variable", sorted(REQUIRED[SCALE_OUT]))
def test_scale_out_config_without_a_secret_fails_naming_it(variable: str, env_file: Path) -> None:
    variables = {k: v for k, v in REQUIRED[SCALE_OUT].items() if k != variable}
    result = run_config(SCALE_OUT, variables, env_file)
    assert result.returncode != 0
    assert variable in result.stderr and "set it" in result.stderr, result.stderr
