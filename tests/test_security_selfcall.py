"""The agent never connects to its own listeners: no address of its netns, no loop.

The issue: in dedicated mode (the README's by-hand setup, listeners on ``[::]``) one TCP
connection to the agent's own ``<node IP>:15001`` from a non-loopback address made it
connect to itself in a loop: 8,442 fds after 1 s, 20,000 after 20 s, readiness stopped
answering, no certificate needed. Two checks, each with a test that fails without it:

- before anything is dialled, a destination that is a *local address of the netns the
  proxy dials from* (loopback, unspecified, IPv4-mapped, the node/pod IPs) on one of the
  proxy's ports is a self call (``AgentPorts.is_self_call`` with ``is_local``);
- a connection the proxy dialled that arrives at one of its own listeners anyway (a
  redirect or NAT loop the first check cannot see) is refused when accepted (``LOOP``).

Both are counted in ``ztunnel_connections_refused_total{direction, reason}``.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
import trio.testing
from proxy_fakes import Bench

from ztunnel.config import Config, WorkloadInfo
from ztunnel.identity.ca import FakeCA
from ztunnel.identity.manager import SecretManager
from ztunnel.model.address import IPAddress, SocketAddr
from ztunnel.model.ports import AgentPorts
from ztunnel.proxy.context import ProxyContext
from ztunnel.proxy.outbound import proxy_outbound
from ztunnel.proxy.sockets import LocalSocketFactory, is_local_address
from ztunnel.proxy.workload_proxy import ProxyAddresses, WorkloadProxy
from ztunnel.state.store import StateStore
from ztunnel.telemetry.connections import ConnectionTracker
from ztunnel.telemetry.metrics import Metrics
from ztunnel.testing.netns_agent import (
    AgentProc,
    Scratch,
    connect,
    http,
    metric,
    scratch_netns,
    start_dedicated,
    wait_until,
)

APP = SocketAddr.parse("10.0.0.1:40000")
NODE_IPS = {ipaddress.ip_address("10.0.0.1"), ipaddress.ip_address("fd00::1")}


def node_ips(ip: IPAddress) -> bool:
    return ip in NODE_IPS


# --- the check, pure --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dst", "expected"),
    [
        ("10.0.0.1:15001", True),  # the node's own IP: [::]:15001 answers there
        ("10.0.0.1:15006", True),
        ("10.0.0.1:15008", True),
        ("[fd00::1]:15001", True),
        ("[::ffff:10.0.0.1]:15006", True),  # IPv4-mapped is the same address
        ("10.0.0.1:8080", False),  # an app on the node: not ours
        ("10.0.0.2:15001", False),  # another host's agent
        ("127.9.9.9:15001", True),  # every loopback alias
        ("[::1]:15008", True),
        ("[::]:15001", True),
        ("0.0.0.0:15006", True),
        ("127.0.0.1:15000", True),  # admin on loopback
    ],
)
def test_a_local_address_on_a_proxy_port_is_a_self_call(dst: str, expected: bool) -> None:
    assert AgentPorts().is_self_call(SocketAddr.parse(dst), node_ips) is expected


def test_without_the_netns_addresses_only_loopback_counts() -> None:
    # What the agent checked before: the node's own IP slipped through.
    assert not AgentPorts().is_self_call(SocketAddr.parse("10.0.0.1:15001"))


async def test_outbound_refuses_the_node_ip_before_any_dial_and_counts_it(
    autojump_clock: object,
) -> None:
    bench = Bench()
    bench.deps = dataclasses.replace(bench.deps, is_local=node_ips)
    for dst in ("10.0.0.1:15001", "[::ffff:10.0.0.1]:15008"):
        _app, downstream = trio.testing.memory_stream_pair()
        with trio.fail_after(60):
            await proxy_outbound(bench.deps, downstream, APP, SocketAddr.parse(dst))
    assert bench.net.dials == [] and bench.pool.opened == []
    assert [r.fields["error"] for r in bench.log.records] == [
        "self call to 10.0.0.1:15001 refused",
        "self call to 10.0.0.1:15008 refused",
    ]
    refused = "ztunnel_connections_refused_total"
    assert bench.metric(refused, direction="outbound", reason="self_call") == 2


@pytest.mark.parametrize("ip", ["127.0.0.1", "127.3.2.1", "::1", "0.0.0.0", "::"])
def test_loopback_and_unspecified_are_local(ip: str) -> None:
    assert is_local_address(LocalSocketFactory(), ipaddress.ip_address(ip))


def test_a_documentation_address_is_not_local() -> None:
    assert not is_local_address(LocalSocketFactory(), ipaddress.ip_address("192.0.2.77"))


# --- a real agent in its own netns (root) -----------------------------------------------------

REFUSED = "ztunnel_connections_refused_total"


@pytest.fixture
def node(tmp_path: Path) -> Iterator[tuple[Scratch, AgentProc]]:
    """The README's by-hand agent (dedicated, listeners on [::], SOCKS5 on 127.0.0.1) in a
    netns whose addresses are 10.77.0.1 (v0) and 10.77.0.2 (v1)."""
    with scratch_netns() as scratch:
        agent = start_dedicated(scratch, tmp_path / "agent.log", {"UNSTABLE_ENABLE_SOCKS5": "true"})
        try:
            agent.wait_logged("agent ready")
            yield scratch, agent
        finally:
            agent.stop()


def ready(scratch: Scratch) -> int:
    return http(scratch.ns, "127.0.0.1", 15021, "/healthz/ready")[0]


def metrics(scratch: Scratch) -> str:
    return http(scratch.ns, "127.0.0.1", 15020, "/metrics")[1]


def ends_quickly(sock: socket.socket) -> bool:
    """Send a little, then read: True when the agent ends the connection (EOF or RST)."""
    try:
        sock.sendall(b"GET / HTTP/1.0\r\n\r\n")
        return sock.recv(1024) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


@pytest.mark.root
def test_a_connection_to_the_agents_own_outbound_port_is_refused_not_looped(
    node: tuple[Scratch, AgentProc],
) -> None:
    """The issue's probe, exactly: from a non-loopback address to [::]:15001 on the node IP."""
    scratch, agent = node
    wait_until(lambda: ready(scratch) == 200, "readiness")
    baseline = agent.fds()
    with connect(scratch.ns, "10.77.0.1", 15001, source="10.77.0.2", timeout=5) as sock:
        assert ends_quickly(sock)
    time.sleep(1.0)  # the issue counted 8,442 fds after 1 s
    assert agent.fds() <= baseline + 5
    assert ready(scratch) == 200
    assert metric(metrics(scratch), REFUSED, direction="outbound", reason="self_call") == 1
    assert agent.alive


LOCAL_TARGETS = [
    ("10.77.0.1", None),
    ("10.77.0.2", None),
    ("127.0.0.1", None),
    ("127.1.2.3", None),  # a loopback alias
    ("::1", None),
    ("::ffff:10.77.0.1", None),  # IPv4-mapped, on the dual-stack listener
]


@pytest.mark.root
def test_every_local_address_of_the_netns_is_refused_on_every_proxy_port(
    node: tuple[Scratch, AgentProc],
) -> None:
    scratch, agent = node
    wait_until(lambda: ready(scratch) == 200, "readiness")
    baseline = agent.fds()
    attempts = 0
    for host, _ in LOCAL_TARGETS:
        # 15001 directly (not redirected: the destination is the listener itself).
        with connect(scratch.ns, host, 15001, timeout=5) as sock:
            assert ends_quickly(sock), host
        attempts += 1
    text = metrics(scratch)
    assert metric(text, REFUSED, direction="outbound", reason="self_call") == attempts
    # 15006 directly: the inbound plaintext proxy refuses its own port as the target.
    for host in ("10.77.0.1", "127.0.0.1", "::1"):
        with connect(scratch.ns, host, 15006, timeout=5) as sock:
            assert ends_quickly(sock), host
    assert metric(metrics(scratch), REFUSED, direction="inbound", reason="self_call") == 3
    assert agent.fds() <= baseline + 5
    assert ready(scratch) == 200


def socks5_reply(scratch: Scratch, host: str, port: int) -> int:
    ip = ipaddress.ip_address(host)
    atyp = b"\x01" if ip.version == 4 else b"\x04"
    with connect(scratch.ns, "127.0.0.1", 15080, timeout=5) as sock:
        sock.sendall(b"\x05\x01\x00")
        assert sock.recv(2) == b"\x05\x00"
        sock.sendall(b"\x05\x01\x00" + atyp + ip.packed + struct.pack("!H", port))
        head = sock.recv(4)
    return head[1]


@pytest.mark.root
def test_socks5_cannot_reach_any_agent_port_on_any_local_address(
    node: tuple[Scratch, AgentProc],
) -> None:
    scratch, agent = node
    wait_until(lambda: ready(scratch) == 200, "readiness")
    hosts = ["10.77.0.1", "10.77.0.2", "127.0.0.1", "127.200.0.9", "::1", "::ffff:127.0.0.1"]
    hosts += ["::ffff:10.77.0.2", "0.0.0.0", "::"]
    ports = [15001, 15006, 15008, 15080, 15000, 15020, 15021]
    for host in hosts:
        for port in ports:
            assert socks5_reply(scratch, host, port) == 2, f"{host}:{port}"  # not allowed
    counted = metric(metrics(scratch), REFUSED, direction="outbound", reason="self_call")
    assert counted == len(hosts) * len(ports)
    # An app port on the node is not ours: it is dialled (nothing listens: refused, 5).
    assert socks5_reply(scratch, "10.77.0.1", 8081) == 5
    assert ready(scratch) == 200 and agent.alive


@pytest.mark.root
def test_a_redirect_loop_is_refused_at_the_first_hop(node: tuple[Scratch, AgentProc]) -> None:
    """An operator's redirect that also catches the agent's own connections (no mark
    exemption): a passthrough dial comes straight back to 15001. The destination is not
    local, so only the accept-side check can see it."""
    scratch, agent = node
    wait_until(lambda: ready(scratch) == 200, "readiness")
    scratch.ns.run(
        ["iptables", "-t", "nat", "-A", "OUTPUT", "-p", "tcp", "--dport", "9999",
         "-j", "REDIRECT", "--to-ports", "15001"]
    )  # fmt: skip
    baseline = agent.fds()
    try:
        with connect(scratch.ns, "10.77.0.99", 9999, timeout=5) as sock:
            assert ends_quickly(sock)
    except ConnectionResetError:
        pass  # on a busy machine the refusal's RST can land before connect() returns
    wait_until(
        lambda: metric(metrics(scratch), REFUSED, direction="outbound", reason="loop") >= 1,
        "the loop refusal counted",
    )
    assert metric(metrics(scratch), REFUSED, direction="outbound", reason="loop") == 1
    assert agent.fds() <= baseline + 5
    assert ready(scratch) == 200

    def loops() -> list[dict[str, object]]:
        return [r for r in agent.records() if "loop refused" in str(r.get("error", ""))]

    wait_until(lambda: len(loops()) >= 1, "the loop's access-log record")
    assert len(loops()) == 1


# --- the accept-side check matches whole connections, not source ports ----------------------


def bare_proxy() -> WorkloadProxy:
    ctx = ProxyContext(
        Config(),
        StateStore(),
        SecretManager(FakeCA.ephemeral()),
        ConnectionTracker(Metrics(process_metrics=False)),
    )
    addresses = ProxyAddresses(("127.0.0.1", 0), ("127.0.0.1", 0), ("127.0.0.1", 0))
    return WorkloadProxy(ctx, WorkloadInfo("ns", "w", "sa"), LocalSocketFactory(), addresses)


def reusable() -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    return sock


def test_a_reused_source_port_to_another_destination_is_not_a_loop() -> None:
    """Linux reuses an ephemeral source port for connections to different destinations: a
    client that happens to connect from the port of one of the agent's own dials (to an
    app) is not the agent talking to itself (the upgrade bench met exactly this). Only a
    dial whose destination is where the accepted connection was headed is a loop."""
    proxy = bare_proxy()
    with (
        socket.create_server(("127.0.0.1", 0)) as app,
        socket.create_server(("127.0.0.1", 0)) as listener,  # stands for a proxy listener
        reusable() as dial,
        reusable() as client,
    ):
        dial.bind(("127.0.0.1", 0))
        client.bind(dial.getsockname())  # the same source address and port ...
        dial.connect(app.getsockname())  # ... for the agent's dial to an app ...
        client.connect(listener.getsockname())  # ... and for a client of the agent
        proxy._own_dials[SocketAddr.of(*dial.getsockname())] = dial
        accepted, peer = listener.accept()
        with accepted:
            assert not proxy._is_own_dial(accepted, SocketAddr.of(*peer))
        client.close()
        with reusable() as looped:  # the agent's own dial arriving at its own listener
            looped.bind(("127.0.0.1", 0))
            looped.connect(listener.getsockname())
            proxy._own_dials[SocketAddr.of(*looped.getsockname())] = looped
            accepted, peer = listener.accept()
            with accepted:
                assert proxy._is_own_dial(accepted, SocketAddr.of(*peer))
