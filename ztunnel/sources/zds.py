"""The ZDS client: pods (and their netns fds) from istio-cni over ``INPOD_UDS``.

A pod source like the Kubernetes one, for running under a real istio-cni, which
decides enrollment and installs the redirection (use ``NoRedirector``). Theory of
operation: ``run`` connects to the SOCK_SEQPACKET socket (retrying 20 ms doubling to
15 s), says Hello, then answers every message with one Ack as ``ZdsState`` decides.
Each datagram is at most 1024 bytes; a netns fd arrives as SCM_RIGHTS and is checked
(exactly one, only with Add, really a network namespace) before it is used. A message
we cannot read, or a protocol error, is NACKed and the stream ends (reconnect).

Every change of the pod set is published as a ``PodSnapshot`` (newest wins) on
``snapshots()``; each pod's netns is ``/proc/self/fd/<n>`` for the fd this client
holds. With ``report_starts``, an Add is acknowledged only once the consumer reported
the pod's proxy start (``report``): a failure is NACKed "failure to start proxy: ..."
and the pod counts as pending (not ready) until a later report says it started.

Readiness (``ready``): connected, the snapshot received, nothing pending.
"""

from __future__ import annotations

import array
import contextlib
import ctypes
import errno
import fcntl
import os
import socket
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import structlog
import trio

from ztunnel.model.identity import DEFAULT_CLUSTER_ID
from ztunnel.model.pod import PodSnapshot
from ztunnel.proto import zds_pb2
from ztunnel.sources.zds_protocol import (
    NetnsIdent,
    ProtocolError,
    ReadError,
    ZdsState,
    ack,
    check_fds,
    decode_request,
    hello,
)

LOGGER = structlog.get_logger("ztunnel.zds")

DEFAULT_UDS = "/var/run/ztunnel/ztunnel.sock"
MAX_MESSAGE = 1024
MAX_FDS = 16  # room to receive (and close) a few too many
INITIAL_BACKOFF = 0.01  # doubled before each wait: 20 ms, 40 ms, ... 15 s (ztunnel's)
MAX_BACKOFF = 15.0
START_TIMEOUT = 4.0  # istio-cni waits 5 s for each Ack

CLONE_NEWNET = 0x40000000
NS_GET_NSTYPE = 0xB703  # _IO(0xb7, 3)
NSFS_MAGIC = 0x6E736673
PROC_SUPER_MAGIC = 0x9FA0

_libc = ctypes.CDLL(None, use_errno=True)


def netns_ident(fd: int) -> NetnsIdent:
    """Raise ReadError unless ``fd`` is a network namespace; (dev, inode) if it is."""
    try:
        nstype = fcntl.ioctl(fd, NS_GET_NSTYPE)
    except OSError as exc:
        if exc.errno not in (errno.ENOTTY, errno.EINVAL):
            raise ReadError(f"netns fd check failed: {exc.strerror}") from exc
        _check_fs_type(fd)  # kernels before 4.11 have no NS_GET_NSTYPE
    else:
        if nstype != CLONE_NEWNET:
            raise ReadError(f"fd is a namespace of type {nstype:#x}, not a network namespace")
    try:
        st = os.fstat(fd)
    except OSError as exc:
        raise ReadError(f"netns fd unusable: {exc.strerror}") from exc
    return (st.st_dev, st.st_ino)


def _check_fs_type(fd: int) -> None:
    buf = ctypes.create_string_buffer(256)  # struct statfs; f_type is the first long
    if _libc.fstatfs(fd, buf) != 0:
        raise ReadError(f"fstatfs on the netns fd failed: {os.strerror(ctypes.get_errno())}")
    f_type = ctypes.c_long.from_buffer(buf).value
    if f_type not in (NSFS_MAGIC, PROC_SUPER_MAGIC):
        raise ReadError(f"fd is not a namespace (filesystem type {f_type:#x})")


def _fds(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            arr = array.array("i")
            arr.frombytes(data[: len(data) - len(data) % arr.itemsize])
            fds.extend(arr)
    return fds


def _close(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


@dataclass
class _Pending:
    """The proxy-start outcome an Add waits for."""

    generation: int
    done: trio.Event = field(default_factory=trio.Event)
    error: str | None = None


class ZdsClient:
    """istio-cni's pods as ``PodSnapshot``s (see the module docstring)."""

    def __init__(
        self,
        path: str | os.PathLike[str] = DEFAULT_UDS,
        *,
        cluster_id: str = DEFAULT_CLUSTER_ID,
        node: str = "",
        report_starts: bool = False,
        start_timeout: float = START_TIMEOUT,
        initial_backoff: float = INITIAL_BACKOFF,
        max_backoff: float = MAX_BACKOFF,
        check_netns: Callable[[int], NetnsIdent] = netns_ident,
    ) -> None:
        self.path = Path(path)
        self.state = ZdsState(cluster_id=cluster_id, node=node)
        self.report_starts = report_starts
        self.start_timeout = start_timeout
        self.initial_backoff = initial_backoff
        self.max_backoff = max_backoff
        self.check_netns = check_netns
        self.connected = False
        self.connections = 0
        self.nacks: list[str] = []  # every NACK sent, newest last (tests, debugging)
        self.last_error: str | None = None
        self._changed = trio.Event()
        self._consumed = 0  # the state version the consumer is done with
        self._waiting: dict[str, _Pending] = {}  # pod uid -> Add waiting for its start
        self._failed: dict[str, str] = {}  # pod uid -> why its proxy did not start

    # -- the consumer's side ----------------------------------------------------------

    async def snapshots(self) -> AsyncIterator[PodSnapshot]:
        """The newest pod set whenever it changed (the first one at once)."""
        seen = -1
        while True:
            # Asking for the next snapshot means the consumer is done with the last one.
            self._consumed = max(seen, 0)
            self._close_retired()
            while self.state.version == seen:
                await self._changed.wait()
            seen = self.state.version
            yield self.state.snapshot()

    def __aiter__(self) -> AsyncIterator[PodSnapshot]:
        """A ``PodSource`` (enroll/host.py): the snapshots."""
        return self.snapshots()

    def report(self, pod_uid: str, error: str | None) -> None:
        """The consumer's word on a pod's proxy: started (None) or why it did not."""
        if error is None:
            self._failed.pop(pod_uid, None)
        else:
            self._failed[pod_uid] = error
        waiting = self._waiting.get(pod_uid)
        if waiting is not None:
            waiting.error = error
            waiting.done.set()

    @property
    def ready(self) -> bool:
        return self.not_ready_reason() is None

    def not_ready_reason(self) -> str | None:
        if not self.connected:
            return f"not connected to istio-cni at {self.path}"
        if not self.state.snapshot_received:
            return "waiting for istio-cni's snapshot"
        held = {h.pod.uid for h in self.state.held()}
        pending = sorted(uid for uid in self._failed if uid in held)
        if pending:
            return f"proxies not started: {', '.join(pending)}"
        return None

    def dump(self) -> dict[str, object]:
        """The client's state for config_dump: the connection and every pod held."""
        return {
            "path": str(self.path),
            "connected": self.connected,
            "snapshotReceived": self.state.snapshot_received,
            "connections": self.connections,
            "nacks": len(self.nacks),
            "lastError": self.last_error,
            "notReady": self.not_ready_reason(),
            "pods": [
                {
                    "uid": h.pod.uid,
                    "cniUid": h.cni_uid,
                    "netns": {"dev": h.ident[0], "inode": h.ident[1]},
                    "failed": self._failed.get(h.pod.uid),
                }
                for h in self.state.held()
            ],
        }

    # -- the connection ---------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Connect and serve istio-cni until cancelled (then every fd is closed)."""
        task_status.started()
        backoff = self.initial_backoff
        try:
            while True:
                try:
                    sock = await self._connect()
                except OSError as exc:
                    self.last_error = f"connect {self.path}: {exc.strerror or exc}"
                    backoff = min(backoff * 2, self.max_backoff)
                    LOGGER.warning(
                        "istio-cni unreachable", error=self.last_error, retry_in=round(backoff, 2)
                    )
                    await trio.sleep(backoff)
                    continue
                backoff = self.initial_backoff
                with sock:
                    await self._serve(sock)
                await trio.sleep(backoff)
        finally:
            self.connected = False
            _close(self.state.release_all())

    async def _connect(self) -> trio.socket.SocketType:
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            await sock.connect(str(self.path))
        except BaseException:
            sock.close()
            raise
        return sock

    async def _serve(self, sock: trio.socket.SocketType) -> None:
        self.state.new_connection()
        self.connections += 1
        try:
            await sock.send(hello())
            self.connected = True
            self._changed_now()
            while True:
                data, fds, flags = await self._receive(sock)
                if data is None:
                    LOGGER.info("istio-cni closed the connection")
                    return
                if not await self._handle(sock, data, fds, flags):
                    return
        except OSError as exc:
            self.last_error = f"connection to istio-cni: {exc.strerror or exc}"
            LOGGER.warning("ZDS connection failed", error=str(self.last_error))
        finally:
            self.connected = False
            self._changed_now()

    async def _receive(self, sock: trio.socket.SocketType) -> tuple[bytes | None, list[int], int]:
        data, ancdata, flags, _ = await sock.recvmsg(
            MAX_MESSAGE, socket.CMSG_SPACE(MAX_FDS * 4), socket.MSG_CMSG_CLOEXEC
        )
        fds = _fds(ancdata)
        if not data and not fds:
            return None, [], 0
        return data, fds, flags

    async def _handle(self, sock: trio.socket.SocketType, data: bytes, fds: list[int],
                      flags: int) -> bool:  # fmt: skip
        """Process one message and send its Ack; False ends the stream."""
        try:
            if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
                raise ReadError("truncated message")
            request = decode_request(data)
            kind = request.WhichOneof("payload") or ""
            fd = check_fds(kind, fds)
            ident = self.check_netns(fd) if fd is not None else None
        except ReadError as exc:
            _close(fds)
            await self._nack(sock, f"failure to read message: {exc}")
            return False
        try:
            error = await self._apply(request, kind, fd, ident)
        except ProtocolError as exc:
            await self._nack(sock, f"failure to process message: {exc}")
            return False
        finally:
            self._close_retired()
        if error is not None:
            await self._nack(sock, error)
        else:
            await sock.send(ack())
        return True

    async def _apply(self, request: zds_pb2.WorkloadRequest, kind: str, fd: int | None,
                     ident: NetnsIdent | None) -> str | None:  # fmt: skip
        """Change the state; the NACK text for a pod whose proxy did not start."""
        if kind == "add":
            assert fd is not None and ident is not None
            outcome = self.state.add(request.add, fd, ident)
            if not outcome.started and outcome.pod.uid in self._failed:
                self.state.touch()  # a re-Add of a pod whose proxy failed: try it again now
            if outcome.started or outcome.pod.uid in self._failed:
                self._changed_now()
                return await self._await_start(outcome.pod.uid, outcome.generation)
            return None
        if kind == "keep":
            self.state.keep(request.keep)
        elif kind == "del":
            if self.state.delete(getattr(request, "del").uid):
                self._changed_now()
        else:  # snapshot_sent
            self.state.snapshot_sent()
            self._changed_now()  # the pod set may have changed; readiness did
        return None

    async def _await_start(self, pod_uid: str, generation: int) -> str | None:
        if not self.report_starts:
            return None
        pending = self._waiting[pod_uid] = _Pending(generation)
        try:
            with trio.move_on_after(self.start_timeout):
                await pending.done.wait()
        finally:
            self._waiting.pop(pod_uid, None)
        if not pending.done.is_set():
            self._failed[pod_uid] = "proxy start not reported in time"
            return "failure to start proxy: not reported in time"
        return None if pending.error is None else f"failure to start proxy: {pending.error}"

    async def _nack(self, sock: trio.socket.SocketType, error: str) -> None:
        LOGGER.error("ZDS NACK", error=error)
        self.nacks.append(error)
        self.last_error = error
        await sock.send(ack(error))

    def _changed_now(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def _close_retired(self) -> None:
        _close(self.state.closable(self._consumed))
