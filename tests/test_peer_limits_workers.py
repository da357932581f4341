"""Limits per peer and per pod with worker processes (ZTUNNEL_WORKER_THREADS=2).

The kernel spreads a peer's connections over the workers' SO_REUSEPORT listeners, and
each worker keeps its own counters: each admits its share of a limit
(``PeerLimits.share``), so the workers together never admit more than the limit, and a
flood penalty given by one worker is passed to the others (``Penalty``). Each end-to-end
test below fails when the limits are counted per worker (a peer then gets twice its
limit) or the penalty stays in the worker that gave it (half the flooder's reconnects
get a fresh budget).
"""

from __future__ import annotations

import socket
from collections.abc import Hashable
from contextlib import ExitStack

import h2.config
import h2.connection
import h2.events
import pytest
from test_peer_limits import (
    ATTACKER,
    CALM,
    CLIENT,
    Clock,
    context,
    hits,
    ping_flood_until_goaway,
    request_from,
    run_mesh,
    served,
    wait,
)

from ztunnel.config import Config
from ztunnel.hbone.limits import Limit
from ztunnel.proxy.admission import PeerAdmission, PeerLimit, PeerLimits
from ztunnel.proxy.context import ProxyContext
from ztunnel.state.store import StateStore
from ztunnel.telemetry.connections import ConnectionTracker
from ztunnel.telemetry.metrics import Metrics
from ztunnel.testing.loopback import LoopbackMesh

TWO = {"ZTUNNEL_WORKER_THREADS": "2"}
ATTEMPTS = 16  # connections of one peer: both workers get some (all in one: 2 in 65,536)

pytestmark = pytest.mark.timeout(120)


# -- the share, pure -----------------------------------------------------------------------


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


# -- end to end: agent B with two worker processes -------------------------------------------


def admitted(mesh: LoopbackMesh, stack: ExitStack) -> bool:
    """A new HBONE connection of ATTACKER to agent B, kept open in ``stack``: True when B
    admitted it (its SETTINGS arrived), False when B closed it after the handshake."""
    raw = stack.enter_context(socket.create_connection((mesh.server_ip, 15008), timeout=5))
    tls = stack.enter_context(context(mesh, ATTACKER).wrap_socket(raw, server_hostname=None))
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    try:
        tls.sendall(conn.data_to_send())
        while data := tls.recv(65536):
            if any(isinstance(e, h2.events.RemoteSettingsChanged) for e in conn.receive_data(data)):
                return True
    except OSError:
        pass  # reset: refused
    return False


async def test_connections_per_peer_identity_are_whole_across_workers(
    capfd: pytest.CaptureFixture[str],
) -> None:
    def check(mesh: LoopbackMesh) -> None:
        with ExitStack() as stack:
            count = sum(admitted(mesh, stack) for _ in range(ATTEMPTS))
            # Per worker, each would admit 2: 4 in all.
            assert count == 2
            assert served(mesh, CLIENT)  # another identity is not limited
            assert wait(lambda: hits(mesh, PeerLimit.CONNECTIONS_PER_IDENTITY) == ATTEMPTS - 2)

    await run_mesh({**TWO, "HBONE_MAX_CONNECTIONS_PER_PEER": "2"}, check)
    # The workers log to the agent's stderr: one warning in each at most (each counts
    # its own share), not one per refusal.
    logged = capfd.readouterr().err.count('refusing peer connection limit="connections_per')
    assert 1 <= logged <= 2


def refused_before_tls(mesh: LoopbackMesh, source: str) -> bool:
    """A new TCP connection from ``source`` is closed by agent B before any TLS answer
    (False: B waited for the rest of the ClientHello, i.e. admitted it)."""
    try:
        with socket.create_connection(
            (mesh.server_ip, 15008), timeout=3, source_address=(source, 0)
        ) as sock:
            sock.sendall(b"\x16\x03\x01\x00\x05hello")  # starts a ClientHello, never ends it
            return sock.recv(100) == b""
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False


async def test_a_flood_penalty_applies_in_every_worker() -> None:
    def check(mesh: LoopbackMesh) -> None:
        attacker_ip = f"{mesh.base}.50"
        assert ping_flood_until_goaway(mesh, attacker_ip) == CALM
        # The reconnects land on both workers; the one that did not see the flood
        # refuses them too (before TLS, by IP). One may slip through while the penalty
        # travels worker -> control process -> worker; per worker, about half would.
        refused = [refused_before_tls(mesh, attacker_ip) for _ in range(ATTEMPTS)]
        assert refused.count(False) <= 1, refused
        assert request_from(mesh, context(mesh, CLIENT), f"{mesh.base}.51") == (200, b"x")
        assert wait(lambda: hits(mesh, PeerLimit.PENALTY) >= 15)

    await run_mesh({**TWO, "HBONE_FLOOD_PENALTY": "60s"}, check)
