"""Drain and abort semantics through two real in-process agents (loopback mesh).

What the issue found: during a drain the listening sockets stayed open (new connections
queued, then reset seconds later), a stream cut at the deadline ended with a clean FIN
although bytes were lost, and an aborted connection was logged as the agent's error.
Here, with real sockets end to end (app ↔ agent A ↔ HBONE ↔ agent B ↔ app):

- draining closes the listeners at once (a new connection is refused, not queued), sends
  GOAWAY (a new stream is not put on the draining HBONE connection), lets open
  connections finish, and ends as soon as they did;
- what is still open at the deadline is *aborted* on both ends (TCP RST to both apps,
  never a FIN) and logged as cut by the agent's drain;
- an abort by either app travels to the other as an abort, and each access log says
  which side ended the connection, with the bytes that were really carried.
"""

from __future__ import annotations

import datetime
import errno
import socket
import struct
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trio
import trio.testing
from proxy_fakes import Bench

from ztunnel.agent import Agent
from ztunnel.hbone.connection import HboneClientConnection
from ztunnel.hbone.errors import StreamRefusedError
from ztunnel.hbone.tlsstream import tls_handshake
from ztunnel.identity.certificate import WorkloadCertificate, new_csr
from ztunnel.identity.tls import client_context
from ztunnel.model.address import SocketAddr
from ztunnel.model.identity import Identity
from ztunnel.model.workload import HBONE_PORT
from ztunnel.proxy.outbound import proxy_outbound
from ztunnel.proxy.workload_proxy import WorkloadProxy
from ztunnel.testing.loopback import (
    APP_PORT,
    LoopbackMesh,
    Socks5Refused,
    loopback_mesh,
    random_base,
    socks5_connect,
)
from ztunnel.testing.netns_agent import AgentProc, dedicated_env

RST = "rst"
FIN = "fin"
FAKE_APP = SocketAddr.parse("10.0.0.1:40000")


def ended_by_reset(exc: BaseException) -> bool:
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ConnectionResetError):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


async def how_it_ends(stream: trio.abc.ReceiveStream) -> str:
    """Read until the end: "fin" (EOF) or "rst" (connection reset)."""
    try:
        while await stream.receive_some(65536):
            pass
    except trio.BrokenResourceError as exc:
        assert ended_by_reset(exc), f"ended by something else than a reset: {exc!r}"
        return RST
    return FIN


def reset_close(stream: trio.SocketStream) -> None:
    """Abort: close with RST (SO_LINGER 0)."""
    stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    stream.socket.close()


@dataclass
class App:
    """Echo app next to agent B that records how each connection ended."""

    ends: list[str] = field(default_factory=list)
    streams: list[trio.SocketStream] = field(default_factory=list)
    ended: trio.Event = field(default_factory=trio.Event)

    async def serve(
        self, host: str, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        listeners = await trio.open_tcp_listeners(APP_PORT, host=host)
        task_status.started()
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, stream: trio.SocketStream) -> None:
        self.streams.append(stream)
        try:
            while data := await stream.receive_some(65536):
                await stream.send_all(data)
            self.ends.append(FIN)
        except trio.BrokenResourceError as exc:
            self.ends.append(RST if ended_by_reset(exc) else repr(exc))
        except trio.ClosedResourceError:
            self.ends.append("closed by the test")
        finally:
            self.ended.set()
            await trio.aclose_forcefully(stream)


@asynccontextmanager
async def mesh_with_app(deadline: str = "1s") -> AsyncIterator[tuple[LoopbackMesh, App]]:
    env = {"CONNECTION_TERMINATION_DEADLINE": deadline}
    async with loopback_mesh(extra_env=env) as mesh, trio.open_nursery() as nursery:
        app = App()
        await nursery.start(app.serve, mesh.server_ip)
        yield mesh, app
        nursery.cancel_scope.cancel()


async def echo(stream: trio.abc.Stream, data: bytes) -> None:
    await stream.send_all(data)
    got = b""
    while len(got) < len(data):
        chunk = await stream.receive_some(65536)
        assert chunk, "EOF before the echo"
        got += chunk
    assert got == data


def the_proxy(agent: Agent) -> WorkloadProxy:
    [proxy] = agent.proxies.values()
    return proxy


def last_error(agent: Agent) -> str:
    entries = [e for e in agent.tracker.history if e.log.get("message") == "connection complete"]
    assert entries, "no connection was logged"
    return str(entries[-1].log.get("error"))


def last_complete(agent: Agent) -> dict[str, object]:
    entries = [e for e in agent.tracker.history if e.log.get("message") == "connection complete"]
    assert entries, "no connection was logged"
    return dict(entries[-1].log)


async def wait_logged(agent: Agent) -> None:
    """Until the agent logged a "connection complete" (the other agent may log later)."""
    while True:
        if any(e.log.get("message") == "connection complete" for e in agent.tracker.history):
            return
        await trio.sleep(0.01)


def refused(host: str, port: int) -> bool:
    """A plain TCP connect: True if refused at once (RST to the SYN), False if accepted."""
    with socket.socket() as sock:
        sock.settimeout(2)
        try:
            sock.connect((host, port))
        except ConnectionRefusedError:
            return True
        return False


async def test_drain_refuses_new_connections_at_once_and_lets_open_ones_finish() -> None:
    with trio.fail_after(30):
        async with mesh_with_app(deadline="10s") as (mesh, app):
            server = mesh.server_agent
            proxy = the_proxy(server)
            stream = await socks5_connect(mesh.socks5, mesh.server_ip, APP_PORT)
            await echo(stream, b"before the drain")
            done = trio.Event()

            async def drain() -> None:
                await server.shutdown()
                done.set()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(drain)
                await trio.testing.wait_all_tasks_blocked()
                assert proxy.draining
                # The listeners are closed: every new connection is refused by the kernel
                # at once (not accepted into a queue nobody reads).
                for name in ("inbound", "inbound_plaintext", "outbound"):
                    host, port = proxy.bound[name]
                    assert await trio.to_thread.run_sync(refused, host, port), name
                # GOAWAY: agent A does not put a new stream on the draining connection
                # (where B would still serve it); it dials anew and is refused.
                with pytest.raises(Socks5Refused) as info:
                    await socks5_connect(mesh.socks5, mesh.server_ip, APP_PORT)
                assert info.value.reply == 5  # connection refused
                # The open connection keeps working during the drain ...
                await echo(stream, b"during the drain")
                await stream.send_eof()
                assert await how_it_ends(stream) == FIN
                # ... and once it finished the drain ends, long before the 10 s deadline.
                with trio.fail_after(5):
                    await done.wait()
            assert app.ends == [FIN]
            assert last_error(server) == "None"
            assert proxy.active_connections == 0
            await stream.aclose()


@pytest.mark.parametrize("drained", ["server", "client"])
async def test_a_connection_cut_at_the_deadline_is_reset_on_both_ends(drained: str) -> None:
    with trio.fail_after(30):
        async with mesh_with_app(deadline="1s") as (mesh, app):
            agent = mesh.server_agent if drained == "server" else mesh.client_agent
            other = mesh.client_agent if drained == "server" else mesh.server_agent
            stream = await socks5_connect(mesh.socks5, mesh.server_ip, APP_PORT)
            await echo(stream, b"x" * 1000)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(agent.shutdown)
                # Neither app closes: at the deadline both see a reset, never a FIN that
                # would pass for the end of the data.
                assert await how_it_ends(stream) == RST
                await app.ended.wait()
            assert app.ends == [RST]
            await wait_logged(other)
            assert last_error(agent) == "connection closed by the agent: drain deadline reached"
            peer_side = "upstream" if drained == "server" else "client"
            assert last_error(other).startswith(f"connection aborted by the {peer_side}")
            await stream.aclose()


async def test_client_abort_is_logged_as_the_clients_with_the_bytes_carried() -> None:
    with trio.fail_after(30):
        async with mesh_with_app() as (mesh, app):
            stream = await socks5_connect(mesh.socks5, mesh.server_ip, APP_PORT)
            await echo(stream, b"0123456789")
            reset_close(stream)
            with trio.fail_after(10):
                await app.ended.wait()
            # The abort reached the app as an abort.
            assert app.ends == [RST]
            await wait_logged(mesh.client_agent)
            await wait_logged(mesh.server_agent)
            for agent in (mesh.client_agent, mesh.server_agent):
                record = last_complete(agent)
                assert str(record["error"]).startswith("connection aborted by the client: ")
                assert (record["bytes_sent"], record["bytes_recv"]) == (10, 10)
            assert "connection reset by peer" in last_error(mesh.client_agent)


async def test_streams_a_hbone_client_resets_and_leaves_are_the_clients_not_the_agents() -> None:
    """A peer that resets its streams (RST_STREAM CANCEL) and closes its HBONE connection
    while the server agent still relays (bench/flood.py burst does this 5,000 times):
    the access log must say the client ended them, never "closed by the agent"."""
    with trio.fail_after(30):
        async with mesh_with_app() as (mesh, _app):
            identity = Identity("cluster.local", "default", "burst-client")
            key, csr = new_csr(identity)
            chain = await mesh.ca.create_certificate(csr, datetime.timedelta(hours=1))
            ctx = client_context(WorkloadCertificate.from_chain(identity, key, chain))
            sock = socket.socket()
            sock.setblocking(False)
            await trio.socket.from_stdlib_socket(sock).connect((mesh.server_ip, HBONE_PORT))
            tls = await tls_handshake(sock, ctx, server_side=False, timeout=10)
            client = HboneClientConnection(tls)
            async with trio.open_nursery() as nursery:
                await nursery.start(client.run)
                streams = [
                    await client.open_stream(f"{mesh.server_ip}:{APP_PORT}") for _ in range(5)
                ]
                for stream in streams:
                    await echo(stream, b"x" * 1024)
                for stream in streams:
                    stream.close()  # RST_STREAM(CANCEL), as aclose
                client.close()
            await wait_logged(mesh.server_agent)
            with trio.fail_after(10):
                while True:
                    errors = [
                        str(e.log.get("error"))
                        for e in mesh.server_agent.tracker.history
                        if e.log.get("message") == "connection complete"
                    ]
                    if len(errors) == 5:
                        break
                    await trio.sleep(0.01)
            aborted = "connection aborted by the client: HBONE stream reset by peer (code 8)"
            assert errors == [aborted] * 5


async def test_upstream_abort_is_logged_as_the_upstreams_and_reaches_the_client() -> None:
    with trio.fail_after(30):
        async with mesh_with_app() as (mesh, app):
            stream = await socks5_connect(mesh.socks5, mesh.server_ip, APP_PORT)
            await echo(stream, b"abcdef")
            [app_end] = app.streams
            reset_close(app_end)
            assert await how_it_ends(stream) == RST
            await wait_logged(mesh.client_agent)
            await wait_logged(mesh.server_agent)
            for agent in (mesh.client_agent, mesh.server_agent):
                record = last_complete(agent)
                assert str(record["error"]).startswith("connection aborted by the upstream: ")
                assert (record["bytes_sent"], record["bytes_recv"]) == (6, 6)
            await stream.aclose()


async def test_a_clean_half_close_is_still_a_clean_end() -> None:
    """The abort rules change nothing for connections that end normally."""
    with trio.fail_after(30):
        async with mesh_with_app() as (mesh, app):
            stream = await socks5_connect(mesh.socks5, mesh.server_ip, APP_PORT)
            await echo(stream, b"done")
            await stream.send_eof()
            assert await how_it_ends(stream) == FIN
            await app.ended.wait()
            assert app.ends == [FIN]
            await wait_logged(mesh.client_agent)
            await wait_logged(mesh.server_agent)
            assert last_error(mesh.client_agent) == last_error(mesh.server_agent) == "None"
            await stream.aclose()


def test_errno_of_a_refused_connect_is_econnrefused() -> None:
    # Guard for ``refused``: ConnectionRefusedError is exactly ECONNREFUSED (an RST to
    # the SYN), not a timeout or an unreachable network.
    assert ConnectionRefusedError(errno.ECONNREFUSED, "x").errno == errno.ECONNREFUSED


# --- a CONNECT refused by the peer's GOAWAY is retried once on another connection ----------


def refused_then(accepting: int) -> tuple[list[int], object]:
    calls: list[int] = []

    def make(peers: list[trio.abc.HalfCloseableStream]) -> object:
        async def behave() -> trio.abc.HalfCloseableStream:
            calls.append(1)
            if len(calls) <= accepting:
                raise StreamRefusedError("stream refused by the peer (REFUSED_STREAM or GOAWAY)")
            mine, theirs = trio.testing.memory_stream_pair()
            peers.append(theirs)
            return mine

        return behave

    return calls, make


async def test_a_connect_refused_by_goaway_is_retried_once(autojump_clock: object) -> None:
    bench = Bench()
    calls, behaviour = refused_then(accepting=1)
    bench.pool.behaviour = behaviour  # type: ignore[assignment]
    app, downstream = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(
            proxy_outbound, bench.deps, downstream, FAKE_APP, SocketAddr.parse("10.0.0.2:8080")
        )
        await trio.testing.wait_all_tasks_blocked()
        assert len(calls) == 2  # refused (never processed), then carried on a new stream
        [remote] = bench.pool.peers
        await app.send_all(b"hi")
        assert await remote.receive_some(10) == b"hi"
        await app.aclose()
        await remote.aclose()
    assert bench.log.one("connection complete").level == "info"


async def test_a_second_refusal_is_a_connect_failure_not_a_retry_loop(
    autojump_clock: object,
) -> None:
    bench = Bench()
    calls, behaviour = refused_then(accepting=5)
    bench.pool.behaviour = behaviour  # type: ignore[assignment]
    _app, downstream = trio.testing.memory_stream_pair()
    with trio.fail_after(60):
        await proxy_outbound(bench.deps, downstream, FAKE_APP, SocketAddr.parse("10.0.0.2:8080"))
    assert len(calls) == 2
    error = str(bench.log.one("connection complete").fields["error"])
    assert error.startswith("connect to upstream failed: stream refused")


# --- POST /quitquitquit: drains, then the process exits ------------------------------------


def test_quitquitquit_drains_and_the_process_exits(tmp_path: Path) -> None:
    """The issue: after /quitquitquit the agent drained and never exited (the signal
    watcher kept the root nursery open)."""
    ip = f"{random_base()}.1"
    env = dedicated_env({"LOG_FORMAT": "json", "CONNECTION_TERMINATION_DEADLINE": "1s"})
    for name in ("OUTBOUND", "INBOUND", "INBOUND_PLAINTEXT", "ADMIN", "STATS", "READINESS"):
        env[f"ZTUNNEL_{name}_ADDR"] = f"{ip}:0"
    env["PACKET_MARK"] = "0"
    log_path = tmp_path / "agent.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "ztunnel.cli", "run"],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    agent = AgentProc(proc, log_path)
    try:
        host, port = agent.wait_logged("agent ready")["admin"].rsplit(":", 1)
        request = b"POST /quitquitquit HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\n\r\n"
        with socket.create_connection((host, int(port)), timeout=5) as sock:
            sock.sendall(request)
            assert sock.recv(1024).startswith(b"HTTP/1.1 200")
        assert proc.wait(timeout=20) == 0
        agent.wait_logged("draining")
    finally:
        agent.stop()
