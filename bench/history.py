"""What the admin UI's connection history costs: time per ended connection, memory when full.

Run: ``.venv/bin/python bench/history.py`` (a few seconds). Prints the tracker's open+close
cost with the history and with a no-op in its place (access logging on, to a discarded
stream, as in production), the traced memory of a full history of typical entries, and of
one whose entries carry an over-long error (cut at MAX_FIELD_CHARS), and the time to build
``/api/graph`` from a full history.
"""

from __future__ import annotations

import gc
import io
import time
import tracemalloc
from ipaddress import ip_address

from ztunnel.admin.ui_graph import build_graph
from ztunnel.model.address import SocketAddr
from ztunnel.model.outcome import Failure, FailureKind
from ztunnel.model.workload import TunnelProtocol, Workload
from ztunnel.sources.dump import workload_to_dump
from ztunnel.telemetry import logging as zlog
from ztunnel.telemetry.connections import ConnectionInfo, ConnectionTracker
from ztunnel.telemetry.history import ConnectionHistory
from ztunnel.telemetry.metrics import Metrics


def _workload(name: str, ip: str) -> Workload:
    return Workload(
        uid=f"c//Pod/demo/{name}",
        name=name,
        namespace="demo",
        workload_ips=(ip_address(ip),),
        service_account=name,
        protocol=TunnelProtocol.HBONE,
    )


SRC, DST = _workload("client", "10.244.1.2"), _workload("echo", "10.244.1.3")


def _info(port: int) -> ConnectionInfo:
    return ConnectionInfo(
        direction="inbound",
        reporter="destination",
        src_addr=SocketAddr.of("10.244.1.2", port),
        dst_addr=SocketAddr.of("10.244.1.3", 8080),
        hbone_addr=SocketAddr.of("10.244.1.3", 8080),
        src_workload=SRC,
        dst_workload=DST,
        src_identity=SRC.identity,
        dst_identity=DST.identity,
        security_policy="mutual_tls",
        proxy_uid=DST.uid,
    )


class _Discard(io.TextIOBase):
    """A log stream that keeps nothing (a StringIO would count the log lines as memory)."""

    def write(self, s: str) -> int:
        return len(s)


class _NoHistory(ConnectionHistory):
    def closed(self, *args: object) -> None:
        pass


def _round_us(tracker: ConnectionTracker, n: int) -> float:
    info = _info(40000)
    start = time.perf_counter()
    for _ in range(n):
        tracker.open(info).close()
    return (time.perf_counter() - start) / n * 1e6


def per_close_us(rounds: int = 7, n: int = 10_000) -> tuple[float, float]:
    """(with, without) the history: best of alternating rounds, so load hits both alike."""
    with_h = ConnectionTracker(Metrics(), history=ConnectionHistory())
    without = ConnectionTracker(Metrics(), history=_NoHistory())
    best = [float("inf"), float("inf")]
    for _ in range(rounds):
        best[0] = min(best[0], _round_us(with_h, n))
        best[1] = min(best[1], _round_us(without, n))
    return best[0], best[1]


def full_history_bytes(error: str | None) -> int:
    gc.collect()
    tracemalloc.start()
    history = ConnectionHistory()
    tracker = ConnectionTracker(Metrics(), history=history)
    base = tracemalloc.get_traced_memory()[0]
    for i in range(history.capacity * 2):
        tracker.open(_info(i)).close(Failure(FailureKind.DENIED, error) if error else None)
    gc.collect()
    used = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    return used


def graph_ms() -> float:
    history = ConnectionHistory()
    tracker = ConnectionTracker(Metrics(), history=history)
    for i in range(history.capacity):
        tracker.open(_info(i)).close()
    dump = {"workloads": [workload_to_dump(SRC), workload_to_dump(DST)]}
    start = time.perf_counter()
    build_graph(dump, [], history, history.stats())
    return (time.perf_counter() - start) * 1e3


def main() -> None:
    zlog.configure_logging("info", "json", _Discard())
    with_history, without = per_close_us()
    print(f"tracker open+close: {with_history:.1f} us with the history, {without:.1f} us without")
    typical = full_history_bytes(None)
    print(
        f"full history (1000 entries), typical: {typical / 1e6:.2f} MB ({typical // 1000} B each)"
    )
    long = full_history_bytes("x" * 100_000)
    print(
        f"full history, 100 kB error per entry (cut): {long / 1e6:.2f} MB ({long // 1000} B each)"
    )
    print(f"/api/graph from a full history: {graph_ms():.1f} ms")


if __name__ == "__main__":
    main()
