"""One HBONE CONNECT stream as a ``trio.abc.HalfCloseableStream``.

Theory of operation: the connection's reader task pushes events into the stream
(``_on_*`` methods); the stream's own calls go to the shared engine and ask the
connection's writer task to flush (``_StreamHost``).

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
from collections import deque
from collections.abc import Callable
from typing import Protocol

import trio

from ztunnel.hbone.engine import HboneEngine
from ztunnel.hbone.errors import StreamClosedError
from ztunnel.hbone.events import ErrorCode, Headers

DEFAULT_RECEIVE_SIZE = 256 * 1024


class _StreamHost(Protocol):
    """What a stream needs from its connection driver."""

    engine: HboneEngine

    def kick(self) -> int: ...

    async def wait_flushed(self, seq: int) -> None: ...

    def stream_finished(self, stream: HboneStream) -> None: ...


class HboneStream(trio.abc.HalfCloseableStream):
    """A CONNECT stream; ``response_headers`` holds the peer's response (client side)."""

    def __init__(self, host: _StreamHost, stream_id: int) -> None:
        self._host = host
        self.stream_id = stream_id
        self.response_status: int | None = None
        self.response_headers: Headers = ()
        self._inbound: deque[bytes] = deque()
        self._unacked = 0
        self._changed = trio.Event()  # data, EOF, reset, window or response arrived
        self._recv_eof = False
        self._sent_eof = False
        self._reset_code: int | None = None
        self._broken: str | None = None
        self._closed = False
        self._receiving = False
        self._sending = False
        # Set by a relay: writes bytes onward without blocking, returns how many it
        # wrote. Used only while receive_some is parked with nothing queued.
        self.direct_sink: Callable[[bytes], int] | None = None
        self._sink_limit = 0  # the parked receive_some's max_bytes; 0: not parked

    # -- events from the connection's reader task -------------------------------------

    def _wake(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def _on_data(self, data: bytes) -> None:
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

    def _on_end(self) -> None:
        self._recv_eof = True
        self._wake()
        self._maybe_finished()

    def _on_reset(self, code: int) -> None:
        self._reset_code = code
        self._wake()
        self._host.stream_finished(self)

    def _on_window(self) -> None:
        self._wake()

    def _on_response(self, status: int, headers: Headers) -> None:
        self.response_status, self.response_headers = status, headers
        self._wake()

    def _on_connection_lost(self, reason: str) -> None:
        if self._broken is None:
            self._broken = reason
        self._wake()

    # -- state --------------------------------------------------------------------

    @property
    def finished(self) -> bool:
        """Both directions ended cleanly, or the stream was reset."""
        return (self._recv_eof and self._sent_eof) or self._reset_code is not None

    def _maybe_finished(self) -> None:
        if self.finished:
            self._host.stream_finished(self)

    def _check_usable(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("HBONE stream was closed")
        if self._reset_code is not None and not self._reset_is_eof:
            raise trio.BrokenResourceError(f"HBONE stream reset by peer (code {self._reset_code})")
        if self._broken is not None:
            raise trio.BrokenResourceError(f"HBONE connection lost: {self._broken}")

    @property
    def _reset_is_eof(self) -> bool:
        return self._reset_code in (ErrorCode.NO_ERROR, ErrorCode.CANCEL)

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
                if self._closed:
                    raise trio.ClosedResourceError("HBONE stream was closed")
                if self._inbound:
                    await trio.lowlevel.checkpoint()
                    return self._take(max_bytes or DEFAULT_RECEIVE_SIZE)
                if self._recv_eof or (self._reset_code is not None and self._reset_is_eof):
                    await trio.lowlevel.checkpoint()
                    return b""
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
        chunk = self._inbound.popleft()
        if len(chunk) > max_bytes:
            self._inbound.appendleft(chunk[max_bytes:])
            chunk = chunk[:max_bytes]
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
                if sent:
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

    def _check_send(self) -> None:
        self._check_usable()
        if self._sent_eof:
            raise trio.ClosedResourceError("EOF was already sent on this HBONE stream")
        if self._reset_code is not None:
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
        if self._closed:
            raise trio.ClosedResourceError("HBONE stream was closed")
        if self._sent_eof:
            await trio.lowlevel.checkpoint()
            return
        self._check_usable()
        try:
            self._host.engine.end_stream(self.stream_id)
        except StreamClosedError as exc:
            raise trio.BrokenResourceError(str(exc)) from exc
        self._sent_eof = True
        await self._host.wait_flushed(self._host.kick())
        self._maybe_finished()

    # -- close --------------------------------------------------------------------

    async def aclose(self) -> None:
        """RST_STREAM(CANCEL) unless finished; releases any unconsumed window."""
        if not self._closed:
            self._closed = True
            engine = self._host.engine
            if not self.finished and self._broken is None:
                engine.reset(self.stream_id, ErrorCode.CANCEL)
            pending = self._unacked + sum(len(c) for c in self._inbound)
            self._inbound.clear()
            self._unacked = 0
            engine.acknowledge(self.stream_id, pending)  # credit the connection window
            self._host.kick()
            self._host.stream_finished(self)
            self._wake()
        await trio.lowlevel.checkpoint()
