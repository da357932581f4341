"""Protocol-neutral HTTP message heads shared by the HTTP/1.1 and HTTP/2 cores (sans-IO).

Header names are lower-case ``str`` (latin-1 decoded: never fails), without
HTTP/2 pseudo-headers and without hop-by-hop headers, which belong to one
connection and are dropped when a message crosses the proxy (RFC 9110 §7.6.1;
Envoy does the same): ``connection`` and the headers it names, ``keep-alive``,
``proxy-connection``, ``transfer-encoding``, ``upgrade`` (kept for an upgrade
request), ``te`` except ``te: trailers`` (gRPC needs it).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, replace
from urllib.parse import unquote

from ztunnel.policy.l7match import normalize_path

Headers = tuple[tuple[str, str], ...]

_HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade", "te"}
)


class Protocol(enum.Enum):
    """What the waypoint speaks on one CONNECT stream."""

    HTTP1 = "http/1.1"
    HTTP2 = "h2"
    TCP = "tcp"


def header_value(headers: Headers, name: str) -> str | None:
    """All values of ``name`` joined by ``,`` (RFC 9110 §5.3), None when absent."""
    found = [v for k, v in headers if k == name]
    return ",".join(found) if found else None


def strip_hop_by_hop(headers: Headers, *, keep_upgrade: bool = False) -> Headers:
    named = set()
    for k, v in headers:
        if k == "connection":
            named |= {t.strip().lower() for t in v.split(",") if t.strip()}
    out = []
    for k, v in headers:
        if k == "te" and v.strip().lower() == "trailers":
            out.append((k, "trailers"))
            continue
        if keep_upgrade and k == "upgrade":
            out.append((k, v))
            continue
        if k in _HOP_BY_HOP or (k in named and not (keep_upgrade and k == "upgrade")):
            continue
        out.append((k, v))
    return tuple(out)


def is_upgrade(headers: Headers) -> bool:
    """An HTTP/1.1 protocol upgrade request (``Connection: upgrade`` + ``Upgrade``)."""
    conn = header_value(headers, "connection") or ""
    tokens = {t.strip().lower() for t in conn.split(",")}
    return "upgrade" in tokens and header_value(headers, "upgrade") is not None


def is_grpc(headers: Headers) -> bool:
    ctype = (header_value(headers, "content-type") or "").lower()
    return ctype == "application/grpc" or ctype.startswith(
        ("application/grpc+", "application/grpc;")
    )


@dataclass(frozen=True, slots=True)
class RequestHead:
    method: str
    target: str  # origin-form path + query as received (or "*")
    authority: str  # Host / :authority
    headers: Headers = ()
    scheme: str = "http"
    version: str = "1.1"  # "1.0", "1.1" or "2"

    @property
    def path(self) -> str:
        """Normalized path without query: what routes and policies match."""
        return normalize_path(self.target)

    @property
    def query(self) -> str:
        _, sep, query = self.target.partition("?")
        return query.split("#", 1)[0] if sep else ""

    def query_param(self, name: str) -> str | None:
        """The first value of query parameter ``name`` (percent-decoded), None if absent."""
        for part in self.query.split("&"):
            key, _, value = part.partition("=")
            if unquote(key) == name:
                return unquote(value)
        return None

    def header(self, name: str) -> str | None:
        return header_value(self.headers, name)

    @property
    def host(self) -> str:
        """The authority without its port, lower-case."""
        return split_authority(self.authority)[0]

    @property
    def grpc(self) -> bool:
        return is_grpc(self.headers)

    def with_headers(self, headers: Headers) -> RequestHead:
        return replace(self, headers=headers)


@dataclass(frozen=True, slots=True)
class ResponseHead:
    status: int
    headers: Headers = ()

    def header(self, name: str) -> str | None:
        return header_value(self.headers, name)


def split_authority(authority: str) -> tuple[str, int | None]:
    """``host[:port]`` / ``[v6][:port]`` -> (lower-case host, port or None)."""
    text = authority.strip()
    if text.startswith("["):
        end = text.find("]")
        host, rest = text[1:end] if end > 0 else text, text[end + 1 :] if end > 0 else ""
        port_text = rest[1:] if rest.startswith(":") else ""
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep or not _is_port(port_text):
            host, port_text = text, ""
    port = int(port_text) if _is_port(port_text) and 0 < int(port_text) < 65536 else None
    return host.lower(), port


def _is_port(text: str) -> bool:
    # ASCII digits only: str.isdigit() also accepts "²" (which int() refuses, so a Host
    # header "c:8²" raised ValueError out of routing) and other scripts' digits.
    return text.isascii() and text.isdigit()
