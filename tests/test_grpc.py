"""ztunnel's gRPC layer against grpcio: our client with a grpcio server, our server with a
grpcio client. Status codes and messages, deadlines, TLS names, keepalive, reconnect."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
import trio

from tests.grpc_peers import bidi, grpcio_channel, grpcio_server, make_tls, unary
from ztunnel.grpc.client import ChannelOptions, Target, connect
from ztunnel.grpc.server import GrpcServer, ServerContext
from ztunnel.grpc.status import GrpcError, StatusCode, decode_timeout, encode_timeout
from ztunnel.grpc.tls import client_context, server_context

ECHO = "/test.Echo/Unary"
STREAM = "/test.Echo/Stream"
TLS = make_tls(dns=("localhost", "istiod.istio-system.svc"))


def _echo(request: bytes, context: grpc.ServicerContext) -> bytes:
    meta = dict(context.invocation_metadata())
    return request + b"|" + meta.get("x-test", "").encode()


def _stream_echo(requests: Iterator[bytes], context: Any) -> Iterator[bytes]:
    for r in requests:
        yield r.upper()


def _ctx() -> Any:
    return client_context(TLS.root_pem)


async def test_unary_over_tls_with_metadata() -> None:
    with grpcio_server({ECHO: unary(_echo)}, TLS) as port:
        target = Target.parse(f"https://127.0.0.1:{port}")
        async with connect(target, ssl_context=_ctx()) as conn:
            reply = await conn.unary(ECHO, b"hi", metadata=[("x-test", "meta")], time_limit=5)
            # the same connection carries a second call
            again = await conn.unary(ECHO, b"again", time_limit=5)
    assert reply == b"hi|meta"
    assert again == b"again|"


async def test_error_status_and_percent_encoded_message() -> None:
    def deny(request: bytes, context: grpc.ServicerContext) -> bytes:
        context.abort(grpc.StatusCode.PERMISSION_DENIED, "nö 100% not yours")

    with grpcio_server({ECHO: unary(deny)}) as port:
        async with connect(Target.parse(f"http://127.0.0.1:{port}")) as conn:
            with pytest.raises(GrpcError) as info:
                await conn.unary(ECHO, b"x", time_limit=5)
    assert info.value.code is StatusCode.PERMISSION_DENIED
    assert info.value.message == "nö 100% not yours"


async def test_unknown_method_is_unimplemented() -> None:
    with grpcio_server({}) as port:
        async with connect(Target.parse(f"http://127.0.0.1:{port}")) as conn:
            with pytest.raises(GrpcError) as info:
                await conn.unary("/no.Such/Method", b"", time_limit=5)
    assert info.value.code is StatusCode.UNIMPLEMENTED


async def test_deadline_is_sent_and_enforced() -> None:
    seen: list[float | None] = []
    release = threading.Event()

    def slow(request: bytes, context: grpc.ServicerContext) -> bytes:
        seen.append(context.time_remaining())
        release.wait(5)
        return b"late"

    with grpcio_server({ECHO: unary(slow)}) as port:
        async with connect(Target.parse(f"http://127.0.0.1:{port}")) as conn:
            start = trio.current_time()
            with pytest.raises(GrpcError) as info:
                await conn.unary(ECHO, b"x", time_limit=0.3)
            elapsed = trio.current_time() - start
            release.set()
            # the connection is still usable after a call timed out
            assert await conn.unary(ECHO, b"ok", time_limit=5) == b"late"
    assert info.value.code is StatusCode.DEADLINE_EXCEEDED
    assert elapsed < 2
    assert seen[0] is not None and 0 < seen[0] <= 0.3


async def test_bidi_stream() -> None:
    with grpcio_server({STREAM: bidi(_stream_echo)}) as port:
        async with (
            connect(Target.parse(f"http://127.0.0.1:{port}")) as conn,
            conn.call(STREAM) as call,
        ):
            got = []
            for word in (b"a", b"bb", b"ccc"):
                await call.send(word)
                got.append(await call.receive())
            await call.done_writing()
            assert await call.receive() is None  # status OK
    assert got == [b"A", b"BB", b"CCC"]


async def test_redial_after_the_server_went_away() -> None:
    with grpcio_server({STREAM: bidi(_stream_echo)}) as port:
        async with (
            connect(Target.parse(f"http://127.0.0.1:{port}")) as conn,
            conn.call(STREAM) as call,
        ):
            await call.send(b"x")
            assert await call.receive() == b"X"
            port_kept = port
    # the server is gone now: the next dial fails fast with UNAVAILABLE
    with pytest.raises(GrpcError) as info:
        async with connect(Target.parse(f"http://127.0.0.1:{port_kept}")):
            pass
    assert info.value.code is StatusCode.UNAVAILABLE
    # a new server on the same port: a new connection works
    with grpcio_server({STREAM: bidi(_stream_echo)}, port=port_kept) as again:
        async with (
            connect(Target.parse(f"http://127.0.0.1:{again}")) as conn,
            conn.call(STREAM) as call,
        ):
            await call.send(b"y")
            assert await call.receive() == b"Y"


async def test_stream_ends_unavailable_when_server_dies_mid_call() -> None:
    stop = threading.Event()

    def hold(requests: Iterator[bytes], context: Any) -> Iterator[bytes]:
        yield next(requests)
        stop.wait(10)

    server_cm = grpcio_server({STREAM: bidi(hold)})
    port = server_cm.__enter__()
    try:
        async with (
            connect(Target.parse(f"http://127.0.0.1:{port}")) as conn,
            conn.call(STREAM, time_limit=10) as call,
        ):
            await call.send(b"x")
            assert await call.receive() == b"x"
            await trio.to_thread.run_sync(lambda: server_cm.__exit__(None, None, None))
            stop.set()
            with pytest.raises(GrpcError) as info:
                await call.receive()
    finally:
        stop.set()
    assert info.value.code in (StatusCode.UNAVAILABLE, StatusCode.CANCELLED)


@pytest.mark.parametrize(
    ("names", "ok"),
    [
        ((), True),  # the host (127.0.0.1) is an IP SAN of the certificate
        (("istiod.istio-system.svc",), True),  # ALT_*_HOSTNAME
        (("127.0.0.1", "wrong.example"), True),  # either name suffices
        (("wrong.example",), False),
    ],
)
async def test_tls_server_name_checked(names: tuple[str, ...], ok: bool) -> None:
    with grpcio_server({ECHO: unary(_echo)}, TLS) as port:
        target = Target.parse(f"127.0.0.1:{port}")
        if ok:
            async with connect(target, ssl_context=_ctx(), verify_names=names) as conn:
                assert await conn.unary(ECHO, b"n", time_limit=5) == b"n|"
            return
        with pytest.raises(GrpcError) as info:
            async with connect(target, ssl_context=_ctx(), verify_names=names):
                pass
        assert info.value.code is StatusCode.UNAVAILABLE
        assert "not valid for" in info.value.message


async def test_untrusted_server_certificate_is_refused() -> None:
    other = make_tls()
    with grpcio_server({ECHO: unary(_echo)}, TLS) as port, pytest.raises(GrpcError) as info:
        async with connect(
            Target.parse(f"127.0.0.1:{port}"), ssl_context=client_context(other.root_pem)
        ):
            pass
    assert info.value.code is StatusCode.UNAVAILABLE


async def test_connection_refused_is_unavailable() -> None:
    with trio.socket.socket() as s:
        await s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(GrpcError) as info:
        async with connect(Target.parse(f"http://127.0.0.1:{port}")):
            pass
    assert info.value.code is StatusCode.UNAVAILABLE


async def test_keepalive_detects_a_silent_server() -> None:
    """A peer that accepts but never answers PINGs: the call ends UNAVAILABLE."""
    async with trio.open_nursery() as nursery:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        port = listeners[0].socket.getsockname()[1]

        async def swallow(stream: trio.SocketStream) -> None:
            while await stream.receive_some(65536):
                pass

        nursery.start_soon(trio.serve_listeners, swallow, listeners)
        opts = ChannelOptions(keepalive_interval=0.2, keepalive_timeout=0.3)
        start = trio.current_time()
        async with connect(Target.parse(f"http://127.0.0.1:{port}"), options=opts) as conn:
            with pytest.raises(GrpcError) as info:
                await conn.unary(ECHO, b"x", time_limit=10)
        assert info.value.code is StatusCode.UNAVAILABLE
        assert "keepalive" in info.value.message
        assert trio.current_time() - start < 5
        nursery.cancel_scope.cancel()


async def test_oversized_response_is_resource_exhausted() -> None:
    def big(request: bytes, context: Any) -> bytes:
        return b"x" * 5000

    with grpcio_server({ECHO: unary(big)}) as port:
        opts = ChannelOptions(max_message=1000)
        async with connect(Target.parse(f"http://127.0.0.1:{port}"), options=opts) as conn:
            with pytest.raises(GrpcError) as info:
                await conn.unary(ECHO, b"", time_limit=5)
    assert info.value.code is StatusCode.RESOURCE_EXHAUSTED


# --- our server, grpcio client ---------------------------------------------------------


async def _serve(nursery: trio.Nursery, server: GrpcServer) -> int:
    listeners = await nursery.start(server.serve_tcp, 0, "127.0.0.1")
    return int(listeners[0].socket.getsockname()[1])


def _tls_files(tmp_path: Any) -> Any:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.write_bytes(TLS.cert_pem)
    key.write_bytes(TLS.key_pem)
    return server_context(str(cert), str(key))


async def test_our_server_with_grpcio_client(tmp_path: Any) -> None:
    cancelled = trio.Event()

    async def echo(request: bytes, ctx: ServerContext) -> bytes:
        return request + (ctx.header("x-test") or "").encode()

    async def deny(request: bytes, ctx: ServerContext) -> bytes:
        raise GrpcError(StatusCode.UNAUTHENTICATED, "bad tökén")

    async def slow(request: bytes, ctx: ServerContext) -> bytes:
        try:
            await trio.sleep(10)
        finally:
            cancelled.set()
        return b""

    async def broken(request: bytes, ctx: ServerContext) -> bytes:
        raise RuntimeError("handler bug")

    server = GrpcServer(
        {ECHO: echo, "/t/Deny": deny, "/t/Slow": slow, "/t/Broken": broken},
        ssl_context=_tls_files(tmp_path),
    )
    async with trio.open_nursery() as nursery:
        port = await _serve(nursery, server)

        def client_side() -> list[Any]:
            results: list[Any] = []
            with grpcio_channel(port, TLS) as channel:
                results.append(
                    channel.unary_unary(ECHO)(b"ping", metadata=[("x-test", "!")], timeout=5)
                )
                for path, timeout in (("/t/Deny", 5), ("/t/Slow", 0.3), ("/t/Broken", 5),
                                      ("/t/Missing", 5)):  # fmt: skip
                    try:
                        channel.unary_unary(path)(b"", timeout=timeout)
                    except grpc.RpcError as exc:
                        results.append((exc.code(), exc.details()))
            return results

        results = await trio.to_thread.run_sync(client_side)
        with trio.fail_after(5):
            await cancelled.wait()  # the deadline cancelled the handler
        nursery.cancel_scope.cancel()
    assert results[0] == b"ping!"
    assert results[1] == (grpc.StatusCode.UNAUTHENTICATED, "bad tökén")
    assert results[2][0] == grpc.StatusCode.DEADLINE_EXCEEDED
    assert results[3] == (grpc.StatusCode.INTERNAL, "internal error")
    assert results[4][0] == grpc.StatusCode.UNIMPLEMENTED


async def test_our_server_survives_garbage_and_serves_on() -> None:
    async def echo(request: bytes, ctx: ServerContext) -> bytes:
        return request

    async with trio.open_nursery() as nursery:
        port = await _serve(nursery, GrpcServer({ECHO: echo}))
        garbage = await trio.open_tcp_stream("127.0.0.1", port)
        await garbage.send_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" * 10)
        await garbage.aclose()
        async with connect(Target.parse(f"http://127.0.0.1:{port}")) as conn:
            assert await conn.unary(ECHO, b"still", time_limit=5) == b"still"
        nursery.cancel_scope.cancel()


def test_timeout_header_round_trip() -> None:
    for seconds in (0.0001, 0.3, 5, 86400, 10**9):
        encoded = encode_timeout(seconds)
        decoded = decode_timeout(encoded)
        assert decoded is not None and decoded >= seconds * 0.999999
        assert len(encoded) <= 9
    assert decode_timeout("123456789S") is None
    assert decode_timeout("1x") is None


def test_target_parse() -> None:
    assert Target.parse("https://istiod.istio-system.svc:15012") == Target(
        "istiod.istio-system.svc", 15012, True
    )
    assert Target.parse("http://[::1]:80").authority == "[::1]:80"
    assert Target.parse("localhost:15012").tls
    for bad in ("istiod", "https://istiod:", "host:99999"):
        with pytest.raises(ValueError):
            Target.parse(bad)


async def test_our_server_closes_idle_connections() -> None:
    async def echo(request: bytes, ctx: ServerContext) -> bytes:
        return request

    async with trio.open_nursery() as nursery:
        port = await _serve(nursery, GrpcServer({ECHO: echo}, idle_timeout=0.2))
        async with connect(Target.parse(f"http://127.0.0.1:{port}")) as conn:
            assert await conn.unary(ECHO, b"1", time_limit=5) == b"1"
            await trio.sleep(0.6)
            assert not conn.alive
            assert conn.error is not None and conn.error.code is StatusCode.UNAVAILABLE
        nursery.cancel_scope.cancel()


async def test_send_after_the_server_ended_the_call_reports_its_status() -> None:
    def refuse(requests: Iterator[bytes], context: Any) -> Iterator[bytes]:
        context.abort(grpc.StatusCode.UNAVAILABLE, "try later")
        yield b""  # pragma: no cover (a generator; abort raises first)

    with grpcio_server({STREAM: bidi(refuse)}) as port:
        async with (
            connect(Target.parse(f"http://127.0.0.1:{port}")) as conn,
            conn.call(STREAM) as call,
        ):
            with pytest.raises(GrpcError) as info:
                for _ in range(50):  # keep sending while the refusal arrives
                    await call.send(b"x")
                    await trio.sleep(0.01)
                await call.receive()
    assert info.value.code is StatusCode.UNAVAILABLE
    assert info.value.message == "try later"
