"""The relay between two TCP sockets: it writes and half-closes a ready socket directly
(no task switch per chunk), with the same results as trio's send_all/send_eof: bytes in
order, EOF carried as FIN, a reset named as the failing side's error."""

from __future__ import annotations

import socket
import struct

import trio
from hbone_certs import tcp_socketpair

from ztunnel.proxy.relay import relay


def stream(sock: socket.socket) -> trio.SocketStream:
    sock.setblocking(False)
    return trio.SocketStream(trio.socket.from_stdlib_socket(sock))


async def read_to_eof(s: trio.SocketStream) -> bytes:
    out = b""
    while chunk := await s.receive_some(65536):
        out += chunk
    return out


async def test_bytes_and_half_closes_cross_both_ways() -> None:
    client, a = (stream(s) for s in tcp_socketpair())
    b, app = (stream(s) for s in tcp_socketpair())
    payload = bytes(range(256)) * 4096  # 1 MiB: more than one socket buffer
    result_box = []
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:

            async def run_relay() -> None:
                result_box.append(await relay(a, b))

            nursery.start_soon(run_relay)

            async def client_side() -> None:
                await client.send_all(payload)
                await client.send_eof()

            nursery.start_soon(client_side)
            assert await read_to_eof(app) == payload  # the FIN arrived after every byte
            await app.send_all(b"answer")
            await app.send_eof()
            assert await read_to_eof(client) == b"answer"
    [result] = result_box
    assert (result.a_to_b, result.b_to_a, result.error) == (len(payload), 6, None)
    for s in (client, a, b, app):
        await s.aclose()


async def test_a_reset_destination_fails_as_that_side() -> None:
    client, a = (stream(s) for s in tcp_socketpair())
    b_sock, app_sock = tcp_socketpair()
    app_sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    app_sock.close()  # RST: the relay's writes towards it fail
    b = stream(b_sock)
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.send_all, b"x" * 100_000)
            result = await relay(a, b)
            nursery.cancel_scope.cancel()
    assert result.failed == "b"
    assert result.error in ("connection reset by peer", "broken pipe")
    for s in (client, a, b):
        await s.aclose()
