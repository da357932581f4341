"""The simulated cluster as the agent's model: workloads and services, like a config source.

Pods in namespaces labelled ``istio.io/dataplane-mode=ambient`` are HBONE workloads; a pod
label ``istio.io/dataplane-mode=none`` opts one out, and ``=ambient`` on a pod enrolls it even
in an unlabelled namespace (Istio's pod-level enrollment). Everything else is plain TCP.
"""

from __future__ import annotations

from ztunnel.cluster.net import ClusterNet
from ztunnel.cluster.spec import DATAPLANE_MODE_LABEL, ClusterSpec, PodSpec
from ztunnel.model.workload import NetworkAddress, Service, TunnelProtocol, Workload

AMBIENT = "ambient"
NONE = "none"


def pod_uid(pod: PodSpec) -> str:
    return f"Kubernetes//Pod/{pod.namespace}/{pod.name}"


def is_enrolled(spec: ClusterSpec, pod: PodSpec) -> bool:
    """Whether the pod's traffic is captured into the mesh (shared with the enrollment code)."""
    mode = pod.labels.get(DATAPLANE_MODE_LABEL)
    if mode == NONE:
        return False
    if mode == AMBIENT:
        return True
    ns = spec.namespaces.get(pod.namespace)
    return ns is not None and ns.labels.get(DATAPLANE_MODE_LABEL) == AMBIENT


def _canonical_name(pod: PodSpec) -> str:
    labels = pod.labels
    return (
        labels.get("service.istio.io/canonical-name")
        or labels.get("app.kubernetes.io/name")
        or labels.get("app")
        or pod.name
    )


def cluster_state(
    spec: ClusterSpec, net: ClusterNet
) -> tuple[list[Workload], list[Service], dict[str, dict[str, str]]]:
    """(workloads, services, labels by workload uid) for the whole cluster.

    Service endpoints are expressed the local-config way: each selected workload's
    ``services`` map holds {"ns/hostname": {port: targetPort}}; ``Service.endpoints`` stays
    empty for the state store to derive.
    """
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
        enrolled = is_enrolled(spec, pod)
        workloads.append(
            Workload(
                uid=uid,
                name=pod.name,
                namespace=pod.namespace,
                workload_ips=(net.pods[pod.key].ip,),
                service_account=pod.service_account,
                protocol=TunnelProtocol.HBONE if enrolled else TunnelProtocol.TCP,
                node=pod.node,
                canonical_name=_canonical_name(pod),
                canonical_revision=pod.labels.get("service.istio.io/canonical-revision", "latest"),
                workload_name=pod.name,
                services=services_of.get(pod.key, {}),
            )
        )
        labels[uid] = dict(pod.labels)
    return workloads, services, labels
