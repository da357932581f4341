"""How many worker processes: ``ZTUNNEL_WORKER_THREADS`` against the CPU the agent may use.

The setting is ztunnel's: a number (``4``) or a share of the CPU quota (``50%``); unset,
the agent takes the quota itself, as ztunnel does when a CPU limit is set. The quota is
the cgroup's (v2 ``cpu.max``, v1 ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``, the
tightest limit on the way up the hierarchy), capped by the CPUs the process may run on
(``sched_getaffinity``), and never below one.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
# ``run_forever`` (the agent owns its process) resolves "unset" to the quota; an agent
# embedded with ``Agent.run`` (tests, tools) stays in one process unless told otherwise.
EMBEDDED_DEFAULT = 1


def parse_spec(value: str) -> tuple[int, bool]:
    """``"4"`` -> (4, False), ``"50%"`` -> (50, True); raises ValueError."""
    text = value.strip()
    percent = text.endswith("%")
    number = int(text[:-1] if percent else text)
    if number < 1 or (percent and number > 100):
        raise ValueError(f"expected a number >= 1 or a percentage 1%..100%, got {value!r}")
    return number, percent


def resolve(spec: str | None, quota: Callable[[], int] | None = None) -> int:
    """The worker count for ``spec`` (None: the CPU quota)."""
    cpus = quota or cpu_quota
    if spec is None:
        return cpus()
    number, percent = parse_spec(spec)
    if not percent:
        return number
    return max(1, math.ceil(cpus() * number / 100))


def cpu_quota(root: Path = CGROUP_ROOT, proc_cgroup: str = "/proc/self/cgroup") -> int:
    """Whole CPUs this process may use: the cgroup limit rounded up, capped by affinity."""
    available = len(os.sched_getaffinity(0))
    limit = cgroup_cpu_limit(root, _read(proc_cgroup) or "")
    if limit is None:
        return max(1, available)
    return max(1, min(available, math.ceil(limit)))


def cgroup_cpu_limit(root: Path, proc_cgroup: str) -> float | None:
    """The tightest CPU limit (in CPUs) of the cgroups ``proc_cgroup`` names, or None."""
    limits: list[float] = []
    for line in proc_cgroup.splitlines():
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if not hierarchy:
            continue
        if hierarchy == "0" and not controllers:  # v2 unified
            limits += _walk(root, path, _v2_limit)
        elif "cpu" in controllers.split(","):  # v1
            base = root / controllers  # "cpu,cpuacct" is often mounted as one directory
            limits += _walk(base if base.exists() else root / "cpu", path, _v1_limit)
    return min(limits) if limits else None


def _walk(base: Path, path: str, reader: Callable[[Path], float | None]) -> list[float]:
    """The limits set on ``path`` and each of its ancestors under ``base``."""
    found = []
    parts = [p for p in path.split("/") if p]
    for depth in range(len(parts), -1, -1):
        limit = reader(base.joinpath(*parts[:depth]))
        if limit is not None:
            found.append(limit)
    return found


def _v2_limit(directory: Path) -> float | None:
    fields = (_read(directory / "cpu.max") or "").split()
    if len(fields) != 2 or fields[0] == "max":
        return None
    return _ratio(fields[0], fields[1])


def _v1_limit(directory: Path) -> float | None:
    quota = _read(directory / "cpu.cfs_quota_us")
    period = _read(directory / "cpu.cfs_period_us")
    if not quota or not period or quota.strip() == "-1":
        return None
    return _ratio(quota, period)


def _ratio(quota: str, period: str) -> float | None:
    try:
        q, p = int(quota), int(period)
    except ValueError:
        return None
    return q / p if q > 0 and p > 0 else None


def _read(path: str | Path) -> str | None:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return None
