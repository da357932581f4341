"""Per-request endpoint choice for a backend Service (sans-IO, injected rng).

Candidates are the Service's endpoints that are healthy (or all, with an
``ALLOW_ALL`` health policy) and whose workload is known with an IP; the target
port comes from the endpoint's port map, else the Service's (as the agent
resolves it). The choice is Envoy's default for Istio, LEAST_REQUEST: two
candidates drawn at random (weighted by workload ``capacity``), the one with
fewer requests in flight wins. Retries avoid endpoints already tried while
others remain (Istio's ``previous_hosts`` predicate).
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

from ztunnel.model.workload import (
    HealthPolicy,
    HealthStatus,
    Service,
    TunnelProtocol,
    Workload,
)
from ztunnel.state.resolve import expected_identities
from ztunnel.state.store import StateStore
from ztunnel.waypoint.upstream import Endpoint


def workload_endpoint(workload: Workload, port: int, sans: Iterable[str] = ()) -> Endpoint | None:
    if not workload.workload_ips:
        return None
    return Endpoint(
        workload.uid,
        workload.workload_ips[0],
        port,
        expected_identities(workload, sans),
        hbone=workload.protocol is TunnelProtocol.HBONE,
    )


def service_endpoints(store: StateStore, service: Service, port: int) -> list[Endpoint]:
    """Usable endpoints of ``service`` for service port ``port`` (sorted: reproducible picks)."""
    allow_all = (
        service.load_balancer is not None
        and service.load_balancer.health_policy is HealthPolicy.ALLOW_ALL
    )
    out = []
    for uid in sorted(service.endpoints):
        ep = service.endpoints[uid]
        if ep.status is not HealthStatus.HEALTHY and not allow_all:
            continue
        workload = store.workload_by_uid(uid)
        if workload is None:
            continue
        target = ep.port.get(port) or service.ports.get(port) or port
        endpoint = workload_endpoint(workload, target, service.subject_alt_names)
        if endpoint is not None:
            out.append(endpoint)
    return out


class Balancer:
    """LEAST_REQUEST over candidates; tracks requests in flight per endpoint."""

    def __init__(self, store: StateStore, rng: random.Random) -> None:
        self._store = store
        self._rng = rng
        self._active: dict[Endpoint, int] = {}

    def active(self, endpoint: Endpoint) -> int:
        return self._active.get(endpoint, 0)

    def _capacity(self, endpoint: Endpoint) -> int:
        workload = self._store.workload_by_uid(endpoint.uid)
        return max(workload.capacity, 0) if workload is not None else 1

    def pick(self, candidates: list[Endpoint], tried: Iterable[Endpoint] = ()) -> Endpoint | None:
        seen = set(tried)
        fresh = [c for c in candidates if c not in seen]
        pool = fresh or candidates
        weights = [self._capacity(c) for c in pool]
        if not pool or sum(weights) <= 0:
            return None
        first, second = self._rng.choices(pool, weights=weights, k=2)
        return second if self.active(second) < self.active(first) else first

    @contextmanager
    def track(self, endpoint: Endpoint) -> Iterator[None]:
        self._active[endpoint] = self._active.get(endpoint, 0) + 1
        try:
            yield
        finally:
            left = self._active[endpoint] - 1
            if left:
                self._active[endpoint] = left
            else:
                del self._active[endpoint]
