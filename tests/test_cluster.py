"""The simulated cluster for real: namespaces, bridge, service DNAT, pod programs, teardown."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from ipaddress import IPv4Address
from pathlib import Path

import pytest

from ztunnel.cluster import apps
from ztunnel.cluster.net import ClusterNet, build, cleanup_stale, new_prefix, running_cluster
from ztunnel.cluster.spec import demo_spec
from ztunnel.redirect.netns import NetNamespace, create_named, delete_named, list_named
from ztunnel.sources.clusterfile.mesh import snapshot
from ztunnel.sources.clusterfile.spec import loads_spec

pytestmark = pytest.mark.root

APPS = ["python", "-m", "ztunnel.cluster.apps"]


@pytest.fixture(scope="module")
def demo() -> Iterator[ClusterNet]:
    with running_cluster(demo_spec()) as net:
        procs = apps.start_pod_programs(net)
        try:
            for pod in ("echo-1", "echo-2"):
                apps.wait_listening(net, pod, 8080, timeout=10)
            yield net
        finally:
            apps.stop_programs(procs)


def _send(net: ClusterNet, pod: str, to: str, nbytes: int = 100_000) -> dict[str, object]:
    proc = apps.run_in_pod(
        net, pod, [*APPS, "send", "--to", to, "--bytes", str(nbytes)], timeout=20
    )
    result: dict[str, object] = json.loads(proc.stdout)
    assert (proc.returncode == 0) == result["ok"]
    return result


def test_addresses_are_deterministic(demo: ClusterNet) -> None:
    assert demo.pod("client").ip == IPv4Address("10.244.1.2")
    assert demo.pod("echo-1").ip == IPv4Address("10.244.1.3")
    assert demo.pod("echo-2").ip == IPv4Address("10.244.2.2")
    assert demo.pod("legacy/legacy-client").ip == IPv4Address("10.244.2.4")
    assert demo.nodes["node2"].ip == IPv4Address("10.244.2.1")


def test_pods_on_different_nodes_reach_each_other_directly(demo: ClusterNet) -> None:
    result = _send(demo, "client", f"{demo.pod('echo-2').ip}:8080", 1_000_000)
    assert result["ok"] and result["bytes"] == 1_000_000
    assert str(result["local_addr"]).startswith(f"{demo.pod('client').ip}:")
    assert _send(demo, "other", f"{demo.pod('echo-1').ip}:8080")["ok"]


def test_non_mesh_pod_reaches_service_vip_on_every_endpoint(demo: ClusterNet) -> None:
    for _ in range(16):
        result = _send(demo, "legacy-client", "10.96.0.10:80", 2000)
        assert result["ok"], result
        assert result["peer_addr"] == "10.96.0.10:80"
    # Both endpoints got connections (each rule's packet counter; a miss has p = 2^-15).
    out = subprocess.run(
        ["ip", "netns", "exec", demo.podnet, "iptables-save", "-c", "-t", "nat"],
        capture_output=True,
        text=True,
        check=True,
        timeout=10,
    ).stdout
    counters = [line for line in out.splitlines() if "-A ZT-SVC-0-80" in line]
    assert len(counters) == 2
    assert all(not line.startswith("[0:") for line in counters), counters


def test_source_address_is_preserved_between_pods(demo: ClusterNet) -> None:
    proc = apps.start_program(demo, "echo-1", [*APPS, "whoami", "--port", "9000"])
    try:
        apps.wait_listening(demo, "echo-1", 9000, timeout=10)
        out = apps.run_in_pod(
            demo,
            "legacy-client",
            [*APPS, "read", "--to", f"{demo.pod('echo-1').ip}:9000"],
            timeout=20,
        )
        result = json.loads(out.stdout)
        assert result["ok"], result
        assert result["line"] == result["local_addr"]
        assert result["line"].startswith(f"{demo.pod('legacy-client').ip}:")
    finally:
        proc.terminate()
        proc.wait(5)


def test_the_agent_finds_every_pod_where_the_simulator_built_it(demo: ClusterNet) -> None:
    for node in demo.spec.nodes:
        snap, _ = snapshot(demo.spec, demo.prefix, node)
        assert [p.key for p in snap.pods] == [p.key for p in demo.pods.values() if p.node == node]
        for pod in snap.pods:
            assert pod.netns is not None
            with NetNamespace.open(pod.netns.path) as ns:
                addrs = ns.run(["ip", "-4", "-o", "addr", "show", "dev", "eth0"]).stdout
            assert f" {pod.ips[0]}/16 " in addrs


SMALL = """
namespaces: {a: {}}
nodes: [n1]
pods:
  - {name: p, namespace: a, node: n1, program: [sleep, "60"]}
"""


def test_teardown_removes_everything_and_kills_pod_programs() -> None:
    net = build(loads_spec(SMALL))
    names = net.netns_names()
    assert len(names) == 3 and all(n.startswith(net.prefix + "-") for n in names)
    procs = apps.start_pod_programs(net)
    net.teardown()
    assert not [n for n in list_named() if n.startswith(net.prefix)]
    assert procs["a/p"].wait(5) != 0  # killed with its pod
    assert not net.log_dir.exists()
    net.teardown()  # idempotent


def test_failed_build_leaves_only_what_existed_before() -> None:
    prefix = new_prefix()
    squatter = f"{prefix}-podnet"
    create_named(squatter).close()
    try:
        with pytest.raises(Exception, match="netns add"):
            build(loads_spec(SMALL), prefix=prefix)
        assert [n for n in list_named() if n.startswith(prefix)] == [squatter]
    finally:
        delete_named(squatter)


def test_cleanup_stale_removes_a_crashed_run_but_not_a_live_one() -> None:
    crash = textwrap.dedent(
        f"""
        import os, sys
        from ztunnel.cluster.net import build
        from ztunnel.sources.clusterfile.spec import loads_spec
        net = build(loads_spec({SMALL!r}))
        print(net.prefix, flush=True)
        os._exit(0)  # crash: no teardown
        """
    )
    root = str(Path(__file__).resolve().parents[1])
    out = subprocess.run(
        [sys.executable, "-c", crash],
        capture_output=True,
        text=True,
        timeout=30,
        env={"PYTHONPATH": root, "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
        check=True,
    )
    leaked = out.stdout.strip()
    try:
        assert len([n for n in list_named() if n.startswith(leaked)]) == 3
        with running_cluster(loads_spec(SMALL)) as live:
            removed = cleanup_stale(prefix_glob=leaked)
            assert all(n.startswith(leaked) for n in removed), removed
            assert len(removed) == 3
            assert not [n for n in list_named() if n.startswith(leaked)]
            # A live cluster holds its lock: even a broad sweep leaves it alone.
            cleanup_stale(prefix_glob=live.prefix, min_age=0)
            assert len([n for n in list_named() if n.startswith(live.prefix)]) == 3
    finally:
        for name in [n for n in list_named() if n.startswith(leaked)]:
            delete_named(name)
