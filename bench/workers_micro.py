"""What keeping the books whole across worker processes costs, per connection.

Run: ``.venv/bin/python bench/workers_micro.py [--conns 20000]`` (a few seconds).

Three ways to account one proxied connection (open, 64 byte-count updates, close), in
one process and on one core, so the figures compare CPU per connection:

* ``one process``: the agent's ``ConnectionTracker`` (metrics, access log, history), as
  with ZTUNNEL_WORKER_THREADS=1;
* ``worker side``: a worker's ``RelayTracker`` plus pickling its batches (what a worker
  spends instead);
* ``control side``: unpickling the batches and replaying them into a ``ConnectionTracker``
  through ``TelemetryMirror`` (what the control process spends for every worker).

Access logs go to a null stream at the level ``ztunnel run`` uses by default (info: one
"connection complete" line per connection).
"""

from __future__ import annotations

import argparse
import io
import pickle
import sys
import time
from ipaddress import ip_address
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ztunnel.model.address import SocketAddr
from ztunnel.model.identity import Identity
from ztunnel.model.workload import TunnelProtocol, Workload
from ztunnel.telemetry.connections import ConnectionInfo, ConnectionTracker
from ztunnel.telemetry.logging import configure_logging
from ztunnel.telemetry.metrics import Metrics
from ztunnel.workers.protocol import Telemetry
from ztunnel.workers.telemetry import RelayTracker, TelemetryMirror

UPDATES = 64
BATCH = 100  # connections per telemetry batch (one per 20 ms at 5,000 connections/s)


def _workload(name: str, ip: str) -> Workload:
    return Workload(
        uid=f"Kubernetes//Pod/default/{name}",
        name=name,
        namespace="default",
        service_account=name,
        workload_ips=(ip_address(ip),),
        protocol=TunnelProtocol.HBONE,
    )


INFO = ConnectionInfo(
    direction="inbound",
    reporter="destination",
    src_addr=SocketAddr(ip_address("10.0.0.1"), 40000),
    dst_addr=SocketAddr(ip_address("10.0.0.2"), 8080),
    src_workload=_workload("client", "10.0.0.1"),
    dst_workload=_workload("server", "10.0.0.2"),
    src_identity=Identity("cluster.local", "default", "client"),
    security_policy="mutual_tls",
    proxy_uid="default/server",
)


def one_process(n: int) -> float:
    tracker = ConnectionTracker(Metrics(process_metrics=False))
    start = time.process_time()
    for _ in range(n):
        conn = tracker.open(INFO)
        for _ in range(UPDATES):
            conn.add_sent(1024)
        conn.close()
    return time.process_time() - start


def worker_side(n: int) -> tuple[float, list[bytes]]:
    frames: list[bytes] = []
    relay = RelayTracker(lambda batch: frames.append(pickle.dumps(batch, protocol=5)))
    start = time.process_time()
    for i in range(n):
        conn = relay.open(INFO)
        for _ in range(UPDATES):
            conn.add_sent(1024)
        conn.close()
        if i % BATCH == BATCH - 1:
            relay.flush()
    relay.flush()
    return time.process_time() - start, frames


def control_side(frames: list[bytes]) -> float:
    mirror = TelemetryMirror(ConnectionTracker(Metrics(process_metrics=False)))
    start = time.process_time()
    for frame in frames:
        batch = pickle.loads(frame)
        assert isinstance(batch, Telemetry)
        mirror.apply(1, batch)
    return time.process_time() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--conns", type=int, default=20_000)
    args = parser.parse_args()
    configure_logging("info", "json", stream=io.StringIO())
    n = args.conns
    single = one_process(n)
    worker, frames = worker_side(n)
    control = control_side(frames)
    size = sum(len(f) for f in frames) / n
    print(f"{n} connections, {UPDATES} byte-count updates each, batches of {BATCH}")
    for name, seconds in (
        ("one process (ConnectionTracker)", single),
        ("worker side (RelayTracker + pickle)", worker),
        ("control side (unpickle + TelemetryMirror)", control),
    ):
        print(f"  {name:42} {seconds / n * 1e6:7.1f} us CPU per connection")
    print(f"  {'telemetry on the channel':42} {size:7.0f} bytes per connection")
    return 0


if __name__ == "__main__":
    sys.exit(main())
