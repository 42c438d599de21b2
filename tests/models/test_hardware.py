"""``models/hardware.py``, unit level: core counting, the CPU affinity capped by a cgroup CPU
quota, read from cgroup v2 or v1 files (fake cgroup trees in a temporary directory: the parsing is
the logic under test)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from models.hardware import cgroup_cpu_limit, cpu_count


def v2(root: Path, cpu_max: str) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "cpu.max").write_text(cpu_max + "\n")
    return root


def v1(root: Path, quota: str, period: str = "100000") -> Path:
    (root / "cpu").mkdir(parents=True, exist_ok=True)
    (root / "cpu" / "cpu.cfs_quota_us").write_text(quota + "\n")
    (root / "cpu" / "cpu.cfs_period_us").write_text(period + "\n")
    return root


@pytest.mark.parametrize(("cpu_max", "expected"), [
    ("max 100000", None),        # no limit
    ("200000 100000", 2),        # --cpus 2
    ("150000 100000", 2),        # 1.5 CPUs: rounded up
    ("50000 100000", 1),         # half a CPU: still one
    ("garbage", None),
])
def test_cgroup_v2_quota(tmp_path: Path, cpu_max: str, expected: int | None) -> None:
    assert cgroup_cpu_limit(v2(tmp_path, cpu_max)) == expected


@pytest.mark.parametrize(("quota", "period", "expected"), [
    ("-1", "100000", None),      # no limit (this machine)
    ("400000", "100000", 4),
    ("250000", "100000", 3),
    ("0", "100000", None),
    ("x", "100000", None),
])
def test_cgroup_v1_quota(tmp_path: Path, quota: str, period: str, expected: int | None) -> None:
    assert cgroup_cpu_limit(v1(tmp_path, quota, period)) == expected


def test_no_cgroup_files_means_no_limit(tmp_path: Path) -> None:
    assert cgroup_cpu_limit(tmp_path) is None


def test_v2_wins_over_v1_files(tmp_path: Path) -> None:
    v1(tmp_path, "800000")
    assert cgroup_cpu_limit(v2(tmp_path, "100000 100000")) == 1


def test_cpu_count_is_the_affinity_capped_by_the_quota(tmp_path: Path) -> None:
    affinity = len(os.sched_getaffinity(0))
    assert cpu_count(tmp_path / "none") == affinity
    assert cpu_count(v2(tmp_path / "one", "100000 100000")) == 1
    assert cpu_count(v2(tmp_path / "many", f"{(affinity + 8) * 100000} 100000")) == affinity  # never above
