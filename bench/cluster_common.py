"""Pod-side programs of the cluster benchmark.

Run inside a pod netns (``bench/cluster.py`` does this with nsenter):

* ``python bench/cluster_common.py serve --port P``: blocking TCP echo, one thread per
  connection, TCP_NODELAY. Blocking sockets are the cheapest Python server, so the latency
  figures measure the path, not the app.
* ``python bench/cluster_common.py client --to IP:PORT --rate R --seconds S [--size N]``:
  open-loop paced request/response on ONE keep-alive connection. Request i is due at
  t0 + i/R and its latency runs from that due time, not from the actual send, so a stall is
  charged to every request it delays (no coordinated omission). Prints one JSON line.

Both are thin wrappers over ``bench/common.py`` (the loopback benchmark uses the same echo
server and paced loop). Standard library only: it must start fast in every pod and never
import the agent.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import socket
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common


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


def paced(host: str, port: int, rate: float, seconds: float, size: int) -> RRResult:
    common.tighten_timer_slack()
    with socket.create_connection((host, port), timeout=10) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        run = common.paced_rr(sock, rate, seconds, size, warm=3)
    us = [x * 1e6 for x in run.latencies]
    done, n = len(us), len(us) + run.lost
    return RRResult(
        ok=run.lost == 0,
        p50_us=common.percentile(us, 50),
        p90_us=common.percentile(us, 90),
        p99_us=common.percentile(us, 99),
        max_us=us[-1] if us else float("nan"),
        done=done,
        lost=run.lost,
        achieved_per_s=run.achieved_per_s,
        error=None if run.lost == 0 else f"{run.lost} of {n} responses missing",
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
            ready = json.dumps({"listening": args.port})
            common.serve("0.0.0.0", args.port, preamble=False, ready=ready)
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
