"""The simulated cluster with two worker processes per node agent (ZTUNNEL_WORKER_THREADS=2).

Real agents in node netns, real pods, istio-cni's iptables rules: REDIRECT lands on the
SO_REUSEPORT group of the workers' listeners in each pod's netns, so every worker carries
connections; enrollment, policy (with a live cut), certificates from `ztunnel ca serve`,
metrics and config_dump stay those of one agent; a killed worker comes back; SIGTERM
drains and leaves no worker behind.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import textwrap
import time
from collections.abc import Iterator

import pytest
from cluster_mesh import Mesh, cluster_mesh, until
from prometheus_client.parser import text_string_to_metric_families
from test_e2e_policy import CLUSTER, DENY_A, LONG_LIVED

from ztunnel.cluster import apps
from ztunnel.testing.harness import config_dump, http_get, readiness

pytestmark = [pytest.mark.root, pytest.mark.timeout(240)]

WORKERS = {"ZTUNNEL_WORKER_THREADS": "2"}

# Many short connections from one pod: enough 4-tuples for both workers to get some.
CONNECT_MANY = textwrap.dedent(
    """\
    import socket, sys
    ok = 0
    for i in range(int(sys.argv[2])):
        s = socket.create_connection((sys.argv[1], 8080), timeout=8)
        s.sendall(b"ping"); ok += s.recv(16) == b"ping"
        s.close()
    print(ok)
    """
)


@pytest.fixture
def mesh() -> Iterator[Mesh]:
    with cluster_mesh(CLUSTER, {"b": 8080}, agent_env=WORKERS) as m:
        yield m


def connect_many(mesh: Mesh, pod: str, n: int) -> int:
    argv = ["python", "-c", CONNECT_MANY, mesh.ip("b"), str(n)]
    return int(apps.run_in_pod(mesh.net, pod, argv, timeout=60).stdout.strip() or 0)


def workers(mesh: Mesh, node: str) -> list[dict[str, object]]:
    found = config_dump(mesh.agents[node]).get("workers")
    assert isinstance(found, list), "no workers in config_dump"
    return found


def metric(mesh: Mesh, node: str, name: str, **labels: str) -> float:
    status, body = http_get(mesh.agents[node].node, 15020, "/metrics", timeout=5)
    assert status == 200
    total = 0.0
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


def test_every_worker_carries_traffic_and_the_agent_reports_it_whole(mesh: Mesh) -> None:
    # a's outbound (REDIRECT to 15001 in a's netns) spreads over n1's workers; q is not in
    # the mesh: its connections reach b's 15006 (REDIRECT in b's netns) on n2's workers.
    # (a's HBONE connections are pooled, one per n1 worker, so they alone may all land
    # on one n2 worker.)
    assert connect_many(mesh, "a", 24) == 24
    assert connect_many(mesh, "q", 24) == 24
    for node, direction, n in (("n1", "source", 24), ("n2", "destination", 48)):
        until(
            lambda node=node, d=direction, n=n: (
                metric(mesh, node, "istio_tcp_connections_closed_total", reporter=d) >= n
            ),
            f"{node}'s books",
        )
        opened = [int(str(w["connectionsOpened"])) for w in workers(mesh, node)]
        assert len(opened) == 2 and all(opened) and sum(opened) == n, (node, opened)
        assert metric(mesh, node, "ztunnel_workers") == 2
    # The access logs (written by each control process) name both ends of every connection.
    inbound = [r for r in mesh.records("n2") if r.get("direction") == "inbound"]
    assert (
        sum(r.get("src.identity") == "spiffe://cluster.local/ns/mesh/sa/sa-a" for r in inbound)
        >= 24
    )
    # Certificates come from the control processes: one per identity, not one per worker.
    assert mesh.ca.issued() == 3  # sa-a and sa-c on n1, sa-b on n2
    dump = config_dump(mesh.agents["n1"])
    json.dumps(dump)
    assert [w["state"] for w in dump["workers"]] == ["running", "running"]
    assert {w["proxies"] == sorted(dump["workloadState"]) for w in dump["workers"]} == {True}


def test_a_live_policy_change_cuts_the_open_connection_whichever_worker_holds_it(
    mesh: Mesh,
) -> None:
    argv = ["python", "-c", LONG_LIVED, mesh.ip("b")]
    procs = [
        apps.start_program(mesh.net, "a", argv, stdout=subprocess.PIPE, text=True) for _ in range(4)
    ]
    try:
        for proc in procs:
            assert proc.stdout is not None
            assert proc.stdout.readline().strip() == "connected"
        mesh.path.write_text(CLUSTER + DENY_A)
        outs = [proc.communicate(timeout=30)[0].strip() for proc in procs]
        assert outs == ["closed"] * 4
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    until(
        lambda: (
            metric(mesh, "n2", "istio_tcp_connections_closed_total", response_flags="DENY") >= 4
        ),
        "the cuts counted",
    )
    assert connect_many(mesh, "a", 2) == 0  # new ones refused too
    assert connect_many(mesh, "c", 2) == 2  # sa-c is not denied


def test_a_killed_worker_comes_back_and_sigterm_leaves_none(mesh: Mesh) -> None:
    victim = workers(mesh, "n2")[1]
    os.kill(int(str(victim["pid"])), signal.SIGKILL)
    until(lambda: workers(mesh, "n2")[1]["restarts"] == 1, "the restart")
    until(lambda: readiness(mesh.agents["n2"])[0] == 200, "n2 ready again", timeout=30)
    assert metric(mesh, "n2", "ztunnel_worker_restarts_total", worker="1") == 1
    assert workers(mesh, "n2")[1]["pid"] != victim["pid"]
    assert connect_many(mesh, "a", 16) == 16

    # New connections into b's netns spread over the SO_REUSEPORT group, the new worker's
    # listener included. q's (not in the mesh: one TCP connection each, to 15006) show it;
    # a's ride n1's pooled HBONE connections, which may all sit on worker 0.
    def worker_1_serves() -> bool:
        assert connect_many(mesh, "q", 4) == 4
        return int(str(workers(mesh, "n2")[1]["connectionsOpened"])) > 0

    until(worker_1_serves, "worker 1 serves", timeout=30)

    pids = [int(str(w["pid"])) for node in ("n1", "n2") for w in workers(mesh, node)]
    for agent in mesh.agents.values():
        agent.proc.send_signal(signal.SIGTERM)
    for agent in mesh.agents.values():
        assert agent.proc.wait(timeout=30) == 0, agent.log_tail()
    deadline = time.monotonic() + 10
    while any(os.path.exists(f"/proc/{p}") and _running(p) for p in pids):
        assert time.monotonic() < deadline, "a worker outlived its agent"
        time.sleep(0.05)


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
