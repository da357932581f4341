"""The Kubernetes pod source: reflectors → one consistent ``PodSnapshot`` at a time.

``run`` (a long-lived service for the agent's nursery) keeps one reflector per resource,
waits until every one has listed (so the first snapshot never shows pods without their
namespace or policies), then after every change (debounced) derives the snapshot: this
node's pods, with their network namespaces from /proc, and the cluster's workloads,
services and translated policies. Iterating the source yields the newest snapshot each
time it differs from the last; a slow consumer skips intermediate ones.

Pods are watched cluster-wide: a pod's identity (service account) and whether it is in
the mesh (the redirection annotation) exist only on the Pod, and without istiod every
node agent needs them for the pods it talks to. This node's pods are picked locally.
"""

from __future__ import annotations

import math
import random
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

import structlog
import trio

from ztunnel.errors import ConfigError
from ztunnel.model.pod import MeshState, NetnsRef, PodSnapshot
from ztunnel.policy.istio import (
    DEFAULT_ROOT_NAMESPACE,
    TranslationResult,
    attach_policies,
    translate_documents,
)
from ztunnel.sources.kubernetes.client import ApiClient
from ztunnel.sources.kubernetes.derive import (
    ClusterObjects,
    Settings,
    mesh_state,
    node_pods,
    pod_ips,
    redirection_enabled,
)
from ztunnel.sources.kubernetes.procfs import FoundNetns, ProcNetnsFinder
from ztunnel.sources.kubernetes.protocol import (
    AUTHORIZATION_POLICIES,
    ENDPOINT_SLICES,
    GATEWAYS,
    JSON,
    NAMESPACES,
    PEER_AUTHENTICATIONS,
    PODS,
    SERVICES,
    ResourceKind,
)
from ztunnel.sources.kubernetes.reflector import Reflector, keep_all

log = structlog.get_logger("ztunnel.sources.kubernetes")

_DROPPED_ANNOTATIONS = frozenset({"kubectl.kubernetes.io/last-applied-configuration"})


def trim_pod(kind: ResourceKind, pod: JSON) -> JSON:
    """What derivation reads of a pod; the rest (status churn, env, volumes) is dropped so
    the store stays small and a heartbeat-only update changes nothing."""
    meta = pod.get("metadata") or {}
    spec = pod.get("spec") or {}
    status = pod.get("status") or {}
    annotations = {
        k: v for k, v in (meta.get("annotations") or {}).items() if k not in _DROPPED_ANNOTATIONS
    }
    return {
        "apiVersion": kind.api_version,
        "kind": kind.kind,
        "metadata": {
            k: v
            for k, v in {**meta, "annotations": annotations}.items()
            if k
            in (
                "name",
                "namespace",
                "uid",
                "labels",
                "annotations",
                "ownerReferences",
                "generateName",
                "deletionTimestamp",
            )
        },
        "spec": {
            "nodeName": spec.get("nodeName"),
            "serviceAccountName": spec.get("serviceAccountName"),
            "hostNetwork": spec.get("hostNetwork"),
            "containers": [
                {"ports": c.get("ports") or []}
                for c in spec.get("containers") or []
                if isinstance(c, dict)
            ],
        },
        "status": {
            "phase": status.get("phase"),
            "podIP": status.get("podIP"),
            "podIPs": status.get("podIPs"),
            "conditions": [
                c
                for c in status.get("conditions") or []
                if isinstance(c, dict) and c.get("type") == "Ready"
            ],
        },
    }


def trim_slice(kind: ResourceKind, es: JSON) -> JSON:
    out = keep_all(kind, es)
    out["metadata"] = {k: v for k, v in out["metadata"].items() if k != "annotations"}
    return out


class KubernetesPodSource:
    """A ``PodSource`` fed by the Kubernetes API; start ``run`` in a nursery, then iterate."""

    def __init__(
        self,
        client: ApiClient,
        settings: Settings,
        *,
        netns_finder: ProcNetnsFinder | None = None,
        root_namespace: str = DEFAULT_ROOT_NAMESPACE,
        debounce: float = 0.05,
        netns_retry: float = 1.0,
        reflector_options: Mapping[str, Any] | None = None,
        rng: random.Random | None = None,
        where: str = "",
    ) -> None:
        self.client = client
        self.where = where  # the API server and how it was found, for readiness and logs
        self.settings = settings
        self.netns_finder = netns_finder
        self.root_namespace = root_namespace
        self.debounce = debounce
        self.netns_retry = netns_retry
        self._changed = trio.Event()
        opts = dict(reflector_options or {})
        rng = rng or random.Random()

        def reflector(kinds: Sequence[ResourceKind], **kw: Any) -> Reflector:
            return Reflector(client, kinds, self._on_change, rng=rng, **{**opts, **kw})

        self.reflectors: dict[str, Reflector] = {
            "pods": reflector([PODS], trim=trim_pod),
            "namespaces": reflector([NAMESPACES]),
            "services": reflector([SERVICES]),
            "endpoint_slices": reflector([ENDPOINT_SLICES], trim=trim_slice),
            "authorization_policies": reflector(AUTHORIZATION_POLICIES, optional=True),
            "peer_authentications": reflector(PEER_AUTHENTICATIONS, optional=True),
            "gateways": reflector(GATEWAYS, optional=True),
        }
        self._netns: dict[str, FoundNetns] = {}
        self._policies: TranslationResult | None = None
        self._policy_inputs: tuple[Any, ...] | None = None
        self._snapshot: PodSnapshot | None = None
        self._version = 0
        self._published = trio.Event()
        self.snapshots_built = 0

    def _on_change(self) -> None:
        self._changed.set()

    # --- consumers ---------------------------------------------------------------------

    @property
    def latest(self) -> PodSnapshot | None:
        return self._snapshot

    def __aiter__(self) -> AsyncIterator[PodSnapshot]:
        return self._follow()

    async def _follow(self) -> AsyncIterator[PodSnapshot]:
        seen = 0
        while True:
            while self._version == seen:
                await self._published.wait()
            seen = self._version
            assert self._snapshot is not None
            yield self._snapshot

    def _publish(self, snap: PodSnapshot) -> None:
        self._snapshot = snap
        self._version += 1
        self._published.set()
        self._published = trio.Event()

    # --- inspection --------------------------------------------------------------------

    def not_ready_reason(self) -> str | None:
        """Until the first snapshot: what the source still waits for (readiness). After
        it, an API outage keeps the last state and the agent stays ready (as ztunnel)."""
        if self._snapshot is not None:
            return None
        where = f" at {self.where}" if self.where else ""
        waiting = [n for n, r in self.reflectors.items() if not r.store.synced]
        if not waiting:
            return f"waiting for the Kubernetes API{where}: deriving the first snapshot"
        errors = [r.last_error for r in self.reflectors.values() if r.last_error]
        detail = f"; last error: {errors[-1]}" if errors else ""
        return f"waiting for the Kubernetes API{where}: listing {', '.join(waiting)}{detail}"

    def dump(self) -> dict[str, Any]:
        """config_dump's ``controlPlane.kubernetes``: the server, each resource's store."""
        return {
            "server": self.where,
            "synced": self._snapshot is not None,
            "notReady": self.not_ready_reason(),
            "snapshotsBuilt": self.snapshots_built,
            "resources": {
                name: {
                    "resource": r.name,
                    "resourceVersion": r.store.resource_version,
                    "objects": len(r.store.objects),
                    "synced": r.store.synced,
                    "served": not r.absent,
                    "lists": r.lists,
                    "watches": r.watches,
                    "errors": r.errors,
                    "lastError": r.last_error,
                }
                for name, r in self.reflectors.items()
            },
        }

    def pod_object(self, namespace: str, name: str) -> JSON | None:
        """The pod as last seen (trimmed), None when it does not exist (as far as we know)."""
        return self.reflectors["pods"].store.objects.get(f"{namespace}/{name}")

    async def aclose(self) -> None:
        await self.client.aclose()

    # --- the service -------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the reflectors and publish snapshots until cancelled. ``started`` once the
        first snapshot is published."""
        async with trio.open_nursery() as nursery:
            for r in self.reflectors.values():
                nursery.start_soon(r.run)
            for r in self.reflectors.values():
                await r.synced_event.wait()
            log.info(
                "kubernetes source synced",
                **{name: len(r.store.objects) for name, r in self.reflectors.items()},
            )
            started = False
            while True:
                self._changed = trio.Event()
                snap, missing = await self._build()
                if snap is not None and snap != self._snapshot:
                    self._publish(snap)
                if snap is not None and not started:
                    task_status.started()
                    started = True
                with trio.move_on_after(self.netns_retry if missing else math.inf):
                    await self._changed.wait()
                await trio.sleep(self.debounce)  # let a burst of events settle

    def objects(self) -> ClusterObjects:
        r = self.reflectors
        return ClusterObjects(
            pods=r["pods"].store.objects,
            namespaces=r["namespaces"].store.objects,
            services=r["services"].store.objects,
            endpoint_slices=r["endpoint_slices"].store.objects,
            gateways=r["gateways"].store.objects,
        )

    async def _build(self) -> tuple[PodSnapshot | None, bool]:
        """The snapshot (None while the policies cannot be translated) and whether some
        in-mesh pod's netns is still missing (so discovery retries)."""
        objects = self.objects()
        netns, missing = await self._discover_netns(objects)
        translated = self._translate_policies()
        if translated is None:
            return None, missing
        state, pod_labels = mesh_state(objects, self.settings)
        workloads, policies = attach_policies(state.workloads, pod_labels, translated)
        full = MeshState(tuple(workloads), state.services, tuple(policies))
        self.snapshots_built += 1
        pods = node_pods(objects, self.settings, netns)
        return PodSnapshot(pods=pods, state=full, source="kubernetes"), missing

    # --- policies ----------------------------------------------------------------------

    def _translate_policies(self) -> TranslationResult | None:
        """Translated policies; on a document that cannot be translated, the last good set
        stays (none at first: then no snapshot, rather than one without its DENYs)."""
        authz = self.reflectors["authorization_policies"].store.objects
        peer = self.reflectors["peer_authentications"].store.objects
        if self._policy_inputs == (authz, peer):
            return self._policies
        docs = [authz[k] for k in sorted(authz)] + sorted(
            peer.values(),
            key=lambda o: (str((o.get("metadata") or {}).get("creationTimestamp") or ""), _key(o)),
        )
        try:
            result = translate_documents(
                docs, root_namespace=self.root_namespace, source="kubernetes"
            )
        except ConfigError as exc:
            log.error(
                "security.istio.io object cannot be translated; keeping the last good policies",
                error=str(exc),
            )
            self._policy_inputs = (dict(authz), dict(peer))
            return self._policies
        for warning in result.warnings:
            log.warning("policy translation", warning=warning)
        self._policies = result
        self._policy_inputs = (dict(authz), dict(peer))
        return result

    # --- network namespaces ------------------------------------------------------------

    async def _discover_netns(self, objects: ClusterObjects) -> tuple[dict[str, NetnsRef], bool]:
        """Netns of this node's in-mesh pods, by ``metadata.uid``; found ones are kept while
        their process lives, missing ones are looked for in one /proc scan."""
        finder = self.netns_finder
        if finder is None:
            return {}, False
        wanted: dict[str, Any] = {}
        for pod in objects.pods.values():
            spec, meta = pod.get("spec") or {}, pod.get("metadata") or {}
            if spec.get("nodeName") != self.settings.node_name:
                continue
            ns = objects.namespaces.get(meta.get("namespace") or "")
            if redirection_enabled(pod, ns, self.settings) and meta.get("uid"):
                wanted[str(meta["uid"])] = pod_ips(pod)
        known = {uid: f for uid, f in self._netns.items() if uid in wanted}
        valid = await trio.to_thread.run_sync(
            lambda: {uid: f for uid, f in known.items() if finder.still_valid(f)}
        )
        lookup = {uid: ips for uid, ips in wanted.items() if uid not in valid}
        if lookup:
            found = await trio.to_thread.run_sync(finder.find, lookup)
            for uid, f in found.items():
                log.info("found pod netns", k8s_uid=uid, pid=f.pid, netns=f.ref.path)
            valid.update(found)
        self._netns = valid
        missing = any(ips and uid not in valid for uid, ips in wanted.items())
        return {uid: f.ref for uid, f in valid.items()}, missing


def _key(obj: JSON) -> str:
    meta = obj.get("metadata") or {}
    return f"{meta.get('namespace', '')}/{meta.get('name', '')}"
