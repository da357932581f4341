"""Pods as enrollment sees them, whatever the source (cluster file, Kubernetes, istio-cni ZDS).

A pod source produces ``PodSnapshot``s: every pod of this node it knows of, each
with the source's verdict whether it belongs in the mesh (``in_mesh``) and how to
reach its network namespace (``netns``). Sources that also know the mesh's
workloads, services and policies (the cluster file, Kubernetes) put them in
``state``; the enrollment controller applies that state before it reconciles the
pods, so a pod's proxy never starts without its workload. Sources that only know
pods (ZDS: istio-cni decides enrollment, xDS brings the state) leave it ``None``.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field

from ztunnel.model.address import IPAddress
from ztunnel.model.authorization import Authorization
from ztunnel.model.workload import Service, Workload

DATAPLANE_MODE_LABEL = "istio.io/dataplane-mode"
DATAPLANE_MODE_AMBIENT = "ambient"
DATAPLANE_MODE_NONE = "none"
REDIRECTION_ANNOTATION = "ambient.istio.io/redirection"
USE_WAYPOINT_LABEL = "istio.io/use-waypoint"
NETNS_RUN_DIR = "/var/run/netns"  # where ``ip netns`` (and kubelet's CNI) names namespaces


def wants_ambient(pod_labels: Mapping[str, str], namespace_labels: Mapping[str, str]) -> bool:
    """Istio's enrollment rule: the namespace (or the pod) is labelled
    ``istio.io/dataplane-mode=ambient`` and the pod does not opt out with ``=none``."""
    mode = pod_labels.get(DATAPLANE_MODE_LABEL)
    if mode == DATAPLANE_MODE_NONE:
        return False
    if mode == DATAPLANE_MODE_AMBIENT:
        return True
    return namespace_labels.get(DATAPLANE_MODE_LABEL) == DATAPLANE_MODE_AMBIENT


class PodPhase(enum.Enum):
    PENDING = "Pending"
    RUNNING = "Running"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    UNKNOWN = "Unknown"


@dataclass(frozen=True, slots=True)
class NetnsRef:
    """Where a pod's network namespace can be opened: ``/var/run/netns/<name>``,
    ``/proc/<pid>/ns/net``, or ``/proc/self/fd/<n>`` for an fd a source holds (ZDS).

    ``ephemeral``: the path is valid only until the consumer asks the source for its next
    snapshot (the source may then close the fd, and the number may name another netns
    later): the consumer must open it while handling this snapshot, and keep its own fd.
    """

    path: str
    ephemeral: bool = False

    @classmethod
    def named(cls, name: str) -> NetnsRef:
        """A namespace named by ``ip netns add <name>``."""
        return cls(f"{NETNS_RUN_DIR}/{name}")

    def __str__(self) -> str:
        return self.path


@dataclass(frozen=True, slots=True)
class Pod:
    """One pod of this node, as a source reports it."""

    uid: str  # the workload uid, e.g. "Kubernetes//Pod/<ns>/<name>": proxies are keyed by it
    name: str
    namespace: str
    service_account: str = "default"
    node: str = ""
    labels: Mapping[str, str] = field(default_factory=dict)
    annotations: Mapping[str, str] = field(default_factory=dict)
    ips: tuple[IPAddress, ...] = ()
    netns: NetnsRef | None = None  # None: not known (yet); such a pod cannot be enrolled
    phase: PodPhase = PodPhase.RUNNING
    in_mesh: bool = False  # the source's verdict (wants_ambient for label-based sources)
    k8s_uid: str = ""  # metadata.uid, where the source has one (cgroup lookup, annotations)

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True, slots=True)
class MeshState:
    """The workloads, services and policies a source derived along with its pods."""

    workloads: tuple[Workload, ...] = ()
    services: tuple[Service, ...] = ()
    policies: tuple[Authorization, ...] = ()


@dataclass(frozen=True, slots=True)
class PodSnapshot:
    """Everything a source knows at one moment; the controller reconciles to the newest."""

    pods: tuple[Pod, ...]
    state: MeshState | None = None
    source: str = ""

    def pod(self, key: str) -> Pod | None:
        return next((p for p in self.pods if p.key == key), None)
