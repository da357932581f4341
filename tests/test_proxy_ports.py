"""The agent's ports in one place: what counts as a self call, from the config and the defaults."""

from __future__ import annotations

import pytest

from ztunnel.config import Config
from ztunnel.model import ports
from ztunnel.model.address import SocketAddr
from ztunnel.model.ports import AgentPorts


def config(**env: str) -> Config:
    return Config.from_sources(env)


def test_defaults_are_the_agent_ports() -> None:
    got = config().agent_ports()
    assert got.proxy == {15001, 15006, 15008}
    assert got.services == {15000, 15020, 15021}
    assert Config().outbound_addr == ("::", ports.OUTBOUND)
    assert Config().admin_addr == ("127.0.0.1", ports.ADMIN)


def test_moved_listeners_count_with_the_defaults_and_socks5_only_when_enabled() -> None:
    moved = config(
        ZTUNNEL_OUTBOUND_ADDR="127.0.0.5:16001",
        ZTUNNEL_ADMIN_ADDR="127.0.0.5:19000",
        ZTUNNEL_STATS_ADDR="127.0.0.5:0",  # "any free port" is no port of ours
        ZTUNNEL_SOCKS5_ADDR="127.0.0.5:11080",
    ).agent_ports()
    assert moved.proxy == {15001, 15006, 15008, 16001}
    assert moved.services == {15000, 15020, 15021, 19000}
    with_socks = config(
        UNSTABLE_ENABLE_SOCKS5="true", ZTUNNEL_SOCKS5_ADDR="127.0.0.5:11080"
    ).agent_ports()
    assert with_socks.proxy == {15001, 15006, 15008, 15080, 11080}
    assert AgentPorts().with_proxy([0, 40001]).proxy == {15001, 15006, 15008, 40001}


@pytest.mark.parametrize(
    ("dst", "expected"),
    [
        ("127.0.0.1:15001", True),
        ("127.0.0.5:15006", True),
        ("[::1]:15008", True),
        ("[::ffff:127.0.0.1]:15008", True),  # IPv4-mapped: the same loopback address
        ("[::ffff:127.0.0.1]:15000", True),  # admin
        ("127.0.0.1:15020", True),
        ("127.0.0.1:15021", True),
        ("0.0.0.0:15001", True),  # connect() to the unspecified address reaches this host
        ("[::]:15000", True),
        ("127.0.0.1:15080", False),  # SOCKS5 is off by default
        ("127.0.0.1:8080", False),
        ("10.0.0.1:15008", False),  # another pod's HBONE port is where tunnels go
    ],
)
def test_outbound_self_calls(dst: str, expected: bool) -> None:
    assert AgentPorts().is_self_call(SocketAddr.parse(dst)) is expected


def test_inbound_target_ports_that_loop() -> None:
    agent = config(UNSTABLE_ENABLE_SOCKS5="true").agent_ports()
    assert [p for p in (15001, 15006, 15008, 15080) if agent.is_proxy_port(p)] == [
        15001,
        15006,
        15008,
        15080,
    ]
    # admin/stats/readiness live in the agent's netns, not the pod's: an app may use them
    assert not any(agent.is_proxy_port(p) for p in (15000, 15020, 15021, 8080))
