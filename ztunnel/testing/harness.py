"""Run one real agent process per node of a simulated cluster (demo, e2e tests, benchmarks).

Each agent is ``python -m ztunnel.cli run --cluster F --cluster-prefix P`` started with
``nsenter --net=<node netns>``, so it sees the node's network like a DaemonSet pod would,
and the host's /sys/fs/bpf like one that mounts it (``ip netns exec`` would remount /sys
and hide it); its JSON log goes to a file. The caller lives in the root netns, so talking to
an agent's localhost ports (readiness, admin) uses a socket created in the node netns.

Certificates: an agent is given either a CA service (``testing/ca_service.py``: the
demo and the e2e tests; the agent holds a token and the root, never a CA key) or, the
standalone way, a CA directory (``CA_DIR``). CA settings of the caller's environment are
never passed on.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from ztunnel.cluster.net import ClusterNet
from ztunnel.redirect.netns import NetNamespace, create_named, delete_named
from ztunnel.sources.clusterfile.layout import GATEWAY, POD_CIDR, NodeNet
from ztunnel.testing import http as testing_http
from ztunnel.testing.process import LoggedProcess, project_pythonpath

READINESS_PORT = 15021
ADMIN_PORT = 15000


@dataclass
class AgentProcess(LoggedProcess):
    node: NodeNet
    proc: subprocess.Popen[bytes]
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)


class CAAccess(Protocol):
    """How an agent reaches a CA that is not its own (``testing.ca_service.CAService``)."""

    def agent_env(self, node: str) -> dict[str, str]: ...


# An agent's certificates: from a CA service (no key on the node: the demo and the e2e
# tests), or, the standalone way, a CA directory it holds (CA_DIR).
AgentCA = CAAccess | str | os.PathLike[str]
_CA_VARIABLES = ("CA_DIR", "FAKE_CA", "CA_ADDRESS", "CA_ROOT_CA", "AUTH_TOKEN")


def agent_env(node: str, ca: AgentCA, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _CA_VARIABLES}
    if isinstance(ca, str | os.PathLike):
        env["CA_DIR"] = os.fspath(ca)
    else:
        env.update(ca.agent_env(node))
    env.update(
        NODE_NAME=node,
        LOG_FORMAT="json",
        PYTHONUNBUFFERED="1",
        PYTHONPATH=project_pythonpath(env),
    )
    env.pop("PROXY_MODE", None)  # shared is the default; a stray dedicated setting would break it
    # Every node's agent of the simulated cluster shares this one machine: one data-plane
    # process each (not the CPU quota each) unless the caller or the user asks for more.
    env.setdefault("ZTUNNEL_WORKER_THREADS", "1")
    env.update(extra or {})
    return env


def start_agent(
    net: ClusterNet,
    node: str,
    cluster_file: str | os.PathLike[str],
    ca: AgentCA,
    *,
    log_path: Path | None = None,
    policy_dir: str | None = None,
    extra_env: Mapping[str, str] | None = None,
) -> AgentProcess:
    nn = net.nodes[node]
    log_path = log_path or net.log_dir / f"agent-{node}.log"
    argv = [
        "nsenter", f"--net={nn.netns_path}", "--",
        sys.executable, "-m", "ztunnel.cli", "run",
        "--cluster", os.fspath(cluster_file), "--cluster-prefix", net.prefix,
    ]  # fmt: skip
    if policy_dir is not None:
        argv += ["--policies", policy_dir]
    pins = {"ZTUNNEL_BPF_PIN_DIR": str(net.bpf_pin_dir(node))}
    env = agent_env(node, ca, {**pins, **(extra_env or {})})
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env
        )
    return AgentProcess(nn, proc, log_path, env)


def http_get(
    node: NodeNet, port: int, path: str, *, timeout: float = 2.0, host: str = "127.0.0.1"
) -> tuple[int, bytes]:
    """A tiny HTTP/1.1 GET to a port inside the node netns: (status, body)."""
    return testing_http.get_in(node.netns, port, path, timeout=timeout, host=host)


def readiness(agent: AgentProcess) -> tuple[int, str]:
    """(status, body) of GET /healthz/ready; (0, error) if nothing answers yet."""
    try:
        status, body = http_get(agent.node, READINESS_PORT, "/healthz/ready")
    except OSError as exc:
        return 0, str(exc)
    return status, body.decode(errors="replace")


def wait_ready(agent: AgentProcess, timeout: float = 20.0) -> None:
    """Block until the agent answers 200 on /healthz/ready; RuntimeError with its log if not."""
    deadline = time.monotonic() + timeout
    last = (0, "")
    while time.monotonic() < deadline:
        if not agent.alive:
            raise RuntimeError(
                f"agent on {agent.node.name} exited ({agent.proc.returncode}):\n{agent.log_tail()}"
            )
        last = readiness(agent)
        if last[0] == 200:
            return
        time.sleep(0.1)
    raise RuntimeError(
        f"agent on {agent.node.name} not ready after {timeout}s ({last[0]} {last[1].strip()}):\n"
        f"{agent.log_tail()}"
    )


def config_dump(agent: AgentProcess) -> dict[str, Any]:
    status, body = http_get(agent.node, ADMIN_PORT, "/config_dump", timeout=5.0)
    if status != 200:
        raise RuntimeError(f"config_dump on {agent.node.name}: HTTP {status}")
    data: dict[str, Any] = json.loads(body)
    return data


def stop_agents(agents: Mapping[str, AgentProcess], timeout: float = 10.0) -> None:
    """Graceful stop of all at once (they drain in parallel), then kill stragglers."""
    for agent in agents.values():
        if agent.alive:
            agent.proc.send_signal(signal.SIGTERM)
    for agent in agents.values():
        agent.stop(timeout)


@contextlib.contextmanager
def running_agents(
    net: ClusterNet,
    cluster_file: str | os.PathLike[str],
    ca: AgentCA,
    *,
    ready_timeout: float = 20.0,
    policy_dir: str | None = None,
) -> Iterator[dict[str, AgentProcess]]:
    """One ready agent per node; always stopped on exit."""
    agents: dict[str, AgentProcess] = {}
    try:
        for node in net.nodes:
            agents[node] = start_agent(net, node, cluster_file, ca, policy_dir=policy_dir)
        for agent in agents.values():
            wait_ready(agent, ready_timeout)
        yield agents
    finally:
        stop_agents(agents)


def recreate_pod_netns(net: ClusterNet, key: str) -> None:
    """Simulate a pod sandbox restart: same netns name, IP and veth name; a new namespace.

    Whoever holds an fd of the old netns (an agent) keeps it alive; the name now points to
    the new one, exactly what an agent sees when kubelet recreates a pod sandbox.
    """
    pod = net.pods[key]
    index = [p.key for p in net.spec.pods].index(key)
    host_if = f"{net.prefix}p{index}"  # cluster.net's veth naming
    with NetNamespace.named(net.podnet) as podnet:
        podnet.run(["ip", "link", "del", host_if])
        delete_named(pod.netns)
        create_named(pod.netns).close()
        podnet.run(
            ["ip", "-batch", "-"],
            input=(
                f"link add {host_if} type veth peer name eth0 netns {pod.netns}\n"
                f"link set {host_if} master br0\n"
                f"link set {host_if} type bridge_slave hairpin on\n"
                f"link set {host_if} up\n"
            ),
        )
    with NetNamespace.named(pod.netns) as ns:
        ns.run(
            ["ip", "-batch", "-"],
            input=(
                f"addr add {pod.ip}/{POD_CIDR.prefixlen} dev eth0\nlink set eth0 up\n"
                f"route add default via {GATEWAY}\n"
            ),
        )
