"""Request metrics with Istio's names and labels, and one access-log line per request.

Metrics (reporter ``waypoint``, as Istio's waypoints report): ``istio_requests_total``,
``istio_request_duration_milliseconds`` (histogram, Envoy's default buckets),
``istio_request_bytes`` and ``istio_response_bytes`` (histograms). Labels are
Istio's standard request labels in the proxy's order; ``request_protocol`` is
``grpc`` for gRPC requests and ``http`` otherwise (HTTP/1.1 and HTTP/2 alike);
``grpc_response_status`` comes from ``grpc-status`` (trailers, or the head of a
trailers-only answer). Source labels describe the verified peer (the HBONE
client identity and the workload at the peer address), destination labels the
pod that served the request and the Service the client addressed.

The access log goes to the ``access`` logger (``telemetry/logging.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv6Address
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from ztunnel.model.identity import Identity
from ztunnel.model.workload import Service, Workload
from ztunnel.policy.l7 import L7Decision
from ztunnel.telemetry.logging import ACCESS_LOGGER, Bare, get_logger
from ztunnel.telemetry.metrics import UNKNOWN

REQUEST_LABELS: tuple[str, ...] = (
    "reporter",
    "source_workload",
    "source_canonical_service",
    "source_canonical_revision",
    "source_workload_namespace",
    "source_principal",
    "source_app",
    "source_version",
    "source_cluster",
    "destination_workload",
    "destination_workload_namespace",
    "destination_principal",
    "destination_app",
    "destination_version",
    "destination_service",
    "destination_canonical_service",
    "destination_canonical_revision",
    "destination_service_name",
    "destination_service_namespace",
    "destination_cluster",
    "request_protocol",
    "response_code",
    "grpc_response_status",
    "response_flags",
    "connection_security_policy",
)
# Envoy's default histogram buckets (ms), which Istio's stats keep for durations.
DURATION_BUCKETS = (
    0.5,
    1,
    5,
    10,
    25,
    50,
    100,
    250,
    500,
    1000,
    2500,
    5000,
    10000,
    30000,
    60000,
    300000,
    600000,
    1800000,
    3600000,
)
SIZE_BUCKETS = (1, 10, 100, 1000, 10000, 100000, 1000000, 10000000, 100000000, 1000000000)


@dataclass
class RequestRecord:
    """Everything one request's metrics and access-log line need, filled as it progresses."""

    start: float
    method: str = ""
    path: str = ""
    authority: str = ""
    protocol: str = "HTTP/1.1"
    grpc: bool = False
    src_addr: tuple[IPv4Address | IPv6Address, int] | None = None
    src_identity: Identity | None = None
    src_workload: Workload | None = None
    service: Service | None = None
    dst_workload: Workload | None = None
    upstream: str = ""  # endpoint ip:port that served the last attempt
    route: str = ""
    request_id: str = ""
    status: int = 0
    grpc_status: str = ""
    flags: str = "-"
    details: str = ""
    attempts: int = 0
    bytes_received: int = 0
    bytes_sent: int = 0
    duration_ms: float = 0.0
    decision: L7Decision | None = field(default=None, repr=False)


def _workload_labels(prefix: str, w: Workload | None) -> dict[str, str]:
    if w is None:
        keys = (
            "workload",
            "canonical_service",
            "canonical_revision",
            "workload_namespace",
            "app",
            "version",
            "cluster",
        )
        return {f"{prefix}_{k}": UNKNOWN for k in keys}
    name = w.canonical_name or w.workload_name or w.name
    revision = w.canonical_revision or "latest"
    return {
        f"{prefix}_workload": w.workload_name or w.name,
        f"{prefix}_canonical_service": name,
        f"{prefix}_canonical_revision": revision,
        f"{prefix}_workload_namespace": w.namespace,
        f"{prefix}_app": name,
        f"{prefix}_version": revision,
        f"{prefix}_cluster": w.cluster_id or UNKNOWN,
    }


def labels(record: RequestRecord) -> dict[str, str]:
    out = {"reporter": "waypoint"}
    out.update(_workload_labels("source", record.src_workload))
    out["source_principal"] = str(record.src_identity) if record.src_identity else UNKNOWN
    out.update(_workload_labels("destination", record.dst_workload))
    dst = record.dst_workload
    out["destination_principal"] = str(dst.identity) if dst is not None else UNKNOWN
    svc = record.service
    out["destination_service"] = svc.hostname if svc else (record.authority or UNKNOWN)
    out["destination_service_name"] = svc.name if svc else UNKNOWN
    out["destination_service_namespace"] = svc.namespace if svc else UNKNOWN
    out["request_protocol"] = "grpc" if record.grpc else "http"
    out["response_code"] = str(record.status)
    out["grpc_response_status"] = record.grpc_status
    out["response_flags"] = record.flags
    out["connection_security_policy"] = "mutual_tls" if record.src_identity else "unknown"
    return out


class WaypointMetrics:
    """The waypoint's request metrics in their own registry (several can share a process)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter("istio_requests", "Total requests", REQUEST_LABELS, registry=r)
        self.duration = Histogram(
            "istio_request_duration_milliseconds",
            "Request duration in milliseconds",
            REQUEST_LABELS,
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.request_bytes = Histogram(
            "istio_request_bytes",
            "Request body sizes",
            REQUEST_LABELS,
            buckets=SIZE_BUCKETS,
            registry=r,
        )
        self.response_bytes = Histogram(
            "istio_response_bytes",
            "Response body sizes",
            REQUEST_LABELS,
            buckets=SIZE_BUCKETS,
            registry=r,
        )

    def record(self, record: RequestRecord) -> None:
        values = labels(record)
        self.requests.labels(**values).inc()
        self.duration.labels(**values).observe(record.duration_ms)
        self.request_bytes.labels(**values).observe(record.bytes_received)
        self.response_bytes.labels(**values).observe(record.bytes_sent)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


def access_log_fields(record: RequestRecord) -> dict[str, Any]:
    """The access-log line's fields (also what tests and the admin page read)."""
    src = record.src_addr
    decision = record.decision
    return {
        "src.addr": Bare(f"{src[0]}:{src[1]}") if src else None,
        "src.workload": record.src_workload.name if record.src_workload else None,
        "src.namespace": record.src_workload.namespace if record.src_workload else None,
        "src.identity": str(record.src_identity) if record.src_identity else None,
        "dst.service": record.service.hostname if record.service else None,
        "dst.workload": record.dst_workload.name if record.dst_workload else None,
        "dst.addr": Bare(record.upstream) if record.upstream else None,
        "method": record.method,
        "path": record.path,
        "authority": record.authority,
        "protocol": record.protocol,
        "route": record.route or None,
        "response_code": record.status,
        "grpc_status": record.grpc_status or None,
        "response_flags": record.flags,
        "response_code_details": record.details or None,
        "authz": decision.reason.value if decision else None,
        "authz.policy": decision.policy if decision else None,
        "attempts": record.attempts,
        "bytes_received": record.bytes_received,
        "bytes_sent": record.bytes_sent,
        "duration": Bare(f"{record.duration_ms:.1f}ms"),
        "request_id": record.request_id or None,
    }


def log_request(record: RequestRecord) -> None:
    log = get_logger(ACCESS_LOGGER)
    fields = access_log_fields(record)
    if record.status >= 500 or record.status == 0:
        log.warning("request complete", **fields)
    else:
        log.info("request complete", **fields)
