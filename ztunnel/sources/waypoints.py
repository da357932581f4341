"""Waypoints in the mesh state, as istiod derives them for ztunnel (pure, any pod source).

What istiod does (``pilot/pkg/serviceregistry/ambient/waypoints.go``, ``workloads.go``,
``policies.go``), for sources that see Kubernetes-shaped objects (the cluster file, later
the Kubernetes source):

* **Waypoints** are Gateway API ``Gateway`` objects with ``gatewayClassName:
  istio-waypoint``. Its address is the hostname of the Service named after the Gateway in
  its namespace (what Istio's deployment controller creates and writes into the
  Gateway's status), HBONE port 15008. Without that Service the waypoint is "not ready"
  and binds nothing (a warning). Its instances are the pods labelled
  ``gateway.networking.k8s.io/gateway-name: <name>`` in its namespace; their service
  accounts are the waypoint's identities. ``istio.io/waypoint-for`` on the Gateway says
  what it serves: ``service`` (default), ``workload``, ``all`` or ``none``. Attachment
  from other namespaces follows the HBONE listener's ``allowedRoutes.namespaces.from``
  (``Same`` by default, ``All``, or ``Selector`` with ``matchLabels`` on the namespace; the
  cluster file does not support ``Selector`` and treats it as Same).
* **Binding** (``istio.io/use-waypoint: <name>``, namespace from
  ``istio.io/use-waypoint-namespace``, else the object's): the object's own label wins,
  ``none`` opts out, else the namespace's label. A Service gets the waypoint when it
  serves ``service``/``all``; a workload when it serves ``workload``/``all``. The
  waypoint's own Service never gets one.
* **Implicit allow** (istiod's ``PILOT_AUTO_ALLOW_WAYPOINT_POLICY``, off by default; the
  source decides whether to apply it): per waypoint with instances, an ALLOW policy
  ``<ns>/istio_allow_waypoint_<ns>_<name>`` (WORKLOAD_SELECTOR, principals
  ``<td>/ns/<ns>/sa/<sa>`` exactly) listed on every workload whose Services, or itself,
  use that waypoint. Being an ALLOW, it also refuses every client the destination's other
  ALLOW policies do not allow: traffic that goes around the waypoint. Without the flag
  nothing refuses such traffic except the destination's own L4 policies (Istio's default).
* **Port protocols** (``app_protocol``): Kubernetes ``appProtocol``, else the port name's
  prefix before ``-``, as istiod's ``ConvertProtocol`` + ``toAppProtocolFromProtocol``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ztunnel.model.authorization import Action, Authorization, Match, MatchKind, Scope, StringMatch
from ztunnel.model.identity import DEFAULT_TRUST_DOMAIN, Identity
from ztunnel.model.pod import USE_WAYPOINT_LABEL
from ztunnel.model.workload import HBONE_PORT, AppProtocol, GatewayAddress, NamespacedHostname

GATEWAY_API_GROUP = "gateway.networking.k8s.io"
WAYPOINT_CLASS = "istio-waypoint"
GATEWAY_NAME_LABEL = "gateway.networking.k8s.io/gateway-name"
USE_WAYPOINT_NAMESPACE_LABEL = "istio.io/use-waypoint-namespace"
WAYPOINT_FOR_LABEL = "istio.io/waypoint-for"
TUNNEL_LABEL = "networking.istio.io/tunnel"  # "http": the pod speaks HBONE natively
NONE = "none"
SERVICE, WORKLOAD, ALL = "service", "workload", "all"
SAME_NAMESPACE, ALL_NAMESPACES, SELECTED_NAMESPACES = "Same", "All", "Selector"
_TRAFFIC_TYPES = (SERVICE, WORKLOAD, ALL, NONE)
IMPLICIT_POLICY_PREFIX = "istio_allow_waypoint_"

# istio's protocol.Parse names -> workload.proto AppProtocol (toAppProtocolFromProtocol).
_PROTOCOLS = {
    "http": AppProtocol.HTTP11,
    "http2": AppProtocol.HTTP2,
    "grpc": AppProtocol.GRPC,
    "tls": AppProtocol.TLS,
    "https": AppProtocol.TLS,
    "tcp": AppProtocol.TCP,
}
_KUBE_APP_PROTOCOLS = {
    "kubernetes.io/h2c": AppProtocol.HTTP2,
    "kubernetes.io/ws": AppProtocol.HTTP11,
    "kubernetes.io/wss": AppProtocol.TLS,
}
_WELL_KNOWN_TCP_PORTS = frozenset({25, 53, 3306, 27017})


def app_protocol(port: int, name: str | None, declared: str | None) -> AppProtocol:
    """A Kubernetes Service port's protocol as istiod sends it to ztunnel."""
    text = declared if declared is not None else (name or "")
    if declared is not None and declared in _KUBE_APP_PROTOCOLS:
        return _KUBE_APP_PROTOCOLS[declared]
    if text.lower().startswith("grpc-web"):
        return AppProtocol.UNKNOWN  # GRPCWeb has no AppProtocol of its own
    prefix = text.split("-", 1)[0].lower()
    found = _PROTOCOLS.get(prefix)
    if found is not None:
        return found
    return AppProtocol.TCP if port in _WELL_KNOWN_TCP_PORTS else AppProtocol.UNKNOWN


# -- waypoints --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Waypoint:
    namespace: str
    name: str
    address: GatewayAddress | None  # None: its Service does not exist (not ready)
    traffic_type: str = SERVICE
    service_accounts: tuple[str, ...] = ()
    allowed_from: str = SAME_NAMESPACE  # the HBONE listener's allowedRoutes.namespaces.from
    selector: tuple[tuple[str, str], ...] = ()  # its matchLabels, with SELECTED_NAMESPACES

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    def serves(self, kind: str) -> bool:
        return self.traffic_type in (kind, ALL)

    def admits(self, namespace: str, namespace_labels: Mapping[str, str]) -> bool:
        if self.allowed_from == ALL_NAMESPACES:
            return True
        if self.allowed_from == SELECTED_NAMESPACES:
            return all(namespace_labels.get(k) == v for k, v in self.selector)
        return namespace == self.namespace  # Same, and anything unknown

    def implicit_policy_key(self) -> str | None:
        if not self.service_accounts:
            return None
        return f"{self.namespace}/{IMPLICIT_POLICY_PREFIX}{self.namespace}_{self.name}"


@dataclass(frozen=True, slots=True)
class PodInfo:
    """What the derivation needs of a pod (any source)."""

    name: str
    namespace: str
    service_account: str
    labels: Mapping[str, str]


@dataclass(frozen=True, slots=True)
class ServiceInfo:
    """What the derivation needs of a Service: its identity and labels."""

    name: str
    namespace: str
    hostname: str
    labels: Mapping[str, str]


@dataclass
class WaypointIndex:
    """The cluster's waypoints, and what did not bind (istiod's status conditions)."""

    waypoints: dict[str, Waypoint] = field(default_factory=dict)  # by ns/name
    warnings: list[str] = field(default_factory=list)


def is_waypoint_gateway(doc: Any) -> bool:
    return (
        isinstance(doc, Mapping)
        and doc.get("kind") == "Gateway"
        and str(doc.get("apiVersion", "")).startswith(GATEWAY_API_GROUP + "/")
        and isinstance(doc.get("spec"), Mapping)
        and doc["spec"].get("gatewayClassName") == WAYPOINT_CLASS
    )


def hbone_allowed_namespaces(spec: Mapping[str, Any]) -> Mapping[str, Any]:
    """The first HBONE listener's ``allowedRoutes.namespaces`` (``{}`` when absent)."""
    listeners = spec.get("listeners")
    for listener in listeners if isinstance(listeners, list) else ():
        if not isinstance(listener, Mapping):
            continue
        if listener.get("protocol") == "HBONE" and listener.get("port") == HBONE_PORT:
            routes = listener.get("allowedRoutes")
            namespaces = routes.get("namespaces") if isinstance(routes, Mapping) else None
            return namespaces if isinstance(namespaces, Mapping) else {}
    return {}


def _allowed_from(spec: Mapping[str, Any]) -> str:
    """The cluster file's admission: All or Same (no Selector support)."""
    is_all = hbone_allowed_namespaces(spec).get("from") == ALL_NAMESPACES
    return ALL_NAMESPACES if is_all else SAME_NAMESPACE


def index_waypoints(
    documents: Iterable[Any],
    pods: Sequence[PodInfo],
    services: Sequence[ServiceInfo],
) -> WaypointIndex:
    """Every ``istio-waypoint`` Gateway among ``documents`` as a ``Waypoint``."""
    out = WaypointIndex()
    by_key = {(s.namespace, s.name): s for s in services}
    for doc in documents:
        if not is_waypoint_gateway(doc):
            continue
        meta = doc.get("metadata") or {}
        name, namespace = str(meta.get("name", "")), str(meta.get("namespace") or "default")
        labels = meta.get("labels") or {}
        traffic = (
            str(labels.get(WAYPOINT_FOR_LABEL, SERVICE)) if isinstance(labels, Mapping) else SERVICE
        )
        if traffic not in _TRAFFIC_TYPES:
            out.warnings.append(
                f"Gateway {namespace}/{name}: {WAYPOINT_FOR_LABEL}={traffic!r} is not one of "
                f"{', '.join(_TRAFFIC_TYPES)}; using {SERVICE}"
            )
            traffic = SERVICE
        svc = by_key.get((namespace, name))
        address = None
        if svc is None:
            out.warnings.append(
                f"Gateway {namespace}/{name}: no Service {namespace}/{name} for the waypoint; "
                "it is not ready and binds nothing"
            )
        else:
            address = GatewayAddress(NamespacedHostname(namespace, svc.hostname), HBONE_PORT)
        accounts = sorted(
            {
                p.service_account
                for p in pods
                if p.namespace == namespace and p.labels.get(GATEWAY_NAME_LABEL) == name
            }
        )
        allowed = _allowed_from(doc["spec"])
        wp = Waypoint(namespace, name, address, traffic, tuple(accounts), allowed)
        out.waypoints[wp.key] = wp
    return out


def _use_waypoint(labels: Mapping[str, str], namespace: str) -> tuple[str | None, bool]:
    """(``ns/name`` of the waypoint the labels ask for, opted out with ``none``)."""
    value = labels.get(USE_WAYPOINT_LABEL)
    if value is None:
        return None, False
    if value == NONE:
        return None, True
    return f"{labels.get(USE_WAYPOINT_NAMESPACE_LABEL, namespace)}/{value}", False


def _target(
    index: WaypointIndex,
    what: str,
    labels: Mapping[str, str],
    namespace: str,
    namespace_labels: Mapping[str, str],
) -> tuple[Waypoint | None, bool]:
    """istiod's ``fetchWaypointForTarget``: (waypoint, from the object's own label)."""
    own, opted_out = _use_waypoint(labels, namespace)
    if opted_out:
        return None, True
    wanted = own or _use_waypoint(namespace_labels, namespace)[0]
    if wanted is None:
        return None, False
    wp = index.waypoints.get(wanted)
    if wp is None or wp.address is None:
        index.warnings.append(f"{what}: waypoint {wanted} is not ready (no such waypoint)")
        return None, own is not None
    if not wp.admits(namespace, namespace_labels):
        index.warnings.append(f"{what}: waypoint {wanted} does not allow namespace {namespace}")
        return None, own is not None
    return wp, own is not None


def bound_waypoint(
    index: WaypointIndex,
    kind: str,
    what: str,
    labels: Mapping[str, str],
    namespace: str,
    namespace_labels: Mapping[str, str],
) -> Waypoint | None:
    """The waypoint a Service (``kind`` SERVICE) or workload (WORKLOAD) with these labels
    binds to: ``_target`` plus the traffic-type check. ``what`` names it in warnings. The
    caller has already excluded the waypoint's own Service or pods (sources tell them apart
    differently)."""
    wp, own = _target(index, what, labels, namespace, namespace_labels)
    if wp is None or wp.serves(kind):
        return wp
    # A workload inheriting a service waypoint from its namespace is normal, not an error.
    if own or kind == SERVICE:
        index.warnings.append(f"{what}: waypoint {wp.key} does not serve {kind} traffic")
    return None


def service_waypoint(
    index: WaypointIndex, svc: ServiceInfo, namespace_labels: Mapping[str, str]
) -> Waypoint | None:
    """The waypoint a Service's traffic goes through (``fetchWaypointForService``)."""
    if f"{svc.namespace}/{svc.name}" in index.waypoints:
        return None  # the waypoint's own Service
    what = f"Service {svc.namespace}/{svc.name}"
    return bound_waypoint(index, SERVICE, what, svc.labels, svc.namespace, namespace_labels)


def workload_waypoint(
    index: WaypointIndex, pod: PodInfo, namespace_labels: Mapping[str, str]
) -> Waypoint | None:
    """The waypoint traffic addressed to this pod goes through (``fetchWaypointForWorkload``)."""
    if pod.labels.get(GATEWAY_NAME_LABEL):
        return None  # a waypoint's own pod
    what = f"pod {pod.namespace}/{pod.name}"
    return bound_waypoint(index, WORKLOAD, what, pod.labels, pod.namespace, namespace_labels)


def implicit_policy(wp: Waypoint, trust_domain: str = DEFAULT_TRUST_DOMAIN) -> Authorization:
    """``istio_allow_waypoint_<ns>_<name>``: ALLOW the waypoint's own identities."""
    principals = tuple(
        StringMatch(MatchKind.EXACT, Identity(trust_domain, wp.namespace, sa).principal)
        for sa in wp.service_accounts
    )
    return Authorization(
        name=f"{IMPLICIT_POLICY_PREFIX}{wp.namespace}_{wp.name}",
        namespace=wp.namespace,
        scope=Scope.WORKLOAD_SELECTOR,
        action=Action.ALLOW,
        rules=(((Match(principals=principals),),),),
    )


def implicit_policy_keys(own: Waypoint | None, services: Iterable[Waypoint | None]) -> list[str]:
    """The implicit-allow keys a workload lists: its Services' waypoints and its own."""
    keys = [w.implicit_policy_key() for w in (*services, own) if w is not None]
    return list(dict.fromkeys(k for k in keys if k is not None))
