"""A job's own process: ``python -m service.job_process JOB_ID``, started by
:func:`service.jobs.launch` at a lower CPU priority than serving. It renews the job's lease,
records its progress, runs the job's kind (a retrain, :mod:`service.retrain`; an adaptation,
:mod:`service.adapt`) and records the result, or the reason it failed."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading

from models.adapt import AdaptParams
from models.retrain import RetrainParams
from store.jobs import JobStore
from store.state import open_state

from .adapt import run_job
from .providers import serves_on_cpu
from .retrain import failure_reason, retrain

log = logging.getLogger(__name__)


def _record_failure(jobs: JobStore, job_id: str, reason: str) -> None:
    try:
        jobs.fail(job_id, reason)
    except Exception:  # the database itself cannot be written: the job is marked failed once gone
        log.exception("could not record that retrain job %s failed (%s)", job_id, reason)


def keep_lease(jobs: JobStore, job_id: str, every_s: float) -> threading.Event:
    """Renew the job's lease every ``every_s`` seconds in the background; the event is set once
    the job is no longer this process's to finish."""
    lost = threading.Event()

    def renew() -> None:
        while not lost.wait(every_s):
            try:
                if not jobs.renew_lease(job_id):
                    lost.set()
            except Exception as exc:  # noqa: BLE001 - the next renewal tells whether the lease held
                log.warning("could not renew the lease of retrain job %s: %s", job_id, exc)

    threading.Thread(target=renew, name="job-lease", daemon=True).start()
    return lost


def main(argv: list[str] | None = None) -> int:
    from models.hardware import cpu_count

    from .settings import get_settings

    parser = argparse.ArgumentParser(prog="python -m service.job_process")
    parser.add_argument("job_id")
    parser.add_argument("--parent-pid", type=int, help="exit (marking the job failed) if this process dies")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    settings = get_settings()
    os.nice(10)  # serving comes first: the job takes the CPU the service leaves
    state = open_state(settings)
    jobs = state.jobs
    job = jobs.get(args.job_id)
    if job is None:
        log.error("no job %s", args.job_id)
        return 2

    phase = "starting"
    lease_lost = keep_lease(jobs, args.job_id, settings.job_lease_s / 3)

    def report(new_phase: str, progress: float) -> None:
        nonlocal phase
        if args.parent_pid and os.getppid() != args.parent_pid:
            raise SystemExit("the service stopped during the job")
        if lease_lost.is_set():
            raise SystemExit("the job's lease ran out (it could not reach the database in time) and another replica "
                             "failed it; start a new job")
        jobs.record_progress(args.job_id, new_phase, progress)
        phase = new_phase

    try:
        jobs.mark_running(args.job_id, os.getpid())
        # every core: the job is niced, so serving still comes first
        int8 = settings.model_variant in ("auto", "int8") and serves_on_cpu(settings)
        if job.kind == "adapt":
            result = run_job(state, settings.home, args.job_id, job.parent or "", AdaptParams.model_validate(
                job.params or {}), report, threads=cpu_count(), int8=int8)
        else:
            result = retrain(state, settings.home, RetrainParams.model_validate(job.params or {}), report,
                             threads=cpu_count(), job_id=args.job_id, int8=int8)
    except SystemExit as exc:
        _record_failure(jobs, args.job_id, str(exc))
        return 1
    except Exception as exc:  # any failure ends the job failed, with the reason, never half-done
        log.exception("retrain job %s failed", args.job_id)
        _record_failure(jobs, args.job_id, failure_reason(exc, phase))
        return 1
    jobs.finish(args.job_id, result.state, result.version, result.metrics)
    log.info("%s job %s %s: %s", job.kind, args.job_id, result.state, result.metrics["gate"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
