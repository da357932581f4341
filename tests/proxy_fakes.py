"""In-memory stand-ins for what the proxy flows touch, for transcript tests.

``Bench`` builds a ``FlowDeps`` from a real ``StateStore`` and a real
``ConnectionTracker`` (access log recorded, metrics in their own registry, time
from trio's clock, so ``autojump_clock`` makes durations exact), with a fake
network (``FakeNet``: every dial is recorded and answered as the test scripted)
and a fake HBONE pool (``FakePool``: every CONNECT is recorded and answered the
same way). Accepted upstreams are in-memory stream pairs; the test plays the
app (or the remote agent) on the other end.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from ipaddress import ip_address
from typing import Any

import trio
import trio.testing
from prometheus_client.parser import text_string_to_metric_families

from ztunnel.config import WorkloadInfo
from ztunnel.hbone.connection import Handler, OnLimit
from ztunnel.hbone.events import ConnectRequest
from ztunnel.hbone.pool import PoolKey
from ztunnel.identity.certificate import WorkloadCertificate
from ztunnel.model.address import IPAddress, SocketAddr
from ztunnel.model.authorization import Authorization
from ztunnel.model.identity import Identity
from ztunnel.model.ports import AgentPorts
from ztunnel.model.workload import NetworkAddress, Service, TunnelProtocol, Workload
from ztunnel.proxy.deps import FlowDeps, FlowSettings, wait_for_workload
from ztunnel.state.store import StateStore
from ztunnel.telemetry.connections import ConnectionTracker
from ztunnel.telemetry.metrics import Metrics

Stream = trio.abc.HalfCloseableStream
# What a fake dial / CONNECT does: return a stream (the test keeps the other end) or raise.
Behaviour = Callable[[], Awaitable[Stream]]


def wl(name: str, *ips: str, **kw: object) -> Workload:
    fields: dict[str, object] = {
        "uid": f"Kubernetes//Pod/ns/{name}",
        "name": name,
        "namespace": "ns",
        "service_account": name,
        "workload_ips": tuple(ip_address(i) for i in ips),
        "protocol": TunnelProtocol.HBONE,
    }
    fields.update(kw)
    return Workload(**fields)  # type: ignore[arg-type]


def svc(name: str, vip: str, ports: dict[int, int] | None = None) -> Service:
    return Service(
        name=name,
        namespace="ns",
        hostname=f"{name}.ns.svc.cluster.local",
        vips=(NetworkAddress("", ip_address(vip)),),
        ports=ports or {80: 8080},
    )


def sa(text: str) -> SocketAddr:
    return SocketAddr.parse(text)


CLIENT = wl("client", "10.0.0.1")
SERVER = wl("server", "10.0.0.2", services={"ns/echo.ns.svc.cluster.local": {}})
PLAIN = wl("plain", "10.0.0.3", protocol=TunnelProtocol.TCP)
ECHO = svc("echo", "10.96.0.1")
EMPTY = svc("empty", "10.96.0.9")  # no endpoints


@dataclass
class Record:
    level: str
    event: str
    fields: dict[str, Any]


class RecordingLog:
    """An AccessLogger that keeps every entry."""

    def __init__(self) -> None:
        self.records: list[Record] = []

    def _add(self, level: str, event: str | None, kw: dict[str, Any]) -> None:
        self.records.append(Record(level, event or "", {k: v for k, v in kw.items()}))

    def debug(self, event: str | None = None, *args: Any, **kw: Any) -> None:
        self._add("debug", event, kw)

    def info(self, event: str | None = None, *args: Any, **kw: Any) -> None:
        self._add("info", event, kw)

    def warning(self, event: str | None = None, *args: Any, **kw: Any) -> None:
        self._add("warning", event, kw)

    def error(self, event: str | None = None, *args: Any, **kw: Any) -> None:
        self._add("error", event, kw)

    def events(self) -> list[tuple[str, str]]:
        return [(r.level, r.event) for r in self.records]

    def one(self, event: str) -> Record:
        [found] = [r for r in self.records if r.event == event]
        return found


def accept() -> Callable[[list[Stream]], Behaviour]:
    """The upstream answers: the flow gets one end, ``peers`` the other."""

    def make(peers: list[Stream]) -> Behaviour:
        async def behave() -> Stream:
            mine, theirs = trio.testing.memory_stream_pair()
            peers.append(theirs)
            return mine

        return behave

    return make


def fail(exc: BaseException) -> Callable[[list[Stream]], Behaviour]:
    def make(peers: list[Stream]) -> Behaviour:
        async def behave() -> Stream:
            raise exc

        return behave

    return make


def hang() -> Callable[[list[Stream]], Behaviour]:
    """Never answers (a black-holed SYN): only a deadline ends it."""

    def make(peers: list[Stream]) -> Behaviour:
        async def behave() -> Stream:
            await trio.sleep_forever()
            raise AssertionError("unreachable")

        return behave

    return make


@dataclass
class Dialed:
    dst: SocketAddr
    src_ip: IPAddress | None
    transparent: bool


class FakeNet:
    """``FlowDeps.dial``: scripted per destination; unscripted destinations accept."""

    def __init__(self) -> None:
        self.script: dict[SocketAddr, Callable[[list[Stream]], Behaviour]] = {}
        self.dials: list[Dialed] = []
        self.peers: list[Stream] = []  # the app's ends, in dial order

    async def dial(
        self, dst: SocketAddr, *, src_ip: IPAddress | None = None, transparent: bool = False
    ) -> Stream:
        self.dials.append(Dialed(dst, src_ip, transparent))
        return await self.script.get(dst, accept())(self.peers)()


@dataclass
class Opened:
    key: PoolKey
    authority: str
    headers: list[tuple[str, str]]


class FakePool:
    """``FlowDeps.open_hbone``: every CONNECT recorded; accepts unless scripted."""

    def __init__(self) -> None:
        self.behaviour: Callable[[list[Stream]], Behaviour] = accept()
        self.opened: list[Opened] = []
        self.peers: list[Stream] = []  # the remote agent's ends

    async def open_stream(
        self, key: PoolKey, authority: str, headers: Iterable[tuple[str, str]] = ()
    ) -> Stream:
        self.opened.append(Opened(key, authority, list(headers)))
        return await self.behaviour(self.peers)()


class FakeServerStream(trio.abc.HalfCloseableStream):
    """An inbound CONNECT stream: ``respond`` is recorded, bytes go through a memory pair."""

    def __init__(self) -> None:
        self._mine, self.client = trio.testing.memory_stream_pair()
        self.responses: list[tuple[int, list[tuple[str, str]]]] = []

    async def respond(self, status: int, headers: Iterable[tuple[str, str]] = ()) -> None:
        self.responses.append((status, list(headers)))

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self._mine.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self._mine.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        await self._mine.send_eof()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        return await self._mine.receive_some(max_bytes)

    async def aclose(self) -> None:
        await self._mine.aclose()


async def no_certificate(identity: Identity) -> WorkloadCertificate:
    raise AssertionError("the flows under test never fetch certificates")


async def no_hbone_server(
    tls: trio.abc.Stream, handler: Handler, *, on_limit: OnLimit | None = None
) -> None:
    raise AssertionError("the flows under test never serve HBONE connections")


@dataclass
class Bench:
    """One proxied workload (``local``) and everything its flows touch."""

    local: Workload = CLIENT
    workloads: tuple[Workload, ...] = (CLIENT, SERVER, PLAIN)
    services: tuple[Service, ...] = (ECHO, EMPTY)
    policies: tuple[Authorization, ...] = ()
    ports: AgentPorts = field(default_factory=AgentPorts)
    transparent: bool = False
    known: bool = True  # whether the state names ``local``
    store: StateStore = field(default_factory=StateStore)
    log: RecordingLog = field(default_factory=RecordingLog)
    metrics: Metrics = field(default_factory=lambda: Metrics(process_metrics=False))
    net: FakeNet = field(default_factory=FakeNet)
    pool: FakePool = field(default_factory=FakePool)

    def __post_init__(self) -> None:
        known = (
            self.workloads if self.known else tuple(w for w in self.workloads if w != self.local)
        )
        self.store.replace_all(known, self.services, self.policies)
        self.tracker = ConnectionTracker(self.metrics, self.log, clock=trio.current_time)
        info = WorkloadInfo(self.local.namespace, self.local.name, self.local.service_account)
        local = self.local

        async def local_workload() -> Workload:
            return await wait_for_workload(self.store, info)

        self.deps = FlowDeps(
            store=self.store,
            tracker=self.tracker,
            settings=FlowSettings(
                proxy_uid=local.uid, ports=self.ports, transparent=self.transparent
            ),
            local_workload=local_workload,
            dial=self.net.dial,
            open_hbone=self.pool.open_stream,
            certificate=no_certificate,
            serve_hbone=no_hbone_server,
            rng=random.Random(7),
        )

    def metric(self, name: str, **labels: str) -> float:
        text = self.metrics.exposition().decode()
        found = [
            s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
            if s.name == name and labels.items() <= s.labels.items()
        ]
        return sum(found)

    def labels(self, name: str) -> list[dict[str, str]]:
        text = self.metrics.exposition().decode()
        return [
            s.labels
            for family in text_string_to_metric_families(text)
            for s in family.samples
            if s.name == name
        ]


def connect_request(authority: str, *headers: tuple[str, str]) -> ConnectRequest:
    return ConnectRequest(1, "CONNECT", authority, tuple(headers))


async def read_until_eof(stream: trio.abc.ReceiveStream) -> bytes:
    data = b""
    while chunk := await stream.receive_some(65536):
        data += chunk
    return data


@asynccontextmanager
async def bounded() -> AsyncIterator[trio.Nursery]:
    """A nursery with a (virtual-time) deadline: a flow that hangs fails the test at once
    instead of waiting for pytest-timeout (autojump never fires without a deadline)."""
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            yield nursery
