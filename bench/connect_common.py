"""Pod-side connection-setup client of ``bench/redirect_modes.py``.

``python bench/connect_common.py --to IP:PORT --count N [--size 1024] [--gap-ms 2]`` opens N
connections one after the other to an echo server (``bench/cluster_common.py serve``), and
for each measures

* ``connect``: connect() until it returns. Through the mesh this is the capture alone (the
  local agent accepts; nothing has crossed the network yet).
* ``first``: connect() until the first 1 KiB echoed back: the whole setup (through the mesh:
  capture, the HBONE stream over the pooled mTLS connection, the destination agent's
  authorization and its connection to the app) plus one round trip.

then closes (the client closes first, so TIME_WAIT stays with the client). Prints one JSON
line with p50/p90/p99 in µs. Standard library only: it starts fast in every pod.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import time
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common


def one(host: str, port: int, payload: bytes) -> tuple[float, float]:
    t0 = time.perf_counter()
    with socket.create_connection((host, port), timeout=10) as sock:
        t1 = time.perf_counter()
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(payload)
        common.recv_exact(sock, len(payload))
        t2 = time.perf_counter()
    return t1 - t0, t2 - t0


def run(host: str, port: int, count: int, size: int, gap: float) -> dict[str, object]:
    payload = b"x" * size
    connect: list[float] = []
    first: list[float] = []
    for _ in range(count):
        c, f = one(host, port, payload)
        connect.append(c * 1e6)
        first.append(f * 1e6)
        time.sleep(gap)
    connect.sort()
    first.sort()
    out: dict[str, object] = {"ok": True, "count": count}
    for name, values in (("connect", connect), ("first", first)):
        for q in (50, 90, 99):
            out[f"{name}_p{q}_us"] = common.percentile(values, q)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python bench/connect_common.py")
    parser.add_argument("--to", required=True, help="IP:PORT of the echo server")
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--gap-ms", type=float, default=2.0)
    args = parser.parse_args(argv)
    host, _, port = args.to.rpartition(":")
    common.tighten_timer_slack()
    try:
        result = run(host, int(port), args.count, args.size, args.gap_ms / 1000)
    except OSError as exc:
        result = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
    print(json.dumps(result), flush=True)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
