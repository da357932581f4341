"""HBONE request/response metadata headers (baggage, forwarded, traceparent). Sans-IO."""

from __future__ import annotations

import os

from ztunnel.model.address import SocketAddr
from ztunnel.model.workload import Workload

# The last baggage built per workload uid: every connection of a pod sends the same one. A hit
# must be the same workload object (a changed workload is a new object: never stale).
_baggage: dict[tuple[str, str], tuple[Workload, str]] = {}
MAX_BAGGAGE = 4096


def baggage(workload: Workload | None, cluster_id: str = "Kubernetes") -> str:
    """ztunnel's baggage: workload attribution for the peer's telemetry; empty values omitted."""
    if workload is None:
        return ""
    key = (workload.uid, cluster_id)
    cached = _baggage.get(key)
    if cached is not None and cached[0] is workload:
        return cached[1]
    value = _build_baggage(workload, cluster_id)
    if len(_baggage) >= MAX_BAGGAGE:
        _baggage.clear()
    _baggage[key] = (workload, value)
    return value


def _build_baggage(workload: Workload, cluster_id: str) -> str:
    items = [
        ("k8s.cluster.name", workload.cluster_id or cluster_id),
        ("k8s.namespace.name", workload.namespace),
        (f"k8s.{workload.workload_type.value}.name", workload.workload_name or workload.name),
        ("service.name", workload.canonical_name),
        ("service.version", workload.canonical_revision),
        ("cloud.region", workload.locality.region),
        ("cloud.availability_zone", workload.locality.zone),
    ]
    return ",".join(f"{k}={v}" for k, v in items if v)


def parse_baggage(value: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in value.split(","):
        key, sep, val = item.strip().partition("=")
        if sep and key:
            out[key] = val
    return out


def forwarded(client: SocketAddr, service_host: str | None) -> str:
    value = f'for="{client}"'
    return f"{value};host={service_host}" if service_host else value


def traceparent() -> str:
    """A fresh W3C trace context per outbound connection."""
    ids = os.urandom(24).hex()  # trace id (16 bytes) and span id (8): one getrandom call
    return f"00-{ids[:32]}-{ids[32:]}-00"


def forwarded_host(value: str | None) -> str | None:
    """The ``host=`` of a Forwarded header (the service the client addressed), if any."""
    for element in (value or "").split(","):
        for pair in element.split(";"):
            key, sep, val = pair.strip().partition("=")
            if sep and key.lower() == "host" and val:
                return val.strip('"')
    return None
