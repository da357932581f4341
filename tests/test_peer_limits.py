"""Limits per peer and per pod, and the flood penalty (proxy/admission.py).

The policy is pure and tested with a fake clock; then each limit is checked end to end
on a loopback mesh (agent B's 15008, agent A's SOCKS5) with the limit set low by its
environment variable: refused, counted in ``ztunnel_limit_hits_total``, logged once,
and others still served.
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import Hashable, Iterator, MutableMapping
from contextlib import contextmanager, suppress
from typing import Any

import h2.config
import h2.connection
import h2.events
import pytest
import structlog
import trio
from mesh_apps import serve_echo
from raw_hbone import HandshakeRejected, connect_headers, request

from ztunnel.config import Config
from ztunnel.errors import ConfigError
from ztunnel.hbone.limits import Limit
from ztunnel.hbone.settings import HboneSettings
from ztunnel.identity.ca import FakeCA
from ztunnel.identity.tls import client_context
from ztunnel.model.identity import Identity
from ztunnel.proxy.admission import (
    PENALIZED,
    Counted,
    PeerAdmission,
    PeerLimit,
    PeerLimits,
    Penalties,
    PodConnections,
    Refusal,
)
from ztunnel.proxy.context import ProxyContext
from ztunnel.state.store import StateStore
from ztunnel.telemetry.connections import ConnectionTracker
from ztunnel.telemetry.metrics import Metrics
from ztunnel.testing.loopback import APP_PORT, LoopbackMesh, loopback_mesh, socks5_connect

ATTACKER = Identity("cluster.local", "default", "attacker")
CLIENT = Identity("cluster.local", "default", "client")
CALM = 11  # ENHANCE_YOUR_CALM


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


# -- the policy, pure ----------------------------------------------------------------------


def test_counted_refuses_past_its_maximum_logs_once_and_rearms_below_it() -> None:
    counted = Counted("x", 2)
    assert counted.acquire("a") is None and counted.acquire("a") is None
    assert counted.acquire("a") == Refusal("x", log=True)
    assert counted.acquire("a") == Refusal("x", log=False)  # one log line per episode
    assert counted.acquire("b") is None  # per key
    assert (counted.count("a"), counted.count("b"), counted.count("c")) == (2, 1, 0)
    counted.release("a")
    assert counted.count("a") == 1
    assert counted.acquire("a") is None
    assert counted.acquire("a") == Refusal("x", log=True)  # a new episode logs again


def test_counted_forgets_keys_at_zero() -> None:
    counted = Counted("x", 5)
    for key in range(100):
        counted.acquire(key)
        counted.release(key)
    assert len(counted) == 0


def test_releasing_a_key_never_counted_changes_nothing() -> None:
    # e.g. a release after a refusal: it must neither raise nor count below zero
    counted = Counted("x", 1)
    counted.release("a")
    assert counted.count("a") == 0 and len(counted) == 0
    assert counted.acquire("a") is None
    assert counted.acquire("a") == Refusal("x", log=True)


def test_handshakes_per_ip() -> None:
    peers = PeerAdmission(PeerLimits(handshakes_per_ip=2))
    assert peers.begin_handshake("10.0.0.1") is None
    assert peers.begin_handshake("10.0.0.1") is None
    refusal = peers.begin_handshake("10.0.0.1")
    assert refusal is not None and refusal.limit == PeerLimit.HANDSHAKES_PER_IP
    assert peers.begin_handshake("10.0.0.2") is None
    peers.end_handshake("10.0.0.1")
    assert peers.begin_handshake("10.0.0.1") is None


def test_connections_per_identity() -> None:
    peers = PeerAdmission(PeerLimits(connections_per_identity=1))
    assert peers.admit_connection(ATTACKER) is None
    refusal = peers.admit_connection(ATTACKER)
    assert refusal is not None and refusal.limit == PeerLimit.CONNECTIONS_PER_IDENTITY
    assert peers.admit_connection(CLIENT) is None
    peers.release_connection(ATTACKER)
    assert peers.admit_connection(ATTACKER) is None


def test_streams_per_identity() -> None:
    peers = PeerAdmission(PeerLimits(streams_per_identity=3))
    for _ in range(3):
        assert peers.admit_stream(ATTACKER) is None
    refusal = peers.admit_stream(ATTACKER)
    assert refusal is not None and refusal.limit == PeerLimit.STREAMS_PER_IDENTITY
    assert peers.admit_stream(CLIENT) is None
    peers.release_stream(ATTACKER)
    assert peers.admit_stream(ATTACKER) is None


@pytest.mark.parametrize("limit", sorted(PENALIZED))
def test_a_flood_limit_penalises_identity_and_ip_until_the_penalty_ends(limit: str) -> None:
    clock = Clock()
    peers = PeerAdmission(PeerLimits(penalty=10.0), clock)
    assert peers.limit_hit(limit, ATTACKER, "10.0.0.9")
    first = peers.admit_connection(ATTACKER)
    assert first == Refusal(PeerLimit.PENALTY, log=True)
    assert peers.admit_connection(ATTACKER) == Refusal(PeerLimit.PENALTY, log=False)
    assert peers.begin_handshake("10.0.0.9") == Refusal(PeerLimit.PENALTY, log=True)
    assert peers.admit_connection(CLIENT) is None  # others are not punished
    assert peers.begin_handshake("10.0.0.8") is None
    clock.now += 9.9
    assert peers.admit_connection(ATTACKER) is not None
    clock.now += 0.2
    assert peers.admit_connection(ATTACKER) is None
    assert peers.begin_handshake("10.0.0.9") is None
    assert len(peers.penalties) == 0  # expired entries go


def test_other_limits_and_a_zero_penalty_do_not_penalise() -> None:
    peers = PeerAdmission(PeerLimits(penalty=10.0), Clock())
    assert not peers.limit_hit(Limit.IDLE_TIMEOUT, ATTACKER, "10.0.0.9")
    assert not peers.limit_hit(Limit.PENDING_CONNECTS, ATTACKER, "10.0.0.9")
    assert peers.admit_connection(ATTACKER) is None
    off = PeerAdmission(PeerLimits(penalty=0), Clock())
    assert not off.limit_hit(Limit.RESETS, ATTACKER, "10.0.0.9")
    assert off.begin_handshake("10.0.0.9") is None


def test_penalties_stay_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("ztunnel.proxy.admission._MAX_PENALTIES", 10)
    clock = Clock()
    peers = PeerAdmission(PeerLimits(penalty=10.0), clock)
    for i in range(50):
        peers.limit_hit(Limit.PINGS, f"id{i}", f"ip{i}")
    assert len(peers.penalties) <= 11
    assert peers.admit_connection("id49") is not None  # the newest are kept


def test_a_full_penalty_list_forgets_expired_then_oldest_keys_and_their_log_marks(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("ztunnel.proxy.admission._MAX_PENALTIES", 4)
    clock = Clock()
    penalties = Penalties(10.0, clock)
    penalties.add("expired")
    assert penalties.check("expired") is not None  # logged
    clock.now += 10.0
    penalties.add("a", "b", "c", "d")  # 5 > 4: the expired one goes first
    assert len(penalties) == 4 and penalties.check("a") is not None
    penalties.add("a")  # penalised again: now the newest
    for key in ("b", "c", "d"):
        assert penalties.check(key) is not None  # each logged once
    penalties.add("e")  # 5 > 4, none expired: the oldest ("b") goes, exactly one
    assert len(penalties) == 4
    assert penalties.check("b") is None
    assert all(penalties.check(k) is not None for k in ("a", "c", "d", "e"))
    # What is forgotten is forgotten whole: no log mark stays behind for it.
    assert penalties._logged <= set(penalties._until)


def test_a_penalty_logs_once_per_episode_and_forgets_its_mark_when_it_ends() -> None:
    clock = Clock()
    penalties = Penalties(10.0, clock)
    penalties.add("k")
    assert penalties.check("k") == Refusal(PeerLimit.PENALTY, log=True)
    assert penalties.check("k") == Refusal(PeerLimit.PENALTY, log=False)
    penalties.add("k")  # flooded again: a new episode logs again
    assert penalties.check("k") == Refusal(PeerLimit.PENALTY, log=True)
    clock.now += 10.0
    assert penalties.check("k") is None
    assert len(penalties) == 0 and not penalties._logged  # nothing kept for an ended key


def test_a_zero_penalty_remembers_nothing() -> None:
    peers = PeerAdmission(PeerLimits(penalty=0), Clock())
    peers.penalize((("id", ATTACKER), ("ip", "10.0.0.9")))
    assert len(peers.penalties) == 0
    assert peers.admit_connection(ATTACKER) is None


def test_pod_connections_per_direction() -> None:
    pod = PodConnections(PeerLimits(pod_inbound_connections=1, pod_outbound_connections=2))
    assert pod.acquire("inbound") is None
    refusal = pod.acquire("inbound")
    assert refusal is not None and refusal.limit == PeerLimit.POD_INBOUND_CONNECTIONS
    assert pod.acquire("outbound") is None and pod.acquire("outbound") is None
    refusal = pod.acquire("outbound")
    assert refusal is not None and refusal.limit == PeerLimit.POD_OUTBOUND_CONNECTIONS
    assert (pod.count("inbound"), pod.count("outbound")) == (1, 2)
    pod.release("inbound")
    assert pod.count("inbound") == 0
    assert pod.acquire("inbound") is None


def test_settings_from_config_and_refused_values() -> None:
    config = Config.from_sources(
        {
            "HBONE_MAX_HANDSHAKES_PER_IP": "3",
            "HBONE_MAX_CONNECTIONS_PER_PEER": "4",
            "HBONE_MAX_STREAMS_PER_PEER": "5",
            "POD_MAX_INBOUND_CONNECTIONS": "6",
            "POD_MAX_OUTBOUND_CONNECTIONS": "7",
            "HBONE_FLOOD_PENALTY": "2s",
        }
    )
    assert PeerLimits.from_config(config) == PeerLimits(3, 4, 5, 6, 7, 2.0)
    assert PeerLimits.from_config(Config()) == PeerLimits()
    for name in (
        "HBONE_MAX_HANDSHAKES_PER_IP",
        "HBONE_MAX_CONNECTIONS_PER_PEER",
        "HBONE_MAX_STREAMS_PER_PEER",
        "POD_MAX_INBOUND_CONNECTIONS",
        "POD_MAX_OUTBOUND_CONNECTIONS",
    ):
        with pytest.raises(ConfigError, match=name):
            Config.from_sources({name: "0"})
    with pytest.raises(ConfigError):
        PeerLimits(penalty=-1)
    # Not numbers of the right kind (a bool is an int to Python, never a limit here).
    for bad in (True, 1.5, "3", None):
        with pytest.raises(ConfigError, match="handshakes_per_ip"):
            PeerLimits(handshakes_per_ip=bad)  # type: ignore[arg-type]
    for bad in (True, "10", None):
        with pytest.raises(ConfigError, match="penalty"):
            PeerLimits(penalty=bad)  # type: ignore[arg-type]
    assert PeerLimits(penalty=0).penalty == 0 and PeerLimits(penalty=2).penalty == 2


# -- with worker processes: each admits a share, the penalty is passed on ------------------


def test_each_worker_admits_its_share_of_every_count_and_the_whole_penalty() -> None:
    limits = PeerLimits(256, 1024, 20_000, 16_384, 16_383, 10.0)
    assert limits.share(1) == limits
    assert limits.share(2) == PeerLimits(128, 512, 10_000, 8192, 8191, 10.0)
    assert limits.share(3) == PeerLimits(85, 341, 6666, 5461, 5461, 10.0)
    # Never 0 (nothing could connect): a limit below the worker count admits one each.
    assert PeerLimits(1, 1, 1, 1, 1, 0.0).share(4) == PeerLimits(1, 1, 1, 1, 1, 0.0)


def test_the_proxy_context_of_a_worker_uses_its_share() -> None:
    config = Config.from_sources({"HBONE_MAX_CONNECTIONS_PER_PEER": "10"})

    def ctx(**kw: int) -> ProxyContext:
        tracker = ConnectionTracker(Metrics(process_metrics=False))
        return ProxyContext(config, StateStore(), None, tracker, **kw)  # type: ignore[arg-type]

    assert ctx(workers=2).peer_limits.connections_per_identity == 5
    assert ctx(workers=2).peers.limits.connections_per_identity == 5
    assert ctx().peers.limits == PeerLimits.from_config(config)


def test_a_penalty_is_reported_once_and_one_from_elsewhere_applies_here() -> None:
    clock = Clock()
    told: list[tuple[Hashable, ...]] = []
    here = PeerAdmission(PeerLimits(penalty=10.0), clock)
    here.on_penalty = told.append
    assert not here.limit_hit(Limit.IDLE_TIMEOUT, ATTACKER, "10.0.0.9")  # not a flood
    assert here.limit_hit(Limit.PINGS, ATTACKER, "10.0.0.9")
    assert told == [(("id", ATTACKER), ("ip", "10.0.0.9"))]

    there = PeerAdmission(PeerLimits(penalty=10.0), clock)
    there.on_penalty = lambda keys: pytest.fail("a received penalty is not passed on again")
    there.penalize(told[0])
    assert there.admit_connection(ATTACKER) is not None
    assert there.begin_handshake("10.0.0.9") is not None
    assert there.admit_connection(CLIENT) is None
    clock.now += 10.0
    assert there.admit_connection(ATTACKER) is None

    off = PeerAdmission(PeerLimits(penalty=0.0), clock)
    off.on_penalty = told.append
    assert not off.limit_hit(Limit.PINGS, ATTACKER, "10.0.0.9")
    assert len(told) == 1  # no penalty, nothing to tell


# -- end to end on a loopback mesh ---------------------------------------------------------


def context(mesh: LoopbackMesh, identity: Identity) -> ssl.SSLContext:
    assert isinstance(mesh.ca, FakeCA)
    return client_context(mesh.ca.workload_certificate(identity))


@contextmanager
def held_connection(
    mesh: LoopbackMesh, identity: Identity, *, source: str | None = None
) -> Iterator[tuple[ssl.SSLSocket, h2.connection.H2Connection]]:
    """An HBONE connection agent B has admitted (its SETTINGS arrived), held open."""
    raw = socket.create_connection(
        (mesh.server_ip, 15008), timeout=5, source_address=(source, 0) if source else None
    )
    tls = context(mesh, identity).wrap_socket(raw, server_hostname=None)
    try:
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        conn.initiate_connection()
        tls.sendall(conn.data_to_send())
        while not any(
            isinstance(e, h2.events.RemoteSettingsChanged)
            for e in conn.receive_data(tls.recv(65536))
        ):
            pass
        tls.sendall(conn.data_to_send())
        yield tls, conn
    finally:
        tls.close()


def open_stream(tls: ssl.SSLSocket, conn: h2.connection.H2Connection, authority: str) -> int:
    """CONNECT on a held connection; the response status (the stream stays open)."""
    sid = conn.get_next_available_stream_id()
    conn.send_headers(sid, connect_headers(authority))
    tls.sendall(conn.data_to_send())
    while True:
        for event in conn.receive_data(tls.recv(65536)):
            if isinstance(event, h2.events.ResponseReceived) and event.stream_id == sid:
                return int(dict(event.headers)[b":status"])
        tls.sendall(conn.data_to_send())


def served(mesh: LoopbackMesh, identity: Identity) -> bool:
    """Whether a fresh connection of ``identity`` gets its CONNECT answered with 200."""
    try:
        status, body = request(
            (mesh.server_ip, 15008),
            context(mesh, identity),
            connect_headers(f"{mesh.server_ip}:{APP_PORT}"),
            body=b"x",
        )
    except HandshakeRejected:
        return False
    return status == 200 and body == b"x"


def request_from(mesh: LoopbackMesh, ctx: ssl.SSLContext, source: str) -> tuple[int, bytes]:
    """``raw_hbone.request`` from a chosen source IP (0 when refused)."""
    orig = socket.create_connection

    def bound(addr: tuple[str, int], timeout: float = 5.0, **_: object) -> socket.socket:
        return orig(addr, timeout=timeout, source_address=(source, 0))

    socket.create_connection = bound  # type: ignore[assignment]
    try:
        return request(
            (mesh.server_ip, 15008), ctx, connect_headers(f"{mesh.server_ip}:{APP_PORT}"), body=b"x"
        )
    except HandshakeRejected:
        return 0, b""
    finally:
        socket.create_connection = orig


def hits(mesh: LoopbackMesh, limit: str) -> float:
    metrics = mesh.server_agent.ctx.tracker.metrics
    value = metrics.registry.get_sample_value("ztunnel_limit_hits_total", {"limit": limit})
    return value or 0.0


async def run_mesh(env: dict[str, str], check: object) -> list[MutableMapping[str, Any]]:
    with structlog.testing.capture_logs() as logs, trio.fail_after(40):
        async with loopback_mesh(extra_env=env) as mesh, trio.open_nursery() as nursery:
            await nursery.start(serve_echo, mesh.server_ip, APP_PORT)
            await trio.to_thread.run_sync(check, mesh)  # type: ignore[arg-type]
            nursery.cancel_scope.cancel()
    return logs


def warnings(logs: list[MutableMapping[str, Any]], limit: str) -> list[MutableMapping[str, Any]]:
    return [e for e in logs if e.get("limit") == limit and e.get("log_level") == "warning"]


async def test_connections_per_peer_identity() -> None:
    def check(mesh: LoopbackMesh) -> None:
        with held_connection(mesh, ATTACKER):
            assert not served(mesh, ATTACKER)
            assert not served(mesh, ATTACKER)
            assert served(mesh, CLIENT)  # another identity is not limited
        assert hits(mesh, PeerLimit.CONNECTIONS_PER_IDENTITY) == 2
        assert served(mesh, ATTACKER)  # released with the connection

    logs = await run_mesh({"HBONE_MAX_CONNECTIONS_PER_PEER": "1"}, check)
    assert len(warnings(logs, PeerLimit.CONNECTIONS_PER_IDENTITY)) == 1


async def test_streams_per_peer_identity() -> None:
    def check(mesh: LoopbackMesh) -> None:
        authority = f"{mesh.server_ip}:{APP_PORT}"
        with held_connection(mesh, ATTACKER) as (tls, conn):
            assert open_stream(tls, conn, authority) == 200
            assert open_stream(tls, conn, authority) == 503
            with held_connection(mesh, ATTACKER) as (tls2, conn2):  # across connections
                assert open_stream(tls2, conn2, authority) == 503
            assert served(mesh, CLIENT)
        assert hits(mesh, PeerLimit.STREAMS_PER_IDENTITY) == 2

    logs = await run_mesh({"HBONE_MAX_STREAMS_PER_PEER": "1"}, check)
    assert len(warnings(logs, PeerLimit.STREAMS_PER_IDENTITY)) == 1


def refused_before_tls(mesh: LoopbackMesh, source: str) -> bool:
    """A new TCP connection from ``source`` is closed by agent B without a TLS answer."""
    try:
        with socket.create_connection(
            (mesh.server_ip, 15008), timeout=5, source_address=(source, 0)
        ) as sock:
            sock.sendall(b"\x16\x03\x01\x00\x05hello")  # starts a ClientHello, never ends it
            return sock.recv(100) == b""
    except (ConnectionResetError, BrokenPipeError):
        return True  # reset: by the time we connected, sent or read
    except TimeoutError:
        return False  # still waiting for the rest of the handshake: admitted


async def test_handshakes_per_source_ip() -> None:
    def check(mesh: LoopbackMesh) -> None:
        attacker_ip = f"{mesh.base}.50"
        with socket.create_connection(
            (mesh.server_ip, 15008), timeout=5, source_address=(attacker_ip, 0)
        ):
            # The first one sits in its handshake; the next from that IP is refused at once.
            assert wait(lambda: refused_before_tls(mesh, attacker_ip))
            assert served(mesh, CLIENT)  # from another IP
        assert hits(mesh, PeerLimit.HANDSHAKES_PER_IP) >= 1

    logs = await run_mesh({"HBONE_MAX_HANDSHAKES_PER_IP": "1"}, check)
    assert len(warnings(logs, PeerLimit.HANDSHAKES_PER_IP)) == 1


def wait(predicate: object, seconds: float = 5.0) -> bool:
    import time

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return True
        time.sleep(0.05)
    return False


def ping_flood_until_goaway(mesh: LoopbackMesh, source: str) -> int:
    with held_connection(mesh, ATTACKER, source=source) as (tls, conn):
        for i in range(500):
            conn.ping(i.to_bytes(8, "big"))
        with suppress(OSError):  # the GOAWAY may come before all of it was sent
            tls.sendall(conn.data_to_send())
        while True:
            data = tls.recv(65536)
            if not data:
                raise AssertionError("closed without GOAWAY")
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.ConnectionTerminated):
                    return int(event.error_code or 0)


async def test_a_flooder_is_refused_for_the_penalty_by_identity_and_ip() -> None:
    def check(mesh: LoopbackMesh) -> None:
        attacker_ip, other_ip = f"{mesh.base}.50", f"{mesh.base}.51"
        assert ping_flood_until_goaway(mesh, attacker_ip) == CALM
        # Reconnecting does not buy a fresh budget: refused from the same IP before TLS ...
        assert refused_before_tls(mesh, attacker_ip)
        # ... and with the same identity from another IP after its handshake.
        assert request_from(mesh, context(mesh, ATTACKER), other_ip)[0] == 0
        assert request_from(mesh, context(mesh, CLIENT), other_ip) == (200, b"x")
        assert hits(mesh, PeerLimit.PENALTY) == 2
        assert hits(mesh, Limit.PINGS) == 1

    logs = await run_mesh({"HBONE_FLOOD_PENALTY": "60s"}, check)
    assert [e["event"] for e in logs if e.get("limit") == Limit.PINGS].count(
        "peer flooded, refusing its new connections for a while"
    ) == 1


async def test_the_penalty_ends() -> None:
    def check(mesh: LoopbackMesh) -> None:
        attacker_ip = f"{mesh.base}.50"
        assert ping_flood_until_goaway(mesh, attacker_ip) == CALM
        assert request_from(mesh, context(mesh, ATTACKER), attacker_ip)[0] == 0
        assert wait(lambda: request_from(mesh, context(mesh, ATTACKER), attacker_ip)[0] == 200)

    await run_mesh({"HBONE_FLOOD_PENALTY": "1s"}, check)


async def test_inbound_connections_per_pod() -> None:
    def check(mesh: LoopbackMesh) -> None:
        with socket.create_connection(
            (mesh.server_ip, 15008), timeout=5, source_address=(f"{mesh.base}.50", 0)
        ):
            assert wait(lambda: refused_before_tls(mesh, f"{mesh.base}.51"))
        assert wait(lambda: served(mesh, CLIENT))
        assert hits(mesh, PeerLimit.POD_INBOUND_CONNECTIONS) >= 1

    logs = await run_mesh({"POD_MAX_INBOUND_CONNECTIONS": "1"}, check)
    assert len(warnings(logs, PeerLimit.POD_INBOUND_CONNECTIONS)) == 1


async def test_outbound_connections_per_pod() -> None:
    with structlog.testing.capture_logs() as logs, trio.fail_after(40):
        async with (
            loopback_mesh(extra_env={"POD_MAX_OUTBOUND_CONNECTIONS": "1"}) as mesh,
            trio.open_nursery() as nursery,
        ):
            await nursery.start(serve_echo, mesh.server_ip, APP_PORT)
            held = await socks5_connect(
                mesh.socks5, mesh.server_ip, APP_PORT, local_ip=mesh.client_ip
            )
            with pytest.raises((ConnectionError, OSError, trio.BrokenResourceError)):
                await socks5_connect(mesh.socks5, mesh.server_ip, APP_PORT, local_ip=mesh.client_ip)
            await held.send_all(b"still here")
            assert await held.receive_some(100) == b"still here"
            await held.aclose()
            metrics = mesh.client_agent.ctx.tracker.metrics
            count = metrics.registry.get_sample_value(
                "ztunnel_limit_hits_total", {"limit": PeerLimit.POD_OUTBOUND_CONNECTIONS}
            )
            assert count == 1
            with trio.fail_after(5):
                while True:  # the slot comes back once the first connection's flow ended
                    try:
                        again = await socks5_connect(
                            mesh.socks5, mesh.server_ip, APP_PORT, local_ip=mesh.client_ip
                        )
                        break
                    except (ConnectionError, OSError, trio.BrokenResourceError):
                        await trio.sleep(0.05)
            await again.aclose()
            nursery.cancel_scope.cancel()
    assert len(warnings(logs, PeerLimit.POD_OUTBOUND_CONNECTIONS)) == 1


def test_unsent_bytes_per_connection_is_a_setting() -> None:
    config = Config.from_sources({"HBONE_MAX_UNSENT_BYTES": "65536"})
    assert HboneSettings.from_config(config).max_unsent_bytes == 65536
    with pytest.raises(ConfigError, match="HBONE_MAX_UNSENT_BYTES"):
        Config.from_sources({"HBONE_MAX_UNSENT_BYTES": "100"})
