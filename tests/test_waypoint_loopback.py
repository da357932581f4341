"""The waypoint over real sockets and TLS: client --HBONE--> waypoint --HBONE--> test pods.

Each "pod" is a test HBONE server on its own loopback IP (127.x.y.z, random per
test so parallel runs never collide) presenting its workload's certificate,
with a fake app behind it. The client dials the waypoint with its own SVID and
opens CONNECT streams to Service VIPs, as a node agent does for a
waypoint-bound Service.
"""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import pytest
import trio
from hbone_certs import cert
from waypoint_testlib import (
    CANARY,
    ECHO,
    ECHO_VIP,
    GRPC_HEADERS,
    GRPC_VIP,
    SLEEP,
    WAYPOINT,
    Apps,
    H1Client,
    H2Client,
    Mesh,
    bind_same_port,
    free_loopback_net,
    grpc_frame,
    make_waypoint,
)

from ztunnel.hbone.connection import HboneClientConnection, HboneServerStream, serve_hbone
from ztunnel.hbone.engine import ConnectRequest
from ztunnel.hbone.errors import HboneStatusError
from ztunnel.hbone.tlsstream import tls_handshake
from ztunnel.identity.tls import client_context, peer_identity, server_context
from ztunnel.model.identity import Identity
from ztunnel.waypoint.server import Waypoint
from ztunnel.waypoint.telemetry import RequestRecord

pytestmark = pytest.mark.slow


@dataclass
class Pods:
    """What the test HBONE servers saw."""

    callers: list[Identity] = field(default_factory=list)
    authorities: list[str] = field(default_factory=list)


async def serve_pod(
    listener: socket.socket, name: str, identity: Identity, apps: Apps, pods: Pods
) -> None:
    """An HBONE server on one pod IP: mTLS, CONNECT to this pod's ip:port, the app behind."""

    async def one(sock: socket.socket) -> None:
        tls = await tls_handshake(sock, server_context(cert(identity)), server_side=True)
        pods.callers.append(peer_identity(tls.peer_certificate_der() or b""))

        async def handler(request: ConnectRequest, stream: HboneServerStream) -> None:
            pods.authorities.append(request.authority)
            if not request.authority.startswith(listener.getsockname()[0] + ":"):
                await stream.respond(400)
                return
            await stream.respond(200)
            await apps.serve(stream, name)

        async with trio.open_nursery() as nursery:
            await nursery.start(serve_hbone, tls, handler)

    with listener:
        async with trio.open_nursery() as nursery:
            while True:
                await trio.lowlevel.wait_readable(listener)
                sock, _ = listener.accept()
                nursery.start_soon(one, sock)


async def dial(addr: tuple[str, int], source_ip: str) -> socket.socket:
    sock = socket.socket()
    sock.bind((source_ip, 0))
    sock.setblocking(False)
    err = sock.connect_ex(addr)
    if err not in (0, errno.EINPROGRESS):
        sock.close()
        raise OSError(err, os.strerror(err))
    await trio.lowlevel.wait_writable(sock)
    return sock


@dataclass
class Loop:
    mesh: Mesh
    wp: Waypoint
    addr: tuple[str, int]
    records: list[RequestRecord]
    apps: Apps
    pods: Pods
    nursery: trio.Nursery

    async def hbone(self, identity: Identity = SLEEP) -> HboneClientConnection:
        sock = await dial(self.addr, self.mesh.client)
        tls = await tls_handshake(sock, client_context(cert(identity)), server_side=False)
        conn = HboneClientConnection(tls)
        await self.nursery.start(conn.run)
        return conn

    async def stream(self, vip: str = ECHO_VIP, port: int = 80) -> trio.abc.Stream:
        conn = await self.hbone()
        return await conn.open_stream(f"{vip}:{port}")


@asynccontextmanager
async def loopback(
    config: str = "", *, canary_identity: Identity = CANARY, **kw: object
) -> AsyncIterator[Loop]:
    net = free_loopback_net()
    mesh = Mesh(f"{net}.11", f"{net}.12", f"{net}.21", f"{net}.31", f"{net}.5")
    ips = [mesh.echo1, mesh.echo2, mesh.canary, mesh.grpc]
    port, socks = bind_same_port(ips)
    identities = {mesh.echo1: ECHO, mesh.echo2: ECHO, mesh.canary: canary_identity, mesh.grpc: ECHO}
    apps, pods = Apps(), Pods()
    async with trio.open_nursery() as nursery:
        for ip, sock in zip(ips, socks, strict=True):
            nursery.start_soon(serve_pod, sock, mesh.pods()[ip], identities[ip], apps, pods)
        wp, records = make_waypoint(mesh, config, hbone_port=port, **kw)
        addr = await nursery.start(wp.run)
        yield Loop(mesh, wp, addr, records, apps, pods, nursery)
        nursery.cancel_scope.cancel()


POLICY = """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: echo-viewers, namespace: default}
spec:
  targetRefs: [{kind: Service, group: "", name: echo}]
  rules:
  - from: [{source: {principals: [cluster.local/ns/default/sa/sleep]}}]
    to: [{operation: {methods: [GET], paths: ["/public/*", "/split", "/flaky", "/slow/*", "/"]}}]
"""

ROUTES = """
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: echo, namespace: default}
spec:
  parentRefs: [{group: "", kind: Service, name: echo, port: 80}]
  rules:
  - matches: [{headers: [{name: x-canary, value: "yes"}]}]
    backendRefs: [{name: echo-canary, port: 80}]
  - matches: [{path: {type: Exact, value: /split}}]
    backendRefs: [{name: echo, port: 80, weight: 90}, {name: echo-canary, port: 80, weight: 10}]
  - matches: [{path: {type: Exact, value: /flaky}}]
    backendRefs: [{name: echo, port: 80}]
    retry: {codes: [503], attempts: 2, backoff: 1ms}
  - matches: [{path: {type: PathPrefix, value: /slow}}]
    backendRefs: [{name: echo, port: 80}]
    timeouts: {request: 300ms}
  - backendRefs: [{name: echo, port: 80}]
"""


async def test_allowed_200_denied_403_on_one_connection() -> None:
    async with loopback(POLICY) as lo:
        client = H1Client(await lo.stream())
        ok = await client.request("GET", "/public/index.html")
        denied = await client.request("GET", "/private/keys")
        posted = await client.request("POST", "/public/form", body=b"x")
        again = await client.request("GET", "/public/again")
    assert ok.status == 200
    assert (denied.status, denied.body) == (403, b"RBAC: access denied")
    assert posted.status == 403  # only GET is allowed
    assert again.status == 200
    # The waypoint called the pods with its own identity, to the pod ip:targetPort.
    assert set(lo.pods.callers) == {WAYPOINT}
    assert all(a.endswith(":8080") for a in lo.pods.authorities)


async def test_principal_based_rule_denies_another_caller() -> None:
    async with loopback(POLICY) as lo:
        conn = await lo.hbone(Identity("cluster.local", "ops", "admin"))
        reply = await H1Client(await conn.open_stream(f"{ECHO_VIP}:80")).request("GET", "/public/x")
    assert reply.status == 403
    assert lo.records[0].src_identity == Identity("cluster.local", "ops", "admin")


async def test_keepalive_requests_spread_over_two_endpoints() -> None:
    async with loopback() as lo:
        client = H1Client(await lo.stream())
        pods = [(await client.request("GET", "/")).headers["x-pod"] for _ in range(30)]
    assert {"echo-1", "echo-2"} <= set(pods)
    assert {p for p in pods} <= {"echo-1", "echo-2"}


async def test_weighted_split_90_10_over_1000_requests() -> None:
    async with loopback(ROUTES) as lo:
        client = H1Client(await lo.stream())
        pods = [(await client.request("GET", "/split")).headers["x-pod"] for _ in range(1000)]
    canary = pods.count("canary-1")
    # Binomial(1000, 0.1): mean 100, sd 9.5; accept 4.5 sd either way.
    assert 57 <= canary <= 143, canary
    assert len(pods) - canary == pods.count("echo-1") + pods.count("echo-2")


async def test_header_match_routes_to_the_canary() -> None:
    async with loopback(ROUTES) as lo:
        client = H1Client(await lo.stream())
        canary = await client.request("GET", "/", [("x-canary", "yes")])
        stable = await client.request("GET", "/")
    assert canary.headers["x-pod"] == "canary-1"
    assert stable.headers["x-pod"] in ("echo-1", "echo-2")


async def test_retry_turns_a_flaky_first_503_into_200() -> None:
    async with loopback(ROUTES) as lo:
        reply = await H1Client(await lo.stream()).request("GET", "/flaky")
    assert reply.status == 200
    assert lo.records[0].attempts == 2


async def test_timeout_turns_a_slow_backend_into_504() -> None:
    async with loopback(ROUTES) as lo:
        with trio.fail_after(10):
            reply = await H1Client(await lo.stream()).request("GET", "/slow/3000")
    assert (reply.status, reply.body) == (504, b"upstream request timeout")


async def test_http2_and_grpc_with_trailers() -> None:
    async with loopback() as lo:
        h2 = H2Client(await lo.stream())
        plain = await h2.request("GET", "/hello")
        rpc = H2Client(await lo.stream(GRPC_VIP, 9000))
        reply = await rpc.request("POST", "/test.Echo/Say", GRPC_HEADERS, grpc_frame(b"hello"))
    assert plain.status == 200 and plain.headers["x-pod"] in ("echo-1", "echo-2")
    assert reply.body == grpc_frame(b"hello")
    assert reply.trailers == {"grpc-status": "0", "grpc-message": "ok"}
    grpc_record = lo.records[-1]
    assert (grpc_record.grpc, grpc_record.grpc_status, grpc_record.protocol) == (
        True,
        "0",
        "HTTP/2",
    )


async def test_bad_http_gets_400_and_431_while_others_are_served() -> None:
    async with loopback() as lo:
        bad = await lo.stream()
        await bad.send_all(b"GET / HTTP/1.1\r\n\r\n")  # no Host
        big = await lo.stream()
        await big.send_all(b"GET / HTTP/1.1\r\nHost: e\r\nX-Big: " + b"b" * 80_000 + b"\r\n\r\n")
        good = await H1Client(await lo.stream()).request("GET", "/")

        async def read_all(stream: trio.abc.Stream) -> bytes:
            data = b""
            with trio.fail_after(5):
                while chunk := await stream.receive_some(65536):
                    data += chunk
            return data

        assert (await read_all(bad)).startswith(b"HTTP/1.1 400")
        assert (await read_all(big)).startswith(b"HTTP/1.1 431")
    assert good.status == 200


async def test_websocket_and_plain_tcp_pass_through() -> None:
    async with loopback() as lo:
        ws = await lo.stream()
        await ws.send_all(
            b"GET /ws HTTP/1.1\r\nHost: e\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
        )
        head = b""
        with trio.fail_after(5):
            while b"\r\n\r\n" not in head:
                head += await ws.receive_some(65536)
            await ws.send_all(b"frame")
            echoed = b""
            while len(echoed) < 5:
                echoed += await ws.receive_some(65536)
        raw = await lo.stream()
        await raw.send_all(b"RAW:bytes")  # not a request line: relayed at once
        with trio.fail_after(5):
            greeting = await raw.receive_some(65536)
    assert head.startswith(b"HTTP/1.1 101") and echoed == b"FRAME"
    assert greeting.endswith(b":RAW:bytes")


async def test_metrics_have_istios_request_labels() -> None:
    async with loopback(POLICY) as lo:
        client = H1Client(await lo.stream())
        await client.request("GET", "/public/a")
        await client.request("GET", "/nope")
    assert lo.wp.metrics is not None
    text = lo.wp.metrics.exposition().decode()
    ok = [
        line
        for line in text.splitlines()
        if line.startswith("istio_requests_total{") and 'response_code="200"' in line
    ]
    assert len(ok) == 1
    for label in (
        'reporter="waypoint"',
        'source_principal="spiffe://cluster.local/ns/default/sa/sleep"',
        'source_workload="sleep-1"',
        'destination_service="echo.default.svc.cluster.local"',
        'destination_service_name="echo"',
        'destination_principal="spiffe://cluster.local/ns/default/sa/echo"',
        'request_protocol="http"',
        'connection_security_policy="mutual_tls"',
        'response_flags="-"',
    ):
        assert label in ok[0], label
    assert 'response_code="403"' in text
    assert "istio_request_duration_milliseconds_bucket{" in text
    assert "istio_request_bytes_bucket{" in text and "istio_response_bytes_bucket{" in text


# -- identity checks ----------------------------------------------------------------------


async def test_client_from_another_trust_domain_is_refused() -> None:
    async with loopback() as lo:
        stranger = Identity("evil.example", "default", "sleep")
        sock = await dial(lo.addr, lo.mesh.client)
        tls = await tls_handshake(sock, client_context(cert(stranger)), server_side=False)
        conn = HboneClientConnection(tls)
        with pytest.raises(Exception) as err:
            async with trio.open_nursery() as nursery:
                await nursery.start(conn.run)
                await conn.open_stream(f"{ECHO_VIP}:80")
        assert err.value is not None
    assert lo.records == []


async def test_unknown_destination_is_refused_with_503() -> None:
    async with loopback() as lo:
        conn = await lo.hbone()
        with pytest.raises(HboneStatusError) as err:
            await conn.open_stream("10.99.99.99:80")
    assert err.value.status == 503


async def test_upstream_with_the_wrong_identity_is_not_used() -> None:
    # The canary pod presents the sleep identity: the waypoint must refuse to talk to it.
    async with loopback(ROUTES, canary_identity=SLEEP) as lo:
        reply = await H1Client(await lo.stream()).request("GET", "/", [("x-canary", "yes")])
    assert reply.status == 503
    assert reply.body.startswith(b"upstream connect error")
    assert lo.apps.requests["canary-1"] == 0
