"""Find a running pod's network namespace from the node's /proc (istio-cni's way).

The kubelet puts every container of a pod in a cgroup whose path holds the pod UID:

- cgroupfs driver: ``/kubepods/[besteffort|burstable/]pod<uid>/<container id>``
- systemd driver: ``/kubepods.slice/kubepods-<qos>.slice/kubepods-<qos>-pod<uid with _>.slice/
  cri-containerd-<id>.scope`` (guaranteed pods sit directly in ``kubepods.slice``)

in every cgroup v1 hierarchy and in the v2 one (``0::``); inside a cgroup namespace the
path may start with ``/../..``. So: for every process, read ``/proc/<pid>/cgroup``, take
the pod UID, and use ``/proc/<pid>/ns/net``. Three checks keep a wrong namespace out:

- the host's netns (``/proc/1/ns/net``) is never a pod's, even if a process claims it;
- of several processes, the oldest wins (the sandbox's pause process, which holds the netns
  for the pod's whole life; a later ``kubectl exec`` into another netns does not);
- the namespace must hold one of the pod's IPs (read from ``/proc/<pid>/net/fib_trie`` and
  ``if_inet6``, no setns needed), so a process of the pod transiting another netns is
  refused.

``HOST_PROC`` points at the host's /proc when the agent runs in a container.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from ipaddress import IPv6Address, ip_address

from ztunnel.model.address import IPAddress
from ztunnel.model.pod import NetnsRef

_UUID = (
    r"[0-9a-fA-F]{8}[-_]?[0-9a-fA-F]{4}[-_]?[0-9a-fA-F]{4}[-_]?[0-9a-fA-F]{4}[-_]?[0-9a-fA-F]{12}"
)
_POD_UID = re.compile(rf"(?:^|[/_.:-])pod({_UUID})(?=$|[/_.:-])")
_FIB_LOCAL = re.compile(r"\|-- (\S+)\n\s+/32 host LOCAL")


def normalize_uid(uid: str) -> str:
    """A pod UID without separators, lower case: the same for ``a-b`` (API), ``a_b``
    (systemd slice names) and the dash-less config hashes of static pods."""
    return uid.replace("-", "").replace("_", "").lower()


def pod_uid_from_cgroup(text: str) -> str | None:
    """The (normalized) pod UID of a ``/proc/<pid>/cgroup`` file, or None when the process
    is in no pod's cgroup or its hierarchies name two different pods."""
    found: set[str] = set()
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        for m in _POD_UID.finditer(parts[2]):
            found.add(normalize_uid(m.group(1)))
    return found.pop() if len(found) == 1 else None


def local_ips(fib_trie: str, if_inet6: str) -> set[IPAddress]:
    """The addresses a netns owns, from its ``net/fib_trie`` (IPv4 ``/32 host LOCAL``
    entries) and ``net/if_inet6`` (32 hex digits per line)."""
    out: set[IPAddress] = set()
    for m in _FIB_LOCAL.finditer(fib_trie):
        try:
            out.add(ip_address(m.group(1)))
        except ValueError:
            continue
    for line in if_inet6.splitlines():
        word = line.split(" ", 1)[0]
        if len(word) == 32:
            try:
                out.add(IPv6Address(int(word, 16)))
            except ValueError:
                continue
    return out


def start_time(stat: str) -> int | None:
    """Field 22 of ``/proc/<pid>/stat`` (ticks since boot); the command may hold spaces and
    parentheses, so fields are counted after the last ``)``."""
    tail = stat[stat.rfind(")") + 1 :].split()
    try:
        return int(tail[19])
    except (IndexError, ValueError):
        return None


@dataclass(frozen=True, slots=True)
class FoundNetns:
    """A pod's netns as found: which process, when it started, and the netns identity."""

    pid: int
    start: int
    ident: tuple[int, int]  # (st_dev, st_ino) of the nsfs inode
    ref: NetnsRef


class ProcNetnsFinder:
    """Scans a /proc tree (``root``) for the network namespaces of given pods."""

    def __init__(self, root: str = "/proc") -> None:
        self.root = root.rstrip("/") or "/"

    def _read(self, *parts: str) -> str | None:
        try:
            with open(os.path.join(self.root, *parts), encoding="utf-8", errors="replace") as f:
                return f.read()
        except OSError:
            return None  # processes come and go while we scan

    def _ident(self, pid: str) -> tuple[int, int] | None:
        try:
            st = os.stat(os.path.join(self.root, pid, "ns", "net"))
        except OSError:
            return None
        return (st.st_dev, st.st_ino)

    def host_netns(self) -> tuple[int, int] | None:
        return self._ident("1")

    def find(self, pods: Mapping[str, Sequence[IPAddress]]) -> dict[str, FoundNetns]:
        """For each wanted pod (``metadata.uid`` → its IPs), its netns, if one is found.

        A pod without IPs is skipped: ownership cannot be verified yet (its sandbox is not
        ready, and the next pod update brings the IPs)."""
        wanted = {normalize_uid(uid): (uid, set(ips)) for uid, ips in pods.items() if ips}
        if not wanted:
            return {}
        host = self.host_netns()
        best: dict[str, FoundNetns] = {}
        for pid in self._pids():
            candidate = self._candidate(pid, wanted, host)
            if candidate is None:
                continue
            uid, found = candidate
            current = best.get(uid)
            if current is None or found.start < current.start:
                best[uid] = found
        return best

    def _pids(self) -> Iterable[str]:
        try:
            names = os.listdir(self.root)
        except OSError:
            return []
        return sorted((n for n in names if n.isdigit()), key=int)

    def _candidate(
        self,
        pid: str,
        wanted: Mapping[str, tuple[str, set[IPAddress]]],
        host: tuple[int, int] | None,
    ) -> tuple[str, FoundNetns] | None:
        cgroup = self._read(pid, "cgroup")
        uid = pod_uid_from_cgroup(cgroup) if cgroup else None
        if uid is None or uid not in wanted:
            return None
        ident = self._ident(pid)
        stat = self._read(pid, "stat")
        start = start_time(stat) if stat else None
        if ident is None or start is None or ident == host:
            return None
        original_uid, ips = wanted[uid]
        owned = local_ips(
            self._read(pid, "net", "fib_trie") or "", self._read(pid, "net", "if_inet6") or ""
        )
        if not ips & owned:
            return None
        ref = NetnsRef(os.path.join(self.root, pid, "ns", "net"))
        return original_uid, FoundNetns(int(pid), start, ident, ref)

    def still_valid(self, found: FoundNetns) -> bool:
        """The process still lives (same start time, so not a reused pid) in the same netns."""
        pid = str(found.pid)
        stat = self._read(pid, "stat")
        return (
            stat is not None and start_time(stat) == found.start and self._ident(pid) == found.ident
        )
