"""A cluster file as the agent sees it: this node's pods, and the mesh's state.

Pods whose namespace is labelled ``istio.io/dataplane-mode=ambient`` are HBONE
workloads; a pod label ``=none`` opts one out, and ``=ambient`` on a pod enrolls it
even in an unlabelled namespace (Istio's rule, ``model.pod.wants_ambient``).
Everything else is a plain-TCP workload. Services select pods by label, as in
Kubernetes; their endpoints are expressed the local-config way (each selected
workload's ``services`` map) for the state store to derive.

Waypoints (``sources/waypoints.py``, istiod's rules): ``Gateway`` documents of class
``istio-waypoint`` among the policies, ``istio.io/use-waypoint`` on a namespace, Service
or pod, each port's declared protocol, and (with istiod's
``PILOT_AUTO_ALLOW_WAYPOINT_POLICY`` set under ``istiod:`` in the file; off by default, as
in Istio) the implicit ALLOW of each waypoint's identity on the workloads behind it, which
refuses clients that go around it. Gateway API documents (Gateway, HTTPRoute, GRPCRoute),
Kubernetes Service documents and AuthorizationPolicies with targetRefs are the waypoint's,
never the L4 translator's.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from ztunnel.model.authorization import Authorization
from ztunnel.model.pod import MeshState, NetnsRef, Pod, PodSnapshot, wants_ambient
from ztunnel.model.workload import NetworkAddress, Service, TunnelProtocol, Workload
from ztunnel.policy.istio import PolicyDocuments, attach_policies, translate_sources
from ztunnel.sources import waypoints as wp
from ztunnel.sources.clusterfile.layout import ClusterLayout, layout
from ztunnel.sources.clusterfile.spec import ClusterSpec, PodSpec, ServiceSpec


def pod_uid(pod: PodSpec) -> str:
    return f"Kubernetes//Pod/{pod.namespace}/{pod.name}"


def in_mesh(spec: ClusterSpec, pod: PodSpec) -> bool:
    """Whether the pod's traffic is captured into the mesh."""
    ns = spec.namespaces.get(pod.namespace)
    return wants_ambient(pod.labels, ns.labels if ns is not None else {})


def _canonical_name(pod: PodSpec) -> str:
    labels = pod.labels
    return (
        labels.get("service.istio.io/canonical-name")
        or labels.get("app.kubernetes.io/name")
        or labels.get("app")
        or pod.name
    )


def _is_waypoint_document(doc: Any) -> bool:
    """Documents only waypoints read: Gateway API objects, Kubernetes Service documents and
    AuthorizationPolicies bound with targetRef(s) (istiod never sends those to ztunnel)."""
    if not isinstance(doc, Mapping):
        return False
    api = str(doc.get("apiVersion", ""))
    if api.startswith(wp.GATEWAY_API_GROUP + "/") or (api == "v1" and doc.get("kind") == "Service"):
        return True
    spec = doc.get("spec")
    return (
        doc.get("kind") == "AuthorizationPolicy"
        and isinstance(spec, Mapping)
        and bool(spec.get("targetRef") or spec.get("targetRefs"))
    )


def _ns_labels(spec: ClusterSpec, namespace: str) -> Mapping[str, str]:
    ns = spec.namespaces.get(namespace)
    return ns.labels if ns is not None else {}


def index_waypoints(spec: ClusterSpec, documents: Iterable[Any] = ()) -> wp.WaypointIndex:
    """The cluster's waypoints: Gateways among its policies and ``documents``."""
    pods = [wp.PodInfo(p.name, p.namespace, p.service_account, p.labels) for p in spec.pods]
    services = [_service_info(s) for s in spec.services]
    return wp.index_waypoints([*spec.policies, *documents], pods, services)


def _service_info(svc: ServiceSpec) -> wp.ServiceInfo:
    return wp.ServiceInfo(svc.name, svc.namespace, svc.hostname, svc.labels)


def _service(svc: ServiceSpec, waypoint: wp.Waypoint | None) -> Service:
    return Service(
        name=svc.name,
        namespace=svc.namespace,
        hostname=svc.hostname,
        vips=(NetworkAddress("", svc.vip),),
        ports=dict(svc.ports),
        app_protocols={
            port: wp.app_protocol(port, info.name, info.app_protocol)
            for port, info in svc.port_info.items()
        },
        waypoint=waypoint.address if waypoint is not None else None,
    )


def cluster_state(
    spec: ClusterSpec, places: ClusterLayout, waypoints: wp.WaypointIndex | None = None
) -> tuple[list[Workload], list[Service], dict[str, dict[str, str]]]:
    """(workloads, services, labels by workload uid) for the whole cluster, with
    ``waypoints`` bound (and their implicit policies listed) as istiod binds them."""
    index = waypoints if waypoints is not None else index_waypoints(spec)
    services_of: dict[str, dict[str, dict[int, int]]] = {}
    waypoints_of: dict[str, list[wp.Waypoint | None]] = {}
    services: list[Service] = []
    for svc in spec.services:
        bound = wp.service_waypoint(index, _service_info(svc), _ns_labels(spec, svc.namespace))
        services.append(_service(svc, bound))
        for pod in spec.selected_pods(svc):
            services_of.setdefault(pod.key, {})[svc.key] = dict(svc.ports)
            waypoints_of.setdefault(pod.key, []).append(bound)
    workloads: list[Workload] = []
    labels: dict[str, dict[str, str]] = {}
    for pod in spec.pods:
        uid = pod_uid(pod)
        info = wp.PodInfo(pod.name, pod.namespace, pod.service_account, pod.labels)
        own = wp.workload_waypoint(index, info, _ns_labels(spec, pod.namespace))
        native = pod.labels.get(wp.TUNNEL_LABEL) == "http"
        mesh = in_mesh(spec, pod) or native
        workloads.append(
            Workload(
                uid=uid,
                name=pod.name,
                namespace=pod.namespace,
                workload_ips=(places.pods[pod.key].ip,),
                service_account=pod.service_account,
                protocol=TunnelProtocol.HBONE if mesh else TunnelProtocol.TCP,
                native_tunnel=native,
                node=pod.node,
                waypoint=own.address if own is not None else None,
                canonical_name=_canonical_name(pod),
                canonical_revision=pod.labels.get("service.istio.io/canonical-revision", "latest"),
                workload_name=pod.name,
                services=services_of.get(pod.key, {}),
                authorization_policies=tuple(
                    wp.implicit_policy_keys(own, waypoints_of.get(pod.key, []))
                    if spec.auto_allow_waypoint
                    else ()
                ),
            )
        )
        labels[uid] = dict(pod.labels)
    return workloads, services, labels


def implicit_policies(index: wp.WaypointIndex) -> list[Authorization]:
    return [
        wp.implicit_policy(w)
        for w in index.waypoints.values()
        if w.implicit_policy_key() is not None
    ]


def mesh_state(
    spec: ClusterSpec, places: ClusterLayout, policy_files: Sequence[PolicyDocuments] = ()
) -> tuple[MeshState, list[str]]:
    """The state of the whole cluster, with the file's policies and ``policy_files``
    translated as one set; and the translator's warnings (skipped documents).

    Raises ConfigError (naming the file, the policy and the field) on a bad policy.
    """
    extra = [doc for f in policy_files for doc in f.documents]
    index = index_waypoints(spec, extra)
    workloads, services, labels = cluster_state(spec, places, index)
    sources = [PolicyDocuments(spec.source, tuple(spec.policies)), *policy_files]
    translated = translate_sources(
        PolicyDocuments(s.source, tuple(d for d in s.documents if not _is_waypoint_document(d)))
        for s in sources
    )
    attached, policies = attach_policies(workloads, labels, translated)
    if spec.auto_allow_waypoint:
        policies += implicit_policies(index)
    state = MeshState(tuple(attached), tuple(services), tuple(policies))
    return state, [*translated.warnings, *index.warnings]


def node_pods(spec: ClusterSpec, places: ClusterLayout, node: str) -> tuple[Pod, ...]:
    """The pods of ``node``, each with its netns and the mesh verdict."""
    return tuple(_pod(spec, places, p) for p in spec.pods if p.node == node)


def _pod(spec: ClusterSpec, places: ClusterLayout, p: PodSpec) -> Pod:
    place = places.pods[p.key]
    return Pod(
        uid=pod_uid(p),
        name=p.name,
        namespace=p.namespace,
        service_account=p.service_account,
        node=p.node,
        labels=dict(p.labels),
        ips=(place.ip,),
        netns=NetnsRef.named(place.netns),
        in_mesh=in_mesh(spec, p),
    )


def snapshot(
    spec: ClusterSpec,
    prefix: str,
    node: str,
    policy_files: Sequence[PolicyDocuments] = (),
) -> tuple[PodSnapshot, list[str]]:
    """This node's view of a cluster file: its pods and the whole mesh's state (and the
    policy translator's warnings). Raises ConfigError on a bad policy."""
    places = layout(spec, prefix)
    state, warnings = mesh_state(spec, places, policy_files)
    return PodSnapshot(node_pods(spec, places, node), state, spec.source), warnings
