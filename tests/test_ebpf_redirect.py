"""eBPF redirection for real: network namespaces wired with veths, the agent's listeners made
the way the proxy makes them (inside the pod netns, SO_MARK 0x539, IP_TRANSPARENT), and the
programs compiled by bcc, attached with tc and pinned in a bpffs directory of the test's own."""

from __future__ import annotations

import ctypes
import json
import secrets
import shutil
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from ztunnel.config import Config, RedirectMode, WorkloadInfo
from ztunnel.errors import ConfigError
from ztunnel.model.address import SocketAddr
from ztunnel.model.pod import Pod
from ztunnel.proxy import sockets
from ztunnel.proxy.context import ProxyContext
from ztunnel.proxy.workload_proxy import ProxyAddresses, WorkloadProxy
from ztunnel.redirect import iptables
from ztunnel.redirect.base import RedirectPorts
from ztunnel.redirect.ebpf import (
    EbpfError,
    EbpfRedirector,
    EbpfSettings,
    EbpfUnavailable,
    bpfsys,
    clean_other_modes,
    environment,
    layout,
    original_dst,
    tc,
)
from ztunnel.redirect.ebpf import build as ebpf_build
from ztunnel.redirect.ebpf.environment import import_bcc
from ztunnel.redirect.modes import ModeSwitch, make_redirector
from ztunnel.redirect.netns import NetNamespace, create_named, delete_named
from ztunnel.redirect.routes import routes_state
from ztunnel.state.store import StateStore

pytestmark = pytest.mark.root

MARK = 0x539
POD_IP, PEER_IP = "10.200.0.2", "10.200.0.1"
POD2_IP, PEER2_IP = "10.201.0.2", "10.201.0.1"
REMOTE = ("10.77.0.5", 80)  # routed out of the pod, nobody there: only capture answers
POD = Pod(uid="uid-1", name="app", namespace="demo")
SOURCES = Path(__file__).resolve().parents[1] / "ebpf"


@pytest.fixture(scope="module")
def pin_root() -> Iterator[Path]:
    """A bpffs directory of this test module's own (programs compile once, ~1 s)."""
    root = Path(f"/sys/fs/bpf/ztunnel-test-{secrets.token_hex(3)}")
    try:
        yield root
    finally:
        ebpf_build.remove_tree(root)


@pytest.fixture
def redirector(pin_root: Path) -> EbpfRedirector:
    return EbpfRedirector(pin_root=pin_root)


@dataclass
class Net:
    pod: NetNamespace  # enrolled in the tests
    pod2: NetNamespace  # never enrolled
    peer: NetNamespace  # "the rest of the cluster", on a veth to each pod


def _veth(
    pod: NetNamespace, peer_name: str, peer: NetNamespace, pod_ip: str, peer_ip: str, peer_dev: str
) -> None:
    pod.run(
        ["ip", "link", "add", "eth0", "type", "veth", "peer", "name", peer_dev, "netns", peer_name]
    )
    pod.run(["ip", "addr", "add", f"{pod_ip}/24", "dev", "eth0"])
    pod.run(["ip", "link", "set", "eth0", "up"])
    pod.run(["ip", "route", "add", "default", "via", peer_ip])
    peer.run(["ip", "addr", "add", f"{peer_ip}/24", "dev", peer_dev])
    peer.run(["ip", "link", "set", peer_dev, "up"])


@pytest.fixture
def net() -> Iterator[Net]:
    tag = secrets.token_hex(3)
    names = [f"zt{tag}-ebpod", f"zt{tag}-ebpod2", f"zt{tag}-ebpeer"]
    opened: list[NetNamespace] = []
    try:
        for name in names:
            opened.append(create_named(name))
        pod, pod2, peer = opened
        _veth(pod, names[2], peer, POD_IP, PEER_IP, "eth1")
        _veth(pod2, names[2], peer, POD2_IP, PEER2_IP, "eth2")
        peer.run(["sysctl", "-qw", "net.ipv4.ip_forward=1"])
        yield Net(pod, pod2, peer)
    finally:
        for ns in opened:
            ns.close()
        for name in names:
            delete_named(name)


# --- sockets as the agent and the apps make them -------------------------------------------


def agent_listener(ns: NetNamespace, port: int) -> socket.socket:
    """Like WorkloadProxy: in the pod netns, dual-stack ``::``, SO_MARK, IP_TRANSPARENT."""
    sock, transparent = sockets.make_listener(
        sockets.NetnsSocketFactory(ns, MARK), ("::", port), transparent=True
    )
    assert transparent
    sock.settimeout(5)
    return sock


def app_listener(ns: NetNamespace, port: int) -> socket.socket:
    sock = ns.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("0.0.0.0", port))
    sock.listen(16)
    sock.settimeout(5)
    return sock


def connect(
    ns: NetNamespace,
    addr: tuple[str, int],
    *,
    mark: int | None = None,
    spoof: str | None = None,
    timeout: float = 5,
) -> socket.socket:
    sock = ns.socket()
    sock.settimeout(timeout)
    try:
        if mark is not None:
            sock.setsockopt(socket.SOL_SOCKET, sockets.SO_MARK, mark)
        if spoof is not None:  # the inbound path's upstream: the client's IP as source
            sock.setsockopt(socket.SOL_IP, sockets.IP_TRANSPARENT, 1)
            sock.setsockopt(socket.SOL_IP, sockets.IP_FREEBIND, 1)
            sock.bind((spoof, 0))
        sock.connect(addr)
    except BaseException:
        sock.close()
        raise
    return sock


def accept(listener: socket.socket) -> tuple[socket.socket, tuple[str, int]]:
    """Accept with the peer in canonical form (a dual-stack listener sees ::ffff:a.b.c.d)."""
    conn, _ = listener.accept()
    return conn, sockets.sockname(conn, peer=True).sockaddr()


def nothing_pending(listener: socket.socket) -> bool:
    listener.settimeout(0.3)
    try:
        conn, _ = listener.accept()
    except TimeoutError:
        return True
    finally:
        listener.settimeout(5)
    conn.close()
    return False


def echo(a: socket.socket, b: socket.socket) -> None:
    a.sendall(b"ping")
    assert b.recv(16) == b"ping"
    b.sendall(b"pong")
    assert a.recv(16) == b"pong"


def our_filters(ns: NetNamespace) -> list[tuple[str, str, str]]:
    return sorted((a.device, a.direction, a.prog_name) for a in tc.ours(ns))


def sk_lookup_links(ns: NetNamespace) -> list[dict[str, object]]:
    """sk_lookup links on this netns, as bpftool lists them (every link of the machine)."""
    links = json.loads(ns.run(["bpftool", "-j", "link", "show"]).stdout or "[]")
    return [
        link
        for link in links
        if link.get("attach_type") == "sk_lookup" and link.get("netns_ino") == ns.ident[1]
    ]


def all_bpf_filters(ns: NetNamespace) -> list[tc.Attached]:
    return [
        f
        for dev in ("lo", "eth0")
        for direction in (tc.INGRESS, tc.EGRESS)
        for f in tc.filters(ns, dev, direction)
    ]


EXPECTED_FILTERS = [
    ("eth0", "egress", "zt_egress"),
    ("eth0", "ingress", "zt_ingress"),
    ("lo", "ingress", "zt_loopback"),
]


# --- capture -------------------------------------------------------------------------------


def test_outbound_reaches_the_outbound_listener_with_its_original_destination(
    net: Net, redirector: EbpfRedirector
) -> None:
    assert redirector.install(net.pod, POD) is True
    with agent_listener(net.pod, 15001) as out_l, app_listener(net.peer, 80) as peer_l:
        for dst in (REMOTE, (PEER_IP, 80)):
            with connect(net.pod, dst) as app:
                conn, peer = accept(out_l)
                with conn:
                    assert original_dst(conn) == SocketAddr.of(*dst)
                    # The proxy's generic lookup agrees (no SO_ORIGINAL_DST: it falls back).
                    assert sockets.original_dst(conn) == SocketAddr.of(*dst)
                    assert peer == sockets.sockname(app).sockaddr()
                    echo(app, conn)
        assert nothing_pending(peer_l)  # the real peer never saw the captured connection


def test_inbound_to_an_app_port_reaches_the_plaintext_listener_with_the_client_ip(
    net: Net, redirector: EbpfRedirector
) -> None:
    redirector.install(net.pod, POD)
    with agent_listener(net.pod, 15006) as in_l, app_listener(net.pod, 8080) as app_l:
        with connect(net.peer, (POD_IP, 8080)) as client:
            conn, peer = accept(in_l)
            with conn:
                assert original_dst(conn) == SocketAddr.of(POD_IP, 8080)
                assert peer[0] == PEER_IP
                echo(client, conn)
        assert nothing_pending(app_l)  # the app is reached only through the agent


def test_inbound_upstream_with_the_client_ip_reaches_the_app_and_its_replies_return(
    net: Net, redirector: EbpfRedirector
) -> None:
    """The agent connects to the app with the client's IP as source (mark 0x539, transparent);
    the app's replies, routed towards the client, are looped back to the agent's socket."""
    redirector.install(net.pod, POD)
    with (
        agent_listener(net.pod, 15006) as in_l,
        app_listener(net.pod, 8080) as app_l,
        connect(net.peer, (POD_IP, 8080)) as client,
    ):
        downstream, (client_ip, _) = accept(in_l)
        with downstream, connect(net.pod, (POD_IP, 8080), mark=MARK, spoof=client_ip) as up:
            app_conn, (seen_ip, _) = accept(app_l)
            with app_conn:
                assert seen_ip == PEER_IP
                for _ in range(3):
                    echo(up, app_conn)
                echo(client, downstream)


def test_hbone_port_reaches_the_hbone_listener_untouched(
    net: Net, redirector: EbpfRedirector
) -> None:
    redirector.install(net.pod, POD)
    with agent_listener(net.pod, 15008) as hbone_l, agent_listener(net.pod, 15006) as in_l:
        with connect(net.peer, (POD_IP, 15008)) as client:
            conn, peer = accept(hbone_l)
            with conn:
                assert sockets.sockname(conn).sockaddr() == (POD_IP, 15008)
                assert peer[0] == PEER_IP
                echo(client, conn)
        assert nothing_pending(in_l)


def test_the_agents_marked_sockets_are_not_captured(net: Net, redirector: EbpfRedirector) -> None:
    redirector.install(net.pod, POD)
    with agent_listener(net.pod, 15001) as out_l, app_listener(net.peer, 80) as peer_l:
        with connect(net.pod, (PEER_IP, 80), mark=MARK) as agent_sock:
            conn, (src, _) = accept(peer_l)
            with conn:
                assert src == POD_IP
                echo(agent_sock, conn)
        assert nothing_pending(out_l)


def test_loopback_traffic_inside_the_pod_is_not_captured(
    net: Net, redirector: EbpfRedirector
) -> None:
    redirector.install(net.pod, POD)
    with (
        agent_listener(net.pod, 15001) as out_l,
        agent_listener(net.pod, 15006) as in_l,
        app_listener(net.pod, 8080) as app_l,
    ):
        for dst in (("127.0.0.1", 8080), (POD_IP, 8080)):
            with connect(net.pod, dst) as client:
                conn, _ = accept(app_l)
                with conn:
                    assert sockets.sockname(conn).sockaddr() == dst
                    echo(client, conn)
        assert nothing_pending(out_l) and nothing_pending(in_l)


def test_a_pod_without_the_redirector_is_untouched(net: Net, redirector: EbpfRedirector) -> None:
    redirector.install(net.pod, POD)
    with (
        agent_listener(net.pod2, 15001) as out2,
        agent_listener(net.pod2, 15006) as in2,
        app_listener(net.pod2, 8080) as app2,
        app_listener(net.peer, 80) as peer_l,
    ):
        with connect(net.pod2, (PEER2_IP, 80)) as client:
            conn, (src, _) = accept(peer_l)
            with conn:
                assert src == POD2_IP
                echo(client, conn)
        with connect(net.peer, (POD2_IP, 8080)) as client:
            conn, _ = accept(app2)
            with conn:
                echo(client, conn)
        assert nothing_pending(out2) and nothing_pending(in2)
    assert tc.ours(net.pod2) == [] and not tc.has_clsact(net.pod2, "eth0")
    assert not redirector.installed(net.pod2)


def test_connections_open_before_enrollment_keep_working(
    net: Net, redirector: EbpfRedirector
) -> None:
    with app_listener(net.peer, 80) as peer_l, connect(net.pod, (PEER_IP, 80)) as app:
        conn, _ = accept(peer_l)
        with conn:
            redirector.install(net.pod, POD)
            echo(app, conn)


def test_a_new_syn_on_a_time_wait_tuple_still_goes_to_the_agent(
    net: Net, redirector: EbpfRedirector
) -> None:
    """The agent closed first, so its side of (pod:8080, client:port) sits in TIME_WAIT. A
    client reusing that port must reach the agent again, not the app listening on 8080 (the
    kernel's TIME_WAIT path would look the listener up by port, past the agent)."""
    redirector.install(net.pod, POD)
    with agent_listener(net.pod, 15006) as in_l, app_listener(net.pod, 8080) as app_l:
        first = net.peer.socket()
        first.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        first.settimeout(5)
        first.bind((PEER_IP, 0))
        port = first.getsockname()[1]
        with first:
            first.connect((POD_IP, 8080))
            conn, _ = accept(in_l)
            conn.close()  # the agent's side closes first → TIME_WAIT in the pod
            assert first.recv(16) == b""
        tw = net.pod.run(["ss", "-Htan", "state", "time-wait"]).stdout
        assert f"{PEER_IP}]:{port}" in tw  # the dual-stack listener's child: [::ffff:a.b.c.d]
        again = net.peer.socket()
        again.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        again.settimeout(5)
        again.bind((PEER_IP, port))
        with again:
            again.connect((POD_IP, 8080))
            conn, peer = accept(in_l)
            with conn:
                assert peer == (PEER_IP, port)
                echo(again, conn)
        assert nothing_pending(app_l)


def test_inbound_fails_closed_without_the_agents_listener(
    net: Net, redirector: EbpfRedirector
) -> None:
    """No agent listener: the SYN is dropped, never handed to the app; an unmarked listener
    on 15006 (an app posing as the agent) does not qualify either."""
    redirector.install(net.pod, POD)
    before = redirector.prepare().counters()["no_listener"]
    with app_listener(net.pod, 8080) as app_l, app_listener(net.pod, 15006) as impostor:
        with pytest.raises(TimeoutError):
            connect(net.peer, (POD_IP, 8080), timeout=1.5).close()
        assert nothing_pending(app_l) and nothing_pending(impostor)
    assert redirector.prepare().counters()["no_listener"] > before


def test_outbound_fails_closed_without_the_agents_listener(
    net: Net, redirector: EbpfRedirector
) -> None:
    redirector.install(net.pod, POD)
    with app_listener(net.peer, 80) as peer_l, app_listener(net.pod, 15001) as impostor:
        with pytest.raises(TimeoutError):
            connect(net.pod, (PEER_IP, 80), timeout=1.5).close()
        assert nothing_pending(peer_l) and nothing_pending(impostor)


def test_ipv6_is_captured_when_enabled(net: Net, pin_root: Path) -> None:
    pod6, peer6 = "fd00:200::2", "fd00:200::1"
    net.pod.run(["ip", "-6", "addr", "add", f"{pod6}/64", "dev", "eth0", "nodad"])
    net.pod.run(["ip", "-6", "route", "add", "default", "via", peer6])
    net.peer.run(["ip", "-6", "addr", "add", f"{peer6}/64", "dev", "eth1", "nodad"])
    redirector = EbpfRedirector(pin_root=pin_root, settings=EbpfSettings(ipv6=True))
    redirector.install(net.pod, POD)
    with (
        agent_listener(net.pod, 15001) as out_l,
        agent_listener(net.pod, 15006) as in_l,
        app_listener6(net.pod, 8080) as app_l,
    ):
        with connect6(net.pod, ("fd00:77::5", 80)) as app:
            conn, peer = accept(out_l)
            with conn:
                assert original_dst(conn) == SocketAddr.of("fd00:77::5", 80)
                assert peer == sockets.sockname(app).sockaddr()
                echo(app, conn)
        with connect6(net.peer, (pod6, 8080)) as client:
            downstream, (client_ip, _) = accept(in_l)
            assert client_ip == peer6 and original_dst(downstream).sockaddr() == (pod6, 8080)
            with downstream, connect6(net.pod, (pod6, 8080), spoof=client_ip) as up:
                app_conn, (seen_ip, _) = accept(app_l)
                with app_conn:
                    assert seen_ip == peer6
                    echo(up, app_conn)
                echo(client, downstream)
    redirector.remove(net.pod, POD)
    assert not routes_state(net.pod, fwmark=0x111, mask=0xFFF, table=100, family=6).route


def app_listener6(ns: NetNamespace, port: int) -> socket.socket:
    sock = ns.socket(socket.AF_INET6)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("::", port))
    sock.listen(16)
    sock.settimeout(5)
    return sock


def connect6(ns: NetNamespace, addr: tuple[str, int], spoof: str | None = None) -> socket.socket:
    sock = ns.socket(socket.AF_INET6)
    sock.settimeout(5)
    try:
        if spoof is not None:
            sock.setsockopt(socket.SOL_SOCKET, sockets.SO_MARK, MARK)
            sock.setsockopt(sockets.SOL_IPV6, sockets.IPV6_TRANSPARENT, 1)
            sock.setsockopt(sockets.SOL_IPV6, sockets.IPV6_FREEBIND, 1)
            sock.bind((spoof, 0))
        sock.connect(addr)
    except BaseException:
        sock.close()
        raise
    return sock


def test_the_outbound_listener_must_be_transparent(net: Net, redirector: EbpfRedirector) -> None:
    """Why eBPF mode needs IP_TRANSPARENT on 15001 (the proxy sets it only on the inbound
    listeners today): the accepted connection's local address is the remote destination, and
    without transparency the kernel cannot send the SYN-ACK from it."""
    redirector.install(net.pod, POD)
    plain, _ = sockets.make_listener(
        sockets.NetnsSocketFactory(net.pod, MARK), ("::", 15001), transparent=False
    )
    with plain, pytest.raises(TimeoutError):
        connect(net.pod, REMOTE, timeout=1.5).close()


# --- packets the stack would reassemble or parse past the programs -------------------------


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def tcp_syn(pseudo_addresses: bytes, sport: int, dport: int, v6: bool) -> bytes:
    """A bare 20-byte TCP SYN with its checksum over the v4 or v6 pseudo header."""
    header = struct.pack("!HHIIBBHHH", sport, dport, 1000, 0, 5 << 4, 0x02, 65535, 0, 0)
    tail = struct.pack("!I3xB", 20, 6) if v6 else struct.pack("!xBH", 6, 20)
    csum = _checksum(pseudo_addresses + tail + header)
    return header[:16] + struct.pack("!H", csum) + header[18:]


def ipv4_packet(src: str, dst: str, payload: bytes, frag: int) -> bytes:
    """IPv4 header (the kernel fills in length and checksum for raw sockets) + payload."""
    addresses = socket.inet_aton(src) + socket.inet_aton(dst)
    return struct.pack("!BBHHHBBH", 0x45, 0, 0, 0x1234, frag, 64, 6, 0) + addresses + payload


def syn_ack_seen(sniffer: socket.socket, port: int, ip_header: bool) -> bool:
    """Did a SYN-ACK for our crafted SYN (destination ``port``) come back within a second?"""
    sniffer.settimeout(0.2)
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline:
        try:
            packet = sniffer.recv(65535)
        except TimeoutError:
            continue
        tcp = packet[(packet[0] & 0x0F) * 4 :] if ip_header else packet
        dport, flags = struct.unpack_from("!H", tcp, 2)[0], tcp[13]
        if dport == port and flags & 0x12 == 0x12:
            return True
    return False


def test_fragmented_inbound_tcp_is_dropped_not_reassembled_past_the_agent(
    net: Net, redirector: EbpfRedirector
) -> None:
    """A SYN split into IP fragments would be reassembled by the pod's stack after tc and
    reach the app's listener directly; the programs drop what they cannot parse."""
    redirector.install(net.pod, POD)
    build = redirector.prepare()
    before = build.counters()
    pseudo = socket.inet_aton(PEER_IP) + socket.inet_aton(POD_IP)
    with (
        agent_listener(net.pod, 15006),
        app_listener(net.pod, 8080),
        net.peer.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_TCP) as sniffer,
        net.peer.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW) as raw,
    ):
        syn = tcp_syn(pseudo, 41001, 8080, v6=False)
        raw.sendto(ipv4_packet(PEER_IP, POD_IP, syn[:16], 0x2000), (POD_IP, 0))  # MF
        raw.sendto(ipv4_packet(PEER_IP, POD_IP, syn[16:], 16 // 8), (POD_IP, 0))
        assert not syn_ack_seen(sniffer, 41001, ip_header=True)
        # Control: the same SYN in one piece is answered, by the agent's listener.
        syn = tcp_syn(pseudo, 41002, 8080, v6=False)
        raw.sendto(ipv4_packet(PEER_IP, POD_IP, syn, 0), (POD_IP, 0))
        assert syn_ack_seen(sniffer, 41002, ip_header=True)
    after = build.counters()
    assert after["opaque_dropped"] >= before["opaque_dropped"] + 1
    assert after["inbound_captured"] == before["inbound_captured"] + 1


def test_ipv6_extension_headers_do_not_hide_a_syn(net: Net, pin_root: Path) -> None:
    pod6, peer6 = "fd00:200::2", "fd00:200::1"
    net.pod.run(["ip", "-6", "addr", "add", f"{pod6}/64", "dev", "eth0", "nodad"])
    net.peer.run(["ip", "-6", "addr", "add", f"{peer6}/64", "dev", "eth1", "nodad"])
    redirector = EbpfRedirector(pin_root=pin_root, settings=EbpfSettings(ipv6=True))
    redirector.install(net.pod, POD)
    build = redirector.prepare()
    before = build.counters()["inbound_captured"]
    src, dst = socket.inet_pton(socket.AF_INET6, peer6), socket.inet_pton(socket.AF_INET6, pod6)
    syn = tcp_syn(src + dst, 41003, 8080, v6=True)
    dst_opts = bytes([6, 0, 1, 4, 0, 0, 0, 0])  # next header TCP, PadN to 8 bytes
    header = struct.pack("!IHBB", 6 << 28, len(dst_opts) + len(syn), 60, 64) + src + dst
    with (
        agent_listener(net.pod, 15006),
        app_listener6(net.pod, 8080),
        net.peer.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_TCP) as sniffer,
        net.peer.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_RAW) as raw,
    ):
        raw.sendto(header + dst_opts + syn, (pod6, 0))
        assert syn_ack_seen(sniffer, 41003, ip_header=False)
    assert build.counters()["inbound_captured"] == before + 1  # the agent's, not the app's


# --- lifecycle -----------------------------------------------------------------------------


def test_install_twice_attaches_once(net: Net, redirector: EbpfRedirector) -> None:
    assert redirector.install(net.pod, POD) is True
    assert redirector.install(net.pod, POD) is False
    filters = all_bpf_filters(net.pod)
    assert sorted((f.device, f.direction, f.prog_name) for f in filters) == EXPECTED_FILTERS
    assert net.pod.run(["ip", "rule", "show"]).stdout.count("lookup 100") == 1
    pins = sorted(p.name for p in redirector.pod_dir(net.pod).iterdir())
    assert pins == ["eth0-egress", "eth0-ingress", "lo-ingress", "sk_lookup"]
    links = sk_lookup_links(net.pod)
    assert [link["prog_id"] for link in links] == [redirector.prepare().prog_ids["zt_sk_lookup"]]


def test_a_restarted_agent_finds_and_reuses_the_pinned_state(
    net: Net, redirector: EbpfRedirector, pin_root: Path
) -> None:
    redirector.install(net.pod, POD)
    ids = {a.prog_name: a.prog_id for a in tc.ours(net.pod)}
    links = sk_lookup_links(net.pod)
    restarted = EbpfRedirector(pin_root=pin_root)
    assert restarted.installed(net.pod)
    assert restarted.pod_dir(net.pod) == redirector.pod_dir(net.pod)
    build = restarted.prepare()
    assert build.reused and ids.items() <= build.prog_ids.items()
    assert restarted.install(net.pod, POD) is False
    assert {a.prog_name: a.prog_id for a in tc.ours(net.pod)} == ids
    assert sk_lookup_links(net.pod) == links
    with agent_listener(net.pod, 15001) as out_l, connect(net.pod, REMOTE) as app:
        conn, _ = accept(out_l)
        conn.close()
        app.close()


def test_a_new_build_replaces_the_attached_programs_in_place(
    net: Net, redirector: EbpfRedirector, pin_root: Path, tmp_path: Path
) -> None:
    redirector.install(net.pod, POD)
    old = redirector.prepare()
    changed_sources = tmp_path / "ebpf"
    shutil.copytree(SOURCES, changed_sources)
    with (changed_sources / "redirect.c").open("a") as f:
        f.write("\n/* a new agent version */\n")
    upgraded = EbpfRedirector(pin_root=pin_root, source_dir=changed_sources)
    new = upgraded.prepare()
    assert new.id != old.id and not new.reused
    assert not old.dir.exists()  # the old build's pins are gone; attached programs live on
    assert upgraded.install(net.pod, POD) is True
    attached = tc.ours(net.pod)
    assert sorted((a.device, a.direction, a.prog_name) for a in attached) == EXPECTED_FILTERS
    assert all(a.prog_id == new.prog_ids[a.prog_name] for a in attached)
    links = sk_lookup_links(net.pod)  # the same link, its program swapped
    assert [link["prog_id"] for link in links] == [new.prog_ids["zt_sk_lookup"]]
    with agent_listener(net.pod, 15006) as in_l, connect(net.peer, (POD_IP, 9090)) as client:
        conn, _ = accept(in_l)
        with conn:
            echo(client, conn)
    # Back to the original sources for the other tests (reuses nothing: compiles again).
    redirector._build = None
    redirector.prepare()


def test_remove_detaches_everything(net: Net, redirector: EbpfRedirector) -> None:
    redirector.install(net.pod, POD)
    assert redirector.remove(net.pod, POD) is True
    assert all_bpf_filters(net.pod) == []
    assert not tc.has_clsact(net.pod, "eth0") and not tc.has_clsact(net.pod, "lo")
    shown = json.loads(net.pod.run(["bpftool", "-j", "net", "show"]).stdout)
    assert all(not entry.get("tc") for entry in shown), shown
    assert not redirector.pod_dir(net.pod).exists()
    assert sk_lookup_links(net.pod) == []
    state = routes_state(net.pod, fwmark=0x111, mask=0xFFF, table=100)
    assert not state.rule and not state.route
    accept_local = "net.ipv4.conf.lo.accept_local"
    assert net.pod.run(["sysctl", "-n", accept_local]).stdout.strip() == "0"
    assert not redirector.installed(net.pod)
    assert redirector.remove(net.pod, POD) is False
    with app_listener(net.peer, 80) as peer_l, connect(net.pod, (PEER_IP, 80)) as app:
        conn, (src, _) = accept(peer_l)  # direct again
        with conn:
            assert src == POD_IP
            echo(app, conn)


@pytest.fixture(scope="module")
def foreign_prog(pin_root: Path) -> Iterator[Path]:
    """A pinned tc program of somebody else's (name without our prefix)."""
    bcc = import_bcc()
    module = bcc.BPF(text=b"int user_prog(struct __sk_buff *skb) { return -1; }")
    path = pin_root.with_name(pin_root.name + "-foreign")
    try:
        bpfsys.obj_pin(module.load_func(b"user_prog", bcc.BPF.SCHED_CLS).fd, path)
        yield path
    finally:
        module.cleanup()
        path.unlink(missing_ok=True)


def attach_foreign(
    ns: NetNamespace, direction: str, prog: Path, *where: str, device: str = "eth0"
) -> None:
    argv = ["tc", "filter", "add", "dev", device, direction, *where]
    ns.run([*argv, "bpf", "da", "object-pinned", str(prog)])


def test_remove_keeps_a_users_own_tc_filter(
    net: Net, redirector: EbpfRedirector, foreign_prog: Path
) -> None:
    redirector.install(net.pod, POD)
    attach_foreign(net.pod, "ingress", foreign_prog, "prio", "7")
    redirector.remove(net.pod, POD)
    assert tc.ours(net.pod) == []
    assert [f.prog_name for f in all_bpf_filters(net.pod)] == ["user_prog"]
    assert tc.has_clsact(net.pod, "eth0")


def test_no_iptables_rules_in_ebpf_mode(net: Net, redirector: EbpfRedirector) -> None:
    redirector.install(net.pod, POD)
    save = net.pod.run(["iptables-save"]).stdout
    assert "ISTIO" not in save
    assert [line for line in save.splitlines() if line.startswith("-A")] == []
    assert iptables.installed(net.pod).empty


def test_a_failed_install_leaves_nothing_behind(
    net: Net, redirector: EbpfRedirector, foreign_prog: Path
) -> None:
    # A foreign filter holding our (prio, handle) on eth0 egress, the last hook attached.
    net.pod.run(["tc", "qdisc", "add", "dev", "eth0", "clsact"])
    attach_foreign(net.pod, "egress", foreign_prog, "prio", "1", "handle", "0x2d7")
    with pytest.raises(EbpfError, match="foreign filter 'user_prog'"):
        redirector.install(net.pod, POD)
    remaining = [(f.device, f.direction, f.prog_name) for f in all_bpf_filters(net.pod)]
    assert remaining == [("eth0", "egress", "user_prog")]  # ours rolled back, theirs kept
    assert not redirector.pod_dir(net.pod).exists()
    assert not routes_state(net.pod, fwmark=0x111, mask=0xFFF, table=100).rule


def test_a_failed_reconcile_keeps_the_pod_captured(
    net: Net, redirector: EbpfRedirector, foreign_prog: Path
) -> None:
    redirector.install(net.pod, POD)
    # A new device whose hook a foreign filter holds: the next reconcile fails on it.
    net.pod.run(["ip", "link", "add", "eth5", "type", "veth", "peer", "name", "eth6"])
    net.pod.run(["tc", "qdisc", "add", "dev", "eth5", "clsact"])
    attach_foreign(net.pod, "ingress", foreign_prog, "prio", "1", "handle", "0x2d7", device="eth5")
    with pytest.raises(EbpfError, match="foreign filter"):
        redirector.install(net.pod, POD)
    assert set(EXPECTED_FILTERS) <= set(our_filters(net.pod))
    assert redirector.pod_dir(net.pod).exists()
    with agent_listener(net.pod, 15001) as out_l, connect(net.pod, REMOTE) as app:
        conn, _ = accept(out_l)
        with conn:
            echo(app, conn)


def test_describe_shows_programs_and_maps(net: Net, redirector: EbpfRedirector) -> None:
    redirector.install(net.pod, POD)
    info = redirector.describe(net.pod)
    assert info["mode"] == "ebpf" and info["installed"] is True
    progs = sorted((p["device"], p["direction"], p["name"]) for p in info["programs"])
    assert progs == EXPECTED_FILTERS
    assert all(p["current"] and len(p["tag"]) == 16 for p in info["programs"])
    assert info["routes"] == {"rule": True, "route": True}
    assert info["sk_lookup"]["attached"] and info["sk_lookup"]["current"]
    summary = redirector.summary()  # the agent-wide part: build, maps, counters
    assert summary["build"] == info["build"] and summary["mode"] == "ebpf"
    ids = {p["name"]: p["id"] for p in info["programs"]}
    assert all(summary["programs"][name] == prog_id for name, prog_id in ids.items())
    maps = {m["name"]: m for m in summary["maps"]}
    assert maps["zt_config"]["max_entries"] == 1
    assert maps["zt_config"]["value_size"] == layout.CONFIG_STRUCT.size
    assert maps["zt_stats"]["max_entries"] == len(layout.STATS)
    assert set(summary["counters"]) == set(layout.STATS)
    assert maps["zt_handoff"]["type"] == "sockhash"


def test_counters_count_captures(net: Net, redirector: EbpfRedirector) -> None:
    redirector.install(net.pod, POD)
    build = redirector.prepare()
    before = build.counters()
    with agent_listener(net.pod, 15001) as out_l, agent_listener(net.pod, 15006) as in_l:
        with connect(net.pod, REMOTE) as app:
            accept(out_l)[0].close()
            app.close()
        with connect(net.peer, (POD_IP, 8080)) as client:
            accept(in_l)[0].close()
            client.close()
    after = build.counters()
    assert after["outbound_captured"] == before["outbound_captured"] + 1
    assert after["inbound_captured"] == before["inbound_captured"] + 1
    assert after["looped"] > before["looped"]


def test_prune_drops_the_pins_of_pods_that_are_gone(net: Net, redirector: EbpfRedirector) -> None:
    redirector.install(net.pod, POD)
    redirector.install(net.pod2, POD)
    dropped = redirector.prune([net.pod])  # also drops what earlier tests left
    assert redirector.pod_dir(net.pod2).name in dropped
    assert redirector.pod_dir(net.pod).name not in dropped
    assert redirector.pod_dir(net.pod).exists() and not redirector.pod_dir(net.pod2).exists()


def test_two_agents_compiling_the_same_build_at_once_share_one(
    pin_root: Path, tmp_path: Path
) -> None:
    sources = tmp_path / "ebpf"
    shutil.copytree(SOURCES, sources)
    with (sources / "redirect.c").open("a") as f:
        f.write("\n/* a build nobody pinned yet */\n")
    root = pin_root.with_name(pin_root.name + "-race")
    script = (
        "import json, pathlib, sys\n"
        "from ztunnel.redirect.ebpf import EbpfRedirector\n"
        "b = EbpfRedirector(pin_root=pathlib.Path(sys.argv[1]),"
        " source_dir=pathlib.Path(sys.argv[2])).prepare()\n"
        "print(json.dumps(b.prog_ids))\n"
    )
    argv = [sys.executable, "-c", script, str(root), str(sources)]
    try:
        procs = [subprocess.Popen(argv, stdout=subprocess.PIPE, text=True) for _ in range(2)]
        outputs = [p.communicate(timeout=120)[0] for p in procs]
        assert [p.returncode for p in procs] == [0, 0]
        assert json.loads(outputs[0]) == json.loads(outputs[1])
        assert [p.name for p in root.iterdir()] == [
            EbpfRedirector(pin_root=root, source_dir=sources).prepare().dir.name
        ]
    finally:
        ebpf_build.remove_tree(root)


# --- switching modes ------------------------------------------------------------------------


def test_switching_from_iptables_to_ebpf_cleans_the_iptables_rules(
    net: Net, redirector: EbpfRedirector
) -> None:
    iptables.install(net.pod, iptables.InpodConfig())
    redirector.install(net.pod, POD)
    assert clean_other_modes(net.pod, "ebpf", pin_root=redirector.pin_root) == ["iptables"]
    assert iptables.installed(net.pod).empty
    assert routes_state(net.pod, fwmark=0x111, mask=0xFFF, table=100).rule  # eBPF needs it
    with agent_listener(net.pod, 15001) as out_l, connect(net.pod, REMOTE) as app:
        conn, _ = accept(out_l)
        with conn:
            assert original_dst(conn).sockaddr() == REMOTE
            echo(app, conn)


def test_switching_from_ebpf_to_iptables_detaches_the_programs(
    net: Net, redirector: EbpfRedirector
) -> None:
    redirector.install(net.pod, POD)
    iptables.install(net.pod, iptables.InpodConfig())
    assert clean_other_modes(net.pod, "iptables", pin_root=redirector.pin_root) == ["ebpf"]
    assert tc.ours(net.pod) == [] and not redirector.pod_dir(net.pod).exists()
    assert sk_lookup_links(net.pod) == []
    assert routes_state(net.pod, fwmark=0x111, mask=0xFFF, table=100).rule  # iptables needs it
    assert not iptables.installed(net.pod).empty
    assert clean_other_modes(net.pod, "iptables", pin_root=redirector.pin_root) == []


def test_switching_to_none_removes_both_modes_and_the_routes(
    net: Net, redirector: EbpfRedirector
) -> None:
    iptables.install(net.pod, iptables.InpodConfig())
    redirector.install(net.pod, POD)
    cleaned = clean_other_modes(net.pod, "none", pin_root=redirector.pin_root)
    assert cleaned == ["ebpf", "iptables"]
    assert tc.ours(net.pod) == [] and iptables.installed(net.pod).empty
    assert not routes_state(net.pod, fwmark=0x111, mask=0xFFF, table=100).rule


# --- the agent's redirector (modes.py) and its outbound listener ----------------------------


def test_make_redirector_prepares_ebpf_mode_before_any_pod(pin_root: Path) -> None:
    made = make_redirector(RedirectMode.EBPF, RedirectPorts(), pin_dir=pin_root)
    assert isinstance(made, ModeSwitch) and made.mode == "ebpf"
    summary = made.summary()  # compiled (or reused) and pinned already: nothing waits for a pod
    assert summary["mode"] == "ebpf" and (pin_root / f"build-{summary['build']}").is_dir()
    assert set(summary["programs"]) == set(ebpf_build.PROGRAMS)


def test_make_redirector_that_cannot_pin_is_a_config_error(tmp_path: Path) -> None:
    pins = tmp_path / "plain-dir"
    with pytest.raises(ConfigError, match="REDIRECT_MODE=ebpf: no bpf filesystem at"):
        make_redirector(RedirectMode.EBPF, RedirectPorts(), pin_dir=pins)
    assert not pins.exists()


def _mode_switch(mode: RedirectMode, pin_root: Path) -> ModeSwitch:
    made = make_redirector(mode, RedirectPorts(), pin_dir=pin_root)
    assert isinstance(made, ModeSwitch)
    return made


def test_a_node_switched_between_modes_keeps_only_the_active_one(net: Net, pin_root: Path) -> None:
    as_iptables = _mode_switch(RedirectMode.IPTABLES, pin_root)
    as_ebpf = _mode_switch(RedirectMode.EBPF, pin_root)
    assert as_iptables.install(net.pod, POD) is True
    # iptables -> eBPF: the agent's first install clears the chains (a change, though the
    # eBPF part alone would have been one too), the pod captured all along.
    assert as_ebpf.install(net.pod, POD) is True
    assert iptables.installed(net.pod).empty and our_filters(net.pod) == EXPECTED_FILTERS
    assert as_ebpf.install(net.pod, POD) is False  # reconciled: nothing to do twice
    with agent_listener(net.pod, 15001) as out_l, connect(net.pod, REMOTE) as app:
        conn, _ = accept(out_l)
        with conn:
            echo(app, conn)
    # eBPF -> iptables: programs, pins and link go, the chains come.
    pod_dir = as_ebpf.inner.pod_dir(net.pod)  # type: ignore[union-attr]
    assert as_iptables.install(net.pod, POD) is True
    assert tc.ours(net.pod) == [] and not pod_dir.exists() and sk_lookup_links(net.pod) == []
    assert iptables.installed(net.pod) == iptables.expected_state(iptables.InpodConfig())
    assert routes_state(net.pod, fwmark=0x111, mask=0xFFF, table=100).rule


def test_the_other_modes_leftovers_count_as_installed_and_are_removed(
    net: Net, pin_root: Path
) -> None:
    """A pod that left the mesh while the node switched modes: the agent's stranded check
    finds the other mode's state, and removing takes both modes' and the routes."""
    as_iptables = _mode_switch(RedirectMode.IPTABLES, pin_root)
    as_ebpf = _mode_switch(RedirectMode.EBPF, pin_root)
    as_ebpf.install(net.pod, POD)
    assert as_iptables.installed(net.pod) and not as_iptables.inner.installed(net.pod)
    assert as_iptables.remove(net.pod, POD) is True
    assert tc.ours(net.pod) == [] and not as_iptables.installed(net.pod)
    assert not routes_state(net.pod, fwmark=0x111, mask=0xFFF, table=100).rule
    iptables.install(net.pod, iptables.InpodConfig())
    assert as_ebpf.installed(net.pod) and as_ebpf.remove(net.pod, POD) is True
    assert iptables.installed(net.pod).empty
    assert not routes_state(net.pod, fwmark=0x111, mask=0xFFF, table=100).rule


def test_iptables_mode_does_not_look_for_ebpf_state_where_none_was_ever_pinned(
    net: Net, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No tc and no SO_NETNS_COOKIE (Linux >= 5.14) needed by the default mode, unless
    eBPF mode pinned pods under this pin directory before."""

    def no_tc(*args: object, **kwargs: object) -> list[tc.Attached]:
        raise AssertionError("tc consulted")

    monkeypatch.setattr(tc, "ours", no_tc)
    as_iptables = _mode_switch(RedirectMode.IPTABLES, tmp_path / "never-ebpf")
    assert as_iptables.install(net.pod, POD) is True
    assert as_iptables.installed(net.pod) and as_iptables.remove(net.pod, POD) is True


def test_the_proxys_outbound_listener_is_transparent_whatever_enable_orig_src_says(
    net: Net,
) -> None:
    """eBPF hands the outbound listener connections to remote addresses: without
    IP_TRANSPARENT their SYN-ACK cannot be sent (test_the_outbound_listener_must_be_transparent)."""
    proxy = WorkloadProxy(
        ProxyContext(Config(), StateStore(), None, None),  # type: ignore[arg-type]
        WorkloadInfo("demo", "app", "default"),
        sockets.NetnsSocketFactory(net.pod, MARK),
        ProxyAddresses(("::", 15001), ("::", 15008), ("::", 15006)),
        orig_src=False,
    )
    bound = {name: sock for name, sock, _ in proxy._bind()}
    try:
        opt = (sockets.SOL_IPV6, sockets.IPV6_TRANSPARENT)
        assert bound["outbound"].getsockopt(*opt) == 1
        assert bound["inbound_plaintext"].getsockopt(*opt) == 0  # ENABLE_ORIG_SRC=false
        assert proxy.transparent is False  # the app is dialled from the pod's own address
    finally:
        for sock in bound.values():
            sock.close()


# --- startup checks and the compiler's view of the layout -----------------------------------


def test_missing_bpffs_is_reported_before_anything_is_written(tmp_path: Path) -> None:
    pin_root = tmp_path / "not-bpffs"
    with pytest.raises(EbpfUnavailable, match="no bpf filesystem at"):
        EbpfRedirector(pin_root=pin_root).prepare()
    assert not pin_root.exists()


def test_missing_sources_are_reported_before_anything_is_written(
    tmp_path: Path, pin_root: Path
) -> None:
    scratch = pin_root.with_name(pin_root.name + "-nosrc")
    with pytest.raises(EbpfUnavailable, match="ZTUNNEL_EBPF_DIR"):
        EbpfRedirector(pin_root=scratch, source_dir=tmp_path).prepare()
    assert not scratch.exists()


def test_missing_kernel_headers_are_reported_before_anything_is_written(
    tmp_path: Path, pin_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Headers are looked for where bcc will look (here: an empty BCC_KERNEL_SOURCE)."""
    monkeypatch.setenv(environment.HEADERS_ENV, str(tmp_path / "no-headers"))
    scratch = pin_root.with_name(pin_root.name + "-nohdr")
    with pytest.raises(EbpfUnavailable, match=r"kernel headers for .* not found at .*no-headers"):
        EbpfRedirector(pin_root=scratch).prepare()
    assert not scratch.exists()


def test_missing_bcc_is_reported_before_anything_is_written(
    tmp_path: Path, pin_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No bcc in the venv and none where Debian's python3-bpfcc puts it."""
    for name in [m for m in sys.modules if m == "bcc" or m.startswith("bcc.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(environment, "BCC_DIRS", (str(tmp_path),))
    scratch = pin_root.with_name(pin_root.name + "-nobcc")
    with pytest.raises(EbpfUnavailable, match=r"bcc is not usable .*apt-get install python3-bpfcc"):
        EbpfRedirector(pin_root=scratch).prepare()
    assert not scratch.exists()


def test_a_source_that_does_not_compile_is_one_clear_error(tmp_path: Path, pin_root: Path) -> None:
    broken = tmp_path / "ebpf"
    shutil.copytree(SOURCES, broken)
    (broken / "redirect.c").write_text("int zt_ingress(struct __sk_buff *skb) { return x; }\n")
    scratch = pin_root.with_name(pin_root.name + "-broken")
    try:
        with pytest.raises(EbpfUnavailable, match=r"cannot compile or load redirect\.c"):
            EbpfRedirector(pin_root=scratch, source_dir=broken).prepare()
        assert not any(p.name.startswith("build-") for p in scratch.iterdir())
    finally:
        ebpf_build.remove_tree(scratch)


def test_clang_lays_out_zt_config_as_python_packs_it() -> None:
    bcc = import_bcc()
    module = bcc.BPF(src_file=str(SOURCES / "redirect.c").encode(), cflags=[f"-I{SOURCES}"])
    try:
        leaf = module[b"zt_config"].Leaf
        assert ctypes.sizeof(leaf) == layout.CONFIG_STRUCT.size
        names = [f[0] for f in leaf._fields_]
        assert names == [name for name, _, _ in layout.CONFIG_FIELDS]
        raw = layout.MapConfig(outbound_port=25001, agent_mark=0x77).pack()
        value = leaf.from_buffer_copy(raw)
        assert value.outbound_port == 25001 and value.agent_mark == 0x77
        assert bytes(value.probe_v4) == bytes([169, 254, 7, 127])
        per_cpu = module[b"zt_stats"].Leaf  # one u64 per possible CPU
        assert ctypes.sizeof(per_cpu._type_) == layout.STAT_VALUE_SIZE
        assert per_cpu._length_ == bpfsys.possible_cpus()
    finally:
        module.cleanup()
