"""Retrain jobs: the one record of each job, and the rule that only one runs at a time.

A job's record holds its ``state`` (queued, running, succeeded, rejected, failed), ``phase``,
``progress`` (0-1), the metrics of both models, the version it produced and the error. Only one
job may be queued or running at a time: :meth:`JobStore.create` checks and inserts atomically, so
two concurrent requests cannot both start one. A job whose process is gone is marked failed with
the reason (:meth:`JobStore.fail`, :meth:`JobStore.fail_orphans`); a job that has recorded its
result is never overwritten.
"""

from __future__ import annotations

import os
import shutil
from abc import ABC, abstractmethod
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

JobState = Literal["queued", "running", "succeeded", "rejected", "failed"]
#: retrain: a new head from the labelled images; adapt: the head aligned with unlabelled images
JobKind = Literal["retrain", "adapt"]
FINAL_STATES: tuple[JobState, ...] = ("succeeded", "rejected", "failed")

#: A job that was created but whose process has not reported yet is left alone this long by
#: :meth:`JobStore.fail_orphans` (it is being launched right now).
LAUNCH_GRACE_S = 60


class Job(BaseModel):
    """One retrain job, as stored."""

    model_config = ConfigDict(frozen=True)

    id: str = Field(description="job id (32 hex digits)")
    kind: JobKind = Field("retrain", description="retrain (POST /admin/retrain) or adapt (POST /admin/adapt)")
    state: JobState
    phase: str = Field(description="what the job is doing now (queued, starting, embedding, fitting, ...)")
    progress: float = Field(ge=0.0, le=1.0)
    params: dict[str, Any] | None = Field(description="the retrain parameters it runs with")
    metrics: dict[str, Any] | None = Field(
        description="the candidate's and the active model's accuracy on the same held-out images, "
        "counts, and the promotion gate's reason; null until the job has evaluated")
    version: str | None = Field(description="the version the job produced, once written")
    parent: str | None = Field(description="the version it was retrained from")
    error: str | None = Field(description="why the job failed")
    pid: int | None = Field(None, exclude=True, description="its process (on the host that runs it)")
    created_at: str
    updated_at: str
    finished_at: str | None


class JobConflict(Exception):
    """A job is already queued or running."""

    def __init__(self, job: Job) -> None:
        super().__init__(f"retrain job {job.id} is already {job.state}")
        self.job = job


class JobStore(ABC):
    """The job records of a deployment."""

    @abstractmethod
    def create(self, params: Mapping[str, Any], parent: str | None, kind: JobKind = "retrain") -> Job:
        """Insert a queued job, or raise :class:`JobConflict` if one is queued or running."""

    @abstractmethod
    def get(self, job_id: str) -> Job | None:
        """The job, after failing it if its process is gone; None for an unknown id."""

    @abstractmethod
    def set_pid(self, job_id: str, pid: int) -> None:
        """Record the process that runs the job (by whoever started it)."""

    @abstractmethod
    def mark_running(self, job_id: str, pid: int) -> None:
        """The job's own process has started: state running, phase starting."""

    @abstractmethod
    def record_progress(self, job_id: str, phase: str, progress: float) -> None:
        """What the running job is doing now and how far it is (0-1)."""

    @abstractmethod
    def finish(self, job_id: str, state: Literal["succeeded", "rejected"], version: str,
               metrics: Mapping[str, Any]) -> None:
        """The job's result: the version it produced, promoted (succeeded) or not (rejected)."""

    @abstractmethod
    def fail(self, job_id: str, error: str) -> bool:
        """Mark the job failed with ``error`` unless it already ended (its own result wins).
        True if it was still queued or running. Removes the scratch directory the job left."""

    @abstractmethod
    def fail_orphans(self) -> int:
        """Fail every queued or running job whose process is gone; returns how many."""

    def renew_lease(self, job_id: str) -> bool:
        """Called by the running job, often: keep its claim. False when the job is no longer this
        process's to finish (another replica failed it after its lease ran out): it must stop.
        On one machine a job's process is watched directly and needs no lease."""
        return True


def pid_alive(pid: int | None, job_id: str | None = None) -> bool:
    """Whether process ``pid`` runs (a zombie does not); with ``job_id``, also that it is that
    job's process and not a later one that was given the same pid."""
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (exited, not yet reaped by its parent) is not alive
        with open(f"/proc/{pid}/stat") as fh:
            if fh.read().rsplit(")", 1)[1].split()[0] == "Z":
                return False
        if job_id is not None:
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                return job_id.encode() in fh.read().split(b"\0")
    except OSError:
        return True
    return True


ORPHAN_ERROR = ("the retrain process stopped before finishing (killed, crashed, or the service was "
                "stopped); start a new job")


def scratch_prefix(job_id: str) -> str:
    """The name prefix of a retrain job's scratch directory in the state directory."""
    return f"transfer-serve-retrain-{job_id}-"


def remove_scratch(home: Path, job_id: str) -> None:
    """Remove the scratch directory of job ``job_id`` (a job that ended normally removed its own)."""
    for path in Path(home).glob(scratch_prefix(job_id) + "*"):
        shutil.rmtree(path, ignore_errors=True)
