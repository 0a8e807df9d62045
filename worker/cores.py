"""How many CPU cores this process may use."""

from __future__ import annotations

import math
import os


def usable_cores(cpu_max: str = "/sys/fs/cgroup/cpu.max") -> int:
    """This process's CPU cores: its affinity (``taskset``, a cpuset), capped by a cgroup v2 CPU
    quota. A container's CPU limit is such a quota, and ``os.cpu_count()`` counts the whole node,
    so threads sized by it time-slice on the cores the limit allows.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        with open(cpu_max) as fh:
            quota, period = fh.read().split()[:2]
        if quota != "max":
            cores = min(cores, math.ceil(int(quota) / int(period)))
    except (OSError, ValueError):
        pass  # no cgroup v2 quota: the affinity is the limit
    return max(1, cores)
