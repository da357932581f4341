"""Where the agent learns which pods exist: a stream of cluster snapshots.

``PodSource`` is the seam between enrollment and the outside world: the cluster
file today, a Kubernetes watch later. A source yields a full ``ClusterSpec``
whenever something changed; the controller reconciles against the newest one, so
sources never need to compute diffs.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Protocol

import structlog
import trio

from ztunnel.cluster.spec import ClusterSpec, load_spec
from ztunnel.errors import ConfigError

log = structlog.get_logger("ztunnel.enroll")

# (mtime_ns, size, inode, dev): an editor's atomic rename changes the inode even when
# the mtime lands in the same timestamp tick, so all four are compared.
FileStamp = tuple[int, int, int, int]


class PodSource(Protocol):
    """Async iteration of cluster snapshots; the first one comes without delay."""

    def __aiter__(self) -> AsyncIterator[ClusterSpec]: ...


def _stamp(path: Path) -> FileStamp | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino, st.st_dev)


class ClusterFileSource:
    """Re-reads a cluster file whenever it changes (polled every ``poll`` seconds).

    A bad edit is logged with the field it breaks (any other failure to load it, too)
    and skipped: the last good snapshot stays in force, so a typo never un-enrolls a pod.
    """

    def __init__(self, path: str | os.PathLike[str], poll: float = 0.5) -> None:
        self.path = Path(path)
        self.poll = poll
        self.last_good: ClusterSpec | None = None
        self.last_error: ConfigError | None = None

    def __aiter__(self) -> AsyncIterator[ClusterSpec]:
        return self._snapshots()

    async def _snapshots(self) -> AsyncIterator[ClusterSpec]:
        seen: FileStamp | None = None
        while True:
            stamp = await trio.to_thread.run_sync(_stamp, self.path)
            if stamp is not None and stamp != seen:
                seen = stamp
                spec = await self._read()
                if spec is not None:
                    yield spec
            elif stamp is None and seen is not None:
                seen = None
                log.warning(
                    "cluster file unreadable; keeping the last good snapshot", path=str(self.path)
                )
            await trio.sleep(self.poll)

    async def _read(self) -> ClusterSpec | None:
        try:
            spec = await trio.to_thread.run_sync(load_spec, self.path)
        except ConfigError as exc:
            self.last_error = exc
            log.warning(
                "cluster file rejected; keeping the last good snapshot",
                path=str(self.path),
                field=exc.field,
                problem=exc.problem,
            )
            return None
        except Exception as exc:  # whatever a bad edit triggers, it must never end the agent
            self.last_error = ConfigError(str(self.path), "", f"cannot load: {exc!r}")
            log.error(
                "cluster file rejected; keeping the last good snapshot",
                path=str(self.path),
                error=repr(exc),
            )
            return None
        self.last_good, self.last_error = spec, None
        return spec
