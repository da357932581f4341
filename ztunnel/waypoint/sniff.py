"""Which protocol a CONNECT stream carries: declared by the Service port, else sniffed (sans-IO).

Declared (Istio's protocol selection): the port's ``appProtocol`` first
(``http``, ``http2``, ``grpc``, ``grpc-web``, ``kubernetes.io/h2c``, ``tcp``...),
else the port name prefix before ``-`` (``http-web``, ``grpc``, ``tcp-db``).
Anything else is sniffed from the client's first bytes, as Envoy's
http_inspector does: the HTTP/2 connection preface means HTTP/2 with prior
knowledge, an HTTP/1.x request line means HTTP/1.1, anything else (or nothing
within the sniff timeout, e.g. a server-first protocol) is plain TCP.
"""

from __future__ import annotations

import re

from ztunnel.waypoint.messages import Protocol

H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
MAX_SNIFF_BYTES = 8 * 1024

_BY_NAME = {
    "http": Protocol.HTTP1,
    "http1": Protocol.HTTP1,
    "http2": Protocol.HTTP2,
    "h2c": Protocol.HTTP2,
    "kubernetes.io/h2c": Protocol.HTTP2,
    "grpc": Protocol.HTTP2,
    "grpc-web": Protocol.HTTP1,
    "tcp": Protocol.TCP,
    "tls": Protocol.TCP,
    "https": Protocol.TCP,
    "mongo": Protocol.TCP,
    "mysql": Protocol.TCP,
    "redis": Protocol.TCP,
}
_REQUEST_LINE = re.compile(rb"^[A-Z][A-Z-]{0,19} [^ \r\n]+ HTTP/1\.[01]\r?\n")
# A request line still arriving: method, then target, then a prefix of "HTTP/1.x\r".
_VERSION_PREFIXES = (
    b"|".join(re.escape(b"HTTP/1.1\r"[:n]) for n in range(len(b"HTTP/1.1\r") + 1))
    + b"|HTTP/1\\.0\r?"
)
_METHOD_PREFIX = re.compile(rb"^[A-Z][A-Z-]{0,19}( [^ \r\n]*( (" + _VERSION_PREFIXES + rb"))?)?$")


def declared_protocol(app_protocol: str | None, port_name: str | None) -> Protocol | None:
    """The protocol a Service port declares, or None (sniff)."""
    if app_protocol:
        return _BY_NAME.get(app_protocol.lower())
    if port_name:
        return _BY_NAME.get(port_name.lower().split("-", 1)[0])
    return None


def sniff(data: bytes, *, eof: bool = False) -> Protocol | None:
    """The protocol the first bytes show, or None: need more bytes.

    ``eof``: the client sent nothing more (half-closed), so decide with what is there.
    """
    if data.startswith(H2_PREFACE):
        return Protocol.HTTP2
    if H2_PREFACE.startswith(data) and not eof:
        return None  # a prefix of the preface ("PRI * HT...")
    if _REQUEST_LINE.match(data):
        return Protocol.HTTP1
    if len(data) >= MAX_SNIFF_BYTES or eof or not data:
        return Protocol.TCP if data or eof else None
    if b"\n" in data or not _METHOD_PREFIX.match(data):
        return Protocol.TCP
    return None
