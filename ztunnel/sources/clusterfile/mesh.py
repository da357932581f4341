"""A cluster file as the agent sees it: this node's pods, and the mesh's state.

Pods whose namespace is labelled ``istio.io/dataplane-mode=ambient`` are HBONE
workloads; a pod label ``=none`` opts one out, and ``=ambient`` on a pod enrolls it
even in an unlabelled namespace (Istio's rule, ``model.pod.wants_ambient``).
Everything else is a plain-TCP workload. Services select pods by label, as in
Kubernetes; their endpoints are expressed the local-config way (each selected
workload's ``services`` map) for the state store to derive.
"""

from __future__ import annotations

from collections.abc import Sequence

from ztunnel.model.pod import MeshState, NetnsRef, Pod, PodSnapshot, wants_ambient
from ztunnel.model.workload import NetworkAddress, Service, TunnelProtocol, Workload
from ztunnel.policy.istio import PolicyDocuments, attach_policies, translate_sources
from ztunnel.sources.clusterfile.layout import ClusterLayout, layout
from ztunnel.sources.clusterfile.spec import ClusterSpec, PodSpec


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


def cluster_state(
    spec: ClusterSpec, places: ClusterLayout
) -> tuple[list[Workload], list[Service], dict[str, dict[str, str]]]:
    """(workloads, services, labels by workload uid) for the whole cluster."""
    services_of: dict[str, dict[str, dict[int, int]]] = {}
    services: list[Service] = []
    for svc in spec.services:
        services.append(
            Service(
                name=svc.name,
                namespace=svc.namespace,
                hostname=svc.hostname,
                vips=(NetworkAddress("", svc.vip),),
                ports=dict(svc.ports),
            )
        )
        for pod in spec.selected_pods(svc):
            services_of.setdefault(pod.key, {})[svc.key] = dict(svc.ports)
    workloads: list[Workload] = []
    labels: dict[str, dict[str, str]] = {}
    for pod in spec.pods:
        uid = pod_uid(pod)
        workloads.append(
            Workload(
                uid=uid,
                name=pod.name,
                namespace=pod.namespace,
                workload_ips=(places.pods[pod.key].ip,),
                service_account=pod.service_account,
                protocol=TunnelProtocol.HBONE if in_mesh(spec, pod) else TunnelProtocol.TCP,
                node=pod.node,
                canonical_name=_canonical_name(pod),
                canonical_revision=pod.labels.get("service.istio.io/canonical-revision", "latest"),
                workload_name=pod.name,
                services=services_of.get(pod.key, {}),
            )
        )
        labels[uid] = dict(pod.labels)
    return workloads, services, labels


def mesh_state(
    spec: ClusterSpec, places: ClusterLayout, policy_files: Sequence[PolicyDocuments] = ()
) -> tuple[MeshState, list[str]]:
    """The state of the whole cluster, with the file's policies and ``policy_files``
    translated as one set; and the translator's warnings (skipped documents).

    Raises ConfigError (naming the file, the policy and the field) on a bad policy.
    """
    workloads, services, labels = cluster_state(spec, places)
    file_policies = PolicyDocuments(spec.source, tuple(spec.policies))
    translated = translate_sources([file_policies, *policy_files])
    attached, policies = attach_policies(workloads, labels, translated)
    state = MeshState(tuple(attached), tuple(services), tuple(policies))
    return state, list(translated.warnings)


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
