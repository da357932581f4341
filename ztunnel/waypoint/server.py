"""The waypoint process core: HBONE in, HTTP-aware proxying, HBONE out.

Accept (``serve_socket``): TLS 1.3 with the waypoint's own SVID; a client
certificate is required and must carry a SPIFFE identity in the waypoint's
trust domain (checked after the handshake, as the agent's inbound does); the
first SPIFFE SAN is the caller's principal for L7 policy. Then HTTP/2 CONNECT
(``hbone.serve_hbone``): each stream's ``:authority`` is the address the client
originally dialled (a Service VIP:port, or a pod ip:port for a workload
waypoint). An authority naming nothing known is answered ``503``; otherwise
``200`` and the stream is served (``serve_tunnel``):

* the Service port's declared protocol decides, else the first bytes are
  sniffed (``sniff``): HTTP/1.1 (``h1server``), HTTP/2 with prior knowledge
  (``h2conn``), or plain TCP;
* every HTTP request goes through ``proxy.RequestFlow``;
* plain TCP gets L4 policy only (``policy.l7`` evaluated for TCP, istiod's
  ``forTCP`` rule), then an endpoint, then a byte relay; a denial closes it.

Upstream, requests leave over HBONE (``hbone.HbonePool``) to ``podIP:15008``
with ``:authority = podIP:targetPort``, the destination's SVID verified against
the identities the state expects.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import os
import random
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol as TypingProtocol

import structlog
import trio

from ztunnel.errors import ZtunnelError
from ztunnel.hbone.connection import HboneServerConnection, HboneServerStream, serve_hbone
from ztunnel.hbone.engine import ConnectRequest, validate_connect
from ztunnel.hbone.pool import HbonePool, PoolKey
from ztunnel.hbone.settings import HboneSettings
from ztunnel.hbone.tlsstream import TLSStream, tls_handshake
from ztunnel.identity.certificate import WorkloadCertificate
from ztunnel.identity.errors import TLSIdentityError
from ztunnel.identity.tls import (
    client_context,
    peer_identity,
    server_context,
    verify_client_trust_domain,
    verify_server_identity,
)
from ztunnel.model.address import SocketAddr
from ztunnel.model.identity import Identity
from ztunnel.model.workload import HBONE_PORT, Service, Workload
from ztunnel.policy.l7 import evaluate
from ztunnel.policy.l7match import RequestAttrs
from ztunnel.telemetry.logging import ACCESS_LOGGER, Bare, get_logger
from ztunnel.waypoint.backends import service_endpoints, workload_endpoint
from ztunnel.waypoint.errors import UpstreamError
from ztunnel.waypoint.exchange import Exchange, H2Exchange
from ztunnel.waypoint.h1server import H1Limits, serve_h1
from ztunnel.waypoint.h2conn import H2Connection, H2Stream
from ztunnel.waypoint.h2proto import H2Limits
from ztunnel.waypoint.messages import Protocol
from ztunnel.waypoint.proxy import ProxyContext, ProxySettings, RequestFlow, Tunnel
from ztunnel.waypoint.relay import PrefixedStream, relay
from ztunnel.waypoint.sniff import MAX_SNIFF_BYTES, sniff
from ztunnel.waypoint.state import WaypointState
from ztunnel.waypoint.telemetry import WaypointMetrics
from ztunnel.waypoint.upstream import Connector, Endpoint, UpstreamPool, hbone_connector

log = structlog.get_logger("ztunnel.waypoint")


class CertSource(TypingProtocol):
    """Where certificates come from (``identity.SecretManager`` fits)."""

    async def fetch(self, identity: Identity) -> WorkloadCertificate: ...


@dataclass(frozen=True, slots=True)
class WaypointConfig:
    identity: Identity  # the waypoint's own workload identity (its Deployment's SA)
    listen: tuple[str, int] = ("0.0.0.0", HBONE_PORT)
    h1: H1Limits = field(default_factory=H1Limits)
    h2: H2Limits = field(default_factory=H2Limits)
    proxy: ProxySettings = field(default_factory=ProxySettings)
    sniff_timeout: float = 5.0
    tls_handshake_timeout: float = 10.0
    drain_timeout: float = 30.0
    upstream_idle_timeout: float = 60.0
    upstream_connect_timeout: float = 10.0
    hbone_port: int = HBONE_PORT  # where destination agents accept HBONE


# -- sockets (the waypoint pod is not captured: plain sockets in its own netns) ------------------


def _listener(addr: tuple[str, int]) -> socket.socket:
    family = socket.AF_INET6 if ":" in addr[0] else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(1024)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


async def connect_socket(addr: tuple[str, int], timeout: float) -> socket.socket:  # noqa: ASYNC109
    """A connected non-blocking stdlib socket (``tls_handshake`` consumes it)."""
    family = socket.AF_INET6 if ":" in addr[0] else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        err = sock.connect_ex(addr)
        if err not in (0, errno.EINPROGRESS):
            raise OSError(err, os.strerror(err))
        with trio.fail_after(timeout):
            await trio.lowlevel.wait_writable(sock)
        err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            raise OSError(err, os.strerror(err))
    except BaseException:
        sock.close()
        raise
    return sock


async def _close(stream: trio.abc.HalfCloseableStream) -> None:
    """End our direction cleanly (END_STREAM on HBONE), then close."""
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
        await stream.send_eof()
    await trio.aclose_forcefully(stream)


# -- the waypoint --------------------------------------------------------------------------------


class Waypoint:
    def __init__(
        self,
        config: WaypointConfig,
        state: WaypointState,
        secrets: CertSource,
        *,
        connector: Connector | None = None,
        metrics: WaypointMetrics | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.config = config
        self.state = state
        self.secrets = secrets
        self.metrics = metrics
        self.hbone_settings = HboneSettings(drain_timeout=config.drain_timeout)
        self.hbone_pool = HbonePool(self._dial_hbone, settings=self.hbone_settings)
        self.pool = UpstreamPool(
            connector or hbone_connector(self._open_hbone, self._open_tcp),
            idle_timeout=config.upstream_idle_timeout,
        )
        self.ctx = ProxyContext(state, self.pool, rng=rng, metrics=metrics, settings=config.proxy)
        self.connections: set[HboneServerConnection] = set()
        self.address: tuple[str, int] | None = None
        self._accept_scope = trio.CancelScope()

    # -- lifecycle -------------------------------------------------------------------------------

    async def run_upstreams(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """The upstream connection pools (HBONE and HTTP); ``run`` starts them itself."""
        async with trio.open_nursery() as nursery:
            await nursery.start(self.hbone_pool.run)
            await nursery.start(self.pool.run)
            task_status.started()

    async def run(
        self, *, task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Listen on ``config.listen`` (bound before ``started``), serve until cancelled."""
        listener = _listener(self.config.listen)
        self.address = listener.getsockname()[:2]
        with listener:
            async with trio.open_nursery() as nursery:
                await nursery.start(self.run_upstreams)
                task_status.started(self.address)
                with self._accept_scope:
                    while True:
                        await trio.lowlevel.wait_readable(listener)
                        try:
                            sock, peer = listener.accept()
                        except BlockingIOError:
                            continue
                        except OSError as exc:
                            log.error("waypoint accept failed", error=str(exc))
                            await trio.sleep(0.1)
                            continue
                        nursery.start_soon(self._serve_accepted, sock, peer)

    async def _serve_accepted(self, sock: socket.socket, peer: tuple[str, int]) -> None:
        try:
            await self.serve_socket(sock, (peer[0], peer[1]))
        finally:
            sock.close()

    def drain(self) -> None:
        """Stop accepting; GOAWAY every HBONE peer (streams finish, up to their deadline)."""
        self._accept_scope.cancel()
        for conn in list(self.connections):
            conn.drain()

    # -- downstream: HBONE in --------------------------------------------------------------------

    async def serve_socket(self, sock: socket.socket, peer: tuple[str, int]) -> None:
        """One accepted TCP connection: mTLS, then HBONE until the peer goes away."""
        get = get_logger(ACCESS_LOGGER)
        try:
            cert = await self.secrets.fetch(self.config.identity)
            tls = await tls_handshake(
                sock,
                server_context(cert),
                server_side=True,
                timeout=self.config.tls_handshake_timeout,
            )
        except (ZtunnelError, OSError) as exc:  # CA down, handshake failure: this connection only
            get.warning(
                "connection failed",
                **{"src.addr": Bare(f"{peer[0]}:{peer[1]}"), "error": f"tls: {exc}"},
            )
            return
        try:
            der = tls.peer_certificate_der() or b""
            verify_client_trust_domain(der, self.config.identity.trust_domain)
            src_identity = peer_identity(der)
        except TLSIdentityError as exc:
            get.warning(
                "connection failed",
                **{"src.addr": Bare(f"{peer[0]}:{peer[1]}"), "error": f"identity: {exc}"},
            )
            await trio.aclose_forcefully(tls)
            return

        async def handler(request: ConnectRequest, stream: HboneServerStream) -> None:
            await self.handle_connect(request, stream, src_identity, peer)

        try:
            await serve_hbone(
                tls,
                handler,
                settings=self.hbone_settings,
                on_connection=self.connections.add,
                on_close=self.connections.discard,
            )
        finally:
            await trio.aclose_forcefully(tls)

    def resolve_tunnel(
        self, host: str, port: int, src_identity: Identity | None, peer: tuple[str, int]
    ) -> Tunnel | None:
        """What a CONNECT authority addresses; None when nothing known (503)."""
        store = self.state.store
        src_ip = ipaddress.ip_address(peer[0])
        src_workload = store.workload_by_ip(src_ip)
        service: Service | None = None
        workload: Workload | None = None
        dst_ip = None
        try:
            dst_ip = ipaddress.ip_address(host)
        except ValueError:
            service = store.service_by_hostname(host)
        else:
            service = store.service_by_vip(dst_ip)
            if service is None:
                workload = store.workload_by_ip(dst_ip)
        if service is None and workload is None:
            return None
        return Tunnel(
            src_ip,
            peer[1],
            src_identity,
            src_workload,
            f"{host}:{port}",
            port,
            service,
            workload,
            dst_ip,
        )

    async def handle_connect(
        self,
        request: ConnectRequest,
        stream: HboneServerStream,
        src_identity: Identity | None,
        peer: tuple[str, int],
    ) -> None:
        _, host, port = validate_connect(request)
        tunnel = self.resolve_tunnel(host, port, src_identity, peer)
        if tunnel is None:
            get_logger(ACCESS_LOGGER).warning(
                "connection failed",
                **{
                    "src.addr": Bare(f"{peer[0]}:{peer[1]}"),
                    "dst.hbone_addr": Bare(request.authority),
                    "error": "unknown destination",
                },
            )
            await stream.respond(503)
            return
        await stream.respond(200)
        await self.serve_tunnel(stream, tunnel)

    # -- one tunnel --------------------------------------------------------------------------------

    async def serve_tunnel(self, stream: trio.abc.Stream, tunnel: Tunnel) -> None:
        """Serve one CONNECT stream: choose the protocol, then HTTP or a TCP relay."""
        protocol = self.state.declared_protocol(tunnel.service, tunnel.port)
        initial = b""
        if protocol is None:
            protocol, initial = await self._sniff(stream)
        wrapped = PrefixedStream(stream, initial)
        try:
            if protocol is Protocol.HTTP1:
                await serve_h1(wrapped, self._request_handler(tunnel), self.config.h1)
            elif protocol is Protocol.HTTP2:
                await self._serve_h2(wrapped, tunnel)
            else:
                await self._serve_tcp(wrapped, tunnel)
        finally:
            with trio.CancelScope(shield=True):
                await _close(wrapped)

    async def _sniff(self, stream: trio.abc.Stream) -> tuple[Protocol, bytes]:
        data = b""
        with trio.move_on_after(self.config.sniff_timeout):
            while True:
                try:
                    chunk = await stream.receive_some(MAX_SNIFF_BYTES)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    chunk = b""
                data += chunk
                decided = sniff(data, eof=not chunk)
                if decided is not None:
                    return decided, data
        return Protocol.TCP, data

    def _request_handler(self, tunnel: Tunnel) -> Callable[[Exchange], Awaitable[None]]:
        async def handle(exchange: Exchange) -> None:
            await RequestFlow(self.ctx, tunnel, exchange).run()

        return handle

    async def _serve_h2(self, stream: trio.abc.Stream, tunnel: Tunnel) -> None:
        handle = self._request_handler(tunnel)

        async def on_stream(h2stream: H2Stream) -> None:
            await handle(H2Exchange(h2stream, self.config.h1.body_timeout))

        conn = H2Connection(
            stream,
            client=False,
            limits=self.config.h2,
            handler=on_stream,
            idle_timeout=self.config.h1.idle_timeout,
        )
        await conn.run()

    async def _serve_tcp(self, stream: trio.abc.Stream, tunnel: Tunnel) -> None:
        """Plain TCP: L4 policy (HTTP fields per istiod's forTCP rule), endpoint, relay."""
        access = get_logger(ACCESS_LOGGER)
        fields = {
            "src.addr": Bare(f"{tunnel.src_ip}:{tunnel.src_port}"),
            "src.identity": str(tunnel.src_identity) if tunnel.src_identity else None,
            "dst.hbone_addr": Bare(tunnel.authority),
            "protocol": "tcp",
        }
        attrs = RequestAttrs(
            tunnel.src_ip,
            tunnel.port,
            src_identity=tunnel.src_identity,
            dst_ip=tunnel.dst_ip,
            http=False,
        )
        decision = evaluate(self.state.policies_for(tunnel.service), attrs)
        if not decision.allowed:
            access.warning(
                "connection denied",
                **fields,
                authz=decision.reason.value,
                **{"authz.policy": decision.policy},
            )
            return
        candidates = self._tcp_candidates(tunnel)
        endpoint = self.ctx.balancer.pick(candidates)
        if endpoint is None:
            access.warning("connection failed", **fields, error="no healthy upstream")
            return
        try:
            upstream = await self.pool.dial_raw(endpoint)
        except UpstreamError as exc:
            access.warning("connection failed", **fields, error=str(exc))
            return
        start = trio.current_time()
        try:
            sent, received = await relay(stream, upstream)
        finally:
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(upstream)
        access.info(
            "connection complete",
            **fields,
            **{"dst.addr": Bare(endpoint.authority)},
            bytes_sent=received,
            bytes_recv=sent,
            duration=Bare(f"{(trio.current_time() - start) * 1000:.0f}ms"),
        )

    def _tcp_candidates(self, tunnel: Tunnel) -> list[Endpoint]:
        if tunnel.service is not None:
            return service_endpoints(self.state.store, tunnel.service, tunnel.port)
        if tunnel.workload is not None:
            ep = workload_endpoint(tunnel.workload, tunnel.port)
            return [ep] if ep is not None else []
        return []

    # -- upstream: HBONE out -----------------------------------------------------------------------

    async def _dial_hbone(self, key: PoolKey) -> TLSStream:
        cert = await self.secrets.fetch(key.src_identity)
        sock = await connect_socket(key.dst.sockaddr(), self.config.upstream_connect_timeout)
        tls = await tls_handshake(sock, client_context(cert), server_side=False)
        try:
            verify_server_identity(tls.peer_certificate_der() or b"", key.dst_identities)
        except BaseException:
            await trio.aclose_forcefully(tls)
            raise
        return tls

    async def _open_hbone(self, endpoint: Endpoint) -> trio.abc.Stream:
        key = PoolKey(
            self.config.identity,
            frozenset(endpoint.identities),
            SocketAddr(endpoint.ip, self.config.hbone_port),
            None,
        )
        return await self.hbone_pool.open_stream(key, endpoint.authority)

    async def _open_tcp(self, endpoint: Endpoint) -> trio.abc.Stream:
        with trio.fail_after(self.config.upstream_connect_timeout):
            return await trio.open_tcp_stream(str(endpoint.ip), endpoint.port)


__all__ = ["CertSource", "Waypoint", "WaypointConfig", "connect_socket"]
