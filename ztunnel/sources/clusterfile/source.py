"""The cluster file as a pod source: ``ztunnel run --cluster FILE --cluster-prefix P``.

``ClusterFileSource`` yields a ``PodSnapshot`` whenever the file changes (polled):
this node's pods, each with ``NetnsRef("/var/run/netns/<prefix>-pod-<ns>-<name>")``
and its mesh verdict, and the whole mesh's state (workloads, services, and the
file's policies translated together with the ``--policies`` directory's).

A bad edit (one the parser, the layout or the policy translator rejects) is logged
with the field it breaks and skipped: the last good snapshot stays in force, so a
typo never un-enrolls a pod.
"""

from __future__ import annotations

import os
import re
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import structlog
import trio

from ztunnel.errors import ConfigError
from ztunnel.model.pod import PodSnapshot
from ztunnel.policy.istio import PolicyDocuments, read_policy_dir
from ztunnel.sources.clusterfile.mesh import snapshot
from ztunnel.sources.clusterfile.spec import load_spec

log = structlog.get_logger("ztunnel.sources.clusterfile")

# (mtime_ns, size, inode, dev): an editor's atomic rename changes the inode even when
# the mtime lands in the same timestamp tick, so all four are compared.
FileStamp = tuple[int, int, int, int]
# The prefix goes into netns paths: keep it a plain name that cannot leave /var/run/netns.
_PREFIX_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


def _stamp(path: Path) -> FileStamp | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino, st.st_dev)


def check_prefix(prefix: str | None) -> str:
    if not prefix:
        raise ConfigError(
            "--cluster-prefix",
            "",
            "required with --cluster (the prefix the cluster was built with)",
        )
    if not _PREFIX_RE.match(prefix) or prefix in (".", ".."):
        raise ConfigError("--cluster-prefix", prefix, "expected letters, digits, '.', '_', '-'")
    return prefix


class ClusterFileSource:
    """This node's view of a cluster file, re-read whenever it changes (every ``poll`` s)."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        prefix: str,
        node: str,
        *,
        policy_files: Sequence[PolicyDocuments] = (),
        poll: float = 0.5,
    ) -> None:
        self.path = Path(path)
        self.prefix = check_prefix(prefix)
        self.node = node
        self.policy_files = list(policy_files)
        self.poll = poll
        self.last_good: PodSnapshot | None = None
        self.last_error: ConfigError | None = None

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        prefix: str | None,
        node: str,
        *,
        policy_dir: str | None = None,
        poll: float = 0.5,
    ) -> tuple[ClusterFileSource, PodSnapshot]:
        """Validate the file, prefix, node and policies before anything starts; the source
        and its first snapshot. Raises ConfigError naming what is wrong."""
        files = read_policy_dir(policy_dir) if policy_dir is not None else []
        source = cls(path, check_prefix(prefix), node, policy_files=files, poll=poll)
        return source, source.load()

    def load(self) -> PodSnapshot:
        """Read and derive one snapshot now (blocking). Raises ConfigError."""
        spec = load_spec(self.path)
        if self.node not in spec.nodes:
            raise ConfigError(
                "NODE_NAME",
                self.node,
                f"not a node of {self.path} (nodes: {', '.join(spec.nodes)})",
            )
        snap, warnings = snapshot(spec, self.prefix, self.node, self.policy_files)
        for warning in warnings:
            log.warning("policy skipped", message=warning)
        self.last_good, self.last_error = snap, None
        return snap

    def __aiter__(self) -> AsyncIterator[PodSnapshot]:
        return self._snapshots()

    async def _snapshots(self) -> AsyncIterator[PodSnapshot]:
        seen: FileStamp | None = None
        while True:
            stamp = await trio.to_thread.run_sync(_stamp, self.path)
            if stamp is not None and stamp != seen:
                seen = stamp
                snap = await self._read()
                if snap is not None:
                    yield snap
            elif stamp is None and seen is not None:
                seen = None
                log.warning(
                    "cluster file unreadable; keeping the last good snapshot", path=str(self.path)
                )
            await trio.sleep(self.poll)

    async def _read(self) -> PodSnapshot | None:
        try:
            return await trio.to_thread.run_sync(self.load)
        except ConfigError as exc:
            self.last_error = exc
            log.warning(
                "cluster file rejected; keeping the last good snapshot",
                path=str(self.path),
                field=exc.field,
                problem=exc.problem,
            )
        except Exception as exc:  # whatever a bad edit triggers, it must never end the agent
            self.last_error = ConfigError(str(self.path), "", f"cannot load: {exc!r}")
            log.exception(
                "cluster file rejected; keeping the last good snapshot", path=str(self.path)
            )
        return None
