"""The one place a ``REDIRECT_MODE`` becomes a ``Redirector``.

iptables and eBPF both capture by themselves, so a pod must never hold the state of the mode
the node no longer runs (an agent switched from one to the other): ``ModeSwitch`` wraps the
active mode's redirector and clears the other mode's state right after every install, and
with every removal. ``none`` is not wrapped: there istio-cni owns the pod's rules.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, assert_never

from ztunnel.config import RedirectMode
from ztunnel.model.pod import Pod
from ztunnel.redirect.base import NoRedirector, Redirector, RedirectPorts
from ztunnel.redirect.ebpf import (
    DEFAULT_PIN_ROOT,
    EbpfError,
    EbpfRedirector,
    EbpfUnavailable,
    clean_other_modes,
    other_modes_present,
)
from ztunnel.redirect.iptables import IptablesRedirector
from ztunnel.redirect.netns import NetNamespace


def make_redirector(
    mode: RedirectMode, ports: RedirectPorts, *, pin_dir: Path = DEFAULT_PIN_ROOT
) -> Redirector:
    """The agent's redirector. eBPF mode is prepared right here (environment checked,
    programs compiled or reused), so a machine that cannot run it stops the agent with one
    line (``EbpfUnavailable``, a ConfigError: exit 2) before any pod is touched."""
    if mode is RedirectMode.IPTABLES:
        return ModeSwitch(IptablesRedirector(ports), pin_dir)
    if mode is RedirectMode.EBPF:
        return ModeSwitch(prepared_ebpf(ports, pin_dir), pin_dir)
    if mode is RedirectMode.NONE:
        return NoRedirector()
    assert_never(mode)


def prepared_ebpf(ports: RedirectPorts, pin_dir: Path) -> EbpfRedirector:
    redirector = EbpfRedirector(ports, pin_root=pin_dir)
    try:
        redirector.prepare()
    except EbpfError as exc:  # pinning failed (bpffs read-only, full, not ours): a setup error
        raise EbpfUnavailable(str(exc)) from exc
    return redirector


class ModeSwitch:
    """The active mode's redirector, which also removes what another mode left in a pod.

    ``install`` cleans *after* the active mode is in place, so the pod is never without
    capture; ``remove`` cleans first, so the routes both modes share go with the last one.
    """

    def __init__(self, inner: IptablesRedirector | EbpfRedirector, pin_dir: Path) -> None:
        self.inner = inner
        self.pin_dir = pin_dir

    @property
    def mode(self) -> str:
        return self.inner.mode

    def install(self, netns: NetNamespace, pod: Pod) -> bool:
        changed = self.inner.install(netns, pod)
        return bool(self._clean(netns)) or changed

    def remove(self, netns: NetNamespace, pod: Pod | None = None) -> bool:
        cleaned = self._clean(netns)
        return self.inner.remove(netns, pod) or bool(cleaned)

    def installed(self, netns: NetNamespace) -> bool:
        return self.inner.installed(netns) or other_modes_present(
            netns, self.mode, pin_root=self.pin_dir
        )

    def describe(self, netns: NetNamespace) -> dict[str, Any]:
        return self.inner.describe(netns)

    def summary(self) -> dict[str, Any]:
        return self.inner.summary()

    def prune(self, keep: Iterable[NetNamespace]) -> list[str]:
        return self.inner.prune(keep)

    def _clean(self, netns: NetNamespace) -> list[str]:
        return clean_other_modes(netns, self.mode, pin_root=self.pin_dir)


if TYPE_CHECKING:  # mypy holds ModeSwitch to the Redirector protocol
    _conforms: Redirector = ModeSwitch(IptablesRedirector(RedirectPorts()), DEFAULT_PIN_ROOT)
