"""The Kubernetes pod source: list+watch of the API server → ``PodSnapshot``s.

Modules: ``access`` (cluster access, HTTP client), ``protocol`` (list/watch formats, sans
I/O), ``client`` (the one HTTP boundary), ``reflector`` (list+watch into a store),
``derive`` (objects → model, pure), ``procfs`` (pod netns from /proc), ``annotate`` (the
enrollment annotation), ``source`` (the ``PodSource``). See docs/kubernetes.md.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from ztunnel.sources.kubernetes.access import ClusterAccess, load_access, open_http
from ztunnel.sources.kubernetes.annotate import annotate_enrolled, annotate_unenrolled
from ztunnel.sources.kubernetes.client import ApiClient
from ztunnel.sources.kubernetes.derive import Settings
from ztunnel.sources.kubernetes.procfs import ProcNetnsFinder
from ztunnel.sources.kubernetes.source import KubernetesPodSource

__all__ = [
    "ENV_NAMES",
    "ApiClient",
    "ClusterAccess",
    "KubernetesPodSource",
    "ProcNetnsFinder",
    "Settings",
    "annotate_enrolled",
    "annotate_unenrolled",
    "from_env",
    "load_access",
    "open_http",
]

# Environment variables the Kubernetes source reads besides the agent's Config.
ENV_NAMES = (
    "KUBECONFIG",
    "KUBERNETES_SERVICE_HOST",
    "KUBERNETES_SERVICE_PORT",
    "HOST_PROC",
    "CLUSTER_DOMAIN",
    "POD_NAME",
    "POD_NAMESPACE",
)


def from_env(
    env: Mapping[str, str],
    *,
    node_name: str,
    cluster_id: str = "Kubernetes",
    trust_domain: str = "cluster.local",
    network: str = "",
) -> KubernetesPodSource:
    """The source as the agent builds it: cluster access from the environment, this node's
    pods, netns discovery in ``HOST_PROC`` (default /proc). Raises ``ConfigError``."""
    access = load_access(env)
    self_pod = (
        (env["POD_NAMESPACE"], env["POD_NAME"])
        if env.get("POD_NAMESPACE") and env.get("POD_NAME")
        else None
    )
    settings = Settings(
        node_name=node_name,
        cluster_id=cluster_id,
        domain=env.get("CLUSTER_DOMAIN") or "cluster.local",
        trust_domain=trust_domain,
        network=network,
        self_pod=self_pod,
    )
    finder = ProcNetnsFinder(env.get("HOST_PROC") or os.path.join(os.sep, "proc"))
    return KubernetesPodSource(ApiClient(open_http(access)), settings, netns_finder=finder)
