"""What enrollment consumes: a pod source, and the agent as a host of pod proxies.

Both are protocols owned by this layer, so the controller imports neither the agent nor
any source: ``sources.clusterfile`` (and later Kubernetes, ZDS) yield ``PodSnapshot``s,
``agent.Agent`` implements ``ProxyHost``, and the tests substitute both.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any, Protocol, TypeVar

import trio

from ztunnel.model.pod import MeshState, Pod, PodSnapshot
from ztunnel.redirect.netns import NetNamespace

T = TypeVar("T")


class PodSource(Protocol):
    """Async iteration of full snapshots (never diffs); the controller follows the newest."""

    def __aiter__(self) -> AsyncIterator[PodSnapshot]: ...


class ProxyHost(Protocol):
    """The agent, as far as enrollment is concerned."""

    def apply_state(self, state: MeshState) -> None:
        """Replace the mesh's workloads, services and policies (raises on a state it
        cannot take; the previous state then stays)."""
        ...

    async def start_pod_proxy(self, pod: Pod, netns: NetNamespace) -> Mapping[str, Any]:
        """Start the pod's proxy with every socket in ``netns``; returns facts for the
        enrollment log. Raises (e.g. OSError when a listener cannot bind)."""
        ...

    async def stop_pod_proxy(self, uid: str, deadline: float) -> None:
        """Drain the pod's proxy for at most ``deadline`` seconds, then stop it."""
        ...

    def release_identity(self, pod: Pod) -> None:
        """The pod left: stop renewing its certificate unless another proxy serves it."""
        ...

    def mark_pending(self, pod_key: str, reason: str) -> None:
        """Readiness waits for this pod (why, for /healthz/ready)."""
        ...

    def clear_pending(self, pod_key: str) -> None: ...

    def mark_reconciled(self) -> None:
        """The first pass over the pods is done."""
        ...


# How a start attempt went, for sources that answer for it (ZDS acknowledges istio-cni's
# Add with it): (pod, None) once its proxy runs, (pod, reason) after each failed attempt.
StartReporter = Callable[[Pod, str | None], None]

# The pod left the mesh: its proxy is stopped and our redirection is removed (it was
# un-enrolled, or it left while no agent ran and we removed what we found). Sources that
# mark enrolled pods (Kubernetes: the redirection annotation) take the mark off.
LeaveReporter = Callable[[Pod], None]


class BlockingRunner(Protocol):
    """Runs a blocking call (iptables, netns) off the event loop."""

    def __call__(self, fn: Callable[[], T], /) -> Awaitable[T]: ...


async def in_thread(fn: Callable[[], T]) -> T:
    return await trio.to_thread.run_sync(fn)
