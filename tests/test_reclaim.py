"""Memory after connections end (docs/reliability.md, "Memory after a burst").

An ended HBONE connection's objects (h2 state, streams, the SSL socket) are freed as
soon as the driver lets go, not at the next full collection; ``ztunnel.hbone.reclaim``
collects and trims the C heap once a burst of connections is over. Counted with
``gc`` and weak references, never with timings.
"""

from __future__ import annotations

import gc
import sys
import weakref
from collections.abc import Iterator

import pytest
import trio
import trio.testing
from hbone_certs import tls_pair

from ztunnel.hbone import reclaim
from ztunnel.hbone.connection import (
    ConnectRequest,
    HboneClientConnection,
    HboneServerConnection,
    HboneServerStream,
    ended_connections,
    serve_hbone,
)
from ztunnel.hbone.reclaim import Reclaimer
from ztunnel.hbone.settings import HboneSettings

SETTINGS = HboneSettings(ping_interval=None)


# -- when: the policy ---------------------------------------------------------------------


def test_few_ended_connections_are_not_worth_a_collection() -> None:
    policy = Reclaimer(min_ended=64)
    policy.start(0, 0.0)
    assert not policy.due(63, 2.0)
    assert not policy.due(63, 4.0)


def test_reclaims_once_the_burst_is_over_not_while_it_lasts() -> None:
    policy = Reclaimer(min_ended=64, max_delay=30.0)
    policy.start(10, 0.0)
    assert not policy.due(200, 2.0)  # still ending
    assert not policy.due(500, 4.0)
    assert policy.due(500, 6.0)  # none ended during the last interval
    assert not policy.due(500, 8.0)  # nothing new since


def test_reclaims_at_least_every_max_delay_while_connections_keep_ending() -> None:
    policy = Reclaimer(min_ended=64, max_delay=30.0)
    policy.start(0, 0.0)
    due = [policy.due(100 * step, 2.0 * step) for step in range(1, 40)]
    assert due.count(True) == 2  # at 30 s and 60 s (2 s checks), never per check
    assert due.index(True) == 14


async def test_run_reclaims_after_a_burst(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    ended = [0]
    calls: list[float] = []
    monkeypatch.setattr(reclaim, "reclaim", lambda: calls.append(trio.current_time()) or 0)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(reclaim.run, 2.0, Reclaimer(min_ended=64), lambda: ended[0])
        await trio.sleep(5.0)
        ended[0] = 500  # a burst ends between the checks at 6 s and 8 s
        await trio.sleep(20.0)
        nursery.cancel_scope.cancel()
    assert calls == [8.0]


# -- what: ended connections leave nothing behind --------------------------------------------


@pytest.fixture
def no_automatic_gc() -> Iterator[None]:
    """Only explicit collections: what survives does not depend on allocation counts."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


async def _echo(request: ConnectRequest, stream: HboneServerStream) -> None:
    await stream.respond(200)
    while data := await stream.receive_some():
        await stream.send_all(data)


async def _one_connection(refs: list[weakref.ref[object]], streams: int) -> None:
    """An HBONE connection over mTLS with ``streams`` concurrent echoed streams, all
    held open, then closed (as ``bench/flood.py burst`` does)."""
    client_tls, server_tls = await tls_pair()
    servers: list[HboneServerConnection] = []
    release = trio.Event()

    async def one(client: HboneClientConnection) -> None:
        stream = await client.open_stream("127.0.0.1:8080")
        await stream.send_all(b"m" * 1024)
        got = 0
        while got < 1024:
            got += len(await stream.receive_some())
        await release.wait()
        await stream.aclose()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(
            lambda: serve_hbone(server_tls, _echo, settings=SETTINGS, on_connection=servers.append)
        )
        client = HboneClientConnection(client_tls, settings=SETTINGS)
        await nursery.start(client.run)
        async with trio.open_nursery() as holders:
            for _ in range(streams):
                holders.start_soon(one, client)
            await trio.testing.wait_all_tasks_blocked()
            release.set()
        client.close()
    for obj in (client, client.engine, client_tls.socket, *servers, servers[0].engine):
        refs.append(weakref.ref(obj))
    refs.append(weakref.ref(server_tls.socket))


def _garbage_of(prefixes: tuple[str, ...]) -> list[str]:
    """Types (of these modules) among the objects only a collection would free."""
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        gc.collect()
        return sorted(
            {
                f"{type(o).__module__}.{type(o).__qualname__}"
                for o in gc.garbage
                if type(o).__module__.startswith(prefixes)
            }
        )
    finally:
        gc.set_debug(0)
        gc.garbage.clear()


async def test_an_ended_connection_is_freed_without_the_garbage_collector(
    no_automatic_gc: None,
) -> None:
    before = ended_connections()
    refs: list[weakref.ref[object]] = []
    with trio.fail_after(30):
        for _ in range(5):
            await _one_connection(refs, streams=10)
    assert ended_connections() - before == 10  # client and server side of each
    assert len(refs) == 30
    # Before: h2's dispatch table made each connection a cycle that kept its streams,
    # window managers and HPACK tables until a full collection (minutes in the agent).
    assert [ref for ref in refs if ref() is not None] == []
    assert _garbage_of(("h2.", "hpack.", "ztunnel.hbone", "ssl")) == []


def test_reclaim_collects_cycles() -> None:
    class Node:
        other: object = None

    a, b = Node(), Node()
    a.other, b.other = b, a
    ref = weakref.ref(a)
    del a, b
    gc.disable()
    try:
        reclaim.reclaim()
    finally:
        gc.enable()
    assert ref() is None


def test_malloc_trim_is_found_on_glibc() -> None:
    import platform

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("malloc_trim is glibc's")
    assert reclaim._trim is not None


def test_reclaim_drops_attribute_names_the_type_cache_keeps() -> None:
    """CPython's type attribute cache keeps a strong reference to each looked-up name; a
    name built at run time (as C code's ``PyObject_CallMethod`` does for every call) is
    a new string each time, so the cache pinned thousands of them, scattered over the
    arenas of a burst (docs/reliability.md, "Memory after a burst")."""

    class Tz:
        def utcoffset(self) -> int:
            return 0

    name = "".join(["utc", "offset"])  # not interned, like a name made from a C string
    before = sys.getrefcount(name)
    getattr(Tz(), name)
    reclaim.reclaim()
    assert sys.getrefcount(name) == before
