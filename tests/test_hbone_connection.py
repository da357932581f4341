"""End-to-end HBONE driver tests: client connection <-> serve_hbone over real mTLS on loopback."""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import pytest
import trio
import trio.testing
from hbone_certs import tls_pair

from ztunnel.hbone.connection import (
    HboneClientConnection,
    HboneServerConnection,
    HboneServerStream,
    serve_hbone,
)
from ztunnel.hbone.engine import HboneEngine
from ztunnel.hbone.errors import ConnectionGoneError, HboneStatusError
from ztunnel.hbone.events import ConnectRequest
from ztunnel.hbone.settings import HboneSettings
from ztunnel.hbone.stream import HboneStream
from ztunnel.telemetry import logging as zlog

MIB = 1024 * 1024
FAST_PING = HboneSettings(ping_interval=0.05, ping_timeout=0.2)


@dataclass
class Echo:
    """An in-test handler: 200 + echo until EOF, then half-close; records requests."""

    requests: list[ConnectRequest] = field(default_factory=list)
    status: int = 200

    async def __call__(self, request: ConnectRequest, stream: HboneServerStream) -> None:
        self.requests.append(request)
        await stream.respond(self.status, [("baggage", "k8s.deployment.name=echo")])
        if self.status != 200:
            return
        while chunk := await stream.receive_some():
            await stream.send_all(chunk)
        await stream.send_eof()


@dataclass
class Env:
    client: HboneClientConnection
    server: HboneServerConnection
    nursery: trio.Nursery


@asynccontextmanager
async def hbone_env(handler: object, settings: HboneSettings | None = None) -> AsyncIterator[Env]:
    """A client connection with ``settings`` and a server with the defaults."""
    client_tls, server_tls = await tls_pair()
    async with trio.open_nursery() as nursery:
        server = await nursery.start(serve_hbone, server_tls, handler)
        client = HboneClientConnection(client_tls, settings=settings)
        await nursery.start(client.run)
        yield Env(client, server, nursery)
        nursery.cancel_scope.cancel()


async def wait_for(condition: Callable[[], bool]) -> None:
    """Poll ``condition`` (the caller's fail_after bounds the wait)."""
    for _ in range(10_000):
        if condition():
            return
        await trio.sleep(0.005)
    raise AssertionError("condition never became true")


async def echo_roundtrip(stream: HboneStream, payload: bytes) -> bytes:
    received = bytearray()

    async def sender() -> None:
        await stream.send_all(payload)
        await stream.send_eof()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(sender)
        while chunk := await stream.receive_some():
            received += chunk
    return bytes(received)


async def test_echo_checksummed_payloads_with_half_close() -> None:
    echo = Echo()
    with trio.fail_after(30):
        async with hbone_env(echo) as env:
            for size in (1, 1000, 64 * 1024 + 3, MIB, 16 * MIB):
                payload = os.urandom(size)
                stream = await env.client.open_stream(
                    "10.0.0.2:8080", [("traceparent", "00-1-2-00")]
                )
                assert stream.response_headers == (("baggage", "k8s.deployment.name=echo"),)
                echoed = await echo_roundtrip(stream, payload)
                assert hashlib.sha256(echoed).digest() == hashlib.sha256(payload).digest()
                await stream.aclose()
            assert [r.authority for r in echo.requests] == ["10.0.0.2:8080"] * 5
            assert echo.requests[0].header("traceparent") == "00-1-2-00"


async def test_many_concurrent_streams_share_one_connection() -> None:
    with trio.fail_after(30):
        async with hbone_env(Echo()) as env:
            results: list[bool] = []

            async def one(i: int) -> None:
                stream = await env.client.open_stream(f"10.0.0.{i}:80")
                payload = os.urandom(50_000 + i)
                results.append(await echo_roundtrip(stream, payload) == payload)
                await stream.aclose()

            async with trio.open_nursery() as nursery:
                for i in range(1, 41):
                    nursery.start_soon(one, i)
            assert results == [True] * 40
            assert env.client.active_streams == 0


async def test_server_half_closes_first_client_still_sends() -> None:
    got = bytearray()

    async def handler(request: ConnectRequest, stream: HboneServerStream) -> None:
        await stream.respond(200)
        await stream.send_all(b"banner")
        await stream.send_eof()
        while chunk := await stream.receive_some():
            got.extend(chunk)

    with trio.fail_after(10):
        async with hbone_env(handler) as env:
            stream = await env.client.open_stream("10.0.0.2:25")
            assert await stream.receive_some() == b"banner"
            assert await stream.receive_some() == b""
            await stream.send_all(b"late data")
            await stream.send_eof()
            await wait_for(lambda: env.client.active_streams == 0)
            # The client is done once its END_STREAM is on the socket; the server
            # reads it a moment later.
            await wait_for(lambda: len(got) >= len(b"late data"))
            assert bytes(got) == b"late data"


async def test_non_200_raises_status_error() -> None:
    with trio.fail_after(10):
        async with hbone_env(Echo(status=401)) as env:
            with pytest.raises(HboneStatusError) as info:
                await env.client.open_stream("10.0.0.2:8080")
            assert info.value.status == 401
            assert info.value.headers == (("baggage", "k8s.deployment.name=echo"),)
            assert env.client.active_streams == 0


async def test_bad_authority_is_400_without_calling_handler() -> None:
    echo = Echo()
    with trio.fail_after(10):
        async with hbone_env(echo) as env:
            with pytest.raises(HboneStatusError) as info:
                await env.client.open_stream("no-port-here")
            assert info.value.status == 400
            assert echo.requests == []
            # the connection is still fine
            stream = await env.client.open_stream("10.0.0.2:80")
            assert await echo_roundtrip(stream, b"ok") == b"ok"


async def test_drain_sends_goaway_and_lets_open_stream_finish() -> None:
    with trio.fail_after(10):
        async with hbone_env(Echo()) as env:
            stream = await env.client.open_stream("10.0.0.2:80")
            await stream.send_all(b"before")
            assert await stream.receive_some() == b"before"
            env.server.drain()
            await wait_for(lambda: not env.client.accepting_streams)
            with pytest.raises(ConnectionGoneError):
                await env.client.open_stream("10.0.0.2:80")
            # the open stream keeps working to a clean finish
            assert await echo_roundtrip(stream, b"after drain") == b"after drain"
            await stream.aclose()
            await wait_for(lambda: env.server.closed and env.client.closed)


async def test_drain_deadline_closes_stuck_streams() -> None:
    async def stuck(request: ConnectRequest, stream: HboneServerStream) -> None:
        await stream.respond(200)
        await trio.sleep_forever()

    client_tls, server_tls = await tls_pair()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            server = await nursery.start(
                lambda task_status: serve_hbone(
                    server_tls,
                    stuck,
                    settings=HboneSettings(drain_timeout=0.2),
                    task_status=task_status,
                )
            )
            client = HboneClientConnection(client_tls)
            await nursery.start(client.run)
            stream = await client.open_stream("10.0.0.2:80")
            server.drain()
            with pytest.raises(trio.BrokenResourceError):
                await stream.receive_some()
            assert server.closed


async def test_unacknowledged_data_stops_the_sender() -> None:
    async def never_reads(request: ConnectRequest, stream: HboneServerStream) -> None:
        await stream.respond(200)
        await trio.sleep_forever()

    with trio.fail_after(10):
        async with hbone_env(never_reads) as env:
            stream = await env.client.open_stream("10.0.0.2:80")
            with trio.move_on_after(0.5) as scope:
                await stream.send_all(b"x" * (32 * MIB))
            assert scope.cancelled_caught  # blocked on the 4 MiB stream window
            assert env.client.engine.send_window(stream.stream_id) == 0


async def test_max_streams_is_min_of_pool_limit_and_peer_setting() -> None:
    with trio.fail_after(10):
        async with hbone_env(Echo(), HboneSettings(pool_max_streams=500)) as env:
            assert env.client.max_streams == 200
        async with hbone_env(Echo()) as env:
            assert env.client.max_streams == 100


async def test_keepalive_keeps_a_live_connection() -> None:
    with trio.fail_after(10):
        async with hbone_env(Echo(), HboneSettings(ping_interval=0.05, ping_timeout=0.5)) as env:
            await trio.sleep(0.5)
            assert not env.client.is_closed


async def test_ping_timeout_drops_a_silent_peer() -> None:
    client_tls, silent = await tls_pair()
    conn = HboneClientConnection(client_tls, settings=FAST_PING)
    with trio.fail_after(10):
        # the peer sends its SETTINGS (handshake done), then never answers anything
        await silent.send_all(HboneEngine(client=False).data_to_send())
        async with trio.open_nursery() as nursery:
            await nursery.start(conn.run)
    assert conn.closed and conn.close_reason == "ping timeout"
    await silent.aclose()


@pytest.mark.parametrize(("spec", "shown"), [("ztunnel::hbone=debug,warn", True), ("warn", False)])
async def test_hbone_logs_are_key_value_and_filtered_by_target(spec: str, shown: bool) -> None:
    out = io.StringIO()
    zlog.configure_logging(spec, "plain", out)
    try:
        await test_ping_timeout_drops_a_silent_peer()
    finally:
        zlog.unconfigure_logging()
    lines = [line.split("\t")[1:] for line in out.getvalue().splitlines()]
    expected = ["info", "ztunnel.hbone", "no PING ack, dropping connection timeout_seconds=0.2"]
    assert lines == ([expected] if shown else [])


async def test_peer_without_http2_handshake_fails_to_start() -> None:
    client_tls, silent = await tls_pair()
    conn = HboneClientConnection(client_tls, settings=FAST_PING)
    with trio.fail_after(10), pytest.raises(ConnectionGoneError, match="ping timeout"):
        await conn.run()
    await silent.aclose()


async def test_peer_disconnect_breaks_open_streams() -> None:
    with trio.fail_after(10):
        async with hbone_env(Echo()) as env:
            stream = await env.client.open_stream("10.0.0.2:80")
            env.server.abort("test")
            with pytest.raises(trio.BrokenResourceError):
                await stream.receive_some()
            await wait_for(lambda: env.client.closed)
            with pytest.raises(ConnectionGoneError):
                await env.client.open_stream("10.0.0.2:80")


async def test_small_windows_still_move_large_data() -> None:
    settings = HboneSettings(stream_window=65_535, connection_window=65_535)
    with trio.fail_after(20):
        async with hbone_env(Echo(), settings) as env:
            stream = await env.client.open_stream("10.0.0.2:80")
            payload = os.urandom(3 * MIB)
            assert await echo_roundtrip(stream, payload) == payload


async def test_half_closeable_stream_conformance() -> None:
    streams: trio.MemorySendChannel[HboneServerStream]
    streams, server_side = trio.open_memory_channel[HboneServerStream](10)

    async def handler(request: ConnectRequest, stream: HboneServerStream) -> None:
        await stream.respond(200)
        done = trio.Event()
        await streams.send(stream)
        stream_done[stream.stream_id] = done
        await done.wait()

    stream_done: dict[int, trio.Event] = {}

    with trio.fail_after(30):
        async with hbone_env(handler) as env:

            async def make_pair() -> tuple[HboneStream, HboneStream]:
                client_stream = await env.client.open_stream("10.0.0.2:80")
                return client_stream, await server_side.receive()

            await trio.testing.check_half_closeable_stream(make_pair, None)


async def test_serve_hbone_settings_and_lifecycle_callbacks() -> None:
    seen: list[str] = []
    client_tls, server_tls = await tls_pair()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            server = await nursery.start(
                lambda task_status: serve_hbone(
                    server_tls,
                    Echo(),
                    settings=HboneSettings(stream_window=1 * MIB, max_frame_size=64 * 1024),
                    on_connection=lambda c: seen.append("open"),
                    on_close=lambda c: seen.append("close"),
                    task_status=task_status,
                )
            )
            client = HboneClientConnection(client_tls)
            await nursery.start(client.run)
            remote = client.engine._h2.remote_settings
            assert (remote.initial_window_size, remote.max_frame_size) == (MIB, 64 * 1024)
            stream = await client.open_stream("10.0.0.2:80")
            assert await echo_roundtrip(stream, b"x" * 200_000) == b"x" * 200_000
            server.drain()
            await wait_for(lambda: client.closed)
    assert seen == ["open", "close"]


async def test_authority_with_an_ipv6_zone_is_400_on_the_wire() -> None:
    # Unlike CR/LF, a zone passes h2's header checks: validate_connect is what refuses it.
    echo = Echo()
    with trio.fail_after(10):
        async with hbone_env(echo) as env:
            with pytest.raises(HboneStatusError) as info:
                await env.client.open_stream("[fe80::1%eth0]:80")
            assert info.value.status == 400
            assert echo.requests == []
