"""Outbound: a captured app connection (15001) or a SOCKS5 one becomes HBONE, TCP or passthrough.

Order follows ztunnel's outbound.rs: self-call check, source workload, resolve
the destination (workload by IP, service VIP with weighted endpoint choice,
waypoints), then HBONE through the pool, plain TCP to known non-mesh workloads,
or passthrough for unknown addresses. Outbound applies no policy: the
destination's agent decides.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import trio

from ztunnel.config import Address
from ztunnel.hbone.connection import HboneStatusError
from ztunnel.hbone.pool import PoolKey
from ztunnel.proxy import headers
from ztunnel.proxy.relay import Outcome, describe, relay
from ztunnel.proxy.sockets import connect_socket, original_dst, socket_stream
from ztunnel.state.resolve import (
    HboneUpstream,
    Passthrough,
    ResolveError,
    TcpUpstream,
    Upstream,
    resolve_outbound,
)
from ztunnel.telemetry.connections import ConnectionInfo, TrackedConnection

if TYPE_CHECKING:
    from ztunnel.model.workload import Workload
    from ztunnel.proxy.workload_proxy import WorkloadProxy

# Called once the upstream is connected (True) or has failed (False, reason); SOCKS5 replies then.
ReadyHook = Callable[[bool, str], Awaitable[None]]


async def serve_outbound_connection(
    proxy: WorkloadProxy, conn: socket.socket, peer: Address
) -> None:
    dst = original_dst(conn)
    stream = socket_stream(conn)
    try:
        await proxy_outbound(proxy, stream, peer, dst)
    finally:
        await trio.aclose_forcefully(stream)


def is_self_call(proxy: WorkloadProxy, dst: Address) -> bool:
    return ipaddress.ip_address(dst[0]).is_loopback and dst[1] in proxy.ctx.illegal_ports


async def proxy_outbound(
    proxy: WorkloadProxy,
    downstream: trio.abc.HalfCloseableStream,
    client: Address,
    dst: Address,
    *,
    ready: ReadyHook | None = None,
    early_data: bytes = b"",
) -> None:
    """Carry one outbound connection to ``dst``; never raises for network trouble."""
    tracker = proxy.ctx.tracker

    async def fail(reason: str) -> None:
        tracker.connection_failed(client, dst, "outbound", reason)
        if ready is not None:
            await ready(False, reason)

    if is_self_call(proxy, dst):
        await fail(f"self call to {dst[0]}:{dst[1]} refused")
        return
    try:
        source = await proxy.local_workload()
        upstream = resolve_outbound(
            proxy.ctx.store, source, ipaddress.ip_address(dst[0]), dst[1], rng=proxy.ctx.rng
        )
    except (LookupError, ResolveError) as exc:
        await fail(str(exc))
        return
    tracked = tracker.open(connection_info(proxy, source, client, dst, upstream))
    # Closed exactly once whatever happens, also when a drain cancels us midway.
    outcome = Outcome()
    try:
        await _carry(
            proxy, source, downstream, client, dst, upstream, tracked, ready, early_data, outcome
        )
    finally:
        tracked.close(outcome.error, outcome.flags)


async def _carry(
    proxy: WorkloadProxy,
    source: Workload,
    downstream: trio.abc.HalfCloseableStream,
    client: Address,
    dst: Address,
    upstream: Upstream,
    tracked: TrackedConnection,
    ready: ReadyHook | None,
    early_data: bytes,
    outcome: Outcome,
) -> None:
    try:
        upstream_stream = await open_upstream(proxy, source, client, dst, upstream)
    except HboneStatusError as exc:
        outcome.set(f"http status: {exc.status}", "CONNECT")
    except (OSError, trio.BrokenResourceError, trio.TooSlowError) as exc:
        outcome.set(f"connect to upstream failed: {describe(exc)}", "CONNECT")
    except Exception as exc:  # TLS identity mismatch, h2 failure...: deny on doubt
        outcome.set(f"connect to upstream failed: {exc}", "CONNECT")
    else:
        try:
            if ready is not None:
                await ready(True, "")
            if early_data:
                await upstream_stream.send_all(early_data)
                tracked.add_sent(len(early_data))
            result = await relay(
                downstream,
                upstream_stream,
                on_a_to_b=tracked.add_sent,
                on_b_to_a=tracked.add_received,
            )
            outcome.set(result.error)
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            outcome.set(describe(exc))
        finally:
            await trio.aclose_forcefully(upstream_stream)
        return
    if ready is not None:
        await ready(False, str(outcome.error))


def connection_info(
    proxy: WorkloadProxy, source: Workload, client: Address, dst: Address, upstream: Upstream
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
        proxy_uid=proxy.uid,
    )


async def open_upstream(
    proxy: WorkloadProxy, source: Workload, client: Address, dst: Address, upstream: Upstream
) -> trio.abc.HalfCloseableStream:
    if isinstance(upstream, HboneUpstream):
        key = PoolKey(
            src_identity=source.identity,
            dst_identities=frozenset(upstream.expected_identities),
            dst=(str(upstream.address[0]), upstream.address[1]),
            src_ip=source_ip(source, client[0]),
        )
        service_host = upstream.service.hostname if upstream.service is not None else None
        extra = [
            ("baggage", headers.baggage(source, proxy.ctx.config.cluster_id)),
            ("forwarded", headers.forwarded(client, service_host)),
            ("traceparent", headers.traceparent()),
        ]
        return await proxy.pool.open_stream(
            key, upstream.authority_header, [h for h in extra if h[1]]
        )
    assert isinstance(upstream, TcpUpstream | Passthrough)
    sock = await connect_socket(proxy.factory, (str(upstream.address[0]), upstream.address[1]))
    return socket_stream(sock)


def source_ip(workload: Workload, client_ip: str) -> str:
    """The pool key's source IP: the client's if it is the workload's, else the workload's.

    In-pod, the client is always the pod; in dedicated mode an app may connect from
    elsewhere (e.g. 127.0.0.1), and the tunnel should still leave from the workload IP.
    """
    ip = ipaddress.ip_address(client_ip)
    if ip in workload.workload_ips or not workload.workload_ips:
        return client_ip
    same_family = [w for w in workload.workload_ips if w.version == ip.version]
    return str((same_family or list(workload.workload_ips))[0])
