"""One HBONE CONNECT stream as a ``trio.abc.HalfCloseableStream``.

Theory of operation: the connection's reader task hands what arrives to the
stream through ``StreamEvents`` (``deliver_*``, ``connection_lost``); the stream's
own calls go to the shared engine and ask the connection to flush (``StreamHost``).
Neither side touches the other's private members.

State: one ``StreamState`` (RFC 9113 §5.1, transitions owned by the engine: the
stream takes the engine's answer to its own operations and applies the engine's
rules to what is delivered), plus the received chunks. END_STREAM, and a reset the
peer meant as EOF, queue an empty chunk behind the data, so what arrived before a
later reset or connection loss is still read in order, EOF included. Once the
stream cannot be used any more (closed by us, reset with an error, connection
lost) ``_fault`` says why; the first cause wins, ``aclose`` overrides it.

Flow control: ``receive_some`` releases the window for the bytes of the
*previous* chunk on the next call (or on ``aclose``). A relay calls
``receive_some`` only after it wrote the last chunk onward, so a slow consumer
holds at most one stream window (4 MiB) of unacknowledged data and the sender
stops, exactly the backpressure ztunnel gets from ``release_capacity``.
A relay may set ``direct_sink`` (a non-blocking write onward): while its
``receive_some`` is parked with nothing queued, the reader hands each DATA frame
(up to that call's ``max_bytes``) to the sink and releases the window for exactly
the bytes it wrote; the rest is queued as usual.

EOF: ``receive_some`` returns b"" only at END_STREAM or RST_STREAM NO_ERROR/CANCEL
(ztunnel treats those resets as EOF); any other reset or a lost connection is
``trio.BrokenResourceError``. ``send_eof`` sends END_STREAM; ``aclose`` resets the
stream with CANCEL unless both directions already finished.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

import trio

from ztunnel.hbone.engine import HboneEngine, StreamState
from ztunnel.hbone.errors import (
    ConnectionGoneError,
    HboneError,
    StreamClosedError,
    StreamRefusedError,
)
from ztunnel.hbone.events import EOF_RESET_CODES, ErrorCode, Headers

DEFAULT_RECEIVE_SIZE = 256 * 1024
_EOF = b""  # queued after the last chunk; never consumed, so EOF is read again


class StreamHost(Protocol):
    """What a stream needs from its connection driver."""

    @property
    def engine(self) -> HboneEngine: ...

    def kick(self) -> int: ...

    def flushed(self, seq: int) -> bool:
        """Everything queued before ``kick()`` returned ``seq`` is written."""
        ...

    async def wait_flushed(self, seq: int) -> None: ...

    def stream_finished(self, stream: StreamEvents) -> None: ...


class StreamEvents(Protocol):
    """What a connection driver calls on its streams (from its reader task)."""

    @property
    def stream_id(self) -> int: ...

    @property
    def state(self) -> StreamState: ...

    def deliver_data(self, data: bytes) -> None:
        """A DATA payload arrived (the stream acknowledges it once consumed)."""

    def deliver_end(self) -> None:
        """The peer's END_STREAM arrived."""

    def deliver_reset(self, code: int) -> None:
        """RST_STREAM arrived (or h2 reset the stream on a peer's error)."""

    def deliver_window(self) -> None:
        """Send window may have grown."""

    def deliver_response(self, status: int, headers: Headers) -> None:
        """Client side: the answer to our CONNECT."""

    def connection_lost(self, reason: str) -> None:
        """The connection is gone (or refused the stream by GOAWAY)."""


@dataclass(frozen=True, slots=True)
class _Fault:
    """Why a stream refuses further I/O."""

    message: str
    closed: bool = False  # closed on our side: ClosedResourceError, else BrokenResourceError
    lost: str | None = None  # the connection's close reason, when that is the cause

    def error(self) -> trio.ClosedResourceError | trio.BrokenResourceError:
        if self.closed:
            return trio.ClosedResourceError(self.message)
        return trio.BrokenResourceError(self.message)


_CLOSED = _Fault("HBONE stream was closed", closed=True)


class HboneStream(trio.abc.HalfCloseableStream):
    """A CONNECT stream; ``response_headers`` holds the peer's response (client side)."""

    # One per open connection (10,000s held open): no per-instance __dict__.
    __slots__ = (
        "_changed",
        "_fault",
        "_host",
        "_inbound",
        "_receiving",
        "_reset_code",
        "_sending",
        "_sink_limit",
        "_state",
        "_unacked",
        "_unflushed",
        "direct_sink",
        "response_headers",
        "response_status",
        "stream_id",
    )

    def __init__(self, host: StreamHost, stream_id: int) -> None:
        self._host = host
        self.stream_id = stream_id  # read-only by contract (StreamEvents); an attribute for speed
        self.response_status: int | None = None
        self.response_headers: Headers = ()
        self._state = StreamState.OPEN  # a stream object is made for an open stream
        self._reset_code: int | None = None
        self._fault: _Fault | None = None
        # Data chunks, then _EOF. A list: an empty deque is ~600 bytes per stream (its
        # first block), and the queue is short (a few frames while the reader is behind).
        self._inbound: list[bytes] = []
        self._unacked = 0
        self._unflushed = 0  # the kick() sequence number of the last send_nowait
        self._changed = trio.Event()  # data, EOF, reset, window or response arrived
        self._receiving = False
        self._sending = False
        # Set by a relay: writes bytes onward without blocking, returns how many it
        # wrote. Used only while receive_some is parked with nothing queued.
        self.direct_sink: Callable[[bytes], int] | None = None
        self._sink_limit = 0  # the parked receive_some's max_bytes; 0: not parked

    # -- read-only state ------------------------------------------------------------

    @property
    def state(self) -> StreamState:
        """The stream's HTTP/2 state as this end last saw it."""
        return self._state

    @property
    def reset_code(self) -> int | None:
        """The error code of the RST_STREAM that ended the stream, if one did."""
        return self._reset_code

    @property
    def closed(self) -> bool:
        """``aclose`` was called."""
        return self._fault is _CLOSED

    @property
    def peer_error(self) -> str | None:
        """Why the *peer* broke the stream (an error reset, its connection lost), or None.

        Lets a relay cancelled together with a dying connection still say who ended it.
        """
        fault = self._fault
        if (
            fault is not None
            and not fault.closed
            and (fault.lost is not None or self._reset_code is not None)
        ):
            return fault.message
        if self._reset_code is not None:
            # RST_STREAM(CANCEL or NO_ERROR) reads as EOF, so it leaves no fault, and the
            # stream is finished, so the connection's end does not reach it either: a relay
            # cut off afterwards was still ended by the peer.
            return f"HBONE stream reset by peer (code {self._reset_code})"
        return None

    @property
    def finished(self) -> bool:
        """Both directions ended cleanly, or the stream was reset."""
        return self._state.finished

    # -- StreamEvents: called by the connection's reader task ----------------------

    def _wake(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def deliver_data(self, data: bytes) -> None:
        if self._sink_limit and len(data) <= self._sink_limit and not self._inbound:
            data = self._deliver_directly(data)
            if not data:
                return
        self._inbound.append(data)
        self._wake()

    def _deliver_directly(self, data: bytes) -> bytes:
        """The consumer waits with everything earlier written onward: hand ``data``
        to its sink from the reader (no task switch) and release the window for what
        the sink wrote, exactly as receive_some would after the write. Returns the rest."""
        assert self.direct_sink is not None
        written = self.direct_sink(data)
        if written:
            self._host.engine.acknowledge(self.stream_id, written)
            self._host.kick()  # deferred to the end of the reader's dispatch
        return data[written:]

    def deliver_end(self) -> None:
        self._state = self._state.after_remote_end()
        self._queue_eof()
        self._wake()
        self._maybe_finished()

    def deliver_reset(self, code: int) -> None:
        self._state = self._state.after_reset()
        self._reset_code = code
        if code in EOF_RESET_CODES:
            self._queue_eof()
        elif self._fault is None:
            self._fault = _Fault(f"HBONE stream reset by peer (code {code})")
        self._wake()
        self._host.stream_finished(self)

    def deliver_window(self) -> None:
        self._wake()

    def deliver_response(self, status: int, headers: Headers) -> None:
        self.response_status, self.response_headers = status, headers
        self._wake()

    def connection_lost(self, reason: str) -> None:
        if self._fault is None:
            self._fault = _Fault(f"HBONE connection lost: {reason}", lost=reason)
        self._wake()

    def _queue_eof(self) -> None:
        if not self._inbound or self._inbound[-1]:
            self._inbound.append(_EOF)

    def _maybe_finished(self) -> None:
        if self._state.finished:
            self._host.stream_finished(self)

    def _check_usable(self) -> None:
        if self._fault is not None:
            raise self._fault.error()

    # -- client side --------------------------------------------------------------

    async def wait_response(self) -> tuple[int, Headers]:
        """Wait for the answer to our CONNECT: (status, headers).

        Raises ConnectionGoneError if the stream is reset or its connection lost first
        (StreamRefusedError when the peer refused it unprocessed: safe to retry).
        """
        while self.response_status is None:
            if self._reset_code == ErrorCode.REFUSED_STREAM:
                raise StreamRefusedError("stream refused by the peer (REFUSED_STREAM or GOAWAY)")
            if self._reset_code is not None:
                raise ConnectionGoneError(f"stream refused (reset code {self._reset_code})")
            if self._fault is not None and self._fault.lost is not None:
                raise ConnectionGoneError(f"connection lost before response: {self._fault.lost}")
            await self._changed.wait()
        return self.response_status, self.response_headers

    # -- receive ------------------------------------------------------------------

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        """Next chunk (at most ``max_bytes``); releases the window of the previous one."""
        if max_bytes is not None and operator.index(max_bytes) < 1:
            raise ValueError("max_bytes must be >= 1")
        if self._receiving:
            raise trio.BusyResourceError("another task is receiving on this stream")
        self._receiving = True
        try:
            self._release_previous()
            while True:
                if self._fault is _CLOSED:
                    raise trio.ClosedResourceError("HBONE stream was closed")
                if self._inbound:
                    await trio.lowlevel.checkpoint()
                    return self._take(max_bytes or DEFAULT_RECEIVE_SIZE)
                self._check_usable()
                if self.direct_sink is not None:
                    self._sink_limit = max_bytes or DEFAULT_RECEIVE_SIZE
                try:
                    await self._changed.wait()
                finally:
                    self._sink_limit = 0
        finally:
            self._receiving = False

    def _take(self, max_bytes: int) -> bytes:
        chunk = self._inbound.pop(0)
        if len(chunk) > max_bytes:
            self._inbound.insert(0, chunk[max_bytes:])
            chunk = chunk[:max_bytes]
        elif not chunk:
            self._inbound.insert(0, chunk)  # EOF stays: later calls read EOF again
        self._unacked = len(chunk)
        return chunk

    def _release_previous(self) -> None:
        if self._unacked:
            self._host.engine.acknowledge(self.stream_id, self._unacked)
            self._unacked = 0
            self._host.kick()

    # -- send ---------------------------------------------------------------------

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        """Send ``data``, waiting for flow-control window and for the bytes to be written."""
        if self._sending:
            raise trio.BusyResourceError("another task is sending on this stream")
        self._sending = True
        try:
            self._check_send()
            view = memoryview(data)
            seq = None
            while view:
                sent = self._queue(view)
                if sent > 0:  # never step backwards, whatever the engine says
                    view = view[sent:]
                    seq = self._host.kick()
                else:
                    await self._changed.wait()
                    self._check_send()
            if seq is None:
                await trio.lowlevel.checkpoint()
            else:
                await self._host.wait_flushed(seq)
                self._check_usable()
        finally:
            self._sending = False

    def send_nowait(self, data: bytes | memoryview) -> int:
        """Queue what the flow-control window takes of ``data`` now and ask the
        connection to write it, without waiting; returns the bytes taken (0 when the
        stream cannot send, a send is in progress, or the previous ``send_nowait`` is
        not written yet: the caller then uses ``send_all``, which raises or waits).

        For a copy loop whose reads checkpoint: saves ``send_all``'s checkpoint, a
        task step per chunk. Backpressure holds: at most one chunk is queued unwritten.
        """
        if self._sending or self._fault is not None or not self._state.can_send:
            return 0
        host = self._host
        if self._unflushed and not host.flushed(self._unflushed):
            return 0
        try:
            taken = host.engine.send_data(self.stream_id, data)
        except StreamClosedError:
            return 0
        if taken > 0:
            self._unflushed = host.kick()
        return taken

    def _check_send(self) -> None:
        self._check_usable()
        if self._state.local_ended:
            raise trio.ClosedResourceError("EOF was already sent on this HBONE stream")
        if not self._state.can_send:
            raise trio.BrokenResourceError("HBONE stream was reset")

    def _queue(self, view: memoryview) -> int:
        try:
            return self._host.engine.send_data(self.stream_id, view)
        except StreamClosedError as exc:
            raise trio.BrokenResourceError(str(exc)) from exc

    async def wait_send_all_might_not_block(self) -> None:
        if self._sending:
            raise trio.BusyResourceError("another task is sending on this stream")
        self._sending = True
        try:
            while True:
                self._check_send()
                if self._host.engine.send_window(self.stream_id) > 0:
                    await trio.lowlevel.checkpoint()
                    return
                await self._changed.wait()
        finally:
            self._sending = False

    async def send_eof(self) -> None:
        """Half-close: END_STREAM. A second call is a no-op."""
        if self._sending:
            raise trio.BusyResourceError("another task is sending on this stream")
        if self._fault is _CLOSED:
            raise trio.ClosedResourceError("HBONE stream was closed")
        if self._state.local_ended:
            await trio.lowlevel.checkpoint()
            return
        self._check_usable()
        try:
            self._state = self._host.engine.end_stream(self.stream_id)
        except StreamClosedError as exc:
            raise trio.BrokenResourceError(str(exc)) from exc
        await self._host.wait_flushed(self._host.kick())
        self._maybe_finished()

    # -- close --------------------------------------------------------------------

    def reset(self, code: int = ErrorCode.CANCEL) -> None:
        """RST_STREAM with ``code`` now (unless finished or the connection is gone);
        further I/O on the stream raises BrokenResourceError."""
        if self._state.finished or self._fault is not None:
            return
        self._reset_locally(code)
        self._fault = _Fault("HBONE stream was reset")
        self._host.kick()

    def _reset_locally(self, code: int) -> None:
        new = self._host.engine.reset(self.stream_id, code)
        if new is not None:
            self._state = new

    async def aclose(self) -> None:
        """RST_STREAM(CANCEL) unless finished; releases any unconsumed window."""
        self.close()
        await trio.lowlevel.checkpoint()

    def close(self) -> None:
        """``aclose`` without its checkpoint (never blocks): for a flow's final cleanup,
        which would otherwise pay a cancel scope and a Cancelled per stream."""
        if self._fault is not _CLOSED:
            if not self._state.finished and self._fault is None:
                self._reset_locally(ErrorCode.CANCEL)
            self._fault = _CLOSED
            pending = self._unacked + sum(len(c) for c in self._inbound)
            self._inbound.clear()
            self._unacked = 0
            # Credit the connection window.
            self._host.engine.acknowledge(self.stream_id, pending)
            self._host.kick()
            self._host.stream_finished(self)
            self._wake()


class HboneServerStream(HboneStream):
    """Server side of a CONNECT stream: the handler must ``respond`` first."""

    __slots__ = ("_handler_scope", "responded")

    def __init__(self, host: StreamHost, stream_id: int) -> None:
        super().__init__(host, stream_id)
        self.responded = False
        # The handler runs inside this scope. A reset before we answered cancels it,
        # so HEADERS+RST_STREAM floods cannot keep setup work (resolve, policy, app
        # connect) running. After the answer a reset ends the relay by itself, and
        # RST(CANCEL) after data is EOF: the handler must still deliver that data.
        self._handler_scope = trio.CancelScope()

    @property
    def handler_scope(self) -> trio.CancelScope:
        """The scope the connection runs this stream's handler in."""
        return self._handler_scope

    def deliver_reset(self, code: int) -> None:
        super().deliver_reset(code)
        if not self.responded:
            self._handler_scope.cancel()

    async def respond(self, status: int, headers: Iterable[tuple[str, str]] = ()) -> None:
        """Send the response; a non-200 also ends the stream (END_STREAM)."""
        if self.responded:
            raise HboneError("response already sent")
        self._check_usable()
        end = status != 200
        try:
            self._state = self._host.engine.respond(self.stream_id, status, headers, end_stream=end)
        except StreamClosedError as exc:  # the peer went away: not our error
            raise trio.BrokenResourceError(str(exc)) from exc
        self.responded = True
        await self._host.wait_flushed(self._host.kick())
        if end:
            self._maybe_finished()
