"""Soak: a long, bounded run of single-image predictions against the shipped service, watching
errors and the memory (RSS) of every serving process for a growth trend.

    .venv/bin/python -m bench.soak [--requests 20000] [--concurrency 64] [--warmup-requests 256] \
        [--images ../shared/data/hymenoptera/train] [--home DIR] [--service-env KEY=VALUE ...] \
        [--sample-seconds 2] [--json OUT.json] [--plot OUT.png] [--log-dir DIR]

``--concurrency`` clients send ``POST /predict`` requests with one real photo each, back to back,
until ``--requests`` have been answered (after ``--warmup-requests`` uncounted ones, so that
one-off allocations such as onnxruntime's arenas and the import of lazily loaded modules are in
the baseline). Any answer other than a 200 with one well-formed prediction is an error; errors
are counted and the first distinct bodies printed. The resident memory of every process of the
``bentoml serve`` tree (the supervisor, each HTTP worker, each inference worker) is sampled every
``--sample-seconds`` seconds together with the number of requests answered so far. The report
gives, per process: RSS when the server became ready, at the start of the counted requests, at
the end, the largest seen, and the trend: the slope of a least-squares line through the samples
of the second half of the run, in MB per 1000 requests (the first half is left out because
allocators and caches settle there). A leak shows as a steady positive slope; noise on a shared
machine is a fraction of a MB either way.

Without --home a temporary state directory is bootstrapped with the pretrained ImageNet
classifier and removed at the end. The server is stopped at the end, on errors, on Ctrl-C and on
SIGTERM. Nothing is judged: the figures are printed (stdout) with progress on stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import platform
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import (
    ImageFile,
    LogWatch,
    add_service_arguments,
    begin,
    check_service_arguments,
    describe_images,
    percentiles,
    serving,
    state_home,
)
from tests.support.load import Answer, Load
from tests.support.workers import process_label

MB = 1024 * 1024


# -- load: a fixed number of requests, every answer kept (tests.support.load) -----------------------


def summarise(answers: Sequence[Answer], *, origin: float, max_samples: int = 5) -> dict[str, Any]:
    """Throughput, latency percentiles of the successful requests, and the errors: counted by
    kind (status or exception type) with the first distinct bodies; ``origin`` is the moment
    (perf_counter) that the errors' times are given from."""
    ok = [a for a in answers if a.ok]
    failed = [a for a in answers if not a.ok]
    seconds = (max(a.done for a in answers) - min(a.sent for a in answers)) if answers else 0.0
    latencies = [a.latency_ms for a in ok]
    kinds: dict[str, int] = {}
    samples: list[str] = []
    for answer in failed:
        kind = f"HTTP {answer.status}" if answer.status is not None else (answer.problem or "").split(":")[0]
        kinds[kind] = kinds.get(kind, 0) + 1
        if answer.problem not in samples and len(samples) < max_samples:
            samples.append(answer.problem or "")
    return {
        "requests": len(answers), "ok": len(ok), "errors": len(failed), "errors_by_kind": kinds,
        "error_samples": samples, "seconds": seconds,
        "first_errors": [{"at_s": round(a.done - origin, 3), "after_ms": round(a.latency_ms, 1), "problem": a.problem}
                         for a in failed[:20]],
        "throughput": len(ok) / seconds if seconds else 0.0,
        "latency_ms": {**percentiles(latencies, (50, 95, 99)),
                       "max": max(latencies) if latencies else None,
                       "mean": float(np.mean(latencies)) if latencies else None},
    }


# -- memory: RSS of every process of the server, sampled in a thread ------------------------------


@dataclass
class MemorySample:
    elapsed: float  # seconds since sampling started
    answered: int  # requests answered so far (warm-up included)
    rss_mb: dict[str, float]  # by process label
    pids: dict[str, int]


class RssSampler:
    """Samples the RSS of ``pid`` (labelled ``arbiter``) and all its descendants every
    ``interval`` seconds, in a daemon thread, with ``answered()`` at that moment."""

    def __init__(self, pid: int, answered: Callable[[], int], interval: float = 2.0) -> None:
        self.pid = pid
        self.answered = answered
        self.interval = interval
        self.samples: list[MemorySample] = []
        self._started = time.perf_counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def sample(self) -> MemorySample:
        import psutil

        rss: dict[str, float] = {}
        pids: dict[str, int] = {}
        root = psutil.Process(self.pid)
        for process in [root, *root.children(recursive=True)]:
            with contextlib.suppress(psutil.Error):
                label = "arbiter" if process.pid == self.pid else process_label(process)
                rss[label] = rss.get(label, 0.0) + process.memory_info().rss / MB
                pids[label] = process.pid
        taken = MemorySample(time.perf_counter() - self._started, self.answered(), rss, pids)
        self.samples.append(taken)
        return taken

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            with contextlib.suppress(Exception):  # a process gone between listing and reading
                self.sample()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def slope_per_1000(samples: Sequence[MemorySample], label: str) -> float | None:
    """Least-squares slope of RSS (MB) against requests answered (thousands) for ``label``."""
    points = [(s.answered / 1000, s.rss_mb[label]) for s in samples if label in s.rss_mb]
    if len(points) < 3 or points[-1][0] - points[0][0] <= 0:
        return None
    x, y = np.array(points).T
    return float(np.polyfit(x, y, 1)[0])


def memory_report(samples: Sequence[MemorySample], ready: MemorySample, start: MemorySample,
                  end: MemorySample) -> dict[str, dict[str, Any]]:
    """Per process (and ``total``): RSS at ready, start, end, max, and the second-half trend."""
    second_half_from = start.answered + (end.answered - start.answered) / 2
    in_run = [s for s in samples if start.answered <= s.answered <= end.answered]
    second_half = [s for s in in_run if s.answered >= second_half_from]
    labels = sorted({label for s in (ready, start, end, *in_run) for label in s.rss_mb},
                    key=lambda name: (name != "arbiter", name))
    report: dict[str, dict[str, Any]] = {}
    for label in labels:
        pids = sorted({s.pids[label] for s in (start, *in_run, end) if label in s.pids})
        report[label] = {
            "pids": pids,
            "ready_mb": ready.rss_mb.get(label), "start_mb": start.rss_mb.get(label),
            "end_mb": end.rss_mb.get(label),
            "max_mb": max((s.rss_mb[label] for s in in_run if label in s.rss_mb), default=None),
            "trend_mb_per_1000": slope_per_1000(second_half, label),
        }
    totals = [MemorySample(s.elapsed, s.answered, {"total": sum(s.rss_mb.values())}, {}) for s in second_half]
    report["total"] = {
        "pids": [], "ready_mb": sum(ready.rss_mb.values()), "start_mb": sum(start.rss_mb.values()),
        "end_mb": sum(end.rss_mb.values()),
        "max_mb": max((sum(s.rss_mb.values()) for s in in_run), default=None),
        "trend_mb_per_1000": slope_per_1000(totals, "total"),
    }
    return report


# -- the run ----------------------------------------------------------------------------------------


async def soak(url: str, images: Sequence[ImageFile], sampler_pid: int, args: argparse.Namespace,
               progress: Callable[[str], None]) -> tuple[Load, list[MemorySample], dict[str, MemorySample]]:
    load = Load(url, images, clients=args.concurrency, timeout=args.timeout)
    sampler = RssSampler(sampler_pid, lambda: load.answered, args.sample_seconds)
    marks = {"ready": sampler.sample()}
    warmed = asyncio.Event()
    total = args.warmup_requests + args.requests

    async def watch() -> None:
        last = time.perf_counter()
        while load.answered < total:
            await asyncio.sleep(0.2)
            if not warmed.is_set() and load.answered >= args.warmup_requests:
                marks["start"] = await asyncio.to_thread(sampler.sample)
                warmed.set()
                progress(f"warm-up done ({args.warmup_requests} requests); counting {args.requests}")
            if time.perf_counter() - last >= args.progress_seconds:
                last = time.perf_counter()
                counted = load.answers[args.warmup_requests:]
                errors = sum(not a.ok for a in counted)
                recent = [a for a in load.answers if a.done >= time.perf_counter() - args.progress_seconds]
                memory = sampler.samples[-1].rss_mb if sampler.samples else {}
                progress(f"{max(0, load.answered - args.warmup_requests)}/{args.requests} answered, "
                         f"{errors} errors, {len(recent) / args.progress_seconds:.1f} req/s now, "
                         f"RSS {sum(memory.values()):.0f} MB in all")

    sampler.start()
    try:
        await asyncio.gather(watch(), load.run(total=total))
    finally:
        sampler.stop()
    marks["end"] = sampler.sample()
    if "start" not in marks:  # --warmup-requests 0
        marks["start"] = marks["ready"]
    return load, sampler.samples, marks


def print_report(result: dict[str, Any]) -> None:
    figures = result["load"]
    latency = figures["latency_ms"]
    config = result["config"]
    print(f"\nsoak: {figures['requests']} single-image POST /predict at concurrency {config['concurrency']} "
          f"({config['warmup_requests']} warm-up requests before, not counted); {result['images']}")
    print(f"\n{'requests':>9} {'ok':>7} {'errors':>7} {'seconds':>8} {'req/s':>7} {'p50 ms':>8} {'p95 ms':>8} "
          f"{'p99 ms':>8} {'max ms':>8}")

    def ms(value: float | None) -> str:
        return f"{value:8.0f}" if value is not None else f"{'-':>8}"

    print(f"{figures['requests']:>9} {figures['ok']:>7} {figures['errors']:>7} {figures['seconds']:>8.1f} "
          f"{figures['throughput']:>7.1f} {ms(latency['p50'])} {ms(latency['p95'])} {ms(latency['p99'])} "
          f"{ms(latency['max'])}")
    if figures["errors"]:
        kinds = ", ".join(f"{kind}: {n}" for kind, n in figures["errors_by_kind"].items())
        print(f"\nerrors by kind: {kinds}; first bodies:")
        for sample in figures["error_samples"]:
            print(f"  {sample}")

    print(f"\nRSS (MB)                    {'ready':>7} {'start':>7} {'end':>7} {'max':>7} {'end-start':>9} "
          f"{'trend MB/1k req (2nd half)':>27}  pids")
    for label, row in result["memory"].items():
        def mb(value: float | None) -> str:
            return f"{value:7.1f}" if value is not None else f"{'-':>7}"

        known = row["end_mb"] is not None and row["start_mb"] is not None
        growth = (row["end_mb"] - row["start_mb"]) if known else None
        trend = row["trend_mb_per_1000"]
        restarted = "  (replaced during the run)" if len(row["pids"]) > 1 else ""
        print(f"{label:<27} {mb(row['ready_mb'])} {mb(row['start_mb'])} {mb(row['end_mb'])} {mb(row['max_mb'])} "
              f"{(f'{growth:+9.1f}' if growth is not None else f'{chr(45):>9}')} "
              f"{(f'{trend:+27.3f}' if trend is not None else f'{chr(45):>27}')}  "
              f"{','.join(map(str, row['pids']))}{restarted}")
    logs = result["server_log"]
    print(f"\nserver log during the run: {logs['warnings_and_errors']} warning/error lines"
          + ("".join(f"\n  {line}" for line in logs["samples"]) if logs["samples"] else ""))


def write_plot(path: Path, samples: Sequence[MemorySample], marks: Mapping[str, MemorySample]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = sorted({label for s in samples for label in s.rss_mb}, key=lambda name: (name != "arbiter", name))
    fig, ax = plt.subplots(figsize=(10, 4.5))
    for label in labels:
        points = [(s.answered, s.rss_mb[label]) for s in samples if label in s.rss_mb]
        ax.plot(*zip(*points, strict=True), label=label, linewidth=1.2)
    start = marks["start"].answered
    ax.axvline(start, color="grey", linestyle=":", linewidth=1)
    ax.axvline(start + (marks["end"].answered - start) / 2, color="grey", linestyle="--", linewidth=1)
    ax.set_xlabel("requests answered (dotted: end of warm-up; dashed: start of the trend window)")
    ax.set_ylabel("RSS (MB)")
    ax.set_title("RSS of the serving processes over the soak")
    ax.legend(fontsize=8, loc="center right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=20_000, help="counted requests (default 20000)")
    parser.add_argument("--concurrency", type=int, default=64, help="concurrent clients (default 64)")
    parser.add_argument("--warmup-requests", type=int, default=256,
                        help="requests before the counted ones, not counted (default 256)")
    add_service_arguments(parser)
    parser.add_argument("--sample-seconds", type=float, default=2.0, help="RSS sampling interval (default 2)")
    parser.add_argument("--progress-seconds", type=float, default=15.0, help="progress line interval (default 15)")
    parser.add_argument("--timeout", type=float, default=120.0, help="client timeout per request (default 120 s)")
    parser.add_argument("--json", type=Path, help="write every figure and the RSS samples to this JSON file")
    parser.add_argument("--plot", type=Path, help="write a PNG of RSS per process over requests")
    args = parser.parse_args(argv)
    check_service_arguments(parser, args)
    if args.requests < 1 or args.concurrency < 1 or args.warmup_requests < 0 or args.sample_seconds <= 0:
        parser.error("--requests >= 1, --concurrency >= 1, --warmup-requests >= 0 and --sample-seconds > 0 "
                     "are required")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    progress, images = begin(args.images)
    with contextlib.ExitStack() as stack:
        home = stack.enter_context(state_home(args.home, progress))
        if args.log_dir is None:
            log_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="soak-logs-")))
        else:
            log_dir = args.log_dir
            log_dir.mkdir(parents=True, exist_ok=True)
        shown = " ".join(f"{k}={v}" for k, v in args.service_env.items())
        progress("starting `bentoml serve service.service:TransferServe`" + (f" with {shown}" if shown else ""))
        server = stack.enter_context(serving("service.service:TransferServe", home, log_dir, env=args.service_env))
        progress(f"ready at {server.url}; {args.warmup_requests} warm-up + {args.requests} requests "
                 f"at concurrency {args.concurrency}")
        log_watch = LogWatch(server.log_path)
        log_watch.start()
        load, samples, marks = asyncio.run(soak(server.url, images, server.process.pid, args, progress))
        log_watch.stop()
        progress("stopping the server")

    counted = load.answers[args.warmup_requests:]
    result: dict[str, Any] = {
        "config": {"requests": args.requests, "concurrency": args.concurrency,
                   "warmup_requests": args.warmup_requests, "service_env": args.service_env,
                   "sample_seconds": args.sample_seconds, "python": platform.python_version()},
        "images": describe_images(images),
        "load": summarise(counted, origin=load.started),
        "memory": memory_report(samples, marks["ready"], marks["start"], marks["end"]),
        "server_log": {"warnings_and_errors": log_watch.count, "samples": log_watch.samples},
    }
    from models.hardware import cpu_count

    result["config"]["cores"] = cpu_count()
    print_report(result)
    if args.json:
        args.json.write_text(json.dumps({**result, "rss_samples": [asdict(s) for s in samples],
                                         "marks": {k: asdict(v) for k, v in marks.items()}}, indent=2))
        progress(f"wrote {args.json}")
    if args.plot:
        write_plot(args.plot, samples, marks)
        progress(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
