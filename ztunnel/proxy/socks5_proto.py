"""SOCKS5 (RFC 1928) CONNECT, no authentication: the sans-IO part.

The parsers take the bytes received so far and return ``None`` until a whole
message is there, so the driver can feed partial reads. Anything we do not
support is a ``Socks5Error`` carrying the reply code to send before closing.
"""

from __future__ import annotations

import enum
import ipaddress
import struct
from dataclasses import dataclass

from ztunnel.model.address import Authority, HostPort, SocketAddr

VERSION = 5
NO_AUTH = 0
NO_ACCEPTABLE_METHODS = 0xFF
CMD_CONNECT = 1
ATYP_IPV4, ATYP_DOMAIN, ATYP_IPV6 = 1, 3, 4


class Reply(enum.IntEnum):
    SUCCEEDED = 0
    GENERAL_FAILURE = 1
    NOT_ALLOWED = 2
    NETWORK_UNREACHABLE = 3
    HOST_UNREACHABLE = 4
    CONNECTION_REFUSED = 5
    COMMAND_NOT_SUPPORTED = 7
    ADDRESS_TYPE_NOT_SUPPORTED = 8


class Socks5Error(Exception):
    def __init__(self, reply: Reply, message: str) -> None:
        super().__init__(message)
        self.reply = reply


@dataclass(frozen=True, slots=True)
class Socks5Request:
    """A CONNECT request: an address (canonical, so ``::ffff:127.0.0.1`` is 127.0.0.1,
    also when sent as a domain name) or a host name to look up."""

    target: Authority


def parse_greeting(buf: bytes) -> tuple[bool, int] | None:
    """Returns (no-auth offered, bytes consumed), or None if incomplete."""
    if len(buf) < 2:
        return None
    if buf[0] != VERSION:
        raise Socks5Error(Reply.GENERAL_FAILURE, f"not SOCKS5 (version byte {buf[0]})")
    end = 2 + buf[1]
    if len(buf) < end:
        return None
    return NO_AUTH in buf[2:end], end


def parse_request(buf: bytes) -> tuple[Socks5Request, int] | None:
    """Returns (request, bytes consumed), or None if incomplete."""
    # Judge each byte as soon as it arrives: a bad request is refused at once,
    # not after waiting for bytes a confused client will never send.
    if len(buf) >= 1 and buf[0] != VERSION:
        raise Socks5Error(Reply.GENERAL_FAILURE, f"not SOCKS5 (version byte {buf[0]})")
    if len(buf) >= 2 and buf[1] != CMD_CONNECT:
        raise Socks5Error(Reply.COMMAND_NOT_SUPPORTED, f"only CONNECT is supported, got {buf[1]}")
    if len(buf) >= 4 and buf[3] not in (ATYP_IPV4, ATYP_IPV6, ATYP_DOMAIN):
        raise Socks5Error(Reply.ADDRESS_TYPE_NOT_SUPPORTED, f"address type {buf[3]} not supported")
    if len(buf) < 5:
        return None
    atyp = buf[3]
    end = {ATYP_IPV4: 4 + 4, ATYP_IPV6: 4 + 16, ATYP_DOMAIN: 5 + buf[4]}[atyp]
    if len(buf) < end + 2:
        return None
    (port,) = struct.unpack_from("!H", buf, end)
    if atyp == ATYP_IPV4:
        return Socks5Request(SocketAddr(ipaddress.IPv4Address(buf[4:end]), port)), end + 2
    if atyp == ATYP_IPV6:
        return Socks5Request(SocketAddr(ipaddress.IPv6Address(buf[4:end]), port)), end + 2
    return Socks5Request(_named(buf[5:end].decode("ascii", "replace"), port)), end + 2


def _named(host: str, port: int) -> Authority:
    """A domain-name request: an IP literal in text form is that address."""
    try:
        return SocketAddr.of(host, port)
    except ValueError:
        return HostPort(host, port)


def encode_method_choice(accept: bool) -> bytes:
    return bytes([VERSION, NO_AUTH if accept else NO_ACCEPTABLE_METHODS])


_UNSPECIFIED = SocketAddr(ipaddress.IPv4Address(0), 0)


def encode_reply(reply: Reply, bound: SocketAddr = _UNSPECIFIED) -> bytes:
    atyp = ATYP_IPV4 if bound.family == 4 else ATYP_IPV6
    return bytes([VERSION, reply, 0, atyp]) + bound.ip.packed + struct.pack("!H", bound.port)
