"""Soak: thousands of idle connections plus a paced 1 KiB request load through an agent pair.

Run: ``.venv/bin/python bench/soak.py`` (10,000 idle connections + 1,000 req/s for 600 s,
about 12 min in all). Smaller: ``--duration 5 --idle 200 --rate 100``. Writes
``soak.json`` and ``soak.png`` into ``--out`` (default ``bench/out/``), prints a table;
exits 1 when a connection or request failed, an agent logged an error, an agent's fds did
not come back to baseline, or its RSS kept growing under steady load.

What runs (reused from bench/compare.py): the loopback pair of bench/loopback.py (agent A
at <base>.1 with SOCKS5 on :15080, agent B at <base>.2, dedicated mode, processes) and the
C app and load generator of bench/loadgen.c (``serve``, ``hold``, ``rr --report``):

1. baseline: agents ready, one warm-up request through the mesh, then wait until the
   pooled HBONE connection it left is released (``--pool-idle``, the agents'
   ``POOL_UNUSED_RELEASE_TIMEOUT``): each agent's fd count then is its baseline;
2. open: ``loadgen hold`` opens ``--idle`` connections client -> SOCKS5 A -> HBONE -> B ->
   app (each echoes 16 bytes once, then stays idle);
3. load: ``loadgen rr`` sends ``--rate`` 1 KiB requests/s open loop over ``--conns``
   connections for ``--duration`` s and prints each ``--interval``'s latency percentiles;
4. close: every connection closes; wait (up to ``--settle``) until each agent's fds are
   back at baseline.

Every ``--interval`` seconds each agent's RSS (VmRSS), open fds (/proc/PID/fd) and CPU are
sampled, with the machine's load average.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO, Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(BENCH.parent))

import loadgen  # noqa: E402
import soak_report as report  # noqa: E402
from common import MODE_ECHO, connect_socks5, cpu_seconds, proc_sample, recv_exact  # noqa: E402
from compare import QUIET_LOG, SOCKS_PORT, raise_nofile  # noqa: E402
from loadgen import APP_PORT, BenchError  # noqa: E402

from ztunnel.testing.loopback import random_base  # noqa: E402


def process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants: an agent's data-plane worker processes
    (``ZTUNNEL_WORKER_THREADS``) hold the connections, so they are part of its figures."""
    tree, i = [pid], 0
    while i < len(tree):
        with contextlib.suppress(OSError):  # a child that just exited has no task dir
            for task in os.listdir(f"/proc/{tree[i]}/task"):
                with open(f"/proc/{tree[i]}/task/{task}/children") as f:
                    tree += [int(c) for c in f.read().split()]
        i += 1
    return tree


def fd_count(pid: int) -> int:
    """Open fds of an agent: the process and its worker processes."""
    return sum(len(os.listdir(f"/proc/{p}/fd")) for p in process_tree(pid))


def agent_reading(pid: int) -> dict[str, Any]:
    """RSS (summed over the process and its workers; shared pages count once per
    process), fds and CPU seconds of an agent."""
    tree = process_tree(pid)
    return {
        "rss_kib": sum(proc_sample(p).rss_kib for p in tree),
        "fds": sum(len(os.listdir(f"/proc/{p}/fd")) for p in tree),
        "cpu_s": round(sum(cpu_seconds(p) for p in tree), 3),
        "processes": len(tree),
    }


@dataclass
class Sampler:
    """Reads both agents every ``interval`` seconds in a thread, tagged with the phase."""

    pids: dict[str, int]
    interval: float
    start: float = field(default_factory=time.monotonic)
    phase: str = "baseline"
    samples: list[report.Sample] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def now(self) -> float:
        return round(time.monotonic() - self.start, 3)

    def take(self) -> report.Sample:
        sample = {
            "t": self.now(),
            "phase": self.phase,
            "loadavg": [round(x, 2) for x in os.getloadavg()],
            "agents": {name: agent_reading(pid) for name, pid in self.pids.items()},
        }
        self.samples.append(sample)
        return sample

    def enter(self, phase: str) -> None:
        """A sample closes the old phase and one opens the new (edges on the chart)."""
        self.take()
        self.phase = phase
        self.take()

    def __enter__(self) -> Sampler:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            with contextlib.suppress(OSError):  # an agent that died shows in the verdict
                self.take()


class PacedLoad:
    """``loadgen rr --report``: its interval lines are collected as they arrive."""

    def __init__(self, binary: Path, options: Sequence[str], clock: Callable[[], float]) -> None:
        self.clock = clock
        self.intervals: list[dict[str, Any]] = []
        self.result: dict[str, Any] | None = None
        self.proc = subprocess.Popen(
            [str(binary), "rr", *options],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        out: IO[str] | None = self.proc.stdout
        for line in out or ():
            if not line.startswith("{"):
                continue
            record = json.loads(line)
            if record.get("interval"):
                # rr flushes each line at its interval's end: stamp it on the soak's clock
                record["rr_t"] = record["t"]
                record["t"] = self.clock()
                self.intervals.append(record)
            else:
                self.result = record

    def wait(self, timeout: float) -> str:
        """Wait for the run to end; return its stderr ('' when it ended cleanly)."""
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._reader.join(10)
        err = self.proc.stderr.read() if self.proc.stderr else ""
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream:
                stream.close()
        return err.strip()


def wait_fds(sampler: Sampler, target: dict[str, int], timeout: float) -> float | None:
    """Seconds until every agent's fds are at or below ``target``; None on timeout."""
    start = time.monotonic()
    while True:
        counts = {name: fd_count(pid) for name, pid in sampler.pids.items()}
        if all(counts[name] <= target[name] for name in target):
            return time.monotonic() - start
        if time.monotonic() - start >= timeout:
            return None
        time.sleep(0.25)


def warm_up(base: str) -> None:
    """One request through the mesh: certificates issued, the HBONE pool dialled once."""
    with connect_socks5((f"{base}.1", SOCKS_PORT), (f"{base}.2", APP_PORT), f"{base}.1") as sock:
        sock.sendall(MODE_ECHO + b"w" * 64)
        recv_exact(sock, 64)


def log_problems(workdir: Path) -> dict[str, list[str]]:
    """Error and warning records in the agents' JSON logs (access logs are off)."""
    found: dict[str, list[str]] = {"error": [], "warning": []}
    for who in report.AGENTS:
        path = workdir / f"agent-{who}.log"
        for line in path.read_text(errors="replace").splitlines() if path.exists() else ():
            try:
                record = json.loads(line)
            except ValueError:
                found["error"].append(f"{who}: {line[:200]}")  # a traceback, not a record
                continue
            level = str(record.get("level", "")).lower()
            if level in ("error", "critical"):
                found["error"].append(f"{who}: {line[:300]}")
            elif level in ("warning", "warn"):
                found["warning"].append(f"{who}: {line[:300]}")
    return found


@dataclass
class Soak:
    args: argparse.Namespace
    binary: Path
    base: str
    sampler: Sampler
    errors: dict[str, int] = field(default_factory=dict)
    doc: dict[str, Any] = field(default_factory=dict)

    def target(self) -> list[str]:
        b = self.base
        entry = ["--connect", f"{b}.1:{SOCKS_PORT}", "--src", f"{b}.1"]
        return [*entry, "--socks-dst", f"{b}.2:{APP_PORT}"]

    def baseline(self) -> dict[str, int]:
        before = {name: fd_count(pid) for name, pid in self.sampler.pids.items()}
        warm_up(self.base)
        # the warm-up's pooled connection closes after the pool's idle timeout
        wait_fds(self.sampler, before, self.args.pool_idle + 15)
        time.sleep(self.args.interval)
        base = {name: fd_count(pid) for name, pid in self.sampler.pids.items()}
        self.doc["fds_before_traffic"] = before
        print(f"baseline fds {base} (before any traffic {before})", flush=True)
        return base

    def run(self) -> None:
        base_fds = self.baseline()
        self.doc["base_fds"] = base_fds
        s = self.sampler
        s.enter("open")
        n, a = self.args.idle, self.args
        print(f"opening {n} idle connections ...", flush=True)
        holder = loadgen.Hold(self.binary, [*self.target(), "--count", str(n), "--workers", "8"])
        try:
            opened = holder.wait_open()
            self.errors["idle connections failed to open"] = int(opened["errors"])
            self.doc["idle"] = opened
            print(f"  {opened['opened']} open in {opened['open_s']:.1f} s", flush=True)
            s.enter("load")
            print(f"load: {a.rate:g} req/s over {a.conns} conns for {a.duration:g} s", flush=True)
            self.load()
            s.enter("close")
        finally:
            holder.release()
        back = wait_fds(s, base_fds, a.settle)
        self.doc["fds_back_s"] = None if back is None else round(back, 2)
        s.enter("after")

    def load(self) -> None:
        a = self.args
        options = [*self.target(), "--rate", str(a.rate), "--conns", str(a.conns)]
        options += ["--seconds", str(a.duration), "--size", str(a.size)]
        run = PacedLoad(self.binary, [*options, "--report", str(a.interval)], self.sampler.now)
        err = run.wait(a.duration + 120)
        result = run.result or {}
        self.doc["load"] = result
        self.doc["latency_intervals"] = run.intervals
        self.errors["requests unanswered"] = int(result.get("lost", 0))
        self.errors["load generator failures"] = 0 if run.result else 1
        if err or not run.result:
            self.doc["load_generator_stderr"] = err[-2000:]


def build_doc(soak: Soak, workdir: Path, started: datetime.datetime) -> dict[str, Any]:
    a, doc = soak.args, soak.doc
    problems = log_problems(workdir)
    soak.errors["agent error log records"] = len(problems["error"])
    samples = soak.sampler.samples
    agents = {
        name: report.agent_figures(samples, name, doc["base_fds"][name])
        for name in soak.sampler.pids
    }
    return {
        "meta": {
            "title": f"bench/soak.py {started:%Y-%m-%d %H:%M} UTC",
            "command": " ".join([".venv/bin/python", "bench/soak.py", *sys.argv[1:]]),
            "duration_s": a.duration,
            "idle_target": a.idle,
            "rate": a.rate,
            "conns": a.conns,
            "size": a.size,
            "interval_s": a.interval,
            "pool_unused_release_timeout_s": a.pool_idle,
            "cpus": os.cpu_count(),
            "loadavg_start": doc["loadavg_start"],
            "loadavg_end": [round(x, 2) for x in os.getloadavg()],
            "kernel": platform.release(),
            "python": platform.python_version(),
            "rlimit_nofile": doc["rlimit_nofile"],
            "seconds": round(soak.sampler.now(), 1),
        },
        "idle": doc.get("idle", {"opened": 0, "errors": 0, "open_s": 0.0}),
        "load": doc.get("load", {}),
        "agents": agents,
        "fds_before_traffic": doc.get("fds_before_traffic"),
        "fds_back_s": doc.get("fds_back_s"),
        "errors": soak.errors,
        "agent_log": {k: v[:20] for k, v in problems.items()},
        "agent_log_warnings": len(problems["warning"]),
        "load_generator_stderr": doc.get("load_generator_stderr", ""),
        "verdict": report.verdict(soak.errors, agents, a.max_rss_growth),
        "samples": samples,
        "latency_intervals": doc.get("latency_intervals", []),
    }


@contextlib.contextmanager
def agent_pair(binary: Path, base: str, pool_idle: float) -> Iterator[tuple[dict[str, int], Path]]:
    from loopback import loopback_pair

    app = [str(binary), "serve", f"{base}.2", str(APP_PORT), "2"]
    env = {"POOL_UNUSED_RELEASE_TIMEOUT": f"{pool_idle:g}s"}
    with loopback_pair(base, QUIET_LOG, app_argv=app, extra_env=env) as (procs, workdir):
        yield {name: p.pid for name, p in procs.agents.items()}, workdir


def write_outputs(doc: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "soak.json").write_text(json.dumps(doc, indent=1) + "\n")
    text = report.table(doc)
    (out / "soak.txt").write_text(text + "\n")
    png = report.chart(doc, out / "soak.png")
    print()
    print(text)
    print()
    print(
        f"wrote {out / 'soak.json'}, {out / 'soak.txt'}"
        + (f", {png}" if png else " (no chart: pip install -e '.[bench]' for matplotlib)")
    )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench/soak.py", description=__doc__.split("\n")[0])
    p.add_argument("--duration", type=float, default=600.0, help="seconds of load (600)")
    p.add_argument("--idle", type=int, default=10_000, help="idle connections held (10000)")
    p.add_argument("--rate", type=float, default=1000.0, help="requests per second (1000)")
    p.add_argument("--conns", type=int, default=10, help="connections carrying the load (10)")
    p.add_argument("--size", type=int, default=1024, help="request = response bytes (1024)")
    p.add_argument("--interval", type=float, default=5.0, help="seconds between samples (5)")
    p.add_argument(
        "--pool-idle",
        type=float,
        default=10.0,
        help="agents' POOL_UNUSED_RELEASE_TIMEOUT in s (10; ztunnel's default 300 would "
        "keep the HBONE pool's fds open 5 min after the last stream)",
    )
    p.add_argument(
        "--settle", type=float, help="max seconds for fds to come back (pool-idle + 120)"
    )
    p.add_argument(
        "--max-rss-growth",
        type=float,
        default=64.0,
        help="MiB an agent's RSS may grow under steady load (after the first 10%%) (64)",
    )
    p.add_argument("--out", type=Path, default=BENCH / "out", help="where the JSON/PNG go")
    args = p.parse_args(argv)
    if args.settle is None:
        args.settle = args.pool_idle + 120
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    nofile = raise_nofile()
    if nofile < args.idle + 1000:  # per process: one fd per connection in each
        print(f"RLIMIT_NOFILE {nofile} is too low for {args.idle} connections", file=sys.stderr)
        return 2
    binary = loadgen.build()
    started = datetime.datetime.now(datetime.UTC)
    base = random_base()
    loadavg = [round(x, 2) for x in os.getloadavg()]
    print(f"soak on {base}.x, load average {loadavg}, RLIMIT_NOFILE {nofile}", flush=True)
    with agent_pair(binary, base, args.pool_idle) as (pids, workdir):
        with Sampler(pids, args.interval) as sampler:
            soak = Soak(args, binary, base, sampler)
            soak.doc.update(loadavg_start=loadavg, rlimit_nofile=nofile)
            try:
                soak.run()
            except (BenchError, loadgen.LoadgenError, OSError) as exc:
                soak.errors[f"aborted: {exc}"] = 1
                soak.doc.setdefault("base_fds", {n: 0 for n in pids})
                with contextlib.suppress(OSError):
                    sampler.enter("after")
        doc = build_doc(soak, workdir, started)
    write_outputs(doc, args.out)
    return 0 if doc["verdict"]["ok"] else 1


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # SIGTERM tears down like Ctrl-C (agents, app, load generator)


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
    sys.exit(130)
