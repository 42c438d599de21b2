"""Shared state measured against the single-machine one, side by side in one run:

    .venv/bin/python -m bench.replicas_bench [--images ../shared/data/hymenoptera/train]
        [--duration 15] [--rounds 2] [--uploads 48] [--json OUT.json]

1. /predict throughput, single-image requests at --concurrency: one replica on SQLite + files
   against one replica on Postgres + an object store (moto's S3 server), in alternating rounds;
   /predict touches neither, so the two should be within the run-to-run spread.
2. Label uploads (one image per request, four clients): the same two setups.
3. Time from POST /admin/retrain to the new version answering on every replica, and from the job's
   end to that moment, with 1 and with 3 replicas on the shared state (and 1 on SQLite for
   reference). The goal: every replica answers with the new version within 2 s of the job's end.

Everything runs on 127.0.0.1: a throwaway Postgres 15 cluster and moto are started here; each
replica has 1 HTTP and 1 inference worker. Progress goes to stderr, the table to stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

from bench.common import DEFAULT_IMAGES, ImageFile, Progress, begin, bootstrap_home, predict_load
from tests.support.paths import CHELSEA, ROOT
from tests.support.polling import eventually
from tests.support.postgres import PostgresServer
from tests.support.s3 import S3Server
from tests.support.server import Server, start_server, wait_for_job, wait_until

TOKEN = "bench-admin-token-" + os.urandom(8).hex()
AUTH = {"Authorization": f"Bearer {TOKEN}"}
WORKERS = {"TRANSFER_SERVE_WORKERS": "1", "TRANSFER_SERVE_INFERENCE_WORKERS": "1",
           "TRANSFER_SERVE_INTRA_OP_THREADS": "1", "TRANSFER_SERVE_ADMIN_TOKEN": TOKEN}


class Deployment:
    """``replicas`` servers on one state: a copy of the bootstrapped home (SQLite) or a fresh
    database and bucket seeded from it with ``python -m store copy``."""

    def __init__(self, name: str, root: Path, seed_home: Path, replicas: int, shared: dict[str, str] | None,
                 progress: Progress) -> None:
        self.name, self.root, self.progress = name, root / name, progress
        self.root.mkdir()
        self.env = {**WORKERS, **(shared or {})}
        self.servers: list[Server] = []
        if shared is None:
            shutil.copytree(seed_home, self.root / "r1")
        else:
            copied = subprocess.run([sys.executable, "-m", "store", "copy", "--from", str(seed_home)], cwd=ROOT,
                                    env={**os.environ, **self.env, "TRANSFER_SERVE_HOME": str(self.root / "copy")},
                                    capture_output=True, text=True, check=False)
            if copied.returncode != 0:
                raise RuntimeError(f"store copy failed: {copied.stderr[-2000:]}")
        for index in range(1, replicas + 1):
            replica = f"r{index}"
            self.servers.append(start_server(self.root / replica, self.root / f"{replica}.log",
                                             {**self.env, "TRANSFER_SERVE_REPLICA_ID": replica}))
        for server in self.servers:
            wait_until(server, timeout=240)
        progress(f"{name}: {replicas} replica(s) ready")

    def stop(self) -> None:
        for server in self.servers:
            server.stop()

    def client(self, index: int = 0) -> httpx.Client:
        return httpx.Client(base_url=self.servers[index].url, timeout=120, headers=AUTH)


def shared_env(postgres: PostgresServer, s3: S3Server, name: str) -> dict[str, str]:
    database = f"deployment-{name}"
    postgres.create_database(database)
    s3.create_bucket(database)
    return {"TRANSFER_SERVE_DATABASE_URL": postgres.url(database), "TRANSFER_SERVE_OBJECT_STORE": f"s3://{database}/state",
            **s3.env()}


def upload_throughput(deployment: Deployment, images: list[ImageFile], count: int) -> dict[str, Any]:
    """Label uploads of one image each from four clients; images/s over the whole batch."""
    chosen = images[:count]
    lock = threading.Lock()
    position = 0
    statuses: list[int] = []

    def client() -> None:
        nonlocal position
        with deployment.client() as http:
            while True:
                with lock:
                    if position >= len(chosen):
                        return
                    image = chosen[position]
                    position += 1
                response = http.post("/admin/labels", data={"label": image.label},
                                     files=[("images", image.as_file())])
                statuses.append(response.status_code)

    started = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - started
    return {"uploads": len(chosen), "seconds": round(seconds, 2), "per_second": round(len(chosen) / seconds, 1),
            "errors": sum(status != 200 for status in statuses)}


def time_to_live(deployment: Deployment) -> dict[str, Any]:
    """POST /admin/retrain -> the job's end -> every replica answering with the new version."""
    with deployment.client() as http:
        requested = time.time()
        job = http.post("/admin/retrain", json={"force": True}).json()
        done = wait_for_job(http, job["id"], timeout=600)
    if done["state"] != "succeeded":
        raise RuntimeError(f"retrain {done['state']}: {done.get('error')}")
    version = done["version"]
    ended = datetime.fromisoformat(done["finished_at"]).timestamp()
    live_at: list[float] = []
    for index in range(len(deployment.servers)):
        with deployment.client(index) as http:
            def answers_new(http: httpx.Client = http) -> bool:
                response = http.post("/predict", files=[("images", ("c.jpg", CHELSEA))])
                return response.status_code == 200 and response.json()[0]["model_version"] == version

            eventually(answers_new, timeout=120, interval=0.05, message=f"replica {index + 1} never served {version}")
            live_at.append(time.time())
    every = max(live_at)  # polled one replica after the other: an upper bound for each
    return {"version": version, "replicas": len(deployment.servers),
            "request_to_job_end_s": round(ended - requested, 2), "job_end_to_live_on_all_s": round(every - ended, 2),
            "request_to_live_on_all_s": round(every - requested, 2)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--images", type=Path, default=DEFAULT_IMAGES)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--duration", type=float, default=15.0, help="seconds measured per /predict round")
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=2, help="/predict rounds per setup, alternating")
    parser.add_argument("--uploads", type=int, default=48, help="label uploads per setup")
    parser.add_argument("--json", type=Path, help="write the results here too")
    args = parser.parse_args(argv)
    progress, images = begin(args.images)
    results: dict[str, Any] = {"predict": {"sqlite": [], "postgres": []}, "uploads": {}, "time_to_live": []}
    with contextlib.ExitStack() as stack:
        root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="transfer-serve-replicas-")))
        seed = root / "seed"
        progress("bootstrapping the pretrained classifier ...")
        bootstrap_home(seed)
        postgres = PostgresServer()
        stack.callback(postgres.close)
        s3 = S3Server(root / "moto.log")
        stack.callback(s3.stop)

        def deployment(name: str, replicas: int, shared: bool) -> Deployment:
            started = Deployment(name, root, seed, replicas, shared_env(postgres, s3, name) if shared else None,
                                 progress)
            stack.callback(started.stop)
            return started

        sqlite, pg = deployment("sqlite", 1, shared=False), deployment("postgres", 1, shared=True)
        for round_ in range(args.rounds):
            for name, target in (("sqlite", sqlite), ("postgres", pg)):
                result = asyncio.run(predict_load(target.servers[0].url, images, concurrency=args.concurrency,
                                                  duration=args.duration, warmup=args.warmup, progress=progress,
                                                  label=f"{name} round {round_ + 1}"))
                results["predict"][name].append({"throughput": round(result.throughput, 1), "errors": result.errors})
        for name, target in (("sqlite", sqlite), ("postgres", pg)):
            progress(f"{name}: {args.uploads} label uploads")
            results["uploads"][name] = upload_throughput(target, images, args.uploads)
        for name, target in (("sqlite", sqlite), ("postgres", pg)):
            progress(f"{name}: retrain to live")
            results["time_to_live"].append({"setup": name, **time_to_live(target)})
        sqlite.stop()
        pg.stop()
        three = deployment("postgres-3", 3, shared=True)
        with three.client() as http:
            for image in images[:args.uploads]:
                http.post("/admin/labels", data={"label": image.label}, files=[("images", image.as_file())])
        progress("postgres-3: retrain to live on 3 replicas")
        results["time_to_live"].append({"setup": "postgres-3", **time_to_live(three)})
    report(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


def report(results: dict[str, Any]) -> None:
    print("/predict, single-image requests (img/s per round):")
    for name, rounds in results["predict"].items():
        figures = [f"{r['throughput']:6.1f}" + (f" ({r['errors']} errors)" if r["errors"] else "") for r in rounds]
        print(f"  {name:<9} " + "  ".join(figures))
    mean = {name: sum(r["throughput"] for r in rounds) / len(rounds) for name, rounds in results["predict"].items()}
    print(f"  postgres / sqlite: {mean['postgres'] / mean['sqlite']:.3f}")
    print("label uploads, one image per request, 4 clients:")
    for name, figures in results["uploads"].items():
        print(f"  {name:<9} {figures['per_second']:6.1f} uploads/s ({figures['uploads']} in {figures['seconds']} s, "
              f"{figures['errors']} errors)")
    print("retrain -> new version answering on every replica:")
    for row in results["time_to_live"]:
        print(f"  {row['setup']:<11} {row['replicas']} replica(s): request -> job end "
              f"{row['request_to_job_end_s']:5.2f} s, job end -> live on all {row['job_end_to_live_on_all_s']:5.2f} s, "
              f"total {row['request_to_live_on_all_s']:5.2f} s")


if __name__ == "__main__":
    sys.exit(main())
