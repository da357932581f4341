"""HbonePool over real mTLS on loopback: reuse, one dialer per key, stream limits, idle release."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import pytest
import trio
import trio.testing
from hbone_certs import CLIENT_ID, SERVER_ID, client_ctx, connect_tcp, serve_loopback

from ztunnel.hbone.connection import HboneServerConnection, HboneServerStream
from ztunnel.hbone.events import ConnectRequest
from ztunnel.hbone.pool import HbonePool, PoolKey
from ztunnel.hbone.settings import HboneSettings
from ztunnel.hbone.tlsstream import TLSStream, tls_handshake


async def echo(request: ConnectRequest, stream: HboneServerStream) -> None:
    await stream.respond(200)
    while chunk := await stream.receive_some():
        await stream.send_all(chunk)
    await stream.send_eof()


@dataclass
class Env:
    pool: HbonePool
    key: PoolKey
    server_conns: list[HboneServerConnection]
    dials: list[PoolKey] = field(default_factory=list)


@asynccontextmanager
async def pool_env(
    dial_delay: float = 0.0, settings: HboneSettings | None = None
) -> AsyncIterator[Env]:
    async with trio.open_nursery() as nursery:
        addr, server_conns = await nursery.start(serve_loopback, echo)
        dials: list[PoolKey] = []

        async def dial(key: PoolKey) -> TLSStream:
            dials.append(key)
            await trio.sleep(dial_delay)
            sock = await connect_tcp(key.dst)
            return await tls_handshake(sock, client_ctx(), server_side=False)

        pool = HbonePool(dial, settings=settings)
        await nursery.start(pool.run)
        key = PoolKey(CLIENT_ID, frozenset({SERVER_ID}), addr, "127.0.0.1")
        yield Env(pool, key, server_conns, dials)
        nursery.cancel_scope.cancel()


async def wait_for_count(pool: HbonePool, n: int) -> None:
    for _ in range(2000):
        if pool.connection_count() == n:
            return
        await trio.sleep(0.005)
    raise AssertionError(f"connection count stayed {pool.connection_count()}, wanted {n}")


async def test_sequential_streams_reuse_one_connection() -> None:
    with trio.fail_after(10):
        async with pool_env() as env:
            for i in range(5):
                stream = await env.pool.open_stream(env.key, f"10.0.0.2:{80 + i}")
                await stream.send_all(b"hi")
                assert await stream.receive_some() == b"hi"
                await stream.aclose()
            assert env.pool.connection_count(env.key) == 1
            assert len(env.dials) == 1


async def test_concurrent_callers_share_a_single_dial() -> None:
    with trio.fail_after(10):
        async with pool_env(dial_delay=0.2) as env:
            streams = []

            async def one() -> None:
                streams.append(await env.pool.open_stream(env.key, "10.0.0.2:80"))

            async with trio.open_nursery() as nursery:
                for _ in range(20):
                    nursery.start_soon(one)
            assert len(env.dials) == 1
            assert len(streams) == 20
            assert env.pool.connection_count() == 1


async def test_200_streams_with_limit_100_open_extra_connections() -> None:
    with trio.fail_after(20):
        async with pool_env(settings=HboneSettings(pool_max_streams=100)) as env:
            streams = []

            async def one(i: int) -> None:
                stream = await env.pool.open_stream(env.key, "10.0.0.2:80")
                streams.append(stream)

            async with trio.open_nursery() as nursery:
                for i in range(200):
                    nursery.start_soon(one, i)
            count = env.pool.connection_count(env.key)
            # a connection is not handed out at stream_count + 1 >= max (ztunnel): 99 each
            assert count in (2, 3)
            assert len(env.dials) == count
            assert sum(c.active_streams for _, c in env.pool.connections()) == 200
            assert all(c.active_streams < 100 for _, c in env.pool.connections())
            # every stream really works
            for stream in streams[::37]:
                await stream.send_all(b"ok")
                assert await stream.receive_some() == b"ok"


async def test_different_keys_get_different_connections() -> None:
    with trio.fail_after(10):
        async with pool_env() as env:
            other = PoolKey(CLIENT_ID, frozenset({SERVER_ID}), env.key.dst, "127.0.0.2")
            await env.pool.open_stream(env.key, "10.0.0.2:80")
            await env.pool.open_stream(other, "10.0.0.2:80")
            assert env.pool.connection_count(env.key) == 1
            assert env.pool.connection_count(other) == 1
            assert env.pool.connection_count() == 2


@pytest.fixture
def clock() -> trio.testing.MockClock:
    """Real-time pace (timeouts behave), but the test can also jump time forward."""
    return trio.testing.MockClock(rate=1.0)


async def test_idle_connection_is_released(clock: trio.testing.MockClock) -> None:
    with trio.fail_after(10):
        async with pool_env(settings=HboneSettings(pool_idle_timeout=0.2)) as env:
            stream = await env.pool.open_stream(env.key, "10.0.0.2:80")
            # Twice the idle timeout in the watcher's steps, each step seen by every task,
            # instead of a sleep that on a loaded machine may not let the watcher run.
            for _ in range(8):
                clock.jump(0.05)
                await trio.testing.wait_all_tasks_blocked()
            assert env.pool.connection_count() == 1  # busy: a stream is open
            await stream.send_eof()
            assert await stream.receive_some() == b""
            await stream.aclose()
            await wait_for_count(env.pool, 0)
            # the next caller simply dials again
            await env.pool.open_stream(env.key, "10.0.0.2:80")
            assert len(env.dials) == 2


async def test_broken_connection_is_dropped_and_replaced() -> None:
    with trio.fail_after(10):
        async with pool_env() as env:
            await env.pool.open_stream(env.key, "10.0.0.2:80")
            env.server_conns[0].abort("test")
            await wait_for_count(env.pool, 0)
            stream = await env.pool.open_stream(env.key, "10.0.0.2:80")
            await stream.send_all(b"again")
            assert await stream.receive_some() == b"again"
            assert len(env.dials) == 2


async def test_draining_server_makes_pool_dial_a_new_connection() -> None:
    with trio.fail_after(10):
        async with pool_env() as env:
            first = await env.pool.open_stream(env.key, "10.0.0.2:80")
            env.server_conns[0].drain()
            for _ in range(200):
                (_, conn), *_ = env.pool.connections()
                if not conn.accepting_streams:
                    break
                await trio.sleep(0.005)
            second = await env.pool.open_stream(env.key, "10.0.0.2:80")
            assert len(env.dials) == 2
            await first.send_all(b"old")
            assert await first.receive_some() == b"old"
            await second.send_all(b"new")
            assert await second.receive_some() == b"new"
