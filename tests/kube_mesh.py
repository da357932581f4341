"""A simulated cluster run the Kubernetes way, for the end-to-end tests: pods in
kubelet-style cgroups, the fake API server on the pod network holding the cluster's
objects, and one ``ztunnel run`` per node with only a KUBECONFIG (no cluster file)."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cluster_mesh import APPS
from cluster_mesh import until as _until
from pod_capture import is_captured, is_untouched

from ztunnel.cluster import apps, cgroups
from ztunnel.cluster.kubelet import Kubelet, running_pods
from ztunnel.cluster.net import ClusterNet, running_cluster
from ztunnel.model.pod import REDIRECTION_ANNOTATION
from ztunnel.sources.clusterfile.spec import loads_spec
from ztunnel.sources.kubernetes.protocol import PODS
from ztunnel.testing.ca_service import CAService, start_ca_service
from ztunnel.testing.harness import AgentProcess, config_dump, readiness, stop_agents, wait_ready
from ztunnel.testing.k8s_cluster import (
    KubeApi,
    cluster_objects,
    running_api_server,
    start_kube_agent,
)
from ztunnel.testing.k8s_fake import namespace

AMBIENT = {"istio.io/dataplane-mode": "ambient"}
WAIT = 30.0  # the agents act within a second or two; the machine may be busy


def until(cond: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
    _until(cond, what, timeout)


@dataclass
class KubeMesh:
    net: ClusterNet
    kubelet: Kubelet
    api: KubeApi
    ca: CAService
    agents: dict[str, AgentProcess]
    mode: str = "iptables"  # the agents' REDIRECT_MODE

    def ip(self, pod: str) -> str:
        return str(self.net.pod(pod).ip)

    def label(self, ns: str, labels: dict[str, str]) -> None:
        """Replace the namespace's labels (kubectl label)."""
        self.api.apply(namespace(ns, labels))

    def annotation(self, key: str) -> str | None:
        ns, name = key.split("/")
        pod = self.api.get(PODS, ns, name)
        assert pod is not None, f"{key} is not in the API"
        value = (pod["metadata"].get("annotations") or {}).get(REDIRECTION_ANNOTATION)
        return None if value is None else str(value)

    def annotated(self, key: str) -> bool:
        return self.annotation(key) == "enabled"

    def unannotated(self, key: str) -> bool:
        return self.annotation(key) is None

    def iptables_save(self, key: str) -> str:
        with self.net.open_netns(self.net.pod(key)) as ns:
            return ns.run(["iptables-save"]).stdout

    def listening(self, key: str, port: int) -> bool:
        with self.net.open_netns(self.net.pod(key)) as ns, ns.socket() as sock:
            sock.settimeout(1)
            return sock.connect_ex(("127.0.0.1", port)) == 0

    def enrolled(self, key: str) -> bool:
        return is_captured(self, key) and self.listening(key, 15008)

    def unenrolled(self, key: str) -> bool:
        return is_untouched(self, key) and not self.listening(key, 15008)

    def send(self, pod: str, to: str, nbytes: int = 50_000) -> dict[str, Any]:
        argv = [*APPS, "send", "--to", to, "--bytes", str(nbytes), "--timeout", "8"]
        proc = apps.run_in_pod(self.net, pod, argv, timeout=20)
        result: dict[str, Any] = json.loads(proc.stdout)
        return result

    def records(self, node: str) -> list[dict[str, Any]]:
        return [
            r for r in self.agents[node].log_lines() if r.get("message") == "connection complete"
        ]

    def logged(self, node: str, message: str) -> list[dict[str, Any]]:
        return [r for r in self.agents[node].log_lines() if r.get("message") == message]

    def dump(self, node: str) -> dict[str, Any]:
        return config_dump(self.agents[node])

    def readiness(self, node: str) -> tuple[int, str]:
        return readiness(self.agents[node])

    def wait_all_ready(self, timeout: float = 30.0) -> None:
        for agent in self.agents.values():
            wait_ready(agent, timeout)


def require_cgroup_v2() -> None:
    """Skip unless pods can be given kubelet-style cgroups here."""
    mount = cgroups.cgroup2_mount()
    if mount is None or not os.access(mount, os.W_OK):
        pytest.skip("no writable cgroup v2 hierarchy (pods need kubelet-style cgroups)")


@contextmanager
def kube_mesh(
    text: str, listening: dict[str, int], *, api_up: bool = True, mode: str = "iptables"
) -> Iterator[KubeMesh]:
    """Build the cluster, its pods (kubelet-style), the CA service and the API server, and
    start an agent per node redirecting with ``mode`` (ready, unless ``api_up`` is False:
    then the API server is down while they start). Everything is torn down on exit."""
    require_cgroup_v2()
    with (
        tempfile.TemporaryDirectory() as tmp,
        running_cluster(loads_spec(text)) as net,
        running_pods(net) as kubelet,
    ):
        ca = start_ca_service(net, Path(tmp) / "ca-service")
        agents: dict[str, AgentProcess] = {}
        try:
            for pod, port in listening.items():
                apps.wait_listening(net, pod, port, timeout=10)
            objects = cluster_objects(net, kubelet.uids)
            with running_api_server(net, Path(tmp) / "api", objects) as api:
                if not api_up:
                    api.thread.run(api.server.stop)
                for node in net.nodes:
                    env = {"REDIRECT_MODE": mode}
                    agents[node] = start_kube_agent(net, node, api.kubeconfig, ca, extra_env=env)
                mesh = KubeMesh(net, kubelet, api, ca, agents, mode)
                if api_up:
                    mesh.wait_all_ready()
                try:
                    yield mesh
                finally:
                    stop_agents(agents)
        finally:
            stop_agents(agents)
            ca.stop()


__all__ = ["AMBIENT", "KubeMesh", "kube_mesh", "require_cgroup_v2", "until"]
