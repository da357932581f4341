"""The cluster file as a pod source, and the agent's validation before it starts (no root)."""

from __future__ import annotations

import textwrap
from collections.abc import Callable
from ipaddress import IPv4Address
from pathlib import Path

import pytest
import trio
from structlog.testing import capture_logs

from ztunnel.agent import Agent, attach_cluster_source
from ztunnel.config import Config, ProxyMode, RedirectMode, WorkloadInfo
from ztunnel.errors import ConfigError
from ztunnel.identity.ca import FakeCA
from ztunnel.model.pod import NetnsRef, PodSnapshot
from ztunnel.model.workload import TunnelProtocol
from ztunnel.policy.istio import read_policy_dir
from ztunnel.redirect.base import NoRedirector
from ztunnel.redirect.iptables import IptablesRedirector
from ztunnel.redirect.modes import ModeSwitch
from ztunnel.sources.clusterfile.source import ClusterFileSource

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
DENY = (
    "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n"
    "metadata: {{name: {}, namespace: mesh}}\nspec: {{action: DENY}}\n"
)
BAD_POLICY = (
    "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n"
    "metadata: {name: x, namespace: mesh}\nspec: {action: NOPE}\n"
)


def _agent(node: str = "n1", **config: object) -> Agent:
    cfg = Config(
        node_name=node,
        fake_ca=True,
        admin_addr=("127.0.0.1", 0),
        stats_addr=("127.0.0.1", 0),
        readiness_addr=("127.0.0.1", 0),
        **config,  # type: ignore[arg-type]
    )
    return Agent(cfg, ca=FakeCA.ephemeral())


async def _wait(cond: Callable[[], bool], what: str, limit: float = 8.0) -> None:
    with trio.move_on_after(limit):
        while not cond():  # noqa: ASYNC110 - polling a file-backed source
            await trio.sleep(0.02)
        return
    raise AssertionError(f"timed out waiting for {what}")


# -- the source ----------------------------------------------------------------------------


def test_open_gives_this_nodes_pods_with_their_netns(tmp_path: Path) -> None:
    path = tmp_path / "cluster.yaml"
    path.write_text(SMALL)
    source, first = ClusterFileSource.open(path, "zt00beef", "n1")
    assert source.last_good is first
    a, b = first.pods
    assert (a.key, a.in_mesh, a.service_account) == ("mesh/a", True, "sa-a")
    assert a.netns == NetnsRef("/var/run/netns/zt00beef-pod-mesh-a")
    assert a.ips == (IPv4Address("10.244.1.2"),)
    assert (b.key, b.in_mesh) == ("plain/b", False)
    assert first.state is not None
    protocols = {w.name: w.protocol for w in first.state.workloads}
    assert protocols == {"a": TunnelProtocol.HBONE, "b": TunnelProtocol.TCP}


def test_policy_dir_documents_are_translated_with_the_files(tmp_path: Path) -> None:
    path = tmp_path / "cluster.yaml"
    path.write_text(
        SMALL + "policies:\n  - " + DENY.format("in-file").replace("\n", "\n    ").rstrip() + "\n"
    )
    pdir = tmp_path / "policies"
    pdir.mkdir()
    (pdir / "p.yaml").write_text(DENY.format("from-dir"))
    _, first = ClusterFileSource.open(path, "zt00beef", "n1", policy_dir=str(pdir))
    assert first.state is not None
    assert [p.key for p in first.state.policies] == ["mesh/in-file", "mesh/from-dir"]


async def test_edits_are_followed_and_a_bad_edit_keeps_the_last_good(tmp_path: Path) -> None:
    path = tmp_path / "cluster.yaml"
    path.write_text(SMALL)
    source = ClusterFileSource(path, "zt00beef", "n1", poll=0.02)
    seen: list[PodSnapshot] = []

    async def consume() -> None:
        async for snap in source:
            seen.append(snap)

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(consume)
            await _wait(lambda: len(seen) == 1, "first snapshot")
            assert [p.key for p in seen[0].pods] == ["mesh/a", "plain/b"]
            for bad, field in (
                (SMALL.replace("node: n1}", "node: nope}", 1), "pods[1].node"),
                ("[" * 5000 + "]" * 5000, ""),  # the YAML parser recurses too deep
                (SMALL + "policies:\n  - " + BAD_POLICY.replace("\n", "\n    "), "spec.action"),
                (SMALL.replace("n1", "n2"), "n1"),  # NODE_NAME no longer a node
            ):
                source.last_error = None
                path.write_text(bad)
                await _wait(lambda: source.last_error is not None, f"the bad edit {field}")
                assert source.last_error is not None
                assert source.last_error.field == field
                assert source.last_good is seen[0] and len(seen) == 1  # nothing replaced
            path.write_text(SMALL.replace("{labels: {}}", "{labels: {istio.io/dataplane-mode: x}}"))
            await _wait(lambda: len(seen) == 2, "the good edit")
            assert seen[1].pod("plain/b") is not None
            assert seen[1].pod("plain/b").labels == {}  # type: ignore[union-attr]
            assert source.last_error is None
            nursery.cancel_scope.cancel()


async def test_a_bug_triggered_by_an_edit_keeps_the_last_good_and_logs_the_traceback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "cluster.yaml"
    path.write_text(SMALL)
    source, first = ClusterFileSource.open(path, "zt00beef", "n1")

    def broken(*args: object) -> object:
        raise RuntimeError("bug")

    monkeypatch.setattr("ztunnel.sources.clusterfile.source.snapshot", broken)
    with capture_logs() as logs:
        assert await source._read() is None
    assert source.last_good is first
    assert source.last_error is not None and "RuntimeError('bug')" in source.last_error.problem
    (entry,) = logs
    assert entry["event"] == "cluster file rejected; keeping the last good snapshot"
    assert entry["exc_info"] is True


def test_the_prefix_must_be_a_plain_name(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(SMALL)
    for prefix in ("", None, "../etc", "a/b", ".."):
        with pytest.raises(ConfigError) as info:
            ClusterFileSource.open(path, prefix, "n1")
        assert info.value.source == "--cluster-prefix"


# -- the policy directory: one reader for both modes ---------------------------------------


def test_policy_dir_is_read_in_order_and_unreadable_files_are_named(tmp_path: Path) -> None:
    (tmp_path / "b.yaml").write_text(DENY.format("two") + "---\n---\n" + DENY.format("three"))
    (tmp_path / "a.yml").write_text(DENY.format("one"))
    (tmp_path / "notes.txt").write_text("not: [policy")
    files = read_policy_dir(str(tmp_path))
    assert [Path(f.source).name for f in files] == ["a.yml", "b.yaml"]
    names = [d["metadata"]["name"] for f in files for d in f.documents if d is not None]
    assert names == ["one", "two", "three"]
    (tmp_path / "c.yaml").write_bytes(b"\xff\xfe")
    with pytest.raises(ConfigError, match=r"c\.yaml"):
        read_policy_dir(str(tmp_path))
    with pytest.raises(ConfigError, match="not a directory"):
        read_policy_dir(str(tmp_path / "missing"))


@pytest.mark.parametrize("mode", ["shared", "dedicated"])
def test_both_modes_reject_an_unreadable_policy_file(tmp_path: Path, mode: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(SMALL)
    pdir = tmp_path / "policies"
    pdir.mkdir()
    (pdir / "bad.yaml").write_bytes(b"\xff\xfe")
    config = Config(
        proxy_mode=ProxyMode(mode),
        proxy_workload_info=WorkloadInfo("mesh", "a", "sa-a"),
        node_name="n1",
        fake_ca=True,
    )
    with pytest.raises(ConfigError, match=r"bad\.yaml"):
        Agent.from_config(
            config, cluster_file=str(path), cluster_prefix="zt000000", policy_dir=str(pdir)
        )


# -- the agent's validation before anything starts -----------------------------------------


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
    (pdir / "bad.yaml").write_text(BAD_POLICY)
    with pytest.raises(ConfigError, match=r"bad\.yaml"):
        attach_cluster_source(_agent(), str(path), "zt000000", str(pdir))


def test_the_redirect_mode_chooses_the_redirector(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(SMALL)
    agent = _agent()
    controller = attach_cluster_source(agent, str(path), "zt000000", None)
    assert isinstance(controller.redirector, ModeSwitch)  # iptables, and cleans eBPF leftovers
    inner = controller.redirector.inner
    assert isinstance(inner, IptablesRedirector) and inner.config.outbound_port == 15001
    # config_dump names the mode (each enrolled pod's entry adds what was installed).
    assert agent.config_dump()["redirection"] == {
        "mode": "iptables",
        "ipv6": False,
        "dnsCapture": False,
    }
    agent = _agent(redirect_mode=RedirectMode.NONE)
    assert isinstance(
        attach_cluster_source(agent, str(path), "zt000000", None).redirector, NoRedirector
    )
    with pytest.raises(ConfigError, match="iptables, ebpf, none"):
        Config.from_sources({"REDIRECT_MODE": "nftables"})


async def test_the_running_agent_serves_the_files_state_and_reports_missing_pods(
    tmp_path: Path,
) -> None:
    path = tmp_path / "demo.yaml"
    path.write_text((Path(__file__).parents[1] / "ztunnel/cluster/demo.yaml").read_text())
    agent = _agent("node1")
    controller = attach_cluster_source(agent, str(path), "zt000000", None)
    assert controller.run in agent.extra_services
    assert agent.pending  # not ready until the controller reconciled once
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(agent.run)
            by_name = {w.name: w for w in agent.store.workloads()}
            assert by_name["client"].protocol is TunnelProtocol.HBONE
            assert by_name["legacy-client"].protocol is TunnelProtocol.TCP
            assert by_name["echo-2"].workload_ips == (IPv4Address("10.244.2.2"),)
            assert by_name["echo-1"].authorization_policies == ("demo/echo-allow-client",)
            assert agent.store.service_by_vip(IPv4Address("10.96.0.10")) is not None
            # No cluster was built under this prefix: node1's ambient pods are not ready.
            assert agent.readiness() == [
                "pod demo/client: netns /var/run/netns/zt000000-pod-demo-client not found",
                "pod demo/echo-1: netns /var/run/netns/zt000000-pod-demo-echo-1 not found",
                "pod demo/web-v1: netns /var/run/netns/zt000000-pod-demo-web-v1 not found",
            ]
            nursery.cancel_scope.cancel()
