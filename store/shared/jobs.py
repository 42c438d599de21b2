"""The job records of the shared backend: the Postgres table ``jobs``, with a lease per job.

One retrain at a time per deployment: a partial unique index allows one queued or running row,
so two replicas creating a job at once get one row and one :class:`~store.jobs.JobConflict`
naming it. A job runs on the replica that accepted it and holds a lease (``lease_until``) that it
renews while it works; when its replica dies, any replica that looks at the jobs fails it once the
lease has run out, so no job stays ``running`` forever. On its own replica a job whose process is
gone is failed at once, as on one machine.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from ..jobs import LAUNCH_GRACE_S, ORPHAN_ERROR, Job, JobConflict, JobKind, JobStore, pid_alive, remove_scratch
from .database import PostgresDatabase

log = logging.getLogger(__name__)

_ACTIVE = "state IN ('queued', 'running')"
_COLUMNS = ("id, kind, state, phase, progress, params, metrics, version, parent, error, pid, created_at, updated_at, "
            "finished_at")


def _now() -> str:
    return datetime.now(UTC).isoformat()


def lease_error(replica: str) -> str:
    return (f"the replica running it ({replica}) stopped renewing its lease (stopped, killed, or cut off from the "
            "database); start a new job")


class PostgresJobStore(JobStore):
    """Jobs in ``database``; this replica is ``replica``, its scratch directories in ``home``."""

    def __init__(self, database: PostgresDatabase, home: Path, replica: str, lease_s: float) -> None:
        self.database = database
        self.home = Path(home)
        self.replica = replica
        self.lease_s = lease_s

    def _update(self, job_id: str, assignments: str, values: tuple[Any, ...], *, only_active: bool = False,
                renew: bool = False) -> int:
        lease = ", lease_until = now() + make_interval(secs => %s)" if renew else ""
        condition = f" AND {_ACTIVE}" if only_active else ""
        with self.database.connect() as conn:
            return int(conn.execute(
                f"UPDATE jobs SET {assignments}, updated_at = %s{lease} WHERE id = %s{condition}",  # noqa: S608 - our SQL
                (*values, _now(), *((self.lease_s,) if renew else ()), job_id)).rowcount)

    def get(self, job_id: str) -> Job | None:
        self.fail_orphans()
        with self.database.connect() as conn:
            row = conn.execute(f"SELECT {_COLUMNS} FROM jobs WHERE id = %s", (job_id,)).fetchone()  # noqa: S608
        return Job.model_validate(row) if row else None

    def create(self, params: Mapping[str, Any], parent: str | None, kind: JobKind = "retrain") -> Job:
        import psycopg
        from psycopg.types.json import Jsonb

        self.fail_orphans()
        job_id, now = uuid.uuid4().hex, _now()
        try:
            with self.database.connect() as conn:
                conn.execute(
                    "INSERT INTO jobs (id, kind, state, phase, progress, params, parent, replica, lease_until,"
                    " created_at, updated_at) VALUES (%s, %s, 'queued', 'queued', 0, %s, %s, %s,"
                    " now() + make_interval(secs => %s), %s, %s)",
                    (job_id, kind, Jsonb(dict(params)), parent, self.replica, self.lease_s, now, now))
        except psycopg.errors.UniqueViolation:
            with self.database.connect() as conn:
                row = conn.execute(f"SELECT {_COLUMNS} FROM jobs WHERE {_ACTIVE}").fetchone()  # noqa: S608
            if row is None:  # it ended between our insert and our look: the caller may try again
                raise
            raise JobConflict(Job.model_validate(row)) from None
        job = self.get(job_id)
        if job is None:
            raise RuntimeError(f"job {job_id} vanished right after it was created")
        return job

    def set_pid(self, job_id: str, pid: int) -> None:
        self._update(job_id, "pid = %s", (pid,), renew=True)

    def mark_running(self, job_id: str, pid: int) -> None:
        self._update(job_id, "state = 'running', phase = 'starting', pid = %s", (pid,), renew=True)

    def record_progress(self, job_id: str, phase: str, progress: float) -> None:
        self._update(job_id, "phase = %s, progress = %s", (phase, progress), renew=True)

    def finish(self, job_id: str, state: Literal["succeeded", "rejected"], version: str,
               metrics: Mapping[str, Any]) -> None:
        from psycopg.types.json import Jsonb

        self._update(job_id, "state = %s, phase = 'done', progress = 1, version = %s, metrics = %s, finished_at = %s",
                     (state, version, Jsonb(dict(metrics)), _now()), only_active=True)

    def fail(self, job_id: str, error: str) -> bool:
        remove_scratch(self.home, job_id)
        return self._update(job_id, "state = 'failed', error = %s, finished_at = %s", (error, _now()),
                            only_active=True) > 0

    def renew_lease(self, job_id: str) -> bool:
        with self.database.connect() as conn:
            return conn.execute(
                f"UPDATE jobs SET lease_until = now() + make_interval(secs => %s) WHERE id = %s AND {_ACTIVE}"  # noqa: S608
                " AND replica = %s", (self.lease_s, job_id, self.replica)).rowcount > 0

    def fail_orphans(self) -> int:
        now = _now()
        with self.database.connect() as conn:
            expired = conn.execute(
                f"SELECT id, replica FROM jobs WHERE {_ACTIVE} AND lease_until < now()").fetchall()  # noqa: S608
            failed = 0
            for row in expired:
                failed += conn.execute(
                    f"UPDATE jobs SET state = 'failed', error = %s, updated_at = %s, finished_at = %s"  # noqa: S608
                    f" WHERE id = %s AND {_ACTIVE} AND lease_until < now()",
                    (lease_error(row["replica"]), now, now, row["id"])).rowcount
                log.warning("retrain job %s marked failed: its replica %s stopped renewing its lease", row["id"],
                            row["replica"])
            mine = conn.execute(
                f"SELECT id, pid, state, created_at FROM jobs WHERE {_ACTIVE} AND replica = %s",  # noqa: S608
                (self.replica,)).fetchall()
        for row in mine:  # on this replica a job's process can be looked at directly
            if row["pid"] is None and row["state"] == "queued":
                if (datetime.now(UTC) - datetime.fromisoformat(row["created_at"])).total_seconds() < LAUNCH_GRACE_S:
                    continue
            if not pid_alive(row["pid"], row["id"]) and self.fail(row["id"], ORPHAN_ERROR):
                log.warning("retrain job %s marked failed: its process is gone", row["id"])
                failed += 1
        return failed
