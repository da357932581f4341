"""In-memory transcripts of the waypoint's request path: client and apps on memory streams.

The waypoint's tunnel handler (``Waypoint.serve_tunnel``) is driven directly, as
if a CONNECT had been accepted; upstream "pods" are fake apps reached through an
in-memory connector. Everything above TLS/HBONE runs for real.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from ipaddress import ip_address

import h2.config
import h2.connection
import h2.errors
import h2.events
import pytest
import trio
import trio.testing
from waypoint_testlib import (
    ECHO_HOST,
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

from ztunnel.waypoint.errors import UpstreamConnectError
from ztunnel.waypoint.h1server import H1Limits
from ztunnel.waypoint.h2proto import H2Limits
from ztunnel.waypoint.proxy import ProxySettings, Tunnel
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
    assert ("x-hop" not in headers and "connection" not in headers) or headers[
        "connection"
    ] != "keep-alive, x-hop"
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


# -- traffic management -----------------------------------------------------------------------

ROUTES = """
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: echo, namespace: default}
spec:
  parentRefs: [{group: "", kind: Service, name: echo, port: 80}]
  rules:
  - matches: [{headers: [{name: x-canary, value: "yes"}]}]
    backendRefs: [{name: echo-canary, port: 80}]
  - matches: [{path: {type: PathPrefix, value: /split}}]
    backendRefs: [{name: echo, port: 80, weight: 90}, {name: echo-canary, port: 80, weight: 10}]
  - matches: [{path: {type: PathPrefix, value: /flaky}}]
    backendRefs: [{name: echo, port: 80}]
    retry: {codes: [503], attempts: 2, backoff: 1ms}
  - matches: [{path: {type: PathPrefix, value: /slow}}]
    backendRefs: [{name: echo, port: 80}]
    timeouts: {request: 200ms}
  - matches: [{path: {type: PathPrefix, value: /old}}]
    filters:
    - type: RequestRedirect
      requestRedirect: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /new}, statusCode: 301}
  - matches: [{path: {type: PathPrefix, value: /api}}]
    filters:
    - type: URLRewrite
      urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /v2}}
    - type: RequestHeaderModifier
      requestHeaderModifier: {set: [{name: x-route, value: api}]}
    - type: ResponseHeaderModifier
      responseHeaderModifier: {add: [{name: x-served-by, value: waypoint}]}
    backendRefs: [{name: echo, port: 80}]
  - matches: [{path: {type: Exact, value: /gone}}]
    backendRefs: [{name: missing, port: 80}]
"""


async def test_header_match_routes_to_the_canary() -> None:
    async with world(ROUTES) as w:
        client = H1Client(w.connect())
        canary = await client.request("GET", "/", [("x-canary", "yes")])
        stable = await client.request("GET", "/split/x")
    assert canary.headers["x-pod"] == "canary-1"
    assert w.records[0].service is not None and w.records[0].service.name == "echo-canary"
    assert stable.status == 200


async def test_weighted_split_in_memory() -> None:
    async with world(ROUTES) as w:
        client = H1Client(w.connect())
        pods = [(await client.request("GET", "/split")).headers["x-pod"] for _ in range(400)]
    canary = pods.count("canary-1")
    # p = 0.1, n = 400: sd = 6; 4 sd either way.
    assert 16 <= canary <= 64, canary


async def test_retry_turns_a_flaky_first_503_into_200() -> None:
    async with world(ROUTES) as w:
        reply = await H1Client(w.connect()).request("GET", "/flaky")
    assert reply.status == 200
    assert w.records[0].attempts == 2
    first, second = (ep.ip for ep in w.dials[:2])
    assert first != second  # the retry went to another endpoint (previous_hosts)


async def test_no_retry_on_503_without_a_retry_stanza() -> None:
    async with world() as w:
        reply = await H1Client(w.connect()).request("GET", "/flaky")
    assert reply.status == 503  # Istio's default retries do not include 503
    assert w.records[0].attempts == 1


async def test_route_timeout_answers_504() -> None:
    async with world(ROUTES) as w:
        with trio.fail_after(5):
            reply = await H1Client(w.connect()).request("GET", "/slow/2000")
    assert (reply.status, reply.body) == (504, b"upstream request timeout")
    assert w.records[0].flags == "UT"


async def test_redirect_rewrite_and_header_modifiers() -> None:
    async with world(ROUTES) as w:
        client = H1Client(w.connect())
        moved = await client.request("GET", "/old/page?x=1")
        api = await client.request("GET", "/api/users")
    assert moved.status == 301
    assert moved.headers["location"] == f"http://{ECHO_HOST}/new/page?x=1"
    seen = api.json()
    assert seen["path"] == "/v2/users" and seen["headers"]["x-route"] == "api"  # type: ignore[index]
    assert api.headers["x-served-by"] == "waypoint"


async def test_unknown_backend_is_500_and_unmatched_route_404() -> None:
    async with world(ROUTES) as w:
        client = H1Client(w.connect())
        assert (await client.request("GET", "/gone")).status == 500
        assert (await client.request("GET", "/nothing")).status == 404
    assert w.records[1].flags == "NR"


async def test_no_healthy_endpoint_is_503() -> None:
    async with world() as w:
        store = w.wp.state.store
        for uid in ("Kubernetes//Pod/default/echo-1", "Kubernetes//Pod/default/echo-2"):
            store.remove_workload(uid)
        reply = await H1Client(w.connect()).request("GET", "/")
    assert (reply.status, reply.body) == (503, b"no healthy upstream")
    assert w.records[0].flags == "UH"


async def test_upstream_connect_failure_is_retried_then_503() -> None:
    async def refuse(endpoint: Endpoint) -> trio.abc.Stream:
        raise UpstreamConnectError(f"{endpoint.authority}: connection refused")

    async with trio.open_nursery() as nursery:
        wp, records = make_waypoint(MESH, connector=refuse)
        await nursery.start(wp.run_upstreams)
        client, server = trio.testing.memory_stream_pair()
        tunnel = World(wp, records, Apps(), [], nursery).tunnel()
        nursery.start_soon(wp.serve_tunnel, server, tunnel)
        reply = await H1Client(client).request("GET", "/")
        nursery.cancel_scope.cancel()
    assert reply.status == 503
    assert reply.body.startswith(b"upstream connect error or disconnect/reset before headers")
    assert records[0].attempts == 3  # Istio's default: 2 retries on connect-failure
    assert records[0].flags == "URX,UF"


# -- bad HTTP ---------------------------------------------------------------------------------


async def read_all(stream: trio.abc.Stream) -> bytes:
    data = b""
    with trio.fail_after(5):
        while chunk := await stream.receive_some(65536):
            data += chunk
    return data


async def test_oversized_headers_get_431_and_others_keep_working() -> None:
    async with world() as w:
        bad = w.connect()
        await bad.send_all(b"GET / HTTP/1.1\r\nHost: echo\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n")
        assert (await read_all(bad)).startswith(b"HTTP/1.1 431")
        good = await H1Client(w.connect()).request("GET", "/")
        assert good.status == 200


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"POST / HTTP/1.1\r\nHost: echo\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"GET / HTTP/1.1\r\n\r\n",  # no Host
        b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"GET /\x00 HTTP/1.1\r\nHost: a\r\n\r\n",
    ],
)
async def test_invalid_framing_gets_400(request_bytes: bytes) -> None:
    async with world() as w:
        bad = w.connect()
        await bad.send_all(request_bytes)
        assert (await read_all(bad)).startswith(b"HTTP/1.1 400")


async def test_slow_header_gets_408() -> None:
    async with world(h1=H1Limits(header_timeout=0.2)) as w:
        slow = w.connect()
        await slow.send_all(b"GET / HTTP/1.1\r\nHost: ")  # never finishes
        assert (await read_all(slow)).startswith(b"HTTP/1.1 408")


async def test_idle_keepalive_connection_is_closed_silently() -> None:
    async with world(h1=H1Limits(idle_timeout=0.2)) as w:
        stream = w.connect()
        client = H1Client(stream)
        assert (await client.request("GET", "/")).status == 200
        assert await read_all(stream) == b""


async def test_h2_protocol_error_is_goaway_with_the_code() -> None:
    async with world() as w:
        stream = w.connect()
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        conn.initiate_connection()
        await stream.send_all(conn.data_to_send())
        # A DATA frame on stream 1, which was never opened: PROTOCOL_ERROR (RFC 9113 §5.1).
        await stream.send_all(b"\x00\x00\x01\x00\x00\x00\x00\x00\x01x")
        data = await read_all(stream)
        events = conn.receive_data(data)
    goaway = [e for e in events if isinstance(e, h2.events.ConnectionTerminated)]
    assert goaway and goaway[0].error_code == h2.errors.ErrorCodes.PROTOCOL_ERROR


async def test_h2_oversized_header_list_is_goaway() -> None:
    async with world(h2=H2Limits(max_header_list_size=4096)) as w:
        stream = w.connect()
        client = H2Client(stream)
        with pytest.raises(ConnectionError, match="GOAWAY"):
            await client.request("GET", "/", [("x-big", "a" * 10_000)])
        good = await H2Client(w.connect()).request("GET", "/")
        assert good.status == 200


# -- plain TCP --------------------------------------------------------------------------------

TCP_DENY = """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: only-admin, namespace: default}
spec:
  targetRefs: [{kind: Service, group: "", name: echo}]
  rules: [{from: [{source: {namespaces: [ops]}}], to: [{operation: {paths: ["/x"]}}]}]
"""


async def test_non_http_is_relayed_as_tcp() -> None:
    async with world() as w:
        stream = w.connect()
        await stream.send_all(b"RAW hello\n")  # not HTTP: relayed byte for byte
        await stream.send_eof()
        data = await read_all(stream)
    assert data in (b"echo-1:RAW hello\n", b"echo-2:RAW hello\n")


async def test_tcp_gets_l4_policy_only() -> None:
    # An ALLOW rule with paths never matches TCP (istiod's forTCP rule): the stream is closed.
    async with world(TCP_DENY) as w:
        stream = w.connect()
        await stream.send_all(b"\x16\x03\x01 not http")
        assert await read_all(stream) == b""
    assert not w.dials


async def test_http1_connect_is_refused() -> None:
    async with world() as w:
        stream = w.connect()
        await stream.send_all(b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n")
        with trio.fail_after(5):
            head = await stream.receive_some(65536)
        assert head.startswith(b"HTTP/1.1 405")
    assert not w.dials


async def test_stalled_request_body_gets_408() -> None:
    async with world(h1=H1Limits(body_timeout=0.2)) as w:
        stream = w.connect()
        await stream.send_all(b"POST /echo HTTP/1.1\r\nHost: echo\r\nContent-Length: 10\r\n\r\nabc")
        assert (await read_all(stream)).startswith(b"HTTP/1.1 408")


async def test_upstream_closed_while_idle_is_not_reused() -> None:
    async with world() as w:
        client = H1Client(w.connect())
        first = await client.request("GET", "/close-after")
        await trio.sleep(0.05)  # the pool's watcher notices the app's close
        second = await client.request("GET", "/close-after")
    assert (first.status, second.status) == (200, 200)
    assert w.wp.pool.idle_count() == 0


async def test_rapid_reset_cannot_run_more_handlers_than_the_stream_limit() -> None:
    async with world(h2=H2Limits(max_concurrent_streams=2)) as w:
        stream = w.connect()
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        conn.initiate_connection()
        for _ in range(20):  # HEADERS then RST_STREAM, all in one write
            sid = conn.get_next_available_stream_id()
            hs = [
                (":method", "GET"),
                (":scheme", "http"),
                (":authority", "e"),
                (":path", "/slow/300"),
            ]
            conn.send_headers(sid, hs, end_stream=True)
            conn.reset_stream(sid)
        await stream.send_all(conn.data_to_send())
        # Everything is in memory: once every task is blocked, the waypoint has read the
        # whole write and every handler it started has run until it waits (an app
        # counts a request when it arrives, before /slow's delay).
        await trio.testing.wait_all_tasks_blocked()
    assert len(w.records) <= 2  # the others were refused before any work
    assert w.apps.requests["echo-1"] + w.apps.requests["echo-2"] == 0


async def test_h2_peer_that_never_reads_is_dropped() -> None:
    client, server = trio.testing.lockstep_stream_pair()
    async with world() as w:
        w.nursery.start_soon(w.wp.serve_tunnel, server, w.tunnel())
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        conn.initiate_connection()
        await client.send_all(conn.data_to_send())
        ping = b"\x00\x00\x08\x06\x00\x00\x00\x00\x00" + b"12345678"
        with (
            trio.fail_after(20),
            pytest.raises((trio.BrokenResourceError, trio.ClosedResourceError)),
        ):
            for _ in range(100):  # 100 x 17 KB of PINGs, never reading the ACKs
                await client.send_all(ping * 1000)


async def test_retry_replays_the_request_body() -> None:
    async with world(ROUTES) as w:
        reply = await H1Client(w.connect()).request("POST", "/flaky", body=b"p" * 5000)
    assert reply.status == 200 and reply.json()["body"] == 5000
    assert w.records[0].attempts == 2 and w.records[0].bytes_received == 5000


async def test_a_body_over_the_retry_buffer_turns_retries_off() -> None:
    async with world(ROUTES, proxy=ProxySettings(retry_buffer=1000)) as w:
        reply = await H1Client(w.connect()).request("POST", "/flaky", body=b"p" * 5000)
    assert reply.status == 503
    assert w.records[0].attempts == 1


async def test_a_client_that_stops_reading_releases_the_exchange() -> None:
    client, server = trio.testing.lockstep_stream_pair()  # no buffering: writes wait for reads
    async with world(h1=H1Limits(body_timeout=0.3)) as w:
        w.nursery.start_soon(w.wp.serve_tunnel, server, w.tunnel())
        await client.send_all(b"GET / HTTP/1.1\r\nHost: echo\r\n\r\n")
        with trio.fail_after(5):
            while not w.records:  # noqa: ASYNC110 - polling test state
                await trio.sleep(0.05)
    assert w.records[0].flags == "DC"
