"""xDS resources (istio.workload.Address, istio.security.Authorization) -> our model.

The same model the local config fills, so everything downstream (state, policy,
proxies) is indifferent to where a workload came from. Conversion is strict where
being lenient would be unsafe: an unknown enum value, a malformed IP, a policy
match with no condition or a feature ztunnel-py cannot honour (CIDR VIPs, weighted
waypoints, LEGACY_ISTIO_MTLS) rejects the resource with a ``ResourceError`` that
names the problem; the xDS client NACKs it and keeps the last good version.
Defaults follow ztunnel's (empty trust domain -> cluster.local, empty service
account -> default, empty cluster id -> Kubernetes, unset capacity -> 1).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

from google.protobuf import any_pb2
from google.protobuf.message import DecodeError, Message

from ztunnel.errors import ZtunnelError
from ztunnel.model.address import canonical_ip
from ztunnel.model.authorization import (
    Action,
    Authorization,
    Clause,
    Match,
    MatchKind,
    Rule,
    Scope,
    ServiceAccountMatch,
    StringMatch,
)
from ztunnel.model.identity import DEFAULT_CLUSTER_ID, DEFAULT_TRUST_DOMAIN
from ztunnel.model.workload import (
    HBONE_PORT,
    ApplicationTunnel,
    AppProtocol,
    AppTunnelProtocol,
    GatewayAddress,
    HealthPolicy,
    HealthStatus,
    IPAddress,
    IPNetwork,
    LoadBalancer,
    LoadBalancerMode,
    Locality,
    NamespacedHostname,
    NetworkAddress,
    NetworkMode,
    Service,
    TunnelProtocol,
    Visibility,
    Workload,
    WorkloadType,
)
from ztunnel.proto import authorization_pb2 as apb
from ztunnel.proto import workload_pb2 as wpb

ADDRESS_TYPE = "type.googleapis.com/istio.workload.Address"
AUTHORIZATION_TYPE = "type.googleapis.com/istio.security.Authorization"

T = TypeVar("T")
M = TypeVar("M", bound=Message)


class ResourceError(ZtunnelError):
    """An xDS resource we cannot apply; the message says which field and why."""


def _enum(table: Mapping[Any, T], value: int, what: str) -> T:
    try:
        return table[value]
    except KeyError:
        raise ResourceError(f"{what}: unknown value {value}") from None


def _ip(raw: bytes, what: str) -> IPAddress:
    if len(raw) not in (4, 16):
        raise ResourceError(f"{what}: an IP is 4 or 16 bytes, got {len(raw)}")
    return canonical_ip(ipaddress.ip_address(raw))


def _port(value: int, what: str, allow_zero: bool = False) -> int:
    if not (0 if allow_zero else 1) <= value <= 65535:
        raise ResourceError(f"{what}: port {value} out of range")
    return value


# --- workloads ---------------------------------------------------------------------------

_PROTOCOLS = {wpb.NONE: TunnelProtocol.TCP, wpb.HBONE: TunnelProtocol.HBONE}
_NETWORK_MODES = {wpb.STANDARD: NetworkMode.STANDARD, wpb.HOST_NETWORK: NetworkMode.HOST_NETWORK}
_STATUSES = {wpb.HEALTHY: HealthStatus.HEALTHY, wpb.UNHEALTHY: HealthStatus.UNHEALTHY}
_WORKLOAD_TYPES = {
    wpb.DEPLOYMENT: WorkloadType.DEPLOYMENT,
    wpb.CRONJOB: WorkloadType.CRONJOB,
    wpb.POD: WorkloadType.POD,
    wpb.JOB: WorkloadType.JOB,
}
_APP_TUNNELS = {
    wpb.ApplicationTunnel.NONE: AppTunnelProtocol.NONE,
    wpb.ApplicationTunnel.PROXY: AppTunnelProtocol.PROXY,
}


def gateway_from_proto(g: wpb.GatewayAddress, what: str) -> GatewayAddress:
    kind = g.WhichOneof("destination")
    destination: NetworkAddress | NamespacedHostname
    if kind == "hostname":
        destination = NamespacedHostname(g.hostname.namespace, g.hostname.hostname)
    elif kind == "address":
        destination = NetworkAddress(g.address.network, _ip(g.address.address, what))
    else:
        raise ResourceError(f"{what}: gateway has no destination")
    port = _port(g.hbone_mtls_port, f"{what}.hbone_mtls_port", allow_zero=True)
    return GatewayAddress(destination, port or HBONE_PORT)


def _services(services: Mapping[str, wpb.PortList]) -> dict[str, dict[int, int]]:
    out: dict[str, dict[int, int]] = {}
    for key, plist in services.items():
        namespace, sep, hostname = key.partition("/")
        if not sep or not namespace or not hostname:
            raise ResourceError(f"services: key {key!r} is not namespace/hostname")
        out[key] = {
            _port(p.service_port, f"services[{key}]"): _port(
                p.target_port, f"services[{key}]", allow_zero=True
            )
            for p in plist.ports
        }
    return out


def workload_from_proto(w: wpb.Workload) -> Workload:
    if not w.uid:
        raise ResourceError("workload has no uid")
    if w.tunnel_protocol == wpb.LEGACY_ISTIO_MTLS:
        raise ResourceError("tunnel_protocol LEGACY_ISTIO_MTLS is not supported")
    app_tunnel = None
    if w.HasField("application_tunnel"):
        at = w.application_tunnel
        app_tunnel = ApplicationTunnel(
            _enum(_APP_TUNNELS, at.protocol, "application_tunnel.protocol"),
            _port(at.port, "application_tunnel.port", allow_zero=True) or None,
        )
    return Workload(
        uid=w.uid,
        name=w.name,
        namespace=w.namespace,
        workload_ips=tuple(_ip(a, "addresses") for a in w.addresses),
        service_account=w.service_account or "default",
        trust_domain=w.trust_domain or DEFAULT_TRUST_DOMAIN,
        network=w.network,
        protocol=_enum(_PROTOCOLS, w.tunnel_protocol, "tunnel_protocol"),
        network_mode=_enum(_NETWORK_MODES, w.network_mode, "network_mode"),
        node=w.node,
        hostname=w.hostname,
        waypoint=gateway_from_proto(w.waypoint, "waypoint") if w.HasField("waypoint") else None,
        network_gateway=(
            gateway_from_proto(w.network_gateway, "network_gateway")
            if w.HasField("network_gateway")
            else None
        ),
        native_tunnel=w.native_tunnel,
        application_tunnel=app_tunnel,
        authorization_policies=tuple(w.authorization_policies),
        status=_enum(_STATUSES, w.status, "status"),
        cluster_id=w.cluster_id or DEFAULT_CLUSTER_ID,
        locality=Locality(w.locality.region, w.locality.zone, w.locality.subzone),
        canonical_name=w.canonical_name,
        canonical_revision=w.canonical_revision,
        workload_name=w.workload_name,
        workload_type=_enum(_WORKLOAD_TYPES, w.workload_type, "workload_type"),
        capacity=w.capacity.value if w.HasField("capacity") else 1,
        services=_services(w.services),
    )


# --- services ----------------------------------------------------------------------------

_SCOPES = {
    wpb.LoadBalancing.REGION: "Region",
    wpb.LoadBalancing.ZONE: "Zone",
    wpb.LoadBalancing.SUBZONE: "Subzone",
    wpb.LoadBalancing.NODE: "Node",
    wpb.LoadBalancing.CLUSTER: "Cluster",
    wpb.LoadBalancing.NETWORK: "Network",
}
_LB_MODES = {
    wpb.LoadBalancing.UNSPECIFIED_MODE: LoadBalancerMode.UNSPECIFIED,
    wpb.LoadBalancing.STRICT: LoadBalancerMode.STRICT,
    wpb.LoadBalancing.FAILOVER: LoadBalancerMode.FAILOVER,
    wpb.LoadBalancing.PASSTHROUGH: LoadBalancerMode.PASSTHROUGH,
}
_HEALTH_POLICIES = {
    wpb.LoadBalancing.ONLY_HEALTHY: HealthPolicy.ONLY_HEALTHY,
    wpb.LoadBalancing.ALLOW_ALL: HealthPolicy.ALLOW_ALL,
}
_IP_FAMILIES: dict[int, str | None] = {
    wpb.AUTOMATIC: None,
    wpb.IPV4_ONLY: "IPv4",
    wpb.IPV6_ONLY: "IPv6",
    wpb.DUAL: "Dual",
}
_VISIBILITIES = {wpb.Service.PUBLIC: Visibility.PUBLIC, wpb.Service.NAMESPACE: Visibility.NAMESPACE}
# A port's declared protocol (the waypoint reads it; UNKNOWN ports are left out: sniffed).
_APP_PROTOCOLS = {
    wpb.UNKNOWN: AppProtocol.UNKNOWN,
    wpb.HTTP11: AppProtocol.HTTP11,
    wpb.HTTP2: AppProtocol.HTTP2,
    wpb.GRPC: AppProtocol.GRPC,
    wpb.TCP: AppProtocol.TCP,
    wpb.TLS: AppProtocol.TLS,
}


def _vip(a: wpb.NetworkAddress) -> NetworkAddress:
    ip = _ip(a.address, "addresses")
    if a.HasField("length") and a.length != ip.max_prefixlen:
        raise ResourceError("addresses: CIDR VIPs are not supported by ztunnel-py")
    return NetworkAddress(a.network, ip)


def service_from_proto(s: wpb.Service) -> Service:
    if not s.namespace or not s.hostname:
        raise ResourceError("service needs a namespace and a hostname")
    if len(s.weighted_waypoints):
        # Ignoring a waypoint would bypass its L7 policy: refuse instead.
        raise ResourceError("weighted_waypoints are not supported by ztunnel-py")
    lb = None
    if s.HasField("load_balancing"):
        lbp = s.load_balancing
        lb = LoadBalancer(
            routing_preferences=tuple(
                _enum(_SCOPES, p, "load_balancing.routing_preference")
                for p in lbp.routing_preference
            ),
            mode=_enum(_LB_MODES, lbp.mode, "load_balancing.mode"),
            health_policy=_enum(_HEALTH_POLICIES, lbp.health_policy, "load_balancing.health"),
        )
    return Service(
        name=s.name,
        namespace=s.namespace,
        hostname=s.hostname,
        vips=tuple(_vip(a) for a in s.addresses),
        ports={
            _port(p.service_port, "ports"): _port(p.target_port, "ports", allow_zero=True)
            for p in s.ports
        },
        app_protocols={
            p.service_port: _enum(_APP_PROTOCOLS, p.app_protocol, "ports.app_protocol")
            for p in s.ports
            if p.app_protocol != wpb.UNKNOWN
        },
        subject_alt_names=tuple(s.subject_alt_names),
        waypoint=gateway_from_proto(s.waypoint, "waypoint") if s.HasField("waypoint") else None,
        load_balancer=lb,
        ip_families=_enum(_IP_FAMILIES, s.ip_families, "ip_families"),
        canonical=s.canonical,
        visibility=_enum(_VISIBILITIES, s.visibility, "visibility"),
    )


def address_from_proto(a: wpb.Address) -> Workload | Service:
    kind = a.WhichOneof("type")
    if kind == "workload":
        return workload_from_proto(a.workload)
    if kind == "service":
        return service_from_proto(a.service)
    raise ResourceError("address is neither a workload nor a service")


# --- authorization -----------------------------------------------------------------------

_AUTHZ_SCOPES = {
    apb.GLOBAL: Scope.GLOBAL,
    apb.NAMESPACE: Scope.NAMESPACE,
    apb.WORKLOAD_SELECTOR: Scope.WORKLOAD_SELECTOR,
}
_ACTIONS = {apb.ALLOW: Action.ALLOW, apb.DENY: Action.DENY}


def _string_matches(items: Iterable[apb.StringMatch], what: str) -> tuple[StringMatch, ...]:
    out = []
    for m in items:
        kind = m.WhichOneof("match_type")
        if kind == "exact":
            out.append(StringMatch(MatchKind.EXACT, m.exact))
        elif kind == "prefix":
            out.append(StringMatch(MatchKind.PREFIX, m.prefix))
        elif kind == "suffix":
            out.append(StringMatch(MatchKind.SUFFIX, m.suffix))
        elif kind == "presence":
            out.append(StringMatch(MatchKind.PRESENCE))
        else:
            # An empty matcher would match nothing or everything depending on reading:
            # refuse rather than guess on a security decision.
            raise ResourceError(f"{what}: string match with no match type")
    return tuple(out)


def _cidrs(items: Iterable[apb.Address], what: str) -> tuple[IPNetwork, ...]:
    out = []
    for a in items:
        ip = _ip(a.address, what)
        if a.length > ip.max_prefixlen:
            raise ResourceError(f"{what}: prefix length {a.length} too long for {ip}")
        out.append(ipaddress.ip_network((ip, a.length), strict=False))
    return tuple(out)


def _ports(items: Iterable[int], what: str) -> tuple[int, ...]:
    return tuple(_port(p, what) for p in items)


def _sa_matches(items: Iterable[apb.ServiceAccountMatch]) -> tuple[ServiceAccountMatch, ...]:
    return tuple(ServiceAccountMatch(m.namespace, m.serviceAccount) for m in items)


def _match(m: apb.Match) -> Match:
    return Match(
        namespaces=_string_matches(m.namespaces, "namespaces"),
        not_namespaces=_string_matches(m.not_namespaces, "not_namespaces"),
        service_accounts=_sa_matches(m.service_accounts),
        not_service_accounts=_sa_matches(m.not_service_accounts),
        principals=_string_matches(m.principals, "principals"),
        not_principals=_string_matches(m.not_principals, "not_principals"),
        source_ips=_cidrs(m.source_ips, "source_ips"),
        not_source_ips=_cidrs(m.not_source_ips, "not_source_ips"),
        destination_ips=_cidrs(m.destination_ips, "destination_ips"),
        not_destination_ips=_cidrs(m.not_destination_ips, "not_destination_ips"),
        destination_ports=_ports(m.destination_ports, "destination_ports"),
        not_destination_ports=_ports(m.not_destination_ports, "not_destination_ports"),
    )


def authorization_from_proto(p: apb.Authorization) -> Authorization:
    if not p.name or not p.namespace:
        raise ResourceError("authorization needs a name and a namespace")
    rules: list[Rule] = []
    for rule in p.rules:
        clauses: list[Clause] = [tuple(_match(m) for m in c.matches) for c in rule.clauses]
        rules.append(tuple(clauses))
    return Authorization(
        name=p.name,
        namespace=p.namespace,
        scope=_enum(_AUTHZ_SCOPES, p.scope, "scope"),
        action=_enum(_ACTIONS, p.action, "action"),
        rules=tuple(rules),
        dry_run=p.dry_run,
    )


# --- Any -> model ------------------------------------------------------------------------


def _unpack(any_msg: any_pb2.Any, expected: str, message: type[M]) -> M:
    if any_msg.type_url != expected:
        raise ResourceError(f"resource of type {any_msg.type_url!r}, expected {expected!r}")
    try:
        return message.FromString(any_msg.value)
    except DecodeError as exc:
        raise ResourceError(f"cannot decode {message.DESCRIPTOR.full_name}: {exc}") from exc


def decode_resource(type_url: str, any_msg: any_pb2.Any) -> Workload | Service | Authorization:
    """One resource of a DeltaDiscoveryResponse; raises ResourceError."""
    if type_url == ADDRESS_TYPE:
        return address_from_proto(_unpack(any_msg, type_url, wpb.Address))
    if type_url == AUTHORIZATION_TYPE:
        return authorization_from_proto(_unpack(any_msg, type_url, apb.Authorization))
    raise ResourceError(f"unsupported resource type {type_url!r}")
