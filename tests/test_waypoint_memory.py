"""In-memory transcripts of the waypoint's request path: client and apps on memory streams.

The waypoint's tunnel handler (``Waypoint.serve_tunnel``) is driven directly, as
if a CONNECT had been accepted; upstream "pods" are fake apps reached through an
in-memory connector. Everything above TLS/HBONE runs for real.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from ipaddress import ip_address

import trio
import trio.testing
from waypoint_testlib import (
    ECHO_VIP,
    GRPC_HEADERS,
    GRPC_VIP,
    SLEEP,
    Apps,
    H1Client,
    H2Client,
    Mesh,
    grpc_frame,
    make_waypoint,
    memory_connector,
)

from ztunnel.waypoint.proxy import Tunnel
from ztunnel.waypoint.server import Waypoint
from ztunnel.waypoint.telemetry import RequestRecord
from ztunnel.waypoint.upstream import Endpoint

MESH = Mesh()


class World:
    def __init__(
        self,
        wp: Waypoint,
        records: list[RequestRecord],
        apps: Apps,
        dials: list[Endpoint],
        nursery: trio.Nursery,
    ) -> None:
        self.wp, self.records, self.apps, self.dials, self.nursery = (
            wp,
            records,
            apps,
            dials,
            nursery,
        )

    def tunnel(self, vip: str = ECHO_VIP, port: int = 80, identity=SLEEP) -> Tunnel:  # type: ignore[no-untyped-def]
        store = self.wp.state.store
        return Tunnel(
            ip_address(MESH.client),
            40000,
            identity,
            store.workload_by_ip(MESH.client),
            f"{vip}:{port}",
            port,
            store.service_by_vip(vip),
            None,
            ip_address(vip),
        )

    def connect(self, vip: str = ECHO_VIP, port: int = 80, identity=SLEEP) -> trio.abc.Stream:  # type: ignore[no-untyped-def]
        client, server = trio.testing.memory_stream_pair()
        self.nursery.start_soon(self.wp.serve_tunnel, server, self.tunnel(vip, port, identity))
        return client


@asynccontextmanager
async def world(config: str = "", **kw: object) -> AsyncIterator[World]:
    apps, dials = Apps(), []
    async with trio.open_nursery() as nursery:
        wp, records = make_waypoint(
            MESH, config, connector=memory_connector(apps, nursery, dials), **kw
        )
        await nursery.start(wp.run_upstreams)
        yield World(wp, records, apps, dials, nursery)
        nursery.cancel_scope.cancel()


POLICY = """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: no-admin, namespace: default}
spec:
  targetRefs: [{kind: Service, group: "", name: echo}]
  action: DENY
  rules: [{to: [{operation: {paths: ["/admin", "/admin/*"]}}]}]
"""


async def test_h1_allowed_then_denied_on_one_keepalive_connection() -> None:
    async with world(POLICY) as w:
        client = H1Client(w.connect())
        ok = await client.request("GET", "/hello")
        assert ok.status == 200 and ok.json()["path"] == "/hello"
        denied = await client.request("GET", "/admin/users")
        assert (denied.status, denied.body) == (403, b"RBAC: access denied")
        again = await client.request("GET", "/hello")  # the connection stays usable
        assert again.status == 200
    assert [r.status for r in w.records] == [200, 403, 200]
    assert w.records[1].decision is not None and w.records[1].decision.policy == "default/no-admin"


async def test_h1_keepalive_spreads_requests_over_endpoints_and_reuses_upstreams() -> None:
    async with world() as w:
        client = H1Client(w.connect())
        pods = [(await client.request("GET", "/")).headers["x-pod"] for _ in range(20)]
    assert set(pods) == {"echo-1", "echo-2"}
    # upstream keep-alive: at most one dial per endpoint for 20 sequential requests
    assert len(w.dials) <= 2


async def test_request_headers_as_envoy_forwards_them() -> None:
    async with world() as w:
        client = H1Client(w.connect())
        reply = await client.request(
            "GET",
            "/x/../hello?q=1",
            [("x-forwarded-for", "192.0.2.9"), ("connection", "keep-alive, x-hop"), ("x-hop", "1")],
        )
    seen = reply.json()
    headers = seen["headers"]
    assert seen["path"] == "/hello?q=1"  # normalized, query kept
    assert headers["x-forwarded-for"] == "192.0.2.9"  # passed through, not appended
    assert headers["x-forwarded-proto"] == "http"
    assert len(headers["x-request-id"]) == 36
    assert (
        ("x-hop" not in headers
        and "connection" not in headers)
        or headers["connection"] != "keep-alive, x-hop"
    )
    assert w.records[0].request_id == headers["x-request-id"]


async def test_h1_post_body_and_chunked_upload_reach_the_app() -> None:
    async with world() as w:
        stream = w.connect()
        await stream.send_all(
            b"POST /echo HTTP/1.1\r\nHost: echo\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
        )
        data = b""
        while b"hello world" not in data:
            data += await stream.receive_some(65536)
    assert data.startswith(b"HTTP/1.1 200")


async def test_pipelined_requests_are_answered_in_order() -> None:
    async with world() as w:
        stream = w.connect()
        await stream.send_all(
            b"GET /one HTTP/1.1\r\nHost: echo\r\n\r\nGET /two HTTP/1.1\r\nHost: echo\r\n\r\n"
        )
        data = b""
        with trio.fail_after(5):
            while b'"/two"' not in data:
                data += await stream.receive_some(65536)
    assert data.index(b'"/one"') < data.index(b'"/two"')


async def test_h2_requests_and_local_replies() -> None:
    async with world(POLICY) as w:
        client = H2Client(w.connect())
        ok = await client.request("GET", "/hello")
        assert ok.status == 200 and ok.headers["x-pod"] in ("echo-1", "echo-2")
        denied = await client.request("GET", "/admin")
        assert (denied.status, denied.body) == (403, b"RBAC: access denied")
        posted = await client.request("POST", "/echo", body=b"x" * 100_000)
        assert posted.body == b"x" * 100_000
    assert [r.protocol for r in w.records] == ["HTTP/2"] * 3


async def test_grpc_with_trailers_and_declared_protocol() -> None:
    async with world() as w:
        client = H2Client(w.connect(GRPC_VIP, 9000))
        reply = await client.request("POST", "/test.Echo/Say", GRPC_HEADERS, grpc_frame(b"hi"))
    assert reply.status == 200
    assert reply.body == grpc_frame(b"hi")
    assert reply.trailers["grpc-status"] == "0"
    record = w.records[0]
    assert (record.grpc, record.grpc_status) == (True, "0")


async def test_grpc_unavailable_is_retried_by_default() -> None:
    async with world() as w:
        client = H2Client(w.connect(GRPC_VIP, 9000))
        reply = await client.request("POST", "/test.Echo/Fail", GRPC_HEADERS, grpc_frame(b"x"))
    assert reply.trailers.get("grpc-status") == "0"
    assert w.records[0].attempts == 2


async def test_grpc_denial_is_a_trailers_only_permission_denied() -> None:
    deny_grpc = POLICY.replace("name: echo}", "name: grpc}")
    async with world(deny_grpc) as w:
        client = H2Client(w.connect(GRPC_VIP, 9000))
        reply = await client.request("POST", "/admin", GRPC_HEADERS, grpc_frame(b"x"))
    assert reply.status == 200
    assert (
        reply.headers["grpc-status"] == "7"
        and reply.headers["grpc-message"] == "RBAC: access denied"
    )


async def test_websocket_upgrade_is_passed_through() -> None:
    async with world() as w:
        stream = w.connect()
        await stream.send_all(
            b"GET /ws HTTP/1.1\r\nHost: echo\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
        )
        data = b""
        with trio.fail_after(5):
            while b"\r\n\r\n" not in data:
                data += await stream.receive_some(65536)
        assert data.startswith(b"HTTP/1.1 101")
        await stream.send_all(b"ping")
        echoed = b""
        with trio.fail_after(5):
            while len(echoed) < 4:
                echoed += await stream.receive_some(65536)
        assert echoed == b"PING"
