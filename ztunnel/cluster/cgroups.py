"""The cgroup v2 hierarchy of a simulated cluster: where it is, and removing it.

A cluster whose pods run as the kubelet runs them (``cluster/kubelet.py``) keeps every pod
cgroup under ``<cgroup2 mount>/<prefix>``; ``ClusterNet.teardown`` and ``cleanup_stale``
remove that tree with the cluster's network namespaces. The cgroup2 mount is found at run
time (``/sys/fs/cgroup`` on a pure v2 host, ``/sys/fs/cgroup/unified`` on a hybrid one).
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path

MOUNTINFO = "/proc/self/mountinfo"


def cgroup2_mount(mountinfo: str = MOUNTINFO) -> Path | None:
    """The first cgroup2 mount point of this mount namespace, None without one."""
    try:
        with open(mountinfo, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for line in lines:
        left, _, right = line.partition(" - ")
        fields = left.split()
        if right.split()[:1] == ["cgroup2"] and len(fields) > 4:
            return Path(fields[4])
    return None


def cluster_root(prefix: str, mount: Path | None = None) -> Path | None:
    """``<cgroup2 mount>/<prefix>``: the cluster's pod cgroups (None without cgroup v2)."""
    mount = mount or cgroup2_mount()
    return mount / prefix if mount is not None else None


def _pids(tree: Path) -> list[int]:
    pids = []
    for procs in tree.rglob("cgroup.procs"):
        with contextlib.suppress(OSError, ValueError):
            pids += [int(p) for p in procs.read_text().split()]
    return pids


def remove_tree(tree: Path, timeout: float = 5.0) -> list[str]:
    """Kill every process in the cgroup tree, then remove its directories deepest first;
    returns the removed paths. A cgroup directory can only go once it holds no process."""
    if not tree.is_dir():
        return []
    for pid in _pids(tree):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + timeout
    while _pids(tree) and time.monotonic() < deadline:
        time.sleep(0.02)  # SIGKILLed tasks leave their cgroup as they exit
    removed = []
    for d in sorted((p for p in tree.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
        with contextlib.suppress(OSError):
            d.rmdir()
            removed.append(str(d))
    with contextlib.suppress(OSError):
        tree.rmdir()
        removed.append(str(tree))
    return removed


def remove_cluster_cgroups(prefix: str, mount: Path | None = None) -> list[str]:
    root = cluster_root(prefix, mount)
    return remove_tree(root) if root is not None else []


def cluster_prefixes(mount: Path | None = None) -> list[str]:
    """Names directly under the cgroup2 mount that look like a cluster prefix's."""
    mount = mount or cgroup2_mount()
    if mount is None or not mount.is_dir():
        return []
    return sorted(
        p.name
        for p in mount.iterdir()
        if p.is_dir() and len(p.name) == 8 and p.name.startswith("zt")
    )
