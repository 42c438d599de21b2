"""The job records of the single-machine backend: the SQLite table ``jobs``.

The job check and insert of :meth:`SqliteJobStore.create` run in one ``BEGIN IMMEDIATE``
transaction. A job's process runs on this machine, so a job is orphaned when no process with its
pid and its id on the command line exists any more (the service was restarted, the process was
killed before its launcher could record the end).
"""

from __future__ import annotations

import json
import logging
import sqlite3
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from ..jobs import (
    FINAL_STATES,
    LAUNCH_GRACE_S,
    ORPHAN_ERROR,
    Job,
    JobConflict,
    JobKind,
    JobStore,
    pid_alive,
    remove_scratch,
)
from .database import Database

log = logging.getLogger(__name__)

_JSON_FIELDS = ("params", "metrics")


def _now() -> str:
    return datetime.now(UTC).isoformat()


class SqliteJobStore(JobStore):
    """Jobs in ``database``; scratch directories in ``home``."""

    def __init__(self, home: Path, database: Database) -> None:
        self.home = Path(home)
        self.database = database

    @staticmethod
    def _job(row: sqlite3.Row) -> Job:
        fields = dict(row)
        for key in _JSON_FIELDS:
            fields[key] = json.loads(fields[key]) if fields[key] else None
        return Job.model_validate(fields)

    def _select(self, sql: str, params: tuple[object, ...] = ()) -> list[sqlite3.Row]:
        with self.database.connect() as conn:
            conn.row_factory = sqlite3.Row
            return conn.execute(sql, params).fetchall()

    def _update(self, job_id: str, **fields: Any) -> None:
        fields["updated_at"] = _now()
        if fields.get("state") in FINAL_STATES:
            fields["finished_at"] = fields["updated_at"]
        for key in _JSON_FIELDS:
            if key in fields and fields[key] is not None:
                fields[key] = json.dumps(fields[key])
        columns = ", ".join(f"{name} = ?" for name in fields)
        with self.database.connect() as conn:
            conn.execute(f"UPDATE jobs SET {columns} WHERE id = ?", (*fields.values(), job_id))  # noqa: S608 - column names are ours

    def get(self, job_id: str) -> Job | None:
        self.fail_orphans()
        rows = self._select("SELECT * FROM jobs WHERE id = ?", (job_id,))
        return self._job(rows[0]) if rows else None

    def create(self, params: Mapping[str, Any], parent: str | None, kind: JobKind = "retrain") -> Job:
        self.fail_orphans()
        job_id = uuid.uuid4().hex
        now = _now()
        with self.database.transaction() as conn:
            conn.row_factory = sqlite3.Row
            row = conn.execute(
                "SELECT * FROM jobs WHERE state IN ('queued', 'running') ORDER BY created_at LIMIT 1"
            ).fetchone()
            if row is not None:
                raise JobConflict(self._job(row))
            conn.execute(
                "INSERT INTO jobs (id, kind, state, phase, progress, params, parent, created_at, updated_at) "
                "VALUES (?, ?, 'queued', 'queued', 0, ?, ?, ?, ?)",
                (job_id, kind, json.dumps(dict(params)), parent, now, now),
            )
        job = self.get(job_id)
        if job is None:  # only if the database lost a committed row
            raise RuntimeError(f"job {job_id} vanished right after it was created")
        return job

    def set_pid(self, job_id: str, pid: int) -> None:
        self._update(job_id, pid=pid)

    def mark_running(self, job_id: str, pid: int) -> None:
        self._update(job_id, state="running", phase="starting", pid=pid)

    def record_progress(self, job_id: str, phase: str, progress: float) -> None:
        self._update(job_id, phase=phase, progress=progress)

    def finish(self, job_id: str, state: Literal["succeeded", "rejected"], version: str,
               metrics: Mapping[str, Any]) -> None:
        self._update(job_id, state=state, phase="done", progress=1.0, version=version, metrics=dict(metrics))

    def fail(self, job_id: str, error: str) -> bool:
        remove_scratch(self.home, job_id)
        now = _now()
        with self.database.connect() as conn:
            cursor = conn.execute(
                "UPDATE jobs SET state = 'failed', error = ?, updated_at = ?, finished_at = ? "
                "WHERE id = ? AND state IN ('queued', 'running')",
                (error, now, now, job_id),
            )
        return cursor.rowcount > 0

    def fail_orphans(self) -> int:
        rows = self._select("SELECT id, pid, state, created_at FROM jobs WHERE state IN ('queued', 'running')")
        failed = 0
        for row in rows:
            if row["pid"] is None and row["state"] == "queued":
                age = datetime.now(UTC) - datetime.fromisoformat(row["created_at"])
                if age.total_seconds() < LAUNCH_GRACE_S:  # being launched right now
                    continue
            if not pid_alive(row["pid"], row["id"]) and self.fail(row["id"], ORPHAN_ERROR):
                log.warning("retrain job %s marked failed: its process is gone", row["id"])
                failed += 1
        return failed
