"""A scenario, real server level (``store/shared/`` behind ``service/``): several replicas, one
deployment: three real `bentoml serve` processes with homes of their own, sharing state through a
real Postgres 15 server and an S3 API server (moto), all on 127.0.0.1 and started by the tests.
What one replica is told, every replica knows: labels, jobs, the active version; one retrain at a
time; a replica killed mid-job; the database and the object store stopped under load. The tests
build on each other, in file order, on one cluster.
"""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from tests.support.images import jpeg_files
from tests.support.load import Load
from tests.support.paths import CHELSEA, ROOT
from tests.support.polling import eventually
from tests.support.postgres import PostgresServer
from tests.support.s3 import S3Server
from tests.support.server import Server, start_server, wait_for_job, wait_until

pytestmark = pytest.mark.slow

TOKEN = "replica-admin-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
LEASE_S = 3
REPLICAS = ("r1", "r2", "r3")


class Cluster:
    def __init__(self, root: Path, postgres: PostgresServer, s3: S3Server) -> None:
        self.root = root
        self.postgres = postgres
        self.s3 = s3
        self.env = {
            "TRANSFER_SERVE_DATABASE_URL": postgres.url("deployment"), "TRANSFER_SERVE_OBJECT_STORE": "s3://models/prod",
            "TRANSFER_SERVE_ADMIN_TOKEN": TOKEN, "TRANSFER_SERVE_JOB_LEASE_S": str(LEASE_S),
            "TRANSFER_SERVE_WORKERS": "1", "TRANSFER_SERVE_INFERENCE_WORKERS": "1",
            "TRANSFER_SERVE_INTRA_OP_THREADS": "1", **s3.env(),
        }
        self.servers: dict[str, Server] = {}

    def start(self, name: str) -> Server:
        env = {**self.env, "TRANSFER_SERVE_REPLICA_ID": name}
        self.servers[name] = start_server(self.root / name, self.root / f"{name}.log", env)
        return self.servers[name]

    def client(self, name: str) -> httpx.Client:
        return httpx.Client(base_url=self.servers[name].url, timeout=60, headers=AUTH)


@pytest.fixture(scope="module")
def cluster(bootstrapped_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    root = tmp_path_factory.mktemp("replicas")
    postgres = PostgresServer()
    s3 = S3Server(root / "moto.log")
    try:
        postgres.create_database("deployment")
        s3.create_bucket("models")
        cluster = Cluster(root, postgres, s3)
        # the deployment starts from the bootstrap model, moved in with the operators' copy command
        copied = subprocess.run([sys.executable, "-m", "store", "copy", "--from", str(bootstrapped_home)],
                                cwd=ROOT, env={**os.environ, **cluster.env, "TRANSFER_SERVE_HOME": str(root / "copy")},
                                capture_output=True, text=True, timeout=120)
        assert copied.returncode == 0, copied.stderr[-2000:]
        for name in REPLICAS:  # started together: they create the schema under one lock
            cluster.start(name)
        for name in REPLICAS:
            wait_until(cluster.servers[name], timeout=180)
        yield cluster
    finally:
        for server in cluster.servers.values():
            server.stop()
        s3.stop()
        postgres.close()


def predicted_version(http: httpx.Client) -> str:
    response = http.post("/predict", files=[("images", ("c.jpg", CHELSEA))])
    assert response.status_code == 200, response.text
    return str(response.json()[0]["model_version"])


def upload(http: httpx.Client, label: str, photos: list[Path]) -> httpx.Response:
    return http.post("/admin/labels", data={"label": label},
                     files=[("images", (p.name, p.read_bytes())) for p in photos])


def test_every_replica_serves_the_deployment_and_reports_itself(cluster: Cluster) -> None:
    for name in REPLICAS:
        with cluster.client(name) as http:
            assert predicted_version(http) == "v1"

    def all_listed() -> None:
        with cluster.client("r2") as http:
            listing = http.get("/admin/models").json()
        assert listing["active"] == "v1"
        assert [(r["id"], r["version"], r["variant"]) for r in listing["replicas"]] == [
            (name, "v1", "fp32") for name in REPLICAS]

    eventually(all_listed, timeout=20)


def test_a_label_uploaded_to_one_replica_is_listed_by_the_others(cluster: Cluster, hymenoptera: Path) -> None:
    with cluster.client("r1") as http:
        assert upload(http, "ants", jpeg_files(hymenoptera, "ants")[:8]).status_code == 200
    with cluster.client("r2") as http:
        assert upload(http, "bees", jpeg_files(hymenoptera, "bees")[:8]).status_code == 200
    for name in REPLICAS:
        with cluster.client(name) as http:
            labels = http.get("/admin/labels").json()
        assert labels["counts"] == {"ants": 8, "bees": 8} and labels["not_in_active_model"] == 16


def test_a_retrain_started_on_one_replica_goes_live_on_all(cluster: Cluster) -> None:
    with cluster.client("r1") as r1:
        started = r1.post("/admin/retrain")
        assert started.status_code == 202, started.text
        job_id = started.json()["id"]
    with cluster.client("r3") as r3:  # any replica sees the job
        done = wait_for_job(r3, job_id, timeout=120)
    assert done["state"] == "succeeded" and done["version"] == "v2", done
    for name in REPLICAS:
        with cluster.client(name) as http:
            eventually(functools.partial(_serving, http, "v2"), timeout=15)

    def all_report_v2() -> None:
        with cluster.client("r1") as http:
            assert {r["version"] for r in http.get("/admin/models").json()["replicas"]} == {"v2"}

    eventually(all_report_v2, timeout=20)


def _serving(http: httpx.Client, version: str) -> None:
    assert all(predicted_version(http) == version for _ in range(4))


def test_concurrent_retrains_on_two_replicas_give_one_202_and_one_409(cluster: Cluster) -> None:
    answers: dict[str, httpx.Response] = {}
    barrier = threading.Barrier(2)

    def start(name: str) -> None:
        with cluster.client(name) as http:
            barrier.wait()
            answers[name] = http.post("/admin/retrain", json={"force": True})

    threads = [threading.Thread(target=start, args=(name,)) for name in ("r1", "r2")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    statuses = sorted(response.status_code for response in answers.values())
    assert statuses == [202, 409], {name: r.text for name, r in answers.items()}
    accepted = next(r for r in answers.values() if r.status_code == 202).json()
    refused = next(r for r in answers.values() if r.status_code == 409).json()
    assert refused["job"]["id"] == accepted["id"] and accepted["id"] in refused["error"]
    with cluster.client("r3") as http:
        assert wait_for_job(http, accepted["id"], timeout=120)["state"] == "succeeded"


def test_a_replica_killed_mid_job_has_its_job_failed_by_the_others(cluster: Cluster, hymenoptera: Path) -> None:
    with cluster.client("r3") as r3:  # more images: the job embeds for seconds
        assert upload(r3, "ants", jpeg_files(hymenoptera, "ants")[8:40]).status_code == 200
        job_id = r3.post("/admin/retrain").json()["id"]

        def embedding() -> None:
            assert r3.get(f"/admin/jobs/{job_id}").json()["phase"] == "embedding"

        eventually(embedding, timeout=60, interval=0.1)
    server = cluster.servers["r3"]
    processes = [psutil.Process(server.process.pid), *psutil.Process(server.process.pid).children(recursive=True)]
    for process in processes:  # the whole replica at once, its retrain process included
        process.send_signal(signal.SIGKILL)
    psutil.wait_procs(processes, timeout=10)
    with cluster.client("r1") as r1:
        failed = wait_for_job(r1, job_id, timeout=LEASE_S + 30)
        assert failed["state"] == "failed" and "r3" in failed["error"] and "lease" in failed["error"], failed

        def r3_dropped() -> None:  # a dead replica drops off the list
            assert [r["id"] for r in r1.get("/admin/models").json()["replicas"]] == ["r1", "r2"]

        eventually(r3_dropped, timeout=30, interval=1.0)


def test_postgres_stopped_and_started_under_load_fails_no_prediction(cluster: Cluster) -> None:
    urls = [cluster.servers[name].url for name in ("r1", "r2")]
    with Load(urls[0], [CHELSEA], clients=2) as load_1, Load(urls[1], [CHELSEA], clients=2) as load_2:
        time.sleep(1.0)
        cluster.postgres.stop()
        try:
            with cluster.client("r1") as http:
                refused = http.get("/admin/labels")
                assert refused.status_code == 503 and refused.headers["retry-after"] == "5", refused.text
                assert "cannot be reached" in refused.json()["error"]
                assert http.get("/readyz").status_code == 200
            time.sleep(2.0)
        finally:
            cluster.postgres.start()
        with cluster.client("r2") as http:
            eventually(lambda: _labels_answer(http), timeout=15)
        time.sleep(1.0)
    answers = load_1.answers + load_2.answers
    assert len(answers) > 10
    assert [a for a in answers if a.status != 200] == []  # zero failed predictions


def _labels_answer(http: httpx.Client) -> None:
    assert http.get("/admin/labels").status_code == 200


def test_an_object_store_stopped_during_an_upload_gives_503_and_stores_nothing(cluster: Cluster,
                                                                                hymenoptera: Path) -> None:
    with cluster.client("r1") as http:
        before = http.get("/admin/labels").json()["counts"]
        cluster.s3.stop()  # last test of the module: the in-memory store's objects are gone with it
        refused = upload(http, "wasps", jpeg_files(hymenoptera, "bees")[40:44])
        assert refused.status_code == 503 and refused.headers["retry-after"] == "5", refused.text
        assert "object store" in refused.json()["error"]
        assert http.get("/admin/labels").json()["counts"] == before  # nothing stored
        assert predicted_version(http) in ("v2", "v3")  # predictions go on
