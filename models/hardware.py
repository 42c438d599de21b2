"""What this host offers the process: CPU cores (its CPU affinity, capped by a cgroup CPU quota)
and CUDA GPUs (as the driver reports them).

A container with a CPU limit (``docker run --cpus 2``, a Kubernetes ``limits.cpu``) still sees
every core of the host in its affinity mask and ``os.cpu_count()``; only the cgroup's quota says
it may use two. Worker and thread counts derived from the host's 64 cores would start 64
onnxruntime processes in a 2-CPU pod, each throttled, together out of memory.
"""

from __future__ import annotations

import ctypes
import math
import os
from functools import lru_cache
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


def cgroup_cpu_limit(root: Path = CGROUP_ROOT) -> int | None:
    """CPUs the cgroup's quota allows (rounded up), or None without a quota. Reads cgroup v2's
    ``cpu.max`` ("max 100000" or "200000 100000"), else v1's ``cpu/cpu.cfs_quota_us`` and
    ``cpu/cpu.cfs_period_us`` (a quota of -1 means none)."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
    except (OSError, ValueError):
        pass
    else:
        try:
            return None if quota == "max" else _cpus(int(quota), int(period))
        except ValueError:
            return None
    try:
        quota_us = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period_us = int((root / "cpu" / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return _cpus(quota_us, period_us)


def _cpus(quota: int, period: int) -> int | None:
    if quota <= 0 or period <= 0:
        return None
    return max(1, math.ceil(quota / period))


def cpu_count(cgroup_root: Path = CGROUP_ROOT) -> int:
    """Cores this process may use: its affinity (``os.cpu_count()`` where the OS has none),
    capped by the cgroup CPU quota if there is one."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    limit = cgroup_cpu_limit(cgroup_root)
    return max(1, min(cores, limit) if limit else cores)


@lru_cache(maxsize=1)
def cuda_device_count() -> int:
    """GPUs the CUDA driver reports; 0 without a driver or device (no exception, no log spam).
    Asked of the driver itself, not of onnxruntime: the GPU build of onnxruntime lists the CUDA
    provider on hosts without any GPU."""
    try:
        libcuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return 0
    count = ctypes.c_int(0)
    try:
        if libcuda.cuInit(0) != 0 or libcuda.cuDeviceGetCount(ctypes.byref(count)) != 0:
            return 0
    except AttributeError:
        return 0
    return count.value
