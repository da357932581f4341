"""Hostile HBONE peers against a real agent pair: fairness under floods, memory after bursts.

Run (each prints its figures; agents, app and flooder are separate processes):

  .venv/bin/python bench/flood.py flood --attack rapid-reset   # 30 s, others at 20 req/s
  .venv/bin/python bench/flood.py flood --attack ping
  .venv/bin/python bench/flood.py flood --attack continuation --connections 20
  .venv/bin/python bench/flood.py burst                         # 500 conns x 10 streams

The mesh is ``bench/loopback.py``'s: agent A (client workload, SOCKS5) and agent B
(server workload, HBONE on <base>.2:15008) in dedicated mode, the app behind B.

``flood``: the "others" are clients of agent A (SOCKS5 -> HBONE via A's pool -> B ->
app, a new connection and one 1 KiB echo per request, paced at ``--rate``); their
latency runs from each request's due time, so stalls are not hidden. Meanwhile one
flooder process, holding a certificate of the trust domain (identity
``default/attacker``), connects straight to B's 15008 and sends the attack for
``--seconds``; when B closes its connection it reconnects (``--no-reconnect``: it
stops). Printed: the others' p50/p95/max before and during, the flooder's connections
and the GOAWAY codes it received, agent B's CPU and RSS.

``burst``: ``--connections`` HBONE connections to B, each with ``--streams`` concurrent
CONNECT streams (1 KiB echo each), all held open, then closed. Printed: B's RSS and
open fds at baseline, at the peak, and 1, 5 and 10 s after the close.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import select
import socket
import ssl
import statistics
import struct
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import common
from loopback import QUIET_LOG, loopback_pair

from ztunnel.testing.loopback import APP_PORT, random_base

PY = sys.executable
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
# "idle" is the control: one connection that sends nothing, so the "during" window shows
# what the machine's load alone does to the others.
ATTACKS = (
    "rapid-reset",
    "ping",
    "settings",
    "window-update",
    "empty-data",
    "continuation",
    "idle",
)
ERROR_NAMES = {0: "NO_ERROR", 1: "PROTOCOL_ERROR", 2: "INTERNAL_ERROR", 11: "ENHANCE_YOUR_CALM"}

# HTTP/2 frame types and flags (RFC 9113 §6).
DATA, HEADERS, RST_STREAM, SETTINGS, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = (
    0x0,
    0x1,
    0x3,
    0x4,
    0x6,
    0x7,
    0x8,
    0x9,
)
END_HEADERS, ACK = 0x4, 0x1


def frame(kind: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    return (
        struct.pack(">I", len(payload))[1:]
        + bytes((kind, flags))
        + struct.pack(">I", stream_id)
        + payload
    )


def connect_block(authority: str) -> bytes:
    """HPACK block of ``CONNECT authority``, never indexed: the same bytes every time."""
    import hpack

    headers = [
        hpack.NeverIndexedHeaderTuple(":method", "CONNECT"),
        hpack.NeverIndexedHeaderTuple(":authority", authority),
    ]
    return bytes(hpack.Encoder().encode(headers, huffman=False))


# -- the flooder (its own process) --------------------------------------------------------


@dataclass
class ConnOutcome:
    units: int = 0  # attack units fully sent (a HEADERS+RST pair, a PING, ...)
    goaway: int | None = None  # error code of the server's GOAWAY
    seconds: float = 0.0  # from the handshake to the server's close (or the end of the run)
    closed_by_server: bool = False
    refused: bool = False  # the connect or handshake failed (the agent's penalty, a limit)


class Attack:
    """Produces the attack's bytes for one connection, in batches of whole units."""

    def __init__(self, kind: str, authority: str) -> None:
        self.kind = kind
        self.block = connect_block(authority)
        self.next_stream = 1
        self.opening = b""
        if kind == "empty-data":  # one open stream, then empty DATA frames on it
            self.opening = frame(HEADERS, END_HEADERS, 1, self.block)
            self.next_stream = 3
        elif kind == "continuation":  # a header block that never ends
            self.opening = frame(HEADERS, 0, 1, self.block)

    def unit_size(self) -> int:
        return max(1, len(self.batch(1, probe=True)))

    def batch(self, n: int, *, probe: bool = False) -> bytes:
        if self.kind == "rapid-reset":
            sid = self.next_stream
            if not probe:
                self.next_stream += 2 * n
            cancel = struct.pack(">I", 8)
            return b"".join(
                frame(HEADERS, END_HEADERS, s, self.block) + frame(RST_STREAM, 0, s, cancel)
                for s in range(sid, sid + 2 * n, 2)
            )
        if self.kind == "ping":
            return frame(PING, 0, 0, b"flooding") * n
        if self.kind == "settings":
            return frame(SETTINGS, 0, 0, struct.pack(">HI", 0x4, 65_535)) * n
        if self.kind == "window-update":
            return frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", 1)) * n
        if self.kind == "empty-data":
            return frame(DATA, 0, 1) * n
        if self.kind == "continuation":
            return frame(CONTINUATION, 0, 1, b"\x00" * (1024 * 1024 - 9)) * n
        if self.kind == "idle":
            return b""
        raise ValueError(self.kind)


def _goaway_code(buf: bytearray) -> int | None:
    """Consumes whole frames from ``buf``; returns a GOAWAY's error code if one came."""
    code = None
    while len(buf) >= 9:
        length = int.from_bytes(buf[:3], "big")
        if len(buf) < 9 + length:
            break
        if buf[3] == GOAWAY and length >= 8:
            code = int.from_bytes(buf[13:17], "big")
        del buf[: 9 + length]
    return code


def flood_one(
    ctx: ssl.SSLContext, target: tuple[str, int], attack: Attack, stop: float, max_units: int | None
) -> ConnOutcome:
    """One connection: handshake, then the attack until the server closes or time is up."""
    raw = socket.create_connection(target, timeout=10)
    tls = ctx.wrap_socket(raw, server_hostname=None)
    tls.setblocking(False)
    start = time.monotonic()
    out = bytearray(PREFACE + frame(SETTINGS, 0, 0) + frame(SETTINGS, ACK, 0) + attack.opening)
    head = len(out)  # bytes before the first unit
    unit = attack.unit_size()
    sent = queued_units = 0
    inbuf = bytearray()
    result = ConnOutcome()
    batch = 1 if attack.kind == "continuation" else 256
    try:
        while time.monotonic() < stop:
            if len(out) < 256 * 1024 and (max_units is None or queued_units < max_units):
                n = batch if max_units is None else min(batch, max_units - queued_units)
                out += attack.batch(n)
                queued_units += n
            readable, writable, _ = select.select([tls], [tls] if out else [], [], 0.2)
            if readable or tls.pending():
                try:
                    data = tls.recv(262_144)
                except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                    data = None
                if data == b"":
                    result.closed_by_server = True
                    break
                if data:
                    inbuf += data
                    code = _goaway_code(inbuf)
                    if code is not None and result.goaway is None:
                        result.goaway = code
            if writable and out:
                try:
                    n = tls.send(out[:262_144])
                except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                    n = 0
                del out[:n]
                sent += n
    except (OSError, ssl.SSLError):
        result.closed_by_server = True
    finally:
        tls.close()
    result.units = max(0, (sent - head) // unit)
    result.seconds = time.monotonic() - start
    return result


def attacker_context(ca_dir: str) -> ssl.SSLContext:
    from ztunnel.identity.ca import FileCA
    from ztunnel.identity.certificate import WorkloadCertificate, new_csr
    from ztunnel.identity.tls import client_context
    from ztunnel.model.identity import Identity

    ca = FileCA.load(ca_dir)
    identity = Identity("cluster.local", "default", "attacker")
    key, csr = new_csr(identity)
    now = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
    chain = ca.sign(csr, not_before=now, not_after=now + datetime.timedelta(hours=1))
    return client_context(WorkloadCertificate.from_chain(identity, key, chain))


def flooder_main(args: argparse.Namespace) -> int:
    ctx = attacker_context(args.ca)
    host, port = args.target.rsplit(":", 1)
    target = (host, int(port))
    stop = time.monotonic() + args.seconds
    outcomes: list[ConnOutcome] = []

    def attack_once() -> None:
        try:
            outcomes.append(
                flood_one(ctx, target, Attack(args.attack, args.authority), stop, args.max_units)
            )
        except OSError:
            outcomes.append(ConnOutcome(refused=True))
            time.sleep(0.05)

    while time.monotonic() < stop:
        # Several connections at once hold memory together (continuation).
        threads = [threading.Thread(target=attack_once) for _ in range(args.connections)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if args.no_reconnect:
            break
    print(json.dumps([asdict(o) for o in outcomes]))
    return 0


# -- the others -----------------------------------------------------------------------------


@dataclass
class Others:
    """Paced requests through agent A; latency from each request's due time."""

    socks: tuple[str, int]
    app: tuple[str, int]
    client_ip: str
    rate: float
    latencies: list[tuple[float, float]] = field(default_factory=list)  # (due, latency)
    errors: list[tuple[float, str]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _next: int = 0

    def run(self, workers: int = 16) -> list[threading.Thread]:
        self._t0 = time.perf_counter()
        threads = [threading.Thread(target=self._work, daemon=True) for _ in range(workers)]
        for t in threads:
            t.start()
        return threads

    def stop(self, threads: list[threading.Thread]) -> None:
        self._stop.set()
        for t in threads:
            t.join(timeout=15)

    def _work(self) -> None:
        payload = common.MODE_ECHO + b"o" * 1024
        while not self._stop.is_set():
            with self._lock:
                due = self._t0 + self._next / self.rate
                self._next += 1
            wait = due - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
            try:
                with common.connect_socks5(self.socks, self.app, self.client_ip) as sock:
                    sock.settimeout(10)
                    sock.sendall(payload)
                    common.recv_exact(sock, 1024)
            except OSError as exc:
                with self._lock:
                    self.errors.append((due, str(exc)))
                continue
            with self._lock:
                self.latencies.append((due, time.perf_counter() - due))

    def window(self, start: float, end: float) -> list[float]:
        return sorted(lat for due, lat in self.latencies if start <= due < end)


def describe(lat: list[float]) -> str:
    if not lat:
        return "no requests"
    p = common.percentile
    return (
        f"n={len(lat):4d}  p50 {p(lat, 50) * 1e3:7.1f} ms  p95 {p(lat, 95) * 1e3:7.1f} ms"
        f"  max {lat[-1] * 1e3:7.1f} ms"
    )


def run_delay(pid: int, tree: bool = True) -> float:
    """Seconds the threads of ``pid`` (and of its worker processes) spent runnable but
    waiting for a CPU (``/proc/<pid>/task/*/schedstat``, second field): on a loaded
    machine this is where a request's time goes when the agents themselves are idle."""
    total = 0
    for member in common.process_tree(pid) if tree else [pid]:
        with contextlib.suppress(OSError):
            for task in Path(f"/proc/{member}/task").iterdir():
                try:
                    total += int((task / "schedstat").read_text().split()[1])
                except (OSError, IndexError, ValueError):
                    continue  # the thread ended meanwhile
    return total / 1e9


def tree_cpu_sample(pid: int) -> common.ProcSample:
    """CPU and RSS of an agent summed over its process tree (worker processes)."""
    cpu = 0.0
    for member in common.process_tree(pid):
        with contextlib.suppress(OSError):
            cpu += common.cpu_seconds(member)
    return common.ProcSample(cpu, common.tree_rss_kib(pid), time.monotonic())


def flood_main(args: argparse.Namespace) -> int:
    common.tighten_timer_slack()
    base = args.base or random_base()
    print(
        f"loopback mesh on {base}.x; attack {args.attack} for {args.seconds:g} s on agent B;"
        f" ZTUNNEL_WORKER_THREADS={args.workers or 'unset'}"
    )
    env = {"ZTUNNEL_WORKER_THREADS": str(args.workers)} if args.workers else {}
    with loopback_pair(base, QUIET_LOG, extra_env=env) as (procs, workdir):
        b_pid = procs.agents["B"].pid
        others = Others((f"{base}.1", 15080), (f"{base}.2", APP_PORT), f"{base}.1", args.rate)
        threads = others.run()
        time.sleep(args.warmup)
        a_pid = procs.agents["A"].pid
        before, a_before = tree_cpu_sample(b_pid), tree_cpu_sample(a_pid)
        pids = ((a_pid, True), (b_pid, True), (os.getpid(), False))  # not the flooder
        waits_before = [run_delay(pid, tree) for pid, tree in pids]
        children_before = os.times()
        t_start = time.perf_counter()
        flooder = subprocess.run(
            [
                *(["nice", "-n", str(args.nice)] if args.nice else []),
                PY,
                __file__,
                "flooder",
                "--ca",
                str(workdir / "ca"),
                "--target",
                f"{base}.2:15008",
                "--attack",
                args.attack,
                "--seconds",
                str(args.seconds),
                "--authority",
                f"{base}.2:{APP_PORT}",
                "--connections",
                str(args.connections),
                *(["--no-reconnect"] if args.no_reconnect else []),
                *(["--max-units", str(args.max_units)] if args.max_units else []),
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        t_end = time.perf_counter()
        after, a_after = tree_cpu_sample(b_pid), tree_cpu_sample(a_pid)
        waits = [
            run_delay(pid, tree) - w for (pid, tree), w in zip(pids, waits_before, strict=True)
        ]
        children_after = os.times()
        time.sleep(args.warmup)
        others.stop(threads)
        peak_rss = after.rss_kib
    every = [ConnOutcome(**o) for o in json.loads(flooder.stdout or "[]")]
    outcomes = [o for o in every if not o.refused]
    print()
    print(f"others through agent A at {args.rate:g} req/s (new connection + 1 KiB echo each):")
    print(f"  before the flood  {describe(others.window(t_start - args.warmup, t_start))}")
    print(f"  during the flood  {describe(others.window(t_start, t_end))}")
    print(f"  after the flood   {describe(others.window(t_end, t_end + args.warmup))}")
    during_errors = [e for due, e in others.errors if t_start <= due < t_end]
    print(f"  errors during: {len(during_errors)} {Counter(during_errors).most_common(3)}")
    print()
    print(f"flooder ({args.attack}): {len(outcomes)} connection(s) in {t_end - t_start:.1f} s")
    print(f"  reconnects refused at connect/handshake: {len(every) - len(outcomes)}")
    codes = Counter(
        ERROR_NAMES.get(o.goaway, str(o.goaway)) if o.goaway is not None else "none"
        for o in outcomes
    )
    print(f"  GOAWAY codes received: {dict(codes)}")
    if outcomes:
        units = [o.units for o in outcomes]
        secs = [o.seconds for o in outcomes]
        print(
            f"  units sent per connection: median {statistics.median(units):.0f},"
            f" max {max(units)}; connection lifetime median {statistics.median(secs):.3f} s"
        )
        print(f"  closed by the server: {sum(o.closed_by_server for o in outcomes)}")
    if flooder.returncode or flooder.stderr.strip():
        print(f"  flooder exit {flooder.returncode}: {flooder.stderr.strip()[-500:]}")
    wall = t_end - t_start
    cpu = after.cpu_s - before.cpu_s
    a_cpu = a_after.cpu_s - a_before.cpu_s
    flooder_cpu = (children_after.children_user + children_after.children_system) - (
        children_before.children_user + children_before.children_system
    )
    print()
    print(
        f"CPU during the flood: agent B {cpu:.1f} s ({cpu / wall:.2f} vCPU), agent A"
        f" {a_cpu:.1f} s, flooder {flooder_cpu:.1f} s (nice {args.nice}) in {wall:.1f} s;"
        f" load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"
    )
    print(
        f"waiting for a CPU while runnable: agent A {waits[0]:.1f} s, agent B {waits[1]:.1f} s,"
        f" the others' client threads {waits[2]:.1f} s in {wall:.1f} s"
    )
    print(f"agent B RSS {before.rss_kib / 1024:.0f} -> {peak_rss / 1024:.0f} MiB")
    return 0


# -- burst: memory that comes back ------------------------------------------------------------


def open_fds(pid: int) -> int:
    """Open fds of ``pid`` and its worker processes."""
    total = 0
    for member in common.process_tree(pid):
        with contextlib.suppress(OSError):
            total += len(os.listdir(f"/proc/{member}/fd"))
    return total


def tree_sample(pid: int) -> common.ProcSample:
    """B's RSS summed over its process tree (worker processes, ZTUNNEL_WORKER_THREADS)."""
    s = common.proc_sample(pid)
    return common.ProcSample(s.cpu_s, common.tree_rss_kib(pid), s.at)


def burst_main(args: argparse.Namespace) -> int:
    base = args.base or random_base()
    print(
        f"loopback mesh on {base}.x; {args.connections} HBONE connections x {args.streams}"
        f" streams to agent B ({args.workers} data-plane process(es)), {args.rounds} round(s);"
        f" load average {os.getloadavg()[0]:.1f}"
    )
    env = {"ZTUNNEL_WORKER_THREADS": str(args.workers)}
    env.update(item.split("=", 1) for item in args.agent_env)
    with loopback_pair(base, QUIET_LOG, extra_env=env) as (procs, workdir):
        pid = procs.agents["B"].pid
        time.sleep(1.0)
        base_sample, base_fds = tree_sample(pid), open_fds(pid)
        cpu_s = base_sample.cpu_s
        print(f"  baseline          RSS {base_sample.rss_kib / 1024:7.1f} MiB  fds {base_fds}")
        for r in range(args.rounds):
            round_start = cpu_s
            peak = run_burst(
                workdir / "ca", (f"{base}.2", 15008), f"{base}.2:{APP_PORT}", args, pid
            )
            print(f"  round {r + 1}: peak  RSS {peak[0] / 1024:7.1f} MiB  fds {peak[1]}")
            closed_at = time.monotonic()
            for wait in args.samples:
                time.sleep(max(0.0, closed_at + wait - time.monotonic()))
                s = tree_sample(pid)
                print(
                    f"    +{wait:3g} s after close RSS {s.rss_kib / 1024:7.1f} MiB"
                    f" (+{(s.rss_kib - base_sample.rss_kib) / 1024:.1f})  fds {open_fds(pid)}"
                )
            cpu_s = tree_sample(pid).cpu_s
            streams = args.connections * args.streams
            print(
                f"    B's CPU for the round (open, echo, close, reclaim):"
                f" {cpu_s - round_start:.2f} s, {(cpu_s - round_start) / streams * 1000:.2f} s"
                f" per 1000 streams (main process); load average {os.getloadavg()[0]:.1f}"
            )
            if args.memory_report:
                print_memory_report(workdir / "agent-B.log")
            if args.gdb_trim:
                for member in common.process_tree(pid):
                    gdb_malloc_trim(member)
                s = tree_sample(pid)
                print(
                    f"    after malloc_trim(0) by gdb RSS {s.rss_kib / 1024:7.1f} MiB"
                    f" (+{(s.rss_kib - base_sample.rss_kib) / 1024:.1f})"
                )
    return 0


def print_memory_report(log: Path) -> None:
    """Agent B's /debug/memory (top allocation sites when PYTHONTRACEMALLOC is set)."""
    import urllib.request

    admin = next(
        json.loads(line)["admin"]
        for line in log.read_text().splitlines()
        if line.startswith("{") and "agent ready" in line
    )
    with urllib.request.urlopen(f"http://{admin}/debug/memory", timeout=60) as resp:
        report = json.load(resp)
    print(
        f"    gc objects {report['gcObjects']},"
        f" traced {report.get('tracedBytes', 0) / 2**20:.1f} MiB"
    )
    if report.get("malloc"):
        m = {k: v / 2**20 for k, v in report["malloc"].items()}
        print(
            f"    glibc heap {m['heapBytes']:.1f} MiB: in use {m['inUseBytes']:.1f},"
            f" free {m['freeBytes']:.1f}; mmapped {m['mmappedBytes']:.1f} MiB"
        )
    types = ", ".join(f"{t['type']} {t['count']}" for t in report.get("topTypes", [])[:12])
    print(f"    most numerous: {types}")
    for site in report.get("topAllocations", [])[:15]:
        print(f"    {site['sizeBytes'] / 1024:9.0f} KiB {site['count']:7d}  {site['where']}")


def gdb_malloc_trim(pid: int) -> None:
    """What glibc would give back: call malloc_trim(0) inside the agent (a diagnosis)."""
    subprocess.run(
        ["gdb", "-p", str(pid), "-batch", "-ex", "call (int) malloc_trim(0)"],
        capture_output=True,
        check=False,
        timeout=60,
    )


def run_burst(
    ca_dir: Path, target: tuple[str, int], authority: str, args: argparse.Namespace, pid: int
) -> tuple[int, int]:
    """Open every connection and stream (1 KiB echo each), sample B while all are open,
    then close them all; returns B's (RSS KiB, fds) at that peak."""
    import trio

    from ztunnel.hbone.connection import HboneClientConnection
    from ztunnel.hbone.settings import HboneSettings
    from ztunnel.hbone.tlsstream import tls_handshake

    ctx = attacker_context(str(ca_dir))
    settings = HboneSettings(ping_interval=None)
    total = args.connections * args.streams
    state = {"echoed": 0}
    all_echoed, release = trio.Event(), trio.Event()
    handshakes = trio.CapacityLimiter(8)

    async def one(conn: HboneClientConnection) -> None:
        stream = await conn.open_stream(authority)
        await stream.send_all(common.MODE_ECHO + b"m" * 1024)
        got = 0
        while got < 1024:
            got += len(await stream.receive_some(65_536))
        state["echoed"] += 1
        if state["echoed"] == total:
            all_echoed.set()
        await release.wait()
        await stream.aclose()

    async def connection() -> None:
        async with handshakes:
            sock = socket.socket()
            sock.setblocking(False)
            try:
                await trio.socket.from_stdlib_socket(sock).connect(target)
            except BaseException:
                sock.close()
                raise
            tls = await tls_handshake(sock, ctx, server_side=False, timeout=60)
        conn = HboneClientConnection(tls, settings=settings)
        async with trio.open_nursery() as inner:
            await inner.start(conn.run)
            async with trio.open_nursery() as streams:
                for _ in range(args.streams):
                    streams.start_soon(one, conn)
            conn.close()

    peak: list[tuple[int, int]] = []

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            for _ in range(args.connections):
                nursery.start_soon(connection)
            with trio.fail_after(600):
                await all_echoed.wait()
            await trio.sleep(0.5)
            s = tree_sample(pid)
            peak.append((s.rss_kib, open_fds(pid)))
            release.set()

    trio.run(main)
    return peak[0]


# -- command line ---------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    f = sub.add_parser("flood", help="one hostile connection, others' latency")
    f.add_argument("--attack", choices=ATTACKS, default="rapid-reset")
    f.add_argument("--seconds", type=float, default=30.0)
    f.add_argument("--rate", type=float, default=20.0, help="others' requests per second")
    f.add_argument("--warmup", type=float, default=3.0, help="seconds measured before and after")
    f.add_argument("--connections", type=int, default=1, help="flooder connections at once")
    f.add_argument("--no-reconnect", action="store_true")
    f.add_argument("--max-units", type=int, help="stop each connection after this many units")
    f.add_argument(
        "--nice",
        type=int,
        default=0,
        help="run the flooder at this nice level: its own CPU then does not compete with"
        " the agents (on a real node the attacker's CPU is elsewhere)",
    )
    f.add_argument(
        "--workers",
        type=int,
        help="the agents' ZTUNNEL_WORKER_THREADS (default: unset, i.e. the CPU quota);"
        " CPU, RSS and CPU waits are summed over each agent's processes",
    )
    f.add_argument("--base")
    b = sub.add_parser("burst", help="many connections and streams, then RSS after close")
    b.add_argument("--connections", type=int, default=500)
    b.add_argument("--streams", type=int, default=10)
    b.add_argument("--rounds", type=int, default=1)
    b.add_argument(
        "--workers",
        type=int,
        default=1,
        help="agent B's ZTUNNEL_WORKER_THREADS (RSS and fds are summed over its processes)",
    )
    b.add_argument(
        "--agent-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="extra environment of the agents, e.g. PYTHONMALLOC=malloc (repeatable)",
    )
    b.add_argument(
        "--samples",
        type=lambda v: [float(x) for x in v.split(",")],
        default=[1.0, 5.0, 10.0],
        help="seconds after the close at which B is sampled (default 1,5,10)",
    )
    b.add_argument(
        "--gdb-trim",
        action="store_true",
        help="diagnosis: after the samples, call malloc_trim(0) in agent B with gdb",
    )
    b.add_argument(
        "--memory-report",
        action="store_true",
        help="diagnosis: print agent B's /debug/memory after the samples (run with"
        " PYTHONTRACEMALLOC=1 for the top allocation sites)",
    )
    b.add_argument("--base")
    fl = sub.add_parser("flooder", help="(internal) the attacking process")
    fl.add_argument("--ca", required=True)
    fl.add_argument("--target", required=True)
    fl.add_argument("--attack", choices=ATTACKS, required=True)
    fl.add_argument("--seconds", type=float, required=True)
    fl.add_argument("--authority", required=True)
    fl.add_argument("--connections", type=int, default=1)
    fl.add_argument("--no-reconnect", action="store_true")
    fl.add_argument("--max-units", type=int)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.command == "flooder":
        return flooder_main(args)
    if args.command == "burst":
        return burst_main(args)
    return flood_main(args)


if __name__ == "__main__":
    sys.exit(main())
