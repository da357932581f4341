"""ztunnel's local-config YAML (``LOCAL_XDS_PATH`` / ``LOCAL_XDS``), read verbatim.

The schema is ztunnel's serde one: camelCase names, unknown fields rejected
(``deny_unknown_fields``), StringMatch as the YAML tags ``!Exact foo``,
``!Prefix foo``, ``!Suffix foo``, ``!Presence []``. Every problem becomes a
``ConfigError`` naming the offending path (``workloads[1].workloadIps[0]``) and
what was expected, because a config file is edited by hand and "invalid type"
without a location is useless.

Deliberate differences from ztunnel, all lenient supersets:
- a workload without ``uid`` gets ``<clusterId>//v1/Pod/<namespace>/<name>``;
- an empty ``trustDomain`` / ``serviceAccount`` means ``cluster.local`` / ``default``;
- ``services`` of a workload may be omitted, or be a list ``["ns/host"]`` as in
  ztunnel's config_dump; service ``vips`` / ``ports``, policy ``rules`` /
  ``dryRun``, ``hboneMtlsPort`` and ``loadBalancer`` members have defaults;
- StringMatch may also be written ``{Exact: foo}`` (the config_dump JSON shape),
  so a dump can be fed back in;
- fields ztunnel-py cannot honour (``weightedWaypoints``, ``cidrVips``) are
  rejected rather than silently dropped: ignoring a waypoint would bypass L7 policy.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import yaml

from ztunnel.errors import ConfigError
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
    AppTunnelProtocol,
    Endpoint,
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

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class LocalConfig:
    workloads: tuple[Workload, ...] = ()
    services: tuple[Service, ...] = ()
    policies: tuple[Authorization, ...] = ()
    # The parsed document (tags rendered as {"Exact": ...}), for config_dump's staticConfig.
    raw: Mapping[str, object] = field(default_factory=dict)


# --- enum spellings (ztunnel's serde names) ---------------------------------------------

_PROTOCOLS = {"TCP": TunnelProtocol.TCP, "HBONE": TunnelProtocol.HBONE}
_NETWORK_MODES = {"Standard": NetworkMode.STANDARD, "HostNetwork": NetworkMode.HOST_NETWORK}
_STATUSES = {"Healthy": HealthStatus.HEALTHY, "Unhealthy": HealthStatus.UNHEALTHY}
_APP_TUNNEL_PROTOCOLS = {"NONE": AppTunnelProtocol.NONE, "PROXY": AppTunnelProtocol.PROXY}
_WORKLOAD_TYPES = {t.value: t for t in WorkloadType}
LB_MODES = {
    "Standard": LoadBalancerMode.UNSPECIFIED,
    "UnspecifiedMode": LoadBalancerMode.UNSPECIFIED,
    "Strict": LoadBalancerMode.STRICT,
    "Failover": LoadBalancerMode.FAILOVER,
    "Passthrough": LoadBalancerMode.PASSTHROUGH,
}
_HEALTH_POLICIES = {"OnlyHealthy": HealthPolicy.ONLY_HEALTHY, "AllowAll": HealthPolicy.ALLOW_ALL}
ROUTING_SCOPES = ("Region", "Zone", "Subzone", "Node", "Cluster", "Network")
_IP_FAMILIES = ("Dual", "IPv4", "IPv6")
_VISIBILITIES = {"Public": Visibility.PUBLIC, "Namespace": Visibility.NAMESPACE}
_SCOPES = {s.value: s for s in Scope}
_ACTIONS = {a.value: a for a in Action}
_MATCH_KINDS = {k.value: k for k in MatchKind}


# --- YAML: SafeLoader + StringMatch tags + duplicate-key check ---------------------------


class _Loader(yaml.SafeLoader):
    """SafeLoader that knows ztunnel's StringMatch tags and rejects duplicate keys."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[object, object]:
        seen: set[object] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, str | int):
                continue  # unhashable keys (a list, a mapping): SafeLoader refuses them below
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _construct_tag(kind: str) -> Callable[[yaml.SafeLoader, yaml.Node], dict[str, object]]:
    def construct(loader: yaml.SafeLoader, node: yaml.Node) -> dict[str, object]:
        if kind == "Presence":
            return {kind: []}  # value is irrelevant: ``!Presence []`` / ``!Presence``
        if not isinstance(node, yaml.ScalarNode):
            raise yaml.constructor.ConstructorError(
                None, None, f"!{kind} takes a string", node.start_mark
            )
        return {kind: loader.construct_scalar(node)}

    return construct


for _kind in _MATCH_KINDS:
    _Loader.add_constructor(f"!{_kind}", _construct_tag(_kind))


def parse_ip(text: str) -> IPAddress:
    """An IP address; a zone (``fe80::1%eth0``) is a ValueError: zones name an interface
    of one host, and an address that is only valid on one interface cannot identify a
    workload (comparisons would also never match the zone-less address on the wire)."""
    ip = ipaddress.ip_address(text)
    if isinstance(ip, ipaddress.IPv6Address) and ip.scope_id is not None:
        raise ValueError(f"{text!r} has a zone")
    return ip


# --- typed access to the parsed document, with paths for errors --------------------------


class _Node:
    """One value of the document and its path; accessors raise ConfigError at that path."""

    __slots__ = ("path", "source", "value")

    def __init__(self, source: str, path: str, value: object) -> None:
        self.source = source
        self.path = path
        self.value = value

    def error(self, problem: str) -> ConfigError:
        return ConfigError(self.source, self.path, problem)

    def child(self, name: str, value: object) -> _Node:
        return _Node(self.source, f"{self.path}.{name}" if self.path else name, value)

    def _type_error(self, expected: str) -> ConfigError:
        got = "null" if self.value is None else type(self.value).__name__
        return self.error(f"expected {expected}, got {got} {self.value!r}")

    def as_str(self) -> str:
        if not isinstance(self.value, str):
            raise self._type_error("a string")
        return self.value

    def as_bool(self) -> bool:
        if not isinstance(self.value, bool):
            raise self._type_error("true or false")
        return self.value

    def as_int(self, lo: int, hi: int, what: str = "an integer") -> int:
        value = self.value
        if isinstance(value, str) and value.isdigit():
            value = int(value)  # JSON (config_dump) renders integer map keys as strings
        if isinstance(value, bool) or not isinstance(value, int):
            raise self._type_error(f"{what} ({lo}..{hi})")
        if not lo <= value <= hi:
            raise self.error(f"expected {what} in {lo}..{hi}, got {value}")
        return value

    def as_port(self, allow_zero: bool = False) -> int:
        return self.as_int(0 if allow_zero else 1, 65535, "a port")

    def as_ip(self) -> IPAddress:
        text = self.as_str()
        try:
            ip = ipaddress.ip_address(text)
        except ValueError:
            raise self.error(f"expected an IP address, got {text!r}") from None
        if isinstance(ip, ipaddress.IPv6Address) and ip.scope_id is not None:
            raise self.error(f"expected an IP address without a zone, got {text!r}")
        return ip

    def as_cidr(self) -> IPNetwork:
        text = self.as_str()
        try:
            # strict=False: ztunnel's IpNet keeps "10.0.0.1/8" and matches on the network.
            net = ipaddress.ip_network(text, strict=False)
        except ValueError:
            raise self.error(f"expected a CIDR like 10.0.0.0/8 or an IP, got {text!r}") from None
        if getattr(net.network_address, "scope_id", None) is not None:
            raise self.error(f"expected a CIDR without a zone, got {text!r}")
        return net

    def as_enum(self, table: Mapping[str, T]) -> T:
        text = self.as_str()
        if text not in table:
            raise self.error(f"unknown value {text!r}; expected one of: {', '.join(table)}")
        return table[text]

    def as_list(self) -> list[_Node]:
        if not isinstance(self.value, list):
            raise self._type_error("a list")
        return [_Node(self.source, f"{self.path}[{i}]", v) for i, v in enumerate(self.value)]

    def as_entries(self) -> list[tuple[_Node, _Node]]:
        """Map entries as (key node, value node), for maps keyed by data, not field names."""
        if not isinstance(self.value, dict):
            raise self._type_error("a mapping")
        return [
            (
                _Node(self.source, f"{self.path}[{k!r}]", k),
                _Node(self.source, f"{self.path}[{k!r}]", v),
            )
            for k, v in self.value.items()
        ]

    def as_fields(self, allowed: Collection[str]) -> _Fields:
        if not isinstance(self.value, dict):
            raise self._type_error("a mapping")
        for key in self.value:
            if key not in allowed:
                raise self.child(str(key), None).error(
                    f"unknown field {key!r}; expected one of: {', '.join(allowed)}"
                )
        return _Fields(self, self.value)


class _Fields:
    """A mapping with a fixed set of field names (null counts as absent)."""

    __slots__ = ("_node", "_values")

    def __init__(self, node: _Node, values: Mapping[object, object]) -> None:
        self._node = node
        self._values = values

    def opt(self, name: str) -> _Node | None:
        value = self._values.get(name)
        return None if value is None else self._node.child(name, value)

    def req(self, name: str) -> _Node:
        found = self.opt(name)
        if found is None:
            raise self._node.child(name, None).error(f"missing required field {name!r}")
        return found

    def get(self, name: str, read: Callable[[_Node], T], default: T) -> T:
        found = self.opt(name)
        return default if found is None else read(found)

    def text(self, name: str, default: str = "") -> str:
        return self.get(name, _Node.as_str, default)

    def many(self, name: str, read: Callable[[_Node], T]) -> tuple[T, ...]:
        """A list field (absent = empty), each item read with ``read``."""
        found = self.opt(name)
        return () if found is None else tuple(read(item) for item in found.as_list())

    def texts(self, name: str) -> tuple[str, ...]:
        return self.many(name, _Node.as_str)


# --- shared pieces -----------------------------------------------------------------------


def _port_map(node: _Node) -> dict[int, int]:
    """``{svcPort: targetPort}``; a target of 0 means "use the endpoint's mapping"."""
    return {k.as_port(): v.as_port(allow_zero=True) for k, v in node.as_entries()}


def _network_address(node: _Node) -> NetworkAddress:
    text = node.as_str()
    network, sep, ip = text.partition("/")
    if not sep:
        raise node.error(f"expected 'network/IP' (e.g. '/10.0.0.1'), got {text!r}")
    try:
        return NetworkAddress(network, parse_ip(ip))
    except ValueError:
        raise node.error(f"expected 'network/IP' with a valid IP, got {text!r}") from None


def _gateway(node: _Node) -> GatewayAddress:
    fields = node.as_fields(("destination", "hboneMtlsPort"))
    dest = fields.req("destination")
    text = dest.as_str()
    namespace, sep, rest = text.partition("/")
    if not sep or not rest:
        raise dest.error(f"expected 'network/IP' or 'namespace/hostname', got {text!r}")
    destination: NetworkAddress | NamespacedHostname
    if "%" in rest:  # an IPv6 zone: not a hostname either (see parse_ip)
        raise dest.error(f"expected an address without a zone, got {text!r}")
    try:
        destination = NetworkAddress(namespace, parse_ip(rest))
    except ValueError:  # untagged enum in ztunnel: not an address, so a hostname
        destination = NamespacedHostname(namespace, rest)
    return GatewayAddress(destination, fields.get("hboneMtlsPort", _Node.as_port, HBONE_PORT))


# --- workloads ---------------------------------------------------------------------------

WORKLOAD_FIELDS = (
    "uid", "name", "namespace", "workloadIps", "serviceAccount", "trustDomain", "network",
    "protocol", "networkMode", "node", "hostname", "waypoint", "networkGateway", "nativeTunnel",
    "applicationTunnel", "authorizationPolicies", "status", "clusterId", "locality",
    "canonicalName", "canonicalRevision", "workloadName", "workloadType", "capacity", "services",
)  # fmt: skip


def _app_tunnel(node: _Node) -> ApplicationTunnel:
    fields = node.as_fields(("protocol", "port"))
    port = fields.get("port", lambda n: n.as_port(allow_zero=True), 0)
    return ApplicationTunnel(fields.req("protocol").as_enum(_APP_TUNNEL_PROTOCOLS), port or None)


def _locality(node: _Node) -> Locality:
    fields = node.as_fields(("region", "zone", "subzone"))
    return Locality(fields.text("region"), fields.text("zone"), fields.text("subzone"))


def _workload_type(node: _Node) -> WorkloadType:
    # ztunnel keeps a free string and lowercases it for baggage; we keep the four known kinds.
    lowered = _Node(node.source, node.path, node.as_str().lower())
    return lowered.as_enum(_WORKLOAD_TYPES) if lowered.value else WorkloadType.DEPLOYMENT


def _workload_services(node: _Node) -> dict[str, dict[int, int]]:
    if isinstance(node.value, list):  # config_dump shape: ["ns/hostname", ...]
        pairs: list[tuple[_Node, _Node | None]] = [(item, None) for item in node.as_list()]
    else:
        pairs = [(k, v) for k, v in node.as_entries()]
    out: dict[str, dict[int, int]] = {}
    for key, ports in pairs:
        name = key.as_str()
        if "/" not in name:
            raise key.error(f"expected a 'namespace/hostname' key, got {name!r}")
        out[name] = {} if ports is None or ports.value is None else _port_map(ports)
    return out


def _workload(node: _Node) -> Workload:
    f = node.as_fields(WORKLOAD_FIELDS)
    namespace = f.req("namespace").as_str()
    ips = tuple(n.as_ip() for n in f.req("workloadIps").as_list())  # required, may be []
    name = f.text("name")
    cluster_id = f.text("clusterId") or DEFAULT_CLUSTER_ID
    uid = f.text("uid")
    if not uid:
        if not name:
            raise node.child("uid", None).error(
                "missing required field 'uid' (or 'name' to derive it)"
            )
        uid = f"{cluster_id}//v1/Pod/{namespace}/{name}"
    return Workload(
        uid=uid,
        name=name,
        namespace=namespace,
        workload_ips=ips,
        service_account=f.text("serviceAccount") or "default",
        trust_domain=f.text("trustDomain") or DEFAULT_TRUST_DOMAIN,
        network=f.text("network"),
        protocol=f.get("protocol", lambda n: n.as_enum(_PROTOCOLS), TunnelProtocol.TCP),
        network_mode=f.get(
            "networkMode", lambda n: n.as_enum(_NETWORK_MODES), NetworkMode.STANDARD
        ),
        node=f.text("node"),
        hostname=f.text("hostname"),
        waypoint=f.get("waypoint", _gateway, None),
        network_gateway=f.get("networkGateway", _gateway, None),
        native_tunnel=f.get("nativeTunnel", _Node.as_bool, False),
        application_tunnel=f.get("applicationTunnel", _app_tunnel, None),
        authorization_policies=f.texts("authorizationPolicies"),
        status=f.get("status", lambda n: n.as_enum(_STATUSES), HealthStatus.HEALTHY),
        cluster_id=cluster_id,
        locality=f.get("locality", _locality, Locality()),
        canonical_name=f.text("canonicalName"),
        canonical_revision=f.text("canonicalRevision"),
        workload_name=f.text("workloadName"),
        workload_type=f.get("workloadType", _workload_type, WorkloadType.DEPLOYMENT),
        capacity=f.get("capacity", lambda n: n.as_int(0, 2**32 - 1, "a capacity"), 1),
        services=f.get("services", _workload_services, {}),
    )


# --- services ----------------------------------------------------------------------------

SERVICE_FIELDS = (
    "name", "namespace", "hostname", "vips", "ports", "subjectAltNames", "waypoint",
    "loadBalancer", "ipFamilies", "canonical", "visibility", "endpoints",
    "weightedWaypoints", "cidrVips",
)  # fmt: skip
_UNSUPPORTED_SERVICE_FIELDS = ("weightedWaypoints", "cidrVips")


def _load_balancer(node: _Node) -> LoadBalancer:
    f = node.as_fields(("routingPreferences", "mode", "healthPolicy"))
    scopes = {s: s for s in ROUTING_SCOPES}
    return LoadBalancer(
        routing_preferences=f.many("routingPreferences", lambda n: n.as_enum(scopes)),
        mode=f.get("mode", lambda n: n.as_enum(LB_MODES), LoadBalancerMode.UNSPECIFIED),
        health_policy=f.get(
            "healthPolicy", lambda n: n.as_enum(_HEALTH_POLICIES), HealthPolicy.ONLY_HEALTHY
        ),
    )


def _endpoint(node: _Node) -> Endpoint:
    f = node.as_fields(("workloadUid", "port", "status"))
    return Endpoint(
        workload_uid=f.req("workloadUid").as_str(),
        port=f.get("port", _port_map, {}),
        status=f.get("status", lambda n: n.as_enum(_STATUSES), HealthStatus.HEALTHY),
    )


def _service(node: _Node) -> Service:
    f = node.as_fields(SERVICE_FIELDS)
    for name in _UNSUPPORTED_SERVICE_FIELDS:
        if (found := f.opt(name)) is not None:
            raise found.error(f"{name!r} is not supported by ztunnel-py")
    families = {x: x for x in _IP_FAMILIES}
    return Service(
        name=f.req("name").as_str(),
        namespace=f.req("namespace").as_str(),
        hostname=f.req("hostname").as_str(),
        vips=f.many("vips", _network_address),
        ports=f.get("ports", _port_map, {}),
        subject_alt_names=f.texts("subjectAltNames"),
        waypoint=f.get("waypoint", _gateway, None),
        load_balancer=f.get("loadBalancer", _load_balancer, None),
        ip_families=f.get("ipFamilies", lambda n: n.as_enum(families), None),
        canonical=f.get("canonical", _Node.as_bool, False),
        visibility=f.get("visibility", lambda n: n.as_enum(_VISIBILITIES), Visibility.PUBLIC),
        endpoints=f.get("endpoints", lambda n: {ep.workload_uid: ep for ep in (
            _endpoint(v) for _, v in n.as_entries())}, {}),
    )  # fmt: skip


# --- policies ----------------------------------------------------------------------------

MATCH_FIELDS = (
    "namespaces", "notNamespaces", "serviceAccounts", "notServiceAccounts", "principals",
    "notPrincipals", "sourceIps", "notSourceIps", "destinationIps", "notDestinationIps",
    "destinationPorts", "notDestinationPorts",
)  # fmt: skip


def _string_match(node: _Node) -> StringMatch:
    if not isinstance(node.value, dict) or len(node.value) != 1:
        raise node.error("expected a string match: !Exact x, !Prefix x, !Suffix x or !Presence []")
    ((kind_name, value),) = node.value.items()
    kind = _Node(node.source, node.path, kind_name).as_enum(_MATCH_KINDS)
    if kind is MatchKind.PRESENCE:
        return StringMatch(kind)
    return StringMatch(kind, node.child(str(kind_name), value).as_str())


def _sa_match(node: _Node) -> ServiceAccountMatch:
    f = node.as_fields(("namespace", "serviceAccount"))
    return ServiceAccountMatch(f.req("namespace").as_str(), f.req("serviceAccount").as_str())


def _match(node: _Node) -> Match:
    f = node.as_fields(MATCH_FIELDS)
    return Match(
        namespaces=f.many("namespaces", _string_match),
        not_namespaces=f.many("notNamespaces", _string_match),
        service_accounts=f.many("serviceAccounts", _sa_match),
        not_service_accounts=f.many("notServiceAccounts", _sa_match),
        principals=f.many("principals", _string_match),
        not_principals=f.many("notPrincipals", _string_match),
        source_ips=f.many("sourceIps", _Node.as_cidr),
        not_source_ips=f.many("notSourceIps", _Node.as_cidr),
        destination_ips=f.many("destinationIps", _Node.as_cidr),
        not_destination_ips=f.many("notDestinationIps", _Node.as_cidr),
        destination_ports=f.many("destinationPorts", _Node.as_port),
        not_destination_ports=f.many("notDestinationPorts", _Node.as_port),
    )


def _rule(node: _Node) -> Rule:
    clauses: list[Clause] = [tuple(_match(m) for m in c.as_list()) for c in node.as_list()]
    return tuple(clauses)


def _policy(node: _Node) -> Authorization:
    f = node.as_fields(("name", "namespace", "scope", "action", "rules", "dryRun"))
    return Authorization(
        name=f.req("name").as_str(),
        namespace=f.req("namespace").as_str(),
        scope=f.req("scope").as_enum(_SCOPES),
        action=f.req("action").as_enum(_ACTIONS),
        rules=f.many("rules", _rule),
        dry_run=f.get("dryRun", _Node.as_bool, False),
    )


# --- the document ------------------------------------------------------------------------


def _with_endpoints(
    services: tuple[Service, ...], workloads: tuple[Workload, ...]
) -> tuple[Service, ...]:
    """Fill each service's endpoints from the workloads' ``services`` maps (as ztunnel does)."""
    out = []
    for svc in services:
        endpoints = dict(svc.endpoints)
        for w in workloads:
            if (ports := w.services.get(svc.key)) is not None:
                endpoints[w.uid] = Endpoint(w.uid, dict(ports), w.status)
        out.append(dataclasses.replace(svc, endpoints=endpoints))
    return tuple(out)


def _parse_yaml(text: str, source: str) -> object:
    try:
        return yaml.load(text, Loader=_Loader)  # _Loader is a SafeLoader
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(source, "", f"YAML syntax error{where}: {exc.problem}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(source, "", f"YAML error: {exc}") from exc
    except RecursionError as exc:  # PyYAML recurses once per nesting level
        raise ConfigError(source, "", "YAML error: nested too deeply") from exc


def _check_unique_addresses(source: str, workloads: tuple[Workload, ...]) -> None:
    """Two workloads with one IP (in one network): traffic to it would go to whichever
    was indexed last, and policy would judge the wrong pod. ztunnel's store keeps one."""
    owner: dict[tuple[str, IPAddress], int] = {}
    for i, w in enumerate(workloads):
        for j, ip in enumerate(w.workload_ips):
            first = owner.setdefault((w.network, ip), i)
            if first != i:
                raise ConfigError(
                    source,
                    f"workloads[{i}].workloadIps[{j}]",
                    f"{ip} is already the address of workloads[{first}] "
                    f"({workloads[first].uid}) in network {w.network!r}",
                )


def load_local_config(text: str, source: str) -> LocalConfig:
    """Parse ztunnel local-config YAML; ``source`` names it in errors (a path or ``LOCAL_XDS``).

    Raises:
        ConfigError: on any syntax, schema or value problem, naming the field path.
    """
    doc = _parse_yaml(text, source)
    if doc is None:
        return LocalConfig()
    top = _Node(source, "", doc).as_fields(("workloads", "policies", "services"))
    workloads = top.many("workloads", _workload)
    _check_unique_addresses(source, workloads)
    services = top.many("services", _service)
    policies = top.many("policies", _policy)
    assert isinstance(doc, dict)  # as_fields checked it
    raw = {str(k): v for k, v in doc.items()}
    return LocalConfig(workloads, _with_endpoints(services, workloads), policies, raw)


def load_local_config_file(path: str | Path) -> LocalConfig:
    """Read and parse a local-config file; unreadable files are ConfigErrors too."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(str(path), "", f"cannot read file: {exc}") from exc
    return load_local_config(text, str(path))
