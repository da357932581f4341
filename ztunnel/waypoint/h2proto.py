"""Sans-IO HTTP/2 for the waypoint: request/response streams around ``h2`` (client or server).

Unlike ``hbone.engine`` (CONNECT tunnels only) this speaks full HTTP/2: request
and response heads with pseudo-headers, bodies, trailers (gRPC), informational
responses. The driver feeds bytes to ``receive_data`` and sends what
``data_to_send`` returns; no I/O here.

Error handling: whatever ``h2`` treats as a connection error (malformed
frames, header blocks over ``max_header_list_size``, requests without
``:path``, flow-control violations) becomes ``ConnectionFailed`` with the
HTTP/2 error code; ``h2`` has already queued the GOAWAY carrying that code, so
the driver only flushes and closes. Received DATA is acknowledged (window
released) only when the consumer calls ``acknowledge``: a slow upstream or
client stops its peer at the window, memory stays bounded.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
from hyperframe.exceptions import HyperframeError
from hyperframe.frame import GoAwayFrame

from ztunnel.h2wire import decode_headers, error_code
from ztunnel.hbone.events import ErrorCode
from ztunnel.waypoint.messages import Headers, RequestHead, ResponseHead, strip_hop_by_hop

KIB = 1024
MIB = 1024 * KIB
_DEFAULT_WINDOW = 65_535


@dataclass(frozen=True, slots=True)
class H2Limits:
    max_concurrent_streams: int = 100  # Istio's waypoint advertises 100
    stream_window: int = 1 * MIB
    connection_window: int = 16 * MIB
    max_frame_size: int = 16 * KIB
    max_header_list_size: int = 60 * KIB  # Envoy's max_request_headers_kb default


# -- events ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RequestReceived:
    stream_id: int
    head: RequestHead
    end_stream: bool


@dataclass(frozen=True, slots=True)
class ResponseReceived:
    stream_id: int
    head: ResponseHead
    end_stream: bool


@dataclass(frozen=True, slots=True)
class InformationalReceived:
    stream_id: int
    head: ResponseHead


@dataclass(frozen=True, slots=True)
class DataReceived:
    stream_id: int
    data: bytes = field(repr=False)
    flow_controlled_length: int


@dataclass(frozen=True, slots=True)
class TrailersReceived:
    stream_id: int
    headers: Headers


@dataclass(frozen=True, slots=True)
class StreamEnded:
    stream_id: int


@dataclass(frozen=True, slots=True)
class StreamReset:
    stream_id: int
    error_code: int
    remote: bool = True


@dataclass(frozen=True, slots=True)
class GoAwayReceived:
    error_code: int
    last_stream_id: int


@dataclass(frozen=True, slots=True)
class WindowOpened:
    stream_id: int | None  # None: the connection window (every stream may proceed)


@dataclass(frozen=True, slots=True)
class ConnectionFailed:
    """A connection error: the GOAWAY with ``error_code`` is queued; flush, then close."""

    error_code: int
    reason: str


@dataclass(frozen=True, slots=True)
class BadRequest:
    """A request head we refuse (CONNECT, no authority): answer ``status`` on the stream."""

    stream_id: int
    status: int
    reason: str


Event = (
    RequestReceived
    | ResponseReceived
    | InformationalReceived
    | DataReceived
    | TrailersReceived
    | StreamEnded
    | StreamReset
    | GoAwayReceived
    | WindowOpened
    | ConnectionFailed
    | BadRequest
)


class StreamGone(Exception):
    """An operation on a stream (or connection) that is already closed."""


class _H2Connection(h2.connection.H2Connection):
    """h2 whose received GOAWAY leaves open streams usable (h2 would close them all);
    the same fix as ``hbone.engine``: RFC 9113 §6.8 lets streams below the last id finish."""

    def _receive_goaway_frame(self, frame: GoAwayFrame) -> tuple[list[Any], list[Any]]:
        event = h2.events.ConnectionTerminated()
        event.error_code = frame.error_code
        event.last_stream_id = frame.last_stream_id
        event.additional_data = frame.additional_data or None
        return [], [event]


def _split(headers: list[tuple[str, str]]) -> tuple[dict[str, str], Headers]:
    pseudo = {k: v for k, v in headers if k.startswith(":")}
    return pseudo, tuple((k, v) for k, v in headers if not k.startswith(":"))


class H2Protocol:
    """One HTTP/2 connection carrying ordinary HTTP exchanges."""

    def __init__(self, *, client: bool, limits: H2Limits | None = None) -> None:
        self.client = client
        self.limits = limits or H2Limits()
        config = h2.config.H2Configuration(client_side=client, header_encoding=None)
        self._h2 = _H2Connection(config=config)
        codes = h2.settings.SettingCodes
        values = {
            codes.INITIAL_WINDOW_SIZE: self.limits.stream_window,
            codes.MAX_FRAME_SIZE: self.limits.max_frame_size,
            codes.MAX_HEADER_LIST_SIZE: self.limits.max_header_list_size,
            codes.ENABLE_PUSH: 0,
        }
        if not client:
            values[codes.MAX_CONCURRENT_STREAMS] = self.limits.max_concurrent_streams
        self._h2.local_settings = h2.settings.Settings(client=client, initial_values=values)
        # Initial values apply at once; refresh the limits h2 derived in __init__.
        self._h2.max_inbound_frame_size = self.limits.max_frame_size
        self._h2.decoder.max_header_list_size = self.limits.max_header_list_size
        self._h2.initiate_connection()
        extra = self.limits.connection_window - _DEFAULT_WINDOW
        if extra > 0:
            self._h2.increment_flow_control_window(extra)
        self.closed = False
        self.draining = False
        self.goaway_received = False
        self._extra: list[bytes] = []
        self._pending = 0

    # -- output --------------------------------------------------------------------------------

    def _pull(self) -> None:
        chunk = self._h2.data_to_send()
        if chunk:
            self._extra.append(bytes(chunk))
            self._pending += len(chunk)

    def data_to_send(self) -> bytes:
        """Everything queued for the peer, in order; empties the queue."""
        self._pull()
        out = b"".join(self._extra)
        self._extra = []
        self._pending = 0
        return out

    @property
    def pending_output(self) -> int:
        """Bytes queued for the peer and not yet collected."""
        self._pull()
        return self._pending

    # -- state ---------------------------------------------------------------------------------

    @property
    def peer_max_concurrent_streams(self) -> int:
        return int(self._h2.remote_settings.max_concurrent_streams)

    @property
    def open_outbound_streams(self) -> int:
        return int(self._h2.open_outbound_streams)

    @property
    def accepting_streams(self) -> bool:
        return not (self.closed or self.goaway_received or self.draining)

    def send_window(self, stream_id: int) -> int:
        try:
            return int(self._h2.local_flow_control_window(stream_id))
        except h2.exceptions.H2Error:
            return 0

    # -- sending -------------------------------------------------------------------------------

    def send_request(self, head: RequestHead, *, end_stream: bool) -> int:
        """Client: open a stream with ``head``; returns its id."""
        if not self.accepting_streams:
            raise StreamGone("connection closed or going away")
        stream_id = int(self._h2.get_next_available_stream_id())
        pseudo = [
            (":method", head.method),
            (":scheme", head.scheme),
            (":authority", head.authority),
            (":path", head.target),
        ]
        headers = [(k, v) for k, v in strip_hop_by_hop(head.headers) if k != "host"]
        with self._op(stream_id):
            self._h2.send_headers(stream_id, pseudo + headers, end_stream=end_stream)
        return stream_id

    def send_response(self, stream_id: int, head: ResponseHead, *, end_stream: bool) -> None:
        headers = [(":status", str(head.status)), *strip_hop_by_hop(head.headers)]
        with self._op(stream_id):
            self._h2.send_headers(stream_id, headers, end_stream=end_stream)

    def send_data(self, stream_id: int, data: bytes | memoryview) -> int:
        """Queue what flow control allows now; returns the bytes taken."""
        with self._op(stream_id):
            window = self._h2.local_flow_control_window(stream_id)
            total = min(len(data), window)
            frame = self._h2.max_outbound_frame_size
            view = memoryview(data)
            for start in range(0, total, frame):
                self._h2.send_data(stream_id, bytes(view[start : min(start + frame, total)]))
            return total

    def send_trailers(self, stream_id: int, headers: Headers) -> None:
        """Trailers end the stream (HEADERS with END_STREAM)."""
        with self._op(stream_id):
            self._h2.send_headers(stream_id, list(headers), end_stream=True)

    def end_stream(self, stream_id: int) -> None:
        with self._op(stream_id):
            self._h2.end_stream(stream_id)

    def reset(self, stream_id: int, code: int = ErrorCode.CANCEL) -> None:
        """RST_STREAM; a no-op when the stream or connection is gone."""
        if self.closed:
            return
        with contextlib.suppress(h2.exceptions.H2Error):
            self._h2.reset_stream(stream_id, code)

    def acknowledge(self, stream_id: int, n: int) -> None:
        """Release ``n`` received bytes of window (stream and connection)."""
        if n <= 0 or self.closed:
            return
        with contextlib.suppress(h2.exceptions.H2Error):
            self._h2.acknowledge_received_data(n, stream_id)

    def drain(self) -> None:
        """Graceful GOAWAY(NO_ERROR): the peer opens no new streams, open ones finish.

        Written by hand: h2's ``close_connection`` would also close every open stream.
        """
        if self.closed or self.draining:
            return
        self.draining = True
        last = int(self._h2.highest_inbound_stream_id)
        frame = GoAwayFrame(stream_id=0, last_stream_id=last, error_code=ErrorCode.NO_ERROR)
        self._pull()  # keep frame order
        raw = frame.serialize()
        self._extra.append(raw)
        self._pending += len(raw)

    def close(self, code: int = ErrorCode.NO_ERROR) -> None:
        """Final GOAWAY with ``code``; nothing is accepted afterwards."""
        if self.closed:
            return
        self.closed = True
        if self._h2.state_machine.state is not h2.connection.ConnectionState.CLOSED:
            with contextlib.suppress(h2.exceptions.H2Error):
                self._h2.close_connection(error_code=code)

    def ping(self, payload: bytes) -> None:
        with contextlib.suppress(h2.exceptions.H2Error):
            self._h2.ping(payload)

    def _op(self, stream_id: int) -> _StreamOp:
        if self.closed:
            raise StreamGone(f"stream {stream_id}: connection closed")
        return _StreamOp(stream_id)

    # -- receiving -----------------------------------------------------------------------------

    def receive_data(self, data: bytes) -> list[Event]:
        if self.closed:
            return []
        self._pull()  # h2 may reset its buffer on errors; keep what was queued
        try:
            h2_events = self._h2.receive_data(data)
        except (h2.exceptions.H2Error, HyperframeError) as exc:
            self.closed = True
            return [ConnectionFailed(error_code(exc), f"{type(exc).__name__}: {exc}")]
        out: list[Event] = []
        for ev in h2_events:
            handler = _HANDLERS.get(type(ev))
            if handler is not None:
                handler(self, ev, out)
        return out

    def _on_request(self, ev: Any, out: list[Event]) -> None:
        sid = int(ev.stream_id)
        pseudo, headers = _split(decode_headers(ev.headers))
        method = pseudo.get(":method", "")
        authority = pseudo.get(":authority") or next((v for k, v in headers if k == "host"), "")
        if method == "CONNECT":
            out.append(BadRequest(sid, 405, "CONNECT is not proxied by the waypoint"))
            return
        if not authority:
            out.append(BadRequest(sid, 400, "request without :authority or host"))
            return
        head = RequestHead(
            method,
            pseudo.get(":path", "/"),
            authority,
            tuple((k, v) for k, v in headers if k != "host"),
            pseudo.get(":scheme", "http"),
            "2",
        )
        out.append(RequestReceived(sid, head, ev.stream_ended is not None))

    def _on_response(self, ev: Any, out: list[Event]) -> None:
        pseudo, headers = _split(decode_headers(ev.headers))
        status = pseudo.get(":status", "")
        head = ResponseHead(int(status) if status.isdigit() else 502, headers)
        out.append(ResponseReceived(int(ev.stream_id), head, ev.stream_ended is not None))

    def _on_informational(self, ev: Any, out: list[Event]) -> None:
        pseudo, headers = _split(decode_headers(ev.headers))
        status = pseudo.get(":status", "100")
        head = ResponseHead(int(status) if status.isdigit() else 100, headers)
        out.append(InformationalReceived(int(ev.stream_id), head))

    def _on_trailers(self, ev: Any, out: list[Event]) -> None:
        _, headers = _split(decode_headers(ev.headers))
        out.append(TrailersReceived(int(ev.stream_id), headers))

    def _on_data(self, ev: Any, out: list[Event]) -> None:
        sid, data = int(ev.stream_id), bytes(ev.data)
        padding = int(ev.flow_controlled_length) - len(data)
        if padding > 0:
            self.acknowledge(sid, padding)
        if data:
            out.append(DataReceived(sid, data, int(ev.flow_controlled_length)))

    def _on_ended(self, ev: Any, out: list[Event]) -> None:
        out.append(StreamEnded(int(ev.stream_id)))

    def _on_reset(self, ev: Any, out: list[Event]) -> None:
        out.append(StreamReset(int(ev.stream_id), int(ev.error_code), bool(ev.remote_reset)))

    def _on_goaway(self, ev: Any, out: list[Event]) -> None:
        self.goaway_received = True
        out.append(GoAwayReceived(int(ev.error_code), int(ev.last_stream_id or 0)))

    def _on_window(self, ev: Any, out: list[Event]) -> None:
        out.append(WindowOpened(int(ev.stream_id) or None))

    def _on_settings(self, ev: Any, out: list[Event]) -> None:
        out.append(WindowOpened(None))


class _StreamOp:
    def __init__(self, stream_id: int) -> None:
        self.stream_id = stream_id

    def __enter__(self) -> None:
        return None

    def __exit__(self, tp: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        if isinstance(exc, h2.exceptions.StreamClosedError | h2.exceptions.ProtocolError):
            raise StreamGone(f"stream {self.stream_id}: {exc}") from exc


_HANDLERS: dict[type, Any] = {
    h2.events.RequestReceived: H2Protocol._on_request,
    h2.events.ResponseReceived: H2Protocol._on_response,
    h2.events.InformationalResponseReceived: H2Protocol._on_informational,
    h2.events.TrailersReceived: H2Protocol._on_trailers,
    h2.events.DataReceived: H2Protocol._on_data,
    h2.events.StreamEnded: H2Protocol._on_ended,
    h2.events.StreamReset: H2Protocol._on_reset,
    h2.events.ConnectionTerminated: H2Protocol._on_goaway,
    h2.events.WindowUpdated: H2Protocol._on_window,
    h2.events.RemoteSettingsChanged: H2Protocol._on_settings,
}
