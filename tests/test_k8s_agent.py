"""``ztunnel run``'s Kubernetes pod source, without root: which source the environment
selects (and what is refused), an unusable kubeconfig as one line and exit 2, and an agent
in this process against the fake API server: not ready while it waits for the API (and
saying so), then serving the workloads and services it derived, in the same config_dump
shape as the local config's."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.test_deploy import env as manifest_env
from ztunnel.agent import Agent, PodSourceKind, pod_source_kind
from ztunnel.config import Config
from ztunnel.errors import ConfigError
from ztunnel.model.pod import REDIRECTION_ANNOTATION
from ztunnel.redirect.iptables import IptablesRedirector
from ztunnel.redirect.modes import ModeSwitch
from ztunnel.sources.dump import service_to_dump, workload_to_dump
from ztunnel.sources.localconfig import load_local_config
from ztunnel.testing.k8s_fake import FakeApiServer, namespace, pod, service

ROOT = Path(__file__).resolve().parent.parent
AMBIENT = {"istio.io/dataplane-mode": "ambient"}
LOCAL = {
    "ZTUNNEL_ADMIN_ADDR": "127.0.0.1:0",
    "ZTUNNEL_STATS_ADDR": "127.0.0.1:0",
    "ZTUNNEL_READINESS_ADDR": "127.0.0.1:0",
    "FAKE_CA": "true",
    "NODE_NAME": "node1",
}


def _config(**env: str) -> Config:
    return Config.from_sources({**LOCAL, **env})


# -- which source ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("settings", "cluster_file", "process_env", "expected"),
    [
        ({}, None, {}, None),
        ({}, None, {"KUBECONFIG": "/k"}, PodSourceKind.KUBERNETES),
        ({}, None, {"KUBERNETES_SERVICE_HOST": "10.96.0.1"}, PodSourceKind.KUBERNETES),
        ({}, "c.yaml", {"KUBECONFIG": "/k"}, PodSourceKind.CLUSTER_FILE),
        ({"INPOD_UDS": "/s"}, None, {"KUBECONFIG": "/k"}, PodSourceKind.ISTIO_CNI),
        # Under istiod every pod has the in-cluster variables: istio-cni stays the source.
        ({"XDS_ADDRESS": "istiod:15012"}, None, {"KUBERNETES_SERVICE_HOST": "10.96.0.1"},
         PodSourceKind.ISTIO_CNI),
    ],
)  # fmt: skip
def test_the_first_configured_pod_source_is_chosen(
    settings: dict[str, str],
    cluster_file: str | None,
    process_env: dict[str, str],
    expected: PodSourceKind | None,
) -> None:
    assert pod_source_kind(_config(**settings), cluster_file, process_env) is expected


def test_the_daemonset_runs_the_kubernetes_source() -> None:
    """deploy/: the manifest's environment plus what the kubelet gives every pod."""
    known = {k: v for k, v in manifest_env().items() if k in Config.env_names().values()}
    config = Config.from_sources({**known, "NODE_NAME": "node1", "POD_NAME": "ztunnel-py-x"})
    in_cluster = {"KUBERNETES_SERVICE_HOST": "10.96.0.1", "KUBERNETES_SERVICE_PORT": "443"}
    assert pod_source_kind(config, None, in_cluster) is PodSourceKind.KUBERNETES
    assert config.host_proc == "/host/proc" and config.cluster_domain == "cluster.local"


def test_kubeconfig_selects_the_source_with_iptables_and_the_annotation(tmp_path: Path) -> None:
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(FakeApiServer().kubeconfig(token="t"))
    agent = Agent.from_config(_config(), env={"KUBECONFIG": str(kubeconfig)})
    assert set(agent.dump_sections) == {"kubernetes"}
    (service_fn,) = agent.extra_services
    source, annotator, controller = service_fn.args
    assert isinstance(controller.redirector, ModeSwitch)  # iptables, cleaning eBPF leftovers
    assert isinstance(controller.redirector.inner, IptablesRedirector)
    assert controller.source is source
    assert controller.on_start == annotator.enrolled and controller.on_leave == annotator.left
    assert source.settings.node_name == "node1" and source.netns_finder.root == "/proc"
    assert agent.readiness() == [
        "proxy: workload proxies not started",
        f"waiting for the Kubernetes API at http://127.0.0.1:0 ({kubeconfig} (context fake)): "
        "listing pods, namespaces, services, endpoint_slices, authorization_policies, "
        "peer_authentications, gateways",
    ]


@pytest.mark.parametrize(
    ("settings", "process_env", "args", "needle"),
    [
        ({}, {"KUBECONFIG": "/nonexistent/kubeconfig"}, {}, "/nonexistent/kubeconfig"),
        ({}, {"KUBERNETES_SERVICE_HOST": "10.96.0.1", "KUBERNETES_SERVICE_PORT": "443"}, {},
         "serviceaccount"),
        ({"LOCAL_XDS": "workloads: []"}, {"KUBECONFIG": "/k"}, {},
         "^LOCAL_XDS: the mesh state comes from the Kubernetes API"),
        ({}, {"KUBECONFIG": "/k"}, {"policy_dir": "/p"},
         "^--policies: /p: policies come from the Kubernetes API"),
        ({}, {}, {}, "needs a pod source: the Kubernetes API"),
    ],
)  # fmt: skip
def test_unusable_kubernetes_settings_are_refused_before_anything_starts(
    settings: dict[str, str], process_env: dict[str, str], args: dict[str, Any], needle: str
) -> None:
    with pytest.raises(ConfigError, match=needle):
        Agent.from_config(_config(**settings), env=process_env, **args)


def test_ztunnel_run_with_an_unusable_kubeconfig_exits_2_with_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "kubeconfig"
    bad.write_text("apiVersion: v1\nkind: Config\nclusters: [}\n")
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), **LOCAL, "KUBECONFIG": str(bad)}
    proc = subprocess.run(
        [sys.executable, "-m", "ztunnel.cli", "run"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2, proc.stderr
    (line,) = proc.stderr.splitlines()
    assert line.startswith("ztunnel: configuration error: ") and str(bad) in line


# -- an agent against the fake API server ----------------------------------------------------


def _cluster(server: FakeApiServer) -> None:
    server.apply(namespace("mesh", AMBIENT))
    server.apply(namespace("plain"))
    enrolled = {REDIRECTION_ANNOTATION: "enabled"}
    server.apply(
        pod("a", "mesh", ip="10.244.1.10", labels={"app": "a"}, service_account="sa-a",
            annotations=enrolled, ports=[("http", 8080)])
    )  # fmt: skip
    server.apply(pod("b", "plain", node="node2", ip="10.244.2.10", labels={"app": "b"}))
    server.apply(service("a", "mesh", selector={"app": "a"}, cluster_ip="10.96.0.10"))


# The same mesh written as ztunnel's local config.
LOCAL_CONFIG = textwrap.dedent(
    """\
    workloads:
    - uid: Kubernetes//Pod/mesh/a
      name: a
      namespace: mesh
      serviceAccount: sa-a
      workloadIps: [10.244.1.10]
      protocol: HBONE
      node: node1
      clusterId: Kubernetes
      canonicalName: a
      canonicalRevision: latest
      workloadName: a
      workloadType: pod
      services:
        mesh/a.mesh.svc.cluster.local: {80: 8080}
    - uid: Kubernetes//Pod/plain/b
      name: b
      namespace: plain
      workloadIps: [10.244.2.10]
      protocol: TCP
      node: node2
      clusterId: Kubernetes
      canonicalName: b
      canonicalRevision: latest
      workloadName: b
      workloadType: pod
    services:
    - name: a
      namespace: mesh
      hostname: a.mesh.svc.cluster.local
      vips: [/10.96.0.10]
      ports: {80: 8080}
      canonical: true
    """
)


async def _until(cond: Any) -> None:
    with trio.fail_after(20):
        while not cond():  # noqa: ASYNC110 - the agent's state has no event to wait on
            await trio.sleep(0.05)


async def test_the_agent_waits_for_the_api_then_serves_what_it_derived(tmp_path: Path) -> None:
    server = FakeApiServer(bookmark_interval=0.2)
    _cluster(server)
    (tmp_path / "proc").mkdir()  # no pod processes here: no netns will be found
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve)
        await server.stop()  # down while the agent starts
        kubeconfig = tmp_path / "kubeconfig"
        kubeconfig.write_text(server.kubeconfig())
        config = _config(HOST_PROC=str(tmp_path / "proc"))
        agent = Agent.from_config(config, env={"KUBECONFIG": str(kubeconfig)})
        await nursery.start(agent.run)  # started at once, the API notwithstanding

        def waiting() -> list[str]:
            return [r for r in agent.readiness() if r.startswith("waiting for the Kubernetes")]

        await _until(lambda: "ConnectError" in "".join(waiting()))
        (reason,) = waiting()
        assert reason.startswith(f"waiting for the Kubernetes API at {server.url} (")
        assert "listing pods, namespaces" in reason and "; last error: " in reason

        await server.start()
        # Ready but for the in-mesh pod whose sandbox cannot be found (no /proc entry).
        await _until(lambda: agent.readiness() == ["pod mesh/a: netns not known yet"])
        dump = agent.config_dump()
        local = load_local_config(LOCAL_CONFIG, "local.yaml")
        assert dump["workloads"] == [workload_to_dump(w) for w in local.workloads]
        assert dump["services"] == [service_to_dump(s) for s in local.services]
        kube = dump["controlPlane"]["kubernetes"]
        assert kube["synced"] is True and kube["notReady"] is None
        assert kube["resources"]["pods"]["objects"] == 2
        assert kube["resources"]["pods"]["errors"] >= 1  # while the server was down
        assert kube["annotations"] == {"pending": {}, "writes": 0, "failures": 0, "lastError": None}
        await agent.shutdown()
        nursery.cancel_scope.cancel()
