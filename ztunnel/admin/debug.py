"""Debug views for the admin server: the trio task tree and memory usage.

Python has no pprof; these are the closest useful equivalents: which tasks
exist (stuck connections show up as tasks) and where memory goes.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import os
import tracemalloc
from collections import Counter

import trio


def task_tree() -> str:
    """An indented dump of every trio task, from the root task down (call inside trio)."""
    lines: list[str] = []
    _walk(trio.lowlevel.current_root_task(), 0, lines)
    return "\n".join(lines) + "\n"


def _walk(task: trio.lowlevel.Task | None, depth: int, lines: list[str]) -> None:
    if task is None:
        return
    lines.append(f"{'  ' * depth}{task.name}")
    for nursery in task.child_nurseries:
        for child in nursery.child_tasks:
            _walk(child, depth + 1, lines)


def memory_report(top: int = 20) -> dict[str, object]:
    """RSS, gc counters, open fds and (when tracemalloc runs) the top allocation sites."""
    report: dict[str, object] = {
        "rssBytes": _rss_bytes(),
        "gcCounts": list(gc.get_count()),
        "gcCollections": [s["collections"] for s in gc.get_stats()],
        "gcObjects": len(gc.get_objects()),
        "openFds": _open_fds(),
        "tracemalloc": tracemalloc.is_tracing(),
        "topTypes": _top_types(top),
        "malloc": malloc_stats(),
    }
    if tracemalloc.is_tracing():
        report["tracedBytes"] = tracemalloc.get_traced_memory()[0]
        stats = tracemalloc.take_snapshot().statistics("lineno")[:top]
        report["topAllocations"] = [
            {"where": str(s.traceback), "sizeBytes": s.size, "count": s.count} for s in stats
        ]
    return report


def _top_types(top: int) -> list[dict[str, object]]:
    """The most numerous types among the objects the collector tracks (what a leak of
    per-connection state shows up as: thousands of one class)."""
    counts = Counter(type(o) for o in gc.get_objects())
    return [
        {"type": f"{t.__module__}.{t.__qualname__}", "count": n} for t, n in counts.most_common(top)
    ]


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


def malloc_stats() -> dict[str, int] | None:
    """glibc's ``mallinfo2()`` (2.33+): heap in use and free, mmapped chunks; else None."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        fn = ctypes.CDLL(name).mallinfo2
    except (OSError, AttributeError):
        return None
    fn.restype = _MallInfo2
    info = fn()
    return {
        "heapBytes": info.arena,
        "inUseBytes": info.uordblks,
        "freeBytes": info.fordblks,
        "mmappedBytes": info.hblkhd,
    }


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def _open_fds() -> int:
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return 0
