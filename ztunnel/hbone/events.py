"""Events the sans-IO HBONE engine hands to its driver.

Our own small frozen types, so drivers never see ``h2.events`` and the h2
dependency stays inside ``engine.py``. Header names and values are ``str``
decoded as latin-1 (never fails; HTTP field values are octets).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum

Headers = tuple[tuple[str, str], ...]


class ErrorCode(IntEnum):
    """HTTP/2 error codes (RFC 9113 §7) used in RST_STREAM and GOAWAY."""

    NO_ERROR = 0x0
    PROTOCOL_ERROR = 0x1
    INTERNAL_ERROR = 0x2
    FLOW_CONTROL_ERROR = 0x3
    SETTINGS_TIMEOUT = 0x4
    STREAM_CLOSED = 0x5
    FRAME_SIZE_ERROR = 0x6
    REFUSED_STREAM = 0x7
    CANCEL = 0x8
    COMPRESSION_ERROR = 0x9
    CONNECT_ERROR = 0xA
    ENHANCE_YOUR_CALM = 0xB
    INADEQUATE_SECURITY = 0xC
    HTTP_1_1_REQUIRED = 0xD


# ztunnel (src/proxy/h2.rs) treats RST_STREAM NO_ERROR/CANCEL as a clean end.
EOF_RESET_CODES = frozenset({ErrorCode.NO_ERROR, ErrorCode.CANCEL})


@dataclass(frozen=True, slots=True)
class ConnectRequest:
    """Server side: the peer opened a stream. ``headers`` excludes pseudo-headers."""

    stream_id: int
    method: str
    authority: str
    headers: Headers = ()

    def header(self, name: str) -> str | None:
        """First value of header ``name`` (lower-case), or None."""
        return next((v for k, v in self.headers if k == name), None)


@dataclass(frozen=True, slots=True)
class Response:
    """Client side: the final (non-1xx) response to our CONNECT."""

    stream_id: int
    status: int
    headers: Headers = ()


@dataclass(slots=True)
class Data:
    """Stream payload. The driver must ``acknowledge(stream_id, len(data))`` once
    the bytes are written onward; padding is acknowledged by the engine itself.

    Not frozen, unlike the other events: one is made per DATA frame, and a frozen
    dataclass's ``__init__`` pays an ``object.__setattr__`` call per field. Treat it
    as read-only all the same."""

    stream_id: int
    data: bytes = field(repr=False)  # may be megabytes; keep logs readable
    flow_controlled_length: int


@dataclass(frozen=True, slots=True)
class StreamEnded:
    """The peer sent END_STREAM: no more data will arrive on this stream."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class StreamReset:
    """The stream was reset (by the peer if ``remote``)."""

    stream_id: int
    error_code: int
    remote: bool = True

    @property
    def is_eof(self) -> bool:
        return self.error_code in EOF_RESET_CODES


@dataclass(frozen=True, slots=True)
class GoAwayReceived:
    """The peer will accept no new streams. Streams with id <= last_stream_id may
    complete if ``error_code`` is NO_ERROR; a non-zero code means the peer is gone."""

    error_code: int
    last_stream_id: int


@dataclass(frozen=True, slots=True)
class ConnectionClosed:
    """We detected a fatal error from the peer (malformed input, flow-control
    violation, a budget exceeded...). A GOAWAY with ``error_code`` is queued; flush,
    then close. ``limit`` names the limit the peer went over (``limits.Limit``), if any."""

    error_code: int
    last_stream_id: int
    reason: str = ""
    limit: str | None = None


@dataclass(frozen=True, slots=True)
class PingAcked:
    """The peer answered one of our PINGs."""

    payload: bytes


@dataclass(frozen=True, slots=True)
class WindowOpened:
    """Send window grew: on one stream, or on the connection (``stream_id`` None),
    which may unblock every stream."""

    stream_id: int | None


@dataclass(frozen=True, slots=True)
class SettingsChanged:
    """The peer's SETTINGS changed; ``max_concurrent_streams`` is the new value."""

    max_concurrent_streams: int


Event = (
    ConnectRequest
    | Response
    | Data
    | StreamEnded
    | StreamReset
    | GoAwayReceived
    | ConnectionClosed
    | PingAcked
    | WindowOpened
    | SettingsChanged
)
