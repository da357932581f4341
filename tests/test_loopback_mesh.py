"""Two dedicated-mode agents on loopback carrying real connections as HBONE.

Traffic enters agent A through SOCKS5, crosses to agent B as HTTP/2 CONNECT over
mutual TLS, and reaches an echo app next to B. No part of the data path is mocked.
"""

from __future__ import annotations

import pytest
import trio
from mesh_apps import echo_roundtrip, payload, serve_echo, sha

from ztunnel.testing.loopback import (
    APP_PORT,
    LoopbackMesh,
    loopback_mesh,
    random_base,
    socks5_connect,
)

SIZES = [1, 1000, 64 * 1024 + 7, 4 * 1024 * 1024 + 3, 100 * 1024 * 1024]


async def start_mesh_with_echo(nursery: trio.Nursery, mesh: LoopbackMesh) -> None:
    await nursery.start(serve_echo, mesh.server_ip, APP_PORT)


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s}B")
async def test_payload_carried_end_to_end_unchanged(size: int) -> None:
    data = payload(size)
    with trio.fail_after(120):
        async with loopback_mesh() as mesh, trio.open_nursery() as nursery:
            await start_mesh_with_echo(nursery, mesh)
            stream = await socks5_connect(mesh.socks5, mesh.server_ip, APP_PORT)
            echoed = await echo_roundtrip(stream, data)
            await stream.aclose()
            assert len(echoed) == size
            assert sha(echoed) == sha(data)
            nursery.cancel_scope.cancel()


async def test_service_vip_is_load_balanced_to_the_endpoint_over_hbone() -> None:
    with trio.fail_after(30):
        async with loopback_mesh() as mesh, trio.open_nursery() as nursery:
            await start_mesh_with_echo(nursery, mesh)
            stream = await socks5_connect(mesh.socks5, mesh.vip, 80)
            assert await echo_roundtrip(stream, b"via the VIP") == b"via the VIP"
            await stream.aclose()
            stream = await socks5_connect(mesh.socks5, "echo.default.svc.cluster.local", 80)
            assert await echo_roundtrip(stream, b"by hostname") == b"by hostname"
            await stream.aclose()
            # The server agent saw mTLS connections from the client's SPIFFE identity.
            opened = mesh.server_agent.metrics.connections_opened
            samples = [s for m in opened.collect() for s in m.samples if s.name.endswith("_total")]
            principals = {s.labels["source_principal"] for s in samples}
            assert principals == {"spiffe://cluster.local/ns/default/sa/client"}
            assert {s.labels["connection_security_policy"] for s in samples} == {"mutual_tls"}
            # The tunnel leaves from the client workload's IP, so B attributes the source.
            assert {s.labels["source_workload"] for s in samples} == {"client"}
            assert {s.labels["destination_service"] for s in samples} == {
                "echo.default.svc.cluster.local"
            }
            nursery.cancel_scope.cancel()


async def test_200_concurrent_connections_share_pooled_hbone_connections() -> None:
    with trio.fail_after(60):
        async with loopback_mesh() as mesh, trio.open_nursery() as nursery:
            await start_mesh_with_echo(nursery, mesh)
            streams: list[trio.SocketStream] = []

            async def open_one() -> None:
                streams.append(await socks5_connect(mesh.socks5, mesh.server_ip, APP_PORT))

            async with trio.open_nursery() as openers:
                for _ in range(200):
                    openers.start_soon(open_one)
            pool = next(iter(mesh.client_agent.proxies.values())).pool
            # 100 streams per connection (POOL_MAX_STREAMS_PER_CONNECTION), and a
            # connection is not handed out once it is one stream from its limit.
            assert 2 <= pool.connection_count() <= 3

            async def roundtrip(i: int, stream: trio.SocketStream) -> None:
                msg = f"conn {i}".encode()
                assert await echo_roundtrip(stream, msg) == msg
                await stream.aclose()

            async with trio.open_nursery() as users:
                for i, stream in enumerate(streams):
                    users.start_soon(roundtrip, i, stream)
            nursery.cancel_scope.cancel()


async def test_half_close_from_client_then_server_keeps_sending() -> None:
    """Client FIN reaches the app; the app can still send before its own FIN."""

    async def late_reply(stream: trio.SocketStream) -> None:
        got = b""
        while data := await stream.receive_some(1024):
            got += data
        # EOF seen: the client half-closed; now answer and close.
        await stream.send_all(b"after your FIN: " + got)
        await stream.send_eof()
        await stream.aclose()

    with trio.fail_after(30):
        async with loopback_mesh() as mesh, trio.open_nursery() as nursery:
            listeners = await trio.open_tcp_listeners(APP_PORT, host=mesh.server_ip)
            nursery.start_soon(trio.serve_listeners, late_reply, listeners)
            stream = await socks5_connect(mesh.socks5, mesh.server_ip, APP_PORT)
            await stream.send_all(b"hello")
            await stream.send_eof()
            reply = b""
            while data := await stream.receive_some(1024):
                reply += data
            assert reply == b"after your FIN: hello"
            await stream.aclose()
            nursery.cancel_scope.cancel()


async def test_half_close_from_server_first() -> None:
    """The app closes its side first; the client still delivers data afterwards."""
    received = trio.Event()
    got: list[bytes] = []

    async def closes_first(stream: trio.SocketStream) -> None:
        await stream.send_all(b"bye")
        await stream.send_eof()
        data = b""
        while chunk := await stream.receive_some(1024):
            data += chunk
        got.append(data)
        received.set()
        await stream.aclose()

    with trio.fail_after(30):
        async with loopback_mesh() as mesh, trio.open_nursery() as nursery:
            listeners = await trio.open_tcp_listeners(APP_PORT, host=mesh.server_ip)
            nursery.start_soon(trio.serve_listeners, closes_first, listeners)
            stream = await socks5_connect(mesh.socks5, mesh.server_ip, APP_PORT)
            first = b""
            while chunk := await stream.receive_some(1024):
                first += chunk
            assert first == b"bye"  # EOF arrived while our side is still open
            await stream.send_all(b"still talking")
            await stream.send_eof()
            await received.wait()
            assert got == [b"still talking"]
            await stream.aclose()
            nursery.cancel_scope.cancel()


async def test_certificate_rotation_keeps_open_connections_and_new_ones_use_the_new_cert() -> None:
    from ztunnel.model.identity import Identity

    client_id = Identity("cluster.local", "default", "client")
    server_id = Identity("cluster.local", "default", "server")

    def serials(mesh: LoopbackMesh) -> tuple[int, int]:
        client = mesh.client_agent.secrets.get(client_id)
        server = mesh.server_agent.secrets.get(server_id)
        assert client is not None and server is not None
        return client.serial, server.serial

    def peer_serials(mesh: LoopbackMesh) -> set[int]:
        """Serials of the client certificates the server agent's open TLS sessions present."""
        from cryptography import x509

        out = set()
        for conn in mesh.server_agent.proxies["default/server"].server_connections:
            der = conn.tls.peer_certificate_der()
            out.add(x509.load_der_x509_certificate(der).serial_number)
        return out

    with trio.fail_after(30):
        async with loopback_mesh() as mesh, trio.open_nursery() as nursery:
            await start_mesh_with_echo(nursery, mesh)
            first = await socks5_connect(mesh.socks5, mesh.server_ip, APP_PORT)
            await first.send_all(b"before")
            assert await first.receive_some(100) == b"before"
            old_client, old_server = serials(mesh)
            assert peer_serials(mesh) == {old_client}

            await mesh.client_agent.secrets.rotate(client_id)
            await mesh.server_agent.secrets.rotate(server_id)
            new_client, new_server = serials(mesh)
            assert new_client != old_client and new_server != old_server

            second = await socks5_connect(mesh.socks5, mesh.server_ip, APP_PORT)
            assert await echo_roundtrip(second, b"after rotation") == b"after rotation"
            # The new connection was a new TLS session with the new client certificate.
            assert new_client in peer_serials(mesh)

            # The connection opened before the rotation still works.
            await first.send_all(b"still alive")
            assert await first.receive_some(100) == b"still alive"
            assert await echo_roundtrip(first, b"") == b""
            await first.aclose()
            await second.aclose()
            nursery.cancel_scope.cancel()


async def test_unknown_destination_passes_through_as_plain_tcp() -> None:
    with trio.fail_after(30):
        async with loopback_mesh() as mesh, trio.open_nursery() as nursery:
            unknown = f"{mesh.base}.50"  # no workload or service has this address
            await nursery.start(serve_echo, unknown, APP_PORT)
            stream = await socks5_connect(mesh.socks5, unknown, APP_PORT, local_ip=mesh.client_ip)
            assert await echo_roundtrip(stream, b"passthrough") == b"passthrough"
            await stream.aclose()
            proxy = next(iter(mesh.client_agent.proxies.values()))
            assert proxy.pool.connection_count() == 0  # no HBONE involved
            nursery.cancel_scope.cancel()


async def test_known_non_mesh_workload_gets_plain_tcp() -> None:
    from ztunnel.testing.loopback import mesh_yaml

    with trio.fail_after(30):
        base = random_base()
        async with (
            loopback_mesh(base=base, yaml_text=mesh_yaml(base, server_protocol="TCP")) as mesh,
            trio.open_nursery() as nursery,
        ):
            await start_mesh_with_echo(nursery, mesh)
            stream = await socks5_connect(mesh.socks5, mesh.vip, 80, local_ip=mesh.client_ip)
            assert await echo_roundtrip(stream, b"plain") == b"plain"
            await stream.aclose()
            proxy = next(iter(mesh.client_agent.proxies.values()))
            assert proxy.pool.connection_count() == 0
            assert not mesh.server_agent.tracker.open_connections()
            nursery.cancel_scope.cancel()


@pytest.mark.parametrize("port", [15001, 15006, 15008, 15080, 15000])
@pytest.mark.parametrize("host", ["client", "::ffff:127.0.0.1"])
async def test_self_calls_to_agent_ports_on_loopback_are_refused(port: int, host: str) -> None:
    from ztunnel.testing.loopback import Socks5Refused

    with trio.fail_after(30):
        async with loopback_mesh() as mesh:
            target = mesh.client_ip if host == "client" else host
            with pytest.raises(Socks5Refused) as refused:
                await socks5_connect(mesh.socks5, target, port)
            assert refused.value.reply == 2  # "not allowed by ruleset", never dialled
            # ...and the agent still serves a normal connection.
            async with trio.open_nursery() as nursery:
                await start_mesh_with_echo(nursery, mesh)
                stream = await socks5_connect(mesh.socks5, mesh.server_ip, APP_PORT)
                assert await echo_roundtrip(stream, b"ok") == b"ok"
                await stream.aclose()
                nursery.cancel_scope.cancel()
