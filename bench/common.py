"""Shared helpers for the benchmarks: a blocking sink/echo app, SOCKS5 by hand, /proc readings.

The app runs as its own process (``python bench/common.py serve HOST PORT``) so its CPU
never competes with the load generator's GIL. It speaks a one-byte preamble:

* ``S`` (sink): count every byte until the client half-closes, answer the count in
  decimal ASCII, close. Used for one-way throughput.
* ``E`` (echo): echo everything until EOF. Used for 1 KiB request/response.

Blocking sockets and one thread per connection: the lowest-overhead Python server, so
the figures measure the path, not the app.

Standard library only: ``bench/cluster_common.py`` imports it inside every pod.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import select
import signal
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import FrameType

MODE_SINK = b"S"
MODE_ECHO = b"E"
_BUF = 256 * 1024
_PR_SET_TIMERSLACK = 29
_IP_BIND_ADDRESS_NO_PORT = 24  # linux/in.h; not exported by Python 3.11's socket


# -- the app -------------------------------------------------------------------------


def serve(host: str, port: int, *, preamble: bool = True, ready: str | None = None) -> None:
    """Accept forever; one thread per connection (daemon, so SIGTERM ends everything).

    ``preamble=False`` skips the mode byte: every connection is a plain echo. ``ready`` is
    the line printed once listening (default ``listening HOST:PORT``)."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((host, port))
    listener.listen(4096)
    print(ready or f"listening {host}:{port}", flush=True)
    handle = _handle if preamble else _echo
    while True:
        conn, _ = listener.accept()
        threading.Thread(target=_serve_conn, args=(conn, handle), daemon=True).start()


def _serve_conn(conn: socket.socket, handle: Callable[[socket.socket, bytearray], None]) -> None:
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        handle(conn, bytearray(_BUF))
    except OSError:
        pass
    finally:
        conn.close()


def _handle(conn: socket.socket, buf: bytearray) -> None:
    mode = conn.recv(1)
    if mode == MODE_SINK:
        total = 0
        while n := conn.recv_into(buf):
            total += n
        conn.sendall(str(total).encode())
    elif mode == MODE_ECHO:
        _echo(conn, buf)


def _echo(conn: socket.socket, buf: bytearray) -> None:
    view = memoryview(buf)
    while n := conn.recv_into(buf):
        conn.sendall(view[:n])


# -- client side -----------------------------------------------------------------------


def connect_direct(dst: tuple[str, int], src_ip: str | None = None) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if src_ip:
            # Pick the port at connect() by 4-tuple: a plain bind(ip, 0) needs a port no
            # TIME_WAIT socket holds, which slows down thousands of connects per second.
            sock.setsockopt(socket.IPPROTO_IP, _IP_BIND_ADDRESS_NO_PORT, 1)
            sock.bind((src_ip, 0))
        sock.connect(dst)
    except BaseException:
        sock.close()
        raise
    return sock


def connect_socks5(
    proxy: tuple[str, int], dst: tuple[str, int], src_ip: str | None = None
) -> socket.socket:
    """CONNECT to an IPv4 ``dst`` through a no-auth SOCKS5 proxy (RFC 1928), blocking."""
    sock = connect_direct(proxy, src_ip)
    try:
        sock.sendall(b"\x05\x01\x00")
        if recv_exact(sock, 2) != b"\x05\x00":
            raise ConnectionError("SOCKS5 proxy refused the no-auth method")
        request = b"\x05\x01\x00\x01" + socket.inet_aton(dst[0]) + struct.pack("!H", dst[1])
        sock.sendall(request)
        reply = recv_exact(sock, 10)  # IPv4 bound address in the reply
        if reply[1] != 0:
            raise ConnectionError(f"SOCKS5 CONNECT refused with reply code {reply[1]}")
    except BaseException:
        sock.close()
        raise
    return sock


def recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError(f"peer closed after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


def wait_readable(sock: socket.socket, timeout: float) -> bool:
    return bool(select.select([sock], [], [], max(timeout, 0.0))[0])


def tighten_timer_slack() -> None:
    """Sleep precision: the default 50 us timer slack would inflate paced latencies."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_TIMERSLACK, 1, 0, 0, 0)


# -- paced request/response ------------------------------------------------------------


@dataclass(frozen=True)
class PacedRun:
    latencies: list[float]  # seconds from each request's due time, sorted
    sent: int
    lost: int  # requests due in the run whose response never came
    achieved_per_s: float


def paced_rr(
    sock: socket.socket, rate: float, seconds: float, size: int, warm: int = 1
) -> PacedRun:
    """Open loop on one keep-alive echo connection: request i is due at t0 + i/rate and its
    latency runs from that due time (not the actual send), so a stall is charged to
    every request it delays (no coordinated omission). One thread, select() timing.

    ``warm`` echoes first (certs, HBONE pool, stream) are not measured."""
    n = max(1, int(rate * seconds))
    payload = b"\x42" * size
    for _ in range(warm):
        sock.sendall(payload)
        recv_exact(sock, size)
    sock.settimeout(None)  # the measured phase waits in select(), never on a timeout
    t0 = time.perf_counter() + 0.01
    due = [t0 + i / rate for i in range(n)]
    latencies: list[float] = []
    sent = pending = 0
    deadline = due[-1] + 10
    while len(latencies) < n and time.perf_counter() < deadline:
        now = time.perf_counter()
        while sent < n and due[sent] <= now:
            sock.sendall(payload)
            sent += 1
        wait = (due[sent] - now) if sent < n else (deadline - now)
        if wait_readable(sock, wait):
            data = sock.recv(65536)
            if not data:
                raise ConnectionError("server closed the connection")
            pending += len(data)
            now = time.perf_counter()
            while pending >= size:
                pending -= size
                latencies.append(now - due[len(latencies)])
    end = time.perf_counter()
    latencies.sort()
    return PacedRun(latencies, sent, n - len(latencies), len(latencies) / (end - t0))


# -- figures ---------------------------------------------------------------------------


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of an already sorted sequence (q in 0..100)."""
    if not sorted_values:
        return float("nan")
    rank = max(1, round(q / 100 * len(sorted_values) + 0.5 - 1e-9))
    return sorted_values[min(rank, len(sorted_values)) - 1]


@dataclass(frozen=True)
class ProcSample:
    cpu_s: float  # user + system CPU seconds since the process started
    rss_kib: int
    at: float  # time.monotonic() of the sample


_TICK = os.sysconf("SC_CLK_TCK")


def cpu_parts(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of a process (all its threads) since it started."""
    with open(f"/proc/{pid}/stat") as f:
        # comm may contain spaces and parens; the fields after the last ')' are fixed
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) / _TICK, int(fields[12]) / _TICK


def process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants (an agent's worker processes, ZTUNNEL_WORKER_THREADS)."""
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        with contextlib.suppress(OSError):
            for task in os.listdir(f"/proc/{current}/task"):
                with open(f"/proc/{current}/task/{task}/children") as f:
                    todo += [int(child) for child in f.read().split()]
    return found


def tree_cpu_parts(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of ``pid`` and its live descendants."""
    user = system = 0.0
    for member in process_tree(pid):
        with contextlib.suppress(OSError):
            u, s = cpu_parts(member)
            user, system = user + u, system + s
    return user, system


def tree_rss_kib(pid: int) -> int:
    """VmRSS of ``pid`` and its live descendants, summed (shared pages counted per process)."""
    total = 0
    for member in process_tree(pid):
        with contextlib.suppress(OSError):
            total += proc_sample(member).rss_kib
    return total


def cpu_seconds(pid: int) -> float:
    """user + system CPU seconds of a process (all its threads) since it started."""
    return sum(cpu_parts(pid))


def proc_sample(pid: int) -> ProcSample:
    cpu = cpu_seconds(pid)
    rss = 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1])
    return ProcSample(cpu, rss, time.monotonic())


def cpu_between(a: ProcSample, b: ProcSample) -> float:
    return b.cpu_s - a.cpu_s


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main(argv: Sequence[str]) -> int:
    if len(argv) == 3 and argv[0] == "serve":
        try:
            serve(argv[1], int(argv[2]))
        except KeyboardInterrupt:
            return 0
        return 0
    print("usage: python bench/common.py serve HOST PORT", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def run_interruptible(run: Callable[[], int]) -> int:
    """Run a benchmark that builds namespaces: SIGTERM acts like Ctrl-C, so its context
    managers tear everything down; exit 130 when interrupted."""
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        return run()
    except KeyboardInterrupt:
        print("\ninterrupted; torn down", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
