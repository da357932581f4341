"""A simulated cluster with one real agent process per node, for the end-to-end tests."""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from ztunnel.cluster import apps
from ztunnel.cluster.net import BPF_ROOT, ClusterNet, running_cluster
from ztunnel.redirect.ebpf import EbpfUnavailable, check_environment
from ztunnel.redirect.ebpf.build import default_source_dir
from ztunnel.sources.clusterfile.spec import loads_spec
from ztunnel.testing.ca_service import CAService, start_ca_service
from ztunnel.testing.harness import AgentProcess, start_agent, stop_agents, wait_ready

APPS = ["python", "-m", "ztunnel.cluster.apps"]


MODES = ("iptables", "ebpf")


def mode_param(mode: str) -> str:
    """A redirect mode as a test parameter: eBPF skips, with the reason, where the machine
    cannot run it (Linux < 6.5, no bcc or headers); scripts/install.sh provides it."""
    if mode == "ebpf":
        try:
            check_environment(BPF_ROOT, default_source_dir())
        except EbpfUnavailable as exc:
            pytest.skip(f"eBPF mode unavailable here: {exc}")
    return mode


@dataclass
class Mesh:
    net: ClusterNet
    path: Path
    ca: CAService  # ztunnel ca serve: no agent holds a CA key
    agents: dict[str, AgentProcess]
    mode: str = "iptables"
    agent_env: dict[str, str] | None = None

    @property
    def env(self) -> dict[str, str]:
        return {**(self.agent_env or {}), "REDIRECT_MODE": self.mode}

    def ip(self, pod: str) -> str:
        return str(self.net.pod(pod).ip)

    def records(self, node: str | None = None) -> list[dict[str, object]]:
        nodes = [node] if node else list(self.agents)
        return [
            r
            for n in nodes
            for r in self.agents[n].log_lines()
            if r.get("message") == "connection complete"
        ]

    def restart(self, node: str) -> None:
        self.agents[node].stop()
        self.agents[node] = start_agent(self.net, node, self.path, self.ca, extra_env=self.env)
        wait_ready(self.agents[node], 30)


@contextmanager
def cluster_mesh(
    text: str,
    listening: dict[str, int],
    mode: str = "iptables",
    agent_env: dict[str, str] | None = None,
) -> Iterator[Mesh]:
    """Build the cluster from ``text``, run an agent per node (redirecting with ``mode``,
    ``agent_env`` added to its environment), wait for the pods' servers."""
    with tempfile.TemporaryDirectory() as tmp, running_cluster(loads_spec(text)) as net:
        path = Path(tmp) / "cluster.yaml"
        path.write_text(text)
        ca = start_ca_service(net, Path(tmp) / "ca-service")
        programs = apps.start_pod_programs(net)
        agents: dict[str, AgentProcess] = {}
        try:
            env = {**(agent_env or {}), "REDIRECT_MODE": mode}
            for node in net.nodes:
                agents[node] = start_agent(net, node, path, ca, extra_env=env)
            for agent in agents.values():
                wait_ready(agent, 30)
            for pod, port in listening.items():
                apps.wait_listening(net, pod, port, timeout=10)
            yield Mesh(net, path, ca, agents, mode, agent_env)
        finally:
            stop_agents(agents)
            ca.stop()
            apps.stop_programs(programs)


def send(
    mesh: Mesh, pod: str, to: str, nbytes: int = 100_000, timeout: float = 8
) -> dict[str, object]:
    argv = [*APPS, "send", "--to", to, "--bytes", str(nbytes), "--timeout", str(timeout)]
    proc = apps.run_in_pod(mesh.net, pod, argv, timeout=20)
    result: dict[str, object] = json.loads(proc.stdout)
    return result


def until(cond: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.1)
