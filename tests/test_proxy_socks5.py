"""Transcript tests of the SOCKS5 flow: negotiation, the reply chosen by the failure's kind,
and the self-call regression (``::ffff:127.0.0.1`` reached the agent's own ports)."""

from __future__ import annotations

import errno
import ipaddress
import socket
import struct

import pytest
import trio
import trio.testing
from proxy_fakes import Bench, bounded, fail, hang, read_until_eof, sa

from ztunnel.hbone.errors import HboneStatusError
from ztunnel.model.outcome import Failure, FailureKind
from ztunnel.proxy.sockets import socket_stream
from ztunnel.proxy.socks5 import REPLIES, proxy_socks5, reply_for
from ztunnel.proxy.socks5_proto import Reply

CLIENT_ADDR = sa("10.0.0.1:40000")
GREETING = b"\x05\x01\x00"


def request(host: str, port: int, *, as_domain: bool = False) -> bytes:
    if as_domain:
        addr = b"\x03" + bytes([len(host)]) + host.encode()
    else:
        ip = ipaddress.ip_address(host)
        addr = (b"\x01" if ip.version == 4 else b"\x04") + ip.packed
    return b"\x05\x01\x00" + addr + struct.pack("!H", port)


async def exchange(
    bench: Bench, payload: bytes, nursery: trio.Nursery
) -> tuple[trio.abc.HalfCloseableStream, int]:
    """Send ``payload`` (greeting + request + early data); returns the stream and reply code."""
    client, server = trio.testing.memory_stream_pair()
    nursery.start_soon(proxy_socks5, bench.deps, server, CLIENT_ADDR)
    await client.send_all(payload)
    head = b""
    while len(head) < 2 + 10:
        chunk = await client.receive_some(12 - len(head))
        assert chunk, f"closed after {head!r}"
        head += chunk
    assert head[:2] == b"\x05\x00"  # no-auth accepted
    return client, head[3]


async def reply_to(bench: Bench, payload: bytes) -> int:
    async with bounded() as nursery:
        with trio.fail_after(60):
            client, code = await exchange(bench, GREETING + payload, nursery)
        if code == Reply.SUCCEEDED:
            nursery.cancel_scope.cancel()
        await client.aclose()
    return code


async def test_connect_with_early_data_is_carried(autojump_clock: object) -> None:
    bench = Bench()
    async with bounded() as nursery:
        payload = GREETING + request("echo.ns.svc.cluster.local", 80, as_domain=True) + b"early"
        client, code = await exchange(bench, payload, nursery)
        assert code == Reply.SUCCEEDED
        # The name was looked up in the mesh state (service -> VIP -> endpoint), not in DNS.
        [opened] = bench.pool.opened
        assert opened.authority == "10.0.0.2:8080"
        [remote] = bench.pool.peers
        assert await remote.receive_some(100) == b"early"  # sent right after the reply
        await remote.send_all(b"reply")
        assert await client.receive_some(100) == b"reply"
        await client.send_eof()
        await remote.send_eof()
        assert await read_until_eof(client) == b""
    complete = bench.log.one("connection complete")
    assert (complete.fields["bytes_sent"], complete.fields["bytes_recv"]) == (5, 5)
    assert complete.fields["dst.service"] == "echo.ns.svc.cluster.local"


@pytest.mark.parametrize("port", [15001, 15006, 15008, 15000])
@pytest.mark.parametrize("as_domain", [False, True])
async def test_ipv4_mapped_loopback_to_an_agent_port_is_not_allowed(
    autojump_clock: object, port: int, as_domain: bool
) -> None:
    bench = Bench()
    code = await reply_to(bench, request("::ffff:127.0.0.1", port, as_domain=as_domain))
    assert code == Reply.NOT_ALLOWED
    assert bench.net.dials == [] and bench.pool.opened == []
    record = bench.log.one("connection failed")
    assert record.fields["error"] == f"self call to 127.0.0.1:{port} refused"


async def test_unknown_hostname_is_host_unreachable(autojump_clock: object) -> None:
    bench = Bench()
    code = await reply_to(bench, request("nowhere.example", 443, as_domain=True))
    assert code == Reply.HOST_UNREACHABLE
    record = bench.log.one("connection failed")
    assert record.fields["dst.addr"] == "nowhere.example:443"
    assert record.fields["error"] == "unknown SOCKS5 hostname"
    assert bench.net.dials == []


@pytest.mark.parametrize(
    ("dst", "script", "expected"),
    [
        pytest.param("10.0.0.2", fail(HboneStatusError(401)), Reply.NOT_ALLOWED, id="http-401"),
        pytest.param("10.0.0.2", fail(HboneStatusError(503)), Reply.GENERAL_FAILURE, id="http-503"),
        pytest.param(
            "10.9.9.9",
            fail(ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused")),
            Reply.CONNECTION_REFUSED,
            id="refused",
        ),
        pytest.param(
            "10.9.9.9",
            fail(OSError(errno.EHOSTUNREACH, "No route to host")),
            Reply.HOST_UNREACHABLE,
            id="unreachable",
        ),
        pytest.param("10.9.9.9", hang(), Reply.HOST_UNREACHABLE, id="timeout"),
        pytest.param("10.96.0.9", None, Reply.HOST_UNREACHABLE, id="no-healthy-upstream"),
    ],
)
async def test_failures_get_the_reply_of_their_kind(
    autojump_clock: object, dst: str, script: object, expected: Reply
) -> None:
    bench = Bench()
    if dst == "10.0.0.2":
        bench.pool.behaviour = script  # type: ignore[assignment]
    elif script is not None:
        bench.net.script[sa(f"{dst}:80")] = script  # type: ignore[assignment]
    assert await reply_to(bench, request(dst, 80)) == expected


async def test_a_silent_client_is_dropped_after_the_handshake_timeout(
    autojump_clock: object,
) -> None:
    bench = Bench()
    client, server = trio.testing.memory_stream_pair()
    started = trio.current_time()
    await proxy_socks5(bench.deps, server, CLIENT_ADDR)
    assert trio.current_time() - started == pytest.approx(10.0)
    assert bench.log.records == [] and bench.net.dials == []
    await client.aclose()


def test_every_pre_relay_failure_has_a_deliberate_reply() -> None:
    assert reply_for(None) is Reply.SUCCEEDED
    assert REPLIES == {
        FailureKind.SELF_CALL: Reply.NOT_ALLOWED,
        FailureKind.DENIED: Reply.NOT_ALLOWED,
        FailureKind.UPSTREAM_DENIED: Reply.NOT_ALLOWED,
        FailureKind.UNKNOWN_HOST: Reply.HOST_UNREACHABLE,
        FailureKind.NO_ROUTE: Reply.HOST_UNREACHABLE,
        FailureKind.UNREACHABLE: Reply.HOST_UNREACHABLE,
        FailureKind.CONNECT_TIMEOUT: Reply.HOST_UNREACHABLE,
        FailureKind.CONNECT_REFUSED: Reply.CONNECTION_REFUSED,
    }
    others = set(FailureKind) - set(REPLIES)
    assert {reply_for(Failure(kind, "")) for kind in others} == {Reply.GENERAL_FAILURE}


async def test_handshake_over_a_real_socket_in_pieces_and_at_once() -> None:
    """The handshake reads and writes a TCP-like socket directly when it is ready: the
    same answers whether the client sends byte by byte or everything in one write."""
    bench = Bench()
    payload = GREETING + request("echo.ns.svc.cluster.local", 80, as_domain=True) + b"early"
    for pieces in ([payload], [bytes([b]) for b in payload]):
        a, b = socket.socketpair()
        a.setblocking(False)
        b.setblocking(False)
        client, server = socket_stream(b), socket_stream(a)
        async with bounded() as nursery:
            nursery.start_soon(proxy_socks5, bench.deps, server, CLIENT_ADDR)
            for piece in pieces:
                await client.send_all(piece)
                await trio.lowlevel.checkpoint()
            head = b""
            while len(head) < 12:
                head += await client.receive_some(12 - len(head))
            assert head[:2] == b"\x05\x00" and head[3] == Reply.SUCCEEDED
            remote = bench.pool.peers[-1]
            assert await remote.receive_some(100) == b"early"
            nursery.cancel_scope.cancel()
        await client.aclose()
        await server.aclose()


async def test_a_client_gone_before_the_answer_ends_quietly() -> None:
    bench = Bench()
    a, b = socket.socketpair()
    a.setblocking(False)
    b.sendall(GREETING)
    b.close()  # gone: the method choice write fails (EPIPE), then the read sees EOF
    server = socket_stream(a)
    with trio.fail_after(5):
        await proxy_socks5(bench.deps, server, CLIENT_ADDR)
    await server.aclose()
    assert bench.tracker.open_connections() == []
