"""Where a cluster file's nodes and pods live: netns names and IPs, derived, never stored.

A cluster built from a file under a prefix (``zt`` + 6 hex) has, for node i (order in
``nodes``) and its n-th pod (order among that node's pods in ``pods``):

- node netns ``<prefix>-node-<node>``, IP 10.244.(i+1).1;
- pod netns ``<prefix>-pod-<namespace>-<name>``, IP 10.244.(i+1).(2+n).

The agent, a separate process from whoever built the cluster, finds its pods with these
same functions; the simulator (``ztunnel.cluster.net``) builds the cluster with them, so
the two cannot disagree.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network

from ztunnel.model.pod import NETNS_RUN_DIR
from ztunnel.sources.clusterfile.spec import ClusterSpec

POD_CIDR = IPv4Network("10.244.0.0/16")
GATEWAY = IPv4Address("10.244.0.1")


@dataclass(frozen=True, slots=True)
class PodNet:
    name: str
    namespace: str
    node: str
    netns: str  # name under /var/run/netns
    ip: IPv4Address

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def netns_path(self) -> str:
        return f"{NETNS_RUN_DIR}/{self.netns}"


@dataclass(frozen=True, slots=True)
class NodeNet:
    name: str
    netns: str
    ip: IPv4Address

    @property
    def netns_path(self) -> str:
        return f"{NETNS_RUN_DIR}/{self.netns}"


@dataclass(frozen=True, slots=True)
class ClusterLayout:
    """The names and addresses of every node and pod of one cluster file under one prefix."""

    prefix: str
    pods: Mapping[str, PodNet]  # by "namespace/name"
    nodes: Mapping[str, NodeNet]

    def pods_on(self, node: str) -> list[PodNet]:
        return [p for p in self.pods.values() if p.node == node]


def pod_ip(node_index: int, order: int) -> IPv4Address:
    return IPv4Address(f"10.244.{node_index + 1}.{order + 2}")


def node_ip(node_index: int) -> IPv4Address:
    return IPv4Address(f"10.244.{node_index + 1}.1")


def pod_netns_name(prefix: str, namespace: str, name: str) -> str:
    return f"{prefix}-pod-{namespace}-{name}"


def node_netns_name(prefix: str, node: str) -> str:
    return f"{prefix}-node-{node}"


def layout(spec: ClusterSpec, prefix: str) -> ClusterLayout:
    """Every node's and pod's netns name and IP (the parser guarantees each fits its /24)."""
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
    return ClusterLayout(prefix, pods, nodes)
