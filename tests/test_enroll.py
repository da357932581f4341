"""Enrollment for real (root): a real Agent (fake CA, admin ports on 0) in this process
against a real simulated cluster, looking at what it did: iptables rules in the pod netns,
listeners in the pod netns, readiness. The controller's logic is tested without root in
test_enroll_controller.py.
"""

from __future__ import annotations

import os
import textwrap
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
import trio
from structlog.testing import capture_logs

from ztunnel.agent import Agent, attach_cluster_source
from ztunnel.cluster.net import ClusterNet, running_cluster
from ztunnel.config import Config
from ztunnel.enroll.controller import EnrollmentController
from ztunnel.identity.ca import FakeCA
from ztunnel.model.pod import Pod
from ztunnel.redirect import iptables
from ztunnel.redirect.base import RedirectPorts
from ztunnel.redirect.iptables import IptablesRedirector
from ztunnel.sources.clusterfile.spec import loads_spec
from ztunnel.testing.harness import recreate_pod_netns

pytestmark = pytest.mark.root

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
            reason = agent.pending["pod mesh/a"]
            assert reason.startswith("failure to start proxy")
            assert "proxy" not in agent.pending  # reconciled; only the pod is pending
            assert agent.readiness() == [f"pod mesh/a: {reason}"]
            assert _rules(net, "a") == EXPECTED  # fail closed while pending
            blocker.close()
            await _wait(lambda: not agent.pending, "retry")
            assert _listening(net, "a", 15001)
            nursery.cancel_scope.cancel()


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


async def test_recreated_sandbox_is_reenrolled(
    small_cluster: tuple[ClusterNet, Path], running: Running
) -> None:
    net, _ = small_cluster
    with trio.fail_after(30):
        old = running.controller.pods["mesh/a"]
        old_ident, old_proxy = old.ident, running.agent.proxies["Kubernetes//Pod/mesh/a"]
        recreate_pod_netns(net, "mesh/a")
        assert _rules(net, "a").empty
        await _wait(
            lambda: (
                (p := running.controller.pods.get("mesh/a")) is not None
                and p.ident != old_ident
                and p.running
            ),
            "re-enrollment in the new netns",
        )
        assert running.agent.proxies["Kubernetes//Pod/mesh/a"] is not old_proxy
        assert _rules(net, "a") == EXPECTED
        assert _listening(net, "a", 15008)
        assert old.netns.closed


# -- failures of the real tools --------------------------------------------------------


def _uids(*names: str) -> set[str]:
    return {f"Kubernetes//Pod/mesh/{n}" for n in names}


def _fake_tool(bindir: Path, name: str, output: str) -> Path:
    tool = bindir / name
    tool.write_text(f"#!/bin/sh\necho '{output}'\n")
    tool.chmod(0o755)
    return tool


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
            assert agent.pending["pod mesh/a"].startswith("failure to install redirection")
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


def test_the_iptables_redirector_in_a_real_netns(small_cluster: tuple[ClusterNet, Path]) -> None:
    net, _ = small_cluster
    redirector = IptablesRedirector(RedirectPorts())
    pod = Pod("Kubernetes//Pod/mesh/b", "b", "mesh")
    with net.open_netns(net.pod("b")) as ns:
        assert not redirector.installed(ns)
        assert redirector.describe(ns)["installed"] is False
        assert redirector.install(ns, pod) is True
        assert redirector.install(ns, pod) is False  # idempotent: nothing changed
        assert redirector.installed(ns)
        assert iptables.installed(ns) == EXPECTED
        assert redirector.describe(ns) == {
            "mode": "iptables",
            "installed": True,
            "current": True,
            "chains": {
                "mangle": ["ISTIO_OUTPUT", "ISTIO_PRERT"],
                "nat": ["ISTIO_OUTPUT", "ISTIO_PRERT"],
            },
        }
        assert redirector.remove(ns, pod) is True
        assert not redirector.installed(ns) and iptables.installed(ns).empty
        assert redirector.remove(ns, pod) is False
