"""The ZDS client against a fake istio-cni written here (SOCK_SEQPACKET, real fds over
SCM_RIGHTS): Hello, snapshot and reconcile, Add/Del, idempotent Add, NACKs on bad fd
counts and types and on protocol errors, start outcomes, reconnect, no fd leaks."""

from __future__ import annotations

import array
import os
import secrets
import socket
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio
import trio.lowlevel

from ztunnel.model.pod import PodSnapshot
from ztunnel.proto import zds_pb2
from ztunnel.redirect.netns import create_named, delete_named
from ztunnel.sources.zds import ZdsClient

# --- the fake istio-cni node agent -------------------------------------------------------


def add(uid: str, name: str, ns: str = "default", sa: str = "sa") -> zds_pb2.WorkloadRequest:
    info = zds_pb2.WorkloadInfo(name=name, namespace=ns, service_account=sa)
    return zds_pb2.WorkloadRequest(add=zds_pb2.AddWorkload(uid=uid, workload_info=info))


def delete(uid: str) -> zds_pb2.WorkloadRequest:
    return zds_pb2.WorkloadRequest(**{"del": zds_pb2.DelWorkload(uid=uid)})


def keep(uid: str) -> zds_pb2.WorkloadRequest:
    return zds_pb2.WorkloadRequest(keep=zds_pb2.KeepWorkload(uid=uid))


SNAPSHOT = zds_pb2.WorkloadRequest(snapshot_sent=zds_pb2.SnapshotSent())


@dataclass
class CniConn:
    sock: trio.socket.SocketType

    async def hello(self) -> zds_pb2.ZdsHello:
        with trio.fail_after(5):
            return zds_pb2.ZdsHello.FromString(await self.sock.recv(1024))

    async def send(self, request: zds_pb2.WorkloadRequest, fds: tuple[int, ...] = ()) -> str:
        """Send one request (with fds) and return the Ack's error ("" = ACK), as CNI does."""
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        await self.sock.sendmsg([request.SerializeToString()], anc)
        with trio.fail_after(5):
            response = zds_pb2.WorkloadResponse.FromString(await self.sock.recv(1024))
        return response.ack.error

    async def closed_by_peer(self) -> bool:
        with trio.fail_after(5):
            return await self.sock.recv(1024) == b""


class FakeCni:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.listener = trio.socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.conns: list[CniConn] = []

    def close(self) -> None:
        for conn in self.conns:
            conn.sock.close()
        self.listener.close()

    async def start(self) -> None:
        await self.listener.bind(str(self.path))
        self.listener.listen(5)

    async def accept(self) -> CniConn:
        with trio.fail_after(10):
            conn, _ = await self.listener.accept()
        cni = CniConn(conn)
        self.conns.append(cni)
        assert (await cni.hello()).version == zds_pb2.V1
        return cni


@dataclass
class Env:
    cni: FakeCni
    client: ZdsClient
    snapshots: AsyncIterator[PodSnapshot]

    async def snapshot_where(self, check: Callable[[PodSnapshot], bool]) -> PodSnapshot:
        with trio.fail_after(5):
            while True:
                snap = await anext(self.snapshots)
                if check(snap):
                    return snap


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def own_netns_fds() -> int:
    """How many of our fds point at our own network namespace."""
    target = os.readlink("/proc/self/ns/net")
    count = 0
    for name in os.listdir("/proc/self/fd"):
        try:
            count += os.readlink(f"/proc/self/fd/{name}") == target
        except OSError:
            continue
    return count


@pytest.fixture
async def make_env(tmp_path: Path) -> AsyncIterator[Callable[..., trio.abc.AsyncResource]]:
    envs: list[Env] = []
    async with trio.open_nursery() as nursery:

        async def make(**kw: object) -> Env:
            cni = FakeCni(tmp_path / f"ztunnel-{len(envs)}.sock")
            await cni.start()
            client = ZdsClient(cni.path, node="node1", initial_backoff=0.01, **kw)  # type: ignore[arg-type]
            await nursery.start(client.run)
            env = Env(cni, client, client.snapshots())
            envs.append(env)
            return env

        yield make  # type: ignore[misc]
        nursery.cancel_scope.cancel()
    for env in envs:
        env.cni.close()


def own_netns() -> int:
    """An fd of our own network namespace (readable without root)."""
    return os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)


@contextmanager
def netns_fds(count: int) -> Iterator[list[int]]:
    """``count`` fresh network namespaces (root), as fds; deleted afterwards."""
    names = [f"zdstest-{secrets.token_hex(4)}" for _ in range(count)]
    handles = []
    try:
        for name in names:
            handles.append(create_named(name))
        yield [h.fd for h in handles]
    finally:
        for h in handles:
            h.close()
        for name in names:
            delete_named(name)


def _ident(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return (st.st_dev, st.st_ino)


# --- tests ---------------------------------------------------------------------------------


@pytest.mark.root
async def test_snapshot_add_del_with_real_netns(make_env: Callable[..., object]) -> None:
    env: Env = await make_env()  # type: ignore[misc]
    with netns_fds(2) as (a, b):
        cni = await env.cni.accept()
        assert not env.client.ready
        assert await cni.send(add("uid-a", "pod-a"), (a,)) == ""
        assert await cni.send(add("uid-b", "pod-b"), (b,)) == ""
        assert not env.client.ready  # no SnapshotSent yet
        assert await cni.send(SNAPSHOT) == ""
        snap = await env.snapshot_where(lambda s: len(s.pods) == 2)
        assert env.client.ready
        by_name = {p.name: p for p in snap.pods}
        pod_a = by_name["pod-a"]
        assert pod_a.uid == "Kubernetes//Pod/default/pod-a" and pod_a.k8s_uid == "uid-a"
        assert pod_a.in_mesh and pod_a.node == "node1" and pod_a.service_account == "sa"
        assert pod_a.netns is not None and pod_a.netns.path.startswith("/proc/self/fd/")
        # the fd we hold is the pod's netns (not the sender's fd number)
        assert _ident(pod_a.netns.path) == _ident(f"/proc/self/fd/{a}")
        # Del: the pod leaves at once; its fd is closed once the consumer moved on
        held_path = by_name["pod-b"].netns.path  # type: ignore[union-attr]
        assert await cni.send(delete("uid-b")) == ""
        snap = await env.snapshot_where(lambda s: len(s.pods) == 1)
        assert [p.name for p in snap.pods] == ["pod-a"]
        await trio.lowlevel.checkpoint()
        task = trio.lowlevel.current_task()
        assert task is not None
        with trio.move_on_after(0.05):
            await anext(env.snapshots)  # asking again releases pod-b's fd
        gone = not os.path.exists(held_path)  # noqa: ASYNC240 (procfs, never blocks)
        assert gone or _ident(held_path) != _ident(f"/proc/self/fd/{b}")


@pytest.mark.root
async def test_reconnect_reconciles_and_add_is_idempotent(make_env: Callable[..., object]) -> None:
    env: Env = await make_env()  # type: ignore[misc]
    with netns_fds(3) as (a, b, c):
        cni = await env.cni.accept()
        for uid, fd in (("uid-a", a), ("uid-b", b), ("uid-c", c)):
            assert await cni.send(add(uid, uid.replace("uid", "pod")), (fd,)) == ""
        assert await cni.send(SNAPSHOT) == ""
        first = await env.snapshot_where(lambda s: len(s.pods) == 3)
        paths = {p.name: p.netns.path for p in first.pods}  # type: ignore[union-attr]
        cni.sock.close()  # istio-cni restarts
        cni = await env.cni.accept()
        assert not env.client.ready
        before = open_fds()
        assert await cni.send(add("uid-a", "pod-a"), (a,)) == ""  # same netns: idempotent
        assert await cni.send(keep("uid-c")) == ""  # CNI lost c's netns but keeps it
        assert open_fds() == before  # the duplicate fd was closed (nothing else changes)
        assert await cni.send(SNAPSHOT) == ""
        snap = await env.snapshot_where(lambda s: len(s.pods) == 2)
        assert sorted(p.name for p in snap.pods) == ["pod-a", "pod-c"]
        assert {p.name: p.netns.path for p in snap.pods}["pod-a"] == paths["pod-a"]  # type: ignore[union-attr]
        assert env.client.ready
        # a recreated sandbox: same uid, another netns replaces the pod's fd
        assert await cni.send(add("uid-a", "pod-a"), (b,)) == ""
        snap = await env.snapshot_where(
            lambda s: {p.name: p.netns.path for p in s.pods}["pod-a"] != paths["pod-a"]  # type: ignore[union-attr]
        )
        new_path = {p.name: p.netns.path for p in snap.pods}["pod-a"]  # type: ignore[union-attr]
        assert _ident(new_path) == _ident(f"/proc/self/fd/{b}")


@pytest.mark.parametrize(
    ("request_", "nfds", "problem"),
    [
        (add("u", "p"), 0, "exactly 1 fd, got 0"),
        (add("u", "p"), 2, "exactly 1 fd, got 2"),
        (delete("u"), 1, "unexpected fd(s) with del"),
        (SNAPSHOT, 1, "unexpected fd(s) with snapshot_sent"),
    ],
)
async def test_bad_fd_counts_are_nacked_and_closed(
    make_env: Callable[..., object], request_: zds_pb2.WorkloadRequest, nfds: int, problem: str
) -> None:
    env: Env = await make_env()  # type: ignore[misc]
    cni = await env.cni.accept()
    fds = [own_netns() for _ in range(nfds)]
    try:
        before = own_netns_fds()
        error = await cni.send(request_, tuple(fds))
        assert error.startswith("failure to read message: ") and problem in error
        assert await cni.closed_by_peer()  # a read failure ends the stream
        assert own_netns_fds() == before  # every received fd was closed
    finally:
        for fd in fds:
            os.close(fd)
    assert env.client.state.pods == {}


async def test_an_fd_that_is_not_a_netns_is_nacked(make_env: Callable[..., object]) -> None:
    env: Env = await make_env()  # type: ignore[misc]
    cni = await env.cni.accept()
    fd = os.open("/dev/null", os.O_RDONLY)
    try:
        error = await cni.send(add("u", "p"), (fd,))
    finally:
        os.close(fd)
    assert "not a namespace" in error
    assert env.client.state.pods == {}


async def test_own_netns_fd_is_accepted(make_env: Callable[..., object]) -> None:
    """Without root: our own netns is a real netns fd (NS_GET_NSTYPE says CLONE_NEWNET)."""
    env: Env = await make_env()  # type: ignore[misc]
    cni = await env.cni.accept()
    fd = own_netns()
    try:
        assert await cni.send(add("u", "p"), (fd,)) == ""
        assert await cni.send(SNAPSHOT) == ""
    finally:
        os.close(fd)
    snap = await env.snapshot_where(lambda s: len(s.pods) == 1)
    assert _ident(snap.pods[0].netns.path) == _ident("/proc/self/ns/net")  # type: ignore[union-attr]
    assert env.client.ready


@pytest.mark.parametrize(
    ("script", "problem"),
    [
        ([SNAPSHOT, SNAPSHOT], "a second SnapshotSent"),
        ([SNAPSHOT, keep("u")], "KeepWorkload after SnapshotSent"),
        ([add("", "p")], "needs a uid"),
    ],
)
async def test_protocol_errors_nack_and_end_the_stream(
    make_env: Callable[..., object], script: list[zds_pb2.WorkloadRequest], problem: str
) -> None:
    env: Env = await make_env()  # type: ignore[misc]
    cni = await env.cni.accept()
    fd = own_netns()
    try:
        *ok, last = script
        for request in ok:
            assert await cni.send(request) == ""
        fds = (fd,) if last.WhichOneof("payload") == "add" else ()
        error = await cni.send(last, fds)
    finally:
        os.close(fd)
    assert error.startswith("failure to process message: ") and problem in error
    assert await cni.closed_by_peer()
    # the client comes back
    await env.cni.accept()


async def test_start_outcome_decides_the_ack_and_readiness(make_env: Callable[..., object]) -> None:
    env: Env = await make_env(report_starts=True)  # type: ignore[misc]
    cni = await env.cni.accept()
    fd = own_netns()
    try:
        async with trio.open_nursery() as nursery:

            async def controller(fail: str | None) -> None:
                snap = await env.snapshot_where(lambda s: len(s.pods) == 1)
                env.client.report(snap.pods[0].uid, fail)

            nursery.start_soon(controller, "bind 15008: address in use")
            error = await cni.send(add("u", "p"), (fd,))
        assert error == "failure to start proxy: bind 15008: address in use"
        assert await cni.send(SNAPSHOT) == ""
        assert env.client.not_ready_reason() == "proxies not started: Kubernetes//Pod/default/p"
        # the controller's retry succeeds later
        env.client.report("Kubernetes//Pod/default/p", None)
        assert env.client.ready
    finally:
        os.close(fd)


async def test_start_not_reported_in_time_is_nacked(make_env: Callable[..., object]) -> None:
    env: Env = await make_env(report_starts=True, start_timeout=0.1)  # type: ignore[misc]
    cni = await env.cni.accept()
    fd = own_netns()
    try:
        error = await cni.send(add("u", "p"), (fd,))
    finally:
        os.close(fd)
    assert error == "failure to start proxy: not reported in time"


async def test_reconnects_until_istio_cni_listens(tmp_path: Path) -> None:
    path = tmp_path / "late.sock"
    client = ZdsClient(path, initial_backoff=0.01, max_backoff=0.05)
    async with trio.open_nursery() as nursery:
        await nursery.start(client.run)
        with trio.fail_after(5):  # a refused attempt, then "not ready" is a real answer
            while client.last_error is None:  # noqa: ASYNC110 (polling a flag of the client)
                await trio.sleep(0.01)
        assert not client.ready
        assert "not connected" in (client.not_ready_reason() or "")
        assert "connect" in client.last_error
        cni = FakeCni(path)
        await cni.start()
        conn = await cni.accept()
        assert await conn.send(SNAPSHOT) == ""
        assert client.ready
        conn.sock.close()
        with trio.fail_after(5):
            while client.connected:  # noqa: ASYNC110 (polling a flag of the client)
                await trio.sleep(0.01)
        assert not client.ready  # not ready while disconnected
        nursery.cancel_scope.cancel()
    cni.close()


async def test_fds_are_closed_when_the_client_stops(tmp_path: Path) -> None:
    cni = FakeCni(tmp_path / "z.sock")
    await cni.start()
    client = ZdsClient(cni.path)
    fd = own_netns()
    before = own_netns_fds()
    async with trio.open_nursery() as nursery:
        await nursery.start(client.run)
        conn = await cni.accept()
        assert await conn.send(add("u", "p"), (fd,)) == ""
        assert own_netns_fds() == before + 1  # the client holds the pod's netns
        nursery.cancel_scope.cancel()
    assert own_netns_fds() == before  # and lets it go when it stops
    os.close(fd)
    cni.close()


async def test_re_add_of_a_failed_pod_is_retried(make_env: Callable[..., object]) -> None:
    env: Env = await make_env(report_starts=True)  # type: ignore[misc]
    cni = await env.cni.accept()
    fd = own_netns()
    outcomes = iter(["bind failed", None])
    try:
        async with trio.open_nursery() as nursery:

            async def controller() -> None:
                async for snap in env.client.snapshots():
                    for pod in snap.pods:
                        env.client.report(pod.uid, next(outcomes))

            nursery.start_soon(controller)
            assert await cni.send(add("u", "p"), (fd,)) == "failure to start proxy: bind failed"
            # istio-cni sends the Add again: the same netns, and this time it starts
            assert await cni.send(add("u", "p"), (fd,)) == ""
            nursery.cancel_scope.cancel()
    finally:
        os.close(fd)


@pytest.mark.parametrize(
    ("raw", "problem"),
    [
        (b"\xff\xff\xff\xff", "undecodable"),
        (b"", "without a payload"),  # an empty message is a request with no payload
        (b"\x0a" + b"\x80" * 2000, "truncated"),  # longer than the 1024-byte buffer
    ],
)
async def test_unreadable_messages_are_nacked(
    make_env: Callable[..., object], raw: bytes, problem: str
) -> None:
    env: Env = await make_env()  # type: ignore[misc]
    cni = await env.cni.accept()
    fd = own_netns()
    try:
        # an fd rides along so an empty datagram is still a message
        await cni.sock.sendmsg(
            [raw], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))]
        )
        with trio.fail_after(5):
            error = zds_pb2.WorkloadResponse.FromString(await cni.sock.recv(1024)).ack.error
    finally:
        os.close(fd)
    assert error.startswith("failure to read message: ") and problem in error
    assert await cni.closed_by_peer()
