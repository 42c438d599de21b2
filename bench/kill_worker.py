"""Kill -9 a serving worker under load: how many requests fail while it is replaced, and how long
until the replacement serves.

    .venv/bin/python -m bench.kill_worker [--targets inference,http] [--concurrency 16] \
        [--before 10] [--after 30] [--home DIR] [--service-env KEY=VALUE ...] [--json OUT.json] \
        [--log-dir DIR]

For each target a fresh ``bentoml serve service.service:TransferServe`` is started and
``--concurrency`` clients send single-image ``POST /predict`` requests back to back (the
hymenoptera photos). After ``--before`` seconds one worker gets SIGKILL:

- ``inference``: the inference worker ``transfer_serve_inference`` #1 (onnxruntime);
- ``http``: the HTTP worker ``transfer_serve`` #1 (uploads, decoding, the API).

The load goes on for ``--after`` seconds. Reported per target: the requests that failed after
the kill (by kind, with the first bodies), how many the HTTP worker retried internally (its
"inference call failed" warnings, invisible to clients), when the replacement process appeared
and when it reported ready in the log (the inference worker: model loaded and warmed up; the HTTP
worker: service initialised), the first success of a request sent after the kill, the longest
gap between two successful answers around the kill, and the throughput before the kill and once
the replacement was ready. BentoML's supervisor (circus) respawns a dead worker; the listening
socket belongs to the supervisor, so new connections wait in its backlog instead of being
refused.

With the default settings on a 2-core host there are two inference workers, so the other one
serves while #1 is replaced; ``--service-env TRANSFER_SERVE_INFERENCE_WORKERS=1`` (the default
with a GPU) shows a replacement with no other worker to take over.

Without --home a temporary state directory is bootstrapped with the pretrained ImageNet
classifier and removed at the end. Servers are stopped at the end, on errors, Ctrl-C and SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from bench.common import (
    ImageFile,
    Server,
    add_service_arguments,
    begin,
    check_service_arguments,
    serving,
    state_home,
)
from bench.soak import summarise
from tests.support.load import Answer, Load
from tests.support.workers import WORKER_TARGETS as TARGETS
from tests.support.workers import worker_pid

RETRY_WARNING = "inference call failed"


def log_lines_since(path: Path, offset: int) -> list[str]:
    with path.open("rb") as fh:
        fh.seek(offset)
        return fh.read().decode(errors="replace").splitlines()


def longest_gap(answers: Sequence[Answer], start: float, end: float) -> tuple[float, float]:
    """The longest time between consecutive successful answers within [start, end], and when it
    began (perf_counter)."""
    times = sorted(a.done for a in answers if a.ok and start <= a.done <= end)
    best, at = 0.0, start
    for a, b in zip([start, *times], [*times, end], strict=True):
        if b - a > best:
            best, at = b - a, a
    return best, at


async def kill_under_load(server: Server, images: Sequence[ImageFile], target: str, args: argparse.Namespace,
                          progress: Callable[[str], None]) -> dict[str, Any]:
    label, ready_line = TARGETS[target]
    load = Load(server.url, images, clients=args.concurrency, timeout=args.timeout)
    stopping = False
    events: dict[str, Any] = {}

    async def killer() -> None:
        nonlocal stopping
        try:
            await asyncio.sleep(args.before)
            pid = await asyncio.to_thread(worker_pid, server, label)
            if pid is None:
                raise RuntimeError(f"no live process {label} in the server's tree")
            offset = server.log_path.stat().st_size
            answered = load.answered
            os.kill(pid, signal.SIGKILL)
            events.update(kill=time.perf_counter(), killed_pid=pid, log_offset=offset, answered_before_kill=answered)
            progress(f"{target}: SIGKILL sent to {label} (pid {pid}) after {answered} answers")
            deadline = events["kill"] + args.after
            while time.perf_counter() < deadline:
                if "replaced" not in events:
                    new = await asyncio.to_thread(worker_pid, server, label)
                    if new is not None and new != pid:
                        events.update(replaced=time.perf_counter(), replacement_pid=new)
                        progress(f"{target}: replacement {label} is pid {new}")
                if "ready" not in events and any(ready_line in line for line in
                                                 await asyncio.to_thread(log_lines_since, server.log_path, offset)):
                    events["ready"] = time.perf_counter()
                    progress(f"{target}: the replacement reports ready")
                await asyncio.sleep(0.1)
        finally:
            stopping = True

    await asyncio.gather(killer(), load.run(stop=lambda: stopping))
    return analyse(load, events, server, target, args)


def analyse(load: Load, events: dict[str, Any], server: Server, target: str,
            args: argparse.Namespace) -> dict[str, Any]:
    kill, origin = events["kill"], load.started
    end = max(a.done for a in load.answers)
    before = [a for a in load.answers if a.done < kill]
    after = [a for a in load.answers if a.done >= kill]
    failed_after = [a for a in after if not a.ok]
    first_success = min((a.done for a in after if a.ok and a.sent >= kill), default=None)
    gap, gap_at = longest_gap(load.answers, max(origin, kill - 5), end)
    ready = events.get("ready")
    settled = [a for a in after if ready is not None and a.sent >= ready]
    warm = [a for a in before if a.sent - origin >= 2.0]  # the first seconds include connection set-up
    lines = log_lines_since(server.log_path, events["log_offset"])
    retries = sum(RETRY_WARNING in line for line in lines)

    def since_kill(value: float | None) -> float | None:
        return None if value is None else value - kill

    return {
        "target": target, "killed": TARGETS[target][0], "killed_pid": events["killed_pid"],
        "replacement_pid": events.get("replacement_pid"),
        "replacement_process_after_s": since_kill(events.get("replaced")),
        "replacement_ready_after_s": since_kill(ready),
        "first_success_sent_after_kill_s": since_kill(first_success),
        "longest_gap_between_successes_s": gap, "longest_gap_starts_s": gap_at - kill,
        "failed_after_kill": summarise(failed_after, origin=origin) if failed_after else {"errors": 0},
        "failed_before_kill": sum(not a.ok for a in before),
        "answered_after_kill": len(after),
        "internal_retries_after_kill": retries,
        "failure_window_s": ([failed_after[0].done - kill, failed_after[-1].done - kill] if failed_after else None),
        "before": summarise(warm, origin=origin) if warm else None,
        "after_ready": summarise(settled, origin=origin) if settled else None,
        "readyz_at_end": _readyz(server),
    }


def _readyz(server: Server) -> int | None:
    import httpx

    with contextlib.suppress(httpx.HTTPError):
        return httpx.get(server.url + "/readyz", timeout=10).status_code
    return None


def print_report(results: Sequence[dict[str, Any]], args: argparse.Namespace) -> None:
    def secs(value: float | None) -> str:
        return f"{value:.2f} s" if value is not None else "never (within --after)"

    env = " ".join(f"{k}={v}" for k, v in args.service_env.items()) or "default settings"
    print(f"\nkill -9 under load: {args.concurrency} clients, single-image POST /predict, {env}")
    for r in results:
        failed = r["failed_after_kill"]
        print(f"\n{r['target']}: SIGKILL {r['killed']} (pid {r['killed_pid']}); replacement pid {r['replacement_pid']}")
        print(f"  requests failed after the kill:     {failed['errors']} of {r['answered_after_kill']} answered"
              + (f" ({', '.join(f'{k}: {n}' for k, n in failed['errors_by_kind'].items())}; "
                 f"between {r['failure_window_s'][0]:.2f} and {r['failure_window_s'][1]:.2f} s after the kill)"
                 if failed["errors"] else ""))
        for sample in failed.get("error_samples", []):
            print(f"      {sample}")
        print(f"  retried inside the service:         {r['internal_retries_after_kill']} inference calls")
        print(f"  replacement process appeared after: {secs(r['replacement_process_after_s'])}")
        print(f"  replacement ready (its log) after:  {secs(r['replacement_ready_after_s'])}")
        print(f"  first success of a request sent after the kill: {secs(r['first_success_sent_after_kill_s'])}")
        print(f"  longest gap between successes:      {r['longest_gap_between_successes_s']:.2f} s "
              f"(from {r['longest_gap_starts_s']:+.2f} s)")
        for name in ("before", "after_ready"):
            figures = r[name]
            if figures:
                lat = figures["latency_ms"]
                when = "before the kill" if name == "before" else "once replaced"
                print(f"  {when:<16} {figures['throughput']:6.1f} req/s, "
                      f"p50 {lat['p50']:.0f} ms, p99 {lat['p99']:.0f} ms, {figures['errors']} errors")
        print(f"  /readyz at the end: {r['readyz_at_end']}; failures before the kill: {r['failed_before_kill']}")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--targets", default="inference,http", help="comma-separated: inference, http")
    parser.add_argument("--concurrency", type=int, default=16, help="concurrent clients (default 16)")
    parser.add_argument("--before", type=float, default=10, help="seconds of load before the kill (default 10)")
    parser.add_argument("--after", type=float, default=30, help="seconds of load after the kill (default 30)")
    parser.add_argument("--timeout", type=float, default=120.0, help="client timeout per request (default 120 s)")
    add_service_arguments(parser, env_example="TRANSFER_SERVE_INFERENCE_WORKERS=1")
    parser.add_argument("--json", type=Path, help="write the figures to this JSON file")
    args = parser.parse_args(argv)
    args.targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    if not args.targets or set(args.targets) - set(TARGETS):
        parser.error(f"--targets takes a subset of {','.join(TARGETS)}")
    check_service_arguments(parser, args)
    if args.concurrency < 1 or args.before < 3 or args.after <= 0:
        parser.error("--concurrency >= 1, --before >= 3 and --after > 0 are required")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    progress, images = begin(args.images)
    results = []
    with contextlib.ExitStack() as stack:
        home = stack.enter_context(state_home(args.home, progress))
        if args.log_dir is None:
            log_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="kill-logs-")))
        else:
            log_dir = args.log_dir
            log_dir.mkdir(parents=True, exist_ok=True)
        for target in args.targets:
            progress(f"{target}: starting a server")
            target_log_dir = log_dir / target
            target_log_dir.mkdir(exist_ok=True)
            with serving("service.service:TransferServe", home, target_log_dir, env=args.service_env) as server:
                progress(f"{target}: ready at {server.url}; {args.concurrency} clients, kill after {args.before:g} s")
                started = time.monotonic()
                results.append(asyncio.run(kill_under_load(server, images, target, args, progress)))
                progress(f"{target}: done in {time.monotonic() - started:.0f} s; stopping the server")
    print_report(results, args)
    if args.json:
        args.json.write_text(json.dumps({"config": {"concurrency": args.concurrency, "before": args.before,
                                                    "after": args.after, "service_env": args.service_env},
                                         "results": results}, indent=2))
        progress(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
