"""HBONE: HTTP/2 CONNECT over mutual TLS (sans-IO engine, trio drivers, client pool)."""

from __future__ import annotations

from ztunnel.hbone.connection import (
    Handler,
    HboneClientConnection,
    HboneServerConnection,
    HboneServerStream,
    serve_hbone,
)
from ztunnel.hbone.engine import HboneEngine, StreamState, parse_authority, validate_connect
from ztunnel.hbone.errors import (
    ConnectionGoneError,
    HboneError,
    HboneStatusError,
    StreamClosedError,
    TLSHandshakeError,
    TLSHandshakeTimeout,
)
from ztunnel.hbone.events import ConnectRequest, ErrorCode
from ztunnel.hbone.pool import HbonePool, PoolKey
from ztunnel.hbone.settings import HboneSettings
from ztunnel.hbone.stream import HboneStream, StreamEvents, StreamHost
from ztunnel.hbone.tlsstream import TLSStream, tls_handshake

__all__ = [
    "ConnectRequest",
    "ConnectionGoneError",
    "ErrorCode",
    "Handler",
    "HboneClientConnection",
    "HboneEngine",
    "HboneError",
    "HbonePool",
    "HboneServerConnection",
    "HboneServerStream",
    "HboneSettings",
    "HboneStatusError",
    "HboneStream",
    "PoolKey",
    "StreamClosedError",
    "StreamEvents",
    "StreamHost",
    "StreamState",
    "TLSHandshakeError",
    "TLSHandshakeTimeout",
    "TLSStream",
    "parse_authority",
    "serve_hbone",
    "tls_handshake",
    "validate_connect",
]
