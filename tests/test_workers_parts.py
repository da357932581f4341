"""The worker machinery piece by piece, without processes: count, framing and channel,
state replication, telemetry relaying, certificates."""

from __future__ import annotations

import datetime
import os
import socket
from ipaddress import ip_address
from pathlib import Path

import pytest
import trio
from test_state_store import policy, svc, wl

from ztunnel.identity.ca import FakeCA
from ztunnel.identity.errors import CAError
from ztunnel.model.address import SocketAddr
from ztunnel.model.authorization import Scope
from ztunnel.model.identity import Identity
from ztunnel.model.outcome import Failure, FailureKind, ResponseFlag
from ztunnel.state.store import StateStore
from ztunnel.telemetry.connections import ConnectionInfo, ConnectionTracker
from ztunnel.telemetry.metrics import Metrics
from ztunnel.workers import count, replica
from ztunnel.workers.certs import RemoteCertificates, material_of
from ztunnel.workers.channel import Channel, ChannelClosed
from ztunnel.workers.protocol import (
    HEADER,
    FrameDecoder,
    ProtocolError,
    StateDelta,
    Telemetry,
    encode,
)
from ztunnel.workers.telemetry import RelayTracker, TelemetryMirror

# -- how many workers --------------------------------------------------------------------


def test_worker_count_is_a_number_or_a_share_of_the_cpu_quota() -> None:
    assert count.resolve("3", lambda: 8) == 3
    assert count.resolve("50%", lambda: 8) == 4
    assert count.resolve("10%", lambda: 2) == 1  # rounded up, at least one
    assert count.resolve(None, lambda: 6) == 6
    for bad in ("0", "-1", "101%", "two", "%"):
        with pytest.raises(ValueError):
            count.parse_spec(bad)


def _cgroup(root: Path, path: str, name: str, text: str) -> None:
    directory = root.joinpath(*[p for p in path.split("/") if p])
    directory.mkdir(parents=True, exist_ok=True)
    (directory / name).write_text(text)


def test_cpu_quota_reads_the_tightest_cgroup_limit(tmp_path: Path) -> None:
    # v2: cpu.max of the cgroup and its parents; "max" means no limit.
    _cgroup(tmp_path, "/kubepods/pod1/ztunnel", "cpu.max", "150000 100000\n")
    _cgroup(tmp_path, "/kubepods/pod1", "cpu.max", "max 100000\n")
    _cgroup(tmp_path, "/kubepods", "cpu.max", "400000 100000\n")
    limit = count.cgroup_cpu_limit(tmp_path, "0::/kubepods/pod1/ztunnel\n")
    assert limit == 1.5
    assert count.cgroup_cpu_limit(tmp_path, "0::/elsewhere\n") is None
    # v1: cfs quota / period; -1 means no limit.
    v1 = tmp_path / "v1"
    _cgroup(v1 / "cpu,cpuacct", "/pod", "cpu.cfs_quota_us", "250000\n")
    _cgroup(v1 / "cpu,cpuacct", "/pod", "cpu.cfs_period_us", "100000\n")
    _cgroup(v1 / "cpu,cpuacct", "/", "cpu.cfs_quota_us", "-1\n")
    _cgroup(v1 / "cpu,cpuacct", "/", "cpu.cfs_period_us", "100000\n")
    assert count.cgroup_cpu_limit(v1, "4:cpu,cpuacct:/pod\n3:memory:/pod\n") == 2.5
    proc = tmp_path / "cgroup"
    proc.write_text("0::/kubepods/pod1/ztunnel\n")
    assert count.cpu_quota(tmp_path, str(proc)) == min(2, len(os.sched_getaffinity(0)))


# -- framing and the channel -------------------------------------------------------------


def test_frames_come_out_whole_however_the_bytes_arrive() -> None:
    messages = [("a", 1), {"big": b"x" * 200_000}, StateDelta(removed_policies=("ns/p",))]
    wire = b"".join(encode(m) for m in messages)
    decoder = FrameDecoder()
    out = []
    for i in range(0, len(wire), 777):  # arbitrary chunking
        decoder.feed(wire[i : i + 777])
        out += [m for m, _ in decoder.frames()]
    assert out == messages


def test_garbage_is_a_protocol_error_not_a_crash() -> None:
    decoder = FrameDecoder()
    decoder.feed(HEADER.pack(2**31, 0))
    with pytest.raises(ProtocolError):
        decoder.frames()
    decoder = FrameDecoder()
    decoder.feed(HEADER.pack(3, 0) + b"\x80\x05X")  # a truncated pickle
    with pytest.raises(ProtocolError):
        decoder.frames()
    decoder = FrameDecoder()
    decoder.feed(encode("needs an fd", 1))  # the descriptor never arrived
    with pytest.raises(ProtocolError):
        decoder.frames()


async def test_channel_carries_messages_and_descriptors_in_order(tmp_path: Path) -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    left, right = Channel(a), Channel(b)
    (tmp_path / "f").write_text("passed along")
    fd = os.open(tmp_path / "f", os.O_RDONLY)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(left.run_writer)
            left.post("first")
            left.post("with fd", [fd])
            os.close(fd)  # the channel sends its own duplicate
            left.post(b"y" * 1_000_000)  # larger than the socket buffer
            assert await right.receive() == ("first", [])
            message, fds = await right.receive()
            assert message == "with fd" and len(fds) == 1
            assert os.read(fds[0], 100) == b"passed along"
            os.close(fds[0])
            assert await right.receive() == (b"y" * 1_000_000, [])
            left.finish()
        left.close()
        with pytest.raises(ChannelClosed):
            await right.receive()
    finally:
        left.close()
        right.close()


# -- state -------------------------------------------------------------------------------


def _same_state(a: StateStore, b: StateStore) -> bool:
    return (a.workloads(), a.services(), a.policies()) == (
        b.workloads(),
        b.services(),
        b.policies(),
    )


def test_a_replica_follows_the_store_through_deltas() -> None:
    source, copy = StateStore(), StateStore()
    mirror = replica.StateMirror(source)
    source.replace_all([wl("a", "10.0.0.1")], [svc()], [policy("p", Scope.NAMESPACE)])
    replica.apply(copy, mirror.snapshot())
    replica.apply(copy, mirror.delta())
    assert _same_state(source, copy)

    # Upserts and removals of every kind; endpoints follow the workloads' service maps.
    source.upsert_workload(
        wl("b", "10.0.0.2", services={"ns/web.ns.svc.cluster.local": {80: 8080}})
    )
    source.remove_policy("ns/p")
    source.upsert_policy(policy("q", Scope.GLOBAL))
    source.upsert_service(svc("api", vip="10.96.0.2"))
    delta = mirror.delta()
    assert {w.name for w in delta.workloads} == {"b"} and delta.removed_policies == ("ns/p",)
    notified: list[object] = []
    copy.subscribe(notified.append)
    replica.apply(copy, delta)
    assert _same_state(source, copy) and len(notified) == 1  # one change, one notification
    assert copy.service_by_vip(ip_address("10.96.0.1")) is not None
    assert len(copy.service_by_key("ns/web.ns.svc.cluster.local").endpoints) == 1  # type: ignore[union-attr]

    source.remove_workload("c//Pod/ns/a")
    replica.apply(copy, mirror.delta())
    assert _same_state(source, copy)
    # Nothing changed, or the same state re-applied from re-parsed input: nothing to send.
    assert not mirror.delta()
    source.replace_all(
        [wl("b", "10.0.0.2", services={"ns/web.ns.svc.cluster.local": {80: 8080}})],
        [svc(), svc("api", vip="10.96.0.2")],
        [policy("q", Scope.GLOBAL)],
    )
    assert not mirror.delta()
    # A snapshot rebuilds a fresh replica (a restarted worker).
    fresh = StateStore()
    replica.apply(fresh, mirror.snapshot())
    assert _same_state(source, fresh)


# -- telemetry ---------------------------------------------------------------------------

INFO = ConnectionInfo(
    direction="inbound",
    reporter="destination",
    src_addr=SocketAddr(ip_address("10.0.0.1"), 40000),
    dst_addr=SocketAddr(ip_address("10.0.0.2"), 8080),
    dst_workload=wl("b", "10.0.0.2"),
    security_policy="mutual_tls",
    proxy_uid="ns/b",
)


def _sample(metrics: Metrics, name: str, **labels: str) -> float:
    total = 0.0
    for family in metrics.registry.collect():
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


async def test_relayed_connection_events_keep_the_control_books_whole() -> None:
    batches: list[Telemetry] = []
    clock = [100.0]
    relay = RelayTracker(batches.append, clock=lambda: clock[0])
    metrics = Metrics(process_metrics=False)
    books = ConnectionTracker(metrics, clock=lambda: clock[0])
    mirror = TelemetryMirror(books)

    conn = relay.open(INFO)
    conn.add_received(100)
    for _ in range(1000):  # many chunks: one byte-total entry per batch
        conn.add_sent(10)
    relay.flush()
    assert len(batches) == 1 and len(batches[0].events) == 2
    mirror.apply(7, batches.pop())
    (mirrored,) = books.open_connections()
    assert (mirrored.bytes_sent, mirrored.bytes_received) == (10_000, 100)
    assert _sample(metrics, "istio_tcp_sent_bytes_total") == 10_000
    assert relay.open_connections() == [conn]  # the worker's own policy watcher sees it

    clock[0] = 102.5
    conn.add_sent(5)
    conn.close(Failure(FailureKind.POLICY_CUT, "no longer allowed"))
    relay.connection_failed(
        INFO.src_addr, INFO.dst_addr, "inbound", Failure(FailureKind.DENIED, "x")
    )
    relay.flush()
    mirror.apply(7, batches.pop())
    assert books.open_connections() == [] and relay.open_connections() == []
    assert _sample(metrics, "istio_tcp_connections_closed_total", response_flags="DENY") == 1
    assert _sample(metrics, "istio_tcp_sent_bytes_total") == 10_005
    closed, refused = list(books.history)
    assert closed.log["duration"] == "2500ms"  # from the worker's open, not the report
    assert refused.outcome == "denied"
    relay.flush()
    assert batches == []  # nothing new, nothing posted


def test_limit_hits_of_a_worker_reach_the_control_metrics() -> None:
    """The flows count limit hits on ``tracker.metrics`` themselves: in a worker process
    they must reach the control process's ``ztunnel_limit_hits_total``, not stay behind."""
    batches: list[Telemetry] = []
    relay = RelayTracker(batches.append)
    metrics = Metrics(process_metrics=False)
    mirror = TelemetryMirror(ConnectionTracker(metrics))
    relay.metrics.limit_hit("ping")
    relay.metrics.limit_hit("penalty")
    relay.metrics.limit_hit("ping")
    relay.flush()
    mirror.apply(1, batches.pop())
    assert _sample(metrics, "ztunnel_limit_hits_total", limit="ping") == 2
    assert _sample(metrics, "ztunnel_limit_hits_total", limit="penalty") == 1


def test_connections_of_an_exited_worker_are_closed_in_the_books() -> None:
    batches: list[Telemetry] = []
    relay = RelayTracker(batches.append)
    books = ConnectionTracker(Metrics(process_metrics=False))
    mirror = TelemetryMirror(books)
    relay.open(INFO)
    relay.open(INFO)
    relay.flush()
    mirror.apply(1, batches.pop())
    assert mirror.open_count(1) == 2
    assert mirror.worker_gone(1, "killed by SIGKILL") == 2
    assert books.open_connections() == []
    assert all(e.log["error"] == "worker process exited (killed by SIGKILL)" for e in books.history)
    assert ResponseFlag.NONE.value == "-"


# -- certificates ------------------------------------------------------------------------

IDENTITY = Identity("cluster.local", "ns", "sa")


async def test_remote_certificates_ask_once_and_take_rotations() -> None:
    ca = FakeCA.ephemeral()
    first = ca.workload_certificate(IDENTITY)
    asked: list[Identity] = []
    answer = trio.Event()

    async def ask(identity: Identity) -> object:
        asked.append(identity)
        await answer.wait()
        return material_of(first)

    certs = RemoteCertificates(ask)  # type: ignore[arg-type]
    rotations: list[int] = []
    certs.subscribe(lambda _identity, cert: rotations.append(cert.serial))
    got: list[int] = []

    async def fetch() -> None:
        got.append((await certs.fetch(IDENTITY)).serial)

    async with trio.open_nursery() as nursery:
        for _ in range(5):
            nursery.start_soon(fetch)
        await trio.sleep(0.01)
        answer.set()
    assert asked == [IDENTITY] and got == [first.serial] * 5  # one request for five fetches

    later = ca.workload_certificate(
        IDENTITY, not_before=first.not_before + datetime.timedelta(seconds=5)
    )
    certs.update(material_of(later))
    assert (await certs.fetch(IDENTITY)).serial == later.serial
    certs.update(material_of(first))  # an older one arriving late changes nothing
    assert (await certs.fetch(IDENTITY)).serial == later.serial
    assert rotations == [first.serial, later.serial]


async def test_a_refused_certificate_is_an_error_for_the_flow() -> None:
    async def ask(identity: Identity) -> object:
        raise CAError("CA unreachable")

    certs = RemoteCertificates(ask)  # type: ignore[arg-type]
    with pytest.raises(CAError, match="unreachable"):
        await certs.fetch(IDENTITY)
    with pytest.raises(CAError):  # no stale flight left behind
        await certs.fetch(IDENTITY)
