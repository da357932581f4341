"""One proxy instance per proxied workload: its listeners, its HBONE pool, its drain.

In dedicated mode the agent runs one of these in its own netns; in in-pod mode
the enrollment controller runs one per enrolled pod, with a socket factory that
creates every socket inside that pod's netns. Everything else is identical.

Lifecycle: ``run`` binds every listener first (a bind failure raises before
``task_status.started``, so the caller can mark the pod pending), then accepts
until cancelled or drained. ``drain`` closes the listeners at once (what the
kernel already accepted is served first; afterwards a new connection is refused,
or taken by a new agent's SO_REUSEPORT listener), asks HBONE peers to go away
(GOAWAY), waits up to a deadline for open connections, then cuts what is left:
each is logged as drained and aborted (TCP RST, RST_STREAM), never closed as if
it had finished.

Loops: a captured connection whose destination is one of this proxy's listeners
(on any local address of its netns) is refused before anything is dialled
(outbound's self-call check), and a connection this proxy dialled that comes
back to one of its listeners (a redirect or NAT loop) is refused when accepted.
Both are counted (``ztunnel_connections_refused_total``).
"""

from __future__ import annotations

import contextlib
import errno
import socket
import weakref
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from functools import partial

import structlog
import trio

from ztunnel.config import Address, WorkloadInfo
from ztunnel.errors import ZtunnelError
from ztunnel.hbone.connection import Handler as StreamHandler
from ztunnel.hbone.connection import OnLimit, serve_hbone
from ztunnel.hbone.pool import HbonePool, PoolKey
from ztunnel.hbone.tlsstream import TLSStream, tls_handshake
from ztunnel.identity.certificate import WorkloadCertificate
from ztunnel.identity.tls import client_context, verify_server_identity
from ztunnel.model.address import IPAddress, SocketAddr
from ztunnel.model.identity import Identity
from ztunnel.model.outcome import DRAINED, Failure, FailureKind
from ztunnel.model.workload import Workload
from ztunnel.proxy.admission import PodConnections
from ztunnel.proxy.context import ProxyContext
from ztunnel.proxy.deps import FlowDeps, FlowSettings, wait_for_workload
from ztunnel.proxy.inbound import serve_inbound_connection
from ztunnel.proxy.inbound_plain import serve_plaintext_connection
from ztunnel.proxy.outbound import serve_outbound_connection
from ztunnel.proxy.sockets import (
    SocketFactory,
    abort_socket,
    accept,
    accept_nowait,
    connect_socket,
    is_local_address,
    make_listener,
    original_dst,
    socket_stream,
    sockname,
)
from ztunnel.proxy.socks5 import serve_socks5_connection
from ztunnel.telemetry.connections import Direction

log = structlog.get_logger("ztunnel.proxy")

# A listener's per-connection entry point, before and after binding it to the FlowDeps.
Flow = Callable[[FlowDeps, socket.socket, SocketAddr], Awaitable[None]]
Handler = Callable[[socket.socket, SocketAddr], Awaitable[None]]
_OUTBOUND_LISTENERS = frozenset({"outbound", "socks5"})


# The listeners whose transparency decides whether the app is dialled from the client's IP.
ORIG_SRC_LISTENERS = frozenset({"inbound", "inbound_plaintext"})


@dataclass(frozen=True, slots=True)
class ProxyAddresses:
    outbound: Address
    inbound: Address
    inbound_plaintext: Address
    socks5: Address | None = None


class WorkloadProxy:
    def __init__(
        self,
        ctx: ProxyContext,
        info: WorkloadInfo,
        factory: SocketFactory,
        addresses: ProxyAddresses,
        *,
        uid: str = "",
        orig_src: bool | None = None,
        agent_services: Iterable[int] = (),
    ) -> None:
        """``agent_services``: ports of the agent's own servers (admin, metrics, readiness)
        that listen in this proxy's netns (dedicated mode); no flow may connect to them."""
        self.ctx = ctx
        self.info = info
        self.uid = uid or f"{info.namespace}/{info.name}"
        self.factory = factory
        self.addresses = addresses
        self._orig_src_wanted = orig_src
        self.transparent = False
        self.bound: dict[str, Address] = {}
        self.pool = HbonePool(self._dial, settings=ctx.hbone, on_limit=self._limit_hit)
        self.server_connections: set[object] = set()
        self.pod_connections = PodConnections(ctx.peer_limits)
        self._accept_scope = trio.CancelScope()
        self._scope: trio.CancelScope | None = None
        self._active = 0
        self._idle = trio.Event()
        self._idle.set()
        self.draining = False
        self.agent_services = frozenset(agent_services)
        self._listeners: list[tuple[str, socket.socket, Handler]] = []
        self._handlers: trio.Nursery | None = None
        # Local ends of the TCP connections this proxy dialled (passthrough, plain TCP, the
        # app): one of them arriving at our own listener is a loop. Weak: closed sockets go.
        self._own_dials: weakref.WeakValueDictionary[SocketAddr, socket.socket] = (
            weakref.WeakValueDictionary()
        )
        # Set once the workload's certificate is issued: readiness waits for it.
        self.certificate_ready = trio.Event()
        self.certificate_error = ""

    # -- what the flows get ---------------------------------------------------

    async def local_workload(self) -> Workload:
        """The proxied workload, waiting briefly for the config to name it."""
        return await wait_for_workload(self.ctx.store, self.info)

    def flow_deps(self) -> FlowDeps:
        """The flows' view of this proxy; built once the listeners are bound."""
        cfg = self.ctx.config
        bound_ports = (port for _, port in self.bound.values())
        settings = FlowSettings(
            proxy_uid=self.uid,
            cluster_id=cfg.cluster_id,
            ports=cfg.agent_ports().with_proxy(bound_ports).with_proxy(self.agent_services),
            transparent=self.transparent,
            tls_handshake_timeout=self.ctx.hbone.tls_handshake_timeout,
        )
        return FlowDeps(
            store=self.ctx.store,
            tracker=self.ctx.tracker,
            settings=settings,
            local_workload=self.local_workload,
            dial=self._dial_tcp,
            open_hbone=self.pool.open_stream,
            certificate=self.ctx.secrets.fetch,
            serve_hbone=self._serve_hbone,
            rng=self.ctx.rng,
            is_local=partial(is_local_address, self.factory),
            peers=self.ctx.peers,
        )

    async def _dial_tcp(
        self, dst: SocketAddr, *, src_ip: IPAddress | None = None, transparent: bool = False
    ) -> trio.abc.HalfCloseableStream:
        # The flow applies the connect timeout.
        sock = await connect_socket(
            self.factory, dst, src_ip=src_ip, transparent=transparent, connect_timeout=None
        )
        with contextlib.suppress(OSError):  # already reset: the flow's first I/O says so
            self._own_dials[sockname(sock)] = sock
        return socket_stream(sock)

    async def _serve_hbone(
        self, tls: trio.abc.Stream, handler: StreamHandler, *, on_limit: OnLimit | None = None
    ) -> None:
        def limit_hit(limit: str) -> None:
            self._limit_hit(limit)
            if on_limit is not None:
                on_limit(limit)

        await serve_hbone(
            tls,
            handler,
            settings=self.ctx.hbone,
            on_connection=self.server_connections.add,
            on_close=self.server_connections.discard,
            on_limit=limit_hit,
        )

    def _limit_hit(self, limit: str) -> None:
        self.ctx.tracker.metrics.limit_hit(limit)

    # -- HBONE dialing (the pool's connector) ---------------------------------

    async def _dial(self, key: PoolKey) -> TLSStream:
        cert = await self.ctx.secrets.fetch(key.src_identity)
        sock = await connect_socket(self.factory, key.dst, src_ip=key.src_ip)
        tls = await tls_handshake(
            sock,
            client_context(cert),
            server_side=False,
            timeout=self.ctx.hbone.tls_handshake_timeout,
        )
        try:
            verify_server_identity(tls.peer_certificate_der() or b"", key.dst_identities)
        except BaseException:
            await trio.aclose_forcefully(tls)
            raise
        return tls

    # -- lifecycle --------------------------------------------------------------

    def _bind(self) -> list[tuple[str, socket.socket, Flow]]:
        wants = self._orig_src_wanted is not False
        plan: list[tuple[str, Address, Flow, bool]] = [
            # Always transparent (best effort, as ztunnel): eBPF redirection hands it
            # connections *to* remote addresses, whose SYN-ACK needs IP_TRANSPARENT.
            ("outbound", self.addresses.outbound, serve_outbound_connection, True),
            ("inbound", self.addresses.inbound, serve_inbound_connection, wants),
            (
                "inbound_plaintext",
                self.addresses.inbound_plaintext,
                serve_plaintext_connection,
                wants,
            ),
        ]
        if self.addresses.socks5 is not None:
            plan.append(("socks5", self.addresses.socks5, serve_socks5_connection, False))
        bound: list[tuple[str, socket.socket, Flow]] = []
        try:
            for name, addr, flow, transparent in plan:
                sock, is_transparent = make_listener(
                    self.factory,
                    addr,
                    transparent=transparent,
                    backlog=self.ctx.config.listen_backlog,
                )
                bound.append((name, sock, flow))
                self.bound[name] = sock.getsockname()[:2]
                if transparent and name in ORIG_SRC_LISTENERS:
                    self.transparent = is_transparent if self._orig_src_wanted is None else True
        except BaseException:
            for _, sock, _ in bound:
                sock.close()
            raise
        return bound

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = self._bind()
        deps = self.flow_deps()  # once: the transparency and the bound ports are known now
        bound: list[tuple[str, socket.socket, Handler]] = [
            (name, sock, partial(flow, deps)) for name, sock, flow in listeners
        ]
        self._listeners = bound
        # A rotated client certificate must not keep being presented on pooled connections.
        unsubscribe = self.ctx.secrets.subscribe(self._certificate_rotated)
        try:
            with trio.CancelScope() as self._scope:
                async with trio.open_nursery() as nursery:
                    self._handlers = nursery
                    await nursery.start(self.pool.run)
                    nursery.start_soon(self._warm_certificate)
                    await nursery.start(self._accept_all, bound, nursery)
                    task_status.started()
        finally:
            unsubscribe()
            for _, sock, _ in listeners:
                sock.close()

    async def _warm_certificate(self) -> None:
        """Fetch the workload's certificate up front (ztunnel's warm-up), retrying until it
        is issued, so the pod's first connection does not wait for the CA."""
        while True:
            try:
                workload = await self.local_workload()
                await self.ctx.secrets.fetch(workload.identity)
            except ZtunnelError as exc:  # unknown workload yet, CA down: retry, stay not-ready
                self.certificate_error = str(exc) or type(exc).__name__
                await trio.sleep(1.0)
                continue
            self.certificate_error = ""
            self.certificate_ready.set()
            return

    def _certificate_rotated(self, identity: Identity, cert: WorkloadCertificate) -> None:
        self.pool.retire(identity)

    async def _accept_all(
        self,
        bound: Iterable[tuple[str, socket.socket, Handler]],
        handlers: trio.Nursery,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        with self._accept_scope:
            async with trio.open_nursery() as nursery:
                for name, sock, handler in bound:
                    nursery.start_soon(self._accept_loop, name, sock, handler, handlers)
                task_status.started()

    async def _accept_loop(
        self, name: str, listener: socket.socket, handler: Handler, handlers: trio.Nursery
    ) -> None:
        while True:
            try:
                conn, peer = await accept(listener)
            except trio.ClosedResourceError:  # drain closed the listener
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    # Out of resources: back off instead of spinning; never crash the agent.
                    log.error("accept failed", listener=name, error=str(exc))
                    await trio.sleep(0.1)
                    continue
                if self.draining:
                    return
                raise
            self._dispatch(name, handler, conn, peer, handlers)

    def _dispatch(
        self,
        name: str,
        handler: Handler,
        conn: socket.socket,
        peer: SocketAddr,
        handlers: trio.Nursery,
    ) -> None:
        if self._is_own_dial(conn, peer):
            self._refuse_loop(name, conn, peer)
            return
        direction: Direction = "outbound" if name in _OUTBOUND_LISTENERS else "inbound"
        if (refusal := self.pod_connections.acquire(direction)) is not None:
            # Over the pod's share of the agent: refuse (RST) before any work is done.
            abort_socket(conn)
            self._limit_hit(refusal.limit)
            if refusal.log:
                log.warning(
                    "pod connection limit reached, refusing connections",
                    pod=self.uid,
                    direction=direction,
                    limit=refusal.limit,
                    maximum=self.pod_connections.maximum(direction),
                )
            return
        # A constant task name: trio would format one string per connection.
        handlers.start_soon(self._run_handler, name, handler, conn, peer, direction, name=name)

    def _is_own_dial(self, conn: socket.socket, peer: SocketAddr) -> bool:
        """Whether ``conn`` is the far end of a connection we dialled: same source, and the
        destination we dialled is where it was headed (its original destination, if a
        redirect brought it here). One source port may serve dials to several places."""
        own = self._own_dials.get(peer)
        if own is None or own.fileno() == -1:
            return False
        try:
            return sockname(own, peer=True) == original_dst(conn)
        except OSError:  # one of them is already gone: no loop to refuse
            return False

    def _refuse_loop(self, name: str, conn: socket.socket, peer: SocketAddr) -> None:
        """A connection we dialled came back to our own listener: refuse it (RST) at
        this first hop, before it can dial again."""
        try:
            local = sockname(conn)
        except OSError:
            local = peer
        abort_socket(conn)
        failure = Failure(FailureKind.LOOP, f"loop refused: {peer} is this agent's own connection")
        direction: Direction = "outbound" if name in _OUTBOUND_LISTENERS else "inbound"
        self.ctx.tracker.connection_failed(peer, local, direction, failure)

    async def _run_handler(
        self,
        name: str,
        handler: Handler,
        conn: socket.socket,
        peer: SocketAddr,
        direction: Direction,
    ) -> None:
        self._active += 1
        self._idle = trio.Event() if self._active == 1 else self._idle
        try:
            # run_handler's body, inlined: one coroutine frame less to resume per task
            # step of every connection.
            await handler(conn, peer)
        except Exception:
            handler_failed(name, peer)
        finally:
            conn.close()
            self.pod_connections.release(direction)
            self._active -= 1
            if self._active == 0:
                self._idle.set()

    @property
    def active_connections(self) -> int:
        return self._active

    async def drain(self, deadline: float) -> None:
        """Close the listeners, GOAWAY HBONE peers, wait ``deadline`` s for connections,
        then cut (abort) what is left."""
        self.draining = True
        self.close_listeners()
        for conn in list(self.server_connections):
            drain = getattr(conn, "drain", None)
            if drain is not None:
                drain()
        with trio.move_on_after(deadline):
            await self._idle.wait()
        self._cut_open_connections()
        self.stop()

    def close_listeners(self) -> None:
        """Stop listening now. Connections the kernel already completed are served (they
        were accepted before the drain); afterwards the port refuses new connections, or
        the kernel hands them to another agent's listener on the same port (SO_REUSEPORT,
        an upgrade). Synchronous: nothing can slip in between the sweep and the close."""
        self._accept_scope.cancel()
        listeners, self._listeners = self._listeners, []
        for name, sock, handler in listeners:
            while self._handlers is not None and (accepted := accept_nowait(sock)) is not None:
                self._dispatch(name, handler, *accepted, self._handlers)
            trio.lowlevel.notify_closing(sock)
            sock.close()

    def _cut_open_connections(self) -> None:
        """At the deadline: every connection still open is logged as drained now; the
        cancellation that follows aborts its sockets and streams."""
        cut = self.ctx.tracker.connections_for(self.uid)
        if cut:
            log.info("drain deadline reached, cutting connections", pod=self.uid, open=len(cut))
        for tracked in cut:
            tracked.close(DRAINED)

    def stop(self) -> None:
        self._accept_scope.cancel()
        if self._scope is not None:
            self._scope.cancel()


async def run_handler(name: str, handler: Handler, conn: socket.socket, peer: SocketAddr) -> None:
    """Run one connection's flow. The flows handle network trouble themselves; anything
    that escapes is a bug, logged with its traceback: it must never take the proxy down."""
    try:
        await handler(conn, peer)
    except Exception:
        handler_failed(name, peer)


def handler_failed(name: str, peer: SocketAddr) -> None:
    """Log the bug that escaped a flow, with its traceback (call from an except block)."""
    log.exception("connection handler failed", listener=name, peer=str(peer))
