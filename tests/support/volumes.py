"""Volumes that run out of space or turn read-only, for the storage tests: a small tmpfs
(needs ``mount``, as root; the test is skipped without it), filled or remounted read-only."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.polling import eventually


def run_mount(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["mount", *args], capture_output=True, text=True, check=False)


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    path.mkdir(parents=True)
    mounted = run_mount("-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)) if shutil.which("mount") else None
    if mounted is None or mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.strip() if mounted else 'no mount command'})")
    try:
        yield path
    finally:
        if subprocess.run(["umount", str(path)], check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], check=False)


def remount_read_only(volume: Path, timeout: float = 30) -> None:
    """``mount -o remount,ro``, retried while the volume is busy: the failed retrain job's
    process may still hold its log file open for writing for a moment after it reported."""
    stderr = ""

    def remounted() -> bool:
        nonlocal stderr
        done = run_mount("-o", "remount,ro", str(volume))
        stderr = done.stderr
        if done.returncode != 0 and "busy" not in stderr:
            pytest.fail(f"cannot remount {volume} read-only: {stderr}")
        return done.returncode == 0

    eventually(remounted, timeout=timeout, interval=0.2, message=lambda: f"cannot remount {volume} read-only: {stderr}")


def fill(volume: Path, name: str, leave: int) -> Path:
    """A file that takes all the free space of ``volume`` but ``leave`` bytes."""
    stats = os.statvfs(volume)
    free = stats.f_bavail * stats.f_frsize
    filler = volume / name
    with filler.open("wb") as fh:
        remaining = free - leave
        block = bytes(1 << 20)
        while remaining > 0:
            try:
                remaining -= fh.write(block[: min(len(block), remaining)])
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                break
    return filler
