"""The indexed mesh state and connection resolution (sans-IO)."""

from __future__ import annotations

from ztunnel.state.resolve import (
    HboneUpstream,
    InboundTarget,
    Passthrough,
    ResolveError,
    TcpUpstream,
    Upstream,
    resolve_inbound,
    resolve_outbound,
)
from ztunnel.state.store import Kind, StateStore

__all__ = [
    "HboneUpstream",
    "InboundTarget",
    "Kind",
    "Passthrough",
    "ResolveError",
    "StateStore",
    "TcpUpstream",
    "Upstream",
    "resolve_inbound",
    "resolve_outbound",
]
