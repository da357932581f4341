"""``ztunnel run`` with only a KUBECONFIG, end to end (issue 11's done-when).

A two-node simulated cluster whose pods run as the kubelet runs them (a pause process and
the programs in cgroups named by pod UID), the fake API server on the pod network (TLS,
a bearer token) holding the cluster's objects, and one real agent process per node that
knows nothing but the kubeconfig: it lists and watches the API, finds each pod's network
namespace through /proc, installs the redirection, starts the pod's proxy and writes the
enrollment annotation back.
"""

from __future__ import annotations

import textwrap
import time
from collections.abc import Iterator
from functools import partial

import pytest
from cluster_mesh import MODES, mode_param
from kube_mesh import AMBIENT, KubeMesh, kube_mesh, until
from pod_capture import assert_captured_once

from ztunnel.sources.kubernetes.protocol import PODS

pytestmark = pytest.mark.root

CLUSTER = textwrap.dedent(
    """\
    namespaces:
      shop: {labels: {}}
      other: {labels: {}}
    nodes: [node1, node2]
    pods:
      - {name: client, namespace: shop, serviceAccount: client, node: node1}
      - name: echo
        namespace: shop
        serviceAccount: echo
        node: node2
        labels: {app: echo}
        program: [python, -m, ztunnel.cluster.apps, echo, --port, "8080"]
        ports: [8080]
      - name: bystander
        namespace: other
        node: node2
        program: [python, -m, ztunnel.cluster.apps, echo, --port, "8080"]
        ports: [8080]
    services:
      - {name: echo, namespace: shop, vip: 10.96.0.20, ports: {80: 8080}, selector: {app: echo}}
    """
)
LISTENING = {"shop/echo": 8080, "other/bystander": 8080}
CLIENT_ID = "spiffe://cluster.local/ns/shop/sa/client"
SHOP = ("shop/client", "shop/echo")


@pytest.fixture
def mesh() -> Iterator[KubeMesh]:
    with kube_mesh(CLUSTER, LISTENING) as m:
        yield m


@pytest.fixture(params=MODES)
def any_mode_mesh(request: pytest.FixtureRequest) -> Iterator[KubeMesh]:
    """The same cluster with the agents redirecting by iptables, then by eBPF."""
    with kube_mesh(CLUSTER, LISTENING, mode=mode_param(request.param)) as m:
        yield m


def _enroll_shop(mesh: KubeMesh) -> None:
    mesh.label("shop", AMBIENT)
    for key in SHOP:
        until(partial(mesh.enrolled, key), f"{key} enrolled")
        until(partial(mesh.annotated, key), f"{key} annotated")


def _protocol(mesh: KubeMesh, node: str, key: str) -> str:
    uid = "Kubernetes//Pod/" + key
    (workload,) = [w for w in mesh.dump(node)["workloads"] if w["uid"] == uid]
    return str(workload["protocol"])


def _relisted_all(mesh: KubeMesh, node: str) -> bool:
    """The agent relisted each of the 7 resources it watches after a 410."""
    return len(mesh.logged(node, "watch expired; relisting")) >= 7


def _hbone_to_echo(mesh: KubeMesh) -> None:
    """client → the echo service's VIP: carried over HBONE (node2's inbound side saw the
    client's SPIFFE identity, which only mTLS can tell it)."""
    # Enrolled on node2 is not yet known on node1: until node1's view says HBONE it would
    # (rightly) send plaintext.
    until(lambda: _protocol(mesh, "node1", "shop/echo") == "HBONE", "echo is HBONE on node1")
    before = len(mesh.records("node2"))
    result = mesh.send("client", "10.96.0.20:80")
    assert result["ok"], result
    until(lambda: len(mesh.records("node2")) > before, "node2's access log")
    inbound = mesh.records("node2")[before:]
    assert any(r.get("src.identity") == CLIENT_ID for r in inbound), inbound


def test_labelling_a_namespace_enrolls_its_running_pods_and_unlabelling_unenrolls(
    any_mode_mesh: KubeMesh,
) -> None:
    mesh = any_mode_mesh
    # Nothing is in the mesh yet: no rules, no listeners, no annotation, plain traffic.
    for key in (*SHOP, "other/bystander"):
        assert mesh.unenrolled(key) and mesh.annotation(key) is None
    assert mesh.send("client", "10.96.0.20:80")["ok"]
    assert mesh.records("node2") == []
    # Every pod of the cluster is a workload on both nodes, the service has its VIP.
    dump = mesh.dump("node1")
    workloads = {w["uid"]: w for w in dump["workloads"]}
    assert set(workloads) == {
        "Kubernetes//Pod/shop/client",
        "Kubernetes//Pod/shop/echo",
        "Kubernetes//Pod/other/bystander",
    }
    echo = workloads["Kubernetes//Pod/shop/echo"]
    assert echo["workloadIps"] == [mesh.ip("shop/echo")] and echo["serviceAccount"] == "echo"
    assert echo["node"] == "node2" and echo["protocol"] == "TCP"  # not enrolled yet
    (service,) = dump["services"]
    assert service["hostname"] == "echo.shop.svc.cluster.local"
    assert service["vips"] == ["/10.96.0.20"]
    assert dump["controlPlane"]["kubernetes"]["synced"] is True

    # The label: both running pods are enrolled by their own node's agent, at once.
    _enroll_shop(mesh)
    for key in SHOP:
        assert_captured_once(mesh, key)  # the agents' mode only, exactly once
    assert mesh.unenrolled("other/bystander") and mesh.annotation("other/bystander") is None
    enrolled = mesh.logged("node1", "pod enrolled")
    assert [(r["pod"], r["netns"].split("/")[1:4:2]) for r in enrolled] == [
        ("shop/client", ["proc", "ns"])  # found through /proc/<pid>/ns/net
    ]
    assert int(enrolled[0]["netns"].split("/")[2]) in mesh.kubelet.pids("shop/client")
    # The annotation makes the workloads HBONE for every agent: traffic is tunnelled.
    _hbone_to_echo(mesh)

    # The label goes: rules removed, listeners closed, annotation removed.
    mesh.label("shop", {})
    for key in SHOP:
        until(partial(mesh.unenrolled, key), f"{key} un-enrolled")
        until(partial(mesh.unannotated, key), f"{key} annotation removed")
    before = len(mesh.records("node2"))
    assert mesh.send("client", "10.96.0.20:80")["ok"]
    time.sleep(0.5)
    assert len(mesh.records("node2")) == before  # direct again, past both agents
    for node in mesh.agents:
        assert mesh.readiness(node)[0] == 200


def test_pod_deletion_unenrolls_it_and_writes_nothing_back(mesh: KubeMesh) -> None:
    _enroll_shop(mesh)
    patches = len(mesh.api.patches())
    assert mesh.api.delete(PODS, "shop", "echo")
    until(lambda: mesh.unenrolled("shop/echo"), "echo un-enrolled")
    until(lambda: mesh.logged("node2", "pod un-enrolled") != [], "node2 logged it")
    assert [r["pod"] for r in mesh.logged("node2", "pod un-enrolled")] == ["shop/echo"]
    time.sleep(1.0)  # the annotator would have written by now
    assert len(mesh.api.patches()) == patches  # the pod is gone: nothing to unmark
    assert mesh.enrolled("shop/client")
    assert "Kubernetes//Pod/shop/echo" not in {w["uid"] for w in mesh.dump("node1")["workloads"]}


def test_the_agents_wait_for_the_api_and_ride_out_compaction_and_restarts() -> None:
    with kube_mesh(CLUSTER, LISTENING, api_up=False) as mesh:
        # The API server is down: the agents serve readiness and say what they wait for.
        def waiting(node: str) -> bool:
            code, body = mesh.readiness(node)
            return code == 503 and "waiting for the Kubernetes API at https://10.244.0.3" in body

        for node in mesh.agents:
            until(partial(waiting, node), f"{node} not ready, waiting")
        mesh.api.thread.run(mesh.api.server.start)
        mesh.wait_all_ready()
        _enroll_shop(mesh)
        _hbone_to_echo(mesh)
        watches = mesh.api.server.watches_opened

        # Every watch cut; while the agents are away a namespace is labelled and etcd
        # compacts past their versions: each agent relists (410), sees the change through
        # the relist, and un-enrolls nobody.
        mesh.api.thread.run(mesh.api.server.drop_watches)
        mesh.label("other", AMBIENT)
        mesh.api.thread.call(mesh.api.server.compact)
        until(lambda: mesh.enrolled("other/bystander"), "bystander enrolled")
        for node in mesh.agents:
            until(
                partial(_relisted_all, mesh, node),
                f"{node} relisted every resource",
            )
        assert mesh.api.server.watches_opened > watches
        _hbone_to_echo(mesh)

        # The API server restarts: the agents keep their state, stay ready, and resume.
        mesh.api.thread.run(mesh.api.server.stop)
        time.sleep(2.0)
        for node in mesh.agents:
            assert mesh.readiness(node)[0] == 200
        _hbone_to_echo(mesh)
        watches = mesh.api.server.watches_opened
        mesh.api.thread.run(mesh.api.server.start)
        until(lambda: mesh.api.server.watches_opened >= watches + 2 * 7, "watches resumed")

        for node in mesh.agents:
            assert mesh.logged(node, "pod un-enrolled") == []
        for key in (*SHOP, "other/bystander"):
            assert mesh.enrolled(key)
            until(partial(mesh.annotated, key), f"{key} annotated")
        # Still following: a change after the restart is seen.
        mesh.label("shop", {})
        for key in SHOP:
            until(partial(mesh.unenrolled, key), f"{key} un-enrolled")
