"""The outbound listener's view of a redirected connection: SO_ORIGINAL_DST, IPv4 and IPv6."""

from __future__ import annotations

import secrets
import socket
from collections.abc import Iterator

import pytest

from ztunnel.model.address import SocketAddr
from ztunnel.proxy.sockets import NetnsSocketFactory, make_listener, original_dst
from ztunnel.redirect.netns import NetNamespace, create_named, delete_named

pytestmark = pytest.mark.root


@pytest.fixture
def netns() -> Iterator[NetNamespace]:
    name = f"zt{secrets.token_hex(3)}-origdst"
    ns = create_named(name)
    try:
        ns.run(["ip", "-6", "addr", "add", "fd00:5::1/128", "dev", "lo", "nodad"])
        ns.run(["ip", "addr", "add", "10.99.0.1/32", "dev", "lo"])
        for tool, dst in (("iptables", "10.99.0.1"), ("ip6tables", "fd00:5::1")):
            ns.run(
                [
                    tool,
                    "-t",
                    "nat",
                    "-A",
                    "OUTPUT",
                    "-p",
                    "tcp",
                    "-d",
                    dst,
                    "--dport",
                    "80",
                    "-j",
                    "REDIRECT",
                    "--to-ports",
                    "15001",
                ]
            )
        yield ns
    finally:
        ns.close()
        delete_named(name)


@pytest.mark.parametrize(
    ("family", "dst"), [(socket.AF_INET, "10.99.0.1"), (socket.AF_INET6, "fd00:5::1")]
)
def test_original_destination_survives_redirect(netns: NetNamespace, family: int, dst: str) -> None:
    listener, _ = make_listener(NetnsSocketFactory(netns, None), ("::", 15001))
    with listener, netns.socket(family, socket.SOCK_STREAM) as client:
        listener.setblocking(True)
        client.settimeout(5)
        client.connect((dst, 80))
        conn, _ = listener.accept()
        with conn:
            # The socket's own address is the redirect target; the original is kept.
            assert conn.getsockname()[1] == 15001
            assert original_dst(conn) == SocketAddr.of(dst, 80)


def test_without_redirect_the_local_address_is_the_destination(netns: NetNamespace) -> None:
    listener, _ = make_listener(NetnsSocketFactory(netns, None), ("::", 15001))
    with listener, netns.socket(socket.AF_INET, socket.SOCK_STREAM) as client:
        listener.setblocking(True)
        client.settimeout(5)
        client.connect(("10.99.0.1", 15001))
        conn, _ = listener.accept()
        with conn:
            assert original_dst(conn) == SocketAddr.of("10.99.0.1", 15001)
