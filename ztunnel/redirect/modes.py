"""The one place a ``REDIRECT_MODE`` becomes a ``Redirector``."""

from __future__ import annotations

from typing import assert_never

from ztunnel.config import RedirectMode
from ztunnel.redirect.base import NoRedirector, Redirector, RedirectPorts
from ztunnel.redirect.iptables import IptablesRedirector


def make_redirector(mode: RedirectMode, ports: RedirectPorts) -> Redirector:
    if mode is RedirectMode.IPTABLES:
        return IptablesRedirector(ports)
    if mode is RedirectMode.NONE:
        return NoRedirector()
    assert_never(mode)
