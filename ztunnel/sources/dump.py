"""Model objects → ztunnel's camelCase JSON shapes, for the admin ``/config_dump``.

The inverse of ``localconfig``: ``load_local_config(yaml.dump({"workloads":
[workload_to_dump(w)], ...}))`` gives back equal objects. Two choices follow from
that round trip and from ztunnel's own serde output:

- a workload's ``services`` is the local-config map ``{"ns/host": {port: target}}``
  (ztunnel's dump lists only ``["ns/host"]``; the loader accepts both);
- ``Presence`` renders as ``{"Presence": []}``, which is what serde_json emits for
  ztunnel's ``StringMatch::Presence()`` tuple variant.

Integer-keyed maps get string keys, as JSON (and serde_json) requires.
"""

from __future__ import annotations

from collections.abc import Mapping

from ztunnel.model.authorization import Authorization, Match, MatchKind, StringMatch
from ztunnel.model.identity import DEFAULT_TRUST_DOMAIN
from ztunnel.model.workload import (
    Endpoint,
    GatewayAddress,
    LoadBalancer,
    LoadBalancerMode,
    Locality,
    Service,
    Workload,
)

JSON = dict[str, object]

# ztunnel's serde name for the unspecified mode is "Standard".
_LB_MODE_NAMES = {LoadBalancerMode.UNSPECIFIED: "Standard"}


def _ports(ports: Mapping[int, int]) -> dict[str, int]:
    return {str(k): v for k, v in sorted(ports.items())}


def gateway_to_dump(g: GatewayAddress) -> JSON:
    return {"destination": str(g.destination), "hboneMtlsPort": g.hbone_mtls_port}


def _locality(loc: Locality) -> JSON:
    return {"region": loc.region, "zone": loc.zone, "subzone": loc.subzone}


def workload_to_dump(w: Workload) -> JSON:
    """One workload; defaults are left out where ztunnel leaves them out."""
    out: JSON = {
        "uid": w.uid,
        "name": w.name,
        "namespace": w.namespace,
        "workloadIps": [str(ip) for ip in w.workload_ips],
        "serviceAccount": w.service_account or "default",
        "trustDomain": w.trust_domain or DEFAULT_TRUST_DOMAIN,
        "protocol": w.protocol.value,
        "networkMode": w.network_mode.value,
        "status": w.status.value,
        "clusterId": w.cluster_id,
        "workloadType": w.workload_type.value,
        "capacity": w.capacity,
    }
    optional: JSON = {
        "network": w.network,
        "node": w.node,
        "hostname": w.hostname,
        "canonicalName": w.canonical_name,
        "canonicalRevision": w.canonical_revision,
        "workloadName": w.workload_name,
        "nativeTunnel": w.native_tunnel,
        "authorizationPolicies": list(w.authorization_policies),
        "waypoint": w.waypoint and gateway_to_dump(w.waypoint),
        "networkGateway": w.network_gateway and gateway_to_dump(w.network_gateway),
        "locality": _locality(w.locality) if w.locality != Locality() else None,
        "services": {k: _ports(v) for k, v in sorted(w.services.items())},
    }
    if w.application_tunnel is not None:
        tunnel: JSON = {"protocol": w.application_tunnel.protocol.value}
        if w.application_tunnel.port:
            tunnel["port"] = w.application_tunnel.port
        optional["applicationTunnel"] = tunnel
    out.update({k: v for k, v in optional.items() if v})
    return out


def endpoint_to_dump(e: Endpoint) -> JSON:
    return {"workloadUid": e.workload_uid, "port": _ports(e.port), "status": e.status.value}


def _load_balancer(lb: LoadBalancer) -> JSON:
    return {
        "routingPreferences": list(lb.routing_preferences),
        "mode": _LB_MODE_NAMES.get(lb.mode, lb.mode.value),
        "healthPolicy": lb.health_policy.value,
    }


def service_to_dump(s: Service) -> JSON:
    out: JSON = {
        "name": s.name,
        "namespace": s.namespace,
        "hostname": s.hostname,
        "vips": [str(v) for v in s.vips],
        "ports": _ports(s.ports),
        "endpoints": {uid: endpoint_to_dump(e) for uid, e in sorted(s.endpoints.items())},
        "subjectAltNames": list(s.subject_alt_names),
        "canonical": s.canonical,
        "visibility": s.visibility.value,
    }
    if s.waypoint is not None:
        out["waypoint"] = gateway_to_dump(s.waypoint)
    if s.load_balancer is not None:
        out["loadBalancer"] = _load_balancer(s.load_balancer)
    if s.ip_families is not None:
        out["ipFamilies"] = s.ip_families
    return out


def string_match_to_dump(m: StringMatch) -> JSON:
    if m.kind is MatchKind.PRESENCE:
        return {"Presence": []}
    return {m.kind.value: m.value}


def _match(m: Match) -> JSON:
    strings = {
        "namespaces": m.namespaces,
        "notNamespaces": m.not_namespaces,
        "principals": m.principals,
        "notPrincipals": m.not_principals,
    }
    out: JSON = {k: [string_match_to_dump(x) for x in v] for k, v in strings.items() if v}
    for key, sas in (
        ("serviceAccounts", m.service_accounts),
        ("notServiceAccounts", m.not_service_accounts),
    ):
        if sas:
            out[key] = [
                {"namespace": a.namespace, "serviceAccount": a.service_account} for a in sas
            ]
    nets = {
        "sourceIps": m.source_ips,
        "notSourceIps": m.not_source_ips,
        "destinationIps": m.destination_ips,
        "notDestinationIps": m.not_destination_ips,
    }
    out.update({k: [str(n) for n in v] for k, v in nets.items() if v})
    ports = {
        "destinationPorts": m.destination_ports,
        "notDestinationPorts": m.not_destination_ports,
    }
    out.update({k: list(v) for k, v in ports.items() if v})
    return out


def policy_to_dump(p: Authorization) -> JSON:
    return {
        "name": p.name,
        "namespace": p.namespace,
        "scope": p.scope.value,
        "action": p.action.value,
        "rules": [[[_match(m) for m in clause] for clause in rule] for rule in p.rules],
        "dryRun": p.dry_run,
    }


def local_config_to_dump(
    workloads: tuple[Workload, ...] | list[Workload],
    services: tuple[Service, ...] | list[Service],
    policies: tuple[Authorization, ...] | list[Authorization],
) -> JSON:
    """A whole document in local-config shape (``load_local_config`` reads it back)."""
    return {
        "workloads": [workload_to_dump(w) for w in workloads],
        "services": [service_to_dump(s) for s in services],
        "policies": [policy_to_dump(p) for p in policies],
    }


__all__ = [
    "endpoint_to_dump",
    "gateway_to_dump",
    "local_config_to_dump",
    "policy_to_dump",
    "service_to_dump",
    "string_match_to_dump",
    "workload_to_dump",
]
