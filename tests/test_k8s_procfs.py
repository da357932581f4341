"""Pod netns discovery from /proc: kubelet cgroup layouts in a fake /proc tree, and for
real (root): a process in a netns we create, placed in a cgroup v2 directory laid out as
the kubelet's systemd driver does."""

from __future__ import annotations

import os
import secrets
import subprocess
import uuid
from collections.abc import Iterator
from ipaddress import ip_address
from pathlib import Path

import pytest

from ztunnel.model.pod import NetnsRef
from ztunnel.redirect.netns import NetNamespace, create_named, delete_named
from ztunnel.sources.kubernetes.procfs import (
    ProcNetnsFinder,
    local_ips,
    pod_uid_from_cgroup,
    start_time,
)

UID = "2c48913c-b29f-11e7-9350-020968147796"
N = UID.replace("-", "")
US = UID.replace("-", "_")  # systemd slice names cannot hold "-" in a unit name part
CID = "9bca8d63d5fa610783847915bcff0ecac1273e5b4bed3f6fa1b07350e0135961"


@pytest.mark.parametrize(
    "cgroup",
    [
        # cgroupfs driver, v1 (several hierarchies) and v2, each QoS class
        f"12:memory:/kubepods/besteffort/pod{UID}/{CID}\n11:cpu:/kubepods/besteffort/pod{UID}/{CID}\n",
        f"4:pids:/kubepods/burstable/pod{UID}/{CID}\n",
        f"0::/kubepods/pod{UID}/{CID}\n",  # guaranteed: straight under kubepods
        # systemd driver: dashes become underscores in slice names
        f"0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{US}.slice/cri-containerd-{CID}.scope\n",
        f"1:name=systemd:/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{US}.slice/docker-{CID}.scope\n",
        f"0::/kubepods.slice/kubepods-pod{US}.slice/crio-{CID}.scope\n",
        # inside a cgroup namespace, and kind/docker-in-docker prefixes
        f"0::/../../pod{UID}/{CID}\n",
        f"0::/docker/{CID}/kubepods/besteffort/pod{UID}/{CID}\n",
        f"0::/kubepods-besteffort-pod{US}.slice:cri-containerd:{CID}\n",
    ],
)
def test_pod_uid_from_kubelet_cgroup_layouts(cgroup: str) -> None:
    assert pod_uid_from_cgroup(cgroup) == N


@pytest.mark.parametrize(
    "cgroup",
    [
        "0::/user.slice/user-1000.slice/session-1.scope\n",
        "0::/system.slice/containerd.service\n",
        f"0::/kubepods/burstable/podnot-a-uid/{CID}\n",
        f"0::/mypod{UID}x/{CID}\n",  # "pod" must start a path element or slice part
        # two hierarchies naming different pods: refuse rather than guess
        f"4:pids:/kubepods/pod{UID}/{CID}\n0::/kubepods/pod{uuid.uuid4()}/{CID}\n",
        "garbage",
    ],
)
def test_no_pod_uid(cgroup: str) -> None:
    assert pod_uid_from_cgroup(cgroup) is None


def test_local_ips_from_fib_trie_and_if_inet6() -> None:
    fib = (
        "Local:\n  +-- 0.0.0.0/0 3 0 5\n     |-- 10.244.1.7\n        /32 host LOCAL\n"
        "     |-- 10.244.1.255\n        /32 link BROADCAST\n"
        "     |-- 127.0.0.1\n        /32 host LOCAL\n"
    )
    v6 = "fd000000000000000000000000000007 02 40 00 80     eth0\n"
    assert local_ips(fib, v6) == {
        ip_address("10.244.1.7"),
        ip_address("127.0.0.1"),
        ip_address("fd00::7"),
    }


def test_start_time_survives_odd_command_names() -> None:
    stat = "42 (we) ird (name)) S 1 42 42 0 -1 4194560 1 2 3 4 5 6 7 8 20 0 1 0 7777 1 2"
    assert start_time(stat) == 7777
    assert start_time("garbage") is None


class FakeProc:
    """A /proc tree: per pid a cgroup, stat, net/fib_trie and an ns/net that is a regular
    file standing in for the nsfs inode (its inode number is the netns identity)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.netns: dict[str, Path] = {}
        self.add(1, "0::/init.scope\n", netns="host", ips=["192.0.2.10"])

    def _ns(self, name: str) -> Path:
        if name not in self.netns:
            path = self.root / "_nsfs" / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(name)
            self.netns[name] = path
        return self.netns[name]

    def add(self, pid: int, cgroup: str, *, netns: str, ips: list[str], start: int = 100) -> None:
        d = self.root / str(pid)
        (d / "ns").mkdir(parents=True)
        (d / "net").mkdir()
        (d / "cgroup").write_text(cgroup)
        (d / "stat").write_text(f"{pid} (proc) S 1 1 1 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 {start} 0 0")
        fib = "".join(f"     |-- {ip}\n        /32 host LOCAL\n" for ip in ips if ":" not in ip)
        v6 = "".join(f"{int(ip_address(ip)):032x} 02 40 00 80 eth0\n" for ip in ips if ":" in ip)
        (d / "net" / "fib_trie").write_text(fib)
        (d / "net" / "if_inet6").write_text(v6)
        os.link(self._ns(netns), d / "ns" / "net")


def cg(uid: str) -> str:
    slice_ = f"kubepods-burstable-pod{uid.replace('-', '_')}.slice"
    return f"0::/kubepods.slice/kubepods-burstable.slice/{slice_}/cri-containerd-{CID}.scope\n"


@pytest.fixture
def proc(tmp_path: Path) -> FakeProc:
    return FakeProc(tmp_path)


def test_finds_the_oldest_process_of_the_pod(proc: FakeProc) -> None:
    proc.add(300, cg(UID), netns="pod", ips=["10.244.1.7"], start=900)  # the app, started later
    proc.add(200, cg(UID), netns="pod", ips=["10.244.1.7"], start=500)  # the pause container
    proc.add(400, "0::/system.slice/sshd.service\n", netns="host", ips=["192.0.2.10"])
    found = ProcNetnsFinder(str(proc.root)).find({UID: [ip_address("10.244.1.7")]})
    assert found[UID].pid == 200
    assert found[UID].ref == NetnsRef(f"{proc.root}/200/ns/net")


def test_skips_the_host_netns_and_a_netns_without_the_pod_ip(proc: FakeProc) -> None:
    # A pod process sharing the host netns must never make the host look like the pod.
    proc.add(200, cg(UID), netns="host", ips=["10.244.1.7"], start=10)
    # The oldest process of the pod transiting another netns (e.g. a debugging tool).
    proc.add(201, cg(UID), netns="elsewhere", ips=["10.244.9.9"], start=20)
    finder = ProcNetnsFinder(str(proc.root))
    assert finder.find({UID: [ip_address("10.244.1.7")]}) == {}
    proc.add(202, cg(UID), netns="pod", ips=["10.244.1.7"], start=30)
    assert finder.find({UID: [ip_address("10.244.1.7")]})[UID].pid == 202


def test_pods_without_ips_are_not_looked_up(proc: FakeProc) -> None:
    proc.add(200, cg(UID), netns="pod", ips=["10.244.1.7"])
    assert ProcNetnsFinder(str(proc.root)).find({UID: []}) == {}


def test_ipv6_pod(proc: FakeProc) -> None:
    proc.add(200, cg(UID), netns="pod", ips=["fd00::7"])
    assert UID in ProcNetnsFinder(str(proc.root)).find({UID: [ip_address("fd00::7")]})


def test_found_netns_goes_stale_when_the_process_is_replaced(proc: FakeProc) -> None:
    proc.add(200, cg(UID), netns="pod", ips=["10.244.1.7"], start=500)
    finder = ProcNetnsFinder(str(proc.root))
    found = finder.find({UID: [ip_address("10.244.1.7")]})[UID]
    assert finder.still_valid(found)
    # pid reused by a new process (different start time)
    (proc.root / "200" / "stat").write_text(
        "200 (x) S 1 1 1 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 999 0 0"
    )
    assert not finder.still_valid(found)


# --- for real ------------------------------------------------------------------------------


def _cgroup2_mount() -> Path | None:
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            if right.split()[0] == "cgroup2":
                return Path(left.split()[4])
    return None


@pytest.fixture
def pod_process() -> Iterator[tuple[str, int, NetNamespace]]:
    """A sleeping process in a fresh netns holding 10.250.x.y, in a kubelet-style cgroup."""
    mount = _cgroup2_mount()
    if mount is None or not os.access(mount, os.W_OK):
        pytest.skip("no writable cgroup v2 hierarchy")
    uid = str(uuid.uuid4())
    tag = secrets.token_hex(3)
    name = f"zt{tag}-k8spod"
    top = mount / f"zt{tag}"
    leaf = (
        top
        / "kubepods.slice"
        / "kubepods-besteffort.slice"
        / f"kubepods-besteffort-pod{uid.replace('-', '_')}.slice"
        / f"cri-containerd-{CID}.scope"
    )
    ns = create_named(name)
    proc = None
    try:
        ip = f"10.250.{int(tag[:2], 16)}.{int(tag[2:4], 16) or 1}"
        ns.run(["ip", "addr", "add", f"{ip}/32", "dev", "lo"])
        leaf.mkdir(parents=True)
        proc = subprocess.Popen(["ip", "netns", "exec", name, "sleep", "60"])
        # Wait until the exec'd sleep is in the pod netns, then move it into the pod cgroup.
        for _ in range(100):
            try:
                if os.stat(f"/proc/{proc.pid}/ns/net").st_ino == os.fstat(ns.fd).st_ino:
                    break
            except OSError:
                pass
            subprocess.run(["sleep", "0.02"], check=False)
        (leaf / "cgroup.procs").write_text(str(proc.pid))
        yield uid, proc.pid, ns
    finally:
        if proc is not None:
            proc.kill()
            proc.wait()
        for d in sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
            d.rmdir()
        if top.exists():
            top.rmdir()
        ns.close()
        delete_named(name)


@pytest.mark.root
def test_finds_a_real_pod_netns_through_its_cgroup(
    pod_process: tuple[str, int, NetNamespace],
) -> None:
    uid, pid, ns = pod_process
    cgroup_text = Path(f"/proc/{pid}/cgroup").read_text()
    assert "kubepods-besteffort-pod" in cgroup_text
    addrs = ns.run(["ip", "-4", "-o", "addr", "show", "dev", "lo"]).stdout.split()
    ip = next(a.split("/")[0] for a in addrs if a.startswith("10.250."))
    finder = ProcNetnsFinder("/proc")
    found = finder.find({uid: [ip_address(ip)]})
    assert found[uid].pid == pid
    assert found[uid].ref == NetnsRef(f"/proc/{pid}/ns/net")
    # The reference opens the very namespace we created.
    with NetNamespace.open(found[uid].ref.path) as opened:
        assert opened.ident == ns.ident
    assert found[uid].ident == ns.ident
    assert finder.still_valid(found[uid])
    # Someone else's IP in the pod's netns does not make it that pod's.
    assert finder.find({uid: [ip_address("10.251.0.1")]}) == {}
