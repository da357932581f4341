"""Redirect modes end to end: direct vs through the mesh with iptables vs with eBPF, one run.

Run (root, eBPF mode available): ``.venv/bin/python bench/redirect_modes.py`` (about 3 min)
or ``--quick`` (about 1 min).

One simulated cluster (``ztunnel.cluster``) of four nodes holds all three set-ups at once, so
every figure comes from the same machine state and the rounds interleave them:

* ``direct``: namespace ``plain`` (not ambient) on node1/node2: no agent involved.
* ``iptables``: namespace ``ipt`` (ambient) on node1/node2, whose agents run REDIRECT_MODE=iptables.
* ``ebpf``: namespace ``bpf`` (ambient) on node3/node4, whose agents run REDIRECT_MODE=ebpf.

Each has a client and a server on its first node (same node) and a server on its second
(cross node). Per path and set-up, every round measures

* connection setup (``bench/connect_common.py``): N fresh connections one after the other,
  connect() time and connect-to-first-1-KiB-echo time, p50/p99;
* request latency (``bench/cluster_common.py client``): 1 KiB request/response paced open loop
  on one keep-alive connection, p50/p99;
* throughput: one iperf3 TCP stream, receiver Gbit/s;

and the report gives the median over the rounds of each figure, with the agents' CPU of the
mesh set-ups. Everything is torn down at the end (also on Ctrl-C), the eBPF pins included.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import statistics
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(BENCH.parent))

import cluster as cb  # noqa: E402
from common import run_interruptible  # noqa: E402  (bench/cluster.py: iperf, paced latency, servers)

from ztunnel.cluster import apps  # noqa: E402
from ztunnel.cluster.net import ClusterNet, cleanup_stale, running_cluster  # noqa: E402
from ztunnel.identity.ca import init_ca_dir  # noqa: E402
from ztunnel.redirect.ebpf import EbpfUnavailable, check_environment  # noqa: E402
from ztunnel.redirect.ebpf.build import default_source_dir  # noqa: E402
from ztunnel.sources.clusterfile.spec import loads_spec  # noqa: E402
from ztunnel.testing.harness import (  # noqa: E402
    AgentProcess,
    start_agent,
    stop_agents,
    wait_ready,
)

CONNECT_PROGRAM = ("python", str(BENCH / "connect_common.py"))
# set-up -> (namespace, its two nodes, REDIRECT_MODE of those nodes' agents or None)
SETUPS: dict[str, tuple[str, tuple[str, str], str | None]] = {
    "direct": ("plain", ("node1", "node2"), None),
    "iptables": ("ipt", ("node1", "node2"), "iptables"),
    "ebpf": ("bpf", ("node3", "node4"), "ebpf"),
}
PATHS = (("same node", "server-1"), ("cross node", "server-2"))
NODE_MODES = {"node1": "iptables", "node2": "iptables", "node3": "ebpf", "node4": "ebpf"}


def cluster_text() -> str:
    pods = []
    for ns, (first, second), _mode in SETUPS.values():
        pods += [
            f"  - {{name: client, namespace: {ns}, node: {first}, serviceAccount: client}}",
            f"  - {{name: server-1, namespace: {ns}, node: {first}, serviceAccount: server}}",
            f"  - {{name: server-2, namespace: {ns}, node: {second}, serviceAccount: server}}",
        ]
    head = textwrap.dedent(
        """\
        # Written by bench/redirect_modes.py: plain/*, ipt/* and bpf/* are mirror images.
        namespaces:
          plain: {labels: {}}
          ipt: {labels: {istio.io/dataplane-mode: ambient}}
          bpf: {labels: {istio.io/dataplane-mode: ambient}}
        nodes: [node1, node2, node3, node4]
        pods:
        """
    )
    return head + "\n".join(pods) + "\n"


# -- measurements ----------------------------------------------------------------------


@dataclass(frozen=True)
class Setup:
    p50_us: float
    p99_us: float
    first_p50_us: float
    first_p99_us: float


def connection_setup(net: ClusterNet, client: str, server_ip: str, count: int) -> Setup:
    argv = [*CONNECT_PROGRAM, "--to", f"{server_ip}:{cb.ECHO_PORT}", "--count", str(count)]
    proc = apps.run_in_pod(net, client, argv, timeout=60 + count * 0.1)
    try:
        r = cb._last_json(proc.stdout)
    except ValueError as exc:
        raise cb.BenchError(f"connect client: {(proc.stderr or proc.stdout)[-300:]}") from exc
    if not r["ok"]:
        raise cb.BenchError(f"connect client: {r['error']}")
    return Setup(r["connect_p50_us"], r["connect_p99_us"], r["first_p50_us"], r["first_p99_us"])


@dataclass
class Samples:
    """Every round's figures, by (metric, path, set-up)."""

    values: dict[tuple[str, str, str], list[float]] = field(default_factory=dict)
    cpu: dict[tuple[str, str, str], list[float]] = field(default_factory=dict)  # vCPU
    failures: list[str] = field(default_factory=list)

    def add(self, metric: str, path: str, setup: str, value: float) -> None:
        self.values.setdefault((metric, path, setup), []).append(value)

    def median(self, metric: str, path: str, setup: str) -> float | None:
        got = self.values.get((metric, path, setup))
        return statistics.median(got) if got else None


class Bench:
    def __init__(self, net: ClusterNet, agents: dict[str, AgentProcess], args: Any) -> None:
        self.net, self.agents, self.args = net, agents, args
        self.samples = Samples()

    def pods(self, setup: str, server: str) -> tuple[str, str]:
        ns = SETUPS[setup][0]
        return f"{ns}/client", str(self.net.pod(f"{ns}/{server}").ip)

    def mesh_agents(self, setup: str) -> dict[str, AgentProcess]:
        nodes = SETUPS[setup][1] if SETUPS[setup][2] else ()
        return {n: a for n, a in self.agents.items() if n in nodes}

    def setup_latency(self, path: str, server: str, setup: str) -> None:
        client, ip = self.pods(setup, server)
        cb.warm_up(self.net, client, ip)
        got = connection_setup(self.net, client, ip, self.args.connections)
        for metric, value in (
            ("connect p50", got.p50_us),
            ("connect p99", got.p99_us),
            ("first byte p50", got.first_p50_us),
            ("first byte p99", got.first_p99_us),
        ):
            self.samples.add(metric, path, setup, value)

    def request_latency(self, path: str, server: str, setup: str) -> None:
        client, ip = self.pods(setup, server)
        cb.warm_up(self.net, client, ip)
        seconds = self.args.rr_seconds
        with cb.agent_cpu(self.mesh_agents(setup), seconds) as cpu:
            lat = cb.request_response(self.net, client, ip, self.args.rate, seconds)
        self.samples.add("1 KiB p50", path, setup, lat.p50)
        self.samples.add("1 KiB p99", path, setup, lat.p99)
        if cpu.per_node:
            per_k = sum(cpu.per_node.values()) / (lat.achieved / 1000)
            self.samples.cpu.setdefault(("rr", path, setup), []).append(per_k)

    def throughput(self, path: str, server: str, setup: str) -> None:
        client, ip = self.pods(setup, server)
        cb.warm_up(self.net, client, ip)
        with cb.agent_cpu(self.mesh_agents(setup), self.args.seconds) as cpu:
            gbps = cb.iperf(self.net, client, ip, self.args.seconds)
        self.samples.add("Gbit/s", path, setup, gbps)
        if cpu.per_node:
            self.samples.cpu.setdefault(("tput", path, setup), []).append(
                sum(cpu.per_node.values())
            )

    def run(self) -> Samples:
        steps: tuple[tuple[str, Callable[[str, str, str], None]], ...] = (
            ("connection setup", self.setup_latency),
            ("request latency", self.request_latency),
            ("throughput", self.throughput),
        )
        for rnd in range(self.args.rounds):
            # Rotate the set-ups' order every round: none always runs first (or last).
            order = list(SETUPS)[rnd % 3 :] + list(SETUPS)[: rnd % 3]
            print(f"round {rnd + 1}/{self.args.rounds} ({', '.join(order)})", flush=True)
            for what, step in steps:
                for path, server in PATHS:
                    for setup in order:
                        run_one = functools.partial(step, path, server, setup)
                        self._attempt(f"{what} {path} {setup}", run_one)
        return self.samples

    def _attempt(self, what: str, fn: Callable[[], None]) -> None:
        try:
            fn()
        except (cb.BenchError, OSError, KeyError, TimeoutError) as exc:
            self.samples.failures.append(f"{what}: {exc}")
            print(f"  FAILED {what}: {exc}", flush=True)


# -- the report ------------------------------------------------------------------------

ROWS = (
    ("connect p50", "µs", ".0f"),
    ("connect p99", "µs", ".0f"),
    ("first byte p50", "µs", ".0f"),
    ("first byte p99", "µs", ".0f"),
    ("1 KiB p50", "µs", ".0f"),
    ("1 KiB p99", "µs", ".0f"),
    ("Gbit/s", "", ".2f"),
)


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def report(s: Samples, args: Any) -> str:
    lines = [
        f"median of {args.rounds} interleaved rounds; connection setup: {args.connections} "
        f"sequential connections; 1 KiB: {args.rate:g} req/s paced for {args.rr_seconds:g} s "
        f"on one connection; throughput: iperf3, 1 stream, {args.seconds:g} s",
        "",
        f"{'path':11} {'figure':16} {'direct':>9} {'iptables':>9} {'eBPF':>9} {'eBPF-ipt':>9}",
    ]
    for path, _server in PATHS:
        for i, (metric, unit, spec) in enumerate(ROWS):
            d, ipt, bpf = (s.median(metric, path, x) for x in SETUPS)
            diff = bpf - ipt if bpf is not None and ipt is not None else None
            label = f"{metric}{' ' + unit if unit else ''}"
            lines.append(
                f"{path if i == 0 else '':11} {label:16} {_fmt(d, '9' + spec)} "
                f"{_fmt(ipt, '9' + spec)} {_fmt(bpf, '9' + spec)} {_fmt(diff, '+9' + spec)}"
            )
        for kind, what in (("rr", "agents vCPU per 1000 req/s"), ("tput", "agents vCPU, iperf")):
            cpu = [s.cpu.get((kind, path, x)) for x in ("iptables", "ebpf")]
            text = " / ".join(_fmt(statistics.median(c) if c else None, ".2f") for c in cpu)
            lines.append(f"{'':11} {what} iptables / eBPF: {text}")
    if s.failures:
        lines += ["", "FAILED measurements:", *(f"  {f}" for f in s.failures)]
    return "\n".join(lines)


# -- setup and teardown ----------------------------------------------------------------


def run(args: Any) -> int:
    text = cluster_text()
    spec = loads_spec(text, "bench/redirect_modes.py")
    cleanup_stale()
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="zt-bench-redirect-") as tmp:
        path, ca_dir = Path(tmp) / "cluster.yaml", Path(tmp) / "ca"
        path.write_text(text)
        ca_dir.mkdir()
        init_ca_dir(ca_dir)
        with running_cluster(spec) as net:
            agents: dict[str, AgentProcess] = {}
            programs: dict[str, Any] = {}
            samples = Samples()
            try:
                for node in net.nodes:
                    env = {"RUST_LOG": args.log_level, "REDIRECT_MODE": NODE_MODES[node]}
                    agents[node] = start_agent(net, node, path, ca_dir, extra_env=env)
                programs = cb.start_servers(net)
                for agent in agents.values():
                    wait_ready(agent, timeout=60)
                print(
                    f"cluster {net.prefix}: 4 nodes (node1/2 iptables, node3/4 eBPF), agents "
                    f"ready; {time.monotonic() - started:.1f} s to set up",
                    flush=True,
                )
                samples = Bench(net, agents, args).run()
                for node, agent in agents.items():
                    if not agent.alive:
                        samples.failures.append(f"agent@{node} died:\n{agent.log_tail(20)}")
                print()
                print(report(samples, args))
            finally:
                with contextlib.suppress(Exception):
                    stop_agents(agents)
                with contextlib.suppress(Exception):
                    apps.stop_programs(programs)
    print(f"\n(ran in {time.monotonic() - started:.1f} s; cluster torn down)", flush=True)
    return 1 if samples.failures else 0


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bench/redirect_modes.py", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--quick", action="store_true", help="1 round of short runs")
    parser.add_argument("--rounds", type=int, help="interleaved rounds (default 3, quick 1)")
    parser.add_argument("--connections", type=int, help="per setup run (default 200, quick 100)")
    parser.add_argument("--seconds", type=float, help="iperf3 -t per run (default 3, quick 2)")
    parser.add_argument("--rate", type=float, default=500.0, help="req/s (default 500)")
    parser.add_argument("--rr-seconds", type=float, help="paced run (default 3, quick 2)")
    parser.add_argument("--log-level", default=cb.QUIET_LOG, help="agents' RUST_LOG")
    args = parser.parse_args(argv)
    args.rounds = args.rounds or (1 if args.quick else 3)
    args.connections = args.connections or (100 if args.quick else 200)
    args.seconds = args.seconds or (2.0 if args.quick else 3.0)
    args.rr_seconds = args.rr_seconds or (2.0 if args.quick else 3.0)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("bench/redirect_modes.py needs root (network namespaces, eBPF)", file=sys.stderr)
        return 2
    try:
        check_environment(Path("/sys/fs/bpf"), default_source_dir())
    except EbpfUnavailable as exc:
        print(f"bench/redirect_modes.py: {exc}", file=sys.stderr)
        return 2
    return run_interruptible(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
