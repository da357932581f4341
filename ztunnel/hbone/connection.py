"""The trio driver of one HBONE HTTP/2 connection over a TLS stream.

Theory of operation: three tasks per connection, in a nursery owned by ``run``:

* the **reader** receives bytes, feeds the engine and dispatches events to the
  streams. It never blocks on writing: a reader waiting on a full socket while
  the peer waits on us is the classic HTTP/2 deadlock.
* the **writer** sends what could not be written at once. ``kick()`` first tries
  to write everything the engine queued from the calling task, without waiting
  (``TLSStream.send_nowait``): on the request/response path that saves two task
  switches per write. Only when the socket is full (or a send is in progress, or
  the transport is not a ``TLSStream``) does the writer take over, with one
  ``send_all`` (coalescing frames). ``kick()`` returns a sequence number that
  ``wait_flushed`` waits on, which is how stream writes get socket backpressure.
* the **keepalive** sends a PING every ``ping_interval`` and drops the
  connection if no ack arrives within ``ping_timeout`` (ztunnel: 10 s / 20 s).

Fairness and limits (docs/reliability.md): the reader hands the engine at most
``frames_per_turn`` frames at a time and lets every other task run between such
turns, so one peer's flood of small frames cannot hold the event loop. A peer
that goes over a budget (engine, ``limits.py``) gets GOAWAY(ENHANCE_YOUR_CALM);
a server refuses CONNECTs past its handler and pending-connect limits and closes
connections idle for ``idle_timeout``. Each limit hit is reported to
``on_limit(name)`` (the agent counts them in ``ztunnel_limit_hits_total``) and
logged once per connection, never per frame.

The connection talks to its streams only through ``StreamEvents`` (and they to
it through ``StreamHost``); every size and timer comes from one ``HboneSettings``.
Graceful drain is GOAWAY, wait for open streams, then close; a deadline bounds
it. Any transport failure ends ``run`` quietly and breaks the open streams.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import structlog
import trio

from ztunnel.hbone.engine import HboneEngine, StreamState, validate_connect
from ztunnel.hbone.errors import ConnectionGoneError, HboneStatusError, StreamClosedError
from ztunnel.hbone.events import (
    ConnectionClosed,
    ConnectRequest,
    Data,
    ErrorCode,
    Event,
    GoAwayReceived,
    Headers,
    PingAcked,
    Response,
    SettingsChanged,
    StreamEnded,
    StreamReset,
    WindowOpened,
)
from ztunnel.hbone.limits import Limit
from ztunnel.hbone.settings import HboneSettings
from ztunnel.hbone.stream import HboneServerStream, HboneStream, StreamEvents
from ztunnel.hbone.tlsstream import TLSStream

log = structlog.get_logger("ztunnel.hbone")

RECEIVE_SIZE = 256 * 1024
CLOSE_FLUSH_TIMEOUT = 1.0
# Replies to the peer's own frames (PING/SETTINGS ACKs, RST_STREAMs, 400s) may pile
# up unsent while the peer does not read, up to ``settings.max_unsent_bytes``. Past
# that we drop the connection rather than make the reader wait for the writer: a
# reader blocked on writing deadlocks with peers that write before they read. DATA
# is not counted; flow control and each sender waiting for its flush already bound it.
# Larger output goes through the writer task as before: bulk transfers measured
# slower (and bimodal) when the relay task wrote 256 KiB itself.
DIRECT_WRITE_MAX = 64 * 1024


OnLimit = Callable[[str], object]

_ended = 0  # HBONE connections of this process that ended (see ended_connections)


def ended_connections() -> int:
    """How many HBONE connections (client and server) of this process have ended.

    The memory reclaimer (``ztunnel/hbone/reclaim.py``) watches it: a connection's h2 state
    sits in reference cycles that only a full garbage collection frees.
    """
    return _ended


class _Connection:
    """Shared machinery of client and server connections."""

    _started_after_settings = False

    def __init__(
        self, tls: trio.abc.Stream, engine: HboneEngine, on_limit: OnLimit | None = None
    ) -> None:
        self.engine = engine
        self.settings = engine.settings
        self._on_limit = on_limit
        self._limits_logged: set[str] = set()
        self._tls = tls
        self._direct = tls if isinstance(tls, TLSStream) else None
        self._deferring = False  # the reader is dispatching: kick() leaves the flush to it
        self._stalled = False  # send_nowait left bytes only the writer's send_all sends
        self._write_error: str | None = None
        self._streams: dict[int, StreamEvents] = {}
        self._wake_writer = trio.Event()
        self._flushed = trio.lowlevel.ParkingLot()
        self._queued_seq = 0
        self._written_seq = 0
        self._ping_acked = trio.Event()
        self._idle = trio.Event()
        self._ready = trio.Event()  # the peer's first SETTINGS arrived
        self._nursery: trio.Nursery | None = None
        self._reply_backlog = 0  # reply bytes produced since the writer last collected
        self._closing = False
        self.closed = False
        self.close_reason = ""

    @property
    def tls(self) -> trio.abc.Stream:
        """The TLS stream underneath (peer certificate, for the config dump and tests)."""
        return self._tls

    # -- the StreamHost protocol ----------------------------------------------------

    def kick(self) -> int:
        """Flush what the engine queued (now, or via the writer); returns a sequence
        number for ``wait_flushed``."""
        self._queued_seq += 1
        if not self._deferring:
            self._flush()
        return self._queued_seq

    def _flush(self) -> None:
        tls = self._direct
        pending = self.engine.pending_output
        if (
            tls is None
            or self.closed
            or self._stalled
            or pending > DIRECT_WRITE_MAX
            or not tls.can_send_nowait
        ):
            self._wake_writer.set()
            return
        seq = self._queued_seq
        self._reply_backlog = 0
        if pending:  # (a kick with nothing queued, e.g. an acknowledge below the threshold)
            try:
                done = tls.send_nowait(self.engine.data_to_send())
            except trio.BrokenResourceError as exc:
                self._write_error, done = str(exc), False
            if not done:
                self._stalled = True
                self._wake_writer.set()
                return
        self._mark_written(seq)

    def _mark_written(self, seq: int) -> None:
        if seq > self._written_seq:
            self._written_seq = seq
        if self._flushed:  # anyone parked (unpark_all costs calls even for nobody)
            self._flushed.unpark_all()

    def flushed(self, seq: int) -> bool:
        return self._written_seq >= seq

    async def wait_flushed(self, seq: int) -> None:
        """Wait until everything queued before ``kick()`` returned ``seq`` is written."""
        if self._written_seq >= seq:
            await trio.lowlevel.checkpoint()  # already on the socket; still a checkpoint
            return
        while self._written_seq < seq and not self.closed:
            await self._flushed.park()
        if self._written_seq < seq:
            raise trio.BrokenResourceError(f"HBONE connection closed: {self.close_reason}")

    def stream_finished(self, stream: StreamEvents) -> None:
        if self._streams.get(stream.stream_id) is stream:
            del self._streams[stream.stream_id]
            if not self._streams:
                self._idle.set()
                self._idle = trio.Event()
                self._on_idle()

    # -- state --------------------------------------------------------------------

    @property
    def active_streams(self) -> int:
        return len(self._streams)

    @property
    def is_closed(self) -> bool:
        return self.closed or self._closing

    # -- lifetime -----------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED) -> None:
        """Drive the connection until it closes.

        Calls ``task_status.started(self)`` (a client only once the peer's SETTINGS
        arrived, so ``max_streams`` is known); raises ConnectionGoneError if the
        connection dies before that. Afterwards its end is not an error.
        """
        started = False
        failure: Exception | None = None
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._reader)
                nursery.start_soon(self._writer)
                if self.settings.ping_interval:
                    nursery.start_soon(self._keepalive)
                self._start_role_tasks(nursery)
                self.kick()  # preface and SETTINGS
                if self._started_after_settings:
                    await self._ready.wait()
                if not self.closed:
                    task_status.started(self)
                    started = True
        except Exception as exc:
            # Whatever a peer provokes (or a bug we missed) ends this connection
            # only; it must never escape into the pool's or listener's nursery.
            failure = exc
            log.exception("connection failed")
            self._mark_closed(f"internal error: {exc!r}")
        finally:
            self._mark_closed(self.close_reason or "connection closed")
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(self._tls)
            self.engine.release()  # the reader is gone: no frame can arrive now
            global _ended
            _ended += 1
        if not started:
            raise ConnectionGoneError(f"HTTP/2 handshake failed: {self.close_reason}") from failure

    def abort(self, reason: str) -> None:
        """Drop the connection now (no GOAWAY); open streams become broken."""
        self._mark_closed(reason)
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()

    def close(self, code: int = ErrorCode.NO_ERROR, reason: str = "closed") -> None:
        """Send the final GOAWAY (bounded flush), then end the connection."""
        if self._closing or self.closed:
            return
        self._closing = True
        self.close_reason = reason
        self.engine.close(code)
        seq = self.kick()
        if self._nursery is not None:
            self._nursery.start_soon(self._finish_after_flush, seq)

    async def _finish_after_flush(self, seq: int) -> None:
        with trio.move_on_after(CLOSE_FLUSH_TIMEOUT):
            with contextlib.suppress(trio.BrokenResourceError):
                await self.wait_flushed(seq)
        self.abort(self.close_reason)

    def _mark_closed(self, reason: str) -> None:
        if self.closed:
            return
        self.closed = True
        self.close_reason = self.close_reason or reason
        for stream in list(self._streams.values()):
            stream.connection_lost(self.close_reason)
        self._streams.clear()
        self._flushed.unpark_all()
        self._idle.set()
        self._ready.set()

    def _on_idle(self) -> None:
        """Hook: the last open stream finished."""

    def _limit_hit(self, limit: str, message: str, **fields: object) -> None:
        """Count every hit; log the first of each limit on this connection (a flood must
        not become a log flood)."""
        if self._on_limit is not None:
            self._on_limit(limit)
        if limit not in self._limits_logged:
            self._limits_logged.add(limit)
            log.warning(message, limit=limit, **fields)

    # -- tasks ----------------------------------------------------------------------

    async def _writer(self) -> None:
        while True:
            await self._wake_writer.wait()
            self._wake_writer = trio.Event()
            seq, data = self._queued_seq, self.engine.data_to_send()
            self._reply_backlog = 0
            if self._write_error is not None:
                self.abort(f"write failed: {self._write_error}")
                return
            if data or self._stalled:
                try:
                    await self._tls.send_all(data)
                except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                    self.abort(f"write failed: {exc}")
                    return
                self._stalled = False
            self._mark_written(seq)

    def _start_role_tasks(self, nursery: trio.Nursery) -> None:
        """Hook: role-specific tasks in the connection's nursery."""

    def _after_turn(self) -> None:
        """Hook: the events of one reader turn were dispatched."""

    async def _reader(self) -> None:
        turn = self.settings.frames_per_turn
        while True:
            try:
                data = await self._tls.receive_some(RECEIVE_SIZE)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                self.abort(f"read failed: {exc}")
                return
            if not data:
                self.abort("peer closed the connection")
                return
            if not self._take_turn(data, turn):
                return
            while self.engine.input_pending:
                # Fairness: a read full of small frames (a flood) is handled a turn at a
                # time, and every other task of the agent runs once between turns.
                await trio.lowlevel.checkpoint()
                if not self._take_turn(b"", turn):
                    return

    def _take_turn(self, data: bytes | bytearray, max_frames: int) -> bool:
        """Feed the engine up to ``max_frames`` frames, dispatch, flush; False once the
        connection was dropped for not reading."""
        before = self.engine.pending_output
        self._deferring = True  # one flush per turn, after the backlog check
        try:
            for event in self.engine.receive_data(data, max_frames):
                self._dispatch(event)
        finally:
            self._deferring = False
        self._after_turn()
        self._reply_backlog += self.engine.pending_output - before
        if self._reply_backlog > self.settings.max_unsent_bytes:
            self._limit_hit(
                Limit.UNSENT_BYTES,
                "peer not reading, dropping connection",
                unsent_bytes=self._reply_backlog,
            )
            self.abort("peer not reading")
            return False
        self.kick()
        return True

    async def _keepalive(self) -> None:
        interval, timeout = self.settings.ping_interval, self.settings.ping_timeout
        assert interval is not None
        while True:
            await trio.sleep(interval)
            self.engine.ping()
            self.kick()
            with trio.move_on_after(timeout) as scope:
                await self._ping_acked.wait()
            if scope.cancelled_caught:
                log.info("no PING ack, dropping connection", timeout_seconds=timeout)
                self.abort("ping timeout")
                return

    # -- events -----------------------------------------------------------------------

    def _dispatch(self, event: Event) -> None:
        if isinstance(event, Data):
            target = self._streams.get(event.stream_id)
            if target is None:
                self.engine.acknowledge(event.stream_id, len(event.data))
            else:
                target.deliver_data(event.data)
        elif isinstance(event, StreamEnded):
            if (stream := self._streams.get(event.stream_id)) is not None:
                stream.deliver_end()
        elif isinstance(event, StreamReset):
            if (stream := self._streams.get(event.stream_id)) is not None:
                stream.deliver_reset(event.error_code)
        elif isinstance(event, WindowOpened):
            self._on_window(event.stream_id)
        elif isinstance(event, SettingsChanged):
            self._ready.set()
        elif isinstance(event, PingAcked):
            self._ping_acked.set()
            self._ping_acked = trio.Event()
        elif isinstance(event, GoAwayReceived):
            self._on_goaway(event)
        elif isinstance(event, ConnectionClosed):
            if event.limit is not None:
                self._limit_hit(
                    event.limit, "peer exceeded a limit, closing connection", reason=event.reason
                )
                self.close(event.error_code, f"limit exceeded: {event.reason}")
            else:
                log.info("peer protocol error, closing connection", reason=event.reason)
                self.close(event.error_code, f"protocol error: {event.reason}")
        else:
            self._dispatch_role(event)

    def _dispatch_role(self, event: Event) -> None:
        """Role-specific events (ConnectRequest / Response)."""

    def _on_window(self, stream_id: int | None) -> None:
        if stream_id is None:
            for each in self._streams.values():
                each.deliver_window()
        elif (stream := self._streams.get(stream_id)) is not None:
            stream.deliver_window()

    def _on_goaway(self, event: GoAwayReceived) -> None:
        if event.error_code != ErrorCode.NO_ERROR:
            self.abort(f"peer sent GOAWAY with error {event.error_code}")
            return
        for sid, stream in list(self._streams.items()):
            if sid > event.last_stream_id:  # never processed by the peer: as REFUSED_STREAM
                stream.deliver_reset(ErrorCode.REFUSED_STREAM)
                self.stream_finished(stream)
        if not self._streams:
            self.close(reason="peer sent GOAWAY")


# -- client ----------------------------------------------------------------------------


class HboneClientConnection(_Connection):
    """Client end of a pooled HBONE connection: opens CONNECT streams."""

    _started_after_settings = True  # the pool needs the peer's MAX_CONCURRENT_STREAMS

    def __init__(
        self,
        tls: trio.abc.Stream,
        *,
        settings: HboneSettings | None = None,
        on_limit: OnLimit | None = None,
    ) -> None:
        """``settings.connect_response_timeout`` bounds the wait for the CONNECT's answer
        (ztunnel's 10 s connect timeout): a peer that answers PINGs but not the CONNECT."""
        engine = HboneEngine(client=True, settings=settings, clock=trio.current_time)
        super().__init__(tls, engine, on_limit)
        self.opened_streams = 0

    @property
    def max_streams(self) -> int:
        """min(pool limit, peer's MAX_CONCURRENT_STREAMS), as ztunnel's pool does."""
        return min(self.settings.pool_max_streams, self.engine.peer_max_concurrent_streams)

    @property
    def accepting_streams(self) -> bool:
        return not self.is_closed and self.engine.accepting_streams

    async def open_stream(
        self, authority: str, headers: Iterable[tuple[str, str]] = ()
    ) -> HboneStream:
        """CONNECT ``authority``; returns the stream once the peer answered 200.

        Raises HboneStatusError for any other status, ConnectionGoneError if the
        connection is closed or draining (or refused the stream),
        trio.BrokenResourceError if the connection broke meanwhile, and
        trio.TooSlowError if no answer came within ``connect_response_timeout``.
        """
        if self.is_closed:
            raise ConnectionGoneError(f"connection closed: {self.close_reason}")
        stream_id = self.engine.send_connect(authority, headers)
        stream = HboneStream(self, stream_id)
        self._streams[stream_id] = stream
        self.opened_streams += 1
        self.kick()
        try:
            with trio.fail_after(self.settings.connect_response_timeout):
                status, response_headers = await stream.wait_response()
            if status != 200:
                raise HboneStatusError(status, response_headers)
        except BaseException:
            await stream.aclose()
            raise
        return stream

    def _dispatch_role(self, event: Event) -> None:
        stream = self._streams.get(getattr(event, "stream_id", 0))
        if isinstance(event, Response) and stream is not None:
            stream.deliver_response(event.status, event.headers)

    def _on_idle(self) -> None:
        if self.engine.goaway_received:
            self.close(reason="drained after GOAWAY")


# -- server ----------------------------------------------------------------------------


Handler = Callable[[ConnectRequest, HboneServerStream], Awaitable[None]]


class HboneServerConnection(_Connection):
    """Server end: runs ``handler`` per CONNECT stream in the connection's nursery."""

    def __init__(
        self,
        tls: trio.abc.Stream,
        handler: Handler,
        *,
        settings: HboneSettings | None = None,
        on_limit: OnLimit | None = None,
    ) -> None:
        engine = HboneEngine(client=False, settings=settings, clock=trio.current_time)
        super().__init__(tls, engine, on_limit)
        self._handler = handler
        self._handlers = 0  # running handler tasks, including those of reset streams
        self._last_active = 0.0  # trio time of the last stream or handler activity
        # Handlers of the previous turn and of this one, started after the next turn:
        # a CONNECT whose RST_STREAM lands in the next turn never starts its setup.
        self._deferred: list[tuple[ConnectRequest, HboneServerStream]] = []
        self._deferring_handlers: list[tuple[ConnectRequest, HboneServerStream]] = []
        self.draining = False

    def _start_role_tasks(self, nursery: trio.Nursery) -> None:
        self._last_active = trio.current_time()
        if self.settings.idle_timeout is not None:
            nursery.start_soon(self._idle_timeout, self.settings.idle_timeout)

    async def _idle_timeout(self, idle: float) -> None:
        """Close (GOAWAY) once no stream or handler was active for ``idle`` s: an
        authenticated peer must not park connections (fds, TLS state) forever."""
        while True:
            await trio.sleep_until(self._last_active + idle)
            if self._streams or self._handlers:
                self._last_active = trio.current_time()  # busy: look again a timeout later
                continue
            if trio.current_time() >= self._last_active + idle:
                self._limit_hit(Limit.IDLE_TIMEOUT, "idle connection, closing", seconds=idle)
                self.close(reason="idle timeout")
                return

    def drain(self) -> None:
        """Graceful drain: GOAWAY now, close when open streams finish or at the deadline."""
        if self.draining or self.is_closed or self._nursery is None:
            return
        self.draining = True
        self.engine.goaway()
        self.kick()
        if not self._streams:
            self.close(reason="drained")
        else:
            self._nursery.start_soon(self._drain_deadline)

    async def _drain_deadline(self) -> None:
        await trio.sleep(self.settings.drain_timeout)
        log.info("drain deadline reached, closing connection", open_streams=len(self._streams))
        self.close(reason="drain timeout")

    def _on_idle(self) -> None:
        self._last_active = trio.current_time()
        if self.draining:
            self.close(reason="drained")

    def _dispatch_role(self, event: Event) -> None:
        if isinstance(event, ConnectRequest):
            self._on_request(event)

    def _on_request(self, request: ConnectRequest) -> None:
        self._last_active = trio.current_time()
        if self.is_closed:  # a limit closed the connection earlier in this read
            return
        status, _, _ = validate_connect(request)
        if status is not None:
            # The peer may already have reset the stream in the same read.
            with contextlib.suppress(StreamClosedError):
                self.engine.respond(request.stream_id, status, end_stream=True)
            return
        if self._handlers >= self.engine.local_max_concurrent_streams:
            # h2 stops counting a stream at its reset, while its handler may still be
            # unwinding; the advertised limit applies to the work we do, too.
            self._refuse(request, Limit.CONCURRENT_STREAMS, "stream limit reached")
            return
        if self.engine.unanswered_before(request.stream_id) >= self.settings.max_pending_connects:
            self._refuse(request, Limit.PENDING_CONNECTS, "pending-connect limit reached")
            return
        stream = HboneServerStream(self, request.stream_id)
        self._streams[request.stream_id] = stream
        self._handlers += 1
        self._deferring_handlers.append((request, stream))

    def _after_turn(self) -> None:
        if not self._deferred and not self._deferring_handlers:
            return  # the steady state: no CONNECT arrived
        # Start what the previous turn received (this turn delivered its resets), and
        # this turn's too when no further turn is due.
        ready, self._deferred = self._deferred, self._deferring_handlers
        self._deferring_handlers = []
        if not self.engine.input_pending:
            ready += self._deferred
            self._deferred = []
        assert self._nursery is not None
        for request, stream in ready:
            if self.is_closed:  # a limit closed the connection: start no setup work
                self._handlers -= 1
                stream.connection_lost(self.close_reason)
                self.stream_finished(stream)
            else:
                # A constant name: trio would format one string per stream.
                self._nursery.start_soon(self._run_handler, request, stream, name="hbone stream")

    def _refuse(self, request: ConnectRequest, limit: str, message: str) -> None:
        self._limit_hit(limit, f"{message}, refusing streams", stream_id=request.stream_id)
        if (closed := self.engine.refuse(request.stream_id)) is not None:
            self._dispatch(closed)  # refused too many: the connection goes

    async def _run_handler(self, request: ConnectRequest, stream: HboneServerStream) -> None:
        try:
            with stream.handler_scope:
                if stream.state is StreamState.RESET:  # HEADERS and RST_STREAM in one read
                    return
                await self._handler(request, stream)
                if not stream.responded and not stream.closed and not self.closed:
                    await stream.respond(503)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        except Exception:
            log.exception("stream handler failed", authority=request.authority)
            stream.reset(ErrorCode.INTERNAL_ERROR)
        finally:
            self._handlers -= 1
            self._last_active = trio.current_time()
            await stream.aclose()


async def serve_hbone(
    tls: trio.abc.Stream,
    handler: Handler,
    *,
    settings: HboneSettings | None = None,
    on_connection: Callable[[HboneServerConnection], object] | None = None,
    on_close: Callable[[HboneServerConnection], object] | None = None,
    on_limit: OnLimit | None = None,
    task_status: trio.TaskStatus[HboneServerConnection] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve HBONE on an accepted TLS stream until the connection ends.

    ``task_status.started(conn)`` (and ``on_connection(conn)``) hand out the
    connection, whose ``drain()`` starts a graceful shutdown; ``on_close(conn)``
    runs when it ends; ``on_limit(name)`` is called for each limit the peer hits.
    ``settings`` defaults to ztunnel's. Protocol-level 400s (validate_connect) are
    answered here; every other stream goes to ``handler``.
    """
    conn = HboneServerConnection(tls, handler, settings=settings, on_limit=on_limit)
    if on_connection is not None:
        on_connection(conn)
    try:
        await conn.run(task_status=task_status)
    finally:
        if on_close is not None:
            on_close(conn)


__all__ = [
    "ConnectRequest",
    "ConnectionGoneError",
    "Handler",
    "HboneClientConnection",
    "HboneServerConnection",
    "HboneServerStream",
    "HboneStatusError",
    "Headers",
    "OnLimit",
    "ended_connections",
    "serve_hbone",
]
