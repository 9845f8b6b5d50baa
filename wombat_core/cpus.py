"""How many CPUs this process may really use: its affinity, capped by its cgroup's CPU quota.

`os.cpu_count()` and even the affinity mask report the node's cores inside a Kubernetes pod; the pod's
`resources.limits.cpu` is enforced as a CFS quota (cgroup v2 `cpu.max`, v1 `cpu.cfs_quota_us`). An OpenMP
team sized to the node on a 4-CPU quota gets throttled every period, and that costs more than the
threads give. Kubernetes does not set an affinity mask unless the static CPU manager pins the pod.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP_V2 = Path("/sys/fs/cgroup/cpu.max")
CGROUP_V1 = (Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us"), Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us"))


def cgroup_cpu_limit(v2: Path = CGROUP_V2, v1: tuple[Path, Path] = CGROUP_V1) -> int | None:
    """The CPU quota in whole CPUs (rounded up), or None when there is none or it cannot be read."""
    try:
        quota, period = v2.read_text().split()[:2]
        if quota == "max":
            return None
        return max(1, math.ceil(int(quota) / int(period)))
    except (OSError, ValueError):
        pass
    try:
        quota_us, period_us = (int(path.read_text()) for path in v1)
    except (OSError, ValueError):
        return None
    return max(1, math.ceil(quota_us / period_us)) if quota_us > 0 else None


def available_cpus(v2: Path = CGROUP_V2, v1: tuple[Path, Path] = CGROUP_V1) -> int:
    """The CPUs this process should size its thread pools to."""
    affinity = len(os.sched_getaffinity(0))
    limit = cgroup_cpu_limit(v2, v1)
    return min(affinity, limit) if limit is not None else affinity
