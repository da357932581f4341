"""Simulated-cluster benchmark: pod to pod direct vs through the mesh, same node and cross node.

Run (root): ``.venv/bin/python bench/cluster.py`` (about 45 s) or ``--quick`` (about 20 s).

It builds a 2-node cluster in network namespaces (``ztunnel.cluster``) with two namespaces
that are mirror images of each other: ``mesh`` (labelled ambient) and ``plain`` (not). Each
has a client pod and a server pod on node1 and a server pod on node2. One real agent runs
per node (``ztunnel.testing.harness``); it captures only the ``mesh`` pods, so ``plain`` is
the direct baseline over the very same bridge and veths.

* Throughput: ``iperf3 -s`` in every server pod, ``iperf3 -c <ip> -t T -J`` (one stream)
  from the client pod, receiver-side Gbit/s; the agents' CPU (``/proc/<pid>/stat``) is
  sampled around every mesh run.
* Latency: 1 KiB request/response, paced open loop on one keep-alive connection
  (``bench/cluster_common.py``: echo server + paced client, run inside the pods),
  p50/p90/p99 from the scheduled send time; added latency (mesh - direct) and ratio.

Everything (agents, pod programs, namespaces) is torn down at the end, also on Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import os
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(BENCH.parent))

from common import cpu_seconds, run_interruptible  # noqa: E402

from ztunnel.cluster import apps  # noqa: E402
from ztunnel.cluster.net import ClusterNet, cleanup_stale, running_cluster  # noqa: E402
from ztunnel.identity.ca import init_ca_dir  # noqa: E402
from ztunnel.sources.clusterfile.spec import loads_spec  # noqa: E402
from ztunnel.testing.harness import (  # noqa: E402
    AgentProcess,
    start_agent,
    stop_agents,
    wait_ready,
)

IPERF_PORT = 5201
ECHO_PORT = 8080
RR_PROGRAM = ("python", str(BENCH / "cluster_common.py"))
MODES = ("plain", "mesh")  # plain = direct baseline, mesh = through both agents
PATHS = (("same node", "server-1"), ("cross node", "server-2"))
QUIET_LOG = "ztunnel.agent=info,warn"  # ready line kept, per-connection access logs dropped

CLUSTER = textwrap.dedent(
    """\
    # Written by bench/cluster.py: mesh/* and plain/* are mirror images; only mesh is ambient.
    namespaces:
      mesh: {labels: {istio.io/dataplane-mode: ambient}}
      plain: {labels: {}}
    nodes: [node1, node2]
    pods:
      - {name: client, namespace: mesh, node: node1, serviceAccount: client}
      - {name: server-1, namespace: mesh, node: node1, serviceAccount: server}
      - {name: server-2, namespace: mesh, node: node2, serviceAccount: server}
      - {name: client, namespace: plain, node: node1, serviceAccount: client}
      - {name: server-1, namespace: plain, node: node1, serviceAccount: server}
      - {name: server-2, namespace: plain, node: node2, serviceAccount: server}
    """
)


class BenchError(RuntimeError):
    """A measurement could not be taken (its output explains why)."""


# -- measurements ----------------------------------------------------------------------


@dataclass
class AgentCpu:
    """CPU the agents used during one run, in vCPU.

    Divided by the run's own length, not the wall time around it: the client's start-up
    (nsenter, interpreter) costs the agents nothing and would only dilute the figure.
    """

    seconds: float
    per_node: dict[str, float] = field(default_factory=dict)

    def text(self) -> str:
        return ", ".join(f"{n} {v:.2f}" for n, v in self.per_node.items())


@contextlib.contextmanager
def agent_cpu(agents: dict[str, AgentProcess], seconds: float) -> Iterator[AgentCpu]:
    out = AgentCpu(seconds)
    before = {n: cpu_seconds(a.proc.pid) for n, a in agents.items()}
    yield out
    for n, a in agents.items():
        out.per_node[n] = (cpu_seconds(a.proc.pid) - before[n]) / seconds


def _last_json(stdout: str) -> dict[str, Any]:
    lines = stdout.strip().splitlines()
    if not lines:
        raise ValueError("no output")
    data: dict[str, Any] = json.loads(lines[-1])
    return data


def iperf(net: ClusterNet, client: str, server_ip: str, seconds: float) -> float:
    """Receiver-side Gbit/s of one iperf3 TCP stream client -> server."""
    argv = ["iperf3", "-c", server_ip, "-p", str(IPERF_PORT), "-t", f"{seconds:g}", "-J"]
    proc = apps.run_in_pod(net, client, argv, timeout=seconds + 30)
    try:
        report: dict[str, Any] = json.loads(proc.stdout)
    except ValueError as exc:
        raise BenchError(
            f"iperf3 output unreadable: {(proc.stderr or proc.stdout)[-300:]}"
        ) from exc
    if report.get("error"):
        raise BenchError(f"iperf3: {report['error']}")
    bps = float(report["end"]["sum_received"]["bits_per_second"])
    return bps / 1e9


@dataclass(frozen=True)
class Latency:
    p50: float  # all in µs
    p90: float
    p99: float
    achieved: float  # responses/s
    lost: int

    def q(self, name: str) -> float:
        value: float = getattr(self, name)
        return value


def request_response(
    net: ClusterNet, client: str, server_ip: str, rate: float, seconds: float
) -> Latency:
    argv = [
        *RR_PROGRAM, "client", "--to", f"{server_ip}:{ECHO_PORT}",
        "--rate", f"{rate:g}", "--seconds", f"{seconds:g}",
    ]  # fmt: skip
    proc = apps.run_in_pod(net, client, argv, timeout=seconds + 30)
    try:
        r = _last_json(proc.stdout)
    except ValueError as exc:
        raise BenchError(f"paced client: {(proc.stderr or proc.stdout)[-300:]}") from exc
    if not r["ok"]:
        raise BenchError(f"paced client: {r['error']}")
    return Latency(r["p50_us"], r["p90_us"], r["p99_us"], r["achieved_per_s"], r["lost"])


def warm_up(net: ClusterNet, client: str, server_ip: str) -> None:
    """A few echoes first, so certificates and the HBONE connection are not in the figures."""
    request_response(net, client, server_ip, rate=100, seconds=0.05)


# -- the run ---------------------------------------------------------------------------


@dataclass
class Results:
    gbps: dict[tuple[str, str], float] = field(default_factory=dict)  # (path, mode)
    tput_cpu: dict[str, AgentCpu] = field(default_factory=dict)  # path -> mesh run
    latency: dict[tuple[str, str], Latency] = field(default_factory=dict)
    rr_cpu: dict[str, AgentCpu] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)


def _attempt(results: Results, what: str, fn: Callable[[], None]) -> None:
    """One failed measurement is reported, the others still run."""
    try:
        fn()
    except (BenchError, OSError, KeyError, TimeoutError) as exc:
        results.failures.append(f"{what}: {exc}")
        print(f"  FAILED {what}: {exc}", flush=True)


class Bench:
    def __init__(self, net: ClusterNet, agents: dict[str, AgentProcess], args: Any) -> None:
        self.net, self.agents, self.args = net, agents, args
        self.results = Results()

    def ip(self, mode: str, pod: str) -> str:
        return str(self.net.pod(f"{mode}/{pod}").ip)

    def throughput(self, path: str, server: str, mode: str) -> None:
        client, ip = f"{mode}/client", self.ip(mode, server)
        warm_up(self.net, client, ip)
        with agent_cpu(self.agents, self.args.seconds) as cpu:
            gbps = iperf(self.net, client, ip, self.args.seconds)
        self.results.gbps[(path, mode)] = gbps
        if mode == "mesh":
            self.results.tput_cpu[path] = cpu
        print(f"  throughput {path:10} {mode:5}: {gbps:7.2f} Gbit/s", flush=True)

    def latency(self, path: str, server: str, mode: str) -> None:
        client, ip = f"{mode}/client", self.ip(mode, server)
        warm_up(self.net, client, ip)
        with agent_cpu(self.agents, self.args.rr_seconds) as cpu:
            lat = request_response(self.net, client, ip, self.args.rate, self.args.rr_seconds)
        self.results.latency[(path, mode)] = lat
        if mode == "mesh":
            self.results.rr_cpu[path] = cpu
        print(
            f"  latency    {path:10} {mode:5}: p50 {lat.p50:7.0f} µs  p99 {lat.p99:7.0f} µs",
            flush=True,
        )

    def run(self) -> Results:
        steps = (("throughput", self.throughput), ("latency", self.latency))
        for what, step in steps:
            for path, server in PATHS:
                for mode in MODES:
                    fn = functools.partial(step, path, server, mode)
                    _attempt(self.results, f"{what} {path} {mode}", fn)
        return self.results


# -- the report ------------------------------------------------------------------------


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None or math.isnan(value) else format(value, spec)


def _ratio(mesh: float | None, direct: float | None) -> float | None:
    return mesh / direct if mesh is not None and direct else None


def print_throughput(net: ClusterNet, r: Results, args: Any) -> None:
    print(
        f"Throughput: iperf3, 1 TCP stream, {args.seconds:g} s per run, receiver Gbit/s "
        "(client pod on node1)"
    )
    print(f"{'path':26} {'direct':>8} {'mesh':>8} {'mesh/direct':>12}   agent vCPU in mesh run")
    for path, server in PATHS:
        d, m = r.gbps.get((path, "plain")), r.gbps.get((path, "mesh"))
        cpu = r.tput_cpu.get(path)
        label = f"{path} (node1 -> {net.pod(f'mesh/{server}').node})"
        print(
            f"{label:26} {_fmt(d, '8.2f')} {_fmt(m, '8.2f')} "
            f"{_fmt(_ratio(m, d), '11.3f')}x   {cpu.text() if cpu else '-'}"
        )


def print_latency(r: Results, args: Any) -> None:
    print(
        f"Latency: 1 KiB request/response, {args.rate:g} req/s paced open loop for "
        f"{args.rr_seconds:g} s, 1 keep-alive connection; µs from the scheduled send time"
    )
    print(f"{'path':12} {'':4} {'direct':>8} {'mesh':>8} {'added':>8} {'mesh/direct':>12}")
    for path, _server in PATHS:
        dl, ml = r.latency.get((path, "plain")), r.latency.get((path, "mesh"))
        for i, q in enumerate(("p50", "p90", "p99")):
            dv, mv = (dl.q(q) if dl else None), (ml.q(q) if ml else None)
            added = mv - dv if dv is not None and mv is not None else None
            print(
                f"{path if i == 0 else '':12} {q:4} {_fmt(dv, '8.0f')} {_fmt(mv, '8.0f')} "
                f"{_fmt(added, '+8.0f')} {_fmt(_ratio(mv, dv), '11.2f')}x"
            )
        rates = "/".join(_fmt(x.achieved if x else None, ".0f") for x in (dl, ml))
        lost = "/".join(str(x.lost) if x else "-" for x in (dl, ml))
        print(f"{'':12} achieved req/s direct/mesh {rates}, lost {lost}")
        cpu = r.rr_cpu.get(path)
        if cpu is not None and ml is not None:
            per_k = sum(cpu.per_node.values()) / (ml.achieved / 1000)
            print(
                f"{'':12} agent vCPU in mesh run: {cpu.text()} "
                f"(both agents: {per_k:.2f} vCPU per 1000 req/s)"
            )


def print_report(net: ClusterNet, r: Results, args: Any) -> None:
    print()
    print_throughput(net, r, args)
    print()
    print_latency(r, args)
    if r.failures:
        print()
        print("FAILED measurements:")
        for f in r.failures:
            print(f"  {f}")


# -- setup and teardown ----------------------------------------------------------------


def start_servers(net: ClusterNet) -> dict[str, Any]:
    """iperf3 -s and the echo server in every server pod; blocks until all listen."""
    procs: dict[str, Any] = {}
    servers = [p for p in net.pods.values() if p.name.startswith("server")]
    for pod in servers:
        procs[f"{pod.key} iperf3"] = apps.start_program(
            net, pod, ["iperf3", "-s", "-p", str(IPERF_PORT)]
        )
        procs[f"{pod.key} echo"] = apps.start_program(
            net, pod, [*RR_PROGRAM, "serve", "--port", str(ECHO_PORT)]
        )
    for pod in servers:
        for port in (IPERF_PORT, ECHO_PORT):
            apps.wait_listening(net, pod, port, timeout=10)
    return procs


def run(args: Any) -> int:
    spec = loads_spec(CLUSTER, "bench/cluster.py")
    cleanup_stale()
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="zt-bench-cluster-") as tmp:
        path, ca_dir = Path(tmp) / "cluster.yaml", Path(tmp) / "ca"
        path.write_text(CLUSTER)
        ca_dir.mkdir()
        init_ca_dir(ca_dir)
        with running_cluster(spec) as net:
            agents: dict[str, AgentProcess] = {}
            programs: dict[str, Any] = {}
            try:
                log_env = {"RUST_LOG": args.log_level}
                for node in net.nodes:
                    agents[node] = start_agent(net, node, path, ca_dir, extra_env=log_env)
                programs = start_servers(net)
                for agent in agents.values():
                    wait_ready(agent, timeout=30)
                print(
                    f"cluster {net.prefix}: 2 nodes, agents ready; "
                    f"{time.monotonic() - started:.1f} s to set up",
                    flush=True,
                )
                for pod in net.pods.values():
                    print(f"  {pod.key:16} {pod.ip}  {pod.node}", flush=True)
                results = Bench(net, agents, args).run()
                for node, agent in agents.items():
                    if not agent.alive:
                        results.failures.append(f"agent@{node} died:\n{agent.log_tail(20)}")
                print_report(net, results, args)
            finally:
                with contextlib.suppress(Exception):
                    stop_agents(agents)
                with contextlib.suppress(Exception):
                    apps.stop_programs(programs)
    print(f"\n(ran in {time.monotonic() - started:.1f} s; cluster torn down)", flush=True)
    return 1 if results.failures else 0


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench/cluster.py", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 s runs (finishes in < 60 s)")
    parser.add_argument("--seconds", type=float, help="iperf3 -t per run (default 5, quick 2)")
    parser.add_argument("--rate", type=float, default=500.0, help="req/s (default 500)")
    parser.add_argument(
        "--rr-seconds", type=float, help="paced latency run length (default 5, quick 2)"
    )
    parser.add_argument(
        "--log-level",
        default=QUIET_LOG,
        help=f"agents' RUST_LOG (default {QUIET_LOG!r}: no per-connection access logs)",
    )
    args = parser.parse_args(argv)
    default = 2.0 if args.quick else 5.0
    args.seconds = args.seconds or default
    args.rr_seconds = args.rr_seconds or default
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("bench/cluster.py needs root (network namespaces, iptables)", file=sys.stderr)
        return 2
    return run_interruptible(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
