"""Test fixtures for the waypoint: a small mesh, fake apps and independent HTTP clients.

The apps and clients are written against ``h11`` / ``h2`` directly (not the
waypoint's own HTTP code), so the waypoint is checked against a second
implementation on both sides.

Apps (one per pod name) answer by path:

* ``/status/<code>``: that status;
* ``/flaky``: 503 the first time any pod sees it, then 200;
* ``/slow/<ms>``: sleep, then 200;
* ``/echo``: the request body back;
* ``/close-after``: 200, then the app closes the (keep-alive) connection;
* ``/ws`` with ``Upgrade: websocket``: 101, then every byte upper-cased;
* anything else: 200 with a JSON body ``{"pod", "method", "path", "headers", "body"}``;
* a connection starting with ``RAW`` (not HTTP): ``<pod>:`` then every byte echoed;
* gRPC (HTTP/2, ``content-type: application/grpc``): ``/test.Echo/Say`` echoes the
  message with ``grpc-status: 0`` trailers; ``/test.Echo/Fail`` answers
  trailers-only ``grpc-status: 14`` the first time per pod, then like ``Say``.

Every answer carries ``x-pod: <pod>``.
"""

from __future__ import annotations

import contextlib
import json
import socket
import struct
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from ipaddress import ip_address

import h2.config
import h2.connection
import h2.events
import h11
import trio
import trio.testing
import yaml
from hbone_certs import cert

from ztunnel.identity.certificate import WorkloadCertificate
from ztunnel.model.identity import Identity
from ztunnel.model.workload import NetworkAddress, Service, TunnelProtocol, Workload
from ztunnel.policy.l7model import WaypointRef
from ztunnel.state.store import StateStore
from ztunnel.waypoint.h2proto import H2Limits
from ztunnel.waypoint.server import Waypoint, WaypointConfig
from ztunnel.waypoint.sniff import H2_PREFACE
from ztunnel.waypoint.state import L7Config, WaypointState
from ztunnel.waypoint.telemetry import RequestRecord, WaypointMetrics
from ztunnel.waypoint.upstream import Endpoint

SLEEP = Identity("cluster.local", "default", "sleep")
ADMIN = Identity("cluster.local", "ops", "admin")
WAYPOINT = Identity("cluster.local", "default", "waypoint")
ECHO = Identity("cluster.local", "default", "echo")
CANARY = Identity("cluster.local", "default", "echo-canary")

ECHO_VIP = "10.96.0.10"
CANARY_VIP = "10.96.0.20"
GRPC_VIP = "10.96.0.30"
ECHO_HOST = "echo.default.svc.cluster.local"


# -- the mesh ---------------------------------------------------------------------------------


def pod(name: str, ip: str, sa: str, services: dict[str, dict[int, int]]) -> Workload:
    return Workload(
        uid=f"Kubernetes//Pod/default/{name}",
        name=name,
        namespace="default",
        workload_ips=(ip_address(ip),),
        service_account=sa,
        protocol=TunnelProtocol.HBONE,
        services=services,
        canonical_name=name.rsplit("-", 1)[0],
        canonical_revision="v1",
    )


def service(name: str, vip: str, ports: dict[int, int]) -> Service:
    return Service(
        name=name,
        namespace="default",
        hostname=f"{name}.default.svc.cluster.local",
        vips=(NetworkAddress("", ip_address(vip)),),
        ports=ports,
    )


@dataclass(frozen=True)
class Mesh:
    """Pod IPs (loopback ones for the TLS tests, so a test HBONE server can bind them)."""

    echo1: str = "10.0.0.11"
    echo2: str = "10.0.0.12"
    canary: str = "10.0.0.21"
    grpc: str = "10.0.0.31"
    client: str = "10.0.0.5"

    def pods(self) -> dict[str, str]:
        """Pod IP -> pod name."""
        return {
            self.echo1: "echo-1",
            self.echo2: "echo-2",
            self.canary: "canary-1",
            self.grpc: "grpc-1",
        }

    def store(self) -> StateStore:
        echo = "default/echo.default.svc.cluster.local"
        canary = "default/echo-canary.default.svc.cluster.local"
        grpc = "default/grpc.default.svc.cluster.local"
        store = StateStore()
        store.replace_all(
            [
                pod("echo-1", self.echo1, "echo", {echo: {}}),
                pod("echo-2", self.echo2, "echo", {echo: {}}),
                pod("canary-1", self.canary, "echo-canary", {canary: {}}),
                pod("grpc-1", self.grpc, "echo", {grpc: {}}),
                pod("sleep-1", self.client, "sleep", {}),
            ],
            [
                service("echo", ECHO_VIP, {80: 8080}),
                service("echo-canary", CANARY_VIP, {80: 8080}),
                service("grpc", GRPC_VIP, {9000: 9000}),
            ],
            [],
        )
        return store


GRPC_SERVICE_DOC = """
apiVersion: v1
kind: Service
metadata: {name: grpc, namespace: default}
spec: {ports: [{name: grpc, port: 9000, appProtocol: grpc}]}
"""


def l7_config(text: str = "") -> L7Config:
    docs = (
        list(yaml.safe_load_all(GRPC_SERVICE_DOC + "\n---\n" + text))
        if text
        else list(yaml.safe_load_all(GRPC_SERVICE_DOC))
    )
    return L7Config.from_documents(docs, source="test")


class StaticCerts:
    """Certificates from the tests' FakeCA (what ``SecretManager.fetch`` returns)."""

    async def fetch(self, identity: Identity) -> WorkloadCertificate:
        await trio.lowlevel.checkpoint()
        return cert(identity)


# -- fake apps --------------------------------------------------------------------------------


@dataclass
class Apps:
    """Per-pod app state shared by every connection to that pod."""

    seen: Counter[tuple[str, str]] = field(default_factory=Counter)
    requests: Counter[str] = field(default_factory=Counter)
    connections: Counter[str] = field(default_factory=Counter)

    async def serve(self, stream: trio.abc.Stream, pod: str) -> None:
        """Serve one connection to ``pod`` (HTTP/1.1 or HTTP/2 by the preface)."""
        try:
            await self._serve(stream, pod)
        finally:
            await trio.aclose_forcefully(stream)

    async def _serve(self, stream: trio.abc.Stream, pod: str) -> None:
        self.connections[pod] += 1
        first = b""
        while len(first) < len(H2_PREFACE) and H2_PREFACE.startswith(first):
            chunk = await stream.receive_some(65536)
            if not chunk:
                return
            first += chunk
        if first.startswith(b"RAW"):
            await _echo(stream, pod, first)
        elif first.startswith(H2_PREFACE):
            await self._serve_h2(stream, pod, first)
        else:
            await self._serve_h1(stream, pod, first)

    def _answer(
        self, pod: str, method: str, path: str, headers: list[tuple[str, str]], body: bytes
    ) -> tuple[int, list[tuple[str, str]], bytes, float]:
        self.requests[pod] += 1
        key = (pod, path)
        self.seen[key] += 1
        delay = 0.0
        status = 200
        if path.startswith("/status/"):
            status = int(path.split("/")[2])
        elif path == "/flaky" and sum(n for (_, p), n in self.seen.items() if p == path) == 1:
            status = 503
        elif path.startswith("/slow/"):
            delay = int(path.split("/")[2]) / 1000
        if path == "/echo":
            payload = body
        else:
            payload = json.dumps(
                {
                    "pod": pod,
                    "method": method,
                    "path": path,
                    "headers": dict(headers),
                    "body": len(body),
                }
            ).encode()
        return status, [("x-pod", pod), ("content-type", "application/json")], payload, delay

    async def _serve_h1(self, stream: trio.abc.Stream, pod: str, first: bytes) -> None:
        conn = h11.Connection(h11.SERVER)
        conn.receive_data(first)
        with (
            trio.move_on_after(30),
            contextlib.suppress(h11.RemoteProtocolError, trio.BrokenResourceError),
        ):
            while True:
                req = await _h11_next(conn, stream)
                if not isinstance(req, h11.Request):
                    return
                body = b""
                while True:
                    ev = await _h11_next(conn, stream)
                    if isinstance(ev, h11.Data):
                        body += ev.data
                    elif isinstance(ev, h11.EndOfMessage):
                        break
                    else:
                        return
                headers = [(k.decode(), v.decode()) for k, v in req.headers]
                path = req.target.decode()
                if path == "/ws" and any(k == "upgrade" for k, _ in headers):
                    await self._websocket(conn, stream, pod)
                    return
                status, rheaders, payload, delay = self._answer(
                    pod, req.method.decode(), path, headers, body
                )
                await trio.sleep(delay)
                rheaders.append(("content-length", str(len(payload))))
                out = conn.send(h11.Response(status_code=status, headers=rheaders))
                out += conn.send(h11.Data(data=payload)) if req.method != b"HEAD" else b""
                out += conn.send(h11.EndOfMessage())
                await stream.send_all(out)
                if path == "/close-after":
                    return  # drops a keep-alive connection without saying so
                if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                    return
                conn.start_next_cycle()

    async def _websocket(self, conn: h11.Connection, stream: trio.abc.Stream, pod: str) -> None:
        out = conn.send(
            h11.InformationalResponse(
                status_code=101,
                headers=[("upgrade", "websocket"), ("connection", "Upgrade"), ("x-pod", pod)],
            )
        )
        await stream.send_all(out)
        leftover, _ = conn.trailing_data
        if leftover:
            await stream.send_all(bytes(leftover).upper())
        while data := await stream.receive_some(65536):
            await stream.send_all(data.upper())

    async def _serve_h2(self, stream: trio.abc.Stream, pod: str, first: bytes) -> None:
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
        conn.initiate_connection()
        lock = trio.Lock()

        async def flush() -> None:
            async with lock:
                await stream.send_all(conn.data_to_send())

        await flush()
        pending: dict[int, tuple[list[tuple[str, str]], bytearray]] = {}
        data = first
        async with trio.open_nursery() as nursery:
            while True:
                if not data:
                    data = await stream.receive_some(65536)
                    if not data:
                        nursery.cancel_scope.cancel()
                        return
                for ev in conn.receive_data(data):
                    if isinstance(ev, h2.events.RequestReceived):
                        pending[ev.stream_id] = (
                            [
                                (
                                    k.decode() if isinstance(k, bytes) else k,
                                    v.decode() if isinstance(v, bytes) else v,
                                )
                                for k, v in ev.headers
                            ],
                            bytearray(),
                        )
                    elif isinstance(ev, h2.events.DataReceived):
                        pending[ev.stream_id][1].extend(ev.data)
                        conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                    elif isinstance(ev, h2.events.StreamEnded):
                        headers, body = pending.pop(ev.stream_id)
                        nursery.start_soon(
                            self._h2_answer, conn, flush, ev.stream_id, pod, headers, bytes(body)
                        )
                data = b""
                await flush()

    async def _h2_answer(
        self,
        conn: h2.connection.H2Connection,
        flush: Callable[[], Awaitable[None]],
        sid: int,
        pod: str,
        headers: list[tuple[str, str]],
        body: bytes,
    ) -> None:
        pseudo = dict(h for h in headers if h[0].startswith(":"))
        plain = [h for h in headers if not h[0].startswith(":")]
        path = pseudo.get(":path", "/")
        if dict(plain).get("content-type", "").startswith("application/grpc"):
            self.requests[pod] += 1
            self.seen[(pod, path)] += 1
            if path == "/test.Echo/Fail" and self.seen[(pod, path)] == 1:
                conn.send_headers(
                    sid,
                    [
                        (":status", "200"),
                        ("content-type", "application/grpc"),
                        ("grpc-status", "14"),
                        ("x-pod", pod),
                    ],
                    end_stream=True,
                )
            else:
                conn.send_headers(
                    sid, [(":status", "200"), ("content-type", "application/grpc"), ("x-pod", pod)]
                )
                await _h2_send_body(conn, flush, sid, body, end=False)
                conn.send_headers(
                    sid, [("grpc-status", "0"), ("grpc-message", "ok")], end_stream=True
                )
            await flush()
            return
        status, rheaders, payload, delay = self._answer(
            pod, pseudo.get(":method", ""), path, plain, body
        )
        await trio.sleep(delay)
        conn.send_headers(
            sid, [(":status", str(status)), *rheaders, ("content-length", str(len(payload)))]
        )
        await _h2_send_body(conn, flush, sid, payload)


async def _echo(stream: trio.abc.Stream, pod: str, first: bytes) -> None:
    """Not HTTP: echo every byte back after a greeting naming the pod."""
    await stream.send_all(f"{pod}:".encode() + first)
    while data := await stream.receive_some(65536):
        await stream.send_all(data)


async def _h2_send_body(
    conn: h2.connection.H2Connection,
    flush: Callable[[], Awaitable[None]],
    sid: int,
    body: bytes,
    *,
    end: bool = True,
) -> None:
    """DATA in frames the peer accepts, waiting (polling) for window when needed."""
    left = memoryview(body)
    while left:
        size = min(len(left), conn.local_flow_control_window(sid), conn.max_outbound_frame_size)
        if size <= 0:
            await flush()
            await trio.sleep(0.01)
            continue
        conn.send_data(sid, bytes(left[:size]))
        left = left[size:]
    if end:
        conn.end_stream(sid)
    await flush()


async def _h11_next(conn: h11.Connection, stream: trio.abc.Stream) -> object:
    while True:
        ev = conn.next_event()
        if ev is not h11.NEED_DATA:
            return ev
        conn.receive_data(await stream.receive_some(65536))


def memory_connector(
    apps: Apps, nursery: trio.Nursery, dials: list[Endpoint]
) -> Callable[[Endpoint], object]:
    """A connector whose "pods" are ``apps`` on in-memory streams (by endpoint IP)."""
    names = Mesh().pods()

    async def connect(endpoint: Endpoint) -> trio.abc.Stream:
        dials.append(endpoint)
        ours, theirs = trio.testing.memory_stream_pair()
        nursery.start_soon(apps.serve, theirs, names[str(endpoint.ip)])
        await trio.lowlevel.checkpoint()
        return ours

    return connect


# -- independent clients ----------------------------------------------------------------------


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes
    trailers: dict[str, str] = field(default_factory=dict)

    def json(self) -> dict[str, object]:
        loaded: dict[str, object] = json.loads(self.body)
        return loaded


class H1Client:
    """Sequential HTTP/1.1 requests on one connection (h11)."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.conn = h11.Connection(h11.CLIENT)

    async def request(
        self,
        method: str,
        path: str,
        headers: Iterable[tuple[str, str]] = (),
        body: bytes = b"",
        host: str = ECHO_HOST,
    ) -> Reply:
        hs = [("host", host), *headers]
        if body:
            hs.append(("content-length", str(len(body))))
        out = self.conn.send(h11.Request(method=method, target=path, headers=hs))
        if body:
            out += self.conn.send(h11.Data(data=body))
        out += self.conn.send(h11.EndOfMessage())
        await self.stream.send_all(out)
        resp = await _h11_next(self.conn, self.stream)
        assert isinstance(resp, h11.Response), resp
        data = b""
        while True:
            ev = await _h11_next(self.conn, self.stream)
            if isinstance(ev, h11.Data):
                data += ev.data
            else:
                assert isinstance(ev, h11.EndOfMessage), ev
                break
        if self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE:
            self.conn.start_next_cycle()
        return Reply(resp.status_code, {k.decode(): v.decode() for k, v in resp.headers}, data)


class H2Client:
    """HTTP/2 with prior knowledge (raw h2); one request at a time."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        self.conn.initiate_connection()
        self.started = False

    async def request(
        self,
        method: str,
        path: str,
        headers: Iterable[tuple[str, str]] = (),
        body: bytes = b"",
        authority: str = ECHO_HOST,
    ) -> Reply:
        sid = self.conn.get_next_available_stream_id()
        hs = [
            (":method", method),
            (":scheme", "http"),
            (":authority", authority),
            (":path", path),
            *headers,
        ]
        self.conn.send_headers(sid, hs, end_stream=not body)
        left = memoryview(body)
        status, rheaders, data, trailers = 0, {}, bytearray(), {}
        done = False
        while True:
            while left and self.conn.local_flow_control_window(sid) > 0:
                size = min(len(left), self.conn.local_flow_control_window(sid), 16384)
                self.conn.send_data(sid, bytes(left[:size]), end_stream=size == len(left))
                left = left[size:]
            await self.stream.send_all(self.conn.data_to_send())
            if done:
                return Reply(status, rheaders, bytes(data), trailers)
            chunk = await self.stream.receive_some(65536)
            if not chunk:
                raise ConnectionError("connection closed")
            for ev in self.conn.receive_data(chunk):
                if isinstance(ev, h2.events.ResponseReceived) and ev.stream_id == sid:
                    pairs = [(k.decode(), v.decode()) for k, v in ev.headers]
                    status = int(dict(pairs)[":status"])
                    rheaders = {k: v for k, v in pairs if not k.startswith(":")}
                elif isinstance(ev, h2.events.DataReceived) and ev.stream_id == sid:
                    data.extend(ev.data)
                    self.conn.acknowledge_received_data(ev.flow_controlled_length, sid)
                elif isinstance(ev, h2.events.TrailersReceived) and ev.stream_id == sid:
                    trailers = {k.decode(): v.decode() for k, v in ev.headers}
                elif isinstance(ev, h2.events.StreamEnded) and ev.stream_id == sid:
                    done = True
                elif isinstance(ev, h2.events.StreamReset) and ev.stream_id == sid:
                    raise ConnectionError(f"stream reset {ev.error_code}")
                elif isinstance(ev, h2.events.ConnectionTerminated):
                    raise ConnectionError(f"GOAWAY {ev.error_code}")


def grpc_frame(message: bytes) -> bytes:
    return struct.pack(">?I", False, len(message)) + message


GRPC_HEADERS = (("content-type", "application/grpc"), ("te", "trailers"))


# -- the waypoint under test ------------------------------------------------------------------


def make_waypoint(
    mesh: Mesh,
    config_text: str = "",
    *,
    connector: Callable[[Endpoint], object] | None = None,
    seed: int = 1,
    listen: tuple[str, int] = ("127.0.0.1", 0),
    hbone_port: int = 15008,
    **config: object,
) -> tuple[Waypoint, list[RequestRecord]]:
    import random

    state = WaypointState(mesh.store(), WaypointRef("default", "waypoint"), l7_config(config_text))
    wp_config = WaypointConfig(WAYPOINT, listen=listen, hbone_port=hbone_port, **config)  # type: ignore[arg-type]
    wp = Waypoint(
        wp_config,
        state,
        StaticCerts(),
        connector=connector,  # type: ignore[arg-type]
        metrics=WaypointMetrics(),
        rng=random.Random(seed),
    )
    records: list[RequestRecord] = []
    wp.ctx.records = records
    return wp, records


def free_loopback_net() -> str:
    """A random 127.x.y.0/24 prefix (tests on one machine must not collide)."""
    import random

    rng = random.SystemRandom()
    return f"127.{rng.randrange(1, 250)}.{rng.randrange(1, 250)}"


def bind_same_port(ips: list[str]) -> tuple[int, list[socket.socket]]:
    """Listeners on every IP of ``ips`` sharing one ephemeral port."""
    for _ in range(20):
        first = socket.socket()
        first.bind((ips[0], 0))
        port = first.getsockname()[1]
        socks = [first]
        try:
            for ip in ips[1:]:
                s = socket.socket()
                socks.append(s)
                s.bind((ip, port))
        except OSError:
            for s in socks:
                s.close()
            continue
        for s in socks:
            s.listen(64)
            s.setblocking(False)
        return port, socks
    raise OSError("no common free port")


H2_TEST_LIMITS = H2Limits()
