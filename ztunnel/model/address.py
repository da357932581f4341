"""Socket addresses: parsed once where they enter the agent, formatted only at the edges.

``SocketAddr`` is the one value type for "an IP and a port" on every path of a
connection (accept, original destination, resolution, pool keys, telemetry).
Its IP is always *canonical*: an IPv4-mapped IPv6 address (``::ffff:1.2.3.4``)
becomes plain IPv4 and a zone (``%eth0``) is dropped, as ztunnel's
``to_canonical``; so equality and checks such as "is this loopback" cannot be
fooled by an alternative spelling of the same address.

``HostPort`` is an authority whose host is a name (a service hostname in an
HBONE ``:authority``); ``Authority`` is either.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Any, TypeVar

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
_V = TypeVar("_V")


# Parsed texts (the kernel's peer and local addresses, HBONE authorities): each address is
# parsed once, not per connection. Values are immutable; the bound caps what a stream of
# peer-chosen texts can hold (the cache starts over when full).
MAX_PARSED = 4096
_parsed_ips: dict[str, IPAddress] = {}
_parsed_authorities: dict[str, Authority] = {}


def canonical_ip(ip: IPAddress | str) -> IPAddress:
    """Parse ``ip`` (a zone is dropped) and unmap IPv4-mapped IPv6. Raises ValueError."""
    if isinstance(ip, str):
        parsed = _parsed_ips.get(ip)
        if parsed is None:
            parsed = _canonical(ipaddress.ip_address(ip.split("%", 1)[0].strip("[]")))
            _remember(_parsed_ips, ip, parsed)
        return parsed
    return _canonical(ip)


def _remember(cache: dict[str, _V], key: str, value: _V) -> None:
    if len(cache) >= MAX_PARSED:
        cache.clear()
    cache[key] = value


def _canonical(ip: IPAddress) -> IPAddress:
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return ip.ipv4_mapped
        if ip.scope_id is not None:
            return ipaddress.IPv6Address(str(ip).split("%", 1)[0])
    return ip


def format_hostport(host: str, port: int) -> str:
    """``host:port``, with brackets around an IPv6 literal."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass(frozen=True, slots=True, order=True)
class SocketAddr:
    """A canonical IP and a TCP port."""

    ip: IPAddress
    port: int
    # str() of this address, made on first use (logs, config dump, headers format it often).
    _text: str | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port {self.port} out of range 0..65535")
        if type(self.ip) is not ipaddress.IPv4Address:  # an IPv4Address is canonical as is
            canonical = canonical_ip(self.ip)
            if canonical != self.ip or type(canonical) is not type(self.ip):
                object.__setattr__(self, "ip", canonical)

    @classmethod
    def of(cls, ip: IPAddress | str, port: int) -> SocketAddr:
        return cls(canonical_ip(ip), int(port))

    @classmethod
    def parse(cls, text: str) -> SocketAddr:
        """``1.2.3.4:80`` or ``[::1]:80``; raises ValueError for anything else."""
        host, sep, port = text.strip().rpartition(":")
        if not sep or not port.isdigit():
            raise ValueError(f"expected ip:port or [ipv6]:port, got {text!r}")
        if ":" in host and not (host.startswith("[") and host.endswith("]")):
            raise ValueError(f"an IPv6 address needs brackets: {text!r}")
        return cls.of(host, int(port))

    @classmethod
    def from_sockaddr(cls, raw: tuple[Any, ...]) -> SocketAddr:
        """From what ``socket.getsockname()``/``getpeername()``/``accept()`` return."""
        return cls.of(str(raw[0]), int(raw[1]))

    @property
    def family(self) -> int:
        """4 or 6."""
        return self.ip.version

    def sockaddr(self) -> tuple[str, int]:
        """For ``socket.connect``/``bind`` on a socket of this address's family."""
        return str(self.ip), self.port

    def __str__(self) -> str:
        text = self._text
        if text is None:
            text = format_hostport(str(self.ip), self.port)
            object.__setattr__(self, "_text", text)
        return text


@dataclass(frozen=True, slots=True, order=True)
class HostPort:
    """An authority naming a host (not an IP), e.g. ``echo.demo.svc.cluster.local:80``."""

    host: str
    port: int

    def __str__(self) -> str:
        return format_hostport(self.host, self.port)


Authority = SocketAddr | HostPort


def parse_authority(text: str) -> Authority:
    """An HBONE ``:authority``: ``ip:port``, ``[v6]:port`` or ``host:port``. Raises ValueError."""
    parsed = _parsed_authorities.get(text)
    if parsed is None:
        parsed = _parse_authority(text)
        _remember(_parsed_authorities, text, parsed)
    return parsed


def _parse_authority(text: str) -> Authority:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"authority {text!r} is not host:port")
    try:
        return SocketAddr.parse(text)
    except ValueError:
        if ":" in host or "[" in host:
            raise
        return HostPort(host, int(port))
