"""Connection telemetry across processes: workers report, the control process keeps the books.

A worker's flows talk to a ``RelayTracker`` (a ``ConnectionTracker`` to them): it keeps
its own open connections (the worker's policy watcher cuts them) but renders nothing;
it batches connection events (opened, bytes moved, closed, refused) and posts them to
the control process every ``FLUSH_INTERVAL`` at most. There, ``TelemetryMirror`` replays
them into the agent's one real ``ConnectionTracker``: so the metrics, the access logs,
the config dump's connections and the UI's history stay whole whatever the worker count,
and a connection's duration still runs from when the worker opened it.

Byte counts go as running totals of the connections that moved bytes since the last
batch (one entry per connection, however many chunks), so bulk transfers cost a dict
update per chunk in the worker and nothing per chunk in the control process.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable

import trio

from ztunnel.model.address import Authority, SocketAddr
from ztunnel.model.outcome import Failure, FailureKind
from ztunnel.telemetry.connections import (
    ConnectionInfo,
    ConnectionTracker,
    Direction,
    TrackedConnection,
)
from ztunnel.telemetry.history import ConnectionHistory
from ztunnel.telemetry.metrics import Metrics
from ztunnel.workers.protocol import Closed, Event, LimitHit, Moved, Opened, Refused, Telemetry

FLUSH_INTERVAL = 0.02  # seconds: events wait at most this long before they are posted


class RelayedConnection(TrackedConnection):
    """A worker's open connection: counts bytes, reports instead of rendering."""

    def __init__(self, tracker: RelayTracker, info: ConnectionInfo, number: int) -> None:
        # No super().__init__: a worker resolves no metric children and logs nothing.
        self.info = info
        self.bytes_sent = 0
        self.bytes_received = 0
        self.started_at = time.time()
        self.closed = False
        self.cancel: Callable[[], None] | None = None
        self.number = number
        self._tracker = tracker
        self._relay = tracker
        self._labels = ()
        self._start = tracker.clock()

    def add_sent(self, n: int) -> None:
        self.bytes_sent += n
        self._relay.moved(self)

    def add_received(self, n: int) -> None:
        self.bytes_received += n
        self._relay.moved(self)


class _RelayMetrics(Metrics):
    """A worker's metrics: limit hits go to the control process's ``ztunnel_limit_hits_total``
    (the only metric the flows count themselves rather than through the tracker)."""

    def __init__(self, report: Callable[[Event], None]) -> None:
        super().__init__(process_metrics=False)
        self._report = report

    def limit_hit(self, limit: str) -> None:
        self._report(LimitHit(limit))


class RelayTracker(ConnectionTracker):
    """The tracker of a worker process: its connections, reported to the control process."""

    def __init__(
        self, post: Callable[[Telemetry], None], *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        super().__init__(
            _RelayMetrics(self._event), clock=clock, history=ConnectionHistory(capacity=1)
        )
        self._post = post
        self._numbers = itertools.count(1)
        self._events: list[Event] = []
        self._moved: dict[int, RelayedConnection] = {}
        self._wake = trio.Event()

    def open(self, info: ConnectionInfo) -> TrackedConnection:
        conn = RelayedConnection(self, info, next(self._numbers))
        self._open[id(conn)] = conn
        self._event(Opened(conn.number, info, conn._start, conn.started_at))
        return conn

    def connection_failed(
        self, src_addr: SocketAddr, dst_addr: Authority, direction: Direction, failure: Failure
    ) -> None:
        self._event(Refused(src_addr, dst_addr, direction, failure))

    def moved(self, conn: RelayedConnection) -> None:
        self._moved[conn.number] = conn
        self._wake.set()

    def _closed(self, conn: TrackedConnection, failure: Failure | None) -> None:
        self._open.pop(id(conn), None)
        assert isinstance(conn, RelayedConnection)
        self._moved.pop(conn.number, None)
        self._event(Closed(conn.number, conn.bytes_sent, conn.bytes_received, failure))

    def _event(self, event: Event) -> None:
        self._events.append(event)
        self._wake.set()

    def take(self) -> tuple[Event, ...]:
        """Everything to report now, in order (byte totals after the events)."""
        events = [
            *self._events,
            *(Moved(n, c.bytes_sent, c.bytes_received) for n, c in self._moved.items()),
        ]
        self._events.clear()
        self._moved.clear()
        return tuple(events)

    async def run(self, interval: float = FLUSH_INTERVAL) -> None:
        """Post batches until cancelled (a last batch is flushed by ``flush``)."""
        while True:
            await self._wake.wait()
            await trio.sleep(interval)  # let more events join this batch
            self._wake = trio.Event()
            self.flush()

    def flush(self) -> None:
        events = self.take()
        if events:
            self._post(Telemetry(events))


class TelemetryMirror:
    """The control process's side: replays workers' events into the agent's tracker."""

    def __init__(self, tracker: ConnectionTracker) -> None:
        self.tracker = tracker
        self._conns: dict[tuple[int, int], TrackedConnection] = {}
        self.opened: dict[int, int] = {}  # by worker process key: connections opened

    def apply(self, worker: int, batch: Telemetry) -> None:
        for event in batch.events:
            if isinstance(event, Opened):
                self._opened(worker, event)
            elif isinstance(event, Moved):
                moving = self._conns.get((worker, event.conn))
                if moving is not None:
                    _catch_up(moving, event.sent, event.received)
            elif isinstance(event, Closed):
                ending = self._conns.pop((worker, event.conn), None)
                if ending is not None:
                    _catch_up(ending, event.sent, event.received)
                    ending.close(event.failure)
            elif isinstance(event, LimitHit):
                self.tracker.metrics.limit_hit(event.limit)
            else:
                self.tracker.connection_failed(event.src, event.dst, event.direction, event.failure)

    def _opened(self, worker: int, event: Opened) -> None:
        conn = self.tracker.open(event.info)
        conn.backdate(event.start, event.started_at)
        self._conns[(worker, event.conn)] = conn
        self.opened[worker] = self.opened.get(worker, 0) + 1

    def open_count(self, worker: int) -> int:
        return sum(1 for w, _ in self._conns if w == worker)

    def worker_gone(self, worker: int, why: str) -> int:
        """Close the connections of a worker process that exited; returns how many."""
        failure = Failure(FailureKind.INTERRUPTED, f"worker process exited ({why})")
        mine = [key for key in self._conns if key[0] == worker]
        for key in mine:
            self._conns.pop(key).close(failure)
        self.opened.pop(worker, None)
        return len(mine)


def _catch_up(conn: TrackedConnection, sent: int, received: int) -> None:
    if sent > conn.bytes_sent:
        conn.add_sent(sent - conn.bytes_sent)
    if received > conn.bytes_received:
        conn.add_received(received - conn.bytes_received)
