"""What one waypoint knows: the mesh state, its routes and its L7 policies (sans-IO).

The mesh (workloads, services) is the agent's ``StateStore``; routes and
policies come from Kubernetes-shaped YAML documents (HTTPRoute, GRPCRoute,
AuthorizationPolicy with targetRefs). A port's protocol is the mesh's
``Service.app_protocols`` entry, else a Kubernetes ``Service`` document's
(``appProtocol``, else the port name); without either the waypoint sniffs.

Parsing is strict (``ConfigError`` naming file and field); everything valid
that the waypoint cannot fully honour lands in ``warnings``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ztunnel.errors import ConfigError
from ztunnel.model.workload import AppProtocol, Service
from ztunnel.policy.l7istio import translate_l7_documents
from ztunnel.policy.l7model import L7Policy, WaypointRef, applies
from ztunnel.state.store import StateStore
from ztunnel.waypoint.messages import Protocol
from ztunnel.waypoint.routes_yaml import parse_route_documents
from ztunnel.waypoint.routing import RouteTable, ServiceRoutes
from ztunnel.waypoint.sniff import declared_protocol

DEFAULT_ROOT_NAMESPACE = "istio-system"
_BY_APP_PROTOCOL = {
    AppProtocol.HTTP11: Protocol.HTTP1,
    AppProtocol.HTTP2: Protocol.HTTP2,
    AppProtocol.GRPC: Protocol.HTTP2,
    AppProtocol.TCP: Protocol.TCP,
    AppProtocol.TLS: Protocol.TCP,
}


@dataclass
class L7Config:
    """Routes, policies and declared port protocols parsed from documents."""

    routes: RouteTable = field(default_factory=lambda: RouteTable(()))
    policies: list[L7Policy] = field(default_factory=list)
    # (namespace, service name, port) -> (appProtocol, port name)
    ports: dict[tuple[str, str, int], tuple[str | None, str | None]] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    @classmethod
    def from_documents(cls, docs: Iterable[Any], *, source: str = "<documents>") -> L7Config:
        docs = [d for d in docs if d is not None]
        routes = parse_route_documents(docs, source=source)
        policies = translate_l7_documents(docs, source=source)
        table = RouteTable(routes.routes)
        return cls(
            table,
            policies.policies,
            _service_ports(docs, source),
            routes.warnings + policies.warnings + table.conflicts(),
        )

    @classmethod
    def load(cls, paths: Iterable[str | Path]) -> L7Config:
        """Every ``*.yaml``/``*.yml`` file (or directory of them), multi-document."""
        return cls.from_sources(read_documents(paths))

    @classmethod
    def from_sources(cls, sources: Iterable[tuple[str, Sequence[Any]]]) -> L7Config:
        """Several sources' documents as one configuration (errors name the source)."""
        merged = cls()
        for source, docs in sources:
            part = cls.from_documents(docs, source=source)
            merged.policies += part.policies
            merged.ports.update(part.ports)
            merged.warnings += part.warnings
            merged.routes = RouteTable([*merged.routes.routes, *part.routes.routes])
        # Conflicts across sources too (each source's own ones are already listed).
        merged.warnings = list(dict.fromkeys([*merged.warnings, *merged.routes.conflicts()]))
        return merged


def read_documents(paths: Iterable[str | Path]) -> list[tuple[str, list[Any]]]:
    """(file, its YAML documents) for every file, or ``*.yaml``/``*.yml`` under a directory."""
    out: list[tuple[str, list[Any]]] = []
    for base in map(Path, paths):
        files = sorted(base.rglob("*.y*ml")) if base.is_dir() else [base]
        for file in files:
            try:
                out.append((str(file), list(yaml.safe_load_all(file.read_text()))))
            except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
                raise ConfigError(str(file), "", f"cannot read: {exc}") from exc
    return out


def _service_ports(
    docs: Iterable[Any], source: str
) -> dict[tuple[str, str, int], tuple[str | None, str | None]]:
    out: dict[tuple[str, str, int], tuple[str | None, str | None]] = {}
    for doc in docs:
        if not isinstance(doc, Mapping) or doc.get("kind") != "Service":
            continue
        meta = doc.get("metadata") or {}
        name, namespace = meta.get("name"), meta.get("namespace", "default")
        spec = doc.get("spec") or {}
        if not isinstance(name, str) or not isinstance(spec, Mapping):
            raise ConfigError(source, "Service", "a Service needs metadata.name and a spec")
        for i, port in enumerate(spec.get("ports") or []):
            if not isinstance(port, Mapping) or not isinstance(port.get("port"), int):
                raise ConfigError(source, f"Service {namespace}/{name}.spec.ports[{i}]", "bad port")
            out[(namespace, name, port["port"])] = (port.get("appProtocol"), port.get("name"))
    return out


@dataclass
class WaypointState:
    """The live view one waypoint decides with; ``config`` may be replaced on reload."""

    store: StateStore
    waypoint: WaypointRef
    config: L7Config = field(default_factory=L7Config)
    root_namespace: str = DEFAULT_ROOT_NAMESPACE

    def policies_for(self, service: Service | None) -> list[L7Policy]:
        target = (service.namespace, service.name) if service is not None else None
        return [
            p
            for p in self.config.policies
            if applies(p, self.waypoint, target, self.root_namespace)
        ]

    def routes_for(self, service: Service, port: int) -> ServiceRoutes | None:
        return self.config.routes.for_service(service.namespace, service.name, port)

    def declared_protocol(self, service: Service | None, port: int) -> Protocol | None:
        """The mesh's AppProtocol for the port, else a Service document's, else None (sniff)."""
        if service is None:
            return None
        known = _BY_APP_PROTOCOL.get(service.app_protocols.get(port, AppProtocol.UNKNOWN))
        if known is not None:
            return known
        app, name = self.config.ports.get((service.namespace, service.name, port), (None, None))
        return declared_protocol(app, name)

    def service(self, namespace: str, name: str) -> Service | None:
        """A Service by namespace and name (Kubernetes' usual hostname first, then a scan)."""
        found = self.store.service_by_key(f"{namespace}/{name}.{namespace}.svc.cluster.local")
        if found is not None:
            return found
        for svc in self.store.services():
            if svc.namespace == namespace and svc.name == name:
                return svc
        return None
