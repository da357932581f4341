"""Where a connection goes: outbound upstream selection and inbound target port (sans-IO).

Outbound follows ztunnel's ``build_request`` (reference §2.1, §2.3, §1.7):

1. the original destination is looked up (workload first, then service VIP);
2. a service with a waypoint → HBONE to the waypoint, ``:authority`` = the
   original ``VIP:port``;
3. a PASSTHROUGH service or an unknown address → plain TCP to the original
   destination; a service with nothing to pick → ``NoHealthyUpstream``;
4. a service endpoint is picked at random weighted by workload ``capacity``
   (after locality ranking for STRICT / FAILOVER load balancers);
5. a directly addressed workload with a waypoint (and a source that is not
   that waypoint) → HBONE to the waypoint;
6. otherwise HBONE to ``ip:15008`` with ``:authority`` = ``ip:targetPort``, or
   plain TCP to ``ip:targetPort`` for a non-mesh (protocol TCP) workload.

Not supported (raise ``NoValidDestination`` rather than guess): multi-network
(double HBONE through a network gateway) and hostname-only workloads (on-demand
DNS). Waypoints reached by hostname fall back to ``hboneMtlsPort`` when the
waypoint service has no mapping for it (ztunnel requires one or an app tunnel).

Inbound follows ``find_inbound_upstream`` / ``validate_destination`` (§1.3 step 3).
Every error carries the HTTP status the HBONE server answers with.

Addresses are ``SocketAddr`` values (canonical IP + port) in and out; the
outbound self-call check is ``AgentPorts.is_self_call`` (model/ports.py), run by
the outbound proxy before it resolves.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import ClassVar

from ztunnel.errors import InvalidIdentity, ZtunnelError
from ztunnel.model import ports
from ztunnel.model.address import Authority, HostPort, SocketAddr
from ztunnel.model.identity import Identity
from ztunnel.model.ports import AgentPorts
from ztunnel.model.workload import (
    ApplicationTunnel,
    Endpoint,
    GatewayAddress,
    HealthPolicy,
    HealthStatus,
    IPAddress,
    LoadBalancer,
    LoadBalancerMode,
    NamespacedHostname,
    NetworkAddress,
    Service,
    TunnelProtocol,
    Workload,
)
from ztunnel.state.store import StateStore

# --- errors ------------------------------------------------------------------------------


class ResolveError(ZtunnelError):
    """No usable destination; ``reason`` is ztunnel's error name, ``status`` the HTTP answer."""

    status: ClassVar[int] = 503

    def __init__(self, reason: str, message: str) -> None:
        self.reason = reason
        self.message = message
        super().__init__(f"{reason}: {message}")


class _Named(ResolveError):
    def __init__(self, message: str) -> None:
        super().__init__(type(self).__name__, message)


class NoHealthyUpstream(_Named):
    """A service has no endpoint to pick (none healthy, none with the port, none known)."""


class UnknownServicePort(NoHealthyUpstream):
    """The service does not define the requested port."""


class UnknownWaypoint(_Named):
    """A waypoint is configured but cannot be resolved to a workload."""


class NoValidDestination(_Named):
    """The chosen workload cannot be reached (no IP of use, another network)."""


class SelfCall(_Named):
    """The target is one of the agent's own ports."""


class IPMismatch(_Named):
    """The HBONE authority IP is not the destination pod's IP."""

    status: ClassVar[int] = 400


class NoPortForServices(_Named):
    """A hostname authority's service port maps to no target port."""


class NoHostname(_Named):
    """A hostname authority names no known service."""


# --- results -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HboneUpstream:
    workload: Workload  # the workload dialled: the destination, or the waypoint
    service: Service | None  # the service the client addressed, if any
    address: SocketAddr  # TCP destination: ip:15008 (or the waypoint's HBONE port)
    authority: SocketAddr  # CONNECT :authority
    expected_identities: tuple[Identity, ...]  # peer SAN must be one of these
    waypoint: bool = False

    @property
    def authority_header(self) -> str:
        return str(self.authority)


@dataclass(frozen=True, slots=True)
class TcpUpstream:
    workload: Workload
    service: Service | None
    address: SocketAddr


@dataclass(frozen=True, slots=True)
class Passthrough:
    address: SocketAddr


Upstream = HboneUpstream | TcpUpstream | Passthrough


@dataclass(frozen=True, slots=True)
class InboundTarget:
    port: int  # the resolved target port on the local pod IP
    service: Service | None  # the hostname-addressed service, if any
    application_tunnel: ApplicationTunnel | None = None

    @property
    def connect_port(self) -> int:
        """Where to connect: an application tunnel with a port overrides the target port."""
        tunnel = self.application_tunnel
        return tunnel.port if tunnel is not None and tunnel.port else self.port


# --- helpers -----------------------------------------------------------------------------


def expected_identities(workload: Workload, sans: Iterable[str]) -> tuple[Identity, ...]:
    """Who may answer for ``workload``: the Service's SANs (invalid ones skipped, as ztunnel
    does) then the workload's own identity. The agent and the waypoint both verify with it."""
    found: list[Identity] = []
    for san in sans:
        try:
            found.append(Identity.parse(san))
        except InvalidIdentity:
            continue
    found.append(workload.identity)
    return tuple(dict.fromkeys(found))


def _pick_ip(w: Workload, wanted: IPAddress, families: str | None) -> IPAddress | None:
    """The addressed IP if it is the workload's, else one of the same family."""
    if wanted in w.workload_ips:
        return wanted
    allowed = [ip for ip in w.workload_ips if families in (None, "Dual", f"IPv{ip.version}")]
    same = [ip for ip in allowed if ip.version == wanted.version]
    candidates = same or allowed
    return candidates[0] if candidates else None


def _include(lb: LoadBalancer | None, ep: Endpoint) -> bool:
    allow_all = lb is not None and lb.health_policy is HealthPolicy.ALLOW_ALL
    return ep.status is HealthStatus.HEALTHY or allow_all


_Candidate = tuple[Endpoint, Workload]


def _scope_matches(scope: str, src: Workload, dst: Workload) -> bool:
    values = {
        "Region": (src.locality.region, dst.locality.region),
        "Zone": (src.locality.zone, dst.locality.zone),
        "Subzone": (src.locality.subzone, dst.locality.subzone),
        "Node": (src.node, dst.node),
        "Cluster": (src.cluster_id, dst.cluster_id),
        "Network": (src.network, dst.network),
    }
    a, b = values[scope]
    return a == b


def _rank(prefs: Sequence[str], src: Workload, dst: Workload) -> tuple[int, bool]:
    """Leading scopes matched (ztunnel's rank, Network-first bonus) and whether all matched."""
    network_first = bool(prefs) and prefs[0] == "Network"
    rank = adjust = 0
    for scope in prefs:
        matched = _scope_matches(scope, src, dst)
        if scope == "Network" and network_first:
            if not matched:
                continue
            adjust = len(prefs) - 1
        if not matched:
            break
        rank += 1
    return rank + adjust, rank == len(prefs)


def _by_locality(
    lb: LoadBalancer | None, src: Workload | None, candidates: list[_Candidate]
) -> list[_Candidate]:
    if (
        lb is None
        or src is None
        or lb.mode not in (LoadBalancerMode.STRICT, LoadBalancerMode.FAILOVER)
    ):
        return candidates
    ranked = [(_rank(lb.routing_preferences, src, wl), ep, wl) for ep, wl in candidates]
    if lb.mode is LoadBalancerMode.STRICT:
        ranked = [r for r in ranked if r[0][1]]
    best = max((r[0][0] for r in ranked), default=0)
    return [(ep, wl) for (rank, _), ep, wl in ranked if rank == best]


def _candidates(
    store: StateStore, svc: Service, svc_port: int, waypoint_mode: bool
) -> list[_Candidate]:
    target = svc.ports.get(svc_port, 0)
    out = []
    for uid in sorted(svc.endpoints):  # sorted: a seeded rng picks reproducibly
        ep = svc.endpoints[uid]
        wl = store.workload_by_uid(uid)
        if wl is None or not wl.workload_ips or not _include(svc.load_balancer, ep):
            continue
        if not waypoint_mode and target == 0 and svc_port not in ep.port:
            continue
        out.append((ep, wl))
    return out


def _pick_endpoint(
    store: StateStore,
    source: Workload | None,
    svc: Service,
    svc_port: int,
    rng: random.Random,
    waypoint_mode: bool = False,
) -> tuple[Workload, int]:
    """Weighted-random endpoint by capacity; returns (workload, target port)."""
    if not waypoint_mode and svc_port not in svc.ports:
        raise UnknownServicePort(f"service {svc.hostname} has no port {svc_port}")
    options = _by_locality(
        svc.load_balancer, source, _candidates(store, svc, svc_port, waypoint_mode)
    )
    weights = [wl.capacity for _, wl in options]
    if sum(weights) <= 0:
        raise NoHealthyUpstream(f"service {svc.hostname} has no healthy endpoint for {svc_port}")
    ep, wl = rng.choices(options, weights=weights)[0]
    port = ep.port.get(svc_port) or svc.ports.get(svc_port) or svc_port
    return wl, port


# --- waypoints ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Waypoint:
    workload: Workload
    service: Service | None
    port: int
    wanted_ip: IPAddress  # which IP (or family) to dial


def _find_waypoint(
    store: StateStore,
    gw: GatewayAddress,
    source: Workload | None,
    dst_ip: IPAddress,
    rng: random.Random,
) -> _Waypoint:
    dest = gw.destination
    port = gw.hbone_mtls_port
    if isinstance(dest, NetworkAddress):
        found = store.find_address(dest.address, dest.network)
        wanted = dest.address  # referenced by IP: dial that IP (its family wins)
    else:
        found = store.find_hostname(dest)
        wanted = dst_ip  # referenced by hostname: follow the caller's family
    if isinstance(found, Service):
        wl, target = _pick_endpoint(store, source, found, port, rng, waypoint_mode=True)
        return _Waypoint(wl, found, target, wanted)
    if isinstance(found, Workload):
        return _Waypoint(found, None, port, wanted)
    raise UnknownWaypoint(f"waypoint {dest} not found")


def _to_waypoint(
    store: StateStore,
    gw: GatewayAddress,
    source: Workload | None,
    target: SocketAddr,
    service: Service | None,
    rng: random.Random,
) -> HboneUpstream:
    wp = _find_waypoint(store, gw, source, target.ip, rng)
    _same_network(wp.workload, source)
    ip = _pick_ip(wp.workload, wp.wanted_ip, wp.service.ip_families if wp.service else None)
    if ip is None:
        raise NoValidDestination(f"waypoint {wp.workload.uid} has no usable IP")
    sans = wp.service.subject_alt_names if wp.service else ()
    return HboneUpstream(
        workload=wp.workload,
        service=service,
        address=SocketAddr(ip, wp.port),
        authority=target,
        expected_identities=expected_identities(wp.workload, sans),
        waypoint=True,
    )


def _is_waypoint_of(store: StateStore, gw: GatewayAddress, w: Workload) -> bool:
    """Whether ``w`` is (one of) the workloads behind waypoint reference ``gw``."""
    dest = gw.destination
    if isinstance(dest, NamespacedHostname):
        found = store.find_hostname(dest)
    else:
        found = store.find_address(dest.address, dest.network)
    if isinstance(found, Service):
        return w.uid in found.endpoints
    return found is not None and found.uid == w.uid


def _same_network(w: Workload, source: Workload | None) -> None:
    network = source.network if source is not None else ""
    if w.network != network:
        raise NoValidDestination(
            f"{w.uid} is on network {w.network!r}, not {network!r} (no double HBONE)"
        )


# --- outbound ----------------------------------------------------------------------------


def _direct(
    w: Workload,
    svc: Service | None,
    port: int,
    source: Workload | None,
    dst_ip: IPAddress,
    hbone_port: int,
) -> HboneUpstream | TcpUpstream:
    _same_network(w, source)
    ip = _pick_ip(w, dst_ip, svc.ip_families if svc else None)
    if ip is None:
        raise NoValidDestination(f"workload {w.uid} has no usable IP")
    if w.protocol is TunnelProtocol.TCP:
        return TcpUpstream(w, svc, SocketAddr(ip, port))
    sans = svc.subject_alt_names if svc else ()
    return HboneUpstream(
        w, svc, SocketAddr(ip, hbone_port), SocketAddr(ip, port), expected_identities(w, sans)
    )


def resolve_outbound(
    store: StateStore,
    source: Workload | None,
    target: SocketAddr,
    *,
    rng: random.Random,
    hbone_port: int = ports.HBONE,
) -> Upstream:
    """Pick the upstream for an outbound connection to ``target`` (the original destination).

    Raises:
        ResolveError: a subclass naming why there is no usable destination.
    """
    ip, dst_port = target.ip, target.port
    network = source.network if source is not None else ""
    namespace = source.namespace if source is not None else None
    found = store.find_address(ip, network, namespace)
    if isinstance(found, Service):
        if found.waypoint is not None:
            return _to_waypoint(store, found.waypoint, source, target, found, rng)
        lb = found.load_balancer
        if lb is not None and lb.mode is LoadBalancerMode.PASSTHROUGH:
            return Passthrough(target)
        wl, port = _pick_endpoint(store, source, found, dst_port, rng)
        return _direct(wl, found, port, source, ip, hbone_port)
    if isinstance(found, Workload):
        gw = found.waypoint
        from_waypoint = source is not None and gw is not None and _is_waypoint_of(store, gw, source)
        if gw is not None and not from_waypoint:
            return _to_waypoint(store, gw, source, target, None, rng)
        return _direct(found, None, dst_port, source, ip, hbone_port)
    return Passthrough(target)


# --- inbound -----------------------------------------------------------------------------


def _sandwiched(store: StateStore, local: Workload, authority_ip: IPAddress) -> bool:
    """The authority's target has this workload as its waypoint (ztunnel's sandwich check)."""
    target = store.find_address(authority_ip, local.network)
    return (
        target is not None
        and target.waypoint is not None
        and _is_waypoint_of(store, target.waypoint, local)
    )


def _service_target_port(svc: Service, local: Workload, svc_port: int) -> int:
    ep = svc.endpoints.get(local.uid)
    port = (ep.port.get(svc_port, 0) if ep else 0) or svc.ports.get(svc_port, 0)
    if port == 0:
        raise NoPortForServices(f"no target port for {svc.hostname}:{svc_port}")
    return port


def resolve_inbound(
    store: StateStore,
    local: Workload,
    authority: Authority,
    dst_ip: IPAddress,
    *,
    agent_ports: AgentPorts,
) -> InboundTarget:
    """Map an HBONE CONNECT authority to the local pod's target port.

    ``dst_ip`` is the (canonical) local address the connection arrived on.

    Raises:
        IPMismatch (400), NoHostname / NoPortForServices / SelfCall (503).
    """
    service: Service | None = None
    if isinstance(authority, HostPort):
        service = store.service_by_hostname(authority.host, prefer_namespace=local.namespace)
        if service is None:
            raise NoHostname(f"no service {authority.host}")
        port = _service_target_port(service, local, authority.port)
    else:
        if (
            authority.ip != dst_ip
            and local.application_tunnel is None
            and not _sandwiched(store, local, authority.ip)
        ):
            raise IPMismatch(f"authority {authority.ip} is not the destination {dst_ip}")
        port = authority.port
    if agent_ports.is_proxy_port(port):
        raise SelfCall(f"target port {port} is one of the agent's own ports")
    return InboundTarget(port, service, local.application_tunnel)
