"""gRPC status codes, the error that carries one, and the header encodings (sans-IO).

Formats follow the gRPC-over-HTTP/2 spec (PROTOCOL-HTTP2.md): ``grpc-message`` is
percent-encoded UTF-8, ``grpc-timeout`` is at most 8 digits and a unit letter.
"""

from __future__ import annotations

import enum
import math
import re
import urllib.parse

from ztunnel.errors import ZtunnelError


class StatusCode(enum.IntEnum):
    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16


class GrpcError(ZtunnelError):
    """A call ended with a non-OK status (from the peer, or decided locally)."""

    def __init__(self, code: StatusCode, message: str = "") -> None:
        self.code = code
        self.message = message
        super().__init__(f"{code.name}: {message}" if message else code.name)


def status_code(value: str | None) -> StatusCode:
    """``grpc-status`` as a code; a missing or unknown value is UNKNOWN (spec)."""
    if value is None or not value.isdigit():
        return StatusCode.UNKNOWN
    try:
        return StatusCode(int(value))
    except ValueError:
        return StatusCode.UNKNOWN


# HTTP status -> gRPC code, for responses that are not gRPC (a proxy's error page).
_HTTP_TO_GRPC = {
    400: StatusCode.INTERNAL,
    401: StatusCode.UNAUTHENTICATED,
    403: StatusCode.PERMISSION_DENIED,
    404: StatusCode.UNIMPLEMENTED,
    429: StatusCode.UNAVAILABLE,
    502: StatusCode.UNAVAILABLE,
    503: StatusCode.UNAVAILABLE,
    504: StatusCode.UNAVAILABLE,
}


def status_from_http(status: int) -> StatusCode:
    return _HTTP_TO_GRPC.get(status, StatusCode.UNKNOWN)


# Unreserved per the spec: printable ASCII except '%'.
_SAFE = "".join(chr(c) for c in range(0x20, 0x7F) if chr(c) != "%")


def encode_message(text: str) -> str:
    return urllib.parse.quote(text, safe=_SAFE)


def decode_message(value: str) -> str:
    # Invalid escapes stay as they are (the spec says decode what can be decoded).
    return urllib.parse.unquote(value, errors="replace")


_UNITS = (("n", 1e-9), ("u", 1e-6), ("m", 1e-3), ("S", 1.0), ("M", 60.0), ("H", 3600.0))
_TIMEOUT = re.compile(r"^([0-9]{1,8})([HMSmun])$")
_MAX_DIGITS = 99_999_999


def encode_timeout(seconds: float) -> str:
    """The finest unit whose value fits in 8 digits (never rounds a deadline down to 0)."""
    seconds = max(seconds, 0.0)
    for unit, scale in _UNITS:
        value = math.ceil(seconds / scale)
        if value <= _MAX_DIGITS:
            return f"{value}{unit}"
    return f"{_MAX_DIGITS}H"


def decode_timeout(value: str) -> float | None:
    """Seconds, or None if ``value`` is not a valid grpc-timeout."""
    match = _TIMEOUT.match(value)
    if match is None:
        return None
    scale = dict(_UNITS)[match.group(2)]
    return int(match.group(1)) * scale
