"""Inbound HBONE (15008): mTLS accept, CONNECT streams, L4 policy, upstream to the app.

Per stream, in ztunnel's order (inbound.rs): the CONNECT request is validated
by the HBONE server (400), the authority resolved against the local workload
(400 IP mismatch, 503 no port / self call), L4 authorization evaluated with the
peer's verified SPIFFE identity (401, flag DENY) *before* any connection to the
app, then the app is dialled from the client's IP where the kernel allows
(503, flag CONNECT), and only then 200 is sent and bytes flow.
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
from typing import TYPE_CHECKING

import trio

from ztunnel.config import Address
from ztunnel.hbone.connection import HboneServerStream, serve_hbone
from ztunnel.hbone.engine import ConnectRequest, validate_connect
from ztunnel.hbone.tlsstream import tls_handshake
from ztunnel.identity.tls import peer_identity, server_context, verify_client_trust_domain
from ztunnel.model.identity import Identity
from ztunnel.model.workload import Service, Workload
from ztunnel.proxy import headers
from ztunnel.proxy.authorize import serve_inbound
from ztunnel.proxy.relay import describe
from ztunnel.proxy.sockets import sockname
from ztunnel.state.resolve import ResolveError, resolve_inbound
from ztunnel.telemetry.connections import ConnectionInfo

if TYPE_CHECKING:
    from ztunnel.proxy.workload_proxy import WorkloadProxy

TLS_HANDSHAKE_TIMEOUT = 10.0


async def serve_inbound_connection(
    proxy: WorkloadProxy, conn: socket.socket, peer: Address
) -> None:
    local_addr = sockname(conn)
    tracker = proxy.ctx.tracker
    try:
        local = await proxy.local_workload()
        cert = await proxy.ctx.secrets.fetch(local.identity)
        tls = await tls_handshake(
            conn, server_context(cert), server_side=True, timeout=TLS_HANDSHAKE_TIMEOUT
        )
    except Exception as exc:
        tracker.connection_failed(
            peer, local_addr, "inbound", f"tls handshake failed: {describe(exc)}"
        )
        return
    try:
        der = tls.peer_certificate_der() or b""
        verify_client_trust_domain(der, local.identity.trust_domain)
        # As ztunnel: policy sees the certificate's first SPIFFE SAN.
        src_identity = peer_identity(der)
    except Exception as exc:
        tracker.connection_failed(peer, local_addr, "inbound", f"client identity rejected: {exc}")
        await trio.aclose_forcefully(tls)
        return
    conn_ctx = InboundConnection(proxy, local, src_identity, peer, local_addr)
    try:
        await serve_hbone(
            tls,
            conn_ctx.handle_stream,
            stream_window=proxy.ctx.config.http2_stream_window_size,
            connection_window=proxy.ctx.config.http2_connection_window_size,
            max_frame_size=proxy.ctx.config.http2_frame_size,
            on_connection=proxy.server_connections.add,
            on_close=proxy.server_connections.discard,
        )
    finally:
        await trio.aclose_forcefully(tls)


class InboundConnection:
    """One mTLS connection from a peer agent; each CONNECT stream is handled here."""

    def __init__(
        self,
        proxy: WorkloadProxy,
        local: Workload,
        src_identity: Identity,
        peer: Address,
        local_addr: Address,
    ) -> None:
        self.proxy = proxy
        self._local = local
        self.src_identity = src_identity
        self.peer = peer
        self.local_addr = local_addr

    @property
    def local(self) -> Workload:
        """The destination workload as the state knows it *now*.

        A pooled HBONE connection outlives policy and workload updates; every stream
        must be judged by the current ones, not by those of the TLS handshake.
        """
        return self.proxy.ctx.store.workload_by_uid(self._local.uid) or self._local

    def guess_service(self, request: ConnectRequest) -> Service | None:
        """The service the client addressed (Forwarded host=), if this pod backs it.

        Only telemetry uses it, so a lying client can only mislabel its own metrics.
        """
        host = headers.forwarded_host(request.header("forwarded"))
        if host is None:
            return None
        service = self.proxy.ctx.store.service_by_hostname(
            host, prefer_namespace=self.local.namespace
        )
        if service is None or self.local.uid not in service.endpoints:
            return None
        return service

    async def handle_stream(self, request: ConnectRequest, stream: HboneServerStream) -> None:
        proxy, ctx = self.proxy, self.proxy.ctx
        _, host, port = validate_connect(request)
        dst_ip = self.local_addr[0]
        local = self.local
        try:
            target = resolve_inbound(
                ctx.store,
                local,
                host,
                port,
                ipaddress.ip_address(dst_ip),
                illegal=ctx.illegal_ports,
            )
        except ResolveError as exc:
            ctx.tracker.connection_failed(self.peer, (host, port), "inbound", str(exc))
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await stream.respond(exc.status, [])
            return
        upstream_addr = (dst_ip, target.port)
        service = target.service or self.guess_service(request)
        src_workload = ctx.store.workload_by_ip(ipaddress.ip_address(self.peer[0]))
        tracked = ctx.tracker.open(
            ConnectionInfo(
                direction="inbound",
                reporter="destination",
                src_addr=self.peer,
                dst_addr=upstream_addr,
                hbone_addr=(host, port),
                src_workload=src_workload,
                dst_workload=local,
                dst_service=service,
                src_identity=self.src_identity,
                dst_identity=local.identity,
                security_policy="mutual_tls",
                proxy_uid=proxy.uid,
            )
        )
        resp_headers = [("baggage", headers.baggage(local, ctx.config.cluster_id))]

        async def respond(status: int) -> None:
            await stream.respond(status, [h for h in resp_headers if h[1]] if status == 200 else [])

        await serve_inbound(proxy, tracked, local, stream, upstream_addr, respond)
