"""What agent B's HBONE listener does with bad input, and that it keeps serving after.

Each case probes B's 15008 directly with an independent client (tests/raw_hbone.py)
and then checks that a good client is still served.
"""

from __future__ import annotations

import datetime
import ssl

import pytest
import trio
from mesh_apps import serve_echo
from raw_hbone import HandshakeRejected, connect_headers, request

from ztunnel.identity.ca import FakeCA
from ztunnel.identity.errors import TLSIdentityError
from ztunnel.identity.tls import client_context
from ztunnel.model.identity import Identity
from ztunnel.testing.loopback import APP_PORT, LoopbackMesh, loopback_mesh

CLIENT = Identity("cluster.local", "default", "client")


def good_context(mesh: LoopbackMesh, identity: Identity = CLIENT) -> ssl.SSLContext:
    assert isinstance(mesh.ca, FakeCA)
    return client_context(mesh.ca.workload_certificate(identity))


async def probe(
    mesh: LoopbackMesh, ctx: ssl.SSLContext, headers: list[tuple[str, str]]
) -> tuple[int, bytes]:
    addr = (mesh.server_ip, 15008)
    return await trio.to_thread.run_sync(lambda: request(addr, ctx, headers, body=b"ping"))


async def assert_still_serving(mesh: LoopbackMesh) -> None:
    status, body = await probe(
        mesh, good_context(mesh), connect_headers(f"{mesh.server_ip}:{APP_PORT}")
    )
    assert status == 200
    assert body == b"ping"


async def run_case(check: object) -> None:
    with trio.fail_after(30):
        async with loopback_mesh() as mesh, trio.open_nursery() as nursery:
            await nursery.start(serve_echo, mesh.server_ip, APP_PORT)
            await check(mesh)  # type: ignore[operator]
            await assert_still_serving(mesh)
            nursery.cancel_scope.cancel()


async def test_valid_client_gets_200_and_its_bytes_through() -> None:
    async def check(mesh: LoopbackMesh) -> None:
        await assert_still_serving(mesh)

    await run_case(check)


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        (connect_headers("{ip}:8080", method="GET"), 400),
        (connect_headers("{ip}:8080", method="POST"), 400),
        (connect_headers("not an authority"), 400),
        (connect_headers("{ip}:99999"), 400),
        (connect_headers("127.9.9.9:8080"), 400),  # authority IP is not this pod (IPMismatch)
        (connect_headers("{ip}:15008"), 503),  # self call
        (connect_headers("{ip}:15080"), 503),  # self call to the SOCKS5 listener
        (connect_headers("{ip}:1"), 503),  # nothing listens there
    ],
    ids=[
        "GET",
        "POST",
        "garbage-authority",
        "bad-port",
        "ip-mismatch",
        "self-call",
        "socks5-self-call",
        "closed-port",
    ],
)
async def test_bad_requests_get_the_documented_status(
    headers: list[tuple[str, str]], status: int
) -> None:
    async def check(mesh: LoopbackMesh) -> None:
        hdrs = [(k, v.replace("{ip}", mesh.server_ip)) for k, v in headers]
        got, _ = await probe(mesh, good_context(mesh), hdrs)
        assert got == status

    await run_case(check)


async def test_wrong_trust_domain_is_refused() -> None:
    async def check(mesh: LoopbackMesh) -> None:
        ctx = good_context(mesh, Identity("evil.example", "default", "client"))
        with pytest.raises(HandshakeRejected):
            await probe(mesh, ctx, connect_headers(f"{mesh.server_ip}:{APP_PORT}"))

    await run_case(check)


async def test_certificate_from_another_ca_is_refused() -> None:
    async def check(mesh: LoopbackMesh) -> None:
        ctx = client_context(FakeCA.ephemeral().workload_certificate(CLIENT))
        with pytest.raises(HandshakeRejected):
            await probe(mesh, ctx, connect_headers(f"{mesh.server_ip}:{APP_PORT}"))

    await run_case(check)


async def test_expired_client_certificate_is_refused() -> None:
    async def check(mesh: LoopbackMesh) -> None:
        assert isinstance(mesh.ca, FakeCA)
        past = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=2)
        cert = mesh.ca.workload_certificate(
            CLIENT, not_before=past, not_after=past + datetime.timedelta(hours=1)
        )
        with pytest.raises(HandshakeRejected):
            await probe(mesh, client_context(cert), connect_headers(f"{mesh.server_ip}:{APP_PORT}"))

    await run_case(check)


async def test_client_without_certificate_is_refused() -> None:
    async def check(mesh: LoopbackMesh) -> None:
        assert isinstance(mesh.ca, FakeCA)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.load_verify_locations(cadata=mesh.ca.roots_pem.decode())
        ctx.set_alpn_protocols(["h2"])
        with pytest.raises(HandshakeRejected):
            await probe(mesh, ctx, connect_headers(f"{mesh.server_ip}:{APP_PORT}"))

    await run_case(check)


async def test_tls12_client_is_refused() -> None:
    async def check(mesh: LoopbackMesh) -> None:
        assert isinstance(mesh.ca, FakeCA)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_verify_locations(cadata=mesh.ca.roots_pem.decode())
        ctx.set_alpn_protocols(["h2"])
        with pytest.raises(HandshakeRejected):
            await probe(mesh, ctx, connect_headers(f"{mesh.server_ip}:{APP_PORT}"))

    await run_case(check)


async def test_server_with_unexpected_identity_is_refused_by_the_client() -> None:
    """The outbound side checks the server SAN against the expected identities."""

    async def check(mesh: LoopbackMesh) -> None:
        from ztunnel.hbone.pool import PoolKey
        from ztunnel.model.address import SocketAddr, canonical_ip

        proxy = next(iter(mesh.client_agent.proxies.values()))
        key = PoolKey(
            src_identity=CLIENT,
            dst_identities=frozenset({Identity("cluster.local", "default", "not-the-server")}),
            dst=SocketAddr.of(mesh.server_ip, 15008),
            src_ip=canonical_ip(mesh.client_ip),
        )
        with pytest.raises(TLSIdentityError):
            await proxy._dial(key)

    await run_case(check)


async def test_garbage_bytes_after_tls_do_not_hurt_the_agent() -> None:
    async def check(mesh: LoopbackMesh) -> None:
        ctx = good_context(mesh)

        def send_garbage() -> None:
            import socket

            raw = socket.create_connection((mesh.server_ip, 15008), timeout=5)
            tls = ctx.wrap_socket(raw, server_hostname=None)
            tls.sendall(b"this is not HTTP/2 at all" * 100)
            try:
                while tls.recv(65536):
                    pass
            except (ssl.SSLError, OSError):
                pass
            tls.close()

        await trio.to_thread.run_sync(send_garbage)

    await run_case(check)
