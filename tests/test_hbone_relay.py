"""relay() between an HBONE stream and a real TCP socket: the reader writes DATA
straight to the socket while the copy task waits (direct sink); order, byte counts,
half-close and flow control must be exactly those of the plain copy loop."""

from __future__ import annotations

import os
from functools import partial

import trio
from hbone_certs import tcp_socketpair, tls_pair

from ztunnel.hbone.connection import HboneClientConnection, HboneServerStream, serve_hbone
from ztunnel.hbone.events import ConnectRequest
from ztunnel.hbone.settings import HboneSettings
from ztunnel.proxy.relay import RelayResult, relay

KIB = 1024


class RelayToSocket:
    """Handler: 200, then relay the stream to one end of a TCP pair; the test holds
    the other end (``app``)."""

    def __init__(self) -> None:
        near, far = tcp_socketpair()
        for sock in (near, far):  # small buffers so "app not reading" shows quickly
            sock.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_RCVBUF, 16 * KIB)
            sock.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_SNDBUF, 16 * KIB)
        self.near = trio.SocketStream(trio.socket.from_stdlib_socket(near))
        self.app = trio.SocketStream(trio.socket.from_stdlib_socket(far))
        self.result: RelayResult | None = None
        self.counted = 0

    def count(self, n: int) -> None:
        self.counted += n

    async def close(self) -> None:
        await self.near.aclose()
        await self.app.aclose()

    async def __call__(self, request: ConnectRequest, stream: HboneServerStream) -> None:
        await stream.respond(200)
        self.result = await relay(stream, self.near, on_a_to_b=self.count)


async def read_exactly(stream: trio.SocketStream, n: int) -> bytes:
    got = bytearray()
    while len(got) < n:
        chunk = await stream.receive_some(n - len(got))
        assert chunk, "unexpected EOF"
        got += chunk
    return bytes(got)


async def test_request_response_bytes_arrive_in_order_and_are_counted() -> None:
    handler = RelayToSocket()
    messages = [os.urandom(size) for size in (1, 1024, 1500, 16 * KIB, 3, 200 * KIB)]
    with trio.fail_after(10):
        client_tls, server_tls = await tls_pair()
        async with trio.open_nursery() as nursery:
            await nursery.start(serve_hbone, server_tls, handler)
            client = HboneClientConnection(client_tls)
            await nursery.start(client.run)
            stream = await client.open_stream("10.0.0.2:80")
            for message in messages:  # one at a time, as a request/response client does
                await stream.send_all(message)
                assert await read_exactly(handler.app, len(message)) == message
                await handler.app.send_all(b"ok")
                assert await stream.receive_some() == b"ok"
            await stream.send_eof()
            assert await handler.app.receive_some() == b""  # END_STREAM -> FIN, after the data
            await handler.app.send_eof()
            assert await stream.receive_some() == b""
            nursery.cancel_scope.cancel()
        await handler.close()
    total = sum(len(m) for m in messages)
    assert handler.result is not None and handler.result.error is None
    assert handler.result.a_to_b == handler.counted == total
    assert handler.result.b_to_a == 2 * len(messages)


async def test_app_not_reading_stops_the_sender_at_the_window() -> None:
    handler = RelayToSocket()
    window = 64 * KIB
    payload = os.urandom(4 * 1024 * KIB)
    settings = HboneSettings(stream_window=window, connection_window=window)
    with trio.fail_after(20):
        client_tls, server_tls = await tls_pair()
        async with trio.open_nursery() as nursery:
            await nursery.start(partial(serve_hbone, server_tls, handler, settings=settings))
            client = HboneClientConnection(client_tls)
            await nursery.start(client.run)
            stream = await client.open_stream("10.0.0.2:80")

            async def sender() -> None:
                # Small writes, so the reader writes them to the socket itself until
                # it is full (then partially, then not at all).
                for start in range(0, len(payload), 1000):
                    await stream.send_all(payload[start : start + 1000])
                await stream.send_eof()

            nursery.start_soon(sender)
            await trio.sleep(0.5)  # the app reads nothing meanwhile
            # Window released only for bytes written to the socket: the sender is
            # stuck after socket buffers + one window, far from the 4 MiB payload.
            assert client.engine.send_window(stream.stream_id) == 0
            assert handler.counted < len(payload) // 4
            got = await read_exactly(handler.app, len(payload))
            assert got == payload
            assert await handler.app.receive_some() == b""
            nursery.cancel_scope.cancel()
        await handler.close()
    assert handler.counted == len(payload)


async def test_after_a_short_read_the_copy_loop_waits_instead_of_reading_again(
    monkeypatch: object,
) -> None:
    # Request/response traffic: each message is shorter than the read size, so the
    # socket is empty after it; reading again would only fail with EAGAIN.
    import ztunnel.proxy.relay as relay_mod
    from ztunnel.proxy.relay import copy_one_way

    near, far = tcp_socketpair()
    src = trio.SocketStream(trio.socket.from_stdlib_socket(near))
    app = trio.SocketStream(trio.socket.from_stdlib_socket(far))
    sink, out = trio.testing.memory_stream_pair()
    reads = [0]
    real_read = os.read

    def counting_read(fd: int, n: int) -> bytes:
        reads[0] += 1
        return real_read(fd, n)

    monkeypatch.setattr(relay_mod.os, "read", counting_read)  # type: ignore[attr-defined]
    messages = 10
    got = bytearray()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(copy_one_way, src, sink, lambda n: None)
            for i in range(messages):
                await trio.sleep(0.002)  # the copy loop waits by now
                await app.send_all(bytes([i]) * 100)
            await app.send_eof()
            while len(got) < 100 * messages:
                got += await out.receive_some()
    assert bytes(got) == b"".join(bytes([i]) * 100 for i in range(messages))
    # one read per message and one for EOF (twice that before: each message was
    # followed by a read that found nothing)
    assert reads[0] <= messages + 2
    await src.aclose()
    await app.aclose()
