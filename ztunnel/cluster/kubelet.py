"""Pods of the simulated cluster run as the kubelet runs them: in cgroups named by pod UID.

The Kubernetes pod source finds a running pod's network namespace through the node's
/proc: a process whose cgroup path holds the pod's UID (``sources/kubernetes/procfs.py``).
So here, as the kubelet lays pods out with the systemd cgroup driver on cgroup v2, each pod
of a running cluster gets

    <cgroup2 mount>/<prefix>/kubepods.slice/kubepods-besteffort.slice/
        kubepods-besteffort-pod<uid, - as _>.slice/cri-containerd-<64 hex>.scope

one scope for the sandbox, a pause process (``sleep infinity`` in the pod's netns,
started first so it is the pod's oldest process, as the pause container is) and one per
program. The extra ``<prefix>`` level is where a nested node (kind, k3d) has its kubelet's
hierarchy; it keeps parallel clusters apart and goes with the cluster
(``ClusterNet.teardown``, ``cleanup_stale``: ``cluster/cgroups.py``).

Pod UIDs are stable: a UUIDv5 of the cluster prefix and the pod's ``namespace/name``, so
the API objects (``testing/k8s_cluster.py``) and the cgroups agree without being told.
"""

from __future__ import annotations

import hashlib
import subprocess
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from ztunnel.cluster import apps
from ztunnel.cluster.cgroups import cgroup2_mount, cluster_root, remove_tree
from ztunnel.cluster.net import ClusterError, ClusterNet

_UID_NAMESPACE = uuid.UUID("7a3f6f1e-4b8e-4f0e-9a61-1b2c3d4e5f60")  # ours, fixed
# Joins the cgroup whose cgroup.procs is $0, then execs the rest: the program starts in it.
_JOIN = 'echo $$ > "$0" && exec "$@"'


def pod_uid(prefix: str, key: str) -> str:
    """The pod's ``metadata.uid`` in the cluster under ``prefix``."""
    return str(uuid.uuid5(_UID_NAMESPACE, f"{prefix}/{key}"))


def container_id(uid: str, container: str) -> str:
    return hashlib.sha256(f"{uid}/{container}".encode()).hexdigest()


def pod_slice(root: Path, uid: str) -> Path:
    """The pod's cgroup (systemd driver, BestEffort QoS)."""
    besteffort = root / "kubepods.slice" / "kubepods-besteffort.slice"
    return besteffort / f"kubepods-besteffort-pod{uid.replace('-', '_')}.slice"


class Kubelet:
    """Sandboxes and programs of a running cluster's pods, each in its pod's cgroup."""

    def __init__(self, net: ClusterNet, root: Path) -> None:
        self.net = net
        self.root = root
        self.uids = {key: pod_uid(net.prefix, key) for key in net.pods}
        self.sandboxes: dict[str, subprocess.Popen[bytes]] = {}
        self.programs: dict[str, subprocess.Popen[bytes]] = {}

    def scope(self, key: str, container: str) -> Path:
        """A container's cgroup (created on first use)."""
        uid = self.uids[key]
        path = pod_slice(self.root, uid) / f"cri-containerd-{container_id(uid, container)}.scope"
        path.mkdir(parents=True, exist_ok=True)
        return path

    def _start(self, key: str, container: str, argv: Sequence[str]) -> subprocess.Popen[bytes]:
        """Run argv in the pod's netns and the container's cgroup; returns once it is in."""
        procs = self.scope(key, container) / "cgroup.procs"
        launcher = ["sh", "-c", _JOIN, str(procs)]
        proc = apps.start_program(self.net, key, argv, launcher=launcher)
        deadline = time.monotonic() + 10
        while str(proc.pid) not in procs.read_text().split():
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise ClusterError(f"{key}: {argv[0]} did not start in {procs.parent}")
            time.sleep(0.01)
        return proc

    def start_sandboxes(self) -> None:
        for key in self.net.pods:
            self.sandboxes[key] = self._start(key, "pause", ["sleep", "infinity"])

    def start_program(self, key: str, argv: Sequence[str]) -> subprocess.Popen[bytes]:
        """Run argv in the pod (its netns, its app container's cgroup)."""
        proc = self.programs[key] = self._start(key, "app", argv)
        return proc

    def start_pod_programs(self) -> None:
        """Every pod's ``program`` from the cluster file."""
        for spec in self.net.spec.pods:
            if spec.program:
                self.start_program(spec.key, spec.program)

    def pids(self, key: str) -> list[int]:
        """Every process of the pod (in its cgroup)."""
        out: list[int] = []
        for procs in sorted(pod_slice(self.root, self.uids[key]).rglob("cgroup.procs")):
            out += [int(p) for p in procs.read_text().split()]
        return out

    def stop(self) -> None:
        """Kill every process of every pod and remove the cgroups (idempotent)."""
        apps.stop_programs(self.programs)
        remove_tree(self.root)
        for proc in [*self.sandboxes.values(), *self.programs.values()]:
            if proc.poll() is None:
                proc.kill()
            proc.wait()


@contextmanager
def running_pods(net: ClusterNet, *, programs: bool = True) -> Iterator[Kubelet]:
    """Sandboxes (and, with ``programs``, the cluster file's programs) of every pod, in
    kubelet-style cgroups; everything is stopped and removed on exit."""
    mount = cgroup2_mount()
    root = cluster_root(net.prefix, mount)
    if mount is None or root is None or not mount.is_dir():
        raise ClusterError("no cgroup v2 hierarchy is mounted (pods need kubelet-style cgroups)")
    kubelet = Kubelet(net, root)
    try:
        kubelet.start_sandboxes()
        if programs:
            kubelet.start_pod_programs()
        yield kubelet
    finally:
        kubelet.stop()
