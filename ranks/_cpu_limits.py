"""How many cores this process may really use: its CPU affinity and its cgroup's CPU quota.

``os.cpu_count()`` counts the machine's cores; a container or a systemd slice
often gets fewer. Two limits apply, and the smaller one wins:

==============  ==================================================================
limit           where it is read
==============  ==================================================================
affinity        ``os.sched_getaffinity(0)`` (taskset, cpuset cgroups, mpirun binding)
cgroup v2       ``cpu.max`` ("QUOTA PERIOD" or "max PERIOD") of this process's cgroup
                and of every ancestor, under the unified mount (``/sys/fs/cgroup``,
                or ``/sys/fs/cgroup/unified`` on hybrid hosts)
cgroup v1       ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us`` (-1: no quota) of the
                ``cpu`` controller, for this process's cgroup and its ancestors
==============  ==================================================================

A quota of 1.5 CPUs counts as 1 usable core (rounded down, at least 1), as
Go's automaxprocs does: threads beyond the quota are throttled, not run.
The cgroup paths come from ``/proc/self/cgroup``; inside a container whose
cgroup namespace is not private that path does not exist under the mount,
and the mount's own top-level files are read instead.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
SELF_CGROUP = Path("/proc/self/cgroup")


@dataclass(frozen=True)
class CpuBudget:
    """The usable core count and where it comes from (for messages)."""

    usable: int
    cores: tuple[int, ...]  # the cores of this process's CPU affinity
    quota: float | None  # CPUs the cgroup quota allows; None: no quota found

    def describe(self) -> str:
        quota = "no cgroup CPU quota" if self.quota is None else f"a cgroup CPU quota of {self.quota:g} CPUs"
        return f"{self.usable} usable cores ({len(self.cores)} in this process's CPU affinity, {quota})"


def cpu_budget(root: Path = CGROUP_ROOT, self_cgroup: Path = SELF_CGROUP) -> CpuBudget:
    """The cores this process may use: its affinity, capped by its cgroup's CPU quota."""
    cores = tuple(sorted(os.sched_getaffinity(0)))
    quota = cgroup_cpu_quota(root, self_cgroup)
    usable = len(cores) if quota is None else max(1, min(len(cores), math.floor(quota)))
    return CpuBudget(usable, cores, quota)


def cgroup_cpu_quota(root: Path = CGROUP_ROOT, self_cgroup: Path = SELF_CGROUP) -> float | None:
    """CPUs the tightest cgroup CPU quota (v2 or v1) on this process allows, or None when there is none."""
    paths = _cgroup_paths(self_cgroup)
    limits = []
    for mount in (root, root / "unified"):
        for folder in _folders(mount, paths.get("", "/")):
            limits.append(_v2_limit(folder / "cpu.max"))
    for controller in ("cpu", "cpu,cpuacct", "cpuacct,cpu"):
        for folder in _folders(root / controller, paths.get("cpu", "/")):
            limits.append(_v1_limit(folder))
    limits = [limit for limit in limits if limit is not None]
    return min(limits) if limits else None


def _cgroup_paths(self_cgroup: Path) -> dict[str, str]:
    """``/proc/self/cgroup`` -> {controller: path}; the v2 hierarchy under the key ""."""
    paths: dict[str, str] = {}
    try:
        text = self_cgroup.read_text()
    except OSError:
        return paths
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        for controller in controllers.split(",") if controllers else [""]:
            paths[controller] = path
    return paths


def _folders(mount: Path, path: str) -> list[Path]:
    """This cgroup's folder under ``mount`` and every ancestor up to the mount (those that exist)."""
    if not mount.is_dir():
        return []
    folders = [mount]
    current = mount
    for part in [p for p in path.split("/") if p]:
        current = current / part
        if not current.is_dir():
            break  # a path from another cgroup namespace: only the mount's own files apply
        folders.append(current)
    return folders


def _v2_limit(path: Path) -> float | None:
    try:
        quota, period = path.read_text().split()[:2]
        if quota == "max":
            return None
        return int(quota) / int(period) if int(period) > 0 and int(quota) > 0 else None
    except (OSError, ValueError):
        return None


def _v1_limit(folder: Path) -> float | None:
    try:
        quota = int((folder / "cpu.cfs_quota_us").read_text())
        period = int((folder / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return quota / period if quota > 0 and period > 0 else None
