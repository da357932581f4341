"""HBONE drivers against misbehaving peers (a plain h2 peer over real sockets/TLS):
one bad peer or stream must never take down a healthy connection, the pool or the server."""

from __future__ import annotations

import socket
from collections.abc import Callable
from dataclasses import dataclass, field

import h2.config
import h2.connection
import h2.errors
import h2.events
import pytest
import trio
import trio.testing
from hbone_certs import CLIENT_ID, SERVER_ID, client_ctx, connect_tcp, tcp_socketpair, tls_pair

from ztunnel.hbone.connection import (
    HboneClientConnection,
    HboneServerConnection,
    HboneServerStream,
    serve_hbone,
)
from ztunnel.hbone.errors import ConnectionGoneError, HboneStatusError
from ztunnel.hbone.events import ConnectRequest
from ztunnel.hbone.limits import Budget, FloodLimits
from ztunnel.hbone.pool import HbonePool, PoolKey
from ztunnel.hbone.settings import HboneSettings
from ztunnel.hbone.tlsstream import tls_handshake

AUTHORITY = "10.0.0.2:80"
NO_PING = HboneSettings(ping_interval=None)
# The PING budget would end these floods first (tests/test_hbone_limits.py); here the
# unsent-replies bound is what is under test.
UNLIMITED_PINGS = HboneSettings(ping_interval=None, flood=FloodLimits(pings=Budget(10**9, 0.0)))
MAX_UNSENT = UNLIMITED_PINGS.max_unsent_bytes


class RawPeer:
    """A plain h2 endpoint (not our engine) on a trio stream."""

    def __init__(self, stream: trio.abc.Stream, *, client: bool) -> None:
        self.stream = stream
        config = h2.config.H2Configuration(client_side=client, header_encoding="utf-8")
        self.h2 = h2.connection.H2Connection(config)
        self.h2.initiate_connection()

    async def flush(self) -> None:
        if data := self.h2.data_to_send():
            await self.stream.send_all(data)

    async def events(self) -> list[h2.events.Event]:
        data = await self.stream.receive_some(65536)
        if not data:
            raise EOFError
        events = self.h2.receive_data(data)
        await self.flush()
        return events

    async def wait_for(self, kind: type, stream_id: int) -> h2.events.Event:
        while True:
            for event in await self.events():
                if isinstance(event, kind) and getattr(event, "stream_id", None) == stream_id:
                    return event


async def raw_server(stream: trio.abc.Stream, answer: Callable[[int], str | None]) -> None:
    """Answers each CONNECT with ``answer(stream_id)`` (None: never answer); ACKs PINGs."""
    peer = RawPeer(stream, client=False)
    try:
        await peer.flush()
        while True:
            for event in await peer.events():
                if isinstance(event, h2.events.RequestReceived):
                    status = answer(event.stream_id)
                    if status is not None:
                        peer.h2.send_headers(event.stream_id, [(":status", status)])
            await peer.flush()
    except (EOFError, trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    finally:
        await trio.aclose_forcefully(stream)


def garbage_then_200(stream_id: int) -> str:
    return "abc" if stream_id == 1 else "200"


# -- 1. a malformed :status fails one stream, never the connection or the pool -----------


async def test_non_numeric_status_fails_only_that_stream() -> None:
    client_tls, server_tls = await tls_pair()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(raw_server, server_tls, garbage_then_200)
            client = HboneClientConnection(client_tls, settings=NO_PING)
            await nursery.start(client.run)
            with pytest.raises(HboneStatusError) as info:
                await client.open_stream(AUTHORITY)
            assert info.value.status == 0
            await client.open_stream(AUTHORITY)  # same connection, still healthy
            assert not client.is_closed
            nursery.cancel_scope.cancel()


@dataclass
class PoisonedStream(trio.abc.Stream):
    """A real TLS stream whose next read fails with an error nobody anticipated."""

    inner: trio.abc.Stream
    poisoned: bool = False

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        data = await self.inner.receive_some(max_bytes)
        if self.poisoned:
            raise RuntimeError("injected failure")
        return data

    async def aclose(self) -> None:
        await self.inner.aclose()


@dataclass
class PoolEnv:
    pool: HbonePool
    dialed: list[PoisonedStream] = field(default_factory=list)


async def test_pool_survives_garbage_status_and_a_failing_connection() -> None:
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            env = PoolEnv(HbonePool(lambda key: dial(key), settings=NO_PING))

            async def dial(key: PoolKey) -> PoisonedStream:
                client_tls, server_tls = await tls_pair()
                answer = garbage_then_200 if not env.dialed else (lambda sid: "200")
                nursery.start_soon(raw_server, server_tls, answer)
                env.dialed.append(PoisonedStream(client_tls))
                return env.dialed[-1]

            await nursery.start(env.pool.run)
            key = PoolKey(CLIENT_ID, frozenset({SERVER_ID}), ("127.0.0.1", 15008), "127.0.0.1")
            with pytest.raises(HboneStatusError):
                await env.pool.open_stream(key, AUTHORITY)
            env.dialed[0].poisoned = True  # the answer to the next CONNECT blows up the reader
            with pytest.raises(ConnectionGoneError):
                await env.pool.open_stream(key, AUTHORITY)
            # the pool (and this nursery) live on: the next caller dials afresh
            for _ in range(200):
                if env.pool.connection_count() == 0:
                    break
                await trio.sleep(0.005)
            await env.pool.open_stream(key, AUTHORITY)
            assert len(env.dialed) == 2
            nursery.cancel_scope.cancel()


async def test_serve_hbone_returns_when_its_connection_fails() -> None:
    client_tls, server_tls = await tls_pair()
    poisoned = PoisonedStream(server_tls, poisoned=True)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            server = await nursery.start(serve_hbone, poisoned, echo)
            client = HboneClientConnection(client_tls, settings=NO_PING)
            nursery.start_soon(client.run)  # its preface makes the server's reader fail
    assert server.closed and "injected failure" in server.close_reason


async def echo(request: ConnectRequest, stream: HboneServerStream) -> None:
    await stream.respond(200)
    while chunk := await stream.receive_some():
        await stream.send_all(chunk)
    await stream.send_eof()


# -- 2. rapid reset: reset streams stop their handlers; running handlers are capped -------


@dataclass
class SlowSetup:
    """A handler that spends ``setup`` seconds (resolve, policy, app connect) first."""

    setup: float = 5.0
    started: int = 0
    cancelled: int = 0
    entered: trio.Event = field(default_factory=trio.Event)

    async def __call__(self, request: ConnectRequest, stream: HboneServerStream) -> None:
        self.started += 1
        self.entered.set()
        try:
            await trio.sleep(self.setup)
        except trio.Cancelled:
            self.cancelled += 1
            raise
        await stream.respond(200)


async def test_headers_and_reset_in_one_read_run_no_handler() -> None:
    handler = SlowSetup()
    client_tls, server_tls = await tls_pair()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            server = await nursery.start(serve_hbone, server_tls, handler)
            peer = RawPeer(client_tls, client=True)
            for _ in range(150):  # within the reset budget (test_hbone_limits.py: past it)
                sid = peer.h2.get_next_available_stream_id()
                peer.h2.send_headers(sid, [(":method", "CONNECT"), (":authority", AUTHORITY)])
                peer.h2.reset_stream(sid, h2.errors.ErrorCodes.CANCEL)
            peer.h2.ping(b"flushed!")
            await peer.flush()
            # The ACK means the server read and dispatched every frame before it.
            while not any(isinstance(e, h2.events.PingAckReceived) for e in await peer.events()):
                pass
            # Handlers of the turn that answered the PING were spawned before the ACK
            # was written; once every task is blocked, each spawned one has run its
            # first step (SlowSetup counts there).
            await trio.testing.wait_all_tasks_blocked()
            assert handler.started == 0
            assert server.active_streams == 0 and not server.is_closed
            await client_tls.aclose()
            nursery.cancel_scope.cancel()


async def test_reset_cancels_a_handler_still_in_setup() -> None:
    handler = SlowSetup()
    client_tls, server_tls = await tls_pair()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(serve_hbone, server_tls, handler)
            client = HboneClientConnection(client_tls, settings=NO_PING)
            await nursery.start(client.run)

            async def open_then_give_up() -> None:
                with trio.move_on_after(0.1):
                    await client.open_stream(AUTHORITY)  # cancelled: the stream is reset

            await open_then_give_up()
            assert handler.entered.is_set()
            for _ in range(200):
                if handler.cancelled:
                    break
                await trio.sleep(0.005)
            assert handler.cancelled == 1  # well before its 5 s of setup
            nursery.cancel_scope.cancel()


async def test_handlers_outliving_their_streams_are_capped_at_max_concurrent_streams() -> None:
    release = trio.Event()

    async def lingering(request: ConnectRequest, stream: HboneServerStream) -> None:
        await stream.respond(200)
        await release.wait()  # e.g. an app that neither sends nor closes

    settings = HboneSettings(max_concurrent_streams=5)
    client_tls, server_tls = await tls_pair()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(
                lambda task_status: serve_hbone(
                    server_tls, lingering, settings=settings, task_status=task_status
                )
            )
            client = HboneClientConnection(client_tls, settings=NO_PING)
            await nursery.start(client.run)
            for _ in range(5):
                stream = await client.open_stream(AUTHORITY)
                await stream.aclose()  # RST(CANCEL): h2 forgets the stream, the handler lingers
            with pytest.raises(ConnectionGoneError, match="refused"):
                await client.open_stream(AUTHORITY)
            release.set()  # handlers finish: capacity returns
            for _ in range(200):
                try:
                    await client.open_stream(AUTHORITY)
                    break
                except ConnectionGoneError:
                    await trio.sleep(0.005)
            else:
                raise AssertionError("capacity never came back")
            nursery.cancel_scope.cancel()


async def test_respond_on_a_closing_connection_is_broken_resource() -> None:
    outcome: list[str] = []
    server_ref: list[HboneServerConnection] = []

    async def handler(request: ConnectRequest, stream: HboneServerStream) -> None:
        server_ref[0].close(reason="going away meanwhile")
        try:
            await stream.respond(200)
        except trio.BrokenResourceError:
            outcome.append("broken")

    client_tls, server_tls = await tls_pair()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            server_ref.append(await nursery.start(serve_hbone, server_tls, handler))
            client = HboneClientConnection(client_tls, settings=NO_PING)
            await nursery.start(client.run)
            with pytest.raises((ConnectionGoneError, trio.BrokenResourceError)):
                await client.open_stream(AUTHORITY)
            nursery.cancel_scope.cancel()
    assert outcome == ["broken"]


# -- 3. a 400 for a stream the peer already reset does not end the connection -------------


async def test_bad_request_reset_in_the_same_read_keeps_other_streams() -> None:
    client_tls, server_tls = await tls_pair()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            server = await nursery.start(serve_hbone, server_tls, echo)
            peer = RawPeer(client_tls, client=True)
            peer.h2.send_headers(1, [(":method", "CONNECT"), (":authority", AUTHORITY)])
            await peer.flush()
            await peer.wait_for(h2.events.ResponseReceived, 1)
            peer.h2.send_headers(3, [(":method", "CONNECT"), (":authority", "no port")])
            peer.h2.reset_stream(3, h2.errors.ErrorCodes.CANCEL)
            peer.h2.send_data(1, b"still here")
            await peer.flush()
            echoed = await peer.wait_for(h2.events.DataReceived, 1)
            assert echoed.data == b"still here"  # type: ignore[attr-defined]
            assert not server.is_closed
            await client_tls.aclose()
            nursery.cancel_scope.cancel()


# -- 4. a peer that floods PINGs and never reads is dropped, memory stays bounded --------


async def flood_pings_without_reading(
    server: HboneServerConnection, peer: RawPeer, peer_stream: trio.abc.Stream
) -> int:
    """Send 6.8 MB of PINGs and never read; returns the server's peak unsent output."""
    peak = 0
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server.run)
            try:
                for i in range(400_000):
                    peer.h2.ping(i.to_bytes(8, "big"))
                    if i % 1000 == 999:
                        await peer.flush()
                        peak = max(peak, server.engine.pending_output)
            except trio.BrokenResourceError:
                pass  # the server hung up on us
            await peer_stream.aclose()
    return peak


async def test_ping_flood_from_a_peer_that_never_reads_is_dropped() -> None:
    peer_sock, server_sock = tcp_socketpair()
    peer_sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    server_sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    server = HboneServerConnection(
        trio.SocketStream(trio.socket.from_stdlib_socket(server_sock)),
        echo,
        settings=UNLIMITED_PINGS,
    )
    peer_stream = trio.SocketStream(trio.socket.from_stdlib_socket(peer_sock))
    peak = await flood_pings_without_reading(server, RawPeer(peer_stream, client=True), peer_stream)
    assert server.closed and server.close_reason == "peer not reading"
    assert peak <= MAX_UNSENT + 64 * 1024


async def test_ping_flood_over_tls_from_a_peer_that_never_reads_is_dropped() -> None:
    # Over TLSStream our replies are first written directly (send_nowait); once the
    # socket is full the rest must still be counted and the peer dropped.
    peer_tls, server_tls = await tls_pair()
    peer_tls.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    server_tls.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    server = HboneServerConnection(server_tls, echo, settings=UNLIMITED_PINGS)
    peak = await flood_pings_without_reading(server, RawPeer(peer_tls, client=True), peer_tls)
    assert server.closed and server.close_reason == "peer not reading"
    assert peak <= MAX_UNSENT + 64 * 1024


# -- 5. a peer that never answers the CONNECT ---------------------------------------------


async def test_unanswered_connect_times_out_and_frees_the_stream() -> None:
    client_tls, server_tls = await tls_pair()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(raw_server, server_tls, lambda sid: None)
            client = HboneClientConnection(
                client_tls,
                settings=HboneSettings(
                    ping_interval=0.05, ping_timeout=1.0, connect_response_timeout=0.3
                ),
            )
            await nursery.start(client.run)
            with pytest.raises(trio.TooSlowError):
                await client.open_stream(AUTHORITY)
            assert client.active_streams == 0
            assert not client.is_closed  # PINGs are answered: the connection itself is fine
            nursery.cancel_scope.cancel()


# -- 6. failed dials leave no per-key state behind ----------------------------------------


async def test_failed_dials_leave_no_key_state() -> None:
    async def refused(key: PoolKey) -> trio.abc.Stream:
        sock = await connect_tcp(key.dst)  # nothing listens on port 1
        return await tls_handshake(sock, client_ctx(), server_side=False)

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            pool = HbonePool(refused, settings=NO_PING)
            await nursery.start(pool.run)
            for i in range(20):
                key = PoolKey(CLIENT_ID, frozenset({SERVER_ID}), ("127.0.0.1", 1), f"127.0.0.{i}")
                with pytest.raises(OSError):
                    await pool.open_stream(key, AUTHORITY)
            assert pool._keys == {}
            nursery.cancel_scope.cancel()
