"""The common tail of both inbound paths: authorize, dial the app, relay, account.

Inbound HBONE (15008) and inbound plaintext (15006) differ only in how they learn
the peer (a verified SPIFFE identity, or none) and in how they answer (an HTTP
status on the CONNECT stream, or nothing). From the moment a connection is
tracked, the same rules hold for both:

- the L4 policy of the destination's *current* state decides before the app is
  dialled (deny → 401 / close, flag DENY);
- a policy change may cut the connection at any point (``tracked.cancel``), also
  while the app is being dialled;
- the tracked connection is closed exactly once whatever happens, including
  cancellation by a drain or a dying HBONE connection, so no ghost connection
  stays in the metrics or the config dump.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import trio

from ztunnel.config import Address
from ztunnel.model.identity import Identity
from ztunnel.model.workload import Workload
from ztunnel.policy.rbac import ConnectionAttrs, Decision, evaluate
from ztunnel.proxy.relay import Outcome, describe, relay
from ztunnel.proxy.sockets import connect_socket, socket_stream
from ztunnel.state.store import StateStore
from ztunnel.telemetry.connections import TrackedConnection

if TYPE_CHECKING:
    from ztunnel.proxy.workload_proxy import WorkloadProxy

# Answers the client once the outcome is known: 200, 401 or 503 (HBONE); None for plaintext.
Respond = Callable[[int], Awaitable[None]]

POLICY_CUT = "connection closed: no longer allowed by policy"


def authorize(
    store: StateStore,
    local: Workload,
    src: str,
    dst: Address,
    identity: Identity | None,
) -> Decision:
    """The destination's verdict for a connection from ``src`` to ``dst`` (the target port)."""
    attrs = ConnectionAttrs(
        src_ip=ipaddress.ip_address(src),
        dst_ip=ipaddress.ip_address(dst[0]),
        dst_port=dst[1],
        src_identity=identity,
    )
    return evaluate(store.policies_for(local), attrs)


def denial_reason(decision: Decision) -> str:
    """The access-log error for a denied connection, naming the deciding policy if any."""
    by = f" by {decision.policy}" if decision.policy else ""
    return f"connection denied: {decision.message}{by}"


async def serve_inbound(
    proxy: WorkloadProxy,
    tracked: TrackedConnection,
    local: Workload,
    client: trio.abc.HalfCloseableStream,
    upstream: Address,
    respond: Respond | None,
) -> None:
    """Authorize, dial ``upstream`` (from the client's IP where allowed), relay. Never raises
    for network trouble; always closes ``tracked``."""
    outcome = Outcome()
    try:
        with trio.CancelScope() as scope:
            tracked.cancel = scope.cancel
            await _authorize_and_relay(proxy, tracked, local, client, upstream, respond, outcome)
        if scope.cancelled_caught:
            outcome.set(POLICY_CUT, "DENY")
    finally:
        tracked.close(outcome.error, outcome.flags)


async def _authorize_and_relay(
    proxy: WorkloadProxy,
    tracked: TrackedConnection,
    local: Workload,
    client: trio.abc.HalfCloseableStream,
    upstream: Address,
    respond: Respond | None,
    outcome: Outcome,
) -> None:
    info = tracked.info
    src_ip = str(info.src_addr[0])
    try:
        decision = authorize(proxy.ctx.store, local, src_ip, upstream, info.src_identity)
        if not decision.allowed:
            outcome.set(denial_reason(decision), "DENY")
            if respond is not None:
                await respond(401)
            return
        try:
            sock = await connect_socket(
                proxy.factory,
                upstream,
                src_ip=src_ip if proxy.transparent else None,
                transparent=proxy.transparent,
            )
        except OSError as exc:
            outcome.set(
                f"connect to {upstream[0]}:{upstream[1]} failed: {describe(exc)}", "CONNECT"
            )
            if respond is not None:
                await respond(503)
            return
        app = socket_stream(sock)
        try:
            if respond is not None:
                await respond(200)
            result = await relay(
                client, app, on_a_to_b=tracked.add_received, on_b_to_a=tracked.add_sent
            )
            outcome.set(result.error)
        finally:
            await trio.aclose_forcefully(app)
    except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
        outcome.set(describe(exc))
