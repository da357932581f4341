"""The simulated cluster's network: real netns for the pod network, every pod and every node.

Layout (prefix ``zt<6 hex>``, unique per run, so parallel runs never collide):

- ``<prefix>-podnet``: bridge ``br0`` with the gateway 10.244.0.1/16; routes the service range
  and, like kube-proxy, DNATs service VIP:port to endpoint pod IPs (iptables ``statistic``
  random), so pods outside the mesh reach services. br_netfilter is on, so replies of DNATed
  connections cross conntrack and the client sees the VIP (source IPs are preserved).
- ``<prefix>-pod-<ns>-<name>``: one per pod, ``eth0`` on the bridge, IP
  10.244.<node index+1>.<2+n> (n = order of the pod among its node's pods in the file),
  lo up, default route via the gateway.
- ``<prefix>-node-<name>``: one per node for its agent, ``eth0`` at 10.244.<node index+1>.1.
- ``<prefix>-<host>`` (``attach_host``, on demand): the control plane, e.g. ``ca`` at
  10.244.0.2 running ``ztunnel ca serve`` (``testing/ca_service.py``).

These names and addresses come from the product's ``sources.clusterfile.layout``: the agent
finds the pods of a cluster built here with the same function.

All veths are created inside the pod-network netns, so nothing touches the root netns.
A running cluster holds a flock on /run/ztunnel-py/clusters/<prefix>.lock; ``cleanup_stale``
removes the leftovers of crashed runs (lock not held) and never a live cluster's.
"""

from __future__ import annotations

import contextlib
import fcntl
import fnmatch
import ipaddress
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from ipaddress import IPv4Address
from pathlib import Path

from ztunnel.cluster.cgroups import cgroup2_mount, cluster_prefixes, remove_cluster_cgroups
from ztunnel.errors import ZtunnelError
from ztunnel.redirect.ebpf.build import remove_tree
from ztunnel.redirect.netns import (
    NETNS_RUN_DIR,
    NetNamespace,
    create_named,
    delete_named,
    list_named,
)
from ztunnel.sources.clusterfile.layout import GATEWAY, POD_CIDR, NodeNet, PodNet, layout
from ztunnel.sources.clusterfile.spec import ClusterSpec, PodSpec

SERVICE_CIDR = ipaddress.IPv4Network("10.96.0.0/12")
LOCK_DIR = Path("/run/ztunnel-py/clusters")
BPF_ROOT = Path("/sys/fs/bpf")  # each node agent pins under <root>/<prefix>-<node> (eBPF mode)
_PREFIX_RE = re.compile(r"^(zt[0-9a-f]{6})(?:-|$)")
_SVC_CHAIN = "ZT-SERVICES"


class ClusterError(ZtunnelError):
    """The simulated cluster could not be built."""


def new_prefix() -> str:
    return f"zt{secrets.token_hex(3)}"


class ClusterNet:
    """The live network of one simulated cluster; ``teardown()`` removes all of it."""

    def __init__(self, spec: ClusterSpec, prefix: str) -> None:
        if not _PREFIX_RE.match(prefix) or len(prefix) != 8:
            raise ClusterError(f"prefix {prefix!r} is not of the form zt<6 hex>")
        self.spec = spec
        self.prefix = prefix
        self.podnet = f"{prefix}-podnet"
        self.gateway = GATEWAY
        self.pods: dict[str, PodNet] = {}
        self.nodes: dict[str, NodeNet] = {}
        self.hosts: dict[str, NodeNet] = {}  # attach_host: members that are neither
        self.log_dir = Path(tempfile.mkdtemp(prefix=f"{prefix}-logs-"))
        self._created: list[str] = []
        self._lock_fd: int | None = None

    def pod(self, name: str, namespace: str | None = None) -> PodNet:
        """A pod by ``ns/name`` or by a name unique in the cluster."""
        return self.pods[self.spec.pod(name, namespace).key]

    def open_netns(self, pod: PodNet | NodeNet) -> NetNamespace:
        return NetNamespace.open(pod.netns_path)

    def netns_names(self) -> list[str]:
        return list(self._created)

    def attach_host(self, name: str, ip: IPv4Address) -> NodeNet:
        """One more member of the pod network: netns ``<prefix>-<name>`` with ``eth0`` at
        ``ip`` (the control plane, e.g. ``ztunnel ca serve``); removed by ``teardown``."""
        member = NodeNet(name, f"{self.prefix}-{name}", ip)
        members: list[PodNet | NodeNet] = [*self.nodes.values(), *self.pods.values()]
        taken = {m.ip for m in [*members, *self.hosts.values()]}
        if ip in taken or ip == self.gateway or ip not in POD_CIDR:
            raise ClusterError(f"{ip} is not a free address of the pod network {POD_CIDR}")
        with NetNamespace.named(self.podnet) as podnet:
            batch = self._attach(member.netns, f"{self.prefix}h{len(self.hosts)}", ip)
            podnet.run(["ip", "-batch", "-"], input="\n".join(batch) + "\n")
        with NetNamespace.named(member.netns) as ns:
            ns.run(["ip", "-batch", "-"], input=_member_batch(ip))
        self.hosts[name] = member
        return member

    def bpf_pin_dir(self, node: str) -> Path:
        """The node agent's own bpffs directory: agents of one machine must not share one
        (each prunes the pins of pods it does not hold). bpffs refuses dots in names."""
        return BPF_ROOT / f"{self.prefix}-{node.replace('.', '~')}"

    def teardown(self) -> None:
        """Kill what runs inside, delete every netns we made (their tc programs go with
        them) and the pods' cgroups (``cluster/kubelet.py``), unpin what the agents pinned,
        drop the lock. Idempotent."""
        for name in reversed(self._created):
            _kill_netns_pids(name)
            delete_named(name)
        self._created.clear()
        remove_cluster_cgroups(self.prefix)
        remove_bpf_pins(self.prefix)
        shutil.rmtree(self.log_dir, ignore_errors=True)
        if self._lock_fd is not None:
            with contextlib.suppress(FileNotFoundError):
                (LOCK_DIR / f"{self.prefix}.lock").unlink()
            os.close(self._lock_fd)
            self._lock_fd = None

    def __enter__(self) -> ClusterNet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.teardown()

    # -- building ---------------------------------------------------------------------------

    def _lock(self) -> None:
        LOCK_DIR.mkdir(parents=True, exist_ok=True)
        fd = os.open(LOCK_DIR / f"{self.prefix}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_fd = fd

    def _netns(self, name: str) -> NetNamespace:
        ns = create_named(name)
        self._created.append(name)
        return ns

    def _build(self) -> None:
        self._lock()
        with self._netns(self.podnet) as podnet:
            _setup_podnet(podnet)
            # The agent finds these netns and IPs with the same function.
            places = layout(self.spec, self.prefix)
            batch: list[str] = []
            for i, node in enumerate(self.spec.nodes):
                nn = self.nodes[node] = places.nodes[node]
                batch += self._attach(nn.netns, f"{self.prefix}n{i}", nn.ip)
            for i, p in enumerate(self.spec.pods):
                pn = self.pods[p.key] = places.pods[p.key]
                batch += self._attach(pn.netns, f"{self.prefix}p{i}", pn.ip)
            podnet.run(["ip", "-batch", "-"], input="\n".join(batch) + "\n")
            members: list[PodNet | NodeNet] = [*self.nodes.values(), *self.pods.values()]
            for member in members:
                with NetNamespace.named(member.netns) as ns:
                    ns.run(["ip", "-batch", "-"], input=_member_batch(member.ip))
            rules = render_service_rules(self.spec, self.pods)
            if rules:
                podnet.run(["iptables-restore", "--noflush"], input=rules)

    def _attach(self, netns: str, host_if: str, ip: IPv4Address) -> list[str]:
        """Create the member's netns; return podnet batch lines plugging it into the bridge."""
        self._netns(netns).close()
        return [
            f"link add {host_if} type veth peer name eth0 netns {netns}",
            f"link set {host_if} master br0",
            f"link set {host_if} type bridge_slave hairpin on",
            f"link set {host_if} up",
        ]


def _setup_podnet(podnet: NetNamespace) -> None:
    podnet.run(
        ["ip", "-batch", "-"],
        input=(f"link add br0 type bridge\naddr add {GATEWAY}/16 dev br0\nlink set br0 up\n"),
    )
    # Forwarding for the service DNAT; br_netfilter so bridged replies are un-NATed.
    script = "echo 1 > /proc/sys/net/ipv4/ip_forward; " + (
        "[ -e /proc/sys/net/bridge/bridge-nf-call-iptables ] && "
        "echo 1 > /proc/sys/net/bridge/bridge-nf-call-iptables; true"
    )
    podnet.run(["sh", "-c", script])


def _member_batch(ip: IPv4Address) -> str:
    return (
        f"addr add {ip}/{POD_CIDR.prefixlen} dev eth0\n"
        "link set eth0 up\n"
        f"route add default via {GATEWAY}\n"
    )


def render_service_rules(spec: ClusterSpec, pods: dict[str, PodNet]) -> str:
    """kube-proxy-like nat rules for the pod network netns (empty if no service has endpoints)."""
    lines = ["*nat", f"-N {_SVC_CHAIN}", f"-A PREROUTING -j {_SVC_CHAIN}"]
    n_chains = 0
    for si, svc in enumerate(spec.services):
        endpoints: list[PodSpec] = list(spec.selected_pods(svc))
        for port, target in svc.ports.items():
            chain = f"ZT-SVC-{si}-{port}"
            lines.append(f"-N {chain}")
            lines.append(f"-A {_SVC_CHAIN} -d {svc.vip}/32 -p tcp -m tcp --dport {port} -j {chain}")
            n_chains += 1
            for ei, ep in enumerate(endpoints):
                dest = f"-j DNAT --to-destination {pods[ep.key].ip}:{target}"
                left = len(endpoints) - ei
                # 1/left for each in turn gives every endpoint the same overall chance.
                match = (
                    ""
                    if left == 1
                    else f"-m statistic --mode random --probability {1 / left:.11f} "
                )
                lines.append(f"-A {chain} -p tcp {match}{dest}")
    if not n_chains:
        return ""
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"


def build(spec: ClusterSpec, prefix: str | None = None) -> ClusterNet:
    """Create the cluster's namespaces and wiring; on any failure nothing is left behind."""
    net = ClusterNet(spec, prefix or new_prefix())
    try:
        net._build()
    except BaseException:
        net.teardown()
        raise
    return net


@contextlib.contextmanager
def running_cluster(spec: ClusterSpec, prefix: str | None = None) -> Iterator[ClusterNet]:
    net = build(spec, prefix)
    try:
        yield net
    finally:
        net.teardown()


def _kill_netns_pids(name: str) -> None:
    proc = subprocess.run(
        ["ip", "netns", "pids", name], capture_output=True, text=True, check=False
    )
    for tok in proc.stdout.split():
        pid = int(tok)
        if pid != os.getpid():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _lock_state(prefix: str) -> str:
    """'held' (a live cluster), 'stale' (its owner died), or 'none' (no lock file)."""
    path = LOCK_DIR / f"{prefix}.lock"
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return "none"
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return "held"
    finally:
        os.close(fd)
    return "stale"


def _root_veths() -> list[str]:
    proc = subprocess.run(
        ["ip", "-j", "link", "show", "type", "veth"], capture_output=True, text=True, check=False
    )
    try:
        links = json.loads(proc.stdout or "[]")
    except json.JSONDecodeError:
        return []
    return [str(link.get("ifname", "")) for link in links if isinstance(link, dict)]


def cleanup_stale(prefix_glob: str = "zt", min_age: float = 600.0) -> list[str]:
    """Remove netns (and root-netns veths) of crashed runs; returns what was removed.

    A group (same ``zt<6 hex>`` prefix) is stale when its lock file exists but nobody holds
    it, or when it has no lock file and its netns are older than ``min_age`` seconds (made by
    something else that follows our naming). Live clusters are never touched.
    """
    groups: dict[str, list[str]] = {}
    for name in list_named():
        m = _PREFIX_RE.match(name)
        if m and fnmatch.fnmatch(name, prefix_glob + "*"):
            groups.setdefault(m.group(1), []).append(name)
    veths: dict[str, list[str]] = {}
    for ifname in _root_veths():
        m = re.match(r"^(zt[0-9a-f]{6})", ifname)
        if m and fnmatch.fnmatch(ifname, prefix_glob + "*"):
            veths.setdefault(m.group(1), []).append(ifname)
    removed: list[str] = []
    now = time.time()
    for prefix in sorted(set(groups) | set(veths)):
        state = _lock_state(prefix)
        if state == "held":
            continue
        if state == "none":
            names = groups.get(prefix, [])
            ages = [now - _mtime(NETNS_RUN_DIR / n) for n in names]
            if not names or min(ages) < min_age:
                continue
        for name in groups.get(prefix, []):
            _kill_netns_pids(name)
            if delete_named(name):
                removed.append(name)
        for ifname in veths.get(prefix, []):
            subprocess.run(["ip", "link", "del", ifname], capture_output=True, check=False)
            removed.append(ifname)
        remove_bpf_pins(prefix)
        for logs in Path(tempfile.gettempdir()).glob(f"{prefix}-logs-*"):
            shutil.rmtree(logs, ignore_errors=True)
        removed += remove_cluster_cgroups(prefix)
        with contextlib.suppress(FileNotFoundError):
            (LOCK_DIR / f"{prefix}.lock").unlink()
    removed += _remove_stale_cgroups(set(groups) | set(veths), prefix_glob, min_age)
    for prefix in _pinned_prefixes(prefix_glob) - set(groups):
        if _lock_state(prefix) != "held":  # its netns are gone: nobody uses these pins
            removed += remove_bpf_pins(prefix)
    return removed


def _pinned_prefixes(prefix_glob: str) -> set[str]:
    if not BPF_ROOT.is_dir():
        return set()
    found = set()
    for path in BPF_ROOT.iterdir():
        m = _PREFIX_RE.match(path.name)
        if m and fnmatch.fnmatch(path.name, prefix_glob + "*"):
            found.add(m.group(1))
    return found


def remove_bpf_pins(prefix: str) -> list[str]:
    """Unpin the eBPF state of a cluster's agents (programs, maps, per-pod links)."""
    removed = []
    for directory in sorted(BPF_ROOT.glob(f"{prefix}-*")) if BPF_ROOT.is_dir() else []:
        remove_tree(directory)
        removed.append(str(directory))
    return removed


def _remove_stale_cgroups(seen: set[str], prefix_glob: str, min_age: float) -> list[str]:
    """Pod cgroups of clusters whose netns are gone already (a crash between the two steps
    of a teardown): the lock is stale, or there is none and the cgroup is old."""
    removed: list[str] = []
    mount = cgroup2_mount()
    for prefix in cluster_prefixes(mount):
        if prefix in seen or not fnmatch.fnmatch(prefix, prefix_glob + "*"):
            continue
        state = _lock_state(prefix) if _PREFIX_RE.match(prefix) else "held"
        if state == "held" or (state == "none" and _age(mount, prefix) < min_age):
            continue
        removed += remove_cluster_cgroups(prefix, mount)
    return removed


def _age(mount: Path | None, prefix: str) -> float:
    return time.time() - _mtime(mount / prefix) if mount is not None else 0.0


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0
