"""Find a running simulated cluster's pods from its file and prefix, creating nothing.

The agent is a separate process from whoever built the cluster, so it cannot hold the
``ClusterNet``; it recomputes the same deterministic names and addresses that
``ztunnel.cluster.net`` assigns (tests compare the two against a real build).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

from ztunnel.cluster.net import NodeNet, PodNet, node_ip, pod_ip
from ztunnel.cluster.spec import ClusterSpec
from ztunnel.cluster.state import cluster_state
from ztunnel.model.workload import Service, Workload

if TYPE_CHECKING:
    from ztunnel.cluster.net import ClusterNet


@dataclass(frozen=True, slots=True)
class AttachedCluster:
    """The names and addresses of a cluster built elsewhere (the parts ClusterNet exposes)."""

    spec: ClusterSpec
    prefix: str
    pods: dict[str, PodNet]
    nodes: dict[str, NodeNet]

    def pods_on(self, node: str) -> list[PodNet]:
        return [p for p in self.pods.values() if p.node == node]


def pod_netns_name(prefix: str, namespace: str, name: str) -> str:
    return f"{prefix}-pod-{namespace}-{name}"


def node_netns_name(prefix: str, node: str) -> str:
    return f"{prefix}-node-{node}"


def attach(spec: ClusterSpec, prefix: str) -> AttachedCluster:
    """Same addressing as ``cluster.net``: node i is 10.244.(i+1).1, its n-th pod .(2+n)."""
    nodes = {
        node: NodeNet(node, node_netns_name(prefix, node), node_ip(i))
        for i, node in enumerate(spec.nodes)
    }
    order: dict[str, int] = {}
    pods: dict[str, PodNet] = {}
    for p in spec.pods:
        n = order[p.node] = order.get(p.node, -1) + 1
        ip = pod_ip(spec.nodes.index(p.node), n)
        pods[p.key] = PodNet(
            p.name, p.namespace, p.node, pod_netns_name(prefix, p.namespace, p.name), ip
        )
    return AttachedCluster(spec, prefix, pods, nodes)


def attached_state(
    cluster: AttachedCluster,
) -> tuple[list[Workload], list[Service], dict[str, dict[str, str]]]:
    """``cluster_state`` for an attached cluster (it only reads ``pods``, which we provide)."""
    return cluster_state(cluster.spec, cast("ClusterNet", cluster))
