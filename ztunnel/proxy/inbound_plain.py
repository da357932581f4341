"""Inbound plaintext (15006): non-mesh traffic redirected into a pod.

There is no peer identity, so policy sees principal "" (STRICT mTLS is a DENY on
``notPrincipals: [Presence]``, which matches exactly this case). Allowed
connections go on to the original destination, from the client's IP where the
kernel allows.
"""

from __future__ import annotations

import ipaddress
import socket
from typing import TYPE_CHECKING

import trio

from ztunnel.config import Address
from ztunnel.proxy.authorize import serve_inbound
from ztunnel.proxy.sockets import original_dst, socket_stream
from ztunnel.telemetry.connections import ConnectionInfo

if TYPE_CHECKING:
    from ztunnel.proxy.workload_proxy import WorkloadProxy


async def serve_plaintext_connection(
    proxy: WorkloadProxy, conn: socket.socket, peer: Address
) -> None:
    ctx = proxy.ctx
    dst = original_dst(conn)
    if dst[1] in ctx.illegal_ports:
        ctx.tracker.connection_failed(peer, dst, "inbound", f"self call to port {dst[1]} refused")
        return
    try:
        local = await proxy.local_workload()
    except LookupError as exc:
        ctx.tracker.connection_failed(peer, dst, "inbound", str(exc))
        return
    tracked = ctx.tracker.open(
        ConnectionInfo(
            direction="inbound",
            reporter="destination",
            src_addr=peer,
            dst_addr=dst,
            hbone_addr=None,
            src_workload=ctx.store.workload_by_ip(ipaddress.ip_address(peer[0])),
            dst_workload=local,
            dst_service=None,
            src_identity=None,
            dst_identity=local.identity,
            security_policy="unknown",
            proxy_uid=proxy.uid,
        )
    )
    client = socket_stream(conn)
    try:
        await serve_inbound(proxy, tracked, local, client, dst, respond=None)
    finally:
        await trio.aclose_forcefully(client)
