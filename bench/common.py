"""Helpers shared by the benchmarks: a state directory with a model, real ``bentoml serve``
processes that are always stopped, the load window of the prediction benchmarks, CPU and /metrics
probes, and percentile maths.

Benchmarks run on shared machines, so nothing here judges a timing: it measures, and the
benchmark prints figures and ratios of setups measured one after another in the same run.
Server processes are started and stopped with :mod:`tests.support.server`, and the HTTP load is
:class:`tests.support.load.Load` (the same helpers the tests use), in their own process group;
:func:`serving` stops the whole group on any exit, Ctrl-C and SIGTERM included (after
:func:`install_sigterm_handler`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, NoReturn, Protocol

import numpy as np

from tests.support.load import ImageFile, Load
from tests.support.load import Protocol as LoadProtocol
from tests.support.paths import HYMENOPTERA, ROOT
from tests.support.server import Server
from tests.support.server import serving as serving_server
from tests.support.workers import process_label

DEFAULT_IMAGES = HYMENOPTERA
IMAGE_SUFFIXES = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png"}

__all__ = ["DEFAULT_IMAGES", "ImageFile", "Server"]  # re-exported for the benchmarks


# -- people-facing progress -------------------------------------------------------------------


class Progress:
    """``[elapsed] message`` lines on stderr, for a person watching a long run."""

    def __init__(self) -> None:
        self.started = time.monotonic()

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def __call__(self, message: str) -> None:
        print(f"[{self.elapsed:6.1f}s] {message}", file=sys.stderr, flush=True)


def install_sigterm_handler() -> None:
    """Make SIGTERM unwind like Ctrl-C, so ``finally`` blocks stop the servers."""

    def _raise(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, _raise)


# -- inputs -----------------------------------------------------------------------------------


def load_images(folder: Path, *, seed: int = 0) -> list[ImageFile]:
    """Every image under ``folder`` (recursively), read once, in a fixed shuffled order so the
    classes are mixed wherever a client starts cycling."""
    paths = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {folder}")
    random.Random(seed).shuffle(paths)
    return [ImageFile(p.name, p.read_bytes(), IMAGE_SUFFIXES[p.suffix.lower()], p.parent.name) for p in paths]


def describe_images(images: Sequence[ImageFile]) -> str:
    counts: dict[str, int] = {}
    for image in images:
        counts[image.label] = counts.get(image.label, 0) + 1
    mean_kb = sum(len(i.data) for i in images) / len(images) / 1024
    per_class = ", ".join(f"{label}: {n}" for label, n in sorted(counts.items()))
    return f"{len(images)} images ({per_class}), {mean_kb:.0f} KiB on average"


def add_service_arguments(parser: argparse.ArgumentParser, *, env_example: str = "TRANSFER_SERVE_WORKERS=2") -> None:
    """The options every benchmark that serves the service shares: --images, --home,
    --service-env (repeatable KEY=VALUE) and --log-dir. Check them with :func:`check_service_arguments`."""
    parser.add_argument("--images", type=Path, default=DEFAULT_IMAGES, help=f"image folder (default {DEFAULT_IMAGES})")
    parser.add_argument("--home", type=Path, help="state directory with an active model (default: a temporary "
                        "one, bootstrapped with the pretrained classifier)")
    parser.add_argument("--service-env", action="append", default=[], metavar="KEY=VALUE",
                        help=f"setting for the service under test (repeatable), e.g. {env_example}")
    parser.add_argument("--log-dir", type=Path, help="keep the servers' logs here (default: a temporary "
                        "folder, removed at the end)")


def check_service_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """--service-env items become a dict; --home must be a directory (else ``parser.error``)."""
    env = {}
    for item in args.service_env:
        key, sep, value = item.partition("=")
        if not sep or not key:
            parser.error(f"--service-env takes KEY=VALUE, got {item!r}")
        env[key] = value
    args.service_env = env
    if args.home is not None and not args.home.is_dir():
        parser.error(f"--home {args.home} is not a directory")


def begin(images_dir: Path) -> tuple[Progress, list[ImageFile]]:
    """A benchmark's start: SIGTERM stops it cleanly, a progress printer, the images read once."""
    install_sigterm_handler()
    progress = Progress()
    images = load_images(images_dir)
    progress(f"loaded {describe_images(images)} from {images_dir}")
    return progress, images


# -- state directory and servers --------------------------------------------------------------


def bootstrap_home(home: Path, python: str = sys.executable, checkout: Path = ROOT) -> None:
    """Register the pretrained ImageNet classifier in ``home`` (``python -m training bootstrap``,
    with the code of ``checkout``)."""
    env = {**os.environ, "TRANSFER_SERVE_HOME": str(home), "BENTOML_DO_NOT_TRACK": "True"}
    done = subprocess.run([python, "-m", "training", "bootstrap"], cwd=checkout, env=env,
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"`python -m training bootstrap` failed ({done.returncode}):\n"
                           f"{(done.stdout + done.stderr)[-3000:]}")


@contextlib.contextmanager
def state_home(home: Path | None, progress: Callable[[str], None] = lambda _: None) -> Iterator[Path]:
    """``home`` as given, or a temporary state directory bootstrapped with the pretrained
    classifier and removed afterwards."""
    if home is not None:
        yield home.resolve()
        return
    temporary = Path(tempfile.mkdtemp(prefix="transfer-serve-bench-"))
    try:
        progress(f"bootstrapping a model into {temporary} ...")
        bootstrap_home(temporary)
        progress("bootstrap done")
        yield temporary
    finally:
        shutil.rmtree(temporary, ignore_errors=True)


@contextlib.contextmanager
def serving(target: str, home: Path, log_dir: Path, *, env: Mapping[str, str] | None = None,
            ready_timeout: float = 180, checkout: Path = ROOT, log_name: str | None = None) -> Iterator[Server]:
    """A ready ``bentoml serve TARGET`` on a free 127.0.0.1 port, with a private BENTOML_HOME,
    stopped with every process it started however the block ends (tests/support/server.py);
    served from another ``checkout`` of the project, with its own .venv, if given."""
    log_path = log_dir / (log_name or f"{target.replace(':', '.').replace('/', '_')}.log")
    with serving_server(home, log_path, env, target, timeout=ready_timeout, checkout=checkout) as server:
        yield server


# -- statistics -------------------------------------------------------------------------------


def percentiles(values: Sequence[float], qs: Sequence[float] = (50, 95, 99)) -> dict[str, float | None]:
    """``{"p50": ..., ...}`` (linear interpolation between closest ranks); None when empty."""
    if len(values) == 0:
        return {f"p{q:g}": None for q in qs}
    points = np.percentile(np.asarray(values, dtype=np.float64), list(qs))
    return {f"p{q:g}": float(v) for q, v in zip(qs, points, strict=True)}


# -- probes: measured from the start to the end of the measurement window ---------------------


class WindowProbe(Protocol):
    def start(self) -> None: ...
    def stop(self) -> None: ...


class ProcessCPU:
    """CPU seconds (user + system) that a process, and optionally its descendants, used in the
    window, by process label."""

    def __init__(self, pid: int | None = None, *, tree: bool = True, root_label: str = "arbiter") -> None:
        self.pid = pid if pid is not None else os.getpid()
        self.tree = tree
        self.root_label = root_label
        self._before: dict[int, tuple[str, float]] = {}
        self._after: dict[int, tuple[str, float]] = {}

    def _sample(self) -> dict[int, tuple[str, float]]:
        import psutil

        root = psutil.Process(self.pid)
        processes = [root, *(root.children(recursive=True) if self.tree else [])]
        sample = {}
        for process in processes:
            with contextlib.suppress(psutil.Error):
                times = process.cpu_times()
                label = self.root_label if process.pid == self.pid else process_label(process)
                sample[process.pid] = (label, times.user + times.system)
        return sample

    def start(self) -> None:
        self._before = self._sample()

    def stop(self) -> None:
        self._after = self._sample()

    def seconds(self) -> dict[str, float]:
        used: dict[str, float] = {}
        for pid, (label, after) in self._after.items():
            before = self._before.get(pid, (label, 0.0))[1]  # a process born in the window: all of it
            used[label] = used.get(label, 0.0) + max(0.0, after - before)
        return used


class SystemCPU:
    """CPU seconds the whole machine spent busy (everything but idle and I/O wait) in the
    window; minus what the measured processes used, it shows how much else was running."""

    def __init__(self) -> None:
        self._before = self._after = 0.0
        self._started = self._stopped = 0.0

    @staticmethod
    def _busy() -> float:
        import psutil

        times = psutil.cpu_times()
        return float(sum(times) - times.idle - getattr(times, "iowait", 0.0))

    def start(self) -> None:
        self._before, self._started = self._busy(), time.perf_counter()

    def stop(self) -> None:
        self._after, self._stopped = self._busy(), time.perf_counter()

    def busy_seconds(self) -> float:
        return max(0.0, self._after - self._before)


class MetricsDelta:
    """The change of BentoML's Prometheus counters (``GET /metrics``) over the window."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._before: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
        self._after: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}

    def _scrape(self) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
        import httpx
        from prometheus_client.parser import text_string_to_metric_families

        response = httpx.get(self.url + "/metrics", timeout=30)
        response.raise_for_status()
        text = response.text
        return {
            (sample.name, frozenset(sample.labels.items())): float(sample.value)
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        }

    def start(self) -> None:
        self._before = self._scrape()

    def stop(self) -> None:
        self._after = self._scrape()

    def delta(self, name_suffix: str, **labels: str) -> float:
        """Sum over the samples whose name ends with ``name_suffix`` and that carry ``labels``."""
        total = 0.0
        for key, value in self._after.items():
            name, sample_labels = key
            if name.endswith(name_suffix) and all((k, v) in sample_labels for k, v in labels.items()):
                total += value - self._before.get(key, 0.0)
        return total

    def mean(self, metric: str, **labels: str) -> float | None:
        """Mean of a histogram over the window (``_sum`` delta / ``_count`` delta)."""
        count = self.delta(f"{metric}_count", **labels)
        return self.delta(f"{metric}_sum", **labels) / count if count else None


class LogWatch:
    """Warning and error lines a server wrote to its log during the window (BentoML's format:
    ``... [WARNING] [worker] message``), counted and a few distinct ones kept."""

    def __init__(self, path: Path, *, keep: int = 5) -> None:
        self.path = path
        self.keep = keep
        self._offset = 0
        self.count = 0
        self.samples: list[str] = []

    def start(self) -> None:
        self._offset = self.path.stat().st_size if self.path.exists() else 0

    def stop(self) -> None:
        with self.path.open("rb") as fh:
            fh.seek(self._offset)
            text = fh.read().decode(errors="replace")
        seen = set()
        for line in text.splitlines():
            if "[WARNING]" not in line and "[ERROR]" not in line:
                continue
            self.count += 1
            message = line.split("] ", 2)[-1].split(" (trace=")[0][:200]
            if message not in seen and len(self.samples) < self.keep:
                seen.add(message)
                self.samples.append(message)


# -- HTTP load in a measurement window --------------------------------------------------------


@dataclass
class LoadResult:
    """What a load run saw in its measurement window (requests completed inside it)."""

    seconds: float
    images_per_request: int = 1
    latencies_ms: list[float] = field(default_factory=list)  # successful requests
    errors: int = 0
    errors_outside_window: int = 0
    error_samples: list[str] = field(default_factory=list)

    @property
    def ok(self) -> int:
        return len(self.latencies_ms)

    @property
    def images(self) -> int:
        """Images classified by the successful requests."""
        return self.ok * self.images_per_request

    @property
    def throughput(self) -> float:
        """Images per second."""
        return self.images / self.seconds if self.seconds else 0.0

    def summary(self) -> dict[str, Any]:
        return {"requests_ok": self.ok, "images_per_request": self.images_per_request, "errors": self.errors,
                "errors_outside_window": self.errors_outside_window,
                "seconds": self.seconds, "throughput": self.throughput,
                "latency_ms": {**percentiles(self.latencies_ms),
                               "mean": float(np.mean(self.latencies_ms)) if self.latencies_ms else None},
                "error_samples": self.error_samples}


def window_result(load: Load, window_start: float, duration: float, *, max_error_samples: int = 5) -> LoadResult:
    """The requests of ``load`` that completed in the ``duration`` seconds from ``window_start``:
    latencies of the successful ones, the errors (the first few kept); errors outside the window
    counted apart."""
    window_end = window_start + duration
    result = LoadResult(seconds=duration, images_per_request=load.images_per_request)
    for answer in list(load.answers):  # in completion order
        if not window_start <= answer.done <= window_end:
            result.errors_outside_window += not answer.ok
        elif answer.ok:
            result.latencies_ms.append(answer.latency_ms)
        else:
            result.errors += 1
            if len(result.error_samples) < max_error_samples and answer.problem is not None:
                result.error_samples.append(answer.problem)
    return result


async def predict_load(
    url: str,
    images: Sequence[ImageFile],
    *,
    concurrency: int,
    duration: float,
    warmup: float,
    route: str = "/predict",
    images_per_request: int = 1,
    probes: Sequence[WindowProbe] = (),
    progress: Callable[[str], None] | None = None,
    label: str = "load",
    timeout: float = 120,
    max_error_samples: int = 5,
    protocol: LoadProtocol | None = None,
) -> LoadResult:
    """``concurrency`` clients each sending ``POST route`` requests back to back, with
    ``images_per_request`` images each (consecutive ones from ``images``; each body encoded once,
    beforehand).

    The first ``warmup`` seconds are not counted; then requests that complete within the next
    ``duration`` seconds are. A request is an error unless it answers 200 with one well-formed
    prediction per image sent. After the window no new request is sent; those in flight are awaited (not
    counted), so servers see no aborted connections. ``probes`` are started and stopped at the
    window's edges (in a thread, off the event loop)."""
    if concurrency < 1 or duration <= 0 or warmup < 0 or images_per_request < 1:
        raise ValueError("concurrency >= 1, duration > 0, warmup >= 0 and images_per_request >= 1 are required")
    # What the load generator costs comes out of the same cores as the server, so it does no
    # work it can skip: each body is encoded once.
    load = Load(url, images, clients=concurrency, images_per_request=images_per_request, route=route,
                pre_encode=True, timeout=timeout, protocol=protocol)
    started = time.perf_counter()
    window_start = started + warmup
    window_end = window_start + duration

    async def watch() -> None:
        await asyncio.sleep(max(0.0, window_start - time.perf_counter()))
        for probe in probes:
            await asyncio.to_thread(probe.start)
        if progress:
            progress(f"{label}: warm-up done, measuring for {duration:g}s")
        while (now := time.perf_counter()) < window_end:
            await asyncio.sleep(min(5.0, window_end - now))
            if progress and time.perf_counter() < window_end - 0.5:
                seen = time.perf_counter() - window_start
                so_far = window_result(load, window_start, duration)
                progress(f"{label}: {seen:4.1f}/{duration:g}s  {so_far.ok} ok  {so_far.errors} errors  "
                         f"{so_far.images / seen:.1f} img/s")
        for probe in probes:
            await asyncio.to_thread(probe.stop)

    await asyncio.gather(watch(), load.run(until=window_end))
    return window_result(load, window_start, duration, max_error_samples=max_error_samples)


def run_main(main: Callable[[], int]) -> NoReturn:
    """Exit with ``main()``'s status; on Ctrl-C or SIGTERM (:func:`install_sigterm_handler`) say
    that the servers are stopped (the ``serving`` contexts have stopped them by then) and exit 130."""
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("interrupted; every server this run started has been stopped", file=sys.stderr)
        sys.exit(130)
