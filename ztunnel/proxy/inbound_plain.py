"""Inbound plaintext (15006): non-mesh traffic redirected into a pod.

There is no peer identity, so policy sees principal "" (STRICT mTLS is a DENY on
``notPrincipals: [Presence]``, which matches exactly this case). Allowed
connections go on to the original destination, from the client's IP where the
kernel allows.
"""

from __future__ import annotations

import socket

import trio

from ztunnel.model.address import SocketAddr
from ztunnel.model.outcome import Failure, FailureKind
from ztunnel.proxy.authorize import serve_inbound
from ztunnel.proxy.deps import FlowDeps, UnknownSourceWorkload
from ztunnel.proxy.relay import abort, close_now
from ztunnel.proxy.sockets import original_dst, socket_stream
from ztunnel.telemetry.connections import ConnectionInfo


async def serve_plaintext_connection(deps: FlowDeps, conn: socket.socket, peer: SocketAddr) -> None:
    dst = original_dst(conn)
    client = socket_stream(conn)
    try:
        await proxy_plaintext(deps, client, peer, dst)
    except BaseException:  # cut midway (drain deadline, a bug): RST, never a clean-looking FIN
        abort(client)
        raise
    finally:
        await close_now(client)


async def proxy_plaintext(
    deps: FlowDeps, client: trio.abc.HalfCloseableStream, peer: SocketAddr, dst: SocketAddr
) -> None:
    """Authorize and carry one redirected plaintext connection to ``dst`` (its original
    destination, on this pod); never raises for network trouble."""
    tracker = deps.tracker
    if deps.settings.ports.is_proxy_port(dst.port):
        failure = Failure(FailureKind.SELF_CALL, f"self call to port {dst.port} refused")
        tracker.connection_failed(peer, dst, "inbound", failure)
        return
    try:
        local = await deps.local_workload()
    except UnknownSourceWorkload as exc:
        tracker.connection_failed(
            peer, dst, "inbound", Failure(FailureKind.UNKNOWN_SOURCE, str(exc))
        )
        return
    tracked = tracker.open(
        ConnectionInfo(
            direction="inbound",
            reporter="destination",
            src_addr=peer,
            dst_addr=dst,
            hbone_addr=None,
            src_workload=deps.store.workload_by_ip(peer.ip),
            dst_workload=local,
            dst_service=None,
            src_identity=None,
            dst_identity=local.identity,
            security_policy="unknown",
            proxy_uid=deps.settings.proxy_uid,
        )
    )
    await serve_inbound(deps, tracked, local, client, dst, respond=None)
