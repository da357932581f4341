"""The trio driver of one HTTP/2 connection (server side towards clients, client side
towards upstream apps), built on the sans-IO ``H2Protocol``.

Theory of operation, as ``hbone.connection``: a **reader** task feeds received
bytes to the protocol and dispatches events to streams; it never waits on
writes (a reader blocked on a full socket while the peer waits for us
deadlocks). A **writer** task sends what the protocol queued; ``kick()``
returns a sequence number that ``wait_flushed`` waits on, which gives stream
writes socket backpressure. Replies the peer provokes (PING/SETTINGS ACKs,
RST_STREAMs) that pile up unsent past ``MAX_UNSENT_REPLIES`` drop the
connection: a peer that writes without reading must not grow our memory.

Flow control: a stream releases the window of a received chunk only when its
consumer asks for the next one, i.e. after the chunk was written onward.

Server role: each request runs ``handler(stream)`` in the connection's nursery
inside a cancel scope that a peer reset cancels while no response was sent
(rapid-reset floods cannot keep upstream work alive); handlers beyond
``max_concurrent_streams`` (h2 stops counting a reset stream at once) are
refused with REFUSED_STREAM.
"""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

import structlog
import trio

from ztunnel.hbone.events import ErrorCode
from ztunnel.waypoint.errors import WaypointError
from ztunnel.waypoint.h2proto import (
    BadRequest,
    ConnectionFailed,
    DataReceived,
    Event,
    GoAwayReceived,
    H2Limits,
    H2Protocol,
    InformationalReceived,
    RequestReceived,
    ResponseReceived,
    StreamEnded,
    StreamGone,
    StreamReset,
    TrailersReceived,
    WindowOpened,
)
from ztunnel.waypoint.messages import Headers, RequestHead, ResponseHead

log = structlog.get_logger("ztunnel.waypoint.h2")

RECEIVE_SIZE = 64 * 1024
MAX_UNSENT_REPLIES = 1024 * 1024
CLOSE_FLUSH_TIMEOUT = 1.0


class H2StreamError(WaypointError):
    """The stream was reset (``code``) or its connection was lost (``code`` None)."""

    def __init__(self, message: str, code: int | None = None) -> None:
        self.code = code
        super().__init__(message)

    @property
    def refused(self) -> bool:
        return self.code == ErrorCode.REFUSED_STREAM


class H2Stream:
    """One HTTP/2 exchange (either side)."""

    def __init__(self, conn: H2Connection, stream_id: int) -> None:
        self._conn = conn
        self.stream_id = stream_id
        self.request: RequestHead | None = None
        self.response: ResponseHead | None = None
        self.trailers: Headers = ()
        self._chunks: deque[bytes] = deque()
        self._unacked = 0
        self._ended = False  # the peer sent END_STREAM
        self._sent_end = False
        self._reset: int | None = None
        self._lost: str | None = None
        self._changed = trio.Event()
        self.responded = False
        self.headers_only = False  # the request/response head carried END_STREAM
        self.handler_scope = trio.CancelScope()

    # -- events from the reader ----------------------------------------------------------------

    def _wake(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def _on_response(self, head: ResponseHead, end: bool) -> None:
        self.response = head
        self._ended = self._ended or end
        self._wake()

    def _on_data(self, data: bytes) -> None:
        self._chunks.append(data)
        self._wake()

    def _on_trailers(self, headers: Headers) -> None:
        self.trailers = headers
        self._wake()

    def _on_end(self) -> None:
        self._ended = True
        self._wake()
        self._maybe_done()

    def _on_reset(self, code: int) -> None:
        self._reset = code
        self._wake()
        if not self.responded:
            self.handler_scope.cancel()
        self._conn._stream_done(self)

    def _on_lost(self, reason: str) -> None:
        self._lost = reason
        self._wake()

    def _maybe_done(self) -> None:
        if self._ended and self._sent_end:
            self._conn._stream_done(self)

    def _check(self) -> None:
        if self._reset is not None:
            raise H2StreamError(f"stream reset (code {self._reset})", self._reset)
        if self._lost is not None:
            raise H2StreamError(f"connection lost: {self._lost}")

    # -- receive ---------------------------------------------------------------------------------

    @property
    def ended(self) -> bool:
        return self._ended

    async def receive_response(self) -> ResponseHead:
        """Client: the final response head (informational ones are skipped)."""
        while self.response is None:
            self._check()
            await self._changed.wait()
        return self.response

    async def receive_data(self) -> bytes:
        """The next body chunk, b"" at END_STREAM; releases the previous chunk's window."""
        self._release()
        while True:
            if self._chunks:
                chunk = self._chunks.popleft()
                self._unacked = len(chunk)
                await trio.lowlevel.checkpoint()
                return chunk
            if self._ended:
                await trio.lowlevel.checkpoint()
                return b""
            self._check()
            await self._changed.wait()

    def _release(self) -> None:
        if self._unacked:
            self._conn.protocol.acknowledge(self.stream_id, self._unacked)
            self._unacked = 0
            self._conn.kick()

    # -- send ------------------------------------------------------------------------------------

    async def send_response(self, head: ResponseHead, *, end_stream: bool = False) -> None:
        self._check()
        try:
            self._conn.protocol.send_response(self.stream_id, head, end_stream=end_stream)
        except StreamGone as exc:
            raise H2StreamError(str(exc)) from exc
        self.responded = True
        await self._sent(end_stream)

    async def send_data(self, data: bytes) -> None:
        view = memoryview(data)
        seq = None
        while view:
            self._check()
            try:
                taken = self._conn.protocol.send_data(self.stream_id, view)
            except StreamGone as exc:
                raise H2StreamError(str(exc)) from exc
            if taken:
                view = view[taken:]
                seq = self._conn.kick()
            else:
                await self._changed.wait()
        if seq is not None:
            await self._conn.wait_flushed(seq)
        self._check()

    async def send_trailers(self, headers: Headers) -> None:
        self._check()
        try:
            self._conn.protocol.send_trailers(self.stream_id, headers)
        except StreamGone as exc:
            raise H2StreamError(str(exc)) from exc
        await self._sent(True)

    async def send_end(self) -> None:
        if self._sent_end:
            return
        self._check()
        try:
            self._conn.protocol.end_stream(self.stream_id)
        except StreamGone as exc:
            raise H2StreamError(str(exc)) from exc
        await self._sent(True)

    async def _sent(self, end: bool) -> None:
        if end:
            self._sent_end = True
        await self._conn.wait_flushed(self._conn.kick())
        if end:
            self._maybe_done()

    def reset(self, code: int = ErrorCode.CANCEL) -> None:
        """RST_STREAM unless the stream already finished; releases unread window."""
        if not (self._ended and self._sent_end) and self._reset is None:
            self._conn.protocol.reset(self.stream_id, code)
            self._reset = code
        pending = self._unacked + sum(len(c) for c in self._chunks)
        self._chunks.clear()
        self._unacked = 0
        self._conn.protocol.acknowledge(self.stream_id, pending)
        self._conn.kick()
        self._conn._stream_done(self)


StreamHandler = Callable[[H2Stream], Awaitable[None]]


class H2Connection:
    """Drive one HTTP/2 connection over ``transport`` until it closes."""

    def __init__(
        self,
        transport: trio.abc.Stream,
        *,
        client: bool,
        limits: H2Limits | None = None,
        handler: StreamHandler | None = None,
        idle_timeout: float | None = None,
    ) -> None:
        self.protocol = H2Protocol(client=client, limits=limits)
        self.client = client
        self._transport = transport
        self._handler = handler
        self._idle_timeout = idle_timeout
        self._streams: dict[int, H2Stream] = {}
        self._handlers = 0
        self._wake_writer = trio.Event()
        self._flushed = trio.lowlevel.ParkingLot()
        self._queued = 0
        self._written = 0
        self._reply_backlog = 0
        self._nursery: trio.Nursery | None = None
        self._idle = trio.Event()
        self._last_activity = 0.0
        self.closed = False
        self._closing = False
        self.close_reason = ""
        self.opened_streams = 0

    # -- state -----------------------------------------------------------------------------------

    @property
    def active_streams(self) -> int:
        return len(self._streams)

    @property
    def accepting_streams(self) -> bool:
        return not self.closed and self.protocol.accepting_streams

    @property
    def max_streams(self) -> int:
        return self.protocol.peer_max_concurrent_streams

    def _stream_done(self, stream: H2Stream) -> None:
        if self._streams.get(stream.stream_id) is stream:
            del self._streams[stream.stream_id]
            self._last_activity = trio.current_time()
            if not self._streams:
                self._idle.set()
                self._idle = trio.Event()
                if self.protocol.draining or self.protocol.goaway_received:
                    self.close(reason="drained")

    # -- writing ---------------------------------------------------------------------------------

    def kick(self) -> int:
        self._queued += 1
        self._wake_writer.set()
        return self._queued

    async def wait_flushed(self, seq: int) -> None:
        while self._written < seq and not self.closed:
            await self._flushed.park()
        if self._written < seq:
            raise H2StreamError(f"connection closed: {self.close_reason}")
        await trio.lowlevel.checkpoint()

    async def _writer(self) -> None:
        while True:
            await self._wake_writer.wait()
            self._wake_writer = trio.Event()
            seq, data = self._queued, self.protocol.data_to_send()
            self._reply_backlog = 0
            if data:
                try:
                    await self._transport.send_all(data)
                except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                    self.abort(f"write failed: {exc}")
                    return
            self._written = max(self._written, seq)
            self._flushed.unpark_all()

    # -- lifetime --------------------------------------------------------------------------------

    async def run(
        self, *, task_status: trio.TaskStatus[H2Connection] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Serve until the connection ends; its end is never an error for the caller."""
        self._last_activity = trio.current_time()
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._reader)
                nursery.start_soon(self._writer)
                if self._idle_timeout:
                    nursery.start_soon(self._idle_watch)
                self.kick()  # preface and SETTINGS
                task_status.started(self)
        finally:
            self._mark_closed(self.close_reason or "connection closed")
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(self._transport)

    async def open_stream(self, head: RequestHead, *, end_stream: bool) -> H2Stream:
        """Client: send a request head; the stream is registered before any await."""
        if not self.accepting_streams:
            raise H2StreamError(f"connection not accepting streams: {self.close_reason}")
        try:
            sid = self.protocol.send_request(head, end_stream=end_stream)
        except StreamGone as exc:
            raise H2StreamError(str(exc)) from exc
        stream = H2Stream(self, sid)
        stream.request = head
        stream._sent_end = end_stream
        self._streams[sid] = stream
        self.opened_streams += 1
        await self.wait_flushed(self.kick())
        return stream

    def drain(self) -> None:
        """Graceful GOAWAY; close once the open streams finish."""
        if self.closed:
            return
        self.protocol.drain()
        self.kick()
        if not self._streams:
            self.close(reason="drained")

    def close(self, code: int = ErrorCode.NO_ERROR, reason: str = "closed") -> None:
        """Final GOAWAY (bounded flush), then drop the connection."""
        if self.closed or self._closing:
            return
        self._closing = True
        self.close_reason = self.close_reason or reason
        self.protocol.close(code)
        seq = self.kick()
        if self._nursery is not None:
            self._nursery.start_soon(self._finish, seq)

    async def _finish(self, seq: int) -> None:
        with trio.move_on_after(CLOSE_FLUSH_TIMEOUT):
            with contextlib.suppress(H2StreamError):
                await self.wait_flushed(seq)
        self.abort(self.close_reason)

    def abort(self, reason: str) -> None:
        self._mark_closed(reason)
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()

    def _mark_closed(self, reason: str) -> None:
        if self.closed and not self._streams:
            return
        self.closed = True
        self.close_reason = self.close_reason or reason
        for stream in list(self._streams.values()):
            stream._on_lost(self.close_reason)
        self._streams.clear()
        self._flushed.unpark_all()
        self._idle.set()

    async def _idle_watch(self) -> None:
        assert self._idle_timeout is not None
        while True:
            await trio.sleep(self._idle_timeout / 4)
            idle_for = trio.current_time() - self._last_activity
            if not self._streams and not self._handlers and idle_for >= self._idle_timeout:
                self.close(reason="idle timeout")
                return

    # -- reading ---------------------------------------------------------------------------------

    async def _reader(self) -> None:
        while True:
            try:
                data = await self._transport.receive_some(RECEIVE_SIZE)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                self.abort(f"read failed: {exc}")
                return
            if not data:
                self.abort("peer closed the connection")
                return
            self._last_activity = trio.current_time()
            before = self.protocol.pending_output
            for event in self.protocol.receive_data(bytes(data)):
                self._dispatch(event)
            self._reply_backlog += max(0, self.protocol.pending_output - before)
            if self._reply_backlog > MAX_UNSENT_REPLIES:
                log.info("h2 peer not reading", unsent_reply_bytes=self._reply_backlog)
                self.abort("peer not reading")
                return
            self.kick()

    def _dispatch(self, event: Event) -> None:
        sid = getattr(event, "stream_id", None)
        stream = self._streams.get(sid) if sid is not None else None
        if isinstance(event, DataReceived):
            if stream is None:
                self.protocol.acknowledge(event.stream_id, event.flow_controlled_length)
            else:
                stream._on_data(event.data)
        elif isinstance(event, StreamEnded):
            if stream is not None:
                stream._on_end()
        elif isinstance(event, TrailersReceived):
            if stream is not None:
                stream._on_trailers(event.headers)
        elif isinstance(event, ResponseReceived):
            if stream is not None:
                stream._on_response(event.head, event.end_stream)
        elif isinstance(event, StreamReset):
            if stream is not None:
                stream._on_reset(event.error_code)
        elif isinstance(event, WindowOpened):
            targets = self._streams.values() if event.stream_id is None else [stream]
            for each in list(targets):
                if each is not None:
                    each._wake()
        else:
            self._dispatch_rest(event)

    def _dispatch_rest(self, event: Event) -> None:
        if isinstance(event, RequestReceived):
            self._on_request(event)
        elif isinstance(event, BadRequest):
            self._spawn(self._answer_bad, event)
        elif isinstance(event, GoAwayReceived):
            self._on_goaway(event)
        elif isinstance(event, ConnectionFailed):
            log.info("h2 protocol error from peer", reason=event.reason)
            self.close_reason = f"protocol error: {event.reason}"
            self.close(event.error_code, self.close_reason)
        elif isinstance(event, InformationalReceived):
            pass  # 1xx before the final response: not forwarded

    def _on_goaway(self, event: GoAwayReceived) -> None:
        if event.error_code != ErrorCode.NO_ERROR:
            self.abort(f"peer sent GOAWAY with error {event.error_code}")
            return
        for sid, stream in list(self._streams.items()):
            if self.client and sid > event.last_stream_id:
                stream._on_reset(ErrorCode.REFUSED_STREAM)  # never processed: retryable
        if not self._streams:
            self.close(reason="peer sent GOAWAY")

    def _on_request(self, event: RequestReceived) -> None:
        if self._handler is None:
            self.protocol.reset(event.stream_id, ErrorCode.REFUSED_STREAM)
            return
        if self._handlers >= self.protocol.limits.max_concurrent_streams:
            self.protocol.reset(event.stream_id, ErrorCode.REFUSED_STREAM)
            return
        stream = H2Stream(self, event.stream_id)
        stream.request = event.head
        stream._ended = stream.headers_only = event.end_stream
        self._streams[event.stream_id] = stream
        self._handlers += 1  # counted from the spawn: handlers of reset streams still count
        self._spawn(self._run_handler, stream)

    def _spawn(self, fn: Callable[..., Awaitable[None]], *args: Any) -> None:
        assert self._nursery is not None
        self._nursery.start_soon(fn, *args)

    async def _run_handler(self, stream: H2Stream) -> None:
        assert self._handler is not None
        try:
            with stream.handler_scope:
                await self._handler(stream)
        except H2StreamError:
            pass
        finally:
            self._handlers -= 1
            if not stream._sent_end or not stream._ended:
                stream.reset(ErrorCode.NO_ERROR if stream._sent_end else ErrorCode.CANCEL)
            self._stream_done(stream)

    async def _answer_bad(self, event: BadRequest) -> None:
        stream = H2Stream(self, event.stream_id)
        self._streams[event.stream_id] = stream
        try:
            body = f"{event.reason}\n".encode()
            head = ResponseHead(
                event.status,
                (("content-type", "text/plain"), ("content-length", str(len(body)))),
            )
            await stream.send_response(head)
            await stream.send_data(body)
            await stream.send_end()
        except H2StreamError:
            pass
        finally:
            stream.reset(ErrorCode.NO_ERROR)
