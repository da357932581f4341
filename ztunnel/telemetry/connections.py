"""The connection registry the proxies report to: metrics, access logs, config dump.

A proxy calls ``tracker.open(info)`` once it knows where a connection goes,
feeds ``add_sent``/``add_received`` as bytes move (counted live, as ztunnel
does, so long connections show up in scrapes), and ``close(...)`` at the end.
Opened and byte counters carry ``response_flags="-"``; closed and failed carry
the flag of the ``Failure`` the connection ended with (ztunnel records the flag
at close). Addresses arrive as ``SocketAddr`` / ``Authority`` values and are
formatted here, at the edge, for the logs, the metrics and the config dump.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from prometheus_client import Counter, Gauge

from ztunnel.model.address import Authority, SocketAddr
from ztunnel.model.identity import Identity
from ztunnel.model.outcome import Failure, ResponseFlag
from ztunnel.model.workload import Service, Workload
from ztunnel.telemetry.history import ConnectionHistory
from ztunnel.telemetry.logging import ACCESS_LOGGER, Bare, get_logger, level_check
from ztunnel.telemetry.metrics import FAILURE_FLAGS, TRAFFIC_LABELS, UNKNOWN, Metrics

Direction = Literal["inbound", "outbound"]
Reporter = Literal["source", "destination"]
SecurityPolicy = Literal["mutual_tls", "unknown"]

_FLAGS_INDEX = TRAFFIC_LABELS.index("response_flags")


class AccessLogger(Protocol):
    """What the tracker needs from a logger (a structlog BoundLogger fits)."""

    def debug(self, event: str | None = None, *args: Any, **kw: Any) -> Any: ...
    def info(self, event: str | None = None, *args: Any, **kw: Any) -> Any: ...
    def warning(self, event: str | None = None, *args: Any, **kw: Any) -> Any: ...
    def error(self, event: str | None = None, *args: Any, **kw: Any) -> Any: ...


@dataclass(frozen=True, slots=True)
class ConnectionInfo:
    """Everything known about a proxied connection when it is opened.

    ``dst_addr`` is the actual TCP destination (``podIP:15008`` for HBONE);
    ``hbone_addr`` the CONNECT authority / original target, if tunnelled.
    ``src_identity`` must be a *verified* identity (it becomes source_principal).
    """

    direction: Direction
    reporter: Reporter
    src_addr: SocketAddr
    dst_addr: SocketAddr
    hbone_addr: Authority | None = None
    src_workload: Workload | None = None
    dst_workload: Workload | None = None
    dst_service: Service | None = None
    src_identity: Identity | None = None
    dst_identity: Identity | None = None
    security_policy: SecurityPolicy = "unknown"
    proxy_uid: str = ""


def _or_unknown(value: object) -> str:
    text = "" if value is None else str(value)
    return text or UNKNOWN


def _canonical(w: Workload) -> tuple[str, str]:
    return w.canonical_name or w.workload_name or w.name, w.canonical_revision


def traffic_labels(
    info: ConnectionInfo, response_flags: ResponseFlag = ResponseFlag.NONE
) -> tuple[str, ...]:
    """CommonTrafficLabels values, in ``TRAFFIC_LABELS`` order (reference §6.3)."""
    src, dst, svc = info.src_workload, info.dst_workload, info.dst_service
    src_canon, src_rev = _canonical(src) if src else ("", "")
    dst_canon, dst_rev = _canonical(dst) if dst else ("", "")
    dst_identity = info.dst_identity or (dst.identity if dst else None)
    values = (
        info.reporter,
        (src.workload_name or src.name) if src else "",
        src_canon,
        src_rev,
        src.namespace if src else "",
        info.src_identity,  # only the verified identity, never guessed from the workload
        src_canon,
        src_rev,
        src.cluster_id if src else "",
        svc.hostname if svc else "",
        svc.namespace if svc else "",
        svc.name if svc else "",
        (dst.workload_name or dst.name) if dst else "",
        dst_canon,
        dst_rev,
        dst.namespace if dst else "",
        dst_identity,
        dst_canon,
        dst_rev,
        dst.cluster_id if dst else "",
        "tcp",
        response_flags.value,
        info.security_policy,
        src.locality.region if src else "",
        src.locality.zone if src else "",
        dst.locality.region if dst else "",
        dst.locality.zone if dst else "",
    )
    return tuple(_or_unknown(v) for v in values)


# Label sets cached per (source, destination) pair before the cache starts over (a bound on
# memory when workloads churn without the store's generation being known).
MAX_PAIRS = 4096


class _Pair:
    """What every connection between one source and one destination shares: the label
    tuple and its metric children, resolved once. The workloads and service they were
    built from are kept to check a hit against (a stale copy never gets new labels)."""

    __slots__ = ("dst", "labels", "opened", "received", "sent", "src", "svc")

    def __init__(self, tracker: ConnectionTracker, info: ConnectionInfo) -> None:
        self.src, self.dst, self.svc = info.src_workload, info.dst_workload, info.dst_service
        labels = traffic_labels(info)
        # Pairs with the same labels (e.g. several service keys) share one tuple.
        self.labels = labels = tracker._labels.setdefault(labels, labels)
        m = tracker.metrics
        self.opened = tracker._counter(m.connections_opened, labels)
        self.sent = tracker._counter(m.sent_bytes, labels)
        self.received = tracker._counter(m.received_bytes, labels)

    def serves(self, info: ConnectionInfo) -> bool:
        # Equal workloads give equal labels; ``is`` makes the common case one comparison.
        return (
            (self.src is info.src_workload or self.src == info.src_workload)
            and (self.dst is info.dst_workload or self.dst == info.dst_workload)
            and (self.svc is info.dst_service or self.svc == info.dst_service)
        )


def _pair_key(info: ConnectionInfo) -> tuple[object, ...]:
    """Everything ``traffic_labels`` reads except the workloads' and service's contents
    (``_Pair.serves`` checks those): identities by value, so a new identity is a new key."""
    src, dst, svc = info.src_workload, info.dst_workload, info.dst_service
    return (
        info.reporter,
        info.security_policy,
        info.src_identity,
        info.dst_identity,
        src.uid if src is not None else None,
        dst.uid if dst is not None else None,
        svc.key if svc is not None else None,
    )


class TrackedConnection:
    """One open connection: live byte counters, totals, and an idempotent close."""

    # One per open connection (10,000s held open): no per-instance __dict__.
    __slots__ = (
        "_labels",
        "_received",
        "_sent",
        "_start",
        "_tracker",
        "bytes_received",
        "bytes_sent",
        "cancel",
        "closed",
        "info",
        "started_at",
    )

    def __init__(self, tracker: ConnectionTracker, info: ConnectionInfo, pair: _Pair):
        self.info = info
        self.bytes_sent = 0
        self.bytes_received = 0
        self.started_at = time.time()
        self.closed = False
        # Set by the proxy so a policy watcher can tear the connection down.
        self.cancel: Callable[[], None] | None = None
        self._tracker = tracker
        self._labels = pair.labels
        self._start = tracker.clock()
        # Resolved once per pair: add_sent/add_received are on the data path.
        self._sent = pair.sent
        self._received = pair.received

    def add_sent(self, n: int) -> None:
        """Bytes written towards the destination (app -> remote for outbound)."""
        self.bytes_sent += n
        self._sent.inc(n)

    def add_received(self, n: int) -> None:
        """Bytes read back from the destination."""
        self.bytes_received += n
        self._received.inc(n)

    def duration(self) -> float:
        return self._tracker.clock() - self._start

    def backdate(self, start: float, started_at: float) -> None:
        """Start the clock at ``start`` (the tracker's clock; ``started_at``: wall clock): the
        connection was opened earlier elsewhere (a worker process) and reported now."""
        self._start = start
        self.started_at = started_at

    def close(self, failure: Failure | None = None) -> None:
        """Record the end of the connection (``None``: it completed); later calls do nothing."""
        if self.closed:
            return
        self.closed = True
        self._tracker.ended += 1
        self._tracker._closed(self, failure)

    def labels(self, response_flags: ResponseFlag = ResponseFlag.NONE) -> tuple[str, ...]:
        if response_flags is ResponseFlag.NONE:
            return self._labels
        i = _FLAGS_INDEX
        return (*self._labels[:i], response_flags.value, *self._labels[i + 1 :])

    def log_fields(self) -> dict[str, object]:
        """ztunnel's access-log fields for this connection (absent ones are None)."""
        i = self.info
        src, dst = i.src_workload, i.dst_workload
        return {
            "src.addr": Bare(str(i.src_addr)),
            "src.workload": src.name if src else None,
            "src.namespace": src.namespace if src else None,
            "src.identity": str(i.src_identity) if i.src_identity else None,
            "dst.addr": Bare(str(i.dst_addr)),
            "dst.hbone_addr": Bare(str(i.hbone_addr)) if i.hbone_addr else None,
            "dst.service": i.dst_service.hostname if i.dst_service else None,
            "dst.workload": dst.name if dst else None,
            "dst.namespace": dst.namespace if dst else None,
            "dst.identity": str(i.dst_identity) if i.dst_identity else None,
            "direction": i.direction,
        }

    def dump(self) -> dict[str, object]:
        """The connection as the config dump shows it (camelCase)."""
        i = self.info
        return {
            "direction": i.direction,
            "reporter": i.reporter,
            "src": str(i.src_addr),
            "originalDst": str(i.hbone_addr or i.dst_addr),
            "actualDst": str(i.dst_addr),
            "protocol": "HBONE" if i.security_policy == "mutual_tls" else "TCP",
            "srcWorkload": i.src_workload.uid if i.src_workload else None,
            "dstWorkload": i.dst_workload.uid if i.dst_workload else None,
            "dstService": i.dst_service.hostname if i.dst_service else None,
            "srcIdentity": str(i.src_identity) if i.src_identity else None,
            "dstIdentity": str(i.dst_identity) if i.dst_identity else None,
            "securityPolicy": i.security_policy,
            "proxyUid": i.proxy_uid,
            "bytesSent": self.bytes_sent,
            "bytesRecv": self.bytes_received,
            "durationSeconds": round(self.duration(), 3),
        }


class ConnectionTracker:
    """Registry of open connections; the single place connection telemetry is emitted."""

    def __init__(
        self,
        metrics: Metrics,
        logger: AccessLogger | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        history: ConnectionHistory | None = None,
        generation: Callable[[], int] | None = None,
    ) -> None:
        """``generation``: the state store's version; the per-pair label cache starts
        over whenever it changes (workloads, services or policies were updated)."""
        self.metrics = metrics
        self.clock = clock
        # Ended connections and their access-log lines, for the admin UI (bounded).
        self.history = history if history is not None else ConnectionHistory()
        self._log: AccessLogger = logger if logger is not None else get_logger(ACCESS_LOGGER)
        self._open: dict[int, TrackedConnection] = {}
        self.ended = 0  # connections closed so far (the memory reclaimer watches it)
        # prometheus-client's labels() validates all 27 values on every call; connections
        # between the same workloads share label sets, so resolve each child once.
        self._children: dict[tuple[int, tuple[str, ...]], Counter] = {}
        self._labels: dict[tuple[str, ...], tuple[str, ...]] = {}
        # Connections between the same workloads share their labels and metric children
        # (building the 27 labels and resolving 4 children is ~150 calls per connection).
        self._pairs: dict[tuple[object, ...], _Pair] = {}
        self._generation = generation
        self._seen_generation = generation() if generation is not None else 0
        self._sockets_open: dict[str, Gauge] = {}
        # Asking the filter first spares building the fields of a line it would drop.
        self._level_check = level_check(ACCESS_LOGGER) if logger is None else None

    def _keeps(self, level: str) -> bool:
        """Whether an access line at ``level`` would be written; a given logger (tests,
        workers) always gets the line."""
        check = self._level_check
        return check is None or check(level)

    def pair(self, info: ConnectionInfo) -> _Pair:
        """The labels and metric children of ``info``'s (source, destination) pair."""
        if self._generation is not None:
            generation = self._generation()
            if generation != self._seen_generation:
                self._pairs.clear()
                self._seen_generation = generation
        key = _pair_key(info)
        pair = self._pairs.get(key)
        if pair is None or not pair.serves(info):
            if len(self._pairs) >= MAX_PAIRS:
                self._pairs.clear()
            pair = self._pairs[key] = _Pair(self, info)
        return pair

    def open(self, info: ConnectionInfo) -> TrackedConnection:
        pair = self.pair(info)
        conn = TrackedConnection(self, info, pair)
        self._open[id(conn)] = conn
        pair.opened.inc()
        self._sockets(info.reporter).inc()
        if self._keeps("debug"):  # the fields are built only for a logger that keeps them
            self._log.debug("connection opened", **conn.log_fields())
        return conn

    def _sockets(self, reporter: str) -> Gauge:
        gauge = self._sockets_open.get(reporter)
        if gauge is None:
            gauge = self._sockets_open[reporter] = self.metrics.sockets_open.labels(reporter)
        return gauge

    def open_connections(self) -> list[TrackedConnection]:
        return list(self._open.values())

    def connections_for(self, proxy_uid: str) -> list[TrackedConnection]:
        """Open connections handled by the proxy of pod ``proxy_uid``."""
        return [c for c in self._open.values() if c.info.proxy_uid == proxy_uid]

    def dump(self) -> list[dict[str, object]]:
        return [c.dump() for c in self._open.values()]

    def connection_failed(
        self, src_addr: SocketAddr, dst_addr: Authority, direction: Direction, failure: Failure
    ) -> None:
        """An early denial (before a connection could be opened): WARN log only, as ztunnel."""
        fields: dict[str, object] = {
            "src.addr": Bare(str(src_addr)),
            "dst.addr": Bare(str(dst_addr)),
            "direction": direction,
            "error": failure.message,
        }
        self._log.warning("connection failed", **fields)
        self.metrics.connections_refused.labels(direction, failure.kind.value).inc()
        self.history.failed(fields, failure)

    def _counter(self, metric: Counter, labels: tuple[str, ...]) -> Counter:
        key = (id(metric), labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def _closed(self, conn: TrackedConnection, failure: Failure | None) -> None:
        self._open.pop(id(conn), None)
        flag = failure.flag if failure is not None else ResponseFlag.NONE
        labels = conn.labels(flag)
        m = self.metrics
        self._counter(m.connections_closed, labels).inc()
        if flag in FAILURE_FLAGS:
            self._counter(m.connections_failed, labels).inc()
        self._sockets(conn.info.reporter).dec()
        fields = conn.log_fields()
        fields.update(
            bytes_sent=conn.bytes_sent,
            bytes_recv=conn.bytes_received,
            duration=f"{round(conn.duration() * 1000)}ms",
            error=failure.message if failure is not None else None,
        )
        if failure is not None:
            if self._keeps("error"):
                self._log.error("connection complete", **fields)
        elif self._keeps("info"):  # access logs off: no trip through structlog
            self._log.info("connection complete", **fields)
        self.history.closed(conn.dump(), fields, failure)
