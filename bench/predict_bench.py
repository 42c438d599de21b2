"""Prediction throughput and latency: the shipped service against the in-process limit and a
naive one-image-per-call service, measured one after another in the same run.

    .venv/bin/python -m bench.predict_bench --concurrency 32 --duration 20 --warmup 3 --rounds 2 \
        [--home DIR] [--images ../shared/data/hymenoptera/train] [--json OUT.json] [--plot OUT.png] \
        [--setups service,limit,naive,floor,keep,oip_bytes,oip_uint8] [--images-per-request 1] \
        [--service-env TRANSFER_SERVE_WORKERS=2 ...] [--log-dir DIR] [--baseline ../old-checkout]

Setups:
  service  ``bentoml serve service.service:TransferServe`` as shipped (plus any --service-env)
  limit    the same bytes decoded by models.preprocess.decode_and_crop (fast=True, as the service)
           in a thread pool (one thread per core) feeding batches of crops to the service's own
           ModelRuntime.infer (same session options, provider, variant and input path), in this
           process, no HTTP; sessions x threads layouts and batch sizes 1, 4, 8, 16, 32 are tried
           briefly and the best one is measured
  naive    ``bentoml serve bench.naive_service:Naive``: one worker, one image per onnxruntime call
           (on the provider --service-env selects; CPU by default)
  floor    ``bentoml serve bench.floor_service:Floor``: the same HTTP contract answered without
           decoding or inference: what receiving, parsing and answering a request costs. With the
           limit it gives the ceiling: the most any service with this contract could reach here
  keep     the service as shipped with TRANSFER_SERVE_KEEP_PREDICTIONS=1 (every image kept for review:
           its bytes, results and embedding queued and written by the background writer), on its
           own copy of the state directory: what keeping costs, as keep/service per round
  oip_bytes the same server as ``service``, sent POST /v2/models/transfer-serve/infer with the images as a
           binary BYTES tensor (Triton's binary tensor data extension), outputs label and probabilities
           as binary data: the Open Inference Protocol against /predict's multipart
  oip_uint8 the same, with uint8 crops the load generator made beforehand (decode_and_crop, as the
           service does) as a binary UINT8 [N, S, S, 3] tensor: a client that preprocesses itself
  baseline with ``--baseline DIR``: the service of another checkout of this project (an earlier
           commit, with its own .venv and its own bootstrapped state), measured in the same rounds
           with the same load generator: the one fair way to tell whether a change cost throughput

All setups are made ready first, then measured in turn ``--rounds`` times for
``--duration / --rounds`` seconds each (after ``--warmup`` uncounted seconds), and pooled, so a
change in the machine's other load hits them alike. The HTTP setups get ``--concurrency``
clients sending POST /predict requests back to back, single-image unless --images-per-request
says more (each image's multipart body encoded once, beforehand).

Without --home a temporary state directory is bootstrapped with the pretrained ImageNet classifier
(``python -m training bootstrap``) and removed at the end. Every server is stopped at the end, on
Ctrl-C and on errors too. Timings are printed, never judged: only the ratios of setups measured in
the same run mean something on a shared machine, and the "other load" column says when even those
were disturbed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
import queue
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import (
    ImageFile,
    LoadResult,
    LogWatch,
    MetricsDelta,
    ProcessCPU,
    Progress,
    Server,
    SystemCPU,
    add_service_arguments,
    begin,
    bootstrap_home,
    check_service_arguments,
    describe_images,
    percentiles,
    predict_load,
    run_main,
    serving,
    state_home,
)
from bench.open_inference import INFER_ROUTE, Crops, EncodedImages
from tests.support.load import Protocol as LoadProtocol
from tests.support.polling import eventually

#: What the keep setup adds to the service's environment: every image kept.
KEEP_ENV = {"TRANSFER_SERVE_KEEP_PREDICTIONS": "1"}
SETUPS = ("service", "limit", "naive", "floor", "keep", "oip_bytes", "oip_uint8")
#: The Open Inference Protocol setups: the service's own server (started for them if "service" is
#: not measured), another request format.
OIP_SETUPS = ("oip_bytes", "oip_uint8")
BATCH_SIZES = (1, 4, 8, 16, 32)
#: The issue's targets, stated at concurrency 32: service throughput >= factor x the other setup.
TARGETS = {"limit": 0.8, "naive": 2.0}
TARGET_CONCURRENCY = 32
#: Cores used by other processes (not the server, not the load generator) above which a phase
#: is flagged as disturbed.
OTHER_LOAD_WARNING = 0.3
#: Settings the naive baseline takes from --service-env: where to run, not how to serve.
PROVIDER_SETTINGS = ("TRANSFER_SERVE_PROVIDERS", "TRANSFER_SERVE_CUDA", "TRANSFER_SERVE_CUDNN",
                     "TRANSFER_SERVE_GPU")


def active_spec(home: Path) -> Any:
    """The spec of the version active in ``home`` (the crops the oip_uint8 setup sends are made with it)."""
    from store.state import open_state

    registry = open_state(home=home).registry
    pointer = registry.active_pointer()
    if pointer is None:
        raise RuntimeError(f"no active version in {home}")
    return registry.get(pointer.version).spec


# -- limit: in-process decode pool + batched onnxruntime --------------------------------------


@contextlib.contextmanager
def patched_environ(values: Mapping[str, str]) -> Iterator[None]:
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, old in saved.items():
            if old is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = old


def limit_runtimes(home: Path, service_env: Mapping[str, str], sessions: int, threads: int) -> list[Any]:
    """``sessions`` loaded copies of the service's own ModelRuntime (same session options,
    providers, graph variant and input path as the service would pick with ``service_env``),
    ``threads`` onnxruntime threads each."""
    from service.runtime import ModelRuntime
    from service.settings import Settings
    from store.state import open_state

    with patched_environ(service_env):
        settings = Settings(home=home, inference_workers=sessions, intra_op_threads=threads)
    registry = open_state(settings).registry
    runtimes = []
    for _ in range(sessions):
        runtime = ModelRuntime(settings, registry)
        runtime.refresh()
        if runtime.loaded is None:
            raise RuntimeError(f"could not load the active model version from {home} (see the log above)")
        runtimes.append(runtime)
    return runtimes


def limit_run(runtimes: Sequence[Any], images: Sequence[ImageFile], *, batch_size: int, seconds: float,
              warmup: float, decode_threads: int, probes: Sequence[Any] = ()) -> dict[str, Any]:
    """Images/s of decode threads (``models.preprocess.decode_and_crop``, the service's fast
    path) feeding ``batch_size`` batches of uint8 crops to the runtimes, one consumer thread per
    runtime calling ``ModelRuntime.infer`` as an inference worker does (normalisation, or uint8
    input and IO binding on a GPU, then softmax; onnxruntime releases the GIL).

    Throughput is measured between the first and the last batch that complete inside the
    window (images of the batches after the first / time between them), so it does not depend
    on where a long batch happens to straddle the window's edges."""
    from models.preprocess import decode_and_crop

    config = runtimes[0].loaded.spec.preprocess
    size = config.input_size
    ready: queue.Queue[np.ndarray] = queue.Queue(maxsize=2 * batch_size * len(runtimes) + decode_threads)
    stop = threading.Event()
    lock = threading.Lock()
    completions: list[float] = []
    failures: list[BaseException] = []

    def decode(first: int) -> None:
        index = first
        while not stop.is_set():
            array = decode_and_crop(images[index % len(images)].data, config, fast=True)  # as the service
            index += decode_threads
            while not stop.is_set():
                try:
                    ready.put(array, timeout=0.1)
                    break
                except queue.Full:
                    continue

    def consume(runtime: Any) -> None:
        batch = np.empty((batch_size, size, size, 3), np.uint8)
        try:
            while not stop.is_set():
                for row in range(batch_size):
                    batch[row] = ready.get(timeout=60)
                runtime.infer(batch)
                with lock:
                    completions.append(time.perf_counter())
        except queue.Empty:
            if not stop.is_set():
                failures.append(RuntimeError("the decode threads stopped producing (a bad image?)"))
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            failures.append(exc)

    workers = [threading.Thread(target=decode, args=(k,), name=f"decode-{k}", daemon=True)
               for k in range(decode_threads)]
    workers += [threading.Thread(target=consume, args=(r,), name=f"onnx-{k}", daemon=True)
                for k, r in enumerate(runtimes)]
    started = time.perf_counter()
    window_start, window_end = started + warmup, started + warmup + seconds
    for thread in workers:
        thread.start()
    try:
        time.sleep(max(0.0, window_start - time.perf_counter()))
        for probe in probes:
            probe.start()
        probed_from = time.perf_counter()

        def window_done() -> bool:  # the window is over and at least 3 batches completed in it
            if failures:
                raise failures[0]
            return time.perf_counter() >= window_end and sum(1 for c in completions if c >= window_start) >= 3

        eventually(window_done, timeout=math.inf, interval=0.05)
        probed_to = time.perf_counter()
        for probe in probes:
            probe.stop()
    finally:
        stop.set()
        for thread in workers:
            thread.join(timeout=10)
    with lock:
        inside = sorted(c for c in completions if window_start <= c <= max(window_end, probed_to))
        probed_batches = sum(1 for c in completions if probed_from <= c <= probed_to)
    span = inside[-1] - inside[0]
    images_done = (len(inside) - 1) * batch_size
    return {"batch_size": batch_size, "sessions": len(runtimes), "throughput": images_done / span,
            "images": images_done, "seconds": span, "batches": len(inside),
            "probed_seconds": probed_to - probed_from, "probed_images": probed_batches * batch_size}


@dataclass
class Limit:
    """The in-process setup, ready to measure: runtimes loaded, best layout and batch size."""

    runtimes: list[Any]
    batch_size: int
    decode_threads: int
    sweep: list[dict[str, Any]]


def prepare_limit(home: Path, images: Sequence[ImageFile], args: argparse.Namespace,
                  progress: Progress) -> Limit:
    """Sweep both ways to use every core (one session with a thread per core, or a
    single-thread session per core) and the batch sizes; keep the fastest."""
    from models.hardware import cpu_count

    cores = cpu_count()
    decode_threads = cores
    sweep = []
    layouts = {(1, cores): limit_runtimes(home, args.service_env, 1, cores)}
    if cores > 1:
        layouts[(cores, 1)] = limit_runtimes(home, args.service_env, cores, 1)
    first = next(iter(layouts.values()))[0]
    progress(f"limit: {first.loaded.version} on {', '.join(first.loaded.providers)}, {decode_threads} decode "
             f"threads; sweep of sessions x threads {list(layouts)} and batch sizes, {args.sweep_seconds:g}s each")
    for (sessions, threads), runtimes in layouts.items():
        for batch_size in BATCH_SIZES:
            cpu, machine = ProcessCPU(tree=False, root_label="this process"), SystemCPU()
            figures = limit_run(runtimes, images, batch_size=batch_size, seconds=args.sweep_seconds,
                                warmup=1.0, decode_threads=decode_threads, probes=[cpu, machine])
            used = sum(cpu.seconds().values())
            figures["threads_per_session"] = threads
            figures["cpu_ms_per_image"] = 1000 * used / max(figures["probed_images"], 1)
            figures["other_cores_busy"] = max(0.0, machine.busy_seconds() - used) / figures["probed_seconds"]
            sweep.append(figures)
            progress(f"limit: {sessions}x{threads} batch {batch_size:2d}: {figures['throughput']:.1f} img/s "
                     f"(other load {figures['other_cores_busy']:.2f} cores)")
    best = max(sweep, key=lambda f: f["throughput"])
    return Limit(layouts[(best["sessions"], best["threads_per_session"])], best["batch_size"], decode_threads, sweep)


@dataclass
class Tally:
    """One setup's measurements, pooled over the rounds."""

    name: str
    images: int = 0
    seconds: float = 0.0  # the time the throughput is counted over
    probed_seconds: float = 0.0  # the time the CPU probes spanned
    probed_images: int = 0  # the images completed in that time
    latencies_ms: list[float] = field(default_factory=list)
    errors: int = 0
    error_samples: list[str] = field(default_factory=list)
    cpu_by_process: dict[str, float] = field(default_factory=dict)
    client_cpu: float | None = None
    machine_busy: float = 0.0
    metrics: dict[str, float] | None = None
    log_lines: int = 0
    log_samples: list[str] = field(default_factory=list)
    per_round: list[float] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def add_cpu(self, by_process: Mapping[str, float]) -> None:
        for label, used in by_process.items():
            self.cpu_by_process[label] = self.cpu_by_process.get(label, 0.0) + used

    def figures(self) -> dict[str, Any]:
        done = max(self.probed_images, 1)
        server = sum(self.cpu_by_process.values())
        client = self.client_cpu or 0.0
        probed = self.probed_seconds or 1.0
        figures: dict[str, Any] = {
            "setup": self.name,
            "throughput": self.images / self.seconds if self.seconds else 0.0,
            "images": self.images, "seconds": self.seconds, "throughput_per_round": self.per_round,
            "latency_ms": {**percentiles(self.latencies_ms),
                           "mean": float(np.mean(self.latencies_ms)) if self.latencies_ms else None},
            "errors": self.errors, "error_samples": self.error_samples,
            "cpu": {
                "server_ms_per_image": 1000 * server / done,
                "server_cores_busy": server / probed,
                "by_process_ms_per_image": {k: 1000 * v / done for k, v in sorted(self.cpu_by_process.items())},
                "load_generator_ms_per_image": None if self.client_cpu is None else 1000 * client / done,
                "other_cores_busy": max(0.0, self.machine_busy - server - client) / probed,
            },
            **self.extra,
        }
        if self.metrics is not None:
            m = self.metrics

            def mean_ms(key: str) -> float | None:
                return 1000 * m[f"{key}_sum"] / m[f"{key}_count"] if m[f"{key}_count"] else None

            figures["server_metrics"] = {
                "predict_mean_ms": mean_ms("predict"), "infer_call_mean_ms": mean_ms("infer"),
                "batches": m["batch_count"],
                "mean_batch_size": m["batch_sum"] / m["batch_count"] if m["batch_count"] else None,
                "kept": m["kept"], "kept_dropped": m["kept_dropped"],
            }
            figures["server_log"] = {"warnings_and_errors": self.log_lines, "samples": self.log_samples}
        return figures


def measure_limit_round(tally: Tally, limit: Limit, images: Sequence[ImageFile], seconds: float,
                        args: argparse.Namespace) -> float:
    cpu = ProcessCPU(tree=False, root_label="this process")
    machine = SystemCPU()
    run = limit_run(limit.runtimes, images, batch_size=limit.batch_size, seconds=seconds, warmup=args.warmup,
                    decode_threads=limit.decode_threads, probes=[cpu, machine])
    tally.images += run["images"]
    tally.seconds += run["seconds"]
    tally.probed_seconds += run["probed_seconds"]
    tally.probed_images += run["probed_images"]
    tally.add_cpu(cpu.seconds())
    tally.machine_busy += machine.busy_seconds()
    tally.per_round.append(run["throughput"])
    return float(run["throughput"])


def measure_http_round(tally: Tally, server: Server, images: Sequence[ImageFile], seconds: float,
                       args: argparse.Namespace, progress: Progress, label: str, *,
                       protocol: LoadProtocol | None = None) -> float:
    server_cpu = ProcessCPU(server.process.pid)
    client_cpu = ProcessCPU(tree=False, root_label="load generator")
    metrics = MetricsDelta(server.url)
    log_watch = LogWatch(server.log_path)
    machine = SystemCPU()
    result: LoadResult = asyncio.run(predict_load(
        server.url, images, concurrency=args.concurrency, duration=seconds, warmup=args.warmup,
        images_per_request=args.images_per_request, probes=[machine, server_cpu, client_cpu, metrics, log_watch],
        progress=progress, label=label, route="/predict" if protocol is None else INFER_ROUTE, protocol=protocol))
    tally.images += result.images
    tally.seconds += result.seconds
    tally.probed_seconds += result.seconds
    tally.probed_images += result.images
    tally.latencies_ms += result.latencies_ms
    tally.errors += result.errors
    tally.error_samples += result.error_samples[: max(0, 5 - len(tally.error_samples))]
    tally.add_cpu(server_cpu.seconds())
    tally.client_cpu = (tally.client_cpu or 0.0) + client_cpu.seconds().get("load generator", 0.0)
    tally.machine_busy += machine.busy_seconds()
    deltas = {
        "predict_sum": metrics.delta("request_duration_seconds_sum", endpoint="/predict"),
        "predict_count": metrics.delta("request_duration_seconds_count", endpoint="/predict"),
        # the internal calls: /infer, or /infer_with_embeddings while predictions are kept
        **{f"infer_{part}": sum(metrics.delta(f"request_duration_seconds_{part}", endpoint=endpoint)
                                for endpoint in ("/infer", "/infer_with_embeddings")) for part in ("sum", "count")},
        "batch_sum": metrics.delta("adaptive_batch_size_sum"),
        "batch_count": metrics.delta("adaptive_batch_size_count"),
        # kept predictions (the keep setup): written, and dropped for any reason, in the window
        "kept": metrics.delta("kept_predictions_total", outcome="kept"),
        "kept_dropped": sum(metrics.delta("kept_predictions_total", outcome=outcome)
                            for outcome in ("dropped_queue_full", "dropped_storage", "dropped_error")),
    }
    tally.metrics = {k: (tally.metrics or {}).get(k, 0.0) + v for k, v in deltas.items()}
    tally.log_lines += log_watch.count
    new_samples = [s for s in log_watch.samples if s not in tally.log_samples]
    tally.log_samples += new_samples[: max(0, 5 - len(tally.log_samples))]
    tally.per_round.append(result.throughput)
    return result.throughput


# -- report -----------------------------------------------------------------------------------


def _fmt(value: float | None, spec: str = ".0f") -> str:
    return "-" if value is None else format(value, spec)


def ratios(results: Mapping[str, dict[str, Any]], concurrency: int) -> dict[str, Any]:
    out = {}
    if "service" in results and "baseline" in results and results["baseline"]["throughput"]:
        out["service/baseline"] = {"ratio": results["service"]["throughput"] / results["baseline"]["throughput"]}
    for other in ("keep", *OIP_SETUPS):  # the same service, another load on it
        if "service" in results and other in results and results["service"]["throughput"]:
            pairs = zip(results[other]["throughput_per_round"], results["service"]["throughput_per_round"],
                        strict=False)
            out[f"{other}/service"] = {"ratio": results[other]["throughput"] / results["service"]["throughput"],
                                       "per_round": [mine / plain for mine, plain in pairs if plain]}
    for other, target in TARGETS.items():
        ratio = None
        if "service" in results and other in results and results[other]["throughput"]:
            ratio = results["service"]["throughput"] / results[other]["throughput"]
        out[f"service/{other}"] = {
            "ratio": ratio, "target": target,
            "met": None if ratio is None else ratio >= target,
            "at_target_concurrency": concurrency == TARGET_CONCURRENCY,
        }
    return out


def ceiling(results: Mapping[str, dict[str, Any]], cores: int) -> dict[str, Any] | None:
    """The most any service with this HTTP contract could do here: the limit's CPU per image
    (decoding and inference), plus the floor's (receiving the request, parsing the upload,
    answering), plus the lightest load generator's measured in this run (it runs on the same
    cores), with every core busy all the time. An upper bound: it charges nothing for handing
    images from the HTTP side to a batch, nor for the batching itself."""
    if "limit" not in results or "floor" not in results:
        return None
    clients = [r["cpu"]["load_generator_ms_per_image"] for r in results.values()
               if r["cpu"]["load_generator_ms_per_image"] is not None]
    work = results["limit"]["cpu"]["server_ms_per_image"]
    request = results["floor"]["cpu"]["server_ms_per_image"]
    client = min(clients)
    throughput = 1000 * cores / (work + request + client)
    figure = {"throughput": throughput, "work_ms_per_image": work, "request_ms_per_image": request,
              "load_generator_ms_per_image": client, "cores": cores,
              "of_limit": throughput / results["limit"]["throughput"]}
    if "naive" in results and results["naive"]["throughput"]:
        figure["of_naive"] = throughput / results["naive"]["throughput"]
    return figure


def print_report(results: Mapping[str, dict[str, Any]], failures: Mapping[str, str], summary: Mapping[str, Any],
                 args: argparse.Namespace) -> None:
    print()
    rounds = f" in {args.rounds} rounds ({args.warmup:g}s warm-up each)" if args.rounds > 1 else \
        f" after {args.warmup:g}s warm-up"
    per_request = "single-image requests" if args.images_per_request == 1 else \
        f"{args.images_per_request} images per request"
    print(f"prediction benchmark: concurrency {args.concurrency}, {per_request}, "
          f"{args.duration:g}s measured per setup{rounds}, "
          f"{summary['cores']} cores, {summary['images']}")
    header = (f"{'setup':<14}{'img/s':>8}{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}{'errors':>8}"
              f"{'CPU ms/img':>12}{'cores busy':>12}{'other load':>12}")
    print(header)
    print("-" * len(header))
    for name in args.setups:
        if name in failures:
            print(f"{name:<14}failed: {failures[name]}")
            continue
        r = results[name]
        label = f"limit ({r['sessions']}x{r['intra_op_threads']}, b={r['batch_size']})" if name == "limit" else name
        lat = r["latency_ms"]
        print(f"{label:<14}{r['throughput']:>8.1f}{_fmt(lat['p50']):>9}{_fmt(lat['p95']):>9}{_fmt(lat['p99']):>9}"
              f"{r['errors']:>8}{r['cpu']['server_ms_per_image']:>12.1f}{r['cpu']['server_cores_busy']:>12.2f}"
              f"{r['cpu']['other_cores_busy']:>12.2f}")
    print("(CPU ms/img, cores busy: CPU time of the server's processes, or of this process for limit, in the "
          "measured window;\n other load: cores busy with anything but those and the load generator)")
    disturbed = [n for n in results if results[n]["cpu"]["other_cores_busy"] > OTHER_LOAD_WARNING]
    if disturbed:
        print(f"note: other work used more than {OTHER_LOAD_WARNING:g} cores during {', '.join(disturbed)}; "
              "those figures and the ratios involving them are unreliable: rerun on a quieter machine")

    if args.rounds > 1:
        print("img/s per round: " + "   ".join(
            f"{name}: {' / '.join(f'{t:.1f}' for t in results[name]['throughput_per_round'])}" for name in results))
    if "limit" in results:
        sweep = "  ".join(f"{f['sessions']}x{f['threads_per_session']} b={f['batch_size']}: {f['throughput']:.1f}"
                          for f in results["limit"]["sweep"])
        print(f"\nlimit, sweep of sessions x threads and batch size ({args.sweep_seconds:g}s each, img/s): {sweep}")
        busy = [f"b={f['batch_size']}" for f in results["limit"]["sweep"] if f["other_cores_busy"] > OTHER_LOAD_WARNING]
        if busy:
            print(f"note: other work used more than {OTHER_LOAD_WARNING:g} cores during the sweep at "
                  f"{', '.join(busy)}; "
                  "the batch size chosen may not be the best")
    for name in ("service", "keep", "naive", "floor"):
        if name not in results:
            continue
        r = results[name]
        cpu = "  ".join(f"{k}: {v:.1f}" for k, v in r["cpu"]["by_process_ms_per_image"].items())
        m = r["server_metrics"]
        print(f"\n{name}: server CPU ms/img by process: {cpu}; load generator: "
              f"{r['cpu']['load_generator_ms_per_image']:.1f}")
        line = f"{name}: mean /predict time in the server {_fmt(m['predict_mean_ms'])} ms"
        if m["infer_call_mean_ms"] is not None:
            line += (f"; mean /infer call (batch wait + run) {_fmt(m['infer_call_mean_ms'])} ms; "
                     f"{m['batches']:.0f} batches, mean size {_fmt(m['mean_batch_size'], '.1f')}")
        if m["kept"] or m["kept_dropped"]:
            line += f"; kept for review {m['kept']:.0f}, dropped {m['kept_dropped']:.0f}"
        print(line)
        if r["server_log"]["warnings_and_errors"]:
            print(f"{name}: {r['server_log']['warnings_and_errors']} warning/error lines in the server log "
                  "during the window, e.g.:")
            for sample in r["server_log"]["samples"]:
                print(f"  {sample}")
        if r["error_samples"]:
            print(f"{name}: first errors:")
            for sample in r["error_samples"]:
                print(f"  {sample}")

    print("\nthroughput ratios")
    for key, figure in summary["ratios"].items():
        ratio, target = figure["ratio"], figure.get("target")
        if target is None:  # a comparison, not a target
            rounds = figure.get("per_round")
            print(f"  {key:<17}{_fmt(ratio, '.3f'):>6}"
                  + (f"   per round: {' / '.join(f'{r:.3f}' for r in rounds)}" if rounds else ""))
            continue
        verdict = "not measured" if ratio is None else ("met" if figure["met"] else "not met")
        print(f"  {key:<17}{_fmt(ratio, '.2f'):>6}   target >= {target:g}   {verdict}")
    top = summary.get("ceiling")
    if top is not None:
        reach = f"{top['of_limit']:.2f} x limit" + (f", {top['of_naive']:.2f} x naive" if "of_naive" in top else "")
        print(f"\nceiling for any service with this contract: {top['throughput']:.1f} img/s = {reach}\n"
              f"  ({top['cores']} cores / (limit's decoding + inference {top['work_ms_per_image']:.1f} + "
              f"floor's request "
              f"handling {top['request_ms_per_image']:.1f} + load generator {top['load_generator_ms_per_image']:.1f} "
              "CPU ms/img); nothing charged for batching\n"
              "  or for handing images to it: a ratio target above this cannot be met with these requests here")
    if args.concurrency != TARGET_CONCURRENCY:
        print(f"  (the targets are stated at concurrency {TARGET_CONCURRENCY}; this run used {args.concurrency})")


def write_plot(path: Path, results: Mapping[str, dict[str, Any]], args: argparse.Namespace,
               top: Mapping[str, Any] | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in args.setups if n in results]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    labels = [f"limit (b={results[n]['batch_size']})" if n == "limit" else n for n in names]
    values = [results[n]["throughput"] for n in names]
    bars = left.bar(labels, values, color=["#4477aa", "#228833", "#cc6677", "#aaaa00"][: len(names)])
    left.bar_label(bars, fmt="%.1f")
    if top is not None:
        left.axhline(top["throughput"], color="black", linestyle="--", linewidth=1,
                     label=f"ceiling for any service: {top['throughput']:.1f}")
        left.legend(loc="upper left")
    left.set_ylabel("images / s")
    left.set_title(f"throughput (concurrency {args.concurrency})")
    with_latency = [n for n in names if results[n]["latency_ms"]["p50"] is not None]
    width = 0.8 / max(len(with_latency), 1)
    for offset, name in enumerate(with_latency):
        lat = results[name]["latency_ms"]
        xs = np.arange(3) + offset * width
        right.bar(xs, [lat["p50"], lat["p95"], lat["p99"]], width, label=name)
    right.set_xticks(np.arange(3) + width * (len(with_latency) - 1) / 2, ["p50", "p95", "p99"])
    right.set_ylabel("ms")
    right.set_title("request latency")
    if with_latency:
        right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- command line -----------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, default=32, help="concurrent HTTP clients (default 32)")
    parser.add_argument("--duration", type=float, default=20, help="measured seconds per setup (default 20)")
    parser.add_argument("--images-per-request", type=int, default=1,
                        help="images in each HTTP request (default 1: the targets are stated for single-image "
                        "requests; more shows what the per-request cost is)")
    parser.add_argument("--warmup", type=float, default=3, help="uncounted seconds before each measurement (default 3)")
    parser.add_argument("--rounds", type=int, default=2,
                        help="measure the setups in turn this many times, --duration/rounds seconds each, "
                        "and pool the figures (default 2)")
    parser.add_argument("--sweep-seconds", type=float, default=5,
                        help="seconds per batch size in the limit's sweep (default 5)")
    add_service_arguments(parser)
    parser.add_argument("--setups", default=",".join(SETUPS), help="comma-separated subset of " + ",".join(SETUPS))
    parser.add_argument("--baseline", type=Path, help="another checkout of this project, with its own .venv: its "
                        "service is measured too, as the setup 'baseline' (e.g. a `git worktree` of the last release)")
    parser.add_argument("--json", type=Path, help="write every figure to this JSON file")
    parser.add_argument("--plot", type=Path, help="write a PNG chart (throughput, latency percentiles)")
    args = parser.parse_args(argv)
    args.setups = [s.strip() for s in args.setups.split(",") if s.strip()]
    unknown = set(args.setups) - set(SETUPS)
    if unknown or not args.setups:
        parser.error(f"--setups takes a subset of {','.join(SETUPS)}; got {sorted(unknown) or 'nothing'}")
    check_service_arguments(parser, args)
    if args.baseline is not None:
        if not (args.baseline / ".venv/bin/bentoml").is_file() or not (args.baseline / "service").is_dir():
            parser.error(f"--baseline {args.baseline} is not a checkout of this project with a .venv "
                         "(run `bash scripts/test --collect-only -q` there once to create it)")
        args.setups.append("baseline")
    if args.images_per_request < 1:
        parser.error("--images-per-request must be at least 1")
    if args.concurrency < 1 or args.duration <= 0 or args.warmup < 0 or args.sweep_seconds <= 0 or args.rounds < 1:
        parser.error("--concurrency >= 1, --duration > 0, --warmup >= 0, --sweep-seconds > 0 and --rounds >= 1 "
                     "are required")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    progress, images = begin(args.images)
    from models.hardware import cpu_count

    failures: dict[str, str] = {}
    tallies: dict[str, Tally] = {}
    with contextlib.ExitStack() as stack:
        home = stack.enter_context(state_home(args.home, progress))
        if args.log_dir is None:
            log_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-logs-")))
        else:
            log_dir = args.log_dir
            log_dir.mkdir(parents=True, exist_ok=True)
        # the naive baseline runs on the same device as the service, nothing else is shared
        provider_env = {k: v for k, v in args.service_env.items() if k.startswith(PROVIDER_SETTINGS)}
        targets = {"service": ("service.service:TransferServe", args.service_env),
                   "naive": ("bench.naive_service:Naive", provider_env),
                   "floor": ("bench.floor_service:Floor", {}),
                   "keep": ("service.service:TransferServe", {**args.service_env, **KEEP_ENV})}
        if args.baseline is not None:
            baseline = args.baseline.resolve()
            baseline_home = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-baseline-")))
            progress(f"baseline: bootstrapping with {baseline}'s own code ...")
            bootstrap_home(baseline_home, python=str(baseline / ".venv/bin/python"), checkout=baseline)

        # Every setup is made ready first (servers started, limit's batch size chosen), then the
        # measurements alternate between them round after round, so that a change in what else
        # runs on the machine affects all of them alike rather than one.
        servers: dict[str, Server] = {}
        protocols: dict[str, LoadProtocol] = {}
        limit: Limit | None = None
        for name in args.setups:
            try:
                if name == "limit":
                    limit = prepare_limit(home, images, args, progress)
                elif name in OIP_SETUPS:
                    if "service" not in servers:
                        target, env = targets["service"]
                        progress(f"{name}: starting `bentoml serve {target}`")
                        servers["service"] = stack.enter_context(serving(target, home, log_dir, env=env))
                    servers[name] = servers["service"]
                    protocols[name] = EncodedImages() if name == "oip_bytes" else Crops(active_spec(home))
                elif name == "baseline":
                    progress(f"baseline: starting {baseline}'s service" + (f" with {args.service_env}"
                                                                        if args.service_env else ""))
                    servers[name] = stack.enter_context(serving(
                        "service.service:TransferServe", baseline_home, log_dir, env=args.service_env,
                        checkout=baseline, log_name="baseline.log"))
                    progress(f"{name}: ready at {servers[name].url}")
                elif name == "keep":  # its own copy of the state: the kept predictions stay out of the others'
                    keep_home = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-keep-"))) / "home"
                    shutil.copytree(home, keep_home)
                    target, env = targets[name]
                    progress(f"keep: starting `bentoml serve {target}` with TRANSFER_SERVE_KEEP_PREDICTIONS=1")
                    servers[name] = stack.enter_context(serving(target, keep_home, log_dir, env=env,
                                                                log_name="keep.log"))
                    progress(f"{name}: ready at {servers[name].url}")
                else:
                    target, env = targets[name]
                    shown = " ".join(f"{k}={v}" for k, v in env.items())
                    progress(f"{name}: starting `bentoml serve {target}`" + (f" with {shown}" if shown else ""))
                    servers[name] = stack.enter_context(serving(target, home, log_dir, env=env))
                    progress(f"{name}: ready at {servers[name].url}")
            except Exception as exc:  # noqa: BLE001 - any failure of a setup is reported; the others are measured
                failures[name] = f"{type(exc).__name__}: {exc}"
                progress(f"{name}: FAILED: {failures[name]}")
            else:
                tallies[name] = Tally(name)

        seconds = args.duration / args.rounds
        for round_index in range(args.rounds):
            for name in list(tallies):
                label = name if args.rounds == 1 else f"{name} (round {round_index + 1}/{args.rounds})"
                progress(f"{label}: {args.warmup:g}s warm-up, then {seconds:g}s measured"
                         + (f" at batch size {limit.batch_size}" if name == "limit" and limit else
                            f" with {args.concurrency} clients"))
                try:
                    if name == "limit" and limit is not None:
                        throughput = measure_limit_round(tallies[name], limit, images, seconds, args)
                    else:
                        throughput = measure_http_round(tallies[name], servers[name], images, seconds, args,
                                                        progress, label, protocol=protocols.get(name))
                except Exception as exc:  # noqa: BLE001 - reported, the setup dropped, the others measured
                    failures[name] = f"{type(exc).__name__}: {exc}"
                    progress(f"{label}: FAILED: {failures[name]}")
                    del tallies[name]
                else:
                    progress(f"{label}: {throughput:.1f} img/s")
        progress("stopping the servers")

    results = {name: tally.figures() for name, tally in tallies.items()}
    if limit is not None and "limit" in results:
        results["limit"].update(
            batch_size=limit.batch_size, sweep=limit.sweep, providers=list(limit.runtimes[0].loaded.providers),
            sessions=len(limit.runtimes),
            intra_op_threads=limit.runtimes[0].settings.intra_op_threads, decode_threads=limit.decode_threads)
    summary: dict[str, Any] = {
        "cores": cpu_count(), "images": describe_images(images),
        "ratios": ratios(results, args.concurrency),
        "ceiling": ceiling(results, cpu_count()),
    }
    print_report(results, failures, summary, args)
    if args.json:
        import onnxruntime

        document = {
            "config": {"concurrency": args.concurrency, "images_per_request": args.images_per_request,
                       "duration_s": args.duration, "warmup_s": args.warmup,
                       "rounds": args.rounds,
                       "sweep_seconds": args.sweep_seconds, "setups": args.setups,
                       "service_env": args.service_env, "images": str(args.images), "cores": cpu_count(),
                       "python": platform.python_version(), "onnxruntime": onnxruntime.__version__,
                       "host": platform.node()},
            "results": results, "failures": failures, "ratios": summary["ratios"], "ceiling": summary["ceiling"],
            "wall_s": progress.elapsed,
        }
        args.json.write_text(json.dumps(document, indent=2))
        progress(f"wrote {args.json}")
    if args.plot and results:
        write_plot(args.plot, results, args, summary["ceiling"])
        progress(f"wrote {args.plot}")
    progress("finished")
    return 1 if failures else 0


if __name__ == "__main__":
    run_main(main)
