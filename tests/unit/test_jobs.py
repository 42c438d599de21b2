"""Retrain job records on a real SQLite database: a job whose process is gone is failed with the
reason, and a job that recorded its own result is never overwritten."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from service.jobs import JobStore, exit_reason, pid_alive, scratch_prefix


def running_job_whose_process_exited(jobs: JobStore) -> dict:
    """A job recorded as running with the pid of a real process that has exited (and been reaped)."""
    job = jobs.create({}, "v1")
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    jobs.update(job["id"], state="running", pid=process.pid)
    return job


def test_a_job_whose_process_is_gone_is_failed_when_looked_at(tmp_path: Path) -> None:
    jobs = JobStore(tmp_path)
    job = running_job_whose_process_exited(jobs)
    failed = jobs.get(job["id"])
    assert failed is not None and failed["state"] == "failed" and "start a new job" in failed["error"]
    assert failed["finished_at"]


def test_a_pid_reused_by_another_process_does_not_keep_a_job_alive(tmp_path: Path) -> None:
    jobs = JobStore(tmp_path)
    job = jobs.create({}, "v1")
    jobs.update(job["id"], state="running", pid=os.getpid())  # alive, but not this job's process
    assert pid_alive(os.getpid()) and not pid_alive(os.getpid(), job["id"])
    assert jobs.get(job["id"])["state"] == "failed"  # type: ignore[index]


def test_a_recorded_result_is_never_overwritten_by_a_late_failure(tmp_path: Path) -> None:
    jobs = JobStore(tmp_path)
    job = jobs.create({}, "v1")
    jobs.update(job["id"], state="succeeded", version="v2")
    assert not jobs.fail_if_active(job["id"], "too late")
    assert jobs.get(job["id"])["state"] == "succeeded"  # type: ignore[index]


def test_exit_reasons_name_the_signal() -> None:
    assert "SIGKILL" in exit_reason(-signal.SIGKILL) and "stopped" in exit_reason(-signal.SIGTERM)
    assert "status 3" in exit_reason(3)


def test_a_dead_jobs_scratch_directory_is_removed_and_no_other(tmp_path: Path) -> None:
    jobs = JobStore(tmp_path)
    job = running_job_whose_process_exited(jobs)
    scratch = tmp_path / f"{scratch_prefix(job['id'])}abc123"
    (scratch / "nested").mkdir(parents=True)
    (scratch / "nested" / "model.onnx").write_bytes(b"half a model")
    other = tmp_path / f"{scratch_prefix('another-job')}def456"
    other.mkdir()
    assert jobs.get(job["id"])["state"] == "failed"  # type: ignore[index]
    assert not scratch.exists() and other.is_dir()
