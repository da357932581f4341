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
from contextlib import ExitStack

import h2.config
import h2.connection
import h2.events
import pytest
from test_peer_limits import (
    ATTACKER,
    CALM,
    CLIENT,
    context,
    hits,
    ping_flood_until_goaway,
    request_from,
    run_mesh,
    served,
    wait,
)

from ztunnel.proxy.admission import PeerLimit
from ztunnel.testing.loopback import LoopbackMesh

TWO = {"ZTUNNEL_WORKER_THREADS": "2"}
ATTEMPTS = 16  # connections of one peer: both workers get some (all in one: 2 in 65,536)

pytestmark = pytest.mark.timeout(120)


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
