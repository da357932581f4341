"""Enrollment: the cluster-file source, attaching to a cluster, and the controller in-process.

The root tests run a real Agent (fake CA, admin ports on 0) in this process against a real
simulated cluster and look at what the controller did: rules in the pod netns, listeners
in the pod netns, readiness entries.
"""

from __future__ import annotations

import os
import socket
import textwrap
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import replace
from ipaddress import IPv4Address
from pathlib import Path

import pytest
import trio
from structlog.testing import capture_logs

from ztunnel.agent import Agent
from ztunnel.cluster.net import ClusterNet, running_cluster
from ztunnel.cluster.spec import ClusterSpec, NamespaceSpec, ServiceSpec, demo_spec, loads_spec
from ztunnel.cluster.state import is_enrolled
from ztunnel.config import Config
from ztunnel.enroll.controller import (
    EnrollmentController,
    attach_cluster_source,
    pending_key,
    read_policy_docs,
)
from ztunnel.testing.harness import recreate_pod_netns
from ztunnel.enroll.layout import attach
from ztunnel.enroll.source import ClusterFileSource
from ztunnel.errors import ConfigError
from ztunnel.identity.ca import FakeCA
from ztunnel.model.workload import TunnelProtocol
from ztunnel.redirect import iptables
from ztunnel.redirect.netns import NETNS_RUN_DIR

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


# -- robustness: nothing one snapshot or one pod does ends the agent ------------------------


async def test_file_source_survives_an_edit_that_breaks_the_parser(tmp_path: Path) -> None:
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
            path.write_text("[" * 5000 + "]" * 5000)  # the YAML parser recurses too deep
            await _wait(lambda: source.last_error is not None, "the bad edit")
            assert source.last_good is seen[0] and len(seen) == 1
            path.write_text(SMALL.replace("{labels: {}}", "{labels: {x: y}}"))
            await _wait(lambda: len(seen) == 2, "the next good edit")
            nursery.cancel_scope.cancel()


def test_policy_dir_is_read_once_in_order_and_unreadable_files_are_named(tmp_path: Path) -> None:
    doc = (
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n"
        "metadata: {{name: {}, namespace: mesh}}\nspec: {{action: DENY}}\n"
    )
    (tmp_path / "b.yaml").write_text(doc.format("two") + "---\n---\n" + doc.format("three"))
    (tmp_path / "a.yml").write_text(doc.format("one"))
    (tmp_path / "notes.txt").write_text("not: [policy")
    docs = read_policy_docs(str(tmp_path))
    assert [d["metadata"]["name"] for d in docs] == ["one", "two", "three"]
    (tmp_path / "c.yaml").write_bytes(b"\xff\xfe")
    with pytest.raises(ConfigError, match=r"c\.yaml"):
        read_policy_docs(str(tmp_path))


class ScriptedSource:
    """A PodSource the test feeds by hand (a Kubernetes watch would not go through the file
    parser either, so its snapshots may be anything)."""

    def __init__(self) -> None:
        self.send, self._receive = trio.open_memory_channel[ClusterSpec](0)

    def __aiter__(self) -> AsyncIterator[ClusterSpec]:
        return self._receive.__aiter__()


THREE = textwrap.dedent(
    """\
    namespaces:
      mesh: {labels: {istio.io/dataplane-mode: ambient}}
    nodes: [n1]
    pods:
      - {name: a, namespace: mesh, node: n1}
      - {name: c, namespace: mesh, node: n1}
      - {name: d, namespace: mesh, node: n1}
    """
)


def _uids(*names: str) -> set[str]:
    return {f"Kubernetes//Pod/mesh/{n}" for n in names}


@pytest.fixture
async def scripted() -> AsyncIterator[
    tuple[ClusterNet, Agent, EnrollmentController, ScriptedSource]
]:
    spec = loads_spec(THREE)
    with running_cluster(spec) as net:
        opted_out = {"istio.io/dataplane-mode": "none"}
        initial = replace(
            spec, pods=(spec.pods[0], *(replace(p, labels=opted_out) for p in spec.pods[1:]))
        )
        assert [is_enrolled(initial, p) for p in initial.pods] == [True, False, False]
        source = ScriptedSource()
        agent = _agent()
        controller = EnrollmentController(agent, source, initial, net.prefix, poll=0.05)
        agent.extra_services.append(controller.run)
        async with trio.open_nursery() as nursery:
            with trio.fail_after(15):
                await nursery.start(agent.run)
            assert set(agent.proxies) == _uids("a")
            yield net, agent, controller, source
            nursery.cancel_scope.cancel()


@pytest.mark.root
async def test_malformed_snapshots_leave_the_agent_and_its_pods_alone(
    scripted: tuple[ClusterNet, Agent, EnrollmentController, ScriptedSource],
) -> None:
    net, agent, _, source = scripted
    spec = loads_spec(THREE)
    with trio.fail_after(20), capture_logs() as logs:
        # 300 pods on one node: attaching has no address for most of them.
        crowded = replace(spec, pods=tuple(replace(spec.pods[0], name=f"p{i}") for i in range(300)))
        await source.send.send(crowded)
        # A service without ports: the workload model cannot be built; and with it pod a
        # would leave the mesh, which must not happen for a snapshot that was not applied.
        bad = ServiceSpec("s", "mesh", "s.mesh", IPv4Address("10.96.0.9"), None, {"x": "y"})  # type: ignore[arg-type]
        unlabelled = {"mesh": NamespaceSpec("mesh", {})}
        await source.send.send(replace(spec, namespaces=unlabelled, services=(bad,)))
        await _wait(
            lambda: any(
                e["event"] == "cluster state rejected; keeping the previous state" for e in logs
            ),
            "the rejection",
        )
        assert any(e["event"].startswith("cannot attach to cluster snapshot") for e in logs)
        await trio.sleep(0.3)  # several reconcile passes
        assert set(agent.proxies) == _uids("a")
        assert _rules(net, "a") == EXPECTED
        # Still following: a good snapshot un-enrolls a.
        await source.send.send(replace(spec, namespaces=unlabelled))
        await _wait(lambda: not agent.proxies, "un-enrollment")
        await _wait(lambda: _rules(net, "a").empty, "rules removed")


@pytest.mark.root
async def test_a_pod_dropped_mid_reconcile_does_not_end_the_agent(
    scripted: tuple[ClusterNet, Agent, EnrollmentController, ScriptedSource],
) -> None:
    net, agent, controller, source = scripted
    full = loads_spec(THREE)
    with trio.fail_after(20):
        await source.send.send(full)  # c and d join: the pass enrolls c, then d
        while "mesh/c" not in controller.pods:  # the pass is now enrolling c
            await trio.lowlevel.checkpoint()
        await source.send.send(replace(full, pods=full.pods[:2]))  # d gone meanwhile
        await _wait(lambda: set(agent.proxies) == _uids("a", "c"), "a and c enrolled, d not")
        await _wait(lambda: _rules(net, "d").empty, "d's rules removed")
        assert set(controller.pods) == {"mesh/a", "mesh/c"}


def _fake_tool(bindir: Path, name: str, output: str) -> Path:
    tool = bindir / name
    tool.write_text(f"#!/bin/sh\necho '{output}'\n")
    tool.chmod(0o755)
    return tool


@pytest.mark.root
async def test_one_pod_failing_to_enroll_or_unenroll_does_not_end_the_agent(
    small_cluster: tuple[ClusterNet, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    net, path = small_cluster
    bindir = tmp_path / "bin"
    bindir.mkdir()
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")  # nsenter runs our tools
    fake = _fake_tool(bindir, "iptables-save", "-A broken")  # output nothing can parse
    agent = _agent()
    controller = attach_cluster_source(agent, str(path), net.prefix, None, poll=0.05)
    controller.retry_interval = 0.3
    with trio.fail_after(25), capture_logs() as logs:
        async with trio.open_nursery() as nursery:
            await nursery.start(agent.run)
            assert agent.pending[pending_key("mesh/a")].startswith("failure to start proxy")
            fake.unlink()
            await _wait(lambda: not agent.pending, "the retry")
            assert set(agent.proxies) == _uids("a")
            pod = controller.pods["mesh/a"]
            _fake_tool(bindir, "iptables-save", "-A broken")
            path.write_text(SMALL.replace("ambient}}", "none}}"))
            await _wait(lambda: pod.netns.closed, "un-enrollment")
            assert not agent.proxies
            assert any(e["event"] == "could not remove pod rules" for e in logs)
            # The rules it could not remove are stranded: removed once the tool works again.
            fake.unlink()
            await _wait(lambda: _rules(net, "a").empty, "stranded rules removed")
            nursery.cancel_scope.cancel()


@pytest.mark.root
async def test_next_agent_removes_rules_of_a_pod_that_left_the_mesh_while_down(
    small_cluster: tuple[ClusterNet, Path],
) -> None:
    net, path = small_cluster
    with trio.fail_after(30), capture_logs() as logs:
        agent = _agent()
        attach_cluster_source(agent, str(path), net.prefix, None, poll=0.05)
        async with trio.open_nursery() as nursery:
            await nursery.start(agent.run)
            await agent.shutdown()
        assert _rules(net, "a") == EXPECTED  # fail closed while no agent runs
        path.write_text(SMALL.replace("ambient}}", "none}}"))  # a leaves the mesh meanwhile
        agent = _agent()
        attach_cluster_source(agent, str(path), net.prefix, None, poll=0.05)
        async with trio.open_nursery() as nursery:
            await nursery.start(agent.run)
            assert _rules(net, "a").empty
            assert not agent.proxies
            removed = [
                e["pod"]
                for e in logs
                if e["event"] == "removed redirection rules of a pod no longer in the mesh"
            ]
            assert removed == ["mesh/a"]
            await agent.shutdown()


@pytest.mark.root
async def test_rejected_policies_keep_enrollment_on_the_applied_snapshot(
    small_cluster: tuple[ClusterNet, Path], running: Running
) -> None:
    net, path = small_cluster
    bad_policy = (
        "policies:\n"
        "  - apiVersion: security.istio.io/v1\n    kind: AuthorizationPolicy\n"
        "    metadata: {name: x, namespace: mesh}\n    spec: {action: NOPE}\n"
    )
    unlabelled = SMALL.replace("ambient}}", "none}}")
    with trio.fail_after(20), capture_logs() as logs:
        path.write_text(unlabelled + bad_policy)
        await _wait(
            lambda: any(
                e["event"] == "cluster policies rejected; keeping the previous state" for e in logs
            ),
            "the rejection",
        )
        await trio.sleep(0.3)  # several reconcile passes
        assert set(running.agent.proxies) == _uids("a")  # the store still says a is in the mesh
        assert _rules(net, "a") == EXPECTED
        path.write_text(unlabelled)
        await _wait(lambda: not running.agent.proxies, "un-enrollment once applied")


@pytest.mark.root
async def test_a_wanted_pod_without_a_usable_netns_is_not_ready(
    small_cluster: tuple[ClusterNet, Path], running: Running
) -> None:
    net, path = small_cluster
    agent = running.agent
    key = pending_key("mesh/c")
    netns_path = NETNS_RUN_DIR / f"{net.prefix}-pod-mesh-c"
    with trio.fail_after(20), socket.socket(socket.AF_UNIX) as blocker:
        blocker.bind(str(netns_path))  # exists, but open(2) of a socket fails (ENXIO)
        try:
            path.write_text(SMALL + "  - {name: c, namespace: mesh, node: n1}\n")
            await _wait(lambda: key in agent.pending, "c pending")
            assert agent.pending[key].startswith(f"cannot open netns {netns_path.name}")
            assert f"pod mesh/c: {agent.pending[key]}" in agent.readiness()
        finally:
            netns_path.unlink()
        await _wait(lambda: "not found" in agent.pending.get(key, ""), "c missing")
        assert set(agent.proxies) == _uids("a")
        path.write_text(SMALL)
        await _wait(lambda: not agent.pending, "ready again once c is gone")
