"""A data-plane worker process: ``run(CHANNEL_FD, PARENT_PID)`` in a forked process.

Forked by the zygote (``workers/zygote.py``) for the control process (``workers/pool.py``),
with one end of a socketpair, out of the modules the control process imported. It
runs the same ``WorkloadProxy`` as a single-process agent, one per proxied workload, each
with its own SO_REUSEPORT listeners (made in the pod's netns from the fd the control
process passed) and its own HBONE pool, on its own trio loop and core. What it does not
own it gets from the control process: the mesh state (a replica, kept current by deltas;
its policy watcher cuts its own connections when a policy change denies them),
certificates (``workers/certs.py``) and where its telemetry goes (``workers/telemetry.py``).

It never outlives the control process: PR_SET_PDEATHSIG kills it when the parent dies
(set once the zygote's double fork made it the control process's child),
and the channel's EOF ends it when the parent closes it. SIGINT and SIGTERM are the
control process's to handle (a terminal's Ctrl-C reaches the whole process group):
draining is decided there and arrives as ``DrainProxy``.
"""

from __future__ import annotations

import itertools
import os
import signal
import socket
from functools import partial

import structlog
import trio

from ztunnel.errors import ZtunnelError
from ztunnel.hbone import reclaim
from ztunnel.identity.errors import CertificateError
from ztunnel.model.identity import Identity
from ztunnel.proxy.context import ProxyContext
from ztunnel.proxy.policy_watch import watch_policies
from ztunnel.proxy.sockets import LocalSocketFactory, NetnsSocketFactory, SocketFactory
from ztunnel.proxy.workload_proxy import WorkloadProxy
from ztunnel.redirect.netns import NetNamespace
from ztunnel.state.store import StateStore
from ztunnel.telemetry import logging as zlog
from ztunnel.workers import replica
from ztunnel.workers.certs import RemoteCertificates, ask_error
from ztunnel.workers.channel import Channel, ChannelClosed
from ztunnel.workers.process import die_with_parent
from ztunnel.workers.protocol import (
    CertificateMaterial,
    CertificateReply,
    CertificateRequest,
    CertificateUpdate,
    Drained,
    DrainProxy,
    ForgetCertificate,
    Hello,
    Penalty,
    ProtocolError,
    Ready,
    SetLogFilter,
    Shutdown,
    Started,
    StartProxy,
    StateDelta,
    StateSnapshot,
)
from ztunnel.workers.telemetry import RelayTracker

log = structlog.get_logger("ztunnel.workers")


class _Reply:
    def __init__(self) -> None:
        self.done = trio.Event()
        self.message: CertificateReply | None = None


class Worker:
    def __init__(self, channel: Channel, hello: Hello) -> None:
        self.channel = channel
        self.index = hello.index
        self.config = hello.config
        self.store = StateStore()
        self.tracker = RelayTracker(channel.post)
        self.certs = RemoteCertificates(self._ask_certificate)
        self.ctx = ProxyContext(
            self.config, self.store, self.certs, self.tracker, workers=hello.workers
        )
        self.ctx.peers.on_penalty = lambda keys: channel.post(Penalty(keys))
        self.proxies: dict[str, WorkloadProxy] = {}
        self._requests = itertools.count(1)
        self._replies: dict[int, _Reply] = {}
        self._unwatch = watch_policies(self.store, self.tracker)
        self._stopping = trio.Event()
        self._proxies_done = trio.Event()
        self._written = trio.Event()
        self._proxy_nursery: trio.Nursery

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            self.nursery = nursery
            nursery.start_soon(self._write)
            nursery.start_soon(self.tracker.run)
            nursery.start_soon(
                partial(reclaim.run, count=lambda: reclaim.ended_connections() + self.tracker.ended)
            )
            await nursery.start(self._host_proxies)
            self.channel.post(Ready(os.getpid()))
            if await self._serve():
                await self._stop_gracefully()
            nursery.cancel_scope.cancel()

    async def _write(self) -> None:
        try:
            await self.channel.run_writer()
        except ChannelClosed:
            pass  # the control process is gone: nothing left to do
        finally:
            self._written.set()
            self.nursery.cancel_scope.cancel()

    async def _host_proxies(self, *, task_status: trio.TaskStatus[None]) -> None:
        async with trio.open_nursery() as proxies:
            self._proxy_nursery = proxies
            task_status.started()
            await self._stopping.wait()
            proxies.cancel_scope.cancel()
        self._proxies_done.set()

    async def _serve(self) -> bool:
        """Handle messages; True at Shutdown, False when the channel closed under us."""
        while True:
            try:
                message, fds = await self.channel.receive()
            except ChannelClosed:
                return False  # the control process closed the channel or died: stop at once
            if isinstance(message, Shutdown):
                return True
            self._dispatch(message, fds)

    async def _stop_gracefully(self) -> None:
        """Connections end (and are reported) before the channel closes."""
        self._stopping.set()
        await self._proxies_done.wait()
        self.tracker.flush()
        self.channel.finish()
        await self._written.wait()

    def _dispatch(self, message: object, fds: list[int]) -> None:
        if isinstance(message, StateSnapshot | StateDelta):
            replica.apply(self.store, message)
        elif isinstance(message, StartProxy):
            self.nursery.start_soon(self._start, message, fds)
            return
        elif isinstance(message, DrainProxy):
            self.nursery.start_soon(self._drain, message)
        elif isinstance(message, CertificateUpdate):
            self._take_certificate(message.material)
        elif isinstance(message, CertificateReply):
            reply = self._replies.pop(message.request, None)
            if reply is not None:
                reply.message = message
                reply.done.set()
        elif isinstance(message, ForgetCertificate):
            self.certs.forget(message.identity)
        elif isinstance(message, SetLogFilter):
            zlog.set_filter(message.spec)
        elif isinstance(message, Penalty):
            self.ctx.peers.penalize(message.keys)
        else:
            log.error("unexpected message from the control process", type=type(message).__name__)
        for fd in fds:
            os.close(fd)

    # -- proxies --------------------------------------------------------------------------

    async def _start(self, msg: StartProxy, fds: list[int]) -> None:
        netns = NetNamespace(fds[0], msg.netns_path or "netns") if fds else None
        for extra in fds[1:]:
            os.close(extra)
        mark = self.config.packet_mark
        factory: SocketFactory = (
            NetnsSocketFactory(netns, mark) if netns is not None else LocalSocketFactory(mark)
        )
        proxy = WorkloadProxy(
            self.ctx,
            msg.info,
            factory,
            msg.addresses,
            uid=msg.uid,
            orig_src=msg.orig_src,
            agent_services=msg.agent_services,
        )
        try:
            await self._proxy_nursery.start(self._run_proxy, proxy, netns)
        except (OSError, ZtunnelError) as exc:
            code = exc.errno if isinstance(exc, OSError) and exc.errno else 0
            self.channel.post(Started(msg.request, error=str(exc), errno=code))
            return
        self.proxies[msg.uid] = proxy
        self.channel.post(Started(msg.request, dict(proxy.bound), proxy.transparent))

    async def _run_proxy(
        self,
        proxy: WorkloadProxy,
        netns: NetNamespace | None,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        try:
            await proxy.run(task_status=task_status)
        finally:
            if self.proxies.get(proxy.uid) is proxy:
                del self.proxies[proxy.uid]
            if netns is not None:
                netns.close()

    async def _drain(self, msg: DrainProxy) -> None:
        proxy = self.proxies.pop(msg.uid, None)
        if proxy is not None:
            await proxy.drain(msg.deadline)
        self.channel.post(Drained(msg.request))

    # -- certificates ---------------------------------------------------------------------

    async def _ask_certificate(self, identity: Identity) -> CertificateMaterial:
        request = next(self._requests)
        reply = self._replies[request] = _Reply()
        self.channel.post(CertificateRequest(request, identity))
        try:
            await reply.done.wait()
        finally:
            self._replies.pop(request, None)
        assert reply.message is not None
        if reply.message.material is None:
            raise ask_error(identity, reply.message.error)
        return reply.message.material

    def _take_certificate(self, material: CertificateMaterial) -> None:
        try:
            self.certs.update(material)
        except CertificateError as exc:
            log.error("unusable certificate from the control process", error=str(exc))


async def serve(sock: socket.socket) -> None:
    channel = Channel(sock)
    try:
        message, fds = await channel.receive()
        for fd in fds:
            os.close(fd)
        if not isinstance(message, Hello):
            raise ProtocolError(f"expected Hello, got {type(message).__name__}")
        zlog.configure_logging(message.config.log_level, message.config.log_format)
        await Worker(channel, message).run()
    except ChannelClosed:
        pass
    finally:
        channel.close()


def run(fd: int, parent: int) -> None:
    """Serve the control process ``parent`` on the channel ``fd`` until it closes."""
    die_with_parent(parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    sock = socket.socket(fileno=fd)
    trio.run(serve, sock)
