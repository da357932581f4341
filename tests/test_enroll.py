"""Enrollment: the cluster-file source, attaching to a cluster, and the controller in-process.

The root tests run a real Agent (fake CA, admin ports on 0) in this process against a real
simulated cluster and look at what the controller did: rules in the pod netns, listeners
in the pod netns, readiness entries.
"""

from __future__ import annotations

import textwrap
from collections.abc import AsyncIterator, Callable, Iterator
from ipaddress import IPv4Address
from pathlib import Path

import pytest
import trio

from ztunnel.agent import Agent
from ztunnel.cluster.net import ClusterNet, running_cluster
from ztunnel.cluster.spec import ClusterSpec, demo_spec, loads_spec
from ztunnel.config import Config
from ztunnel.enroll.controller import (
    EnrollmentController,
    attach_cluster_source,
    pending_key,
)
from ztunnel.enroll.harness import recreate_pod_netns
from ztunnel.enroll.layout import attach
from ztunnel.enroll.source import ClusterFileSource
from ztunnel.errors import ConfigError
from ztunnel.identity.ca import FakeCA
from ztunnel.model.workload import TunnelProtocol
from ztunnel.redirect import iptables

SMALL = textwrap.dedent(
    """\
    namespaces:
      mesh: {labels: {istio.io/dataplane-mode: ambient}}
      plain: {labels: {}}
    nodes: [n1]
    pods:
      - {name: a, namespace: mesh, node: n1, serviceAccount: sa-a}
      - {name: b, namespace: plain, node: n1}
    """
)


def _agent(node: str = "n1") -> Agent:
    config = Config(
        node_name=node,
        fake_ca=True,
        admin_addr=("127.0.0.1", 0),
        stats_addr=("127.0.0.1", 0),
        readiness_addr=("127.0.0.1", 0),
        connection_termination_deadline=1.0,
    )
    return Agent(config, ca=FakeCA.ephemeral())


async def _wait(cond: Callable[[], bool], what: str, limit: float = 8.0) -> None:
    """Poll external state (files, netns, the agent) until ``cond``; callers hold a fail_after."""
    with trio.move_on_after(limit):
        while not cond():  # noqa: ASYNC110 - polling state outside trio
            await trio.sleep(0.05)
        return
    raise AssertionError(f"timed out waiting for {what}")


# -- the file source ---------------------------------------------------------------------


async def test_file_source_yields_edits_and_keeps_last_good_on_a_bad_edit(tmp_path: Path) -> None:
    path = tmp_path / "cluster.yaml"
    path.write_text(SMALL)
    source = ClusterFileSource(path, poll=0.02)
    seen: list[ClusterSpec] = []

    async def consume() -> None:
        async for spec in source:
            seen.append(spec)

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(consume)
            await _wait(lambda: len(seen) == 1, "first snapshot")
            assert [p.key for p in seen[0].pods] == ["mesh/a", "plain/b"]
            path.write_text(SMALL.replace("node: n1}", "node: nope}", 1))
            await _wait(lambda: source.last_error is not None, "the bad edit")
            assert source.last_error is not None
            assert source.last_error.field == "pods[1].node"
            assert source.last_good is seen[0] and len(seen) == 1  # nothing replaced
            path.write_text(SMALL.replace("{labels: {}}", "{labels: {istio.io/dataplane-mode: x}}"))
            await _wait(lambda: len(seen) == 2, "the good edit")
            assert seen[1].namespaces["plain"].labels == {"istio.io/dataplane-mode": "x"}
            assert source.last_error is None
            nursery.cancel_scope.cancel()


# -- attaching ---------------------------------------------------------------------------


def test_attach_rejects_a_node_the_file_does_not_name(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(SMALL)
    with pytest.raises(ConfigError) as info:
        attach_cluster_source(_agent("n9"), str(path), "zt000000", None)
    assert info.value.source == "NODE_NAME" and "n1" in info.value.problem


def test_attach_rejects_a_bad_file_naming_the_field(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(SMALL.replace("serviceAccount: sa-a", "serviceAccount: 7"))
    with pytest.raises(ConfigError) as info:
        attach_cluster_source(_agent(), str(path), "zt000000", None)
    assert info.value.field == "pods[0].serviceAccount"


def test_attach_requires_the_prefix(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(SMALL)
    with pytest.raises(ConfigError, match="cluster-prefix"):
        attach_cluster_source(_agent(), str(path), None, None)


def test_attach_rejects_a_bad_policy_dir_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(SMALL)
    pdir = tmp_path / "policies"
    pdir.mkdir()
    (pdir / "bad.yaml").write_text(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n"
        "metadata: {name: x, namespace: mesh}\nspec: {action: NOPE}\n"
    )
    with pytest.raises(ConfigError, match=r"bad\.yaml"):
        attach_cluster_source(_agent(), str(path), "zt000000", str(pdir))


def test_attach_loads_the_cluster_as_workload_state(tmp_path: Path) -> None:
    path = tmp_path / "demo.yaml"
    path.write_text((Path(__file__).parents[1] / "ztunnel/cluster/demo.yaml").read_text())
    agent = _agent("node1")
    controller = attach_cluster_source(agent, str(path), "zt000000", None)
    assert controller.run in agent.extra_services
    by_name = {w.name: w for w in agent.store.workloads()}
    assert by_name["client"].protocol is TunnelProtocol.HBONE
    assert by_name["legacy-client"].protocol is TunnelProtocol.TCP
    assert by_name["echo-2"].workload_ips == (IPv4Address("10.244.2.2"),)
    assert by_name["echo-1"].authorization_policies == ("demo/echo-allow-client",)
    assert by_name["client"].authorization_policies == ()
    assert agent.store.service_by_vip(IPv4Address("10.96.0.10")) is not None
    assert agent.pending  # not ready until the controller reconciled once


def test_layout_uses_the_cluster_addressing() -> None:
    layout = attach(demo_spec(), "zt00beef")
    assert layout.pods["demo/echo-2"].ip == IPv4Address("10.244.2.2")
    assert layout.pods["legacy/legacy-client"].ip == IPv4Address("10.244.2.4")
    assert layout.pods["demo/client"].netns == "zt00beef-pod-demo-client"
    assert layout.nodes["node2"].netns == "zt00beef-node-node2"
    assert [p.name for p in layout.pods_on("node1")] == ["client", "echo-1"]


@pytest.mark.root
def test_layout_matches_a_real_build() -> None:
    spec = demo_spec()
    with running_cluster(spec) as net:
        layout = attach(spec, net.prefix)
        assert layout.pods == net.pods
        assert layout.nodes == net.nodes


# -- the controller, in-process, root ------------------------------------------------------


@pytest.fixture
def small_cluster(tmp_path: Path) -> Iterator[tuple[ClusterNet, Path]]:
    path = tmp_path / "cluster.yaml"
    path.write_text(SMALL)
    with running_cluster(loads_spec(SMALL, str(path))) as net:
        yield net, path


def _rules(net: ClusterNet, pod: str) -> iptables.InstalledState:
    with net.open_netns(net.pod(pod)) as ns:
        return iptables.installed(ns)


def _listening(net: ClusterNet, pod: str, port: int) -> bool:
    with net.open_netns(net.pod(pod)) as ns, ns.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex(("127.0.0.1", port)) == 0


class Running:
    def __init__(self, agent: Agent, controller: EnrollmentController) -> None:
        self.agent, self.controller = agent, controller


@pytest.fixture
async def running(small_cluster: tuple[ClusterNet, Path]) -> AsyncIterator[Running]:
    net, path = small_cluster
    agent = _agent()
    controller = attach_cluster_source(agent, str(path), net.prefix, None, poll=0.05)
    controller.retry_interval = 0.3
    async with trio.open_nursery() as nursery:
        with trio.fail_after(15):
            await nursery.start(agent.run)
        yield Running(agent, controller)
        nursery.cancel_scope.cancel()


EXPECTED = iptables.expected_state(iptables.InpodConfig())


@pytest.mark.root
async def test_enrolls_ambient_pods_only(
    small_cluster: tuple[ClusterNet, Path], running: Running
) -> None:
    net, _ = small_cluster
    assert running.agent.pending == {}
    assert set(running.agent.proxies) == {"Kubernetes//Pod/mesh/a"}
    assert _rules(net, "a") == EXPECTED
    assert _rules(net, "b").empty
    for port in (15001, 15006, 15008):
        assert _listening(net, "a", port)
        assert not _listening(net, "b", port)


@pytest.mark.root
async def test_label_edits_enroll_and_unenroll_live(
    small_cluster: tuple[ClusterNet, Path], running: Running
) -> None:
    net, path = small_cluster
    with trio.fail_after(30):
        path.write_text(
            SMALL.replace("{labels: {istio.io/dataplane-mode: ambient}}", "{labels: {}}")
        )
        await _wait(lambda: not running.agent.proxies, "un-enrollment")
        await _wait(lambda: _rules(net, "a").empty, "rules removed")
        assert not _listening(net, "a", 15008)
        path.write_text(SMALL)
        await _wait(lambda: "Kubernetes//Pod/mesh/a" in running.agent.proxies, "re-enrollment")
        assert _rules(net, "a") == EXPECTED
        assert _listening(net, "a", 15008)
        # A pod-level opt-out wins over its namespace.
        path.write_text(
            SMALL.replace(
                "serviceAccount: sa-a}",
                "serviceAccount: sa-a, labels: {istio.io/dataplane-mode: none}}",
            )
        )
        await _wait(lambda: not running.agent.proxies, "opt-out")


@pytest.mark.root
async def test_bind_failure_is_pending_then_retried(small_cluster: tuple[ClusterNet, Path]) -> None:
    net, path = small_cluster
    with net.open_netns(net.pod("a")) as ns:
        blocker = ns.socket()  # no SO_REUSEPORT: the agent's bind must fail
    blocker.bind(("0.0.0.0", 15001))
    blocker.listen()
    agent = _agent()
    controller = attach_cluster_source(agent, str(path), net.prefix, None, poll=0.05)
    controller.retry_interval = 0.3
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            await nursery.start(agent.run)
            reason = agent.pending[pending_key("mesh/a")]
            assert reason.startswith("failure to start proxy")
            assert "proxy" not in agent.pending  # reconciled; only the pod is pending
            assert agent.readiness() == [f"pod mesh/a: {reason}"]
            assert _rules(net, "a") == EXPECTED  # fail closed while pending
            blocker.close()
            await _wait(lambda: not agent.pending, "retry")
            assert _listening(net, "a", 15001)
            nursery.cancel_scope.cancel()


@pytest.mark.root
async def test_agent_exit_leaves_rules_and_next_agent_reuses_them(
    small_cluster: tuple[ClusterNet, Path],
) -> None:
    net, path = small_cluster
    with trio.fail_after(30):
        for _ in range(2):
            agent = _agent()
            attach_cluster_source(agent, str(path), net.prefix, None, poll=0.05)
            async with trio.open_nursery() as nursery:
                await nursery.start(agent.run)
                assert _rules(net, "a") == EXPECTED  # not duplicated by the second agent
                await agent.shutdown()
            assert _rules(net, "a") == EXPECTED  # left in place: fail closed
            assert not _listening(net, "a", 15008)


@pytest.mark.root
async def test_recreated_sandbox_is_reenrolled(
    small_cluster: tuple[ClusterNet, Path], running: Running
) -> None:
    net, _ = small_cluster
    with trio.fail_after(30):
        old = running.controller.pods["mesh/a"]
        old_ident, old_proxy = old.ident, old.proxy
        recreate_pod_netns(net, "mesh/a")
        assert _rules(net, "a").empty
        await _wait(
            lambda: (
                (p := running.controller.pods.get("mesh/a")) is not None
                and p.ident != old_ident
                and p.proxy is not None
            ),
            "re-enrollment in the new netns",
        )
        assert running.agent.proxies["Kubernetes//Pod/mesh/a"] is not old_proxy
        assert _rules(net, "a") == EXPECTED
        assert _listening(net, "a", 15008)
        assert old.netns.closed
