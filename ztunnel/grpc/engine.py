"""Sans-IO gRPC over HTTP/2 around ``h2.H2Connection``, client or server role (no trio).

Theory of operation: the driver feeds received bytes to ``receive_data`` and gets
this module's events back; every call that produces output queues bytes the driver
collects with ``data_to_send``. Outgoing messages are buffered per stream and
written as flow control allows, so ``send_message`` never blocks and END_STREAM
or trailers always follow the stream's last byte.

Received bytes are credited back to the peer only on ``acknowledge``, which the
driver calls when its consumer takes a message: a consumer that stops reading
stops the sender after one stream window. The stream window is sized to hold one
message of the largest size we accept, so a whole message always fits.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
from h2.stream import StreamState
from hyperframe.exceptions import HyperframeError

from ztunnel.grpc.framing import DEFAULT_MAX_MESSAGE, PREFIX, MessageReader, frame_message
from ztunnel.grpc.status import (
    GrpcError,
    StatusCode,
    decode_message,
    decode_timeout,
    encode_message,
    encode_timeout,
    status_code,
    status_from_http,
)
from ztunnel.h2wire import decode_headers, error_code

Metadata = tuple[tuple[str, str], ...]

CONTENT_TYPE = "application/grpc"
USER_AGENT = "ztunnel-py-grpc/1"
_MAX_WINDOW = 2**31 - 1
_MIN_CONNECTION_WINDOW = 16 * 1024 * 1024
_DEFAULT_WINDOW = 65_535
# Transport headers a call's metadata never carries (gRPC spec: reserved names).
_RESERVED = frozenset({"content-type", "te", "grpc-timeout", "grpc-encoding",
                       "grpc-accept-encoding", "grpc-status", "grpc-message",
                       "grpc-status-details-bin", "user-agent", "content-length"})  # fmt: skip


# --- events --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CallStarted:
    """Server: a request's headers arrived. ``timeout`` is the client's grpc-timeout."""

    stream_id: int
    path: str
    authority: str
    metadata: Metadata
    timeout: float | None


@dataclass(frozen=True, slots=True)
class ResponseHeaders:
    """Client: the server accepted the call (HTTP 200, gRPC content type)."""

    stream_id: int
    metadata: Metadata


@dataclass(frozen=True, slots=True)
class MessageReceived:
    """One whole message. ``size`` bytes must be acknowledged once it is consumed."""

    stream_id: int
    message: bytes = field(repr=False)
    size: int


@dataclass(frozen=True, slots=True)
class HalfClosed:
    """Server: the client will send no more messages."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class CallEnded:
    """Client: the call's final status (trailers, trailers-only, reset or malformed)."""

    stream_id: int
    code: StatusCode
    message: str = ""
    metadata: Metadata = ()


@dataclass(frozen=True, slots=True)
class CallCancelled:
    """Server: the client reset the stream (cancelled, or its deadline passed)."""

    stream_id: int
    error_code: int


@dataclass(frozen=True, slots=True)
class PingAcked:
    payload: bytes


@dataclass(frozen=True, slots=True)
class GoAway:
    """The peer accepts no new streams; a non-zero ``error_code`` means it is gone."""

    error_code: int
    last_stream_id: int


@dataclass(frozen=True, slots=True)
class ConnectionFailed:
    """The peer broke the HTTP/2 protocol; a GOAWAY is queued. Flush, then close."""

    reason: str


Event = (
    CallStarted
    | ResponseHeaders
    | MessageReceived
    | HalfClosed
    | CallEnded
    | CallCancelled
    | PingAcked
    | GoAway
    | ConnectionFailed
)


# --- per-stream state ----------------------------------------------------------------


@dataclass(eq=False)
class _Stream:
    reader: MessageReader
    out: bytearray = field(default_factory=bytearray)
    headers_sent: bool = False  # server: response headers written
    end_after_flush: bool = False  # client: half-close once ``out`` drains
    trailers: list[tuple[str, str]] | None = None  # server: written once ``out`` drains
    ended: bool = False  # client: CallEnded emitted


def _user_metadata(headers: list[tuple[str, str]]) -> Metadata:
    return tuple((k, v) for k, v in headers if not k.startswith(":") and k not in _RESERVED)


def _first(headers: list[tuple[str, str]], name: str) -> str | None:
    return next((v for k, v in headers if k == name), None)


def _is_grpc(content_type: str | None) -> bool:
    if content_type is None:
        return False
    return (
        content_type == CONTENT_TYPE
        or content_type.startswith(CONTENT_TYPE + "+")
        or (content_type.startswith(CONTENT_TYPE + ";"))
    )


_RESET_STATUS: dict[int, StatusCode] = {
    int(h2.errors.ErrorCodes.CANCEL): StatusCode.CANCELLED,
    int(h2.errors.ErrorCodes.REFUSED_STREAM): StatusCode.UNAVAILABLE,
    int(h2.errors.ErrorCodes.ENHANCE_YOUR_CALM): StatusCode.RESOURCE_EXHAUSTED,
    int(h2.errors.ErrorCodes.INADEQUATE_SECURITY): StatusCode.PERMISSION_DENIED,
}


class GrpcEngine:
    """One HTTP/2 connection carrying gRPC calls."""

    def __init__(
        self,
        *,
        client: bool,
        max_message: int = DEFAULT_MAX_MESSAGE,
        max_concurrent_streams: int = 100,
    ) -> None:
        self.client = client
        self.max_message = max_message
        config = h2.config.H2Configuration(client_side=client, header_encoding=None)
        self._h2 = h2.connection.H2Connection(config=config)
        window = min(max_message + PREFIX.size, _MAX_WINDOW)
        codes = h2.settings.SettingCodes
        values = {
            codes.INITIAL_WINDOW_SIZE: max(window, _DEFAULT_WINDOW),
            codes.ENABLE_PUSH: 0,
            codes.MAX_HEADER_LIST_SIZE: 16 * 1024,
        }
        if not client:
            values[codes.MAX_CONCURRENT_STREAMS] = max_concurrent_streams
        self._h2.local_settings = h2.settings.Settings(client=client, initial_values=values)
        self._h2.decoder.max_header_list_size = 16 * 1024
        self._h2.initiate_connection()
        connection_window = min(max(2 * window, _MIN_CONNECTION_WINDOW), _MAX_WINDOW)
        self._h2.increment_flow_control_window(connection_window - _DEFAULT_WINDOW)
        self._streams: dict[int, _Stream] = {}
        self._pings = itertools.count(1)
        self.closed = False
        self.goaway_received = False

    # -- output -----------------------------------------------------------------------

    def data_to_send(self) -> bytes:
        return bytes(self._h2.data_to_send())

    @property
    def accepting_calls(self) -> bool:
        return not (self.closed or self.goaway_received)

    # -- client -----------------------------------------------------------------------

    def start_call(
        self,
        path: str,
        *,
        authority: str,
        scheme: str = "https",
        metadata: Iterable[tuple[str, str]] = (),
        timeout: float | None = None,
    ) -> int:
        """Open a call's stream and write its headers; returns the stream id."""
        if not self.client:
            raise ValueError("start_call is client-only")
        if not self.accepting_calls:
            raise GrpcError(StatusCode.UNAVAILABLE, "connection is closing")
        headers = [
            (":method", "POST"),
            (":scheme", scheme),
            (":path", path),
            (":authority", authority),
            ("te", "trailers"),
            ("content-type", CONTENT_TYPE),
            ("user-agent", USER_AGENT),
        ]
        if timeout is not None:
            headers.append(("grpc-timeout", encode_timeout(timeout)))
        headers += [(k.lower(), v) for k, v in metadata]
        stream_id = int(self._h2.get_next_available_stream_id())
        try:
            self._h2.send_headers(stream_id, headers)
        except h2.exceptions.TooManyStreamsError as exc:
            raise GrpcError(StatusCode.UNAVAILABLE, f"too many concurrent calls: {exc}") from exc
        self._streams[stream_id] = _Stream(MessageReader(self.max_message))
        return stream_id

    def end_call(self, stream_id: int) -> None:
        """Client: half-close (no more messages) once buffered messages are out."""
        stream = self._streams.get(stream_id)
        if stream is not None and not stream.ended:
            stream.end_after_flush = True
            self._flush(stream_id, stream)

    def cancel(self, stream_id: int, code: int = h2.errors.ErrorCodes.CANCEL) -> None:
        """RST_STREAM; forgets the stream. A no-op on a stream already gone."""
        self._streams.pop(stream_id, None)
        if not self.closed:
            with contextlib.suppress(h2.exceptions.H2Error):
                self._h2.reset_stream(stream_id, code)

    # -- server -----------------------------------------------------------------------

    def send_headers(self, stream_id: int, metadata: Iterable[tuple[str, str]] = ()) -> None:
        stream = self._streams.get(stream_id)
        if stream is None or stream.headers_sent:
            return
        stream.headers_sent = True
        headers = [(":status", "200"), ("content-type", CONTENT_TYPE), *metadata]
        self._h2_op(lambda: self._h2.send_headers(stream_id, headers))

    def finish(
        self,
        stream_id: int,
        code: StatusCode,
        message: str = "",
        metadata: Iterable[tuple[str, str]] = (),
    ) -> None:
        """Server: end the call with a status (trailers-only if nothing was sent)."""
        stream = self._streams.get(stream_id)
        if stream is None or stream.trailers is not None:
            return
        trailers = [("grpc-status", str(int(code)))]
        if message:
            trailers.append(("grpc-message", encode_message(message)))
        trailers += list(metadata)
        if not stream.headers_sent:
            stream.headers_sent = True
            head = [(":status", "200"), ("content-type", CONTENT_TYPE), *trailers]
            self._streams.pop(stream_id, None)
            self._h2_op(lambda: self._h2.send_headers(stream_id, head, end_stream=True))
            self._reset_if_open(stream_id)
            return
        stream.trailers = trailers
        self._flush(stream_id, stream)

    def reject(self, stream_id: int, http_status: int) -> None:
        """Server: answer a request that is not gRPC with a bare HTTP status."""
        self._streams.pop(stream_id, None)
        headers = [(":status", str(http_status))]
        self._h2_op(lambda: self._h2.send_headers(stream_id, headers, end_stream=True))
        self._reset_if_open(stream_id)

    # -- both -------------------------------------------------------------------------

    def send_message(self, stream_id: int, message: bytes) -> None:
        stream = self._streams.get(stream_id)
        if stream is None or stream.end_after_flush or stream.trailers is not None:
            raise GrpcError(StatusCode.INTERNAL, f"stream {stream_id} is closed for sending")
        if not self.client and not stream.headers_sent:
            self.send_headers(stream_id)
        stream.out += frame_message(message)
        self._flush(stream_id, stream)

    def acknowledge(self, stream_id: int, size: int) -> None:
        """Credit ``size`` consumed bytes back to the peer (stream and connection)."""
        if size > 0 and not self.closed:
            with contextlib.suppress(h2.exceptions.H2Error):
                self._h2.acknowledge_received_data(size, stream_id)

    def ping(self) -> bytes:
        payload = next(self._pings).to_bytes(8, "big")
        if not self.closed:
            self._h2.ping(payload)
        return payload

    def close(self, code: int = h2.errors.ErrorCodes.NO_ERROR) -> None:
        """GOAWAY with ``code``; the engine accepts nothing afterwards."""
        if self.closed:
            return
        self.closed = True
        with contextlib.suppress(h2.exceptions.H2Error):
            self._h2.close_connection(error_code=code)

    def sending(self, stream_id: int) -> bool:
        """Whether ``stream_id`` can still take messages (it has not ended)."""
        stream = self._streams.get(stream_id)
        return stream is not None and not stream.end_after_flush and stream.trailers is None

    def pending_send(self, stream_id: int) -> int:
        """Bytes of ``stream_id`` still waiting for flow-control window."""
        stream = self._streams.get(stream_id)
        return len(stream.out) if stream else 0

    # -- input ------------------------------------------------------------------------

    def receive_data(self, data: bytes | bytearray) -> list[Event]:
        if self.closed:
            return []
        try:
            h2_events = self._h2.receive_data(data)
        except (h2.exceptions.H2Error, HyperframeError) as exc:
            self.close(error_code(exc))
            return [ConnectionFailed(f"{type(exc).__name__}: {exc}")]
        out: list[Event] = []
        for ev in h2_events:
            handler = _HANDLERS.get(type(ev))
            if handler is not None:
                handler(self, ev, out)
        self._flush_all()  # a WINDOW_UPDATE or SETTINGS may have opened windows
        return out

    def _on_request(self, ev: Any, out: list[Event]) -> None:
        sid = int(ev.stream_id)
        headers = decode_headers(ev.headers)
        pseudo = {k: v for k, v in headers if k.startswith(":")}
        if not _is_grpc(_first(headers, "content-type")):
            self.reject(sid, 415)
            return
        path = pseudo.get(":path", "")
        if pseudo.get(":method") != "POST" or not path.startswith("/"):
            self.reject(sid, 405 if pseudo.get(":method") != "POST" else 400)
            return
        self._streams[sid] = _Stream(MessageReader(self.max_message))
        raw_timeout = _first(headers, "grpc-timeout")
        timeout = decode_timeout(raw_timeout) if raw_timeout is not None else None
        out.append(
            CallStarted(sid, path, pseudo.get(":authority", ""), _user_metadata(headers), timeout)
        )  # END_STREAM on these headers arrives as its own h2 event: HalfClosed follows

    def _on_response(self, ev: Any, out: list[Event]) -> None:
        sid = int(ev.stream_id)
        stream = self._streams.get(sid)
        if stream is None:
            return
        headers = decode_headers(ev.headers)
        status = _first(headers, ":status") or ""
        if status != "200":
            code = status_from_http(int(status)) if status.isdigit() else StatusCode.UNKNOWN
            self._end(sid, out, CallEnded(sid, code, f"HTTP status {status or '?'}"))
            self.cancel(sid, h2.errors.ErrorCodes.NO_ERROR)
            return
        if not _is_grpc(_first(headers, "content-type")):
            self._end(sid, out, CallEnded(sid, StatusCode.UNKNOWN, "response is not gRPC"))
            self.cancel(sid, h2.errors.ErrorCodes.NO_ERROR)
            return
        if ev.stream_ended is not None:  # trailers-only: the status is in these headers
            self._end(sid, out, _ended(sid, headers))
            return
        out.append(ResponseHeaders(sid, _user_metadata(headers)))

    def _on_trailers(self, ev: Any, out: list[Event]) -> None:
        sid = int(ev.stream_id)
        stream = self._streams.get(sid)
        if stream is None:
            return
        if stream.reader.partial:
            self._end(sid, out, CallEnded(sid, StatusCode.INTERNAL, "stream ended mid-message"))
            return
        self._end(sid, out, _ended(sid, decode_headers(ev.headers)))

    def _on_data(self, ev: Any, out: list[Event]) -> None:
        sid = int(ev.stream_id)
        data = bytes(ev.data)
        padding = int(ev.flow_controlled_length) - len(data)
        if padding > 0:
            self.acknowledge(sid, padding)
        stream = self._streams.get(sid)
        if stream is None:  # a stream we already ended: nobody will consume it
            self.acknowledge(sid, len(data))
            return
        try:
            messages = stream.reader.feed(data)
        except GrpcError as exc:
            self.acknowledge(sid, len(data))
            self._stream_failed(sid, exc, out)
            return
        for message in messages:
            out.append(MessageReceived(sid, message, len(message) + PREFIX.size))

    def _stream_failed(self, sid: int, exc: GrpcError, out: list[Event]) -> None:
        if self.client:
            self._end(sid, out, CallEnded(sid, exc.code, exc.message))
            self.cancel(sid)
        else:
            out.append(CallCancelled(sid, h2.errors.ErrorCodes.CANCEL))
            self.finish(sid, exc.code, exc.message)
            self._reset_if_open(sid)

    def _on_stream_ended(self, ev: Any, out: list[Event]) -> None:
        sid = int(ev.stream_id)
        stream = self._streams.get(sid)
        if stream is None:
            return
        if self.client:
            if not stream.ended:
                self._end(sid, out, CallEnded(sid, StatusCode.INTERNAL, "no trailers received"))
            return
        if stream.reader.partial:
            self._stream_failed(
                sid, GrpcError(StatusCode.INTERNAL, "request ended mid-message"), out
            )
            return
        out.append(HalfClosed(sid))

    def _on_reset(self, ev: Any, out: list[Event]) -> None:
        sid = int(ev.stream_id)
        if sid not in self._streams:
            return
        code = int(ev.error_code)
        if self.client:
            status = _RESET_STATUS.get(code, StatusCode.INTERNAL)
            self._end(sid, out, CallEnded(sid, status, f"stream reset by peer (code {code})"))
        else:
            self._streams.pop(sid, None)
            out.append(CallCancelled(sid, code))

    def _on_goaway(self, ev: Any, out: list[Event]) -> None:
        self.goaway_received = True
        out.append(GoAway(int(ev.error_code), int(ev.last_stream_id or 0)))

    def _on_ping_ack(self, ev: Any, out: list[Event]) -> None:
        out.append(PingAcked(bytes(ev.ping_data)))

    # -- helpers ----------------------------------------------------------------------

    def _end(self, sid: int, out: list[Event], event: CallEnded) -> None:
        stream = self._streams.pop(sid, None)
        if stream is not None and not stream.ended:
            stream.ended = True
            out.append(event)

    def _flush_all(self) -> None:
        for sid, stream in list(self._streams.items()):
            if stream.out or stream.end_after_flush or stream.trailers is not None:
                self._flush(sid, stream)

    def _flush(self, sid: int, stream: _Stream) -> None:
        if self.closed:
            return
        try:
            while stream.out:
                window = min(
                    self._h2.local_flow_control_window(sid), self._h2.max_outbound_frame_size
                )
                if window <= 0:
                    return
                chunk = bytes(stream.out[:window])
                del stream.out[:window]
                self._h2.send_data(sid, chunk)
            if stream.end_after_flush:
                stream.end_after_flush = False
                self._h2.end_stream(sid)
            elif stream.trailers is not None:
                trailers, stream.trailers = stream.trailers, None
                self._streams.pop(sid, None)
                self._h2.send_headers(sid, trailers, end_stream=True)
                self._reset_if_open(sid)
        except h2.exceptions.H2Error:
            self._streams.pop(sid, None)  # the stream died under us (reset, closed)

    def _reset_if_open(self, sid: int) -> None:
        """Server: after our final frame, stop a client that is still sending."""
        with contextlib.suppress(h2.exceptions.H2Error, KeyError):
            stream = self._h2.streams.get(sid)
            if stream is not None and stream.state_machine.state is StreamState.HALF_CLOSED_LOCAL:
                self._h2.reset_stream(sid, h2.errors.ErrorCodes.NO_ERROR)

    def _h2_op(self, op: Any) -> None:
        if self.closed:
            return
        with contextlib.suppress(h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            op()


def _ended(sid: int, headers: list[tuple[str, str]]) -> CallEnded:
    raw_message = _first(headers, "grpc-message")
    return CallEnded(
        sid,
        status_code(_first(headers, "grpc-status")),
        decode_message(raw_message) if raw_message else "",
        _user_metadata(headers),
    )


_HANDLERS: dict[type, Any] = {
    h2.events.RequestReceived: GrpcEngine._on_request,
    h2.events.ResponseReceived: GrpcEngine._on_response,
    h2.events.TrailersReceived: GrpcEngine._on_trailers,
    h2.events.DataReceived: GrpcEngine._on_data,
    h2.events.StreamEnded: GrpcEngine._on_stream_ended,
    h2.events.StreamReset: GrpcEngine._on_reset,
    h2.events.ConnectionTerminated: GrpcEngine._on_goaway,
    h2.events.PingAckReceived: GrpcEngine._on_ping_ack,
}
