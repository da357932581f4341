"""Live policy updates: re-check open inbound connections when the state changes.

New connections always see the current policies (they are looked up per
connection). Connections already open were allowed by the policies of their
time; when policies or workloads change, each open inbound connection is
evaluated again and the ones no longer allowed are closed (logged as
"connection closed: no longer allowed by policy", counted with response flag
DENY), as ztunnel's PolicyWatcher does.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import structlog

from ztunnel.proxy.authorize import authorize
from ztunnel.state.store import Kind, StateStore
from ztunnel.telemetry.connections import ConnectionTracker, TrackedConnection

log = structlog.get_logger("ztunnel.proxy.policy")


def recheck_connections(store: StateStore, conns: Iterable[TrackedConnection]) -> int:
    """Cut every open inbound connection the current policies deny; returns how many."""
    closed = 0
    for conn in conns:
        info = conn.info
        if info.direction != "inbound" or info.dst_workload is None or conn.cancel is None:
            continue
        local = store.workload_by_uid(info.dst_workload.uid) or info.dst_workload
        decision = authorize(store, local, info.src_addr.ip, info.dst_addr, info.src_identity)
        if decision.allowed:
            continue
        log.info(
            "closing connection no longer allowed by policy",
            src=str(info.src_addr.ip),
            dst=str(info.dst_addr),
            policy=decision.policy,
            reason=decision.message,
        )
        conn.cancel()
        closed += 1
    return closed


def watch_policies(store: StateStore, tracker: ConnectionTracker) -> Callable[[], None]:
    """Subscribe to the store; returns the unsubscribe function."""

    def changed(kinds: frozenset[Kind]) -> None:
        if kinds & {Kind.POLICY, Kind.WORKLOAD}:
            recheck_connections(store, tracker.open_connections())

    return store.subscribe(changed)
