"""kill -9 of a node's agent under traffic: fail closed, then recover (needs root).

In a two-node simulated cluster (``ztunnel/cluster``, one agent process per node, ``ztunnel
ca serve`` as the CA), pod ``a`` (mesh, node n1) connects to pod ``b`` (mesh, node n2, an
echo app) continuously, each connection carrying a marker payload. tcpdump captures the pod
network's bridge throughout. Then:

1. ``kill -9`` of n1's agent (the client side), restart after ``--down`` seconds;
2. the same for n2's agent (the server side).

While an agent is down the pod's redirection rules stay in place and nothing listens on
15001/15006/15008, so the pod's connections fail (fail closed): the capture must hold no
byte of the marker and no packet to the app port, only TLS to 15008. After each restart
the figures are: time until readiness answers 200 (every pod of the node reconciled and
its certificate issued), time until the first connection succeeds again, and how many
connections failed while the agent was down.

    sudo .venv/bin/python bench/crash.py [--down 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

from ztunnel.cluster import apps
from ztunnel.cluster.net import ClusterNet, running_cluster
from ztunnel.sources.clusterfile.spec import loads_spec
from ztunnel.testing.ca_service import start_ca_service
from ztunnel.testing.harness import (
    AgentProcess,
    config_dump,
    readiness,
    start_agent,
    stop_agents,
    wait_ready,
)

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
    """
)
MARKER = b"ZT-CRASH-PLAINTEXT-MARKER"
APP_PORT = 8080

# Runs in pod a until stopped: one connection after the other to b:8080, each carrying
# the marker; one JSON line [wall time, ok, error] per attempt.
GENERATOR = textwrap.dedent(
    """\
    import json, socket, sys, time
    host, marker = sys.argv[1], sys.argv[2].encode()
    payload = marker * 40
    while True:
        t = time.time()
        try:
            with socket.create_connection((host, 8080), timeout=1.0) as s:
                s.settimeout(1.0)
                s.sendall(payload); s.shutdown(socket.SHUT_WR)
                got = b""
                while chunk := s.recv(65536):
                    got += chunk
            result = [t, got == payload, "" if got == payload else f"echo {len(got)} B"]
        except OSError as exc:
            result = [t, False, type(exc).__name__]
        print(json.dumps(result), flush=True)
        time.sleep(0.02)
    """
)


class Capture:
    """tcpdump on the pod network's bridge, to a pcap file."""

    def __init__(self, net: ClusterNet, pcap: Path) -> None:
        self.pcap = pcap
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", net.podnet, "tcpdump", "-i", "br0", "-U", "-n",
             "-s", "0", "-w", str(pcap)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert self.proc.stderr is not None
        line = self.proc.stderr.readline()  # "listening on br0 ..." once capturing
        if "listening" not in line:
            raise RuntimeError(f"tcpdump did not start: {line}")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGINT)
        self.proc.communicate(timeout=10)

    def count(self, bpf: str) -> int:
        out = subprocess.run(
            ["tcpdump", "-r", str(self.pcap), "-n", bpf],
            capture_output=True, text=True, timeout=30, check=True,
        )  # fmt: skip
        return len(out.stdout.splitlines())


def crash_and_restart(
    net: ClusterNet, agents: dict[str, AgentProcess], node: str, path: Path, ca: Any, down: float
) -> dict[str, float]:
    """kill -9 the node's agent, wait ``down`` s, restart it; wall-clock times of each step."""
    victim = agents[node]
    killed = time.time()
    victim.proc.send_signal(signal.SIGKILL)
    victim.proc.wait(10)
    time.sleep(down)
    restarted = time.time()
    agents[node] = start_agent(net, node, path, ca, log_path=net.log_dir / f"agent-{node}-2.log")
    wait_ready(agents[node], 60)
    ready = time.time()
    return {"killed": killed, "restarted": restarted, "ready": ready}


def _nearest(t: float, *crashes: dict[str, float]) -> float:
    events = [c[k] for c in crashes for k in ("killed", "ready")]
    return min(events, key=lambda e: abs(t - e))


def summarise(samples: list[list[Any]], times: dict[str, float]) -> dict[str, Any]:
    down = [s for s in samples if times["killed"] <= s[0] < times["restarted"]]
    after = [s for s in samples if s[0] >= times["restarted"]]
    first_ok = next((s[0] for s in after if s[1]), None)
    return {
        "connections_while_down": len(down),
        "succeeded_while_down": sum(1 for s in down if s[1]),
        "ready_after_restart_s": round(times["ready"] - times["restarted"], 2),
        "traffic_back_after_restart_s": (
            round(first_ok - times["restarted"], 2) if first_ok is not None else None
        ),
        "traffic_back_after_ready_s": (
            round(first_ok - times["ready"], 2) if first_ok is not None else None
        ),
        "errors_while_down": sorted({str(s[2]) for s in down if not s[1]}),
    }


def measure(workdir: Path, down: float = 2.0, settle: float = 2.0) -> dict[str, Any]:
    path = workdir / "cluster.yaml"
    path.write_text(CLUSTER)
    with running_cluster(loads_spec(CLUSTER)) as net:
        ca = start_ca_service(net, workdir / "ca-service")
        programs = apps.start_pod_programs(net)
        agents: dict[str, AgentProcess] = {}
        capture: Capture | None = None
        try:
            for node in net.nodes:
                agents[node] = start_agent(net, node, path, ca)
            for agent in agents.values():
                wait_ready(agent, 30)
            apps.wait_listening(net, "b", APP_PORT, timeout=10)
            capture = Capture(net, workdir / "bridge.pcap")
            generator = subprocess.Popen(
                apps.pod_command(
                    net, "a",
                    [sys.executable, "-c", GENERATOR, str(net.pod("b").ip), MARKER.decode()],
                ),
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
            )  # fmt: skip
            time.sleep(settle)
            client = crash_and_restart(net, agents, "n1", path, ca, down)
            time.sleep(settle)
            server = crash_and_restart(net, agents, "n2", path, ca, down)
            time.sleep(settle)
            generator.terminate()
            out, _ = generator.communicate(timeout=10)
            samples = [json.loads(line) for line in out.splitlines() if line.startswith("[")]
            reconciled = {
                node: sorted(
                    v["info"]["name"] for v in config_dump(agent)["workloadState"].values()
                )
                for node, agent in agents.items()
            }
            ready_now = {node: readiness(agent)[0] for node, agent in agents.items()}
        finally:
            if capture is not None:
                capture.stop()
            stop_agents(agents)
            ca.stop()
            apps.stop_programs(programs)
        # Marker bytes anywhere in the capture (headers included: a plaintext leak shows).
        raw = (workdir / "bridge.pcap").read_bytes()
        return {
            "markers_on_wire": raw.count(MARKER),
            "packets_to_app_port_on_wire": capture.count(f"tcp port {APP_PORT}"),
            "packets_to_15008_on_wire": capture.count("tcp port 15008"),
            "connections": len(samples),
            # (seconds after the nearest kill or ready, what failed) outside the crashes
            "failed_with_both_agents_up": [
                [round(t - _nearest(t, client, server), 2), error]
                for t, ok, error in samples
                if not ok and not any(c["killed"] <= t < c["ready"] for c in (client, server))
            ],
            "client_side_agent_kill_9": summarise(samples, client),
            "server_side_agent_kill_9": summarise(samples, server),
            "reconciled": reconciled,
            "readiness_after": ready_now,
            "down_s": down,
        }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--down", type=float, default=2.0, help="seconds an agent stays dead")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("needs root (network namespaces, tcpdump)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        result = measure(Path(tmp), args.down)
    print(json.dumps(result, indent=2))
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
