"""TLSStream over real loopback sockets and real TLS 1.3 mTLS (FakeCA certificates)."""

from __future__ import annotations

import hashlib
import os
import socket

import pytest
import trio
import trio.testing
from hbone_certs import (
    CLIENT_ID,
    SERVER_ID,
    client_ctx,
    server_ctx,
    tcp_socketpair,
    tls_pair,
)

from ztunnel.hbone.errors import TLSHandshakeError
from ztunnel.hbone.tlsstream import TLSStream, tls_handshake
from ztunnel.identity.ca import FakeCA
from ztunnel.identity.tls import client_context, peer_identity


async def test_handshake_negotiates_tls13_h2_and_exposes_peer_identity() -> None:
    with trio.fail_after(10):
        client, server = await tls_pair()
        assert client.selected_alpn == server.selected_alpn == "h2"
        assert client.socket.version() == "TLSv1.3"
        client_der, server_der = client.peer_certificate_der(), server.peer_certificate_der()
        assert client_der is not None and server_der is not None
        assert peer_identity(client_der) == SERVER_ID
        assert peer_identity(server_der) == CLIENT_ID
        await client.aclose()
        await server.aclose()


async def _pump(stream: TLSStream, payload: bytes) -> None:
    await stream.send_all(payload)


async def _drain(stream: TLSStream, n: int) -> bytes:
    chunks, got = [], 0
    while got < n:
        chunk = await stream.receive_some()
        assert chunk, "unexpected EOF"
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


async def test_bulk_data_both_ways_at_once() -> None:
    a_to_b, b_to_a = os.urandom(6 * 1024 * 1024), os.urandom(5 * 1024 * 1024 + 7)
    results: dict[str, bytes] = {}
    with trio.fail_after(20):
        client, server = await tls_pair()

        async def drain(name: str, stream: TLSStream, n: int) -> None:
            results[name] = await _drain(stream, n)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(_pump, client, a_to_b)
            nursery.start_soon(_pump, server, b_to_a)
            nursery.start_soon(drain, "server", server, len(a_to_b))
            nursery.start_soon(drain, "client", client, len(b_to_a))
        await client.aclose()
        await server.aclose()
    assert hashlib.sha256(results["server"]).digest() == hashlib.sha256(a_to_b).digest()
    assert hashlib.sha256(results["client"]).digest() == hashlib.sha256(b_to_a).digest()


async def test_send_nowait_keeps_what_a_full_socket_refused_for_the_next_send_all() -> None:
    first, second = os.urandom(8 * 1024 * 1024), os.urandom(300 * 1024 + 3)
    with trio.fail_after(20):
        client, server = await tls_pair()
        assert client.can_send_nowait
        # Nobody reads yet: 8 MiB cannot all fit the socket buffers.
        assert client.send_nowait(first) is False
        assert not client.can_send_nowait  # the rest must go out before anything new
        with pytest.raises(trio.BusyResourceError):
            client.send_nowait(b"x")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_pump, client, second)
            got = await _drain(server, len(first) + len(second))
        assert got == first + second  # nothing lost, nothing reordered
        assert client.can_send_nowait
        assert client.send_nowait(b"small") is True
        assert await _drain(server, 5) == b"small"
        await client.aclose()
        await server.aclose()


async def test_close_gives_peer_eof_and_closed_errors_locally() -> None:
    with trio.fail_after(10):
        client, server = await tls_pair()
        await client.send_all(b"last words")
        await client.aclose()
        assert await _drain(server, 10) == b"last words"
        assert await server.receive_some() == b""
        with pytest.raises(trio.ClosedResourceError):
            await client.send_all(b"x")
        with pytest.raises(trio.ClosedResourceError):
            await client.receive_some()
        await client.aclose()  # idempotent
        await server.aclose()


async def test_peer_reset_is_a_broken_resource() -> None:
    with trio.fail_after(10):
        client, server = await tls_pair()
        # RST instead of FIN: SO_LINGER 0
        server.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00" * 2)
        server.socket.close()
        with pytest.raises(trio.BrokenResourceError):
            for _ in range(100):
                await client.send_all(b"x" * 65536)
                await trio.sleep(0.01)
        with pytest.raises(trio.BrokenResourceError):
            await client.send_all(b"x")
        await client.aclose()


async def test_cancelled_half_written_send_marks_stream_broken() -> None:
    with trio.fail_after(10):
        client, server = await tls_pair()
        with trio.move_on_after(0.3) as scope:
            await client.send_all(b"y" * (64 * 1024 * 1024))  # the peer never reads
        assert scope.cancelled_caught
        with pytest.raises(trio.BrokenResourceError):
            await client.send_all(b"more")
        await client.aclose()
        await server.aclose()


async def test_concurrent_receives_are_busy() -> None:
    with trio.fail_after(10):
        client, server = await tls_pair()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.receive_some)
            await trio.testing.wait_all_tasks_blocked()
            with pytest.raises(trio.BusyResourceError):
                await client.receive_some()
            await server.send_all(b"wake")
        await client.aclose()
        await server.aclose()


async def test_aclose_wakes_a_blocked_receiver_with_closed_error() -> None:
    with trio.fail_after(10):
        client, server = await tls_pair()

        async def receiver() -> None:
            with pytest.raises(trio.ClosedResourceError):
                await client.receive_some()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(receiver)
            await trio.testing.wait_all_tasks_blocked()
            await client.aclose()
        await server.aclose()


async def test_untrusted_peer_fails_handshake() -> None:
    stranger = FakeCA.ephemeral().workload_certificate(CLIENT_ID)
    a, b = tcp_socketpair()
    errors: dict[str, Exception] = {}

    async def side(name: str, sock: socket.socket, server: bool) -> None:
        ctx = server_ctx() if server else client_context(stranger)
        try:
            stream = await tls_handshake(sock, ctx, server_side=server)
            await stream.aclose()
        except TLSHandshakeError as exc:
            errors[name] = exc

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(side, "client", a, False)
            nursery.start_soon(side, "server", b, True)
    assert "certificate verify failed" in str(errors["client"])


async def test_silent_peer_times_out() -> None:
    a, b = tcp_socketpair()
    with trio.fail_after(10), pytest.raises(TLSHandshakeError, match="timed out"):
        await tls_handshake(a, client_ctx(), server_side=False, timeout=0.2)
    b.close()


async def test_two_way_stream_conformance() -> None:
    async def make_pair() -> tuple[TLSStream, TLSStream]:
        return await tls_pair()

    with trio.fail_after(30):
        await trio.testing.check_two_way_stream(make_pair, None)


async def test_a_drained_socket_is_waited_on_not_read_again() -> None:
    # Request/response traffic: each record finds the reader parked. Once a read ended
    # in SSLWantReadError the next receive_some waits for readiness first: one SSL read
    # returns the record, one finds the socket empty (three before: the first failed).
    rounds = 20
    with trio.fail_after(10):
        client, server = await tls_pair()
        sock = server.socket
        real, calls = sock.recv_into, [0]

        def counting(*args: object) -> int:
            calls[0] += 1
            return real(*args)  # type: ignore[arg-type]

        sock.recv_into = counting  # type: ignore[method-assign,assignment]

        async def reader() -> None:
            for i in range(rounds):
                assert await _drain(server, 1024) == bytes([i]) * 1024

        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader)
            for i in range(rounds):
                await trio.sleep(0.002)  # the reader is parked in receive_some by now
                await client.send_all(bytes([i]) * 1024)
        await client.aclose()
        await server.aclose()
    assert calls[0] <= 2 * rounds + 1
