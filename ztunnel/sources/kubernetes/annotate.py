"""The enrollment annotation, written back on the pod as istio-cni writes it.

``ambient.istio.io/redirection: enabled`` after a pod's redirection is installed and its
proxy runs; removed when the pod leaves the mesh. istiod (and our own derivation) turn it
into ``protocol: HBONE`` for the pod's workload, so peers start tunnelling to it only once
it can take HBONE. Like istio-cni: a JSON merge patch on the ``pods/status`` subresource
(less privileged than the pod itself; both may change metadata), and removing it from a
pod that is already gone is not an error.

``Annotator`` keeps the annotation in step with enrollment (the agent wires its two
reporters into the enrollment controller).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import structlog
import trio

from ztunnel.model.pod import REDIRECTION_ANNOTATION, Pod
from ztunnel.sources.kubernetes.client import ApiClient
from ztunnel.sources.kubernetes.derive import REDIRECTION_ENABLED
from ztunnel.sources.kubernetes.errors import KubeError, KubeNotFound
from ztunnel.sources.kubernetes.protocol import JSON, MERGE_PATCH, PODS
from ztunnel.sources.kubernetes.reflector import Backoff

log = structlog.get_logger("ztunnel.sources.kubernetes")

ENROLLED_PATCH = {"metadata": {"annotations": {REDIRECTION_ANNOTATION: REDIRECTION_ENABLED}}}
UNENROLLED_PATCH = {"metadata": {"annotations": {REDIRECTION_ANNOTATION: None}}}


async def annotate_enrolled(client: ApiClient, namespace: str, name: str) -> None:
    """Mark the pod enrolled. Raises ``KubeError`` (the caller retries or reports)."""
    await client.patch(
        PODS, namespace, name, ENROLLED_PATCH, subresource="status", content_type=MERGE_PATCH
    )


async def annotate_unenrolled(client: ApiClient, namespace: str, name: str) -> None:
    """Remove the mark; a pod that no longer exists needs nothing."""
    try:
        await client.patch(
            PODS, namespace, name, UNENROLLED_PATCH, subresource="status", content_type=MERGE_PATCH
        )
    except KubeNotFound:
        return


@dataclass(frozen=True, slots=True)
class _Wish:
    namespace: str
    name: str
    uid: str  # metadata.uid of the pod enrollment saw ("" if unknown)
    enabled: bool


Lookup = Callable[[str, str], JSON | None]


class Annotator:
    """Writes the annotation as enrollment goes, never in its way.

    Enrollment reports, synchronously, each pod whose proxy runs (``enrolled``, an
    ``on_start`` reporter) and each pod that left the mesh with its redirection removed
    (``left``, an ``on_leave`` reporter); ``run`` (a service) writes the newest wish per
    pod. A failed write is logged and retried with backoff while the pod keeps its proxy
    and rules. Nothing is written for a pod that is gone (or is now another pod of the
    same name), nor when the pod already shows the wish and we wrote nothing else since
    (an agent restart re-enrolling annotated pods costs no request). ``lookup`` gives the
    pod as the source last saw it.
    """

    def __init__(
        self, client: ApiClient, lookup: Lookup, *, backoff: Backoff | None = None
    ) -> None:
        self.client = client
        self.lookup = lookup
        self.backoff = backoff or Backoff()
        self._wishes: dict[str, _Wish] = {}
        self._retry_at: dict[str, float] = {}
        self._written: dict[str, bool] = {}  # what we last wrote, by pod key
        self._wake = trio.Event()
        self.writes = 0
        self.failures = 0
        self.last_error: str | None = None

    # --- enrollment's reporters (synchronous, never raise) -------------------------------

    def enrolled(self, pod: Pod, error: str | None) -> None:
        if error is None:
            self._wish(pod, enabled=True)

    def left(self, pod: Pod) -> None:
        self._wish(pod, enabled=False)

    def _wish(self, pod: Pod, *, enabled: bool) -> None:
        self._wishes[pod.key] = _Wish(pod.namespace, pod.name, pod.k8s_uid, enabled)
        self._retry_at.pop(pod.key, None)
        self._wake.set()

    def dump(self) -> dict[str, Any]:
        return {
            "pending": {
                key: "enabled" if w.enabled else "removed" for key, w in self._wishes.items()
            },
            "writes": self.writes,
            "failures": self.failures,
            "lastError": self.last_error,
        }

    # --- the service ---------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            self._wake = trio.Event()
            for key in [k for k in self._wishes if self._due(k)]:
                await self._write(key)
            retry = min(self._retry_at.values(), default=math.inf)
            with trio.move_on_at(retry):
                await self._wake.wait()

    def _due(self, key: str) -> bool:
        return self._retry_at.get(key, -math.inf) <= trio.current_time()

    def _needed(self, key: str, wish: _Wish) -> bool:
        current = self.lookup(wish.namespace, wish.name)
        meta = (current or {}).get("metadata") or {}
        if current is None or (wish.uid and meta.get("uid") not in (None, wish.uid)):
            # Deleted (or another pod under the same name now): nothing of ours to mark.
            self._written.pop(key, None)
            return False
        shown = (meta.get("annotations") or {}).get(REDIRECTION_ANNOTATION)
        agrees = (shown == REDIRECTION_ENABLED) == wish.enabled
        # The pod as seen may lag behind our own last write: trust it only if that agrees.
        return not agrees or self._written.get(key, wish.enabled) != wish.enabled

    async def _write(self, key: str) -> None:
        wish = self._wishes[key]
        if self._needed(key, wish):
            write = annotate_enrolled if wish.enabled else annotate_unenrolled
            try:
                await write(self.client, wish.namespace, wish.name)
            except KubeNotFound:
                pass  # deleted meanwhile
            except KubeError as exc:
                self._failed(key, wish, exc)
                return
            else:
                self._written[key] = wish.enabled
                self.writes += 1
                self.backoff.reset()
                log.info(
                    "pod annotated" if wish.enabled else "pod annotation removed",
                    pod=key,
                    annotation=REDIRECTION_ANNOTATION,
                )
        if self._wishes.get(key) is wish:  # a newer wish that came meanwhile stays
            del self._wishes[key]
            self._retry_at.pop(key, None)

    def _failed(self, key: str, wish: _Wish, exc: KubeError) -> None:
        self.failures += 1
        self.last_error = str(exc)
        if self._wishes.get(key) is not wish:
            return  # superseded while we wrote: the new wish is due now
        delay = self.backoff.next()
        self._retry_at[key] = trio.current_time() + delay
        log.warning(
            "cannot write the enrollment annotation; retrying",
            pod=key,
            enabled=wish.enabled,
            error=str(exc),
            retry_in=round(delay, 2),
        )
