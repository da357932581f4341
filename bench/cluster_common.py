"""Pod-side programs of the cluster benchmark, plus the small figures helpers it shares.

Run inside a pod netns (``bench/cluster.py`` does this with nsenter):

* ``python bench/cluster_common.py serve --port P``: blocking TCP echo, one thread per
  connection, TCP_NODELAY. Blocking sockets are the cheapest Python server, so the latency
  figures measure the path, not the app.
* ``python bench/cluster_common.py client --to IP:PORT --rate R --seconds S [--size N]``:
  open-loop paced request/response on ONE keep-alive connection. Request i is due at
  t0 + i/R and its latency runs from that due time, not from the actual send, so a stall is
  charged to every request it delays (no coordinated omission). Prints one JSON line.

Standard library only: it must start fast in every pod and never import the agent.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import select
import socket
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

_BUF = 256 * 1024
_PR_SET_TIMERSLACK = 29
_TICK = os.sysconf("SC_CLK_TCK")


# -- figures ---------------------------------------------------------------------------


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of an already sorted sequence (q in 0..100)."""
    if not sorted_values:
        return float("nan")
    rank = max(1, round(q / 100 * len(sorted_values) + 0.5 - 1e-9))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def cpu_seconds(pid: int) -> float:
    """user + system CPU seconds of a process (all its threads) since it started."""
    with open(f"/proc/{pid}/stat") as f:
        # comm may contain spaces and parens; the fields after the last ')' are fixed
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


# -- echo server -----------------------------------------------------------------------


def serve(port: int, host: str = "0.0.0.0") -> None:
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((host, port))
    listener.listen(128)
    print(json.dumps({"listening": port}), flush=True)
    while True:
        conn, _ = listener.accept()
        threading.Thread(target=_echo, args=(conn,), daemon=True).start()


def _echo(conn: socket.socket) -> None:
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buf = bytearray(_BUF)
    view = memoryview(buf)
    try:
        while n := conn.recv_into(buf):
            conn.sendall(view[:n])
    except OSError:
        pass
    finally:
        conn.close()


# -- paced client ----------------------------------------------------------------------


@dataclass
class RRResult:
    ok: bool
    p50_us: float = 0.0
    p90_us: float = 0.0
    p99_us: float = 0.0
    max_us: float = 0.0
    done: int = 0
    lost: int = 0
    achieved_per_s: float = 0.0
    error: str | None = None


def _tighten_timer_slack() -> None:
    """The default 50 us timer slack would show up in paced latencies."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_TIMERSLACK, 1, 0, 0, 0)


def _recv_exact(sock: socket.socket, n: int) -> None:
    got = 0
    while got < n:
        chunk = sock.recv(n - got)
        if not chunk:
            raise ConnectionError(f"peer closed after {got} of {n} bytes")
        got += len(chunk)


def paced(host: str, port: int, rate: float, seconds: float, size: int) -> RRResult:
    n = max(1, int(rate * seconds))
    payload = b"\x42" * size
    _tighten_timer_slack()
    with socket.create_connection((host, port), timeout=10) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for _ in range(3):  # warm the path (certs, HBONE pool, stream), not measured
            sock.sendall(payload)
            _recv_exact(sock, size)
        sock.settimeout(None)
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
            if select.select([sock], [], [], max(wait, 0.0))[0]:
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
    us = [x * 1e6 for x in latencies]
    return RRResult(
        ok=len(latencies) == n,
        p50_us=percentile(us, 50),
        p90_us=percentile(us, 90),
        p99_us=percentile(us, 99),
        max_us=us[-1] if us else float("nan"),
        done=len(latencies),
        lost=n - len(latencies),
        achieved_per_s=len(latencies) / (end - t0),
        error=None if len(latencies) == n else f"{n - len(latencies)} of {n} responses missing",
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python bench/cluster_common.py")
    sub = parser.add_subparsers(dest="cmd", required=True)
    sp = sub.add_parser("serve")
    sp.add_argument("--port", type=int, required=True)
    sp = sub.add_parser("client")
    sp.add_argument("--to", required=True, help="IP:PORT of the echo server")
    sp.add_argument("--rate", type=float, default=500.0)
    sp.add_argument("--seconds", type=float, default=5.0)
    sp.add_argument("--size", type=int, default=1024)
    args = parser.parse_args(argv)
    if args.cmd == "serve":
        with contextlib.suppress(KeyboardInterrupt):
            serve(args.port)
        return 0
    host, _, port = args.to.rpartition(":")
    try:
        result = paced(host, int(port), args.rate, args.seconds, args.size)
    except OSError as exc:
        result = RRResult(ok=False, error=f"{type(exc).__name__}: {exc}")
    print(json.dumps(asdict(result)), flush=True)
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
