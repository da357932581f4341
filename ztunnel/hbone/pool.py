"""HBONE client connection pool (ztunnel reference §1.6, src/proxy/pool.rs).

Theory of operation: connections are grouped by ``PoolKey`` (source identity,
expected destination identities, destination socket address, source IP). Per
key, one ``trio.Lock`` makes the pick-or-dial step exclusive, so concurrent
callers wait for a single dialer instead of each dialing ("connection storm",
ztunnel#864/#931). A connection is handed out only while
``active_streams + 1 < max_streams`` (max = min(pool limit, peer
MAX_CONCURRENT_STREAMS)); past that the next caller dials an additional
connection. Each connection's driver runs in the pool's nursery with an idle
watcher that closes it after ``idle_timeout`` without streams; closed or broken
connections drop out of the pool when their driver ends.
"""

from __future__ import annotations

import weakref
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import structlog
import trio

from ztunnel.hbone.connection import HboneClientConnection, OnLimit
from ztunnel.hbone.settings import HboneSettings
from ztunnel.hbone.stream import HboneStream
from ztunnel.model.address import IPAddress, SocketAddr
from ztunnel.model.identity import Identity

log = structlog.get_logger("ztunnel.hbone.pool")


@dataclass(frozen=True, slots=True)
class PoolKey:
    """ztunnel's WorkloadKey: who we are, whom we expect, where we connect, from where."""

    src_identity: Identity
    dst_identities: frozenset[Identity]
    dst: SocketAddr
    src_ip: IPAddress | None  # None: the OS picks the source


Dial = Callable[[PoolKey], Awaitable[trio.abc.Stream]]


@dataclass
class _KeyState:
    lock: trio.Lock = field(default_factory=trio.Lock)
    conns: list[HboneClientConnection] = field(default_factory=list)


class HbonePool:
    """Pooled HBONE client connections; ``run`` must be started in a nursery first."""

    def __init__(
        self, dial: Dial, *, settings: HboneSettings | None = None, on_limit: OnLimit | None = None
    ) -> None:
        """``settings`` (ztunnel's defaults if None) is handed to every connection;
        the pool itself uses ``pool_max_streams`` (through the connection) and
        ``pool_idle_timeout``. ``on_limit(name)``: a server went over one of our limits."""
        self._dial = dial
        self.settings = settings if settings is not None else HboneSettings()
        self._on_limit = on_limit
        self._keys: dict[PoolKey, _KeyState] = {}
        self._nursery: trio.Nursery | None = None
        # Connections that must not take new streams (their client certificate rotated).
        self._retired: weakref.WeakSet[HboneClientConnection] = weakref.WeakSet()

    async def run(
        self, *, task_status: trio.TaskStatus[HbonePool] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Own the connection drivers; returns only when cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started(self)
            await trio.sleep_forever()

    async def open_stream(
        self, key: PoolKey, authority: str, headers: Iterable[tuple[str, str]] = ()
    ) -> HboneStream:
        """A CONNECT stream to ``authority`` over a pooled (or newly dialed) connection.

        Raises whatever ``dial`` raises, HboneStatusError for a non-200 answer,
        ConnectionGoneError if the chosen connection went away meanwhile,
        trio.TooSlowError if the peer did not answer within ``connect_response_timeout``.
        """
        state = self._keys.get(key)
        if state is None:
            state = self._keys[key] = _KeyState()
        elif not state.lock.locked() and (ready := self._pick(state)) is not None:
            # Nobody is dialing and a connection has room: what taking the free lock would
            # pick anyway, without its schedule point (one task step per stream).
            return await ready.open_stream(authority, headers)
        try:
            async with state.lock:
                conn = self._pick(state) or await self._connect(key, state)
        finally:
            self._forget_if_unused(key, state)  # a failed dial leaves an empty state
        # open_stream registers the stream before its first await, so the count
        # is exact for the next caller that takes the lock.
        return await conn.open_stream(authority, headers)

    def connection_count(self, key: PoolKey | None = None) -> int:
        """Open connections for ``key`` (or all keys)."""
        states = [self._keys.get(key)] if key is not None else list(self._keys.values())
        return sum(len(s.conns) for s in states if s is not None)

    def connections(self) -> list[tuple[PoolKey, HboneClientConnection]]:
        """Snapshot of (key, connection) pairs (config dump, metrics)."""
        return [(k, c) for k, s in self._keys.items() for c in s.conns]

    def retire(self, src_identity: Identity) -> int:
        """Stop handing out connections that present an old certificate of ``src_identity``.

        Streams already open on them run to completion; idle ones close now. The
        next caller dials a new connection with the current certificate.
        """
        retired = 0
        for key, state in self._keys.items():
            if key.src_identity != src_identity:
                continue
            for conn in state.conns:
                if conn in self._retired:
                    continue
                self._retired.add(conn)
                retired += 1
                if conn.active_streams == 0:
                    conn.close(reason="certificate rotated")
        return retired

    # -- internals ----------------------------------------------------------------------

    def _pick(self, state: _KeyState) -> HboneClientConnection | None:
        for conn in state.conns:
            if (
                conn.accepting_streams
                and conn.active_streams + 1 < conn.max_streams
                and conn not in self._retired
            ):
                return conn
        return None

    async def _connect(self, key: PoolKey, state: _KeyState) -> HboneClientConnection:
        if self._nursery is None:
            raise RuntimeError("HbonePool.run() is not running")
        tls = await self._dial(key)
        conn = HboneClientConnection(tls, settings=self.settings, on_limit=self._on_limit)
        started: HboneClientConnection = await self._nursery.start(self._drive, key, state, conn)
        return started

    async def _drive(
        self,
        key: PoolKey,
        state: _KeyState,
        conn: HboneClientConnection,
        *,
        task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        # Listed before it is ready: only the dialer, holding the key's lock, can see it.
        state.conns.append(conn)
        failure: BaseException | None = None
        started = False
        try:
            async with trio.open_nursery() as nursery:
                try:
                    await nursery.start(self._run_conn, conn, nursery.cancel_scope)
                except Exception as exc:  # re-raised bare below, not as an ExceptionGroup
                    failure = exc
                else:
                    task_status.started(conn)
                    started = True
                    await self._idle_watch(conn)
        except Exception:
            if not started:
                raise
            # One connection's failure ends that connection, never the pool.
            log.exception("pooled connection failed", dst=str(key.dst))
            conn.abort("internal error")
        finally:
            state.conns.remove(conn)
            self._forget_if_unused(key, state)
        if failure is not None:
            raise failure

    def _forget_if_unused(self, key: PoolKey, state: _KeyState) -> None:
        if not state.conns and not state.lock.locked() and self._keys.get(key) is state:
            del self._keys[key]

    @staticmethod
    async def _run_conn(
        conn: HboneClientConnection,
        watcher: trio.CancelScope,
        *,
        task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        try:
            await conn.run(task_status=task_status)
        finally:
            watcher.cancel()  # the connection ended: stop its idle watcher now

    async def _idle_watch(self, conn: HboneClientConnection) -> None:
        idle_timeout = self.settings.pool_idle_timeout
        period = min(max(idle_timeout / 4, 0.01), 5.0)
        idle_since: float | None = None
        seen = conn.opened_streams
        while not conn.is_closed:
            await trio.sleep(period)
            busy = conn.active_streams > 0 or conn.opened_streams != seen
            seen = conn.opened_streams
            now = trio.current_time()
            if busy:
                idle_since = None
            elif idle_since is None:
                idle_since = now
            elif now - idle_since >= idle_timeout - period:
                log.debug("closing idle connection")
                conn.close(reason="idle")
                return
