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
    host: str  # an IP literal or a domain name
    port: int
    is_domain: bool


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
    if atyp == ATYP_IPV4:
        end = 4 + 4
        host = str(ipaddress.IPv4Address(buf[4:end])) if len(buf) >= end else ""
    elif atyp == ATYP_IPV6:
        end = 4 + 16
        host = str(ipaddress.IPv6Address(buf[4:end])) if len(buf) >= end else ""
    elif atyp == ATYP_DOMAIN:
        end = 5 + buf[4]
        host = buf[5:end].decode("ascii", "replace") if len(buf) >= end else ""
    else:
        raise Socks5Error(Reply.ADDRESS_TYPE_NOT_SUPPORTED, f"address type {atyp} not supported")
    if len(buf) < end + 2:
        return None
    (port,) = struct.unpack_from("!H", buf, end)
    return Socks5Request(host, port, atyp == ATYP_DOMAIN), end + 2


def encode_method_choice(accept: bool) -> bytes:
    return bytes([VERSION, NO_AUTH if accept else NO_ACCEPTABLE_METHODS])


def encode_reply(reply: Reply, bound: tuple[str, int] = ("0.0.0.0", 0)) -> bytes:
    ip = ipaddress.ip_address(bound[0])
    atyp = ATYP_IPV4 if ip.version == 4 else ATYP_IPV6
    return bytes([VERSION, reply, 0, atyp]) + ip.packed + struct.pack("!H", bound[1])
