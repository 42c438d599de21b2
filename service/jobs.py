"""Retrain jobs: their state in SQLite, and launching each one in its own process.

A job row is the single record of a job: ``state`` (queued, running, succeeded, rejected,
failed), ``phase``, ``progress`` (0-1), the metrics of both models, the resulting version and the
error. Only one job may be queued or running at a time; the check and the insert happen in one
``BEGIN IMMEDIATE`` transaction, so two concurrent requests cannot both start one. A job whose
process is gone is marked failed with the reason: at once by the serving worker that launched it
(it waits for the process, so it knows the signal that killed it), else the next time anyone
looks (the service was restarted). A job that has recorded its result is never overwritten.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import uuid
from datetime import datetime, timezone
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .db import connected, database_path, transaction

log = logging.getLogger(__name__)

ACTIVE_STATES = ("queued", "running")
FINAL_STATES = ("succeeded", "rejected", "failed")
_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    state TEXT NOT NULL,
    phase TEXT NOT NULL,
    progress REAL NOT NULL DEFAULT 0,
    params TEXT NOT NULL DEFAULT '{}',
    metrics TEXT,
    version TEXT,
    parent TEXT,
    error TEXT,
    pid INTEGER,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    finished_at TEXT
)
"""
_JSON_FIELDS = ("params", "metrics")


class JobConflict(Exception):
    """A job is already queued or running."""

    def __init__(self, job: dict[str, Any]) -> None:
        super().__init__(f"retrain job {job['id']} is already {job['state']}")
        self.job = job


def _now() -> str:
    return datetime.now(timezone.utc).isoformat()


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


def exit_reason(returncode: int) -> str:
    """Why a retrain process that ended without recording a result failed, for the job's error."""
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return (f"the retrain process was killed by {name} before finishing (killed by hand or by the "
                f"out-of-memory killer, or the service was stopped); start a new job")
    return f"the retrain process exited with status {returncode} before finishing; start a new job"


class JobStore:
    def __init__(self, home: Path) -> None:
        self.home = home
        self.path = database_path(home)
        with self._conn() as conn:
            conn.execute(_SCHEMA)

    @contextlib.contextmanager
    def _conn(self) -> Iterator[sqlite3.Connection]:
        with connected(self.path) as conn:
            conn.row_factory = sqlite3.Row
            yield conn

    @staticmethod
    def _row(row: Any) -> dict[str, Any]:
        job = dict(row)
        for key in _JSON_FIELDS:
            job[key] = json.loads(job[key]) if job[key] else None
        return job

    def get(self, job_id: str) -> dict[str, Any] | None:
        self.fail_orphans()
        with self._conn() as conn:
            row = conn.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return self._row(row) if row else None

    def create(self, params: dict[str, Any], parent: str | None) -> dict[str, Any]:
        """Insert a queued job, or raise :class:`JobConflict` if one is queued or running."""
        self.fail_orphans()
        job_id = uuid.uuid4().hex
        now = _now()
        with self._conn() as conn, transaction(conn):
            row = conn.execute(
                "SELECT * FROM jobs WHERE state IN ('queued', 'running') ORDER BY created_at LIMIT 1"
            ).fetchone()
            if row is not None:
                raise JobConflict(self._row(row))
            conn.execute(
                "INSERT INTO jobs (id, state, phase, progress, params, parent, created_at, updated_at) "
                "VALUES (?, 'queued', 'queued', 0, ?, ?, ?, ?)",
                (job_id, json.dumps(params), parent, now, now),
            )
        job = self.get(job_id)
        if job is None:  # only if the database lost a committed row
            raise RuntimeError(f"job {job_id} vanished right after it was created")
        return job

    def update(self, job_id: str, **fields: Any) -> None:
        fields["updated_at"] = _now()
        if fields.get("state") in FINAL_STATES:
            fields["finished_at"] = fields["updated_at"]
        for key in _JSON_FIELDS:
            if key in fields and fields[key] is not None:
                fields[key] = json.dumps(fields[key])
        columns = ", ".join(f"{name} = ?" for name in fields)
        with self._conn() as conn:
            conn.execute(f"UPDATE jobs SET {columns} WHERE id = ?", (*fields.values(), job_id))  # noqa: S608

    def fail_if_active(self, job_id: str, error: str) -> bool:
        """Mark the job failed with ``error`` unless it already ended (its own result wins).
        True if it was still queued or running. Called once its process is gone: the scratch
        directory a killed job leaves behind is removed first."""
        remove_scratch(self.home, job_id)
        now = _now()
        with self._conn() as conn:
            cursor = conn.execute(
                "UPDATE jobs SET state = 'failed', error = ?, updated_at = ?, finished_at = ? "
                "WHERE id = ? AND state IN ('queued', 'running')",
                (error, now, now, job_id),
            )
        return cursor.rowcount > 0

    def fail_orphans(self) -> int:
        """Mark failed every queued/running job whose process is gone. Returns how many."""
        with self._conn() as conn:
            rows = conn.execute("SELECT id, pid, state, created_at FROM jobs WHERE state IN ('queued', 'running')").fetchall()
        failed = 0
        for row in rows:
            if row["pid"] is None and row["state"] == "queued":
                age = datetime.now(timezone.utc) - datetime.fromisoformat(row["created_at"])
                if age.total_seconds() < 60:  # being launched right now
                    continue
            if not pid_alive(row["pid"], row["id"]) and self.fail_if_active(row["id"], ORPHAN_ERROR):
                log.warning("retrain job %s marked failed: its process is gone", row["id"])
                failed += 1
        return failed


def scratch_prefix(job_id: str) -> str:
    """The name prefix of a retrain job's scratch directory in the state directory."""
    return f"transfer-serve-retrain-{job_id}-"


def remove_scratch(home: Path, job_id: str) -> None:
    """Remove the scratch directory of job ``job_id`` (a job that ended normally removed its own)."""
    import shutil

    for path in home.glob(scratch_prefix(job_id) + "*"):
        shutil.rmtree(path, ignore_errors=True)


def launch(home: Path, job_id: str) -> int:
    """Start the job in its own process (lower CPU priority than serving). Returns its pid."""
    logs = home / "jobs"
    logs.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "TRANSFER_SERVE_HOME": str(home)}
    with (logs / f"{job_id}.log").open("ab") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "service.retrain", job_id, "--parent-pid", str(os.getpid())],
            cwd=Path(__file__).resolve().parents[1], env=env, stdout=log_file, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    reaper = threading.Thread(target=_reap, args=(process, home, job_id), name=f"reap-{job_id[:8]}", daemon=True)
    reaper.start()
    return process.pid


def _reap(process: subprocess.Popen[bytes], home: Path, job_id: str) -> None:
    """Wait for the job's process (no zombies); if it died without recording a result (killed,
    crashed), fail the job now with the reason rather than when someone next looks."""
    returncode = process.wait()
    try:
        if JobStore(home).fail_if_active(job_id, exit_reason(returncode)):
            log.error("retrain job %s failed: %s", job_id, exit_reason(returncode))
    except sqlite3.Error as exc:  # the next look at the job marks it failed instead
        log.warning("could not record the end of retrain job %s: %s", job_id, exc)
