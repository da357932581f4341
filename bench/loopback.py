"""Loopback benchmark: direct TCP vs the two-agent HBONE mesh, in one run.

Run: ``.venv/bin/python bench/loopback.py`` (about 1 min) or ``--quick`` (< 30 s).

What it builds (everything on a random 127.a.b base, torn down at exit):

* agent A (``ztunnel run``, dedicated mode, workload default/client) at <base>.1,
  SOCKS5 on <base>.1:15080; agent B (default/server) at <base>.2, HBONE inbound on
  <base>.2:15008; both separate processes sharing a CA made by ``ztunnel ca init``
  and a local config from ``ztunnel.testing.loopback.mesh_yaml``;
* the app (``bench/common.py serve``) at <base>.2:8080, its own process;
* the load generator here, blocking sockets, bound to <base>.1.

Direct is client -> <base>.2:8080. Mesh is client -> SOCKS5 A -> HBONE (mTLS, h2
CONNECT) -> B -> app. Agent logs go to a file; by default ``RUST_LOG`` keeps only
warnings (plus the "agent ready" line), ``--access-logs`` runs with ztunnel's
default ``info`` so each connection writes its access-log lines.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import common
from common import ProcSample, proc_sample

from ztunnel.testing.loopback import APP_PORT, agent_env, mesh_yaml, random_base

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
MSG = 1024
QUIET_LOG = "ztunnel.agent=info,warn"  # keep the ready line, drop access logs

Connect = Callable[[], socket.socket]
T = TypeVar("T")


# -- processes -------------------------------------------------------------------------


@dataclass
class Procs:
    app: subprocess.Popen[bytes]
    agents: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def all(self) -> list[subprocess.Popen[bytes]]:
        return [self.app, *self.agents.values()]


def _agent_env(
    base: str, who: str, workdir: Path, log_level: str, extra_env: dict[str, str] | None = None
) -> dict[str, str]:
    ip = f"{base}.1" if who == "A" else f"{base}.2"
    workload = "default/client/client" if who == "A" else "default/server/server"
    env = dict(os.environ)
    extra = {
        "LOCAL_XDS_PATH": str(workdir / "mesh.yaml"),
        "CA_DIR": str(workdir / "ca"),
        "LOG_FORMAT": "json",
        "RUST_LOG": log_level,
        **(extra_env or {}),
    }
    env.update(agent_env(ip, workload, extra=extra))
    return env


def _wait_for(path: Path, proc: subprocess.Popen[bytes], pred: Callable[[str], bool]) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        text = path.read_text(errors="replace") if path.exists() else ""
        if any(pred(line) for line in text.splitlines()):
            return
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited {proc.returncode}:\n{text[-3000:]}")
        time.sleep(0.05)
    raise RuntimeError(f"timed out waiting for {path}")


def _is_ready(line: str) -> bool:
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return False
    return "agent ready" in (record.get("message"), record.get("event"))


@contextlib.contextmanager
def loopback_pair(
    base: str,
    log_level: str,
    profile_dir: str | None = None,
    app_argv: list[str] | None = None,
    extra_env: dict[str, str] | None = None,
) -> Iterator[tuple[Procs, Path]]:
    """CA, agents A and B and the app (``app_argv``, default ``bench/common.py serve``;
    it must print a line starting with ``listening`` once it accepts). ``extra_env`` is
    added to both agents' environment (e.g. a shorter ``POOL_UNUSED_RELEASE_TIMEOUT``)."""
    with tempfile.TemporaryDirectory(prefix="zt-bench-") as tmp:
        workdir = Path(tmp)
        subprocess.run(
            [PY, "-m", "ztunnel.cli", "ca", "init", str(workdir / "ca")],
            check=True,
            capture_output=True,
            cwd=ROOT,
        )
        (workdir / "mesh.yaml").write_text(mesh_yaml(base))
        app_log = workdir / "app.log"
        with app_log.open("wb") as out:
            app = subprocess.Popen(
                app_argv
                or [PY, str(ROOT / "bench" / "common.py"), "serve", f"{base}.2", str(APP_PORT)],
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        procs = Procs(app)
        try:
            for who in ("A", "B"):
                with (workdir / f"agent-{who}.log").open("wb") as out:
                    prof = (
                        ["-m", "cProfile", "-o", str(Path(profile_dir) / f"agent-{who}.prof")]
                        if profile_dir
                        else []
                    )
                    procs.agents[who] = subprocess.Popen(
                        [PY, *prof, "-m", "ztunnel.cli", "run"],
                        env=_agent_env(base, who, workdir, log_level, extra_env),
                        stdout=out,
                        stderr=subprocess.STDOUT,
                        cwd=ROOT,
                    )
            _wait_for(app_log, app, lambda line: line.startswith("listening"))
            for who, proc in procs.agents.items():
                _wait_for(workdir / f"agent-{who}.log", proc, _is_ready)
            yield procs, workdir
        finally:
            _stop(procs.all())


def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# -- workloads -------------------------------------------------------------------------


def throughput(connect: Connect, nbytes: int) -> float:
    """One stream, one way, to the sink; MB/s until the sink confirmed the byte count."""
    chunk = b"\x5a" * (256 * 1024)
    with connect() as sock:
        start = time.perf_counter()
        sock.sendall(common.MODE_SINK)
        left = nbytes
        while left > 0:
            sock.sendall(chunk if left >= len(chunk) else chunk[:left])
            left -= len(chunk)
        sock.shutdown(socket.SHUT_WR)
        reply = b""
        while part := sock.recv(64):
            reply += part
        elapsed = time.perf_counter() - start
    if int(reply) != nbytes:
        raise RuntimeError(f"sink counted {reply!r}, sent {nbytes}")
    return nbytes / elapsed / 1e6


@dataclass
class Latency:
    p50: float
    p90: float
    p99: float
    achieved: float  # responses/s
    lost: int


def paced_latency(connect: Connect, rate: float, seconds: float) -> Latency:
    """Paced open-loop 1 KiB echo on one keep-alive connection (``common.paced_rr``)."""
    with connect() as sock:
        sock.sendall(common.MODE_ECHO)
        run = common.paced_rr(sock, rate, seconds, MSG)
    return Latency(
        common.percentile(run.latencies, 50),
        common.percentile(run.latencies, 90),
        common.percentile(run.latencies, 99),
        run.achieved_per_s,
        run.lost,
    )


@dataclass
class ConnRate:
    per_s: float
    p50: float
    p99: float
    errors: int


def connection_rate(connect: Connect, seconds: float, workers: int) -> ConnRate:
    """Each worker: connect, one 1 KiB echo round trip, close; repeat until time is up."""
    payload = b"\x43" * MSG
    stop = time.perf_counter() + seconds
    times: list[list[float]] = [[] for _ in range(workers)]
    errors = [0] * workers

    def work(i: int) -> None:
        while time.perf_counter() < stop:
            start = time.perf_counter()
            try:
                with connect() as sock:
                    sock.sendall(common.MODE_ECHO + payload)
                    common.recv_exact(sock, MSG)
            except OSError:
                errors[i] += 1
                continue
            times[i].append(time.perf_counter() - start)

    begin = time.perf_counter()
    threads = [threading.Thread(target=work, args=(i,)) for i in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - begin
    flat = sorted(x for ts in times for x in ts)
    return ConnRate(
        len(flat) / elapsed, common.percentile(flat, 50), common.percentile(flat, 99), sum(errors)
    )


# -- the run ---------------------------------------------------------------------------


@dataclass
class Row:
    name: str
    unit: str
    direct: float
    mesh: float
    note: str = ""


@dataclass
class AgentCost:
    """CPU seconds used during one mesh run by agents A and B, the load generator, the app.

    Per process from /proc/<pid>/stat (precise: scaled to the scheduler's runtime);
    /proc/stat's machine-wide ticks miss short bursts on this tickless VM."""

    name: str
    unit: str  # what ``work`` counts: "MB", "req" or "conn"
    cpu: dict[str, float]
    wall: float
    work: float = 0.0


class Bench:
    def __init__(self, procs: Procs, base: str) -> None:
        self.procs = procs
        self.client_ip = f"{base}.1"
        self._base = base
        self._direct_seq = itertools.count()
        self.app = (f"{base}.2", APP_PORT)
        self.socks = (f"{base}.1", 15080)
        self.rows: list[Row] = []
        self.costs: list[AgentCost] = []

    def direct(self) -> socket.socket:
        # Rotate the source over <base>.10-.249: thousands of direct connects per second
        # would otherwise use up one (src ip, dst) pair's ephemeral ports (TIME_WAIT).
        src = f"{self._base}.{10 + next(self._direct_seq) % 240}"
        return common.connect_direct(self.app, src)

    def mesh(self) -> socket.socket:
        return common.connect_socks5(self.socks, self.app, self.client_ip)

    def samples(self) -> tuple[ProcSample, ProcSample]:
        return proc_sample(self.procs.agents["A"].pid), proc_sample(self.procs.agents["B"].pid)

    def _cpu(self) -> dict[str, float]:
        pids = {
            "A": self.procs.agents["A"].pid,
            "B": self.procs.agents["B"].pid,
            "client": os.getpid(),
            "app": self.procs.app.pid,
        }
        cpu = {k: proc_sample(pid).cpu_s for k, pid in pids.items()}
        return cpu

    def measured(self, name: str, unit: str, fn: Callable[[], T]) -> tuple[T, AgentCost]:
        before, start = self._cpu(), time.monotonic()
        value = fn()
        after, wall = self._cpu(), time.monotonic() - start
        cost = AgentCost(name, unit, {k: after[k] - before[k] for k in after}, wall)
        self.costs.append(cost)
        return value, cost


def run_all(bench: Bench, args: argparse.Namespace) -> None:
    nbytes = args.mib * 1024 * 1024
    print(f"  throughput, {args.mib} MiB one way ...", flush=True)
    d = throughput(bench.direct, nbytes)
    m, cost = bench.measured("throughput", "MB", lambda: throughput(bench.mesh, nbytes))
    cost.work = nbytes / 1e6
    bench.rows.append(Row("single-stream throughput", "MB/s", d, m))

    print(
        f"  paced 1 KiB req/resp at {args.rate:g}/s for {args.latency_seconds:g} s ...", flush=True
    )
    dl = paced_latency(bench.direct, args.rate, args.latency_seconds)
    ml, cost = bench.measured(
        "paced req/resp", "req", lambda: paced_latency(bench.mesh, args.rate, args.latency_seconds)
    )
    cost.work = ml.achieved * cost.wall
    for q in ("p50", "p90", "p99"):
        bench.rows.append(
            Row(f"1 KiB req/resp latency {q}", "ms", getattr(dl, q) * 1e3, getattr(ml, q) * 1e3)
        )
    bench.rows.append(
        Row("  achieved rate", "req/s", dl.achieved, ml.achieved, f"lost {dl.lost}/{ml.lost}")
    )

    for workers in sorted({1, args.workers} - {0}):
        print(f"  new connections, {workers} worker(s), {args.conn_seconds:g} s ...", flush=True)
        dc = connection_rate(bench.direct, args.conn_seconds, workers)
        mc, cost = bench.measured(
            f"new conns x{workers}",
            "conn",
            functools.partial(connection_rate, bench.mesh, args.conn_seconds, workers),
        )
        cost.work = mc.per_s * cost.wall
        tag = f"new connections/s ({workers} worker{'s' if workers > 1 else ''})"
        bench.rows.append(Row(tag, "conn/s", dc.per_s, mc.per_s, f"errors {dc.errors}/{mc.errors}"))
        bench.rows.append(Row("  connect+1KiB+close p50", "ms", dc.p50 * 1e3, mc.p50 * 1e3))
        bench.rows.append(Row("  connect+1KiB+close p99", "ms", dc.p99 * 1e3, mc.p99 * 1e3))


def print_report(
    bench: Bench, idle: tuple[ProcSample, ProcSample], first_ms: float, log_level: str
) -> None:
    print()
    print(f"{'figure':34} {'unit':>7} {'direct':>10} {'mesh':>10} {'mesh/direct':>12}")
    for r in bench.rows:
        ratio = r.mesh / r.direct if r.direct else float("nan")
        print(f"{r.name:34} {r.unit:>7} {r.direct:10.3f} {r.mesh:10.3f} {ratio:11.2f}x  {r.note}")
    print()
    print(f"first mesh connection (certs + TLS + CONNECT + 1 KiB echo): {first_ms:.1f} ms")
    print()
    print(f"CPU during each mesh run, in vCPU (cores busy on average); RUST_LOG={log_level}")
    print(
        f"{'run':16} {'wall s':>6} {'agent A':>8} {'agent B':>8} {'client':>7} {'app':>6}"
        f" {'total':>6}   agent vCPU per 1000 units/s"
    )
    for c in bench.costs:
        v = {k: x / c.wall for k, x in c.cpu.items()}
        per_k = c.work / c.wall / 1000
        unit = {"MB": "MB/s", "req": "req/s", "conn": "conn/s"}[c.unit]
        print(
            f"{c.name:16} {c.wall:6.2f} {v['A']:8.2f} {v['B']:8.2f} {v['client']:7.2f}"
            f" {v['app']:6.2f} {sum(v.values()):6.2f}   A {v['A'] / per_k:.3f}"
            f"  B {v['B'] / per_k:.3f}  (per 1000 {unit})"
        )
    now = bench.samples()
    print()
    print("agent RSS (VmRSS):")
    for i, who in enumerate(("A", "B")):
        print(
            f"  agent {who}: idle {idle[i].rss_kib / 1024:6.1f} MiB"
            f"   after runs {now[i].rss_kib / 1024:6.1f} MiB"
        )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--mib", type=int, help="throughput payload (MiB; 512, quick 128)")
    p.add_argument("--rate", type=float, default=500.0, help="paced requests per second")
    p.add_argument("--latency-seconds", type=float, help="paced run length (5; quick 2)")
    p.add_argument("--conn-seconds", type=float, help="per new-connection run (5; quick 1.5)")
    p.add_argument("--workers", type=int, default=8, help="concurrent connection workers (0: off)")
    p.add_argument("--access-logs", action="store_true", help="RUST_LOG=info (access logs on)")
    p.add_argument("--base", help="127.a.b base address (default random)")
    p.add_argument("--quick", action="store_true", help="small sizes, under 30 s")
    p.add_argument(
        "--profile", metavar="DIR", help="run the agents under cProfile, write DIR/agent-{A,B}.prof"
    )
    args = p.parse_args(argv)
    defaults = (128, 2.0, 1.5) if args.quick else (512, 5.0, 5.0)
    for name, value in zip(("mib", "latency_seconds", "conn_seconds"), defaults, strict=True):
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    common.tighten_timer_slack()
    base = args.base or random_base()
    log_level = "info" if args.access_logs else QUIET_LOG
    print(f"loopback mesh on {base}.x, agents as processes, RUST_LOG={log_level}")
    with loopback_pair(base, log_level, args.profile) as (procs, _workdir):
        bench = Bench(procs, base)
        time.sleep(0.5)
        idle = bench.samples()
        start = time.perf_counter()
        with bench.mesh() as sock:
            sock.sendall(common.MODE_ECHO + b"x" * MSG)
            common.recv_exact(sock, MSG)
        first_ms = (time.perf_counter() - start) * 1e3
        run_all(bench, args)
        print_report(bench, idle, first_ms, log_level)
    return 0


if __name__ == "__main__":
    sys.exit(main())
