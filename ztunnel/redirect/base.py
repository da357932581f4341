"""The redirection seam: how a pod's traffic is sent to the agent's in-pod listeners.

One ``Redirector`` per agent, chosen at start (``REDIRECT_MODE``): istio-cni's
iptables rules, eBPF programs, or none (istio-cni installed them already, ZDS).
Enrollment only ever talks to this interface, so its logic is tested against
``FakeRedirector`` without root, and every implementation is tested for real in
network namespaces.

Contract (all calls are synchronous and may block: callers run them in a thread):

- ``install`` is idempotent and reconciling: what a previous agent left is reused
  when equal and replaced when different; nothing is ever duplicated. Returns
  whether anything changed.
- ``remove`` removes exactly what this redirector installs (a user's own rules
  stay) and returns whether anything was there.
- ``installed`` tells whether any of our redirection is present (an agent that
  starts uses it to clean pods that left the mesh while no agent ran).
- ``describe`` is what ``ztunnel ctl`` and the admin endpoint show for the pod.
- ``summary`` is what the redirector holds for all pods (eBPF: the pinned build, its maps and
  counters); cheap enough to read on every admin request.
- ``prune`` forgets what the redirector keeps *outside* pod netns (eBPF pins) for every
  netns but the given ones: the agent calls it once its first pass held every live pod.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from ztunnel.model import ports
from ztunnel.model.pod import Pod
from ztunnel.redirect.netns import NetNamespace


@dataclass(frozen=True, slots=True)
class RedirectPorts:
    """Where redirected traffic goes inside the pod, and the mark of the agent's own sockets."""

    outbound: int = ports.OUTBOUND
    inbound_plaintext: int = ports.INBOUND_PLAINTEXT
    inbound: int = ports.INBOUND
    mark: int = 0x539


class Redirector(Protocol):
    """Installs and removes one mode of redirection in pod network namespaces."""

    @property
    def mode(self) -> str:
        """``iptables``, ``ebpf`` or ``none``: shown per pod by ctl and the admin endpoint."""
        ...

    def install(self, netns: NetNamespace, pod: Pod) -> bool: ...

    def remove(self, netns: NetNamespace, pod: Pod | None = None) -> bool: ...

    def installed(self, netns: NetNamespace) -> bool: ...

    def describe(self, netns: NetNamespace) -> dict[str, Any]: ...

    def summary(self) -> dict[str, Any]: ...

    def prune(self, keep: Iterable[NetNamespace]) -> list[str]:
        """Drop per-pod state kept outside the pods for netns not in ``keep``; returns what
        was dropped (nothing for modes whose state lives only inside the pod netns)."""
        ...


class NoRedirector:
    """Redirection is someone else's job (istio-cni over ZDS): nothing to install or remove."""

    mode = "none"

    def install(self, netns: NetNamespace, pod: Pod) -> bool:
        return False

    def remove(self, netns: NetNamespace, pod: Pod | None = None) -> bool:
        return False

    def installed(self, netns: NetNamespace) -> bool:
        return False

    def describe(self, netns: NetNamespace) -> dict[str, Any]:
        return {"mode": self.mode}

    def summary(self) -> dict[str, Any]:
        return {"mode": self.mode}

    def prune(self, keep: Iterable[NetNamespace]) -> list[str]:
        return []


@dataclass
class FakeRedirector:
    """In-memory redirection keyed by netns identity, for enrollment tests without root.

    ``fail_install`` makes the next installs raise (a pod whose rules cannot be written);
    ``calls`` records what enrollment asked for, in order.
    """

    mode: str = "fake"
    state: dict[tuple[int, int], str] = field(default_factory=dict)
    calls: list[tuple[str, str]] = field(default_factory=list)
    fail_install: Exception | None = None
    kept: list[tuple[int, int]] | None = None  # the netns idents of the last prune

    def install(self, netns: NetNamespace, pod: Pod) -> bool:
        self.calls.append(("install", pod.key))
        if self.fail_install is not None:
            raise self.fail_install
        ident = netns.ident
        changed = self.state.get(ident) != pod.key
        self.state[ident] = pod.key
        return changed

    def remove(self, netns: NetNamespace, pod: Pod | None = None) -> bool:
        self.calls.append(("remove", pod.key if pod is not None else netns.path))
        return self.state.pop(netns.ident, None) is not None

    def installed(self, netns: NetNamespace) -> bool:
        return netns.ident in self.state

    def describe(self, netns: NetNamespace) -> dict[str, Any]:
        return {"mode": self.mode, "installed": self.installed(netns)}

    def summary(self) -> dict[str, Any]:
        return {"mode": self.mode, "pods": len(self.state)}

    def prune(self, keep: Iterable[NetNamespace]) -> list[str]:
        self.kept = sorted(ns.ident for ns in keep)
        return []
