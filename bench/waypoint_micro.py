"""In-process micro-benchmark of the waypoint's HTTP/1.1 request path, next to L4 only.

Everything runs in one trio process on loopback with real TLS: a client, the
waypoint, a test HBONE server standing in for the destination agent, and a tiny
h11 app behind it. Two paths, same client and app:

* ``l4``: client --HBONE--> destination --> app (what the node agents do);
* ``waypoint``: client --HBONE--> waypoint (HTTP parsing, L7 policy, route,
  endpoint pick) --HBONE--> destination --> app.

Each mode sends ``--requests`` keep-alive GETs on each of ``--connections``
concurrent connections and prints requests/s and latency p50/p99. One process
shares one core between all four parties (GIL), so the figures compare the two
paths; CPU milliseconds per request (all parties together) is the figure that
holds up on a busy machine. Absolute numbers for a separate waypoint process come
from the phase-2 cluster benchmark (h2load / wrk).

Run: ``.venv/bin/python bench/waypoint_micro.py [--requests N] [--connections C]``.
"""

from __future__ import annotations

import argparse
import random
import socket
import statistics
import sys
import time
from ipaddress import ip_address
from pathlib import Path

import h11
import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ztunnel.hbone.connection import HboneClientConnection, HboneServerStream, serve_hbone
from ztunnel.hbone.engine import ConnectRequest
from ztunnel.hbone.tlsstream import tls_handshake
from ztunnel.identity.ca import FakeCA
from ztunnel.identity.certificate import WorkloadCertificate
from ztunnel.identity.tls import client_context, server_context
from ztunnel.model.identity import Identity
from ztunnel.model.workload import NetworkAddress, Service, TunnelProtocol, Workload
from ztunnel.policy.l7model import WaypointRef
from ztunnel.state.store import StateStore
from ztunnel.waypoint.server import Waypoint, WaypointConfig
from ztunnel.waypoint.state import L7Config, WaypointState

CA = FakeCA.ephemeral()
CLIENT = Identity("cluster.local", "default", "sleep")
WAYPOINT = Identity("cluster.local", "default", "waypoint")
APP = Identity("cluster.local", "default", "echo")
VIP = "10.96.0.10"
POLICY = """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: viewers, namespace: default}
spec:
  targetRefs: [{kind: Service, group: "", name: echo}]
  rules: [{from: [{source: {namespaces: [default]}}], to: [{operation: {methods: [GET]}}]}]
"""
BODY = b"x" * 64


class Certs:
    def __init__(self) -> None:
        self._cache: dict[Identity, WorkloadCertificate] = {}

    async def fetch(self, identity: Identity) -> WorkloadCertificate:
        if identity not in self._cache:
            self._cache[identity] = CA.workload_certificate(identity)
        await trio.lowlevel.checkpoint()
        return self._cache[identity]


CERTS = Certs()


async def app(stream: trio.abc.Stream) -> None:
    conn = h11.Connection(h11.SERVER)
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            data = await stream.receive_some(65536)
            conn.receive_data(data)
            if not data:
                return
            continue
        if isinstance(event, h11.Request):
            continue
        if isinstance(event, h11.EndOfMessage):
            head = h11.Response(status_code=200, headers=[("content-length", str(len(BODY)))])
            await stream.send_all(
                conn.send(head) + conn.send(h11.Data(data=BODY)) + conn.send(h11.EndOfMessage())
            )
            conn.start_next_cycle()
            continue
        return


async def destination(listener: socket.socket) -> None:
    """The destination agent stand-in: mTLS, CONNECT, the app behind it."""

    async def handler(request: ConnectRequest, stream: HboneServerStream) -> None:
        await stream.respond(200)
        await app(stream)

    async def one(sock: socket.socket) -> None:
        tls = await tls_handshake(sock, server_context(await CERTS.fetch(APP)), server_side=True)
        async with trio.open_nursery() as nursery:
            await nursery.start(serve_hbone, tls, handler)

    async with trio.open_nursery() as nursery:
        while True:
            await trio.lowlevel.wait_readable(listener)
            sock, _ = listener.accept()
            nursery.start_soon(one, sock)


async def hbone_stream(
    nursery: trio.Nursery, addr: tuple[str, int], authority: str
) -> trio.abc.Stream:
    sock = socket.create_connection(addr)
    tls = await tls_handshake(sock, client_context(await CERTS.fetch(CLIENT)), server_side=False)
    conn = HboneClientConnection(tls)
    await nursery.start(conn.run)
    return await conn.open_stream(authority)


async def client(stream: trio.abc.Stream, n: int, latencies: list[float]) -> None:
    conn = h11.Connection(h11.CLIENT)
    request = [
        h11.Request(method="GET", target="/", headers=[("host", "echo")]),
        h11.EndOfMessage(),
    ]
    for _ in range(n):
        start = time.perf_counter()
        await stream.send_all(b"".join(conn.send(e) or b"" for e in request))
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await stream.receive_some(65536))
            elif isinstance(event, h11.EndOfMessage):
                break
        latencies.append(time.perf_counter() - start)
        conn.start_next_cycle()


def store(pod_ip: str) -> StateStore:
    s = StateStore()
    s.replace_all(
        [
            Workload(
                uid="Kubernetes//Pod/default/echo-1",
                name="echo-1",
                namespace="default",
                workload_ips=(ip_address(pod_ip),),
                service_account="echo",
                protocol=TunnelProtocol.HBONE,
                services={"default/echo.default.svc.cluster.local": {}},
            )
        ],
        [
            Service(
                name="echo",
                namespace="default",
                hostname="echo.default.svc.cluster.local",
                vips=(NetworkAddress("", ip_address(VIP)),),
                ports={80: 8080},
            )
        ],
        [],
    )
    return s


async def run(mode: str, requests: int, connections: int) -> tuple[float, list[float]]:
    base = f"127.{random.randrange(1, 250)}.{random.randrange(1, 250)}"
    pod_ip = f"{base}.11"
    listener = socket.socket()
    listener.bind((pod_ip, 0))
    listener.listen(128)
    listener.setblocking(False)
    port = listener.getsockname()[1]
    latencies: list[float] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(destination, listener)
        if mode == "waypoint":
            import yaml

            state = WaypointState(
                store(pod_ip),
                WaypointRef("default", "waypoint"),
                L7Config.from_documents(yaml.safe_load_all(POLICY)),
            )
            config = WaypointConfig(WAYPOINT, listen=(f"{base}.1", 0), hbone_port=port)
            wp = Waypoint(config, state, CERTS)
            wp.ctx.access_log = False
            target, authority = await nursery.start(wp.run), f"{VIP}:80"
        else:
            target, authority = (pod_ip, port), f"{pod_ip}:8080"
        streams = [await hbone_stream(nursery, target, authority) for _ in range(connections)]
        await client(streams[0], 20, [])  # warm up connections and pools
        start = time.perf_counter()
        async with trio.open_nursery() as clients:
            for s in streams:
                clients.start_soon(client, s, requests, latencies)
        elapsed = time.perf_counter() - start
        nursery.cancel_scope.cancel()
    listener.close()
    return elapsed, latencies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=2000, help="per connection")
    parser.add_argument("--connections", type=int, default=1)
    args = parser.parse_args()
    for mode in ("l4", "waypoint"):
        cpu = time.process_time()
        elapsed, lat = trio.run(run, mode, args.requests, args.connections)
        cpu = time.process_time() - cpu
        lat.sort()
        total = len(lat)
        p50 = statistics.median(lat) * 1000
        p99 = lat[min(total - 1, int(total * 0.99))] * 1000
        print(
            f"{mode:9s} {args.connections} conn x {args.requests} req: "
            f"{total / elapsed:8.0f} req/s  p50 {p50:6.2f} ms  p99 {p99:6.2f} ms  "
            f"cpu {cpu / total * 1000:5.2f} ms/req (all parties, setup included)"
        )


if __name__ == "__main__":
    main()
