"""What every HTTP/2 engine around ``h2`` does the same way at the h2 boundary (sans-IO).

The gRPC engine and the waypoint's HTTP/2 protocol turn h2's headers into ``str`` pairs and
an h2 failure into the HTTP/2 error code of the GOAWAY, here and nowhere else.
(``hbone/engine.py`` still has its own copies; it is being changed on another branch.)
"""

from __future__ import annotations

from collections.abc import Iterable

import h2.errors


def decode_headers(headers: Iterable[tuple[bytes | str, bytes | str]]) -> list[tuple[str, str]]:
    """h2's header pairs as text. Latin-1: every byte maps to one character, so a value that
    is not UTF-8 neither fails nor changes length, and re-encoding restores the bytes."""
    out = []
    for k, v in headers:
        key = k.decode("latin-1") if isinstance(k, bytes) else k
        value = v.decode("latin-1") if isinstance(v, bytes) else v
        out.append((key, value))
    return out


def error_code(exc: Exception) -> int:
    """The HTTP/2 error code for a failure ``h2`` (or ``hyperframe``) raised while reading:
    its own code (e.g. FLOW_CONTROL_ERROR, FRAME_SIZE_ERROR), else PROTOCOL_ERROR."""
    return int(getattr(exc, "error_code", None) or h2.errors.ErrorCodes.PROTOCOL_ERROR)
