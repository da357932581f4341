"""SOCKS5 parsing (sans-IO): partial input waits, bad input is refused with the right reply."""

from __future__ import annotations

import pytest

from ztunnel.model.address import HostPort, SocketAddr
from ztunnel.proxy.socks5_proto import (
    Reply,
    Socks5Error,
    Socks5Request,
    encode_method_choice,
    encode_reply,
    parse_greeting,
    parse_request,
)


def test_greeting_of_another_protocol_is_refused() -> None:
    with pytest.raises(Socks5Error):
        parse_greeting(b"\x04\x01\x00\x50")


def test_greeting_offers_no_auth() -> None:
    assert parse_greeting(b"\x05") is None
    assert parse_greeting(b"\x05\x02\x02") is None  # two methods announced, one arrived
    assert parse_greeting(b"\x05\x02\x02\x00rest") == (True, 4)
    assert parse_greeting(b"\x05\x01\x02") == (False, 3)  # only username/password offered
    assert encode_method_choice(True) == b"\x05\x00"
    assert encode_method_choice(False) == b"\x05\xff"


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"\x05\x01\x00\x01\x0a\x00\x00\x01\x00\x50", Socks5Request(SocketAddr.of("10.0.0.1", 80))),
        (
            b"\x05\x01\x00\x04" + bytes(15) + b"\x01" + b"\x1f\x90",
            Socks5Request(SocketAddr.of("::1", 8080)),
        ),
        (b"\x05\x01\x00\x03\x0bexample.com\x00\x50", Socks5Request(HostPort("example.com", 80))),
        # An IPv4-mapped IPv6 address is the IPv4 address, as an address or as a "domain".
        (
            b"\x05\x01\x00\x04" + bytes(10) + b"\xff\xff\x7f\x00\x00\x01" + b"\x3a\x98",
            Socks5Request(SocketAddr.of("127.0.0.1", 15000)),
        ),
        (
            b"\x05\x01\x00\x03\x10::ffff:127.0.0.1\x3a\x99",
            Socks5Request(SocketAddr.of("127.0.0.1", 15001)),
        ),
    ],
)
def test_connect_requests_parse_byte_by_byte(raw: bytes, expected: Socks5Request) -> None:
    for cut in range(len(raw)):
        assert parse_request(raw[:cut]) is None
    assert parse_request(raw + b"early data") == (expected, len(raw))


@pytest.mark.parametrize(
    ("raw", "reply"),
    [
        (b"\x04", Reply.GENERAL_FAILURE),  # SOCKS4
        (b"\x05\x02", Reply.COMMAND_NOT_SUPPORTED),  # BIND
        (b"\x05\x03", Reply.COMMAND_NOT_SUPPORTED),  # UDP ASSOCIATE
        (b"\x05\x01\x00\x07", Reply.ADDRESS_TYPE_NOT_SUPPORTED),
    ],
)
def test_bad_requests_are_refused_as_soon_as_seen(raw: bytes, reply: Reply) -> None:
    with pytest.raises(Socks5Error) as info:
        parse_request(raw)
    assert info.value.reply is reply


def test_replies_encode_the_bound_address() -> None:
    assert encode_reply(Reply.SUCCEEDED) == b"\x05\x00\x00\x01\x00\x00\x00\x00\x00\x00"
    assert encode_reply(Reply.NOT_ALLOWED, SocketAddr.of("::1", 80))[:4] == b"\x05\x02\x00\x04"
