"""The data plane in worker processes (ZTUNNEL_WORKER_THREADS=2), on the loopback mesh.

Each agent's control process runs here (in-process ``Agent``) and spawns real worker
processes, which bind SO_REUSEPORT listeners, carry the traffic and report it back.
Everything is checked through what an operator sees of the control process: metrics,
config_dump, readiness, and the traffic itself.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Mapping

import pytest
import trio
from cryptography import x509
from mesh_apps import echo_roundtrip, serve_echo
from test_loopback_policy import DENY_CLIENT

from ztunnel.admin.server import AdminHandler
from ztunnel.agent import Agent
from ztunnel.model.identity import Identity
from ztunnel.testing.loopback import (
    APP_PORT,
    LoopbackMesh,
    Socks5Refused,
    loopback_mesh,
    socks5_connect,
)

TWO = {"ZTUNNEL_WORKER_THREADS": "2"}
# One HBONE connection per stream: the destination's workers each get some (their
# SO_REUSEPORT group spreads connections by 4-tuple; pooled streams would share one).
SPREAD = {**TWO, "POOL_MAX_STREAMS_PER_CONNECTION": "1"}
CLIENT_ID = Identity("cluster.local", "default", "client")
SERVER_ID = Identity("cluster.local", "default", "server")

pytestmark = pytest.mark.timeout(120)


def metric(agent: Agent, name: str, **labels: str) -> float:
    """Sum of a sample over the agent's registry, filtered by the given labels."""
    total = 0.0
    for family in agent.metrics.registry.collect():
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


def config_dump(agent: Agent) -> dict[str, object]:
    """What /config_dump answers (the admin handler adds the tracker's connections)."""
    return AdminHandler(agent.config_dump, agent.tracker).config_dump()


def workers(agent: Agent) -> list[dict[str, object]]:
    dump = agent.config_dump()["workers"]
    assert isinstance(dump, list)
    return dump


async def until(cond: Callable[[], bool], what: str, limit: float = 10.0) -> None:
    try:
        with trio.fail_after(limit):
            while not cond():  # noqa: ASYNC110 - the agents' books have no event to wait on
                await trio.sleep(0.02)
    except trio.TooSlowError:
        raise AssertionError(f"timed out after {limit} s waiting for {what}") from None


async def open_streams(mesh: LoopbackMesh, n: int) -> list[trio.SocketStream]:
    streams = []
    for i in range(n):
        stream = await socks5_connect(
            mesh.socks5, mesh.server_ip, APP_PORT, local_ip=mesh.client_ip
        )
        await stream.send_all(b"ping %d" % i)
        assert await stream.receive_some(100) == b"ping %d" % i
        streams.append(stream)
    return streams


async def cut(stream: trio.SocketStream) -> bool:
    """True once the stream reads EOF (or a reset) within 5 s."""
    with trio.move_on_after(5):
        try:
            return await stream.receive_some(100) == b""
        except trio.BrokenResourceError:
            return True
    return False


def open_in(agent: Agent, direction: str) -> int:
    conns = config_dump(agent)["connections"]
    assert isinstance(conns, list)
    return sum(1 for c in conns if c["direction"] == direction)


async def test_connections_spread_over_the_workers_and_the_books_stay_whole() -> None:
    async with loopback_mesh(extra_env=TWO) as mesh, trio.open_nursery() as nursery:
        await nursery.start(serve_echo, mesh.server_ip, APP_PORT)
        client, server = mesh.client_agent, mesh.server_agent
        assert len({w["pid"] for w in workers(client)}) == 2
        streams = await open_streams(mesh, 16)

        # While open, the control process lists every worker's connections.
        await until(lambda: open_in(client, "outbound") == 16, "16 open outbound connections")
        await until(lambda: open_in(server, "inbound") == 16, "16 open inbound connections")
        spread = [w["connectionsOpened"] for w in workers(client)]
        assert sum(spread) == 16 and all(spread), spread  # type: ignore[call-overload]
        workload = config_dump(client)["workloadState"]["default/client"]  # type: ignore[index]
        assert len(workload["connections"]["outbound"]) == 16

        for stream in streams:
            await stream.aclose()
        await until(lambda: metric(client, "istio_tcp_connections_closed_total") == 16, "closed")
        await until(lambda: metric(server, "istio_tcp_connections_closed_total") == 16, "closed")
        assert metric(client, "istio_tcp_connections_opened_total", reporter="source") == 16
        assert metric(server, "istio_tcp_connections_opened_total", reporter="destination") == 16
        sent = sum(len(b"ping %d" % i) for i in range(16))
        assert metric(client, "istio_tcp_sent_bytes_total") == sent
        assert metric(server, "istio_tcp_received_bytes_total") == sent
        assert metric(client, "istio_tcp_sockets_open") == 0
        assert metric(client, "ztunnel_workers") == 2
        # The UI's history and the config dump: whole, nothing open any more.
        assert len(client.tracker.history) == 16 and len(server.tracker.history) == 16
        assert open_in(client, "outbound") == 0
        assert all(entry["connection"]["bytesSent"] for entry in _history(client))
        nursery.cancel_scope.cancel()


def _history(agent: Agent) -> list[Mapping[str, Mapping[str, object]]]:
    return [{"connection": e.connection} for e in agent.tracker.history]


async def test_a_policy_change_cuts_open_connections_in_every_worker() -> None:
    async with loopback_mesh(extra_env=SPREAD) as mesh, trio.open_nursery() as nursery:
        await nursery.start(serve_echo, mesh.server_ip, APP_PORT)
        server = mesh.server_agent
        streams = await open_streams(mesh, 10)
        await until(lambda: open_in(server, "inbound") == 10, "10 open inbound connections")
        assert all(w["openConnections"] for w in workers(server)), workers(server)

        server.store.upsert_policy(DENY_CLIENT)  # in the control process's store only

        assert [await cut(s) for s in streams] == [True] * 10
        await until(
            lambda: (
                metric(server, "istio_tcp_connections_closed_total", response_flags="DENY") == 10
            ),
            "10 connections closed as DENY",
        )
        with pytest.raises(Socks5Refused):
            await socks5_connect(mesh.socks5, mesh.server_ip, APP_PORT)
        server.store.remove_policy(DENY_CLIENT.key)
        again = await socks5_connect(mesh.socks5, mesh.server_ip, APP_PORT)
        assert await echo_roundtrip(again, b"back") == b"back"
        for stream in [*streams, again]:
            await stream.aclose()
        nursery.cancel_scope.cancel()


def _peer_serials(agent: Agent, uid: str) -> set[int]:
    """Serials of the peer certificates on a one-process agent's HBONE connections."""
    proxy = agent.proxies[uid]
    tls = [c.tls for c in getattr(proxy, "server_connections", ())]
    tls += [c.tls for _, c in proxy.pool.connections()] if hasattr(proxy, "pool") else []
    return {x509.load_der_x509_certificate(t.peer_certificate_der()).serial_number for t in tls}


@pytest.mark.parametrize("side", ["client", "server"])
async def test_a_rotated_certificate_reaches_the_workers(side: str) -> None:
    """The side with workers rotates; the one-process peer sees the new certificate on
    the next connection, and the connection opened before the rotation keeps working."""
    envs = {"client_env": TWO} if side == "client" else {"server_env": TWO}
    async with loopback_mesh(**envs) as mesh, trio.open_nursery() as nursery:
        await nursery.start(serve_echo, mesh.server_ip, APP_PORT)
        rotating = mesh.client_agent if side == "client" else mesh.server_agent
        observer, uid = (
            (mesh.server_agent, "default/server")
            if side == "client"
            else (mesh.client_agent, "default/client")
        )
        identity = CLIENT_ID if side == "client" else SERVER_ID
        (first,) = await open_streams(mesh, 1)
        old = rotating.secrets.get(identity)
        assert old is not None and _peer_serials(observer, uid) == {old.serial}

        new = await rotating.secrets.rotate(identity)
        assert new.serial != old.serial
        if side == "server":
            # The one-process client keeps its pooled connection (its own certificate did
            # not change): it learns the server's new certificate on a new connection.
            await mesh.client_agent.secrets.rotate(CLIENT_ID)
        second = await socks5_connect(mesh.socks5, mesh.server_ip, APP_PORT)
        assert await echo_roundtrip(second, b"after rotation") == b"after rotation"
        assert new.serial in _peer_serials(observer, uid)

        await first.send_all(b"still alive")
        assert await first.receive_some(100) == b"still alive"
        await first.aclose()
        await second.aclose()
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("count", ["1", "2"])
async def test_drain_refuses_new_connections_at_once_and_ends_open_ones_at_the_deadline(
    count: str,
) -> None:
    """One process or every worker: listeners close at once (a connection queued on a
    listener nobody accepts from would hang for the whole drain), open connections keep
    working until the deadline, then the worker processes exit."""
    env = {**SPREAD, "ZTUNNEL_WORKER_THREADS": count}
    deadline = {"CONNECTION_TERMINATION_DEADLINE": "3s"}
    mesh_cm = loopback_mesh(extra_env=env, server_env=deadline)
    async with mesh_cm as mesh, trio.open_nursery() as nursery:
        await nursery.start(serve_echo, mesh.server_ip, APP_PORT)
        server = mesh.server_agent
        streams = await open_streams(mesh, 8)
        pids: list[int] = []
        if count != "1":
            pids = [int(w["pid"]) for w in workers(server)]  # type: ignore[call-overload]
            await until(lambda: all(w["openConnections"] for w in workers(server)), "both busy")

        draining = trio.Event()

        async def drain() -> None:
            draining.set()
            await server.shutdown()

        nursery.start_soon(drain)
        await draining.wait()
        await trio.sleep(0.3)
        with trio.fail_after(1):  # refused at once, not at the end of the drain
            with pytest.raises(Socks5Refused):
                await socks5_connect(mesh.socks5, mesh.server_ip, APP_PORT)
        for i, stream in enumerate(streams):
            await stream.send_all(b"during drain %d" % i)
            assert await stream.receive_some(100) == b"during drain %d" % i
        assert [await cut(s) for s in streams] == [True] * 8
        await until(lambda: not any(_alive(pid) for pid in pids), "the workers exited")
        for stream in streams:
            await stream.aclose()
        nursery.cancel_scope.cancel()


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for its parent to reap it counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


async def test_a_worker_that_dies_is_restarted_and_reported() -> None:
    async with loopback_mesh(client_env=TWO) as mesh, trio.open_nursery() as nursery:
        await nursery.start(serve_echo, mesh.server_ip, APP_PORT)
        client = mesh.client_agent
        streams = await open_streams(mesh, 12)  # both workers hold open connections
        await until(lambda: all(w["openConnections"] for w in workers(client)), "both busy")
        victim = workers(client)[0]

        os.kill(int(victim["pid"]), signal.SIGKILL)  # type: ignore[call-overload]

        seen: list[str] = []

        def reported() -> bool:
            seen.extend(client.readiness())
            return any("worker 0: restarting" in r and "SIGKILL" in r for r in seen)

        await until(reported, "readiness to report the dead worker", limit=5)
        await until(lambda: workers(client)[0]["state"] == "running", "the restart", limit=30)
        assert workers(client)[0]["pid"] != victim["pid"]
        assert workers(client)[0]["restarts"] == 1
        assert metric(client, "ztunnel_worker_restarts_total", worker="0") == 1
        await until(lambda: client.readiness() == [], "readiness back")
        # Its connections were closed in the books, named as such.
        killed = [
            e for e in client.tracker.history if "worker process exited" in str(e.log.get("error"))
        ]
        assert len(killed) == victim["openConnections"]
        # The restarted worker runs the proxy again: new connections work, also through it.
        streams += await open_streams(mesh, 12)
        await until(lambda: workers(client)[0]["connectionsOpened"] > 0, "traffic in worker 0")
        for stream in streams:
            await stream.aclose()
        nursery.cancel_scope.cancel()
