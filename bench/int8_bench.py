"""INT8 against fp32 on a version fitted on hymenoptera: top-1 accuracy on fit's held-out split,
in-process onnxruntime throughput, and end-to-end service throughput, against the issue's targets
(at most 0.5 percentage points less accurate; at least 1.25x the service throughput).

    .venv/bin/python -m bench.int8_bench --concurrency 32 --duration 20 --warmup 3 --rounds 2 \
        [--data ../shared/data/hymenoptera/train] [--home DIR --version vN] [--json OUT.json] \
        [--service-env TRANSFER_SERVE_WORKERS=2 ...] [--log-dir DIR]

Without --home, a temporary state directory gets ``python -m training fit --data DATA --strategy
head --activate`` and then ``python -m training quantize --version v1 --data DATA`` (the CLI, as an
operator would run it), and is removed at the end. With --home, --version (default: the active
one) is used as it is, quantised first if it has no variant yet.

  accuracy    both graphs on fit's held-out split (training/quantize.py reproduces it), same images
  in-process  one ModelRuntime per variant (the service's session options), one onnxruntime thread,
              batches of --batch-size preprocessed images: the model's own speed per core
  service     ``bentoml serve service.service:TransferServe`` twice, TRANSFER_SERVE_MODEL_VARIANT=fp32
              and =int8 (plus any --service-env), both started first, then measured in turn
              --rounds times with --concurrency clients sending single-image POST /predict

Timings are printed, never judged by themselves: only ratios of setups measured in the same run
mean something on a shared machine, and "other load" says when even those were disturbed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import (
    DEFAULT_IMAGES,
    ImageFile,
    ProcessCPU,
    Progress,
    Server,
    SystemCPU,
    describe_images,
    install_sigterm_handler,
    load_images,
    predict_load,
    run_main,
    serving,
)
from tests.support.paths import ROOT
from tests.support.polling import eventually

VARIANTS = ("fp32", "int8")
#: The issue's targets: INT8 loses at most this much top-1 accuracy, and serves this much faster.
MAX_ACCURACY_LOSS_PP = 0.5
MIN_SERVICE_SPEEDUP = 1.25
OTHER_LOAD_WARNING = 0.3


def run_cli(args: Sequence[str], home: Path) -> dict[str, Any]:
    """``python -m training ARGS --json`` against ``home``; its last stdout line, parsed."""
    env = {**os.environ, "TRANSFER_SERVE_HOME": str(home), "BENTOML_DO_NOT_TRACK": "True"}
    done = subprocess.run([sys.executable, "-m", "training", *args, "--json"], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"`python -m training {' '.join(args)}` failed ({done.returncode}):\n"
                           f"{(done.stdout + done.stderr)[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def prepare(args: argparse.Namespace, stack: contextlib.ExitStack, progress: Progress) -> tuple[Path, str, dict]:
    """(home, version, what quantize reported), fitting and quantising as needed."""
    from store.registry import INT8_REPORT_FILENAME
    from store.state import open_state

    if args.home is None:
        home = Path(tempfile.mkdtemp(prefix="transfer-serve-int8-bench-"))
        stack.callback(shutil.rmtree, home, ignore_errors=True)
        progress(f"fitting a head on {args.data} into {home} ...")
        fitted = run_cli(["fit", "--data", str(args.data), "--strategy", "head", "--activate"], home)
        version = fitted["version"]
        progress(f"fitted {version} in {fitted['seconds']}s (held-out accuracy {fitted['metrics']['accuracy']:.4f})")
    else:
        home = args.home.resolve()
        version = args.version or open_state(home=home).registry.active_version()
        if version is None:
            raise RuntimeError(f"{home} has no active version; pass --version")
    stored = open_state(home=home).registry.get(version)
    if not stored.has_int8():
        progress(f"quantising {version} (python -m training quantize) ...")
        started = time.perf_counter()
        run_cli(["quantize", "--version", version, "--data", str(args.data)], home)
        progress(f"quantised in {time.perf_counter() - started:.1f}s")
    report = json.loads((stored.path / INT8_REPORT_FILENAME).read_text())
    return home, version, report


def held_out_accuracy(home: Path, version: str, data: Path) -> dict[str, Any]:
    from models.int8 import check_int8
    from store.state import open_state
    from training.quantize import select_images

    stored = open_state(home=home).registry.get(version)
    images = select_images(stored, data, progress=False)
    figures = check_int8(stored.onnx_path, stored.int8_onnx_path, images.check, images.check_targets).as_dict()
    figures.update(images=len(images.check), source=images.check_source,
                   loss_pp=100 * (figures["fp32_accuracy"] - figures["int8_accuracy"]))
    return figures


def in_process(home: Path, version: str, data: Path, args: argparse.Namespace,
               progress: Progress) -> dict[str, dict[str, Any]]:
    """Images/s of each variant's session (the service's own ModelRuntime, one thread), on the same
    preprocessed batch, measured in turn --rounds times."""
    from models.spec import ONNX_INPUT, ONNX_LOGITS
    from service.runtime import ModelRuntime
    from service.settings import Settings
    from store.state import open_state
    from training.quantize import select_images

    registry = open_state(home=home).registry
    stored = registry.get(version)
    images = select_images(stored, data, progress=False)
    batch = np.ascontiguousarray(images.check[: args.batch_size], dtype=np.float32)
    if len(batch) < args.batch_size:
        batch = np.resize(batch, (args.batch_size, *batch.shape[1:]))
    sessions = {}
    for variant in VARIANTS:
        runtime = ModelRuntime(Settings(home=home, providers="cpu", inference_workers=1, intra_op_threads=1,
                                        model_variant=variant), registry)
        runtime.refresh()
        if runtime.loaded is None or runtime.loaded.variant != variant or runtime.loaded.version != version:
            raise RuntimeError(f"could not load {version} ({variant}) from {home}")
        sessions[variant] = runtime.loaded.session
    seconds = max(1.0, args.duration / args.rounds / 2)
    done = {v: 0 for v in VARIANTS}
    spent = {v: 0.0 for v in VARIANTS}
    for _ in range(args.rounds):
        for variant, session in sessions.items():
            for _ in range(2):  # warm-up
                session.run([ONNX_LOGITS], {ONNX_INPUT: batch})
            started = time.perf_counter()
            while (elapsed := time.perf_counter() - started) < seconds:
                session.run([ONNX_LOGITS], {ONNX_INPUT: batch})
                done[variant] += len(batch)
            spent[variant] += elapsed
    results = {v: {"throughput": done[v] / spent[v], "images": done[v], "seconds": spent[v],
                   "batch_size": args.batch_size, "threads": 1} for v in VARIANTS}
    progress("in-process: " + ", ".join(f"{v} {r['throughput']:.1f} img/s" for v, r in results.items()))
    return results


def check_server(server: Server, version: str, variant: str, images: Sequence[ImageFile]) -> None:
    """The server serves ``variant`` of ``version`` (its log says so) and answers with the version."""
    import httpx

    def said() -> bool:
        return any(f"serving model version {version} (" in line and f"; variant {variant};" in line
                   for line in server.log().splitlines())

    try:
        eventually(said, timeout=30, interval=0.2)
    except TimeoutError:
        raise RuntimeError(f"the {variant} server's log never says it serves {version}, variant {variant}:\n"
                           f"{server.log()[-2000:]}") from None
    image = images[0]
    response = httpx.post(server.url + "/predict", files=[("images", image.as_file())], timeout=60)
    response.raise_for_status()
    if response.json()[0]["model_version"] != version:
        raise RuntimeError(f"the {variant} server answered {response.text[:300]}")


@dataclass
class Tally:
    """One variant's service measurements, pooled over the rounds."""

    ok: int = 0  # images in successful requests
    errors: int = 0
    seconds: float = 0.0
    latencies_ms: list[float] = field(default_factory=list)
    per_round: list[float] = field(default_factory=list)
    machine_busy: float = 0.0
    server_cpu: float = 0.0
    server_cpu_by_process: dict[str, float] = field(default_factory=dict)
    client_cpu: float = 0.0


def service(home: Path, version: str, args: argparse.Namespace, stack: contextlib.ExitStack,
            progress: Progress) -> dict[str, dict[str, Any]]:
    images = load_images(args.images)
    progress(f"service: loaded {describe_images(images)} from {args.images}")
    if args.log_dir is None:
        log_root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="int8-bench-logs-")))
    else:
        log_root = args.log_dir
    servers = {}
    for variant in VARIANTS:
        log_dir = log_root / variant  # both serve the same target, so each gets its own log folder
        log_dir.mkdir(parents=True, exist_ok=True)
        env = {**args.service_env, "TRANSFER_SERVE_MODEL_VARIANT": variant}
        progress(f"service: starting {variant} (" + " ".join(f"{k}={v}" for k, v in env.items()) + ")")
        servers[variant] = stack.enter_context(serving("service.service:TransferServe", home, log_dir, env=env))
        check_server(servers[variant], version, variant, images)
        progress(f"service: {variant} ready at {servers[variant].url}")
    results = measure_in_turn(servers, images, args, progress)
    progress("stopping the servers")
    return results


def measure_in_turn(servers: Mapping[str, Server], images: Sequence[ImageFile], args: argparse.Namespace,
                    progress: Progress) -> dict[str, dict[str, Any]]:
    """--concurrency clients sending single-image POST /predict to each of ``servers`` in turn,
    --rounds times (--duration / --rounds seconds each after --warmup); figures pooled per server."""
    seconds = args.duration / args.rounds
    tallies = {name: Tally() for name in servers}
    for round_index in range(args.rounds):
        for name, server in servers.items():
            label = f"{name} (round {round_index + 1}/{args.rounds})"
            machine, server_cpu = SystemCPU(), ProcessCPU(server.process.pid)
            client_cpu = ProcessCPU(tree=False, root_label="load generator")
            result = asyncio.run(predict_load(server.url, images, concurrency=args.concurrency, duration=seconds,
                                              warmup=args.warmup, probes=[machine, server_cpu, client_cpu],
                                              progress=progress, label=label))
            tally = tallies[name]
            tally.ok += result.images
            tally.errors += result.errors
            tally.seconds += result.seconds
            tally.latencies_ms += result.latencies_ms
            tally.per_round.append(result.throughput)
            tally.machine_busy += machine.busy_seconds()
            for process, used in server_cpu.seconds().items():
                tally.server_cpu += used
                tally.server_cpu_by_process[process] = tally.server_cpu_by_process.get(process, 0.0) + used
            tally.client_cpu += sum(client_cpu.seconds().values())
            progress(f"{label}: {result.throughput:.1f} img/s, {result.errors} errors")
    results = {}
    for name, tally in tallies.items():
        lat = tally.latencies_ms
        results[name] = {
            "throughput": tally.ok / tally.seconds, "requests_ok": tally.ok, "errors": tally.errors,
            "seconds": tally.seconds, "throughput_per_round": tally.per_round,
            "latency_ms": {f"p{q}": float(np.percentile(lat, q)) if lat else None for q in (50, 95, 99)},
            "server_cores_busy": tally.server_cpu / tally.seconds,
            "server_cpu_ms_per_image": 1000 * tally.server_cpu / max(tally.ok, 1),
            "server_cpu_ms_per_image_by_process": {process: 1000 * used / max(tally.ok, 1)
                                                   for process, used in sorted(tally.server_cpu_by_process.items())},
            "load_generator_cores_busy": tally.client_cpu / tally.seconds,
            "other_cores_busy": max(0.0, tally.machine_busy - tally.server_cpu - tally.client_cpu) / tally.seconds,
        }
    return results


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_IMAGES,
                        help=f"labelled folder to fit on and calibrate with (default {DEFAULT_IMAGES})")
    parser.add_argument("--images", type=Path, help="images for the HTTP load (default: --data)")
    parser.add_argument("--home", type=Path, help="state directory with a fitted version (default: a temporary one)")
    parser.add_argument("--version", help="version in --home (default: the active one)")
    parser.add_argument("--concurrency", type=int, default=32, help="concurrent HTTP clients (default 32)")
    parser.add_argument("--duration", type=float, default=20, help="measured seconds per variant (default 20)")
    parser.add_argument("--warmup", type=float, default=3, help="uncounted seconds before each round (default 3)")
    parser.add_argument("--rounds", type=int, default=2, help="alternate the variants this many times (default 2)")
    parser.add_argument("--batch-size", type=int, default=8, help="in-process batch size (default 8)")
    parser.add_argument("--skip-service", action="store_true", help="accuracy and in-process figures only")
    parser.add_argument("--service-env", action="append", default=[], metavar="KEY=VALUE",
                        help="setting for both services (repeatable), e.g. TRANSFER_SERVE_WORKERS=2")
    parser.add_argument("--log-dir", type=Path, help="keep the servers' logs here (default: a temporary folder)")
    parser.add_argument("--json", type=Path, help="write every figure to this JSON file")
    args = parser.parse_args(argv)
    args.images = args.images or args.data
    env = {}
    for item in args.service_env:
        key, sep, value = item.partition("=")
        if not sep or not key:
            parser.error(f"--service-env takes KEY=VALUE, got {item!r}")
        if key == "TRANSFER_SERVE_MODEL_VARIANT":
            parser.error("the benchmark sets TRANSFER_SERVE_MODEL_VARIANT itself")
        env[key] = value
    args.service_env = env
    if (args.concurrency < 1 or args.duration <= 0 or args.warmup < 0 or args.rounds < 1
            or args.batch_size < 1):
        parser.error("--concurrency, --rounds, --batch-size >= 1, --duration > 0 and --warmup >= 0 are required")
    if args.home is not None and not args.home.is_dir():
        parser.error(f"--home {args.home} is not a directory")
    if args.version and args.home is None:
        parser.error("--version needs --home")
    return args


def print_report(document: dict[str, Any]) -> None:
    acc, local, http = document["accuracy"], document["in_process"], document.get("service")
    print(f"\nINT8 against fp32, version {document['version']} ({document['cores']} cores)")
    print(f"quantised with {document['quantize']['calibration_images']} calibration images in "
          f"{document['quantize']['seconds']}s")
    print(f"top-1 accuracy on {acc['source']}: fp32 {acc['fp32_accuracy']:.4f}, int8 {acc['int8_accuracy']:.4f} "
          f"(agreement {acc['top1_agreement']:.4f}; largest difference of a logit {acc['max_logit_diff']:.2f}, "
          f"of a score {acc['max_score_diff']:.4f})")
    print(f"in-process, 1 thread, batch {local['fp32']['batch_size']}: fp32 {local['fp32']['throughput']:.1f} img/s, "
          f"int8 {local['int8']['throughput']:.1f} img/s")
    if http:
        for variant in VARIANTS:
            r = http[variant]
            lat = r["latency_ms"]
            rounds = " / ".join(f"{t:.1f}" for t in r["throughput_per_round"])
            print(f"service {variant}: {r['throughput']:.1f} img/s (rounds {rounds}), p50 {lat['p50'] or 0:.0f} ms, "
                  f"p95 {lat['p95'] or 0:.0f} ms, {r['errors']} errors, server CPU {r['server_cpu_ms_per_image']:.1f} "
                  f"ms/img, other load {r['other_cores_busy']:.2f} cores")
    print("\ntargets")
    for name, figure in document["targets"].items():
        verdict = "not measured" if figure["value"] is None else ("met" if figure["met"] else "not met")
        value = "-" if figure["value"] is None else f"{figure['value']:.2f}"
        print(f"  {name:<32}{value:>8}   {figure['target']:<12}{verdict}")
    reference = f"in-process speed-up {local['int8']['throughput'] / local['fp32']['throughput']:.2f}x"
    if http:
        cpu_ratio = http["fp32"]["server_cpu_ms_per_image"] / http["int8"]["server_cpu_ms_per_image"]
        reference += f"; server CPU per image fp32/int8 {cpu_ratio:.2f}x (less sensitive to other load)"
    print(f"  (for reference: {reference})")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    install_sigterm_handler()
    progress = Progress()
    from models.hardware import cpu_count

    with contextlib.ExitStack() as stack:
        home, version, quantize_report = prepare(args, stack, progress)
        accuracy = held_out_accuracy(home, version, args.data)
        progress(f"accuracy: fp32 {accuracy['fp32_accuracy']:.4f}, int8 {accuracy['int8_accuracy']:.4f} "
                 f"on {accuracy['images']} images")
        local = in_process(home, version, args.data, args, progress)
        http = None if args.skip_service else service(home, version, args, stack, progress)
    speedup = http["int8"]["throughput"] / http["fp32"]["throughput"] if http else None
    document: dict[str, Any] = {
        "version": version, "cores": cpu_count(), "quantize": quantize_report, "accuracy": accuracy,
        "in_process": local, "service": http,
        "targets": {
            "accuracy loss (pp)": {"value": accuracy["loss_pp"], "target": f"<= {MAX_ACCURACY_LOSS_PP:g}",
                                   "met": accuracy["loss_pp"] <= MAX_ACCURACY_LOSS_PP},
            "service throughput int8/fp32": {"value": speedup, "target": f">= {MIN_SERVICE_SPEEDUP:g}",
                                             "met": None if speedup is None else speedup >= MIN_SERVICE_SPEEDUP},
        },
        "config": {"concurrency": args.concurrency, "duration_s": args.duration, "warmup_s": args.warmup,
                   "rounds": args.rounds, "service_env": args.service_env, "data": str(args.data),
                   "python": platform.python_version(), "host": platform.node()},
        "wall_s": progress.elapsed,
    }
    print_report(document)
    if http and any(r["other_cores_busy"] > OTHER_LOAD_WARNING for r in http.values()):
        print(f"note: other work used more than {OTHER_LOAD_WARNING:g} cores while the services were measured; "
              "the throughput ratio is unreliable: rerun on a quieter machine")
    if args.json:
        args.json.write_text(json.dumps(document, indent=2))
        progress(f"wrote {args.json}")
    progress("finished")
    return 0


if __name__ == "__main__":
    run_main(main)
