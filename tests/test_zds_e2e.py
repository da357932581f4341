"""The agent under istio-cni (root): pods arrive over ZDS with their real netns fds from a
fake istio-cni (this test), workloads over xDS from a grpcio istiod, certificates from
``ca serve``'s service over the CA protocol. As with the real istio-cni, the rules in the
pods are istio-cni's job, so the test installs them; the agent installs none. Traffic
really flows between pods of two nodes, a Del drains the pod's proxy at once, and a pod
whose proxy cannot start is NACKed and retried.

The agents run in this process (``Agent.from_config`` with ztunnel's environment), so
they reach the fake istiod and the CA on this netns's loopback; their proxies' sockets
live in the pods' namespaces.
"""

from __future__ import annotations

import json
import socket
import textwrap
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from tests.test_zds import SNAPSHOT, CniConn, FakeCni, add, delete
from tests.xds_fakes import ADDRESS_TYPE, AUTHORIZATION_TYPE, FakeStream, fake_xds_server, workload
from ztunnel.agent import Agent
from ztunnel.cluster import apps
from ztunnel.cluster.net import ClusterNet, running_cluster
from ztunnel.config import Config
from ztunnel.grpc.tls import server_context
from ztunnel.identity.ca import ROOT_CERT, init_ca_dir
from ztunnel.identity.ca_server import CAService, StaticTokens, load_ca_dir, serve
from ztunnel.identity.ca_server import serving_certificate as serving_cert
from ztunnel.model.identity import Identity
from ztunnel.redirect import iptables
from ztunnel.redirect.netns import NetNamespace
from ztunnel.sources.clusterfile.spec import loads_spec

pytestmark = pytest.mark.root

CLUSTER = textwrap.dedent(
    """\
    namespaces:
      mesh: {labels: {istio.io/dataplane-mode: ambient}}
    nodes: [n1, n2]
    pods:
      - {name: a, namespace: mesh, node: n1, serviceAccount: sa-a}
      - name: b
        namespace: mesh
        node: n2
        serviceAccount: sa-b
        program: [python, -m, ztunnel.cluster.apps, echo, --port, "8080"]
        ports: [8080]
      - name: c
        namespace: mesh
        node: n2
        serviceAccount: sa-c
        program: [python, -m, ztunnel.cluster.apps, echo, --port, "9090"]
        ports: [9090]
    """
)
TD = "cluster.local"
NODE_AGENT = "spiffe://cluster.local/ns/istio-system/sa/ztunnel"
PODS = {"n1": ("a",), "n2": ("b", "c")}


@dataclass
class Node:
    agent: Agent
    cni: FakeCni
    conn: CniConn | None = None


@dataclass
class World:
    net: ClusterNet
    nodes: dict[str, Node]
    ca: CAService

    def ip(self, pod: str) -> str:
        return str(self.net.pod(pod).ip)

    def uid(self, pod: str) -> str:
        return f"Kubernetes//Pod/mesh/{pod}"


def _istio_cni_rules(net: ClusterNet) -> None:
    """What istio-cni does for each pod before it sends the Add: the in-pod rules."""
    for pod in net.pods.values():
        with NetNamespace.named(pod.netns) as ns:
            iptables.install(ns, iptables.InpodConfig())


@contextmanager
def _ca_service(tmp_path: Path) -> Iterator[tuple[CAService, Path]]:
    ca_dir = tmp_path / "ca"
    init_ca_dir(ca_dir)
    lines = [f"  - {{token: tok-{n}, node: {n}, identity: '{NODE_AGENT}'}}" for n in PODS]
    (tmp_path / "tokens.yaml").write_text("tokens:\n" + "\n".join(lines) + "\n")
    placement = {
        node: {Identity(TD, "mesh", f"sa-{p}") for p in pods} for node, pods in PODS.items()
    }
    service = CAService(
        load_ca_dir(ca_dir),
        StaticTokens(tmp_path / "tokens.yaml"),
        lambda node: placement.get(node, set()),
        trusted_node_agents={Identity(TD, "istio-system", "ztunnel")},
    )
    yield service, ca_dir


def _agent_env(
    tmp_path: Path, node: str, xds_port: int, ca_port: int, ca_dir: Path, workers: str = "1"
) -> Config:
    (tmp_path / f"token-{node}").write_text(f"tok-{node}")
    return Config.from_sources(
        {
            "NODE_NAME": node,
            "XDS_ADDRESS": f"http://127.0.0.1:{xds_port}",
            "CA_ADDRESS": f"https://127.0.0.1:{ca_port}",
            "CA_ROOT_CA": str(ca_dir / ROOT_CERT),
            "AUTH_TOKEN": str(tmp_path / f"token-{node}"),
            "INPOD_UDS": str(tmp_path / f"cni-{node}.sock"),
            "ZTUNNEL_ADMIN_ADDR": "127.0.0.1:0",
            "ZTUNNEL_STATS_ADDR": "127.0.0.1:0",
            "ZTUNNEL_READINESS_ADDR": "127.0.0.1:0",
            "CONNECTION_TERMINATION_DEADLINE": "2s",
            "ZTUNNEL_WORKER_THREADS": workers,
        }
    )


@asynccontextmanager
async def world(tmp_path: Path, workers: str = "1") -> AsyncIterator[World]:
    spec = loads_spec(CLUSTER)
    with (
        running_cluster(spec) as net,
        fake_xds_server() as (xds, xds_port),
        _ca_service(tmp_path) as (ca, ca_dir),
    ):
        programs = apps.start_pod_programs(net)
        chain, key = serving_cert(ca_dir, ["istiod.istio-system.svc"], ["127.0.0.1"])
        (tmp_path / "ca.crt").write_bytes(chain)
        (tmp_path / "ca.key").write_bytes(key)
        ca_tls = server_context(str(tmp_path / "ca.crt"), str(tmp_path / "ca.key"))
        try:
            _istio_cni_rules(net)
            resources = [
                (f"Kubernetes//Pod/mesh/{p.name}", "1",
                 workload(p.name, str(net.pods[p.key].ip), ns="mesh",
                          sa=p.service_account, node=p.node))
                for p in spec.pods
            ]  # fmt: skip
            async with trio.open_nursery() as nursery:
                listeners = await nursery.start(
                    lambda task_status: serve(ca, port=0, host="127.0.0.1",
                                              ssl_context=ca_tls, task_status=task_status)
                )  # fmt: skip
                ca_port = listeners[0].socket.getsockname()[1]
                nodes: dict[str, Node] = {}
                for name in PODS:
                    config = _agent_env(tmp_path, name, xds_port, ca_port, ca_dir, workers)
                    cni = FakeCni(Path(config.inpod_uds or ""))
                    await cni.start()
                    agent = Agent.from_config(config)
                    await nursery.start(agent.run)
                    stream: FakeStream = await trio.to_thread.run_sync(xds.next_stream)
                    stream.push(ADDRESS_TYPE, resources)
                    stream.push(AUTHORIZATION_TYPE, [])
                    nodes[name] = Node(agent, cni)
                for node in nodes.values():
                    node.conn = await node.cni.accept()
                for pod in spec.pods:
                    apps.wait_listening(net, pod.key, pod.ports[0]) if pod.ports else None
                try:
                    yield World(net, nodes, ca)
                finally:
                    for node in nodes.values():
                        await node.agent.shutdown()
                        node.cni.close()
                    nursery.cancel_scope.cancel()
        finally:
            apps.stop_programs(programs)


async def _add(w: World, node: str, pod: str) -> str:
    """istio-cni's Add with the pod's netns fd; the Ack's error ("" = ACK)."""
    conn = w.nodes[node].conn
    assert conn is not None
    with NetNamespace.named(w.net.pod(pod).netns) as ns:
        return await conn.send(add(f"k8s-uid-{pod}", pod, "mesh", f"sa-{pod}"), (ns.fd,))


async def _send(w: World, src: str, dst: str, port: int) -> dict[str, object]:
    argv = [*apps_send(), "--to", f"{w.ip(dst)}:{port}", "--bytes", "50000", "--timeout", "5"]
    proc = await trio.to_thread.run_sync(lambda: apps.run_in_pod(w.net, src, argv, timeout=20))
    result: dict[str, object] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def apps_send() -> list[str]:
    return ["python", "-m", "ztunnel.cluster.apps", "send"]


def _listening(w: World, pod: str, port: int) -> bool:
    with NetNamespace.named(w.net.pod(pod).netns) as ns, ns.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _sample(agent: Agent, name: str) -> float:
    return agent.metrics.registry.get_sample_value(name) or 0.0


def _mtls_inbound(agent: Agent) -> float:
    """Inbound connections the agent's proxies accepted over HBONE (mTLS)."""
    total = 0.0
    for line in agent.metrics.exposition().decode().splitlines():
        if (
            line.startswith("istio_tcp_connections_opened_total{")
            and 'reporter="destination"' in line
            and 'connection_security_policy="mutual_tls"' in line
        ):
            total += float(line.rsplit(" ", 1)[1])
    return total


async def _until(cond: object, what: str, limit: float = 15) -> None:
    assert callable(cond)
    with trio.move_on_after(limit):
        while not cond():  # noqa: ASYNC110 - polling the agent's and the kernel's state
            await trio.sleep(0.05)
        return
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.parametrize("workers", ["1", "2"], ids=["one-process", "2-workers"])
async def test_pods_from_istio_cni_carry_traffic_and_a_del_drains_one(
    tmp_path: Path, workers: str
) -> None:
    with trio.fail_after(120):
        async with world(tmp_path, workers) as w:
            n1, n2 = w.nodes["n1"], w.nodes["n2"]
            # istio-cni's snapshot: every Add is acknowledged once the pod's proxy started.
            assert await _add(w, "n1", "a") == ""
            assert await _add(w, "n2", "b") == ""
            assert await _add(w, "n2", "c") == ""
            for node in w.nodes.values():
                assert node.conn is not None and await node.conn.send(SNAPSHOT) == ""
            assert set(n1.agent.proxies) == {w.uid("a")}
            assert set(n2.agent.proxies) == {w.uid("b"), w.uid("c")}
            await _until(lambda: not n1.agent.readiness() and not n2.agent.readiness(), "ready")

            # a (node n1) -> b (node n2): captured by istio-cni's rules, carried over HBONE
            before = _mtls_inbound(n2.agent)
            result = await _send(w, "a", "b", 8080)
            assert result.get("ok"), result
            # (from worker processes, the books follow within a telemetry batch)
            await _until(lambda: _mtls_inbound(n2.agent) == before + 1, "the inbound counted")
            # both certificates came over the CA protocol, impersonated by the node agents
            issued = w.ca.registry.get_sample_value("ztunnel_ca_certificates_issued_total")
            assert issued is not None and issued >= 3
            refused = w.ca.registry.get_sample_value(
                "ztunnel_ca_refusals_total", {"reason": "not_on_node"}
            )
            assert not refused
            dump = n2.agent.config_dump()["controlPlane"]
            assert dump["zds"]["connected"] and dump["zds"]["snapshotReceived"]
            assert {p["uid"] for p in dump["zds"]["pods"]} == {w.uid("b"), w.uid("c")}
            assert dump["xds"]["synced"] and dump["ca"]["impersonate"]

            # Del: c's proxy is gone at once (its netns is being torn down), b stays.
            assert _listening(w, "c", 15008)
            stopped = _sample(n2.agent, "istio_proxies_stopped_total")
            assert n2.conn is not None and await n2.conn.send(delete("k8s-uid-c")) == ""
            await _until(lambda: w.uid("c") not in n2.agent.proxies, "c drained")
            await _until(lambda: not _listening(w, "c", 15008), "c's listeners closed")
            assert _sample(n2.agent, "istio_proxies_stopped_total") == stopped + 1
            assert {p["uid"] for p in n2.agent.config_dump()["controlPlane"]["zds"]["pods"]} == {
                w.uid("b")
            }
            # c's identity is released (it stops renewing); b is unaffected
            assert n2.agent.secrets.get(Identity(TD, "mesh", "sa-c")) is None
            result = await _send(w, "a", "b", 8080)
            assert result.get("ok"), result
            # c is still redirected (istio-cni removes its rules with the pod), so nothing
            # in the mesh answers for it any more
            result = await _send(w, "a", "c", 9090)
            assert not result.get("ok"), result
            assert not n2.agent.readiness()


async def test_a_pod_whose_proxy_cannot_start_is_nacked_then_retried(tmp_path: Path) -> None:
    with trio.fail_after(120):
        async with world(tmp_path) as w:
            n1 = w.nodes["n1"]
            # Something else holds a's outbound port inside its netns (an old agent without
            # SO_REUSEPORT): the proxy cannot bind, istio-cni hears why.
            with NetNamespace.named(w.net.pod("a").netns) as ns:
                blocker = ns.socket(socket.AF_INET6, socket.SOCK_STREAM)
            with blocker:
                blocker.bind(("::", 15006))
                blocker.listen()
                error = await _add(w, "n1", "a")
                assert error.startswith("failure to start proxy: "), error
                assert n1.conn is not None and await n1.conn.send(SNAPSHOT) == ""
                reasons = " ".join(n1.agent.readiness())
                assert "istio-cni: proxies not started: Kubernetes//Pod/mesh/a" in reasons
            # The port is free again: the controller's retry (5 s) starts it, ready again.
            await _until(lambda: w.uid("a") in n1.agent.proxies, "a started", limit=15)
            await _until(lambda: not n1.agent.readiness(), "n1 ready", limit=15)
