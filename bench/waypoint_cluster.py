"""Simulated-cluster benchmark: HTTP requests/s and latency through the waypoint vs L4 only
vs direct, with wrk (HTTP/1.1) and h2load (HTTP/2 with prior knowledge), in one run.

Run (root): ``.venv/bin/python bench/waypoint_cluster.py`` (about 60 s) or ``--quick``.

The cluster has two nodes and two namespaces. ``plain`` (not in the mesh) has a client pod
on node1 and a server pod on node2: the **direct** baseline. ``mesh`` (ambient) has the
same, plus a waypoint pod (``ztunnel waypoint``) on node2; its server is behind two
Services that select the same pod: ``web-l4`` (no waypoint: **L4 only**, client agent ->
HBONE -> server agent) and ``web-wp`` (``istio.io/use-waypoint``: **waypoint**, client agent
-> HBONE -> waypoint -> HBONE -> server agent). Every server pod runs nginx (Debian's
nginx-light: HTTP/1.1 on 8080, h2c on 8081, a 64-byte answer), so the app costs next to
nothing and the same app serves all three paths.

For each path: ``wrk -t1 -cC -dS --latency`` (HTTP/1.1 keep-alive) and ``h2load -cC -m1
-DS`` (HTTP/2; per-request latencies from its ``--log-file``); requests/s, p50 and p99; the
CPU of the agents and the waypoint during the run. Everything is torn down at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(BENCH.parent))

from common import cpu_seconds, percentile, run_interruptible  # noqa: E402

from ztunnel.cluster import apps  # noqa: E402
from ztunnel.cluster.net import ClusterNet, cleanup_stale, running_cluster  # noqa: E402
from ztunnel.identity.ca import init_ca_dir  # noqa: E402
from ztunnel.sources.clusterfile.spec import loads_spec  # noqa: E402
from ztunnel.testing.harness import AgentProcess, start_agent, stop_agents, wait_ready  # noqa: E402
from ztunnel.testing.waypoint import (  # noqa: E402
    WaypointProcess,
    start_waypoints,
    stop_waypoints,
    wait_waypoint_ready,
)

QUIET_LOG = "warn"  # no per-connection / per-request access logs in the figures
BODY = "x" * 63 + "\n"
CLUSTER = textwrap.dedent(
    """\
    # Written by bench/waypoint_cluster.py.
    namespaces:
      mesh: {labels: {istio.io/dataplane-mode: ambient}}
      plain: {labels: {}}
    nodes: [node1, node2]
    pods:
      - {name: client, namespace: mesh, node: node1, serviceAccount: client}
      - {name: server, namespace: mesh, node: node2, serviceAccount: server, labels: {app: web}}
      - name: waypoint
        namespace: mesh
        node: node2
        serviceAccount: waypoint
        labels: {gateway.networking.k8s.io/gateway-name: waypoint,
                 istio.io/dataplane-mode: none, networking.istio.io/tunnel: http}
      - {name: client, namespace: plain, node: node1, serviceAccount: client}
      - {name: server, namespace: plain, node: node2, serviceAccount: server, labels: {app: web}}
    services:
      - {name: waypoint, namespace: mesh, vip: 10.96.0.2, ports: {15008: 15008},
         selector: {gateway.networking.k8s.io/gateway-name: waypoint}}
      - name: web-l4
        namespace: mesh
        vip: 10.96.0.10
        selector: {app: web}
        ports: [{port: 80, targetPort: 8080, name: http}, {port: 81, targetPort: 8081, name: http2}]
      - name: web-wp
        namespace: mesh
        vip: 10.96.0.11
        labels: {istio.io/use-waypoint: waypoint}
        selector: {app: web}
        ports: [{port: 80, targetPort: 8080, name: http}, {port: 81, targetPort: 8081, name: http2}]
    policies:
      - apiVersion: gateway.networking.k8s.io/v1
        kind: Gateway
        metadata: {name: waypoint, namespace: mesh}
        spec:
          gatewayClassName: istio-waypoint
          listeners: [{name: mesh, port: 15008, protocol: HBONE}]
    """
)
# path -> (client pod, HTTP/1.1 target, HTTP/2 target); plain's server IP is filled in.
PATHS = ("direct", "L4 only", "waypoint")


def _nginx_conf(tmp: Path, name: str) -> Path:
    base = tmp / f"nginx-{name}"
    base.mkdir()
    conf = base / "nginx.conf"
    conf.write_text(
        textwrap.dedent(
            f"""\
            daemon off;
            worker_processes 1;
            pid {base}/nginx.pid;
            error_log stderr error;
            events {{ worker_connections 4096; }}
            http {{
              access_log off;
              keepalive_requests 1000000;
              client_body_temp_path {base}/body;
              proxy_temp_path {base}/proxy;
              fastcgi_temp_path {base}/fastcgi;
              uwsgi_temp_path {base}/uwsgi;
              scgi_temp_path {base}/scgi;
              server {{ listen 8080; location / {{ return 200 "{BODY.strip()}\\n"; }} }}
              server {{ listen 8081 http2; location / {{ return 200 "{BODY.strip()}\\n"; }} }}
            }}
            """
        )
    )
    return conf


class BenchError(RuntimeError):
    pass


@dataclass
class Figure:
    rps: float
    p50_ms: float
    p99_ms: float
    requests: int
    errors: int
    cpu: dict[str, float] = field(default_factory=dict)  # process -> vCPU


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s)", text)
    if not m:
        raise BenchError(f"cannot read latency {text!r}")
    return float(m.group(1)) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[m.group(2)]


def run_wrk(net: ClusterNet, client: str, url: str, conns: int, seconds: float) -> Figure:
    duration = max(1, round(seconds))  # wrk takes whole seconds
    argv = ["wrk", "-t1", f"-c{conns}", f"-d{duration}s", "--latency", url]
    out = apps.run_in_pod(net, client, argv, timeout=seconds + 30).stdout
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    p50 = re.search(r"^\s+50%\s+(\S+)", out, re.M)
    p99 = re.search(r"^\s+99%\s+(\S+)", out, re.M)
    total = re.search(r"(\d+) requests in", out)
    if not (rps and p50 and p99 and total):
        raise BenchError(f"wrk output unreadable:\n{out[-500:]}")
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    socket_errors = re.search(r"Socket errors: (.*)", out)
    bad = int(errors.group(1)) if errors else 0
    if socket_errors:
        bad += sum(int(n) for n in re.findall(r"\d+", socket_errors.group(1)))
    return Figure(
        float(rps.group(1)), _ms(p50.group(1)), _ms(p99.group(1)), int(total.group(1)), bad
    )


def run_h2load(
    net: ClusterNet, client: str, url: str, conns: int, seconds: float, tmp: Path
) -> Figure:
    log = tmp / f"h2load-{time.monotonic_ns()}.log"
    argv = ["h2load", f"-c{conns}", "-m1", f"-D{seconds:g}", f"--log-file={log}", url]
    out = apps.run_in_pod(net, client, argv, timeout=seconds + 30).stdout
    m = re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", out)
    done = re.search(r"requests: \d+ total, \d+ started, (\d+) done, (\d+) succeeded", out)
    if not (m and done):
        raise BenchError(f"h2load output unreadable:\n{out[-500:]}")
    latencies = []
    for line in log.read_text().splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[1] == "200":
            latencies.append(int(parts[2]) / 1000)  # µs -> ms
    latencies.sort()
    if not latencies:
        raise BenchError("h2load logged no successful request")
    errors = int(done.group(1)) - int(done.group(2))
    return Figure(
        float(m.group(1)),
        percentile(latencies, 50),
        percentile(latencies, 99),
        int(done.group(1)),
        errors,
    )


@contextlib.contextmanager
def cpu_of(procs: dict[str, int], seconds: float) -> Iterator[dict[str, float]]:
    out: dict[str, float] = {}
    before = {name: cpu_seconds(pid) for name, pid in procs.items()}
    yield out
    for name, pid in procs.items():
        out[name] = (cpu_seconds(pid) - before[name]) / seconds


@dataclass
class Run:
    net: ClusterNet
    agents: dict[str, AgentProcess]
    waypoint: WaypointProcess
    tmp: Path
    args: Any
    results: dict[tuple[str, str], Figure] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)

    def targets(self) -> dict[str, tuple[str, str, str]]:
        plain = self.net.pod("plain/server").ip
        return {
            "direct": ("plain/client", f"http://{plain}:8080/", f"http://{plain}:8081/"),
            "L4 only": ("mesh/client", "http://10.96.0.10/", "http://10.96.0.10:81/"),
            "waypoint": ("mesh/client", "http://10.96.0.11/", "http://10.96.0.11:81/"),
        }

    def pids(self) -> dict[str, int]:
        out = {f"agent@{n}": a.proc.pid for n, a in self.agents.items()}
        out["waypoint"] = self.waypoint.proc.pid
        return out

    def measure(self) -> None:
        a = self.args
        for path, (client, h1, h2) in self.targets().items():
            for tool in ("wrk", "h2load"):
                try:
                    # warm-up: certificates, pooled HBONE connections, nginx workers
                    run_wrk(self.net, client, h1, 1, 0.5) if tool == "wrk" else None
                    with cpu_of(self.pids(), a.seconds) as cpu:
                        if tool == "wrk":
                            fig = run_wrk(self.net, client, h1, a.connections, a.seconds)
                        else:
                            fig = run_h2load(
                                self.net, client, h2, a.connections, a.seconds, self.tmp
                            )
                    fig.cpu = cpu
                    self.results[(path, tool)] = fig
                    print(
                        f"  {tool:6} {path:9}: {fig.rps:8.0f} req/s  p50 {fig.p50_ms:6.2f} ms  "
                        f"p99 {fig.p99_ms:6.2f} ms  errors {fig.errors}",
                        flush=True,
                    )
                except (BenchError, OSError, subprocess.TimeoutExpired) as exc:
                    self.failures.append(f"{tool} {path}: {exc}")
                    print(f"  FAILED {tool} {path}: {exc}", flush=True)

    def report(self) -> None:
        a = self.args
        print()
        print(
            f"HTTP through the mesh: {a.connections} connections, {a.seconds:g} s per run, "
            f"64-byte answers from nginx (client pod on node1, server and waypoint on node2)"
        )
        header = f"{'tool':7} {'path':9} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'vs direct':>10}"
        print(header + "   vCPU: agent@node1 agent@node2 waypoint")
        # Other work on the machine skews everything here (2 vCPUs shared): say how much.
        for tool in ("wrk", "h2load"):
            direct = self.results.get(("direct", tool))
            for path in PATHS:
                fig = self.results.get((path, tool))
                if fig is None:
                    print(f"{tool:7} {path:9} {'-':>8}")
                    continue
                ratio = f"{fig.rps / direct.rps:9.2f}x" if direct else "-"
                cpu = "  ".join(
                    f"{fig.cpu.get(k, 0):10.2f}" for k in ("agent@node1", "agent@node2", "waypoint")
                )
                print(
                    f"{tool:7} {path:9} {fig.rps:8.0f} {fig.p50_ms:8.2f} {fig.p99_ms:8.2f} "
                    f"{ratio:>10}   {cpu}"
                )
        load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
        print(f"machine load average (1/5/15 min) at the end: {load}")
        if self.failures:
            print("\nFAILED measurements:")
            for f in self.failures:
                print(f"  {f}")


def run(args: Any) -> int:
    for tool in ("wrk", "h2load", "nginx"):
        if shutil.which(tool) is None:
            print(f"{tool} not found: scripts/install.sh installs it", file=sys.stderr)
            return 2
    spec = loads_spec(CLUSTER, "bench/waypoint_cluster.py")
    cleanup_stale()
    started = time.monotonic()
    failures: list[str] = []
    with tempfile.TemporaryDirectory(prefix="zt-bench-waypoint-") as tmp_name:
        tmp = Path(tmp_name)
        path, ca_dir = tmp / "cluster.yaml", tmp / "ca"
        path.write_text(CLUSTER)
        ca_dir.mkdir()
        init_ca_dir(ca_dir)
        with running_cluster(spec) as net:
            agents: dict[str, AgentProcess] = {}
            waypoints: dict[str, WaypointProcess] = {}
            programs: dict[str, Any] = {}
            try:
                env = {"RUST_LOG": args.log_level}
                for node in net.nodes:
                    agents[node] = start_agent(net, node, path, ca_dir, extra_env=env)
                waypoints = start_waypoints(net, path, ca_dir, extra_env=env)
                for key in ("mesh/server", "plain/server"):
                    conf = _nginx_conf(tmp, key.replace("/", "-"))
                    programs[key] = apps.start_program(
                        net, key, ["nginx", "-c", str(conf), "-e", "stderr"]
                    )
                for agent in agents.values():
                    wait_ready(agent, 30)
                for wp in waypoints.values():
                    wait_waypoint_ready(wp, 30)
                for key in programs:
                    for port in (8080, 8081):
                        apps.wait_listening(net, key, port, timeout=10)
                print(
                    f"cluster {net.prefix}: ready in {time.monotonic() - started:.1f} s",
                    flush=True,
                )
                bench = Run(net, agents, waypoints["mesh/waypoint"], tmp, args)
                bench.measure()
                for name, proc in {**agents, **waypoints}.items():
                    if not proc.alive:
                        bench.failures.append(f"{name} died:\n{proc.log_tail(20)}")
                bench.report()
                failures = bench.failures
            finally:
                with contextlib.suppress(Exception):
                    stop_waypoints(waypoints)
                with contextlib.suppress(Exception):
                    stop_agents(agents)
                with contextlib.suppress(Exception):
                    apps.stop_programs(programs)
    print(f"\n(ran in {time.monotonic() - started:.1f} s; cluster torn down)", flush=True)
    return 1 if failures else 0


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bench/waypoint_cluster.py", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--quick", action="store_true", help="2 s runs")
    parser.add_argument("--seconds", type=float, help="per run (default 5, quick 2)")
    parser.add_argument("--connections", type=int, default=4, help="client connections (4)")
    parser.add_argument("--log-level", default=QUIET_LOG, help=f"RUST_LOG ({QUIET_LOG!r})")
    args = parser.parse_args(argv)
    args.seconds = args.seconds or (2.0 if args.quick else 5.0)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("bench/waypoint_cluster.py needs root (network namespaces)", file=sys.stderr)
        return 2
    return run_interruptible(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
