"""The Kubernetes pod source: list+watch of the API server → ``PodSnapshot``s.

Modules: ``access`` (cluster access, HTTP client), ``protocol`` (list/watch formats, sans
I/O), ``client`` (the one HTTP boundary), ``reflector`` (list+watch into a store),
``derive`` (objects → model, pure), ``procfs`` (pod netns from /proc), ``annotate`` (the
enrollment annotation), ``source`` (the ``PodSource``). See docs/kubernetes.md.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ztunnel.config import Config

if TYPE_CHECKING:
    from ztunnel.sources.kubernetes.access import ClusterAccess, load_access, open_http
    from ztunnel.sources.kubernetes.annotate import annotate_enrolled, annotate_unenrolled
    from ztunnel.sources.kubernetes.client import ApiClient
    from ztunnel.sources.kubernetes.derive import Settings
    from ztunnel.sources.kubernetes.procfs import ProcNetnsFinder
    from ztunnel.sources.kubernetes.source import KubernetesPodSource

# The client modules (lightkube, httpx: ~10 MiB and 0.1-0.2 s to import) load on first
# use, so an agent asking only ``access_configured`` (every agent, at start) never pays.
_LAZY = {
    "ClusterAccess": "access",
    "load_access": "access",
    "open_http": "access",
    "annotate_enrolled": "annotate",
    "annotate_unenrolled": "annotate",
    "ApiClient": "client",
    "ProcNetnsFinder": "procfs",
    "Settings": "derive",
    "KubernetesPodSource": "source",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)


__all__ = [
    "ENV_NAMES",
    "ApiClient",
    "ClusterAccess",
    "KubernetesPodSource",
    "ProcNetnsFinder",
    "Settings",
    "access_configured",
    "annotate_enrolled",
    "annotate_unenrolled",
    "from_config",
    "load_access",
    "open_http",
    "settings_from_config",
]

# Environment variables the Kubernetes client reads itself (cluster access, as every
# Kubernetes client finds it); everything else comes from the agent's Config.
ENV_NAMES = ("KUBECONFIG", "KUBERNETES_SERVICE_HOST", "KUBERNETES_SERVICE_PORT")


def access_configured(env: Mapping[str, str]) -> bool:
    """Whether the environment points at a cluster: ``KUBECONFIG``, or the variables the
    kubelet gives every pod (in-cluster). ``~/.kube/config`` alone does not count: an
    agent started on a workstation must not start watching someone's cluster."""
    return bool(env.get("KUBECONFIG") or env.get("KUBERNETES_SERVICE_HOST"))


def settings_from_config(config: Config) -> Settings:
    from ztunnel.sources.kubernetes.derive import Settings

    self_pod = (
        (config.pod_namespace, config.pod_name)
        if config.pod_namespace and config.pod_name
        else None
    )
    return Settings(
        node_name=config.node_name,
        cluster_id=config.cluster_id,
        domain=config.cluster_domain,
        trust_domain=config.trust_domain,
        network=config.network,
        self_pod=self_pod,
    )


def from_config(config: Config, env: Mapping[str, str], **options: Any) -> KubernetesPodSource:
    """The source as the agent builds it: cluster access from ``env``, this node's pods
    (``NODE_NAME``), netns discovery in ``HOST_PROC``; ``options`` go to the source (tests
    shorten its timings). Raises ``ConfigError`` when the cluster access is unusable
    (naming the file and what is wrong)."""
    from ztunnel.sources.kubernetes.access import load_access, open_http
    from ztunnel.sources.kubernetes.client import ApiClient
    from ztunnel.sources.kubernetes.procfs import ProcNetnsFinder
    from ztunnel.sources.kubernetes.source import KubernetesPodSource

    access = load_access(env)
    return KubernetesPodSource(
        ApiClient(open_http(access)),
        settings_from_config(config),
        netns_finder=ProcNetnsFinder(config.host_proc),
        where=f"{access.server} ({access.source})",
        **options,
    )
