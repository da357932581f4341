"""Sans-IO HTTP/2 CONNECT (HBONE) engine around ``h2.H2Connection``.

Theory of operation: the driver feeds received bytes to ``receive_data`` and gets
our own events back (``ztunnel.hbone.events``); every call that produces output
queues bytes the driver collects with ``data_to_send``. No I/O, no trio.

Three deliberate departures from driving h2 naively (plus our own per-stream
state, ``StreamState``, so the driver asks the engine, not h2, what a stream may do):

* **Flow control is released only on ``acknowledge``.** The driver acknowledges
  bytes once they were written onward, so a slow reader stops the sender at the
  window (bounded memory), as ztunnel's ``release_capacity`` does.
* **Graceful GOAWAY.** h2 4.x moves its connection state machine to CLOSED on
  sending or receiving any GOAWAY, which would kill the streams RFC 9113 §6.8 lets
  finish. We write the graceful GOAWAY frame ourselves and receive the peer's
  without the state change (``_H2Connection``); "no new streams" is enforced here.
* **No eager frame repr.** h2 formats ``repr(frame)`` for a trace log line on
  every received frame; for DATA that hexlifies a copy of the whole payload
  (~75% of CPU on bulk data, perf-anchors §7). ``_cheap_data_body_repr`` replaces
  ``DataFrame._body_repr`` process-wide with a length-only version.

And the bounds against hostile peers (docs/reliability.md):

* **Bounded work per call.** ``receive_data(data, max_frames=n)`` handles at most
  ``n`` frames and keeps the rest in h2's buffer (``input_pending``); the driver
  yields to other connections between such turns.
* **Header blocks capped while they arrive.** h2 buffers HEADERS + CONTINUATION
  frames until the block ends (up to 64 frames of the advertised frame size) and
  checks the header list size only then; ``_FrameBuffer`` refuses a block whose
  encoded bytes pass our SETTINGS_MAX_HEADER_LIST_SIZE as soon as they do.
* **Budgets for frames that do no useful work** (``limits.FloodGuard``): RST_STREAM
  of streams we have not answered, PING, SETTINGS, WINDOW_UPDATE, empty frames,
  refused streams, frames on closed streams. Past one, GOAWAY(ENHANCE_YOUR_CALM)
  and a ``ConnectionClosed`` naming the limit.
"""

from __future__ import annotations

import contextlib
import enum
import ipaddress
import itertools
import re
import struct
import sys
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
import h2.stream
from h2.frame_buffer import FrameBuffer
from hyperframe.exceptions import HyperframeError
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    ExtensionFrame,
    Frame,
    GoAwayFrame,
    HeadersFrame,
    PingFrame,
    PriorityFrame,
    PushPromiseFrame,
    RstStreamFrame,
    SettingsFrame,
    WindowUpdateFrame,
)

from ztunnel.hbone.errors import ConnectionGoneError, StreamClosedError
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
from ztunnel.hbone.limits import FloodGuard, Limit, LimitExceeded
from ztunnel.hbone.settings import HboneSettings

__all__ = [
    "ConnectRequest",
    "HboneEngine",
    "HboneSettings",
    "StreamState",
    "parse_authority",
    "validate_connect",
]

_DEFAULT_WINDOW = 65_535  # RFC 9113 initial connection window


def _cheap_data_body_repr(self: DataFrame) -> str:
    return f"<{len(self.data)} bytes>"


# Why setattr: see the module docstring (eager repr of DATA payloads in h2).
setattr(DataFrame, "_body_repr", _cheap_data_body_repr)  # noqa: B010


class StreamState(enum.Enum):
    """A CONNECT stream's state: RFC 9113 §5.1 as HBONE uses it.

    A stream exists from its CONNECT HEADERS on, so it starts OPEN (idle and
    reserved are never seen: HBONE has no push). RESET is RFC's "closed" reached
    through RST_STREAM, sent or received; it stays apart from CLOSED because HBONE
    treats a reset differently from two clean END_STREAMs. The engine owns the
    transitions (the ``after_*`` methods) and refuses operations a state forbids.
    """

    # (label, can_send, local_ended, finished); plain attributes, because the data
    # path asks on every write (an enum property and set lookup cost Python calls).
    OPEN = ("open", True, False, False)
    HALF_CLOSED_LOCAL = ("half-closed (local)", False, True, False)
    HALF_CLOSED_REMOTE = ("half-closed (remote)", True, False, False)
    CLOSED = ("closed", False, True, True)
    RESET = ("reset", False, False, True)

    def __init__(self, label: str, can_send: bool, local_ended: bool, finished: bool) -> None:
        self.label = label
        self.can_send = can_send  # DATA and END_STREAM may still be sent
        self.local_ended = local_ended  # we sent END_STREAM (and were not reset before)
        self.finished = finished  # nothing more is sent or received on the stream

    def after_local_end(self) -> StreamState:
        """We send END_STREAM; raises StreamClosedError where that is not allowed."""
        if self is StreamState.OPEN:
            return StreamState.HALF_CLOSED_LOCAL
        if self is StreamState.HALF_CLOSED_REMOTE:
            return StreamState.CLOSED
        raise StreamClosedError(f"cannot end a stream that is {self.label}")

    def after_remote_end(self) -> StreamState:
        """The peer's END_STREAM arrived (h2 already refused it where not allowed)."""
        if self is StreamState.OPEN:
            return StreamState.HALF_CLOSED_REMOTE
        if self is StreamState.HALF_CLOSED_LOCAL:
            return StreamState.CLOSED
        return self

    def after_reset(self) -> StreamState:
        """RST_STREAM sent or received: a finished stream stays as it was."""
        return self if self.finished else StreamState.RESET


# Finished streams whose state ``stream_state`` still reports (like h2's own
# memory of closed streams, bounded so a long-lived connection does not grow).
FINISHED_STREAMS_KEPT = 1024


class _FloodError(h2.exceptions.DenialOfServiceError):
    """A budget ran out inside h2's receive loop: h2 answers any ProtocolError with a
    GOAWAY carrying its ``error_code`` (ENHANCE_YOUR_CALM), then re-raises it to us."""

    def __init__(self, limit: str, message: str) -> None:
        super().__init__(message)
        self.limit = limit


class _PlainData:
    """A DATA frame without flags (no padding, no END_STREAM) and with a payload: the
    steady state of a relay, handled by ``_H2Connection._receive_plain_data`` without
    hyperframe's frame object, flag set and h2's per-frame logging and state walk."""

    __slots__ = ("data", "stream_id")

    def __init__(self, stream_id: int, data: bytes) -> None:
        self.stream_id = stream_id
        self.data = data

    def as_frame(self) -> DataFrame:
        """The same frame as hyperframe's object, for h2's own (rare-case) handling."""
        return DataFrame(self.stream_id, self.data)


# h2 stream states in which a DATA frame without END_STREAM is accepted as is.
_RECEIVING = (h2.stream.StreamState.OPEN, h2.stream.StreamState.HALF_CLOSED_LOCAL)
# ... and in which we may send DATA.
_SENDING = (h2.stream.StreamState.OPEN, h2.stream.StreamState.HALF_CLOSED_REMOTE)
# h2 connection states in which DATA may be sent and received.
_CONN_DATA = (h2.connection.ConnectionState.CLIENT_OPEN, h2.connection.ConnectionState.SERVER_OPEN)
# 9-byte frame headers: length (24 bits as 8 + 16), type, flags, stream id; + increment.
_DATA_HEADER = struct.Struct(">BHBBL")
_WINDOW_UPDATE = struct.Struct(">BHBBLL")


def _window_update(stream_id: int, increment: int) -> bytes:
    return _WINDOW_UPDATE.pack(0, 4, 0x8, 0, stream_id, increment)


class _H2Stream(h2.stream.H2Stream):
    """h2's stream with the few checks and window operations the DATA fast path needs."""

    @property
    def receives_plain_data(self) -> bool:
        """A DATA frame without END_STREAM is accepted with no state change (and no
        content-length to track: CONNECT streams have none)."""
        return self.state_machine.state in _RECEIVING and self._expected_content_length is None

    @property
    def sends_plain_data(self) -> bool:
        return self.state_machine.state in _SENDING

    def consume_inbound(self, n: int) -> None:
        """``n`` flow-controlled bytes arrived; FlowControlError past the window."""
        self._inbound_window_manager.window_consumed(n)

    def acknowledge_inbound(self, n: int) -> int | None:
        """``n`` bytes were consumed: the WINDOW_UPDATE increment now due, if any."""
        return self._inbound_window_manager.process_bytes(n) if self.open else None


class _FrameBuffer(FrameBuffer):
    """h2's frame buffer with two bounds: frames per ``receive_data`` call, and the
    encoded size of a header block while its CONTINUATION frames arrive."""

    def __init__(self, *, server: bool, max_header_block: int) -> None:
        super().__init__(server=server)
        self.max_header_block = max_header_block
        self.frames_left = sys.maxsize  # this call's frame budget (set by the engine)
        self._block_bytes = 0

    def __next__(self) -> Frame | _PlainData:  # type: ignore[override]
        # h2 recurses into __next__ for frames it absorbs (CONTINUATION): they count too.
        if self.frames_left <= 0:
            raise StopIteration
        self.frames_left -= 1
        data = self._data
        if len(data) < 9:
            raise StopIteration  # the common end of a call: no frame header left
        # The fast path: a whole DATA frame (type 0) without flags and not empty, no
        # header block in progress. Anything else (padding, END_STREAM, oversize,
        # stream 0) goes through hyperframe and h2 as before.
        if len(data) > 9 and not data[3] and not data[4] and not self._headers_buffer:
            length = (data[0] << 16) | (data[1] << 8) | data[2]
            sid = int.from_bytes(data[5:9], "big") & 0x7FFFFFFF
            if 0 < length <= self.max_frame_size and len(data) >= 9 + length and sid:
                payload = bytes(data[9 : 9 + length])
                del data[: 9 + length]
                return _PlainData(sid, payload)
        return super().__next__()

    def _update_header_buffer(self, f: Frame | None) -> Frame | None:
        if isinstance(f, ContinuationFrame) and self._headers_buffer:
            self._block_bytes += len(f.data)
        elif isinstance(f, HeadersFrame | PushPromiseFrame) and "END_HEADERS" not in f.flags:
            self._block_bytes = len(f.data)
        else:
            return super()._update_header_buffer(f)
        if self._block_bytes > self.max_header_block:
            raise _FloodError(
                Limit.HEADER_LIST_SIZE,
                f"unfinished header block of {self._block_bytes} bytes"
                f" (max {self.max_header_block})",
            )
        return super()._update_header_buffer(f)

    @property
    def frame_ready(self) -> bool:
        """A whole frame is buffered (what the next call would handle at once)."""
        data = self._data
        if self._preamble_len or len(data) < 9:
            return False
        return len(data) >= 9 + int.from_bytes(data[:3], "big")


# Frames charged to a budget before h2 handles them (DATA and RST_STREAM: see _account).
_BUDGET_OF_FRAME: dict[type, str] = {
    PingFrame: Limit.PINGS,
    SettingsFrame: Limit.SETTINGS,
    WindowUpdateFrame: Limit.WINDOW_UPDATES,
    PriorityFrame: Limit.EMPTY_FRAMES,
    ExtensionFrame: Limit.EMPTY_FRAMES,
    GoAwayFrame: Limit.EMPTY_FRAMES,
}


class _H2Connection(h2.connection.H2Connection):
    """h2 with a receive-side GOAWAY that leaves existing streams usable, a per-frame
    budget hook, and a bounded memory of closed streams."""

    # h2 remembers 2**16 closed streams per connection (megabytes on a long-lived one);
    # ours are only needed while a peer's in-flight frames for them can still arrive.
    MAX_CLOSED_STREAMS = 1024

    def __init__(self, config: h2.config.H2Configuration, guard: FloodGuard) -> None:
        super().__init__(config=config)
        self.guard = guard

    def release(self) -> None:
        """No frame will be received any more: drop h2's frame dispatch table. Its bound
        methods make every h2 connection a reference cycle, which kept the connection,
        its streams and HPACK tables alive until the next full collection (minutes on
        a large heap; docs/reliability.md "Memory after a burst")."""
        self._frame_dispatch_table = {}

    def _receive_frame(self, frame: Frame | _PlainData) -> list[Any]:
        if type(frame) is _PlainData:
            return self._receive_plain_data(frame)
        assert not isinstance(frame, _PlainData)
        try:
            self._account(frame)
        except LimitExceeded as exc:
            raise _FloodError(exc.limit, str(exc)) from exc
        return super()._receive_frame(frame)

    def _receive_plain_data(self, frame: _PlainData) -> list[Any]:
        """What h2's ``_receive_data_frame`` does for such a frame on an open stream: both
        inbound windows consumed (FlowControlError, a connection error, past either),
        and our Data event straight away. Unknown, closed or half-closed (remote)
        streams and streams with a content-length go to h2, which answers them."""
        sid = frame.stream_id
        stream = self._stream(sid)
        if (
            stream is None
            or not stream.receives_plain_data
            or self.state_machine.state not in _CONN_DATA
        ):
            return self._receive_frame(frame.as_frame())
        n = len(frame.data)
        self._inbound_flow_control_window_manager.window_consumed(n)
        stream.consume_inbound(n)
        return [Data(sid, frame.data, n)]

    def _stream(self, stream_id: int) -> _H2Stream | None:
        return self.streams.get(stream_id)  # type: ignore[return-value]  # ours: see below

    def _begin_new_stream(self, stream_id: int, allowed_ids: Any) -> h2.stream.H2Stream:
        stream = super()._begin_new_stream(stream_id, allowed_ids)
        # h2 builds H2Stream itself; ours only adds methods (no state), so the class of
        # the new object is switched rather than h2's constructor code copied.
        stream.__class__ = _H2Stream
        return stream

    @property
    def pending_bytes(self) -> int:
        """Bytes queued in h2's output buffer."""
        return len(self._data_to_send)

    def send_plain_data(self, stream_id: int, data: bytes | memoryview) -> int | None:
        """What ``send_data`` does for unpadded DATA without END_STREAM (no state change:
        only the two send windows shrink), as many frames as the windows allow, written
        into the output buffer directly: no DataFrame, flag set or debug-log calls per
        frame. Returns the bytes taken, or None where h2's own API must decide (a stream
        not open for sending, a closed connection)."""
        stream = self._stream(stream_id)
        if (
            stream is None
            or not stream.sends_plain_data
            or self.state_machine.state not in _CONN_DATA
        ):
            return None
        # A window the peer's SETTINGS made negative takes nothing.
        window = min(self.outbound_flow_control_window, stream.outbound_flow_control_window)
        total = min(len(data), window) if window > 0 else 0
        frame = self.max_outbound_frame_size
        out = self._data_to_send
        header = _DATA_HEADER.pack
        for start in range(0, total, frame):
            end = min(start + frame, total)
            n = end - start
            out += header(n >> 16, n & 0xFFFF, 0, 0, stream_id)
            out += data[start:end] if start or end < len(data) else data
        self.outbound_flow_control_window -= total
        stream.outbound_flow_control_window -= total
        return total

    def acknowledge(self, n: int, stream_id: int) -> None:
        """``acknowledge_received_data`` without its debug-log calls and frame objects:
        the same window managers decide when a WINDOW_UPDATE is due."""
        increment = self._inbound_flow_control_window_manager.process_bytes(n)
        if increment:
            self._data_to_send += _window_update(0, increment)
        stream = self._stream(stream_id)
        if stream is not None and (increment := stream.acknowledge_inbound(n)):
            self._data_to_send += _window_update(stream_id, increment)

    def _account(self, frame: Frame) -> None:
        kind = type(frame)
        if isinstance(frame, DataFrame):
            if not frame.flow_controlled_length and "END_STREAM" not in frame.flags:
                self.guard.charge(Limit.EMPTY_FRAMES)
        elif kind is RstStreamFrame:
            # Resets of known streams are judged later (answered or not: _on_reset);
            # one for a stream h2 does not know is pure overhead.
            if frame.stream_id not in self.streams:
                self.guard.charge(Limit.RESETS)
        elif (budget := _BUDGET_OF_FRAME.get(kind)) is not None:
            self.guard.charge(budget)

    def _handle_data_on_closed_stream(self, *args: Any) -> tuple[list[Any], list[Any]]:
        # h2 answers each DATA frame on a closed stream with RST_STREAM ("made you reset").
        self._charge_stream_error()
        return super()._handle_data_on_closed_stream(*args)

    def _stream_is_closed_by_reset(self, stream_id: int) -> bool:
        # Called by _receive_frame only, where True means "answer with RST_STREAM".
        closed = bool(super()._stream_is_closed_by_reset(stream_id))
        if closed:
            self._charge_stream_error()
        return closed

    def _charge_stream_error(self) -> None:
        try:
            self.guard.charge(Limit.STREAM_ERRORS)
        except LimitExceeded as exc:
            raise _FloodError(exc.limit, str(exc)) from exc

    def _receive_goaway_frame(self, frame: GoAwayFrame) -> tuple[list[Any], list[Any]]:
        event = h2.events.ConnectionTerminated()
        event.error_code = frame.error_code
        event.last_stream_id = frame.last_stream_id
        event.additional_data = frame.additional_data or None
        return [], [event]


def _max_header_list_size(settings: HboneSettings, client: bool) -> int:
    return settings.client_max_header_list_size if client else settings.server_max_header_list_size


def _h2_settings(settings: HboneSettings, client: bool) -> h2.settings.Settings:
    codes = h2.settings.SettingCodes
    values = {
        codes.INITIAL_WINDOW_SIZE: settings.stream_window,
        codes.MAX_FRAME_SIZE: settings.max_frame_size,
        codes.MAX_HEADER_LIST_SIZE: _max_header_list_size(settings, client),
        codes.ENABLE_PUSH: 0,
    }
    if not client:  # a client accepts no pushed streams, so it advertises no limit
        values[codes.MAX_CONCURRENT_STREAMS] = settings.max_concurrent_streams
    return h2.settings.Settings(client=client, initial_values=values)


def _decode(headers: Iterable[tuple[bytes, bytes]]) -> list[tuple[str, str]]:
    return [(k.decode("latin-1"), v.decode("latin-1")) for k, v in headers]


def _split(headers: list[tuple[str, str]]) -> tuple[dict[str, str], Headers]:
    pseudo = {k: v for k, v in headers if k.startswith(":")}
    return pseudo, tuple((k, v) for k, v in headers if not k.startswith(":"))


class HboneEngine:
    """One HTTP/2 connection carrying CONNECT streams, client or server role."""

    def __init__(
        self,
        *,
        client: bool,
        settings: HboneSettings | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``clock`` (seconds) refills the flood budgets; drivers pass their own."""
        self.client = client
        self.settings = settings if settings is not None else HboneSettings()
        config = h2.config.H2Configuration(client_side=client, header_encoding=None)
        self._guard = FloodGuard(self.settings.flood, clock)
        self._h2 = _H2Connection(config, self._guard)
        # Initial values take effect at once (no ACK round trip), so the limits h2
        # derives from its settings in __init__ must be refreshed by hand.
        self._h2.local_settings = _h2_settings(self.settings, client)
        self._h2.max_inbound_frame_size = self.settings.max_frame_size
        header_limit = _max_header_list_size(self.settings, client)
        self._h2.decoder.max_header_list_size = header_limit
        self._input = _FrameBuffer(server=not client, max_header_block=header_limit)
        self._input.max_frame_size = self.settings.max_frame_size
        self._h2.incoming_buffer = self._input
        self._h2.initiate_connection()
        extra = self.settings.connection_window - _DEFAULT_WINDOW
        if extra > 0:
            self._h2.increment_flow_control_window(extra)
        self._out: list[bytes] = []
        self._out_bytes = 0
        self._pings = itertools.count(1)
        self.closed = False
        self.goaway_received = False
        self._goaway_sent_last: int | None = None
        self._streams: dict[int, StreamState] = {}  # open and half-closed streams
        self._finished: OrderedDict[int, StreamState] = OrderedDict()
        self._unanswered: set[int] = set()  # CONNECT streams not answered yet (either role)

    # -- output ---------------------------------------------------------------

    # Output: h2's own buffer (``_data_to_send``), where the DATA fast path and the
    # window updates write their frames too, so frame order is simply append order;
    # ``_out`` holds what was collected from it before (the graceful GOAWAY's order).

    def _pull(self) -> None:
        chunk = self._h2.data_to_send()
        if chunk:
            self._out.append(chunk)
            self._out_bytes += len(chunk)

    def data_to_send(self) -> bytes:
        """All bytes queued for the peer, in order; empties the queue."""
        if not self._out:
            return self._h2.data_to_send()
        self._pull()
        out = self._out[0] if len(self._out) == 1 else b"".join(self._out)
        self._out = []
        self._out_bytes = 0
        return out

    @property
    def pending_output(self) -> int:
        """Bytes queued for the peer and not yet collected by ``data_to_send``."""
        return self._out_bytes + self._h2.pending_bytes

    # -- state ----------------------------------------------------------------

    @property
    def accepting_streams(self) -> bool:
        """False once closed, draining, or told by the peer to go away."""
        return not (self.closed or self.goaway_received or self._goaway_sent_last is not None)

    @property
    def peer_max_concurrent_streams(self) -> int:
        return int(self._h2.remote_settings.max_concurrent_streams)

    @property
    def local_max_concurrent_streams(self) -> int:
        """The MAX_CONCURRENT_STREAMS we advertise (h2's "unlimited" default if unset)."""
        return int(self._h2.local_settings.max_concurrent_streams)

    def send_window(self, stream_id: int) -> int:
        """Bytes ``send_data`` would accept now (0 if the stream cannot send).

        Never negative: a peer that lowers SETTINGS_INITIAL_WINDOW_SIZE after we sent
        makes h2's window negative (RFC 9113 §6.9.2); that means "wait for
        WINDOW_UPDATE", and a negative count would make callers step backwards."""
        try:
            return max(0, int(self._h2.local_flow_control_window(stream_id)))
        except h2.exceptions.H2Error:
            return 0

    # -- streams --------------------------------------------------------------

    def stream_state(self, stream_id: int) -> StreamState | None:
        """The stream's state; None for a stream never opened (or long finished)."""
        state = self._streams.get(stream_id)
        return state if state is not None else self._finished.get(stream_id)

    def send_connect(self, authority: str, extra_headers: Iterable[tuple[str, str]] = ()) -> int:
        """Client: open a CONNECT stream (no :scheme/:path, RFC 9113 §8.5); it is OPEN."""
        if not self.client:
            raise ValueError("send_connect is client-only")
        if not self.accepting_streams:
            raise ConnectionGoneError("connection is closed or draining")
        stream_id: int = self._h2.get_next_available_stream_id()
        headers = [(":method", "CONNECT"), (":authority", authority), *extra_headers]
        self._h2.send_headers(stream_id, headers, end_stream=False)
        self._streams[stream_id] = StreamState.OPEN
        self._unanswered.add(stream_id)
        return stream_id

    def respond(
        self,
        stream_id: int,
        status: int,
        headers: Iterable[tuple[str, str]] = (),
        *,
        end_stream: bool = False,
    ) -> StreamState:
        """Server: answer a CONNECT. A non-200 usually passes ``end_stream=True``.
        Returns the stream's new state."""
        state = self._sendable(stream_id)
        new = state.after_local_end() if end_stream else state
        with self._stream_op(stream_id):
            self._h2.send_headers(stream_id, [(":status", str(status)), *headers], end_stream)
        self._unanswered.discard(stream_id)
        return self._set(stream_id, new)

    def send_data(self, stream_id: int, data: bytes | memoryview) -> int:
        """Queue as much of ``data`` as flow control allows; returns bytes taken."""
        state = self._streams.get(stream_id)
        if state is None or not state.can_send or self.closed:
            self._sendable(stream_id)  # raises the precise StreamClosedError
        total = self._h2.send_plain_data(stream_id, data)
        if total is None:
            return self._send_data_h2(stream_id, data)
        if total:
            # The peer's WINDOW_UPDATEs for this data are useful work: budget for them.
            frames = -(-total // self._h2.max_outbound_frame_size)
            self._guard.credit(Limit.WINDOW_UPDATES, frames)
        return total

    def _send_data_h2(self, stream_id: int, data: bytes | memoryview) -> int:
        """send_data through h2's API (which raises what a stream's state forbids)."""
        with self._stream_op(stream_id):
            total = min(len(data), max(0, int(self._h2.local_flow_control_window(stream_id))))
            frame = self._h2.max_outbound_frame_size
            view = memoryview(data)
            for start in range(0, total, frame):
                self._h2.send_data(stream_id, view[start : min(start + frame, total)])
                self._guard.credit(Limit.WINDOW_UPDATES)
            return total

    def end_stream(self, stream_id: int) -> StreamState:
        """Half-close our direction (END_STREAM, an empty DATA frame); returns the new state."""
        new = self._sendable(stream_id).after_local_end()
        with self._stream_op(stream_id):
            self._h2.end_stream(stream_id)
        return self._set(stream_id, new)

    def reset(self, stream_id: int, code: int = ErrorCode.CANCEL) -> StreamState | None:
        """RST_STREAM; a no-op on a finished (or unknown) stream. Returns the state."""
        state = self._streams.get(stream_id)
        if state is None or self.closed:
            return self.stream_state(stream_id)
        with contextlib.suppress(h2.exceptions.H2Error):
            self._h2.reset_stream(stream_id, code)
        return self._set(stream_id, state.after_reset())

    def refuse(self, stream_id: int) -> ConnectionClosed | None:
        """Server: RST_STREAM(REFUSED_STREAM) a CONNECT we will not serve (over a limit).
        Refused streams have a budget; past it the connection is closed and the
        returned ConnectionClosed says so."""
        self.reset(stream_id, ErrorCode.REFUSED_STREAM)
        return self._charge(Limit.REFUSED_STREAMS)

    @property
    def unanswered_streams(self) -> int:
        """Server: CONNECT streams surfaced to the driver and not answered yet."""
        return len(self._unanswered)

    def unanswered_before(self, stream_id: int) -> int:
        """Unanswered CONNECT streams older than ``stream_id``. One read can surface many
        CONNECTs at once; a limit judged with this count refuses the newest of them,
        never the ones that came first."""
        return sum(1 for sid in self._unanswered if sid < stream_id)

    def _charge(self, limit: str) -> ConnectionClosed | None:
        """Charge a budget outside h2's receive loop; a ConnectionClosed when it ran out."""
        if self.closed:
            return None
        try:
            self._guard.charge(limit)
        except LimitExceeded as exc:
            return self._fail(_FloodError(exc.limit, str(exc)))
        return None

    def acknowledge(self, stream_id: int, n: int) -> None:
        """Release ``n`` received bytes of flow-control window (stream and connection).
        Still credits the connection window when the stream is already gone."""
        if n <= 0 or self.closed:
            return
        self._h2.acknowledge(n, stream_id)

    def _sendable(self, stream_id: int) -> StreamState:
        """The state of a stream we may still send on; StreamClosedError otherwise."""
        if self.closed:
            raise StreamClosedError(f"stream {stream_id}: connection closed")
        state = self._streams.get(stream_id)
        if state is None or not state.can_send:
            shown = state or self._finished.get(stream_id)
            why = shown.label if shown is not None else "not open"
            raise StreamClosedError(f"stream {stream_id} is {why}")
        return state

    def _set(self, stream_id: int, state: StreamState) -> StreamState:
        if not state.finished:
            self._streams[stream_id] = state
            return state
        self._streams.pop(stream_id, None)
        self._unanswered.discard(stream_id)
        self._finished[stream_id] = state
        if len(self._finished) > FINISHED_STREAMS_KEPT:
            self._finished.popitem(last=False)
        return state

    # -- connection -----------------------------------------------------------

    def ping(self) -> bytes:
        """Send a PING; returns its 8-byte payload (echoed in PingAcked)."""
        payload = next(self._pings).to_bytes(8, "big")
        if not self.closed:
            self._h2.ping(payload)
        return payload

    def goaway(self) -> None:
        """Graceful drain: GOAWAY(NO_ERROR); open streams may finish, new ones are refused."""
        if self.closed or self._goaway_sent_last is not None:
            return
        last = int(self._h2.highest_inbound_stream_id)
        self._goaway_sent_last = last
        self._pull()  # keep frame order: everything h2 queued goes first
        frame = GoAwayFrame(stream_id=0, last_stream_id=last, error_code=ErrorCode.NO_ERROR)
        raw = frame.serialize()
        self._out.append(raw)
        self._out_bytes += len(raw)

    def close(self, code: int = ErrorCode.NO_ERROR) -> None:
        """Final GOAWAY with ``code``; the engine accepts nothing afterwards."""
        if self.closed:
            return
        self.closed = True
        if self._h2.state_machine.state is not h2.connection.ConnectionState.CLOSED:
            self._h2.close_connection(error_code=code)

    def release(self) -> None:
        """The transport is gone: no input any more, and nothing left to send. Lets the
        h2 state be freed as soon as the last reference goes (without waiting for the
        garbage collector); stream operations keep working on what is left."""
        self.closed = True
        self._h2.release()

    # -- input ----------------------------------------------------------------

    def receive_data(
        self, data: bytes | bytearray | memoryview, max_frames: int | None = None
    ) -> list[Event]:
        """Feed bytes from the peer; returns the events they caused.

        With ``max_frames`` at most that many frames are handled; the rest stays
        buffered (``input_pending``) until the next call, which may pass b"".
        """
        if self.closed:
            return []
        self._input.frames_left = sys.maxsize if max_frames is None else max_frames
        try:
            # h2's events, and the DATA fast path's own Data events among them.
            h2_events: list[Any] = self._h2.receive_data(data)
        except (h2.exceptions.H2Error, HyperframeError) as exc:
            return [self._fail(exc)]
        events: list[Event] = []
        for h2_event in h2_events:
            if type(h2_event) is Data:  # the DATA fast path's own event
                events.append(h2_event)
                continue
            self._translate(h2_event, events)
            if self.closed:  # a budget ran out while translating
                break
        return events

    @property
    def input_pending(self) -> bool:
        """Whole frames wait in the buffer (a ``max_frames`` call stopped before them)."""
        return not self.closed and self._input.frame_ready

    def _fail(self, exc: Exception) -> ConnectionClosed:
        code = int(getattr(exc, "error_code", None) or ErrorCode.PROTOCOL_ERROR)
        self.close(code)
        last = int(self._h2.highest_inbound_stream_id)
        limit = getattr(exc, "limit", None)
        if limit is None and isinstance(exc, h2.exceptions.DenialOfServiceError):
            limit = Limit.HEADER_LIST_SIZE  # h2's only one: an oversized header list
        return ConnectionClosed(code, last, f"{type(exc).__name__}: {exc}", limit)

    def _translate(self, ev: h2.events.Event, out: list[Event]) -> None:
        handler = _HANDLERS.get(type(ev))
        if handler is not None:
            handler(self, ev, out)

    def _on_request(self, ev: Any, out: list[Event]) -> None:
        sid = int(ev.stream_id)
        if self._goaway_sent_last is not None and sid > self._goaway_sent_last:
            # Never surfaced, so never tracked: refuse it directly.
            with contextlib.suppress(h2.exceptions.H2Error):
                self._h2.reset_stream(sid, ErrorCode.REFUSED_STREAM)
            if (closed := self._charge(Limit.REFUSED_STREAMS)) is not None:
                out.append(closed)
            return
        pseudo, headers = _split(_decode(ev.headers))
        method, authority = pseudo.get(":method", ""), pseudo.get(":authority", "")
        self._streams[sid] = StreamState.OPEN
        self._unanswered.add(sid)
        out.append(ConnectRequest(sid, method, authority, headers))

    def _on_response(self, ev: Any, out: list[Event]) -> None:
        self._unanswered.discard(int(ev.stream_id))
        pseudo, headers = _split(_decode(ev.headers))
        out.append(Response(int(ev.stream_id), _parse_status(pseudo.get(":status", "")), headers))

    def _on_data(self, ev: Any, out: list[Event]) -> None:
        sid, data = int(ev.stream_id), bytes(ev.data)
        padding = int(ev.flow_controlled_length) - len(data)
        if padding > 0:
            self.acknowledge(sid, padding)
        if data:
            out.append(Data(sid, data, int(ev.flow_controlled_length)))

    def _on_stream_ended(self, ev: Any, out: list[Event]) -> None:
        sid = int(ev.stream_id)
        if (state := self._streams.get(sid)) is not None:
            self._set(sid, state.after_remote_end())
        out.append(StreamEnded(sid))

    def _on_reset(self, ev: Any, out: list[Event]) -> None:
        sid = int(ev.stream_id)
        # Rapid reset: a CONNECT cancelled before it was answered cost setup work for
        # nothing (on a client: a server refusing or cancelling our CONNECTs).
        premature = sid in self._unanswered
        if (state := self._streams.get(sid)) is not None:
            self._set(sid, state.after_reset())
        out.append(StreamReset(sid, int(ev.error_code), bool(ev.remote_reset)))
        if premature and ev.remote_reset and (closed := self._charge(Limit.RESETS)) is not None:
            out.append(closed)

    def _on_goaway(self, ev: Any, out: list[Event]) -> None:
        self.goaway_received = True
        out.append(GoAwayReceived(int(ev.error_code), int(ev.last_stream_id)))

    def _on_ping_ack(self, ev: Any, out: list[Event]) -> None:
        out.append(PingAcked(bytes(ev.ping_data)))

    def _on_window(self, ev: Any, out: list[Event]) -> None:
        out.append(WindowOpened(int(ev.stream_id) or None))

    def _on_settings(self, ev: Any, out: list[Event]) -> None:
        if h2.settings.SettingCodes.INITIAL_WINDOW_SIZE in ev.changed_settings:
            out.append(WindowOpened(None))
        out.append(SettingsChanged(self.peer_max_concurrent_streams))

    @staticmethod
    def _stream_op(stream_id: int) -> _StreamOp:
        return _StreamOp(stream_id)


_STATUS = re.compile(r"[1-9][0-9]{2}")


def _parse_status(text: str) -> int:
    """A three-digit ``:status`` (RFC 9110 §15) as int; anything else is 0, which the
    driver reports as a non-200 answer instead of failing the whole connection."""
    return int(text) if _STATUS.fullmatch(text) else 0


class _StreamOp:
    """Translate h2's errors for operations on a closed stream into ours (a backstop:
    the engine's own stream states refuse those operations first)."""

    def __init__(self, stream_id: int) -> None:
        self.stream_id = stream_id

    def __enter__(self) -> None:
        return None

    def __exit__(self, tp: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        if isinstance(exc, h2.exceptions.StreamClosedError | h2.exceptions.ProtocolError):
            raise StreamClosedError(f"stream {self.stream_id}: {exc}") from exc


_HANDLERS: dict[type, Any] = {
    h2.events.RequestReceived: HboneEngine._on_request,
    h2.events.ResponseReceived: HboneEngine._on_response,
    h2.events.DataReceived: HboneEngine._on_data,
    h2.events.StreamEnded: HboneEngine._on_stream_ended,
    h2.events.StreamReset: HboneEngine._on_reset,
    h2.events.ConnectionTerminated: HboneEngine._on_goaway,
    h2.events.PingAckReceived: HboneEngine._on_ping_ack,
    h2.events.WindowUpdated: HboneEngine._on_window,
    h2.events.RemoteSettingsChanged: HboneEngine._on_settings,
}


# -- CONNECT request validation (server side, reference §1.3) -------------------

# Used with fullmatch: ``$`` would also match before a final newline ("host\n:80").
_LABEL = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?")
_PORT = re.compile(r"[0-9]{1,5}")


def parse_authority(authority: str) -> tuple[str, int] | None:
    """``ip:port``, ``[v6]:port`` or ``hostname:port`` -> (host, port); else None."""
    host, sep, port_text = authority.rpartition(":")
    if not sep or not _PORT.fullmatch(port_text) or not 1 <= int(port_text) <= 65535:
        return None
    if host.startswith("[") and host.endswith("]"):
        try:
            ip = ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            return None
        # A zone ("%eth0") names an interface of the client's host: meaningless here.
        return (str(ip), int(port_text)) if ip.scope_id is None else None
    if _valid_host(host):
        return host, int(port_text)
    return None


def _valid_host(host: str) -> bool:
    try:
        ipaddress.IPv4Address(host)
        return True
    except ValueError:
        pass
    labels = host.split(".")
    return 0 < len(host) <= 253 and all(_LABEL.fullmatch(label) for label in labels)


def validate_connect(req: ConnectRequest) -> tuple[int | None, str, int]:
    """(None, host, port) for a well-formed CONNECT, else (400, "", 0)."""
    if req.method != "CONNECT":
        return 400, "", 0
    parsed = parse_authority(req.authority)
    if parsed is None:
        return 400, "", 0
    return None, parsed[0], parsed[1]
