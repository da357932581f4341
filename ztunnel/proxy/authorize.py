"""The common tail of both inbound paths: authorize, dial the app, relay, account.

Inbound HBONE (15008) and inbound plaintext (15006) differ only in how they learn
the peer (a verified SPIFFE identity, or none) and in how they answer (an HTTP
status on the CONNECT stream, or nothing). From the moment a connection is
tracked, the same rules hold for both:

- the L4 policy of the destination's *current* state decides before the app is
  dialled (deny → 401 / close, flag DENY);
- a policy change may cut the connection at any point (``tracked.cancel``), also
  while the app is being dialled (flag DENY);
- the tracked connection is closed exactly once whatever happens, including
  cancellation by a drain or a dying HBONE connection, so no ghost connection
  stays in the metrics or the config dump.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable

import trio

from ztunnel.hbone.errors import HboneError
from ztunnel.model.address import IPAddress, SocketAddr
from ztunnel.model.identity import Identity
from ztunnel.model.outcome import POLICY_CUT, Failure, FailureKind
from ztunnel.model.workload import Workload
from ztunnel.policy.rbac import ConnectionAttrs, Decision, evaluate
from ztunnel.proxy.deps import FlowDeps, dial
from ztunnel.proxy.outcome import (
    NETWORK_ERRORS,
    Outcome,
    closing,
    connect_kind,
    describe,
    relay_failure,
)
from ztunnel.proxy.relay import abort, close_now, relay
from ztunnel.state.store import StateStore
from ztunnel.telemetry.connections import TrackedConnection

# Answers the client once the outcome is known: 200, 401 or 503 (HBONE); None for plaintext.
Respond = Callable[[int], Awaitable[None]]

# The client went away while we answered: the outcome already recorded stands.
_ANSWER_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError, HboneError)


def authorize(
    store: StateStore,
    local: Workload,
    src_ip: IPAddress,
    dst: SocketAddr,
    identity: Identity | None,
) -> Decision:
    """The destination's verdict for a connection from ``src_ip`` to ``dst`` (the target)."""
    attrs = ConnectionAttrs(src_ip=src_ip, dst_ip=dst.ip, dst_port=dst.port, src_identity=identity)
    return evaluate(store.policies_for(local), attrs)


def denial(decision: Decision) -> Failure:
    """The failure of a denied connection; its message names the deciding policy if any."""
    by = f" by {decision.policy}" if decision.policy else ""
    return Failure(FailureKind.DENIED, f"connection denied: {decision.message}{by}")


async def serve_inbound(
    deps: FlowDeps,
    tracked: TrackedConnection,
    local: Workload,
    client: trio.abc.HalfCloseableStream,
    upstream: SocketAddr,
    respond: Respond | None,
) -> None:
    """Authorize, dial ``upstream`` (from the client's IP where allowed), relay. Never raises
    for network trouble; always closes ``tracked``."""
    with closing(tracked) as outcome:
        with trio.CancelScope() as scope:
            tracked.cancel = scope.cancel
            await _authorize_and_relay(deps, tracked, local, client, upstream, respond, outcome)
        if scope.cancelled_caught:
            outcome.failure = POLICY_CUT


async def _answer(respond: Respond | None, status: int) -> None:
    if respond is not None:
        with contextlib.suppress(*_ANSWER_ERRORS):
            await respond(status)


async def _authorize_and_relay(
    deps: FlowDeps,
    tracked: TrackedConnection,
    local: Workload,
    client: trio.abc.HalfCloseableStream,
    upstream: SocketAddr,
    respond: Respond | None,
    outcome: Outcome,
) -> None:
    info = tracked.info
    src_ip = info.src_addr.ip
    decision = authorize(deps.store, local, src_ip, upstream, info.src_identity)
    if not decision.allowed:
        outcome.failure = denial(decision)
        await _answer(respond, 401)
        return
    transparent = deps.settings.transparent
    try:
        app = await dial(
            deps, upstream, src_ip=src_ip if transparent else None, transparent=transparent
        )
    except NETWORK_ERRORS as exc:
        reason = f"connect to {upstream} failed: {describe(exc)}"
        outcome.failure = Failure(connect_kind(exc), reason)
        await _answer(respond, 503)
        return
    try:
        if respond is not None:
            try:
                await respond(200)
            except NETWORK_ERRORS as exc:  # the client went away before its answer
                outcome.failure = relay_failure(describe(exc), client_failed=True)
                abort(app)
                return
        outcome.client, outcome.upstream = client, app
        result = await relay(
            client, app, on_a_to_b=tracked.add_received, on_b_to_a=tracked.add_sent
        )
        outcome.failure = relay_failure(result.error, client_failed=result.failed == "a")
    finally:
        await close_now(app)
