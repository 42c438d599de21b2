"""Starting retrain jobs: whether a retrain can run at all, and running each one in its own
process (``python -m service.job_process JOB_ID``) at a lower CPU priority than serving.

The job's record lives in the job store (:mod:`store.jobs`). The serving worker that launched a job
waits for its process, so when the process dies without recording a result (killed, crashed) the
job is failed at once with the signal that killed it; otherwise the next look at the job store
fails it (:meth:`store.jobs.JobStore.fail_orphans`).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

from models.retrain import RetrainRefused, check_retrainable
from store.jobs import JobStore
from store.labels import LabelStore
from store.registry import ModelRegistry, ModelVersion

log = logging.getLogger(__name__)


def retrainable_parent(registry: ModelRegistry, labels: LabelStore) -> ModelVersion:
    """The active version, if a retrain from it can produce a classifier; else
    :class:`~models.retrain.RetrainRefused` with the reason."""
    parent = registry.active()
    if parent is None:
        raise RetrainRefused("no active model version to retrain from: run `python -m training bootstrap` "
                             "(in the trainer image, on the same state)")
    _, targets = parent.training_embeddings()
    check_retrainable(labels.counts(), parent.spec.labels, targets)
    return parent


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


def launch(jobs: JobStore, home: Path, job_id: str) -> int:
    """Start the job in its own process, its output in ``home/jobs/JOB_ID.log``. Returns its pid."""
    logs = home / "jobs"
    logs.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "TRANSFER_SERVE_HOME": str(home)}
    with (logs / f"{job_id}.log").open("ab") as log_file:
        process = subprocess.Popen(  # noqa: S603 - this interpreter, our module, a job id we generated
            [sys.executable, "-m", "service.job_process", job_id, "--parent-pid", str(os.getpid())],
            cwd=Path(__file__).resolve().parents[1], env=env, stdout=log_file, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    reaper = threading.Thread(target=_reap, args=(process, jobs, job_id), name=f"reap-{job_id[:8]}", daemon=True)
    reaper.start()
    return process.pid


def _reap(process: subprocess.Popen[bytes], jobs: JobStore, job_id: str) -> None:
    """Wait for the job's process (no zombies); if it died without recording a result (killed,
    crashed), fail the job now with the reason rather than when someone next looks."""
    returncode = process.wait()
    try:
        if jobs.fail(job_id, exit_reason(returncode)):
            log.error("retrain job %s failed: %s", job_id, exit_reason(returncode))
    except Exception as exc:  # noqa: BLE001 - the next look at the job marks it failed instead
        log.warning("could not record the end of retrain job %s: %s", job_id, exc)
