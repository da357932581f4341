"""The cluster file: namespaces, nodes, pods, services and Istio policies of a cluster.

A pod source format of the product (``ztunnel run --cluster FILE --cluster-prefix P``):
the simulated cluster is built from the same file, but the agent only reads it.

Parsing is strict, like a Kubernetes API server: an unknown field, a wrong type, a bad IP or
a reference to an undeclared node/namespace is a ConfigError naming the file and the field
path (``pods[2].node``). Policies stay raw dicts: the policy translator owns their meaning.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ztunnel.errors import ConfigError
from ztunnel.model.address import IPAddress

# Kubernetes DNS-1123 label: what pod, namespace and node names may look like.
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")


@dataclass(frozen=True, slots=True)
class NamespaceSpec:
    name: str
    labels: Mapping[str, str]


@dataclass(frozen=True, slots=True)
class PodSpec:
    name: str
    namespace: str
    node: str
    service_account: str = "default"
    labels: Mapping[str, str] = field(default_factory=dict)
    program: tuple[str, ...] | None = None
    ports: tuple[int, ...] = ()

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True, slots=True)
class PortSpec:
    """A Service port's Kubernetes name and ``appProtocol`` (either may be absent)."""

    name: str | None = None
    app_protocol: str | None = None


@dataclass(frozen=True, slots=True)
class ServiceSpec:
    name: str
    namespace: str
    hostname: str
    vip: IPAddress
    ports: Mapping[int, int]  # service port -> target port
    selector: Mapping[str, str]
    labels: Mapping[str, str] = field(default_factory=dict)
    port_info: Mapping[int, PortSpec] = field(default_factory=dict)  # by service port

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.hostname}"


# istiod feature flags the cluster file may set (istiod's env names; the file plays istiod).
AUTO_ALLOW_WAYPOINT = "PILOT_AUTO_ALLOW_WAYPOINT_POLICY"
_ISTIOD_FLAGS = (AUTO_ALLOW_WAYPOINT,)


@dataclass(frozen=True, slots=True)
class ClusterSpec:
    source: str
    namespaces: Mapping[str, NamespaceSpec]
    nodes: tuple[str, ...]
    pods: tuple[PodSpec, ...]
    services: tuple[ServiceSpec, ...]
    policies: tuple[Mapping[str, Any], ...]
    istiod: Mapping[str, bool] = field(default_factory=dict)  # feature flag -> on

    @property
    def auto_allow_waypoint(self) -> bool:
        """istiod's ``PILOT_AUTO_ALLOW_WAYPOINT_POLICY`` (default off, as in Istio)."""
        return self.istiod.get(AUTO_ALLOW_WAYPOINT, False)

    def pod(self, name: str, namespace: str | None = None) -> PodSpec:
        """A pod by name (``ns/name`` or a name unique across namespaces)."""
        if namespace is None and "/" in name:
            namespace, name = name.split("/", 1)
        found = [p for p in self.pods if p.name == name and namespace in (None, p.namespace)]
        if len(found) != 1:
            raise KeyError(f"no unique pod {name!r} (namespace {namespace!r})")
        return found[0]

    def selected_pods(self, service: ServiceSpec) -> tuple[PodSpec, ...]:
        """Pods a service's selector picks: same namespace, all selector labels equal."""
        if not service.selector:
            return ()  # like Kubernetes: no selector, no automatic endpoints
        return tuple(
            p
            for p in self.pods
            if p.namespace == service.namespace
            and all(p.labels.get(k) == v for k, v in service.selector.items())
        )


class _Parser:
    """Typed accessors that raise ConfigError(source, path, problem)."""

    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, path: str, problem: str) -> ConfigError:
        return ConfigError(self.source, path, problem)

    def mapping(self, value: object, path: str, allowed: tuple[str, ...] = ()) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.fail(path, f"expected a mapping, got {type(value).__name__}")
        for key in value:
            if not isinstance(key, str):
                raise self.fail(path, f"keys must be strings, got {key!r}")
            if allowed and key not in allowed:
                raise self.fail(f"{path}.{key}" if path else key, "unknown field")
        return value

    def seq(self, value: object, path: str) -> list[Any]:
        if not isinstance(value, list):
            raise self.fail(path, f"expected a list, got {type(value).__name__}")
        return value

    def text(self, value: object, path: str) -> str:
        if not isinstance(value, str) or not value:
            raise self.fail(path, f"expected a non-empty string, got {value!r}")
        return value

    def name(self, value: object, path: str) -> str:
        s = self.text(value, path)
        if not _DNS_LABEL.match(s):
            raise self.fail(path, f"{s!r} is not a DNS-1123 label")
        return s

    def port(self, value: object, path: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 65536:
            raise self.fail(path, f"expected a port number 1-65535, got {value!r}")
        return value

    def labels(self, value: object, path: str) -> dict[str, str]:
        m = self.mapping({} if value is None else value, path)
        for k, v in m.items():
            if not isinstance(v, str):
                raise self.fail(f"{path}.{k}", f"label values must be strings, got {v!r}")
        return dict(m)

    def ip(self, value: object, path: str) -> IPAddress:
        try:
            ip = ipaddress.ip_address(self.text(value, path))
        except ValueError as exc:
            raise self.fail(path, f"{value!r} is not an IP address") from exc
        if isinstance(ip, ipaddress.IPv6Address) and ip.scope_id is not None:
            raise self.fail(path, f"{value!r} has a zone; cluster addresses take none")
        return ip


_TOP = ("namespaces", "nodes", "pods", "services", "policies", "istiod")
_NS = ("labels",)
_POD = ("name", "namespace", "serviceAccount", "node", "labels", "program", "ports")
_SVC = ("name", "namespace", "hostname", "vip", "ports", "selector", "labels")
_SVC_PORT = ("port", "targetPort", "name", "appProtocol")


def parse_spec(data: object, source: str = "<cluster>") -> ClusterSpec:
    p = _Parser(source)
    top = p.mapping(data, "", _TOP)
    namespaces = _namespaces(p, top.get("namespaces") or {})
    nodes = _nodes(p, top.get("nodes"))
    pods = tuple(
        _pod(p, raw, f"pods[{i}]", namespaces, nodes)
        for i, raw in enumerate(p.seq(top.get("pods") or [], "pods"))
    )
    _unique(p, [x.key for x in pods], "pods", "pod")
    _fits_nodes(p, pods)
    services = tuple(
        _service(p, raw, f"services[{i}]", namespaces)
        for i, raw in enumerate(p.seq(top.get("services") or [], "services"))
    )
    _unique(p, [s.key for s in services], "services", "service")
    _unique(p, [str(s.vip) for s in services], "services", "vip")
    policies = tuple(
        _policy(p, raw, f"policies[{i}]", namespaces)
        for i, raw in enumerate(p.seq(top.get("policies") or [], "policies"))
    )
    return ClusterSpec(source, namespaces, nodes, pods, services, policies, _istiod(p, top))


def _istiod(p: _Parser, top: Mapping[str, Any]) -> dict[str, bool]:
    flags = p.mapping(top.get("istiod") or {}, "istiod", _ISTIOD_FLAGS)
    for key, value in flags.items():
        if not isinstance(value, bool):
            raise p.fail(f"istiod.{key}", f"expected true or false, got {value!r}")
    return dict(flags)


def _unique(p: _Parser, keys: list[str], path: str, what: str) -> None:
    seen: set[str] = set()
    for i, k in enumerate(keys):
        if k in seen:
            raise p.fail(f"{path}[{i}]", f"duplicate {what} {k!r}")
        seen.add(k)


MAX_PODS_PER_NODE = 253  # each node's pods live in one /24: .2 to .254


def _fits_nodes(p: _Parser, pods: tuple[PodSpec, ...]) -> None:
    count: dict[str, int] = {}
    for i, pod in enumerate(pods):
        count[pod.node] = count.get(pod.node, 0) + 1
        if count[pod.node] > MAX_PODS_PER_NODE:
            raise p.fail(
                f"pods[{i}].node",
                f"more than {MAX_PODS_PER_NODE} pods on node {pod.node!r} "
                "(each node's pods share one /24)",
            )


def _namespaces(p: _Parser, raw: object) -> dict[str, NamespaceSpec]:
    out: dict[str, NamespaceSpec] = {}
    for name, body in p.mapping(raw, "namespaces").items():
        path = f"namespaces.{name}"
        p.name(name, path)
        m = p.mapping({} if body is None else body, path, _NS)
        out[name] = NamespaceSpec(name, p.labels(m.get("labels"), f"{path}.labels"))
    return out


def _nodes(p: _Parser, raw: object) -> tuple[str, ...]:
    nodes = tuple(p.name(n, f"nodes[{i}]") for i, n in enumerate(p.seq(raw, "nodes")))
    if not nodes:
        raise p.fail("nodes", "at least one node is required")
    if len(nodes) > 250:
        raise p.fail("nodes", "at most 250 nodes (one /24 of the pod network each)")
    _unique(p, list(nodes), "nodes", "node")
    return nodes


def _pod(
    p: _Parser, raw: object, path: str, namespaces: Mapping[str, object], nodes: tuple[str, ...]
) -> PodSpec:
    m = p.mapping(raw, path, _POD)
    for req in ("name", "namespace", "node"):
        if req not in m:
            raise p.fail(f"{path}.{req}", "required field missing")
    ns = p.name(m["namespace"], f"{path}.namespace")
    if ns not in namespaces:
        raise p.fail(f"{path}.namespace", f"unknown namespace {ns!r}")
    node = p.name(m["node"], f"{path}.node")
    if node not in nodes:
        raise p.fail(f"{path}.node", f"unknown node {node!r}")
    program: tuple[str, ...] | None = None
    if m.get("program") is not None:
        argv = p.seq(m["program"], f"{path}.program")
        program = tuple(p.text(a, f"{path}.program[{i}]") for i, a in enumerate(argv))
        if not program:
            raise p.fail(f"{path}.program", "empty argv (use null for no program)")
    ports = tuple(
        p.port(x, f"{path}.ports[{i}]")
        for i, x in enumerate(p.seq(m.get("ports") or [], f"{path}.ports"))
    )
    return PodSpec(
        name=p.name(m["name"], f"{path}.name"),
        namespace=ns,
        node=node,
        service_account=p.name(m.get("serviceAccount", "default"), f"{path}.serviceAccount"),
        labels=p.labels(m.get("labels"), f"{path}.labels"),
        program=program,
        ports=ports,
    )


def _service(p: _Parser, raw: object, path: str, namespaces: Mapping[str, object]) -> ServiceSpec:
    m = p.mapping(raw, path, _SVC)
    for req in ("name", "namespace", "vip", "ports"):
        if req not in m:
            raise p.fail(f"{path}.{req}", "required field missing")
    name = p.name(m["name"], f"{path}.name")
    ns = p.name(m["namespace"], f"{path}.namespace")
    if ns not in namespaces:
        raise p.fail(f"{path}.namespace", f"unknown namespace {ns!r}")
    ports, info = _service_ports(p, m["ports"], f"{path}.ports")
    hostname = m.get("hostname", f"{name}.{ns}.svc.cluster.local")
    return ServiceSpec(
        name=name,
        namespace=ns,
        hostname=p.text(hostname, f"{path}.hostname"),
        vip=p.ip(m["vip"], f"{path}.vip"),
        ports=ports,
        selector=p.labels(m.get("selector"), f"{path}.selector"),
        labels=p.labels(m.get("labels"), f"{path}.labels"),
        port_info=info,
    )


def _service_ports(
    p: _Parser, raw: object, path: str
) -> tuple[dict[int, int], dict[int, PortSpec]]:
    """``{port: targetPort}``, or Kubernetes' list of ``{port, targetPort, name, appProtocol}``."""
    if isinstance(raw, dict) and raw:
        return {p.port(k, path): p.port(v, f"{path}.{k}") for k, v in raw.items()}, {}
    if not isinstance(raw, list) or not raw:
        raise p.fail(path, "expected a non-empty mapping {port: targetPort} or a list of ports")
    ports: dict[int, int] = {}
    info: dict[int, PortSpec] = {}
    for i, item in enumerate(raw):
        m = p.mapping(item, f"{path}[{i}]", _SVC_PORT)
        if "port" not in m:
            raise p.fail(f"{path}[{i}].port", "required field missing")
        port = p.port(m["port"], f"{path}[{i}].port")
        if port in ports:
            raise p.fail(f"{path}[{i}].port", f"duplicate port {port}")
        ports[port] = p.port(m.get("targetPort", port), f"{path}[{i}].targetPort")
        name = m.get("name")
        app = m.get("appProtocol")
        info[port] = PortSpec(
            p.text(name, f"{path}[{i}].name") if name is not None else None,
            p.text(app, f"{path}[{i}].appProtocol") if app is not None else None,
        )
    return ports, info


def _policy(
    p: _Parser, raw: object, path: str, namespaces: Mapping[str, object]
) -> Mapping[str, Any]:
    doc = p.mapping(raw, path)
    p.text(doc.get("apiVersion"), f"{path}.apiVersion")
    p.text(doc.get("kind"), f"{path}.kind")
    meta = p.mapping(doc.get("metadata"), f"{path}.metadata")
    p.text(meta.get("name"), f"{path}.metadata.name")
    ns = meta.get("namespace")
    if ns is not None and not isinstance(ns, str):
        raise p.fail(f"{path}.metadata.namespace", f"expected a namespace name, got {ns!r}")
    if ns is not None and ns not in namespaces:
        raise p.fail(f"{path}.metadata.namespace", f"unknown namespace {ns!r}")
    return doc


def load_spec(path: str | Path) -> ClusterSpec:
    """Read and validate a cluster file."""
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(source, "", f"cannot read: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(source, "", f"not UTF-8 text: {exc.reason} at byte {exc.start}") from exc
    return loads_spec(text, source)


def loads_spec(text: str, source: str = "<cluster>") -> ClusterSpec:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(source, "", f"invalid YAML: {exc}") from exc
    except RecursionError as exc:  # PyYAML recurses once per nesting level
        raise ConfigError(source, "", "invalid YAML: nested too deeply") from exc
    return parse_spec(data, source)
