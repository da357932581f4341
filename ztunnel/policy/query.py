"""``ztunnel ctl explain``: what would the destination's agent decide for this connection?

Resolves a human description of both ends against the state store, then runs
the same evaluation the inbound proxies run. Sans-IO: no sockets, no trio.

``--from`` accepts a pod (``ns/name`` or a unique ``name``), a SPIFFE identity,
or an IP; ``--to`` accepts a pod with a port (``ns/name:port``), ``ip:port``, or
a service ``VIP:port`` / ``hostname:port`` (evaluated for every endpoint, on
its resolved target port, as the inbound side would see it).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any

from ztunnel.errors import InvalidIdentity, ZtunnelError
from ztunnel.model.address import SocketAddr, canonical_ip
from ztunnel.model.identity import Identity
from ztunnel.model.workload import IPAddress, Service, TunnelProtocol, Workload
from ztunnel.policy.rbac import ConnectionAttrs, decision_to_json, evaluate, explain
from ztunnel.state.store import StateStore


class ExplainError(ZtunnelError, ValueError):
    """The query does not name anything the agent knows (answered as HTTP 400)."""


@dataclass(frozen=True, slots=True)
class Source:
    ip: IPAddress
    identity: Identity | None
    workload: Workload | None


@dataclass(frozen=True, slots=True)
class Target:
    workload: Workload
    ip: IPAddress
    port: int
    service: Service | None


def find_pod(store: StateStore, text: str) -> Workload | None:
    namespace, _, name = text.rpartition("/")
    matches = [
        w
        for w in store.workloads()
        if w.name == name and (not namespace or w.namespace == namespace)
    ]
    if len(matches) > 1:
        raise ExplainError(f"{text!r} is ambiguous: use namespace/name")
    return matches[0] if matches else None


def resolve_source(store: StateStore, text: str) -> Source:
    if text.startswith("spiffe://"):
        try:
            identity = Identity.parse(text)
        except InvalidIdentity as exc:
            raise ExplainError(str(exc)) from exc
        return Source(ipaddress.ip_address("0.0.0.0"), identity, None)
    try:
        ip = canonical_ip(text)
    except ValueError:
        workload = find_pod(store, text)
        if workload is None or not workload.workload_ips:
            raise ExplainError(f"--from {text!r}: no such pod, identity or IP") from None
        return Source(workload.workload_ips[0], _mesh_identity(workload), workload)
    workload = store.workload_by_ip(ip)
    return Source(ip, _mesh_identity(workload) if workload else None, workload)


def _mesh_identity(workload: Workload) -> Identity | None:
    # Only HBONE workloads present a certificate; others arrive as plaintext.
    return workload.identity if workload.protocol is TunnelProtocol.HBONE else None


def resolve_targets(store: StateStore, text: str) -> list[Target]:
    host, sep, port_text = text.rpartition(":")
    if not sep or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ExplainError(f"--to {text!r}: expected <pod|ip|service>:<port>")
    port, host = int(port_text), host.strip("[]")
    try:
        ip = canonical_ip(host)
    except ValueError:
        return _targets_by_name(store, host, port, text)
    workload = store.workload_by_ip(ip)
    if workload is not None:
        return [Target(workload, ip, port, None)]
    service = store.service_by_vip(ip)
    if service is not None:
        return _service_targets(store, service, port)
    raise ExplainError(f"--to {text!r}: no workload or service has {ip}")


def _targets_by_name(store: StateStore, host: str, port: int, text: str) -> list[Target]:
    service = store.service_by_hostname(host)
    if service is not None:
        return _service_targets(store, service, port)
    workload = find_pod(store, host)
    if workload is None or not workload.workload_ips:
        raise ExplainError(f"--to {text!r}: no such pod or service")
    return [Target(workload, workload.workload_ips[0], port, None)]


def _service_targets(store: StateStore, service: Service, port: int) -> list[Target]:
    if port not in service.ports:
        raise ExplainError(f"service {service.hostname} has no port {port}")
    targets = []
    for uid, endpoint in sorted(service.endpoints.items()):
        workload = store.workload_by_uid(uid)
        if workload is None or not workload.workload_ips:
            continue
        target_port = endpoint.port.get(port) or service.ports[port] or port
        targets.append(Target(workload, workload.workload_ips[0], target_port, service))
    if not targets:
        raise ExplainError(f"service {service.hostname} has no endpoints")
    return targets


def explain_connection(store: StateStore, source: str, destination: str) -> dict[str, Any]:
    """Decisions for ``source`` -> ``destination`` (one per destination endpoint)."""
    src = resolve_source(store, source)
    results = []
    for target in resolve_targets(store, destination):
        conn = ConnectionAttrs(
            src_ip=src.ip, dst_ip=target.ip, dst_port=target.port, src_identity=src.identity
        )
        decision = evaluate(store.policies_for(target.workload), conn)
        results.append(
            {
                "destination": {
                    "workload": f"{target.workload.namespace}/{target.workload.name}",
                    "address": str(SocketAddr(target.ip, target.port)),
                    "service": target.service.hostname if target.service else None,
                },
                "decision": decision_to_json(decision),
                "explanation": explain(decision),
            }
        )
    return {
        "source": {
            "ip": str(src.ip),
            "identity": str(src.identity) if src.identity else None,
            "workload": f"{src.workload.namespace}/{src.workload.name}" if src.workload else None,
            "mtls": src.identity is not None,
        },
        "results": results,
    }
