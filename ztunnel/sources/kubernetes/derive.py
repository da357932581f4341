"""Kubernetes objects → the mesh model, as istiod derives it for ztunnel. Pure functions.

Follows istiod's ambient index (pilot/pkg/serviceregistry/kube/controller/ambient):

- A pod that is not terminal and has IPs is a workload ``<cluster>//Pod/<ns>/<name>``
  with its service account, node, canonical name/revision (labels, else the deployment,
  job or cronjob name), HEALTHY when its Ready condition is True and it is not being
  deleted, HBONE once the pod carries ``ambient.istio.io/redirection: enabled`` (the
  annotation the enrolling node agent writes) or the native-tunnel label.
- A Service is ``<name>.<ns>.svc.<domain>`` with its cluster IPs as VIPs and its ports
  (a named target port is 0 on the service and resolved per pod against the pod's TCP
  container ports; a pod without that port does not serve it). Pods join a service by
  its selector, or, for services without one, through an EndpointSlice whose endpoint
  names the pod; other EndpointSlice endpoints (IPs of no pod) become host-network
  workloads ``<cluster>/discovery.k8s.io/EndpointSlice/<ns>/<slice>/<ip>`` whose health is
  the endpoint's ``ready`` condition.
- ``istio.io/use-waypoint`` (+ ``istio.io/use-waypoint-namespace``) on the pod or service,
  else on its namespace, names a waypoint Gateway; ``none`` opts out. The Gateway must be
  ready (``status.addresses``), admit the namespace (its HBONE listener's allowedRoutes)
  and carry the traffic type (``istio.io/waypoint-for``: service by default).
- Enrollment (``in_mesh``) is istio-cni's rule: ``wants_ambient`` and no sidecar, no host
  network, and never the agent's own pod.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ztunnel.model.address import IPAddress, canonical_ip
from ztunnel.model.identity import DEFAULT_CLUSTER_ID
from ztunnel.model.pod import (
    REDIRECTION_ANNOTATION,
    MeshState,
    NetnsRef,
    Pod,
    PodPhase,
    wants_ambient,
)
from ztunnel.model.workload import (
    GatewayAddress,
    HealthStatus,
    LoadBalancer,
    LoadBalancerMode,
    NamespacedHostname,
    NetworkAddress,
    NetworkMode,
    Service,
    TunnelProtocol,
    Workload,
    WorkloadType,
)
from ztunnel.sources import waypoints as wp

JSON = Mapping[str, Any]

REDIRECTION_ENABLED = "enabled"
MANAGED_GATEWAY_LABEL = "gateway.istio.io/managed"
MANAGED_BY_MESH = "istio.io-mesh-controller"
SIDECAR_STATUS_ANNOTATION = "sidecar.istio.io/status"
SERVICE_NAME_LABEL = "kubernetes.io/service-name"
_CRONJOB_NAME = re.compile(r"^(.+)-\d{8,10}$")
_CLOSE_SCOPES = ("Network", "Region", "Zone", "Subzone")


@dataclass(frozen=True, slots=True)
class Settings:
    """What the derivation needs besides the objects (the agent's configuration)."""

    node_name: str
    cluster_id: str = DEFAULT_CLUSTER_ID
    domain: str = "cluster.local"
    trust_domain: str = "cluster.local"
    network: str = ""
    system_namespace: str = "istio-system"
    self_pod: tuple[str, str] | None = None  # (namespace, name) of the agent's own pod


@dataclass(frozen=True, slots=True)
class ClusterObjects:
    """Everything the source watches, each by ``namespace/name`` (``name`` for namespaces)."""

    pods: Mapping[str, JSON] = field(default_factory=dict)
    namespaces: Mapping[str, JSON] = field(default_factory=dict)
    services: Mapping[str, JSON] = field(default_factory=dict)
    endpoint_slices: Mapping[str, JSON] = field(default_factory=dict)
    gateways: Mapping[str, JSON] = field(default_factory=dict)


# --- small accessors (objects come from the wire: every field may be missing) ------------


def _meta(obj: JSON) -> JSON:
    return _map(obj.get("metadata"))


def _map(value: Any) -> JSON:
    return value if isinstance(value, Mapping) else {}


def _list(value: Any) -> Sequence[Any]:
    return value if isinstance(value, list) else ()


def _strs(value: Any) -> dict[str, str]:
    return {str(k): str(v) for k, v in _map(value).items() if isinstance(v, str)}


def labels_of(obj: JSON) -> dict[str, str]:
    return _strs(_meta(obj).get("labels"))


def annotations_of(obj: JSON) -> dict[str, str]:
    return _strs(_meta(obj).get("annotations"))


def _name(obj: JSON) -> str:
    return str(_meta(obj).get("name") or "")


def _namespace(obj: JSON) -> str:
    return str(_meta(obj).get("namespace") or "")


def _ips(values: Iterable[Any]) -> tuple[IPAddress, ...]:
    out: list[IPAddress] = []
    for value in values:
        try:
            ip = canonical_ip(str(value))
        except ValueError:
            continue  # garbage in a status field is skipped, as istiod does
        if ip not in out:
            out.append(ip)
    return tuple(out)


def pod_ips(pod: JSON) -> tuple[IPAddress, ...]:
    status = _map(pod.get("status"))
    listed = [_map(p).get("ip") for p in _list(status.get("podIPs"))]
    return _ips(listed or ([status["podIP"]] if status.get("podIP") else []))


def pod_phase(pod: JSON) -> PodPhase:
    try:
        return PodPhase(str(_map(pod.get("status")).get("phase") or "Pending"))
    except ValueError:
        return PodPhase.UNKNOWN


def pod_ready(pod: JSON) -> bool:
    for cond in _list(_map(pod.get("status")).get("conditions")):
        if _map(cond).get("type") == "Ready":
            return _map(cond).get("status") == "True"
    return False


def _spec(obj: JSON) -> JSON:
    return _map(obj.get("spec"))


def _tcp_port_named(pod: JSON, name: str) -> int | None:
    for container in _list(_spec(pod).get("containers")):
        for port in _list(_map(container).get("ports")):
            p = _map(port)
            if p.get("name") == name and p.get("protocol", "TCP") == "TCP":
                number = p.get("containerPort")
                return number if isinstance(number, int) else None
    return None


# --- enrollment ---------------------------------------------------------------------------


def redirection_enabled(pod: JSON, namespace: JSON | None, settings: Settings) -> bool:
    """istio-cni's PodRedirectionEnabled, plus: never the agent itself."""
    meta_ns, name = _namespace(pod), _name(pod)
    if settings.self_pod == (meta_ns, name):
        return False
    if meta_ns == settings.system_namespace and labels_of(pod).get("app") == "ztunnel":
        return False
    if SIDECAR_STATUS_ANNOTATION in annotations_of(pod) or _spec(pod).get("hostNetwork") is True:
        return False
    return wants_ambient(labels_of(pod), labels_of(namespace) if namespace else {})


def workload_uid(cluster_id: str, namespace: str, name: str) -> str:
    """istiod's ``generatePodUID``: ``<cluster>//Pod/<namespace>/<name>``."""
    return f"{cluster_id}//Pod/{namespace}/{name}"


def node_pods(
    objects: ClusterObjects, settings: Settings, netns: Mapping[str, NetnsRef]
) -> tuple[Pod, ...]:
    """This node's pods as enrollment sees them; ``netns`` is by ``metadata.uid``."""
    out = []
    for obj in objects.pods.values():
        if _spec(obj).get("nodeName") != settings.node_name:
            continue
        meta = _meta(obj)
        namespace = objects.namespaces.get(_namespace(obj))
        k8s_uid = str(meta.get("uid") or "")
        out.append(
            Pod(
                uid=workload_uid(settings.cluster_id, _namespace(obj), _name(obj)),
                name=_name(obj),
                namespace=_namespace(obj),
                service_account=str(_spec(obj).get("serviceAccountName") or "default"),
                node=settings.node_name,
                labels=labels_of(obj),
                annotations=annotations_of(obj),
                ips=pod_ips(obj),
                netns=netns.get(k8s_uid),
                phase=pod_phase(obj),
                in_mesh=redirection_enabled(obj, namespace, settings),
                k8s_uid=k8s_uid,
            )
        )
    return tuple(sorted(out, key=lambda p: p.key))


# --- workload names -----------------------------------------------------------------------


def workload_name_and_type(pod: JSON) -> tuple[str, WorkloadType]:
    """istiod's GetDeployMetaFromPod: the controller's name, a ReplicaSet seen as its
    Deployment (pod-template-hash), a Job named ``<cronjob>-<8..10 digits>`` as its CronJob."""
    meta = _meta(pod)
    name = _name(pod)
    if not meta.get("generateName"):
        return name, WorkloadType.POD
    owner = next(
        (_map(o) for o in _list(meta.get("ownerReferences")) if _map(o).get("controller") is True),
        None,
    )
    if owner is None:
        return name, WorkloadType.POD
    kind, owner_name = owner.get("kind"), str(owner.get("name") or "")
    template_hash = labels_of(pod).get("pod-template-hash", "")
    if kind == "ReplicaSet" and template_hash and owner_name.endswith(template_hash):
        return owner_name.removesuffix(f"-{template_hash}"), WorkloadType.DEPLOYMENT
    if kind == "Job":
        m = _CRONJOB_NAME.match(owner_name)
        return (m.group(1), WorkloadType.CRONJOB) if m else (owner_name, WorkloadType.JOB)
    return name, WorkloadType.POD


def canonical_service(pod_labels: Mapping[str, str], workload_name: str) -> tuple[str, str]:
    """istio's kubelabels.CanonicalService."""
    name = (
        pod_labels.get("service.istio.io/canonical-name")
        or pod_labels.get("app.kubernetes.io/name")
        or pod_labels.get("app")
        or workload_name
    )
    revision = (
        pod_labels.get("service.istio.io/canonical-revision")
        or pod_labels.get("app.kubernetes.io/version")
        or pod_labels.get("version")
        or "latest"
    )
    return name, revision


# --- waypoints ----------------------------------------------------------------------------


def waypoints(gateways: Mapping[str, JSON], network: str = "") -> wp.WaypointIndex:
    """Ready Gateways (``status.addresses`` set) by ``namespace/name``; binding them to
    services and pods is ``sources.waypoints``' (the same rules as the cluster file)."""
    out = wp.WaypointIndex()
    for key, gw in gateways.items():
        address = _gateway_address(gw, network)
        if address is None:
            continue
        route = wp.hbone_allowed_namespaces(_spec(gw))
        out.waypoints[key] = wp.Waypoint(
            namespace=_namespace(gw),
            name=_name(gw),
            address=address,
            traffic_type=labels_of(gw).get(wp.WAYPOINT_FOR_LABEL, wp.SERVICE),
            allowed_from=str(route.get("from") or wp.SAME_NAMESPACE),
            selector=tuple(sorted(_strs(_map(route.get("selector")).get("matchLabels")).items())),
        )
    return out


def _gateway_address(gw: JSON, network: str) -> GatewayAddress | None:
    addresses = [_map(a) for a in _list(_map(gw.get("status")).get("addresses"))]
    for addr in addresses:  # a hostname is preferred, as istiod does
        if addr.get("type") == "Hostname" and addr.get("value"):
            return GatewayAddress(NamespacedHostname(_namespace(gw), str(addr["value"])))
    for addr in addresses:
        try:
            ip = canonical_ip(str(addr.get("value") or ""))
        except ValueError:
            continue
        return GatewayAddress(NetworkAddress(network, ip))
    return None


def waypoint_for(
    obj: JSON, namespace: JSON | None, kind: str, known: wp.WaypointIndex
) -> GatewayAddress | None:
    """The address of the waypoint ``obj`` (a Service or pod, ``kind`` SERVICE or WORKLOAD)
    binds to, by its own ``use-waypoint`` label else its namespace's."""
    ns = _namespace(obj)
    what = f"{obj.get('kind') or kind} {ns}/{_name(obj)}"
    ns_labels = labels_of(namespace) if namespace is not None else {}
    found = wp.bound_waypoint(known, kind, what, labels_of(obj), ns, ns_labels)
    return found.address if found is not None else None


# --- services -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _ServiceInfo:
    service: Service
    selector: Mapping[str, str]
    target_names: Mapping[int, str]  # service port -> named targetPort
    port_names: Mapping[str, int]  # service port name -> service port


def service_hostname(name: str, namespace: str, domain: str) -> str:
    return f"{name}.{namespace}.svc.{domain}"


def _service_info(
    svc: JSON, namespace: JSON | None, settings: Settings, known: wp.WaypointIndex
) -> _ServiceInfo:
    spec = _spec(svc)
    ports: dict[int, int] = {}
    target_names: dict[int, str] = {}
    port_names: dict[str, int] = {}
    for raw in _list(spec.get("ports")):
        p = _map(raw)
        number = p.get("port")
        if not isinstance(number, int):
            continue
        target = p.get("targetPort", number)
        if isinstance(target, str) and not target.isdigit():
            ports[number] = 0  # resolved per pod
            target_names[number] = target
        else:
            ports[number] = int(target)
        port_names[str(p.get("name") or "")] = number
    cluster_ips = _list(spec.get("clusterIPs")) or [spec.get("clusterIP")]
    vips = tuple(
        NetworkAddress(settings.network, ip)
        for ip in _ips(v for v in cluster_ips if v and v != "None")
    )
    is_waypoint = labels_of(svc).get(MANAGED_GATEWAY_LABEL) == MANAGED_BY_MESH
    service = Service(
        name=_name(svc),
        namespace=_namespace(svc),
        hostname=service_hostname(_name(svc), _namespace(svc), settings.domain),
        vips=vips,
        ports=ports,
        waypoint=None if is_waypoint else waypoint_for(svc, namespace, wp.SERVICE, known),
        load_balancer=_load_balancer(spec, is_waypoint),
    )
    return _ServiceInfo(service, _strs(spec.get("selector")), target_names, port_names)


def _load_balancer(spec: JSON, is_waypoint: bool) -> LoadBalancer | None:
    if spec.get("internalTrafficPolicy") == "Local":
        return LoadBalancer(routing_preferences=("Node",), mode=LoadBalancerMode.STRICT)
    if spec.get("trafficDistribution") == "PreferClose" or is_waypoint:
        return LoadBalancer(routing_preferences=_CLOSE_SCOPES, mode=LoadBalancerMode.FAILOVER)
    return None


def _pod_ports(info: _ServiceInfo, pod: JSON) -> dict[int, int]:
    """istiod's constructServices for one service: named target ports resolved, or the port
    dropped when the pod does not have it."""
    out = {}
    for svc_port, target in info.service.ports.items():
        name = info.target_names.get(svc_port)
        if name is not None:
            resolved = _tcp_port_named(pod, name)
            if resolved is None:
                continue
            target = resolved
        out[svc_port] = target
    return out


def _slice_ports(info: _ServiceInfo, es: JSON) -> dict[int, int]:
    """EndpointSlice ports (named after service ports, numbered with the target port)."""
    out = {}
    for raw in _list(es.get("ports")):
        p = _map(raw)
        if p.get("protocol", "TCP") != "TCP" or not isinstance(p.get("port"), int):
            continue
        svc_port = info.port_names.get(str(p.get("name") or ""))
        if svc_port is not None:
            out[svc_port] = int(p["port"])
    return out


# --- the whole state ----------------------------------------------------------------------


def mesh_state(
    objects: ClusterObjects, settings: Settings
) -> tuple[MeshState, dict[str, dict[str, str]]]:
    """(workloads and services without policies, labels by workload uid for policy
    selection). Policies are attached by the caller (``policy.istio.attach_policies``)."""
    known = waypoints(objects.gateways, settings.network)
    infos: dict[str, _ServiceInfo] = {}
    for key, svc in sorted(objects.services.items()):
        ns = objects.namespaces.get(_namespace(svc))
        infos[key] = _service_info(svc, ns, settings, known)
    by_target = _slice_members(objects.endpoint_slices)
    selecting = _selector_index(infos.values())
    workloads: list[Workload] = []
    pod_labels: dict[str, dict[str, str]] = {}
    for key, pod in sorted(objects.pods.items()):
        candidates = _candidates(selecting, _namespace(pod), labels_of(pod))
        wl = _pod_workload(pod, objects, settings, infos, candidates, by_target.get(key, ()), known)
        if wl is not None:
            workloads.append(wl)
            pod_labels[wl.uid] = labels_of(pod)
    workloads.extend(_slice_workloads(objects.endpoint_slices, infos, settings))
    services = tuple(i.service for i in infos.values())
    return MeshState(workloads=tuple(workloads), services=services), pod_labels


_SelectorIndex = dict[tuple[str, str, str], list[_ServiceInfo]]


def _selector_index(infos: Iterable[_ServiceInfo]) -> _SelectorIndex:
    """Services with a selector by (namespace, one of their selector's label pairs): a pod
    then checks only services that can select it, not every service of the cluster."""
    index: _SelectorIndex = {}
    for info in infos:
        if info.selector:
            label, value = min(info.selector.items())
            index.setdefault((info.service.namespace, label, value), []).append(info)
    return index


def _candidates(
    index: _SelectorIndex, namespace: str, pod_labels: Mapping[str, str]
) -> list[_ServiceInfo]:
    out: list[_ServiceInfo] = []
    for label, value in pod_labels.items():
        out.extend(index.get((namespace, label, value), ()))
    return out


def _slice_members(slices: Mapping[str, JSON]) -> dict[str, list[tuple[str, JSON]]]:
    """Pod ``namespace/name`` → (service key, slice) for every slice endpoint naming a pod."""
    out: dict[str, list[tuple[str, JSON]]] = {}
    for es in slices.values():
        service = labels_of(es).get(SERVICE_NAME_LABEL)
        if not service or es.get("addressType") == "FQDN":
            continue
        for ep in _list(es.get("endpoints")):
            ref = _map(_map(ep).get("targetRef"))
            if ref.get("kind") == "Pod" and ref.get("name"):
                pod_key = f"{ref.get('namespace') or _namespace(es)}/{ref['name']}"
                out.setdefault(pod_key, []).append((f"{_namespace(es)}/{service}", es))
    return out


def _pod_workload(
    pod: JSON,
    objects: ClusterObjects,
    settings: Settings,
    infos: Mapping[str, _ServiceInfo],
    candidates: Sequence[_ServiceInfo],
    slices: Sequence[tuple[str, JSON]],
    known: wp.WaypointIndex,
) -> Workload | None:
    phase, ips = pod_phase(pod), pod_ips(pod)
    if phase in (PodPhase.SUCCEEDED, PodPhase.FAILED) or not ips:
        return None
    ns_name, pod_lbls, pod_ann = _namespace(pod), labels_of(pod), annotations_of(pod)
    namespace = objects.namespaces.get(ns_name)
    services: dict[str, dict[int, int]] = {}
    for info in candidates:  # same namespace, sharing a selector label: check the rest
        if _selects(info.selector, pod_lbls):
            services[info.service.key] = _pod_ports(info, pod)
    for svc_key, es in slices:  # services without a selector, through their slices
        by_slice = infos.get(svc_key)
        if by_slice and not by_slice.selector and by_slice.service.key not in services:
            services[by_slice.service.key] = _slice_ports(by_slice, es)
    ready = pod_ready(pod) and not _meta(pod).get("deletionTimestamp")
    native = pod_lbls.get(wp.TUNNEL_LABEL) == "http"
    hbone = native or pod_ann.get(REDIRECTION_ANNOTATION) == REDIRECTION_ENABLED
    wl_name, wl_type = workload_name_and_type(pod)
    canonical, revision = canonical_service(pod_lbls, wl_name)
    is_waypoint = wp.GATEWAY_NAME_LABEL in pod_lbls
    return Workload(
        uid=workload_uid(settings.cluster_id, ns_name, _name(pod)),
        name=_name(pod),
        namespace=ns_name,
        workload_ips=ips,
        service_account=str(_spec(pod).get("serviceAccountName") or "default"),
        trust_domain=settings.trust_domain,
        network=settings.network,
        protocol=TunnelProtocol.HBONE if hbone else TunnelProtocol.TCP,
        network_mode=NetworkMode.HOST_NETWORK
        if _spec(pod).get("hostNetwork") is True
        else NetworkMode.STANDARD,
        node=str(_spec(pod).get("nodeName") or ""),
        waypoint=None if is_waypoint else waypoint_for(pod, namespace, wp.WORKLOAD, known),
        native_tunnel=native,
        status=HealthStatus.HEALTHY if ready else HealthStatus.UNHEALTHY,
        cluster_id=settings.cluster_id,
        canonical_name=canonical,
        canonical_revision=revision,
        workload_name=wl_name,
        workload_type=wl_type,
        services=services,
    )


def _selects(selector: Mapping[str, str], pod_labels: Mapping[str, str]) -> bool:
    return all(pod_labels.get(k) == v for k, v in selector.items())


def _slice_workloads(
    slices: Mapping[str, JSON], infos: Mapping[str, _ServiceInfo], settings: Settings
) -> list[Workload]:
    """Workloads for slice endpoints that are not pods (a Service fronting external IPs)."""
    out = []
    for es in slices.values():
        service = labels_of(es).get(SERVICE_NAME_LABEL)
        found = infos.get(f"{_namespace(es)}/{service}") if service else None
        if found is None or es.get("addressType") == "FQDN":
            continue
        info = found
        ports = _slice_ports(info, es)
        seen: set[IPAddress] = set()
        for raw in _list(es.get("endpoints")):
            ep = _map(raw)
            if _map(ep.get("targetRef")).get("kind") == "Pod":
                continue  # pods are workloads of their own, with far more detail
            ips = _ips(_list(ep.get("addresses"))[:1])
            if not ips or ips[0] in seen:
                continue
            seen.add(ips[0])
            ready = _map(ep.get("conditions")).get("ready")
            out.append(
                Workload(
                    uid=f"{settings.cluster_id}/discovery.k8s.io/EndpointSlice/"
                    f"{_namespace(es)}/{_name(es)}/{ips[0]}",
                    name=_name(es),
                    namespace=_namespace(es),
                    workload_ips=ips,
                    trust_domain=settings.trust_domain,
                    network=settings.network,
                    network_mode=NetworkMode.HOST_NETWORK,
                    status=HealthStatus.UNHEALTHY if ready is False else HealthStatus.HEALTHY,
                    cluster_id=settings.cluster_id,
                    workload_name=_name(es),
                    workload_type=WorkloadType.POD,
                    services={info.service.key: ports},
                )
            )
    return out
