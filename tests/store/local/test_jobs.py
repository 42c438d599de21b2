"""``store/local/jobs.py``, unit level on a real SQLite database: a retrain job whose process is
gone is failed with the reason (and its scratch directory removed), and a job that recorded its
own result is never overwritten."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from store.jobs import Job, scratch_prefix
from store.local.database import Database
from store.local.jobs import SqliteJobStore, pid_alive


def job_store(home: Path) -> SqliteJobStore:
    return SqliteJobStore(home, Database.open(home))


def running_job_whose_process_exited(jobs: SqliteJobStore) -> Job:
    """A job recorded as running with the pid of a real process that has exited (and been reaped)."""
    job = jobs.create({}, "v1")
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    jobs.mark_running(job.id, process.pid)
    return job


def test_a_job_whose_process_is_gone_is_failed_when_looked_at(tmp_path: Path) -> None:
    jobs = job_store(tmp_path)
    job = running_job_whose_process_exited(jobs)
    failed = jobs.get(job.id)
    assert failed is not None and failed.state == "failed" and "start a new job" in (failed.error or "")
    assert failed.finished_at


def test_a_pid_reused_by_another_process_does_not_keep_a_job_alive(tmp_path: Path) -> None:
    jobs = job_store(tmp_path)
    job = jobs.create({}, "v1")
    jobs.mark_running(job.id, os.getpid())  # alive, but not this job's process
    assert pid_alive(os.getpid()) and not pid_alive(os.getpid(), job.id)
    assert jobs.get(job.id).state == "failed"  # type: ignore[union-attr]


def test_a_recorded_result_is_never_overwritten_by_a_late_failure(tmp_path: Path) -> None:
    jobs = job_store(tmp_path)
    job = jobs.create({}, "v1")
    jobs.finish(job.id, "succeeded", "v2", {})
    assert not jobs.fail(job.id, "too late")
    assert jobs.get(job.id).state == "succeeded"  # type: ignore[union-attr]


def test_a_dead_jobs_scratch_directory_is_removed_and_no_other(tmp_path: Path) -> None:
    jobs = job_store(tmp_path)
    job = running_job_whose_process_exited(jobs)
    scratch = tmp_path / f"{scratch_prefix(job.id)}abc123"
    (scratch / "nested").mkdir(parents=True)
    (scratch / "nested" / "model.onnx").write_bytes(b"half a model")
    other = tmp_path / f"{scratch_prefix('another-job')}def456"
    other.mkdir()
    assert jobs.get(job.id).state == "failed"  # type: ignore[union-attr]
    assert not scratch.exists() and other.is_dir()
