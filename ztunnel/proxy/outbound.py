"""Outbound: a captured app connection (15001) or a SOCKS5 one becomes HBONE, TCP or passthrough.

Order follows ztunnel's outbound.rs: self-call check (before anything else, so a
connection to one of the agent's own ports is never dialled), source workload,
resolve the destination (workload by IP, service VIP with weighted endpoint
choice, waypoints), then HBONE through the pool, plain TCP to known non-mesh
workloads, or passthrough for unknown addresses. Outbound applies no policy: the
destination's agent decides.
"""

from __future__ import annotations

import socket
from collections.abc import Awaitable, Callable

import trio

from ztunnel.hbone.errors import StreamRefusedError
from ztunnel.hbone.pool import PoolKey
from ztunnel.model.address import IPAddress, SocketAddr
from ztunnel.model.outcome import Failure, FailureKind
from ztunnel.model.workload import Workload
from ztunnel.proxy import headers
from ztunnel.proxy.deps import FlowDeps, UnknownSourceWorkload, dial
from ztunnel.proxy.outcome import (
    NETWORK_ERRORS,
    Outcome,
    closing,
    describe,
    relay_failure,
    upstream_failure,
)
from ztunnel.proxy.relay import abort, close_now, relay
from ztunnel.proxy.sockets import original_dst, socket_stream
from ztunnel.state.resolve import (
    HboneUpstream,
    Passthrough,
    ResolveError,
    Upstream,
    resolve_outbound,
)
from ztunnel.telemetry.connections import ConnectionInfo, TrackedConnection

# Called once the upstream is connected (None) or has failed (why); SOCKS5 replies then.
ReadyHook = Callable[[Failure | None], Awaitable[None]]


async def serve_outbound_connection(deps: FlowDeps, conn: socket.socket, peer: SocketAddr) -> None:
    dst = original_dst(conn)
    stream = socket_stream(conn)
    try:
        await proxy_outbound(deps, stream, peer, dst)
    except BaseException:  # cut midway (drain deadline, a bug): RST, never a clean-looking FIN
        abort(stream)
        raise
    finally:
        await close_now(stream)


async def proxy_outbound(
    deps: FlowDeps,
    downstream: trio.abc.HalfCloseableStream,
    client: SocketAddr,
    dst: SocketAddr,
    *,
    ready: ReadyHook | None = None,
    early_data: bytes = b"",
) -> None:
    """Carry one outbound connection to ``dst``; never raises for network trouble."""

    async def refuse(failure: Failure) -> None:
        deps.tracker.connection_failed(client, dst, "outbound", failure)
        if ready is not None:
            await ready(failure)

    if deps.settings.ports.is_self_call(dst, deps.is_local):
        await refuse(Failure(FailureKind.SELF_CALL, f"self call to {dst} refused"))
        return
    try:
        source = await deps.local_workload()
        upstream = resolve_outbound(deps.store, source, dst, rng=deps.rng)
    except UnknownSourceWorkload as exc:
        await refuse(Failure(FailureKind.UNKNOWN_SOURCE, str(exc)))
        return
    except ResolveError as exc:
        await refuse(Failure(FailureKind.NO_ROUTE, str(exc)))
        return
    tracked = deps.tracker.open(connection_info(deps, source, client, upstream))
    # Closed exactly once whatever happens, also when a drain cancels us midway.
    with closing(tracked) as outcome:
        await _carry(
            deps, source, downstream, client, upstream, tracked, outcome, ready, early_data
        )


async def _carry(
    deps: FlowDeps,
    source: Workload,
    downstream: trio.abc.HalfCloseableStream,
    client: SocketAddr,
    upstream: Upstream,
    tracked: TrackedConnection,
    outcome: Outcome,
    ready: ReadyHook | None,
    early_data: bytes,
) -> None:
    try:
        upstream_stream = await open_upstream(deps, source, client, upstream)
    except NETWORK_ERRORS as exc:
        outcome.failure = upstream_failure(exc)
        if ready is not None:
            await ready(outcome.failure)
        return
    try:
        if ready is not None:
            await ready(None)
        if early_data:
            try:
                await upstream_stream.send_all(early_data)
            except NETWORK_ERRORS as exc:
                outcome.failure = relay_failure(describe(exc), client_failed=False)
                abort(downstream)
                return
            tracked.add_sent(len(early_data))
        outcome.client, outcome.upstream = downstream, upstream_stream
        result = await relay(
            downstream,
            upstream_stream,
            on_a_to_b=tracked.add_sent,
            on_b_to_a=tracked.add_received,
        )
        outcome.failure = relay_failure(result.error, client_failed=result.failed == "a")
    finally:
        await close_now(upstream_stream)


def connection_info(
    deps: FlowDeps, source: Workload, client: SocketAddr, upstream: Upstream
) -> ConnectionInfo:
    workload = None if isinstance(upstream, Passthrough) else upstream.workload
    service = None if isinstance(upstream, Passthrough) else upstream.service
    hbone = isinstance(upstream, HboneUpstream)
    return ConnectionInfo(
        direction="outbound",
        reporter="source",
        src_addr=client,
        dst_addr=upstream.address,
        hbone_addr=upstream.authority if isinstance(upstream, HboneUpstream) else None,
        src_workload=source,
        dst_workload=workload,
        dst_service=service,
        src_identity=source.identity,
        dst_identity=workload.identity if (hbone and workload is not None) else None,
        security_policy="mutual_tls" if hbone else "unknown",
        proxy_uid=deps.settings.proxy_uid,
    )


async def open_upstream(
    deps: FlowDeps, source: Workload, client: SocketAddr, upstream: Upstream
) -> trio.abc.HalfCloseableStream:
    """An HBONE stream through the pool, or a TCP connection; raises NETWORK_ERRORS."""
    if not isinstance(upstream, HboneUpstream):
        return await dial(deps, upstream.address)
    key = PoolKey(
        src_identity=source.identity,
        dst_identities=frozenset(upstream.expected_identities),
        dst=upstream.address,
        src_ip=source_ip(source, client.ip),
    )
    service_host = upstream.service.hostname if upstream.service is not None else None
    extra = [
        ("baggage", headers.baggage(source, deps.settings.cluster_id)),
        ("forwarded", headers.forwarded(client, service_host)),
        ("traceparent", headers.traceparent()),
    ]
    sent = [h for h in extra if h[1]]
    try:
        return await deps.open_hbone(key, upstream.authority_header, sent)
    except StreamRefusedError:
        # Never processed (the peer's GOAWAY crossed our CONNECT, e.g. its agent is being
        # replaced): once more, on another connection; the pool skips the draining one.
        return await deps.open_hbone(key, upstream.authority_header, sent)


def source_ip(workload: Workload, client_ip: IPAddress) -> IPAddress:
    """The pool key's source IP: the client's if it is the workload's, else the workload's.

    In-pod, the client is always the pod; in dedicated mode an app may connect from
    elsewhere (e.g. 127.0.0.1), and the tunnel should still leave from the workload IP.
    """
    if client_ip in workload.workload_ips or not workload.workload_ips:
        return client_ip
    same_family = [w for w in workload.workload_ips if w.version == client_ip.version]
    return (same_family or list(workload.workload_ips))[0]
