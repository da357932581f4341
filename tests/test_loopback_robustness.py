"""Bad input from the network never crashes the agent or leaks fds; slow readers bound memory."""

from __future__ import annotations

import os
import socket

import pytest
import trio
from mesh_apps import echo_roundtrip, serve_echo
from raw_hbone import HandshakeRejected, connect_headers, request

from ztunnel.identity.ca import FakeCA
from ztunnel.identity.tls import client_context
from ztunnel.model.identity import Identity
from ztunnel.testing.loopback import APP_PORT, LoopbackMesh, loopback_mesh, socks5_connect

CLIENT = Identity("cluster.local", "default", "client")


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def abuse(mesh: LoopbackMesh) -> None:
    """One round of hostile clients against agent B's 15008 and agent A's SOCKS5 (blocking)."""
    assert isinstance(mesh.ca, FakeCA)
    good = client_context(mesh.ca.workload_certificate(CLIENT))
    inbound = (mesh.server_ip, 15008)
    # plain garbage instead of a TLS ClientHello
    with socket.create_connection(inbound, timeout=5) as s:
        s.sendall(b"GET / HTTP/1.1\r\n\r\n" * 10)
        s.settimeout(5)
        try:
            while s.recv(4096):
                pass
        except OSError:
            pass
    # a certificate from another CA
    other = client_context(FakeCA.ephemeral().workload_certificate(CLIENT))
    with pytest.raises(HandshakeRejected):
        request(inbound, other, connect_headers(f"{mesh.server_ip}:{APP_PORT}"))
    # valid mTLS, then a non-CONNECT request and an oversized header block
    assert request(inbound, good, connect_headers(f"{mesh.server_ip}:8080", "GET"))[0] == 400
    huge = [*connect_headers(f"{mesh.server_ip}:{APP_PORT}"), ("x-big", "a" * 100_000)]
    with pytest.raises(HandshakeRejected):
        request(inbound, good, huge)
    # SOCKS5 garbage: answered with an error and closed
    for junk in (b"\x04\x01\x00\x50", b"\x05\x01\x00\x05\x09\x00\x01"):
        with socket.create_connection(mesh.socks5, timeout=5) as s:
            s.sendall(junk)
            s.settimeout(5)
            try:
                while s.recv(100):
                    pass
            except OSError:
                pass
    # a SOCKS5 client that vanishes mid-handshake
    with socket.create_connection(mesh.socks5, timeout=5) as s:
        s.sendall(b"\x05")


async def test_hostile_clients_leak_no_fds_and_the_agents_keep_serving() -> None:
    with trio.fail_after(90):
        async with loopback_mesh() as mesh, trio.open_nursery() as nursery:
            await nursery.start(serve_echo, mesh.server_ip, APP_PORT)
            await trio.to_thread.run_sync(abuse, mesh)  # warm-up: lazy certificates, caches
            await trio.sleep(0.2)
            before = open_fds()
            for _ in range(10):
                await trio.to_thread.run_sync(abuse, mesh)
            # The agents close what the peers dropped: wait for it (a leak times out here).
            with trio.fail_after(20):
                while open_fds() - before > 2:  # noqa: ASYNC110 (polling the process's fds)
                    await trio.sleep(0.05)
            stream = await socks5_connect(mesh.socks5, mesh.server_ip, APP_PORT)
            assert await echo_roundtrip(stream, b"still fine") == b"still fine"
            await stream.aclose()
            nursery.cancel_scope.cancel()


async def test_a_slow_reader_bounds_what_the_mesh_buffers() -> None:
    """HTTP/2 flow control is released only as bytes reach the app, so a stalled app
    stops the sender instead of filling the agents' memory."""
    accepted: list[trio.SocketStream] = []

    async def never_reads(stream: trio.SocketStream) -> None:
        accepted.append(stream)
        await trio.sleep_forever()

    with trio.fail_after(60):
        async with loopback_mesh() as mesh, trio.open_nursery() as nursery:
            listeners = await trio.open_tcp_listeners(APP_PORT, host=mesh.server_ip)
            nursery.start_soon(trio.serve_listeners, never_reads, listeners)
            stream = await socks5_connect(mesh.socks5, mesh.server_ip, APP_PORT)
            sent = 0
            chunk = b"z" * (1 << 20)
            with trio.move_on_after(3):
                while sent < 512 << 20:
                    await stream.send_all(chunk)
                    sent += len(chunk)
            # Only kernel socket buffers on each hop plus one 4 MiB stream window can hold
            # data; without backpressure all 512 MiB would have been accepted.
            assert sent < 96 << 20
            inbound = mesh.server_agent.tracker.open_connections()
            assert inbound and inbound[0].bytes_received < 48 << 20
            await trio.aclose_forcefully(stream)
            nursery.cancel_scope.cancel()


async def test_peers_that_vanish_leave_no_open_connections_behind() -> None:
    """Every tracked connection is closed (metrics, config dump) however the peer leaves."""
    with trio.fail_after(60):
        async with loopback_mesh() as mesh, trio.open_nursery() as nursery:
            await nursery.start(serve_echo, mesh.server_ip, APP_PORT)
            assert isinstance(mesh.ca, FakeCA)
            good = client_context(mesh.ca.workload_certificate(CLIENT))
            hdrs = connect_headers(f"{mesh.server_ip}:{APP_PORT}")

            def vanish() -> None:
                # 200 and the first echoed bytes arrive, then the TLS connection just drops.
                status, body = request((mesh.server_ip, 15008), good, hdrs, body=b"bye")
                assert (status, body) == (200, b"bye")

            for _ in range(10):
                await trio.to_thread.run_sync(vanish)
            tracker = mesh.server_agent.tracker
            with trio.fail_after(10):
                while tracker.open_connections():  # noqa: ASYNC110 - polling test state
                    await trio.sleep(0.05)
            gauge = mesh.server_agent.metrics.sockets_open.labels("destination")
            assert gauge._value.get() == 0
            nursery.cancel_scope.cancel()
