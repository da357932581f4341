"""Give memory back after a burst of connections: a full garbage collection, then
``malloc_trim(0)``.

Theory of operation: an ended HBONE connection leaves its h2 state (the connection,
its streams, window managers, HPACK tables; about 10 objects per stream) in reference
cycles (h2's frame dispatch table holds bound methods of the connection), which only a
collection of the oldest generation frees. CPython runs that one rarely on a large heap
(its threshold grows with the number of long-lived objects), so after 500 connections x
10 streams the agent kept ~150 MiB for minutes (docs/reliability.md, "Memory after a
burst"). Freed objects alone do not lower RSS either: glibc keeps freed heap until it is
trimmed, and pymalloc keeps every arena with one live object.

What pins the arenas after a burst is found by scanning pymalloc's pools (see
docs/reliability.md): CPython 3.11's type attribute cache (4,096 entries) keeps a strong
reference to every attribute *name* it caches, and names built at run time by C code
(``PyObject_CallMethod(tzinfo, "utcoffset")`` in datetime, and others) are new,
non-interned strings keyed by address, so each call fills another entry. After a burst
a few thousand such 10-byte strings sat scattered over a hundred 1 MiB arenas, which
pymalloc cannot return while one object in them lives. ``sys._clear_type_cache()``
drops them (the cache refills from the next lookups).

So a ``Reclaimer`` counts ended connections (HBONE connections and, from the caller,
the proxied connections the tracker closed: those can end seconds later); once
``min_ended`` have ended since the last reclaim and the burst is over (none ended during
the last check interval), or ``max_delay`` passed while connections keep ending, it
clears the type cache, runs ``gc.collect()`` and ``malloc_trim(0)`` (glibc only). That
takes milliseconds to tens of milliseconds on the event loop, at most once per
``interval`` and only after a burst, never per connection.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
from collections.abc import Callable
from dataclasses import dataclass

# Documented in ``sys`` (CPython-specific, hence the underscore).
from sys import _clear_type_cache

import structlog
import trio

from ztunnel.hbone.connection import ended_connections

__all__ = ["Reclaimer", "ended_connections", "reclaim", "run"]

log = structlog.get_logger("ztunnel.hbone.reclaim")


@dataclass
class Reclaimer:
    """When to reclaim (pure: the caller passes the count and the time)."""

    min_ended: int = 64  # fewer ended connections are not worth a full collection
    max_delay: float = 30.0  # reclaim at least this often while connections keep ending
    _reclaimed_at_count: int = 0
    _reclaimed_at: float = 0.0
    _last_count: int = 0

    def start(self, count: int, now: float) -> None:
        self._reclaimed_at_count = self._last_count = count
        self._reclaimed_at = now

    def due(self, count: int, now: float) -> bool:
        """True if memory should be reclaimed now; the caller then reclaims."""
        pending = count - self._reclaimed_at_count
        still_ending = count != self._last_count
        self._last_count = count
        if pending < self.min_ended:
            return False
        if still_ending and now - self._reclaimed_at < self.max_delay:
            return False
        self._reclaimed_at_count = count
        self._reclaimed_at = now
        return True


def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or None (musl, macOS)."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        trim = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


_trim = _malloc_trim()


def reclaim() -> int:
    """Drop the type cache's names, collect every generation and trim the C heap;
    returns the objects collected."""
    _clear_type_cache()
    collected = gc.collect()
    if _trim is not None:
        _trim(0)
    return collected


async def run(
    interval: float = 2.0,
    policy: Reclaimer | None = None,
    count: Callable[[], int] = ended_connections,
) -> None:
    """Reclaim after connection bursts, forever (start it in the process's nursery)."""
    policy = policy or Reclaimer()
    policy.start(count(), trio.current_time())
    while True:
        await trio.sleep(interval)
        if policy.due(count(), trio.current_time()):
            collected = reclaim()
            log.debug("memory reclaimed", objects=collected)
