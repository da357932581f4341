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
import socket

import structlog
import trio

from ztunnel.hbone.connection import HboneServerStream
from ztunnel.hbone.engine import ConnectRequest
from ztunnel.hbone.errors import HboneError, TLSHandshakeTimeout
from ztunnel.hbone.limits import Limit
from ztunnel.hbone.tlsstream import tls_handshake
from ztunnel.identity.errors import TLSIdentityError
from ztunnel.identity.tls import peer_identity, server_context, verify_client_trust_domain
from ztunnel.model.address import Authority, SocketAddr, parse_authority
from ztunnel.model.identity import Identity
from ztunnel.model.outcome import Failure, FailureKind
from ztunnel.model.workload import Service, Workload
from ztunnel.proxy import headers
from ztunnel.proxy.admission import Refusal
from ztunnel.proxy.authorize import serve_inbound
from ztunnel.proxy.deps import FlowDeps
from ztunnel.proxy.outcome import NETWORK_ERRORS, describe
from ztunnel.proxy.sockets import abort_socket, sockname
from ztunnel.state.resolve import ResolveError, SelfCall, resolve_inbound
from ztunnel.telemetry.connections import ConnectionInfo

log = structlog.get_logger("ztunnel.proxy")

# Errors of answering a client that went away.
_ANSWER_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError, HboneError)


async def serve_inbound_connection(deps: FlowDeps, conn: socket.socket, peer: SocketAddr) -> None:
    local_addr = sockname(conn)
    peers = deps.peers
    # Before any TLS work: a penalised source, or one with too many handshakes running.
    if (refusal := peers.begin_handshake(peer.ip)) is not None:
        abort_socket(conn)
        _refused(deps, refusal, "refusing connection before its handshake", peer=str(peer.ip))
        return
    try:
        accepted = await _handshake(deps, conn, peer, local_addr)
    finally:
        peers.end_handshake(peer.ip)
    if accepted is None:
        return
    tls, local, src_identity = accepted
    if (refusal := peers.admit_connection(src_identity)) is not None:
        _refused(deps, refusal, "refusing peer connection", identity=str(src_identity))
        await trio.aclose_forcefully(tls)
        return
    streams = InboundConnection(deps, local, src_identity, peer, local_addr)

    def on_limit(limit: str) -> None:
        if peers.limit_hit(limit, src_identity, peer.ip):
            log.warning(
                "peer flooded, refusing its new connections for a while",
                identity=str(src_identity),
                ip=str(peer.ip),
                seconds=peers.limits.penalty,
                limit=limit,
            )

    try:
        await deps.serve_hbone(tls, streams.handle_stream, on_limit=on_limit)
    finally:
        peers.release_connection(src_identity)
        await trio.aclose_forcefully(tls)


async def _handshake(
    deps: FlowDeps, conn: socket.socket, peer: SocketAddr, local_addr: SocketAddr
) -> tuple[trio.abc.Stream, Workload, Identity] | None:
    """TLS accept and the client's identity; None when refused (tracked)."""
    tracker = deps.tracker
    try:
        local = await deps.local_workload()
        cert = await deps.certificate(local.identity)
        tls = await tls_handshake(
            conn,
            server_context(cert),
            server_side=True,
            timeout=deps.settings.tls_handshake_timeout,
        )
    except NETWORK_ERRORS as exc:
        if isinstance(exc, TLSHandshakeTimeout):
            tracker.metrics.limit_hit(Limit.HANDSHAKE_TIMEOUT)
        failure = Failure(FailureKind.TLS_HANDSHAKE, f"tls handshake failed: {describe(exc)}")
        tracker.connection_failed(peer, local_addr, "inbound", failure)
        return None
    try:
        der = tls.peer_certificate_der() or b""
        verify_client_trust_domain(der, local.identity.trust_domain)
        # As ztunnel: policy sees the certificate's first SPIFFE SAN.
        src_identity = peer_identity(der)
    except (TLSIdentityError, OSError) as exc:
        failure = Failure(FailureKind.IDENTITY_REJECTED, f"client identity rejected: {exc}")
        tracker.connection_failed(peer, local_addr, "inbound", failure)
        await trio.aclose_forcefully(tls)
        return None
    return tls, local, src_identity


def _refused(deps: FlowDeps, refusal: Refusal, message: str, **fields: str) -> None:
    """Count every refusal; log the first of a key (admission.py decides which)."""
    deps.tracker.metrics.limit_hit(refusal.limit)
    if refusal.log:
        log.warning(f"peer limit reached, {message}", limit=refusal.limit, **fields)


class InboundConnection:
    """One mTLS connection from a peer agent; each CONNECT stream is handled here."""

    def __init__(
        self,
        deps: FlowDeps,
        local: Workload,
        src_identity: Identity,
        peer: SocketAddr,
        local_addr: SocketAddr,
    ) -> None:
        self.deps = deps
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
        return self.deps.store.workload_by_uid(self._local.uid) or self._local

    def guess_service(self, request: ConnectRequest) -> Service | None:
        """The service the client addressed (Forwarded host=), if this pod backs it.

        Only telemetry uses it, so a lying client can only mislabel its own metrics.
        """
        host = headers.forwarded_host(request.header("forwarded"))
        if host is None:
            return None
        service = self.deps.store.service_by_hostname(host, prefer_namespace=self.local.namespace)
        if service is None or self.local.uid not in service.endpoints:
            return None
        return service

    async def handle_stream(self, request: ConnectRequest, stream: HboneServerStream) -> None:
        peers = self.deps.peers
        if (refusal := peers.admit_stream(self.src_identity)) is not None:
            # 503 like ztunnel's other refusals; the client may retry elsewhere or later.
            _refused(self.deps, refusal, "refusing stream", identity=str(self.src_identity))
            with contextlib.suppress(*_ANSWER_ERRORS):
                await stream.respond(503, [])
            return
        try:
            await self._handle_stream(request, stream)
        finally:
            peers.release_stream(self.src_identity)

    async def _handle_stream(self, request: ConnectRequest, stream: HboneServerStream) -> None:
        deps = self.deps
        try:
            # serve_hbone answered malformed authorities with 400 already.
            authority: Authority = parse_authority(request.authority)
        except ValueError:
            with contextlib.suppress(*_ANSWER_ERRORS):
                await stream.respond(400, [])
            return
        local = self.local
        try:
            target = resolve_inbound(
                deps.store,
                local,
                authority,
                self.local_addr.ip,
                agent_ports=deps.settings.ports,
            )
        except ResolveError as exc:
            kind = FailureKind.SELF_CALL if isinstance(exc, SelfCall) else FailureKind.NO_ROUTE
            deps.tracker.connection_failed(self.peer, authority, "inbound", Failure(kind, str(exc)))
            with contextlib.suppress(*_ANSWER_ERRORS):
                await stream.respond(exc.status, [])
            return
        upstream = SocketAddr(self.local_addr.ip, target.port)
        service = target.service or self.guess_service(request)
        tracked = deps.tracker.open(
            ConnectionInfo(
                direction="inbound",
                reporter="destination",
                src_addr=self.peer,
                dst_addr=upstream,
                hbone_addr=authority,
                src_workload=deps.store.workload_by_ip(self.peer.ip),
                dst_workload=local,
                dst_service=service,
                src_identity=self.src_identity,
                dst_identity=local.identity,
                security_policy="mutual_tls",
                proxy_uid=deps.settings.proxy_uid,
            )
        )
        baggage = headers.baggage(local, deps.settings.cluster_id)

        async def respond(status: int) -> None:
            ok = status == 200 and baggage
            await stream.respond(status, [("baggage", baggage)] if ok else [])

        await serve_inbound(deps, tracked, local, stream, upstream, respond)
