"""The enrollment annotation, written back on the pod as istio-cni writes it.

``ambient.istio.io/redirection: enabled`` after a pod's redirection is installed and its
proxy runs; removed when the pod leaves the mesh. istiod (and our own derivation) turn it
into ``protocol: HBONE`` for the pod's workload, so peers start tunnelling to it only once
it can take HBONE. Like istio-cni: a JSON merge patch on the ``pods/status`` subresource
(less privileged than the pod itself; both may change metadata), and removing it from a
pod that is already gone is not an error.
"""

from __future__ import annotations

from ztunnel.model.pod import REDIRECTION_ANNOTATION
from ztunnel.sources.kubernetes.client import ApiClient
from ztunnel.sources.kubernetes.derive import REDIRECTION_ENABLED
from ztunnel.sources.kubernetes.errors import KubeNotFound
from ztunnel.sources.kubernetes.protocol import MERGE_PATCH, PODS

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
