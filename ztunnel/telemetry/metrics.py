"""Prometheus metrics with Istio's names and label order (ztunnel ``src/proxy/metrics.rs``).

Each ``Metrics`` owns its own ``CollectorRegistry`` so several agents can live in
one process (tests, the demo). prometheus-client appends ``_total`` to counter
names itself, so counters are declared without it.
"""

from __future__ import annotations

import os
import resource
from collections.abc import Iterator

import prometheus_client
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

import ztunnel
from ztunnel.model.outcome import ResponseFlag

# ztunnel exposes no ``*_created`` series; the switch is process-wide in prometheus-client.
prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call]

# The classic 0.0.4 text format: what generate_latest writes and every Prometheus accepts.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
UNKNOWN = "unknown"

# CommonTrafficLabels, in ztunnel's order (reference §6.3), locality labels included.
TRAFFIC_LABELS: tuple[str, ...] = (
    "reporter",
    "source_workload",
    "source_canonical_service",
    "source_canonical_revision",
    "source_workload_namespace",
    "source_principal",
    "source_app",
    "source_version",
    "source_cluster",
    "destination_service",
    "destination_service_namespace",
    "destination_service_name",
    "destination_workload",
    "destination_canonical_service",
    "destination_canonical_revision",
    "destination_workload_namespace",
    "destination_principal",
    "destination_app",
    "destination_version",
    "destination_cluster",
    "request_protocol",
    "response_flags",
    "connection_security_policy",
    "source_region",
    "source_zone",
    "destination_region",
    "destination_zone",
)

# response_flags values that also count into istio_tcp_connections_failed_total.
FAILURE_FLAGS = frozenset(flag for flag in ResponseFlag if flag.is_failure)


class _FdCollector(Collector):
    """istio_process_open_fds / istio_process_max_fds, read at scrape time."""

    def collect(self) -> Iterator[GaugeMetricFamily]:
        yield GaugeMetricFamily(
            "istio_process_open_fds", "Number of open file descriptors.", value=_open_fds()
        )
        soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        yield GaugeMetricFamily(
            "istio_process_max_fds", "Maximum number of open file descriptors.", value=soft
        )


def _open_fds() -> int:
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return 0


class Metrics:
    """All metrics one agent exports; attributes are the prometheus-client metric objects."""

    def __init__(self, *, tag: str = ztunnel.__version__, process_metrics: bool = True) -> None:
        self.registry = CollectorRegistry()
        self._declare_traffic()
        self._declare_proxies()
        self.limit_hits = Counter(
            "ztunnel_limit_hits",
            "Times a peer or connection hit one of the agent's protective limits",
            ("limit",),
            registry=self.registry,
        )
        build = Gauge(
            "istio_build",
            "Istio component build info",
            ("component", "tag"),
            registry=self.registry,
        )
        build.labels("ztunnel", tag).set(1)
        if process_metrics:
            ProcessCollector(registry=self.registry)
            self.registry.register(_FdCollector())

    def _declare_traffic(self) -> None:
        def counter(name: str, doc: str) -> Counter:
            return Counter(name, doc, TRAFFIC_LABELS, registry=self.registry)

        self.connections_opened = counter(
            "istio_tcp_connections_opened", "The total number of TCP connections opened"
        )
        self.connections_closed = counter(
            "istio_tcp_connections_closed", "The total number of TCP connections closed"
        )
        self.sent_bytes = counter(
            "istio_tcp_sent_bytes",
            "The size of total bytes sent during response in case of a TCP connection",
        )
        self.received_bytes = counter(
            "istio_tcp_received_bytes",
            "The size of total bytes received during request in case of a TCP connection",
        )
        self.connections_failed = counter(
            "istio_tcp_connections_failed", "The total number of TCP connections that failed"
        )
        self.connections_refused = Counter(
            "ztunnel_connections_refused",
            "Connections refused before they were opened (self call, loop, unknown source, "
            "no route, TLS handshake, identity), by direction and reason",
            ("direction", "reason"),
            registry=self.registry,
        )
        self.sockets_open = Gauge(
            "istio_tcp_sockets_open",
            "The current number of open TCP sockets",
            ("reporter",),
            registry=self.registry,
        )

    def _declare_proxies(self) -> None:
        self.active_proxies = Gauge(
            "istio_active_proxy_count",
            "The total number current workloads with active proxies",
            registry=self.registry,
        )
        self.pending_proxies = Gauge(
            "istio_pending_proxy_count",
            "The total number current workloads with pending proxies",
            registry=self.registry,
        )
        self.proxies_started = Counter(
            "istio_proxies_started",
            "The total number of proxies that were started",
            registry=self.registry,
        )
        self.proxies_stopped = Counter(
            "istio_proxies_stopped",
            "The total number of proxies that were stopped",
            registry=self.registry,
        )

    def limit_hit(self, limit: str) -> None:
        """Count one hit of ``limit`` (``hbone.limits.Limit``: a flood budget, the idle
        or handshake timeout, a stream or pending-connect limit...)."""
        self.limit_hits.labels(limit).inc()

    def exposition(self) -> bytes:
        """The registry in Prometheus text format (what /metrics serves)."""
        return generate_latest(self.registry)
