"""Errors of the HBONE layer (all under ztunnel.errors.ZtunnelError)."""

from __future__ import annotations

from ztunnel.errors import ZtunnelError
from ztunnel.hbone.events import Headers


class HboneError(ZtunnelError):
    """Base class of HBONE protocol/driver errors."""


class HboneStatusError(HboneError):
    """The peer answered our CONNECT with a non-200 status (ztunnel's HttpStatus)."""

    def __init__(self, status: int, headers: Headers = ()) -> None:
        self.status = status
        self.headers = headers
        super().__init__(f"HBONE CONNECT rejected with HTTP status {status}")


class StreamClosedError(HboneError):
    """An operation on a stream that is already closed or reset."""


class ConnectionGoneError(HboneError):
    """The HTTP/2 connection is closed or draining: no new streams can be opened."""


class StreamRefusedError(ConnectionGoneError):
    """The peer refused our stream before processing it (REFUSED_STREAM, or a GOAWAY whose
    last stream id is below it): nothing reached the app, so a retry is safe (RFC 9113 §8.7)."""


class TLSHandshakeError(HboneError):
    """The TLS handshake failed or timed out (ztunnel's TLS_FAILURE flag)."""


class TLSHandshakeTimeout(TLSHandshakeError):
    """The TLS handshake did not finish within its timeout (a limit: counted)."""
