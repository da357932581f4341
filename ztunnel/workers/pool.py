"""The control process's side of the worker processes: spawn, feed, supervise.

``WorkerPool.run`` spawns ``count`` workers and returns (``task_status``) once each has
said Ready. From then on it keeps them in step with the control process:

- state: every store change becomes one ``StateDelta`` for every worker (coalesced:
  computed when the sync task runs, and before any proxy start, so a pod's proxy never
  starts in a worker ahead of its workload); a new worker starts from a snapshot;
- proxies: ``ProxyGroup`` starts and drains a workload's proxy in every worker;
- certificates: workers ask for them, every later one is pushed (rotation);
- telemetry: workers' connection events are replayed into the agent's tracker;
- flood penalties: one worker's is passed to the others (``proxy/admission.py``).

A worker that exits unexpectedly is reported (log, ``ztunnel_worker_restarts_total``,
readiness until it is back), its connections are closed in the books, and it is spawned
again after a backoff with the current state and every current proxy.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import time
from typing import Any

import structlog
import trio
from prometheus_client import Counter, Gauge

from ztunnel.config import Config
from ztunnel.identity.certificate import WorkloadCertificate
from ztunnel.identity.errors import CAError, CertificateError
from ztunnel.identity.manager import SecretManager
from ztunnel.model.identity import Identity
from ztunnel.proxy.workload_proxy import ProxyAddresses
from ztunnel.state.store import Kind, StateStore
from ztunnel.telemetry.connections import ConnectionTracker
from ztunnel.telemetry.metrics import Metrics
from ztunnel.workers.certs import material_of
from ztunnel.workers.channel import ChannelClosed
from ztunnel.workers.group import ProxyGroup
from ztunnel.workers.link import WorkerGone, WorkerLink, spawn_link
from ztunnel.workers.process import WorkerProcess
from ztunnel.workers.protocol import (
    CertificateReply,
    CertificateRequest,
    CertificateUpdate,
    Drained,
    DrainProxy,
    ForgetCertificate,
    Penalty,
    ProtocolError,
    Ready,
    SetLogFilter,
    Shutdown,
    Started,
    StartProxy,
    Telemetry,
)
from ztunnel.workers.replica import StateMirror
from ztunnel.workers.telemetry import TelemetryMirror
from ztunnel.workers.zygote import Zygote, ZygoteGone

log = structlog.get_logger("ztunnel.workers")

READY_TIMEOUT = 60.0  # a worker that has not said Ready by then is killed and respawned
REAP_GRACE = 3.0  # after its channel closes, a worker gets this long to exit
BACKOFF_FIRST = 0.5
BACKOFF_CAP = 10.0
STABLE_AFTER = 30.0  # a worker that lived this long restarts without backoff


class WorkerPool:
    def __init__(
        self,
        config: Config,
        count: int,
        *,
        store: StateStore,
        secrets: SecretManager,
        tracker: ConnectionTracker,
        metrics: Metrics,
        zygote: Zygote | None = None,
    ) -> None:
        """``zygote``: forked before trio started (``Zygote.fork``), so that the workers
        share the control process's imported modules; None: one is started when needed."""
        self.config = config
        self.count = count
        self.zygote = zygote
        self.secrets = secrets
        self.state = StateMirror(store)
        self.telemetry = TelemetryMirror(tracker)
        self.links: dict[int, WorkerLink] = {}
        self.groups: dict[str, ProxyGroup] = {}
        self.restarts: dict[int, int] = dict.fromkeys(range(count), 0)
        self.last_exit: dict[int, str] = {}
        self._stopping = False
        self._log_filter: str | None = None  # set at runtime through the admin endpoint
        self._state_dirty = trio.Event()
        self._all_ready = trio.Event()
        self._unsubscribe = [
            store.subscribe(self._state_changed),
            secrets.subscribe(self._certificate_issued),
        ]
        self._running = Gauge(
            "ztunnel_workers",
            "Data-plane worker processes running (ZTUNNEL_WORKER_THREADS)",
            registry=metrics.registry,
        )
        self._restarts = Counter(
            "ztunnel_worker_restarts",
            "Data-plane worker processes restarted after they exited unexpectedly",
            ("worker",),
            registry=metrics.registry,
        )

    # -- running ----------------------------------------------------------------------

    async def run(
        self, *, task_status: trio.TaskStatus[WorkerPool] = trio.TASK_STATUS_IGNORED
    ) -> None:
        try:
            async with trio.open_nursery() as nursery:
                for slot in range(self.count):
                    nursery.start_soon(self._supervise, slot)
                nursery.start_soon(self._sync_state)
                await self._all_ready.wait()
                log.info("workers ready", count=self.count, pids=self.pids())
                task_status.started(self)
        finally:
            self._stopping = True
            for unsubscribe in self._unsubscribe:
                unsubscribe()
            if self.zygote is not None:
                self.zygote.close()

    def pids(self) -> list[int]:
        return [link.pid for _, link in sorted(self.links.items())]

    async def _supervise(self, slot: int) -> None:
        backoff = BACKOFF_FIRST
        while True:
            link = await spawn_link(slot, self.config, self._fork, self.count)
            self.links[slot] = link
            try:
                await self._serve_link(link)
            finally:
                with trio.CancelScope(shield=True):
                    code = await self._stop_link(link)
            if self._stopping:
                return
            why = _exit_text(code)
            self.last_exit[slot] = why
            self.restarts[slot] += 1
            self._restarts.labels(str(slot)).inc()
            log.error("worker exited, restarting", worker=slot, pid=link.pid, status=why)
            if time.monotonic() - link.started >= STABLE_AFTER:
                backoff = BACKOFF_FIRST  # a crash after a long life restarts at once
                continue
            await trio.sleep(backoff)
            backoff = min(backoff * 2, BACKOFF_CAP)

    async def _fork(self, channel_fd: int) -> WorkerProcess:
        """A worker forked by the zygote; a zygote that is gone is replaced, once."""
        try:
            return await self._zygote().spawn(channel_fd)
        except ZygoteGone as exc:
            log.warning("worker zygote gone, starting a new one", reason=str(exc))
            self._zygote().close()
        return await self._zygote().spawn(channel_fd)

    def _zygote(self) -> Zygote:
        if self.zygote is None or self.zygote.closed:
            self.zygote = Zygote.exec()
        return self.zygote

    async def _serve_link(self, link: WorkerLink) -> None:
        """Run one worker until it exits or its channel fails (then the reap in
        ``_stop_link`` gives its exit code: a killed worker's channel may close first,
        cancelling the wait for its exit)."""
        async with trio.open_nursery() as nursery:
            link.nursery = nursery  # tasks that serve this worker end with it
            nursery.start_soon(self._write, link, nursery.cancel_scope)
            nursery.start_soon(self._read, link, nursery.cancel_scope)
            nursery.start_soon(self._ready_deadline, link)
            await link.wait_exit()
            nursery.cancel_scope.cancel()

    async def _stop_link(self, link: WorkerLink) -> int:
        """Ask a live worker to stop (its last connection events are applied), then reap it."""
        if not link.gone and link.proc.poll() is None:
            link.stopping = True
            link.channel.post(Shutdown())
            with trio.move_on_after(REAP_GRACE):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._write, link, nursery.cancel_scope)
                    await self._read(link, nursery.cancel_scope)  # until the worker's EOF
        code = await link.reap(REAP_GRACE)
        self._lost(link, "agent stopping" if link.stopping else _exit_text(code))
        return code

    async def _write(self, link: WorkerLink, scope: trio.CancelScope) -> None:
        try:
            await link.channel.run_writer()
        except ChannelClosed:
            scope.cancel()

    async def _read(self, link: WorkerLink, scope: trio.CancelScope) -> None:
        try:
            while True:
                message, fds = await link.channel.receive()
                for fd in fds:  # workers never send descriptors
                    os.close(fd)
                self._dispatch(link, message)
        except (ChannelClosed, ProtocolError) as exc:
            if not link.gone and not link.stopping:
                log.warning("worker channel closed", worker=link.slot, reason=str(exc))
            # the exit code comes from wait_exit; a worker that closed its end and lives on
            # is ended by the reap
            link.mark_gone()
            scope.cancel()

    async def _ready_deadline(self, link: WorkerLink) -> None:
        await trio.sleep(READY_TIMEOUT)
        if not link.ready and not link.gone:
            log.error("worker did not become ready, killing it", worker=link.slot, pid=link.pid)
            link.proc.kill()

    def _dispatch(self, link: WorkerLink, message: object) -> None:
        if isinstance(message, Telemetry):
            self.telemetry.apply(link.key, message)
        elif isinstance(message, Started | Drained):
            link.answer(message.request, message)
        elif isinstance(message, CertificateRequest):
            link.nursery.start_soon(self._serve_certificate, link, message)
        elif isinstance(message, Ready):
            self._attach(link)
        elif isinstance(message, Penalty):
            for other in self.links.values():
                if other is not link and other.ready:
                    other.channel.post(message)
        else:
            log.error(
                "unexpected message from a worker", worker=link.slot, type=type(message).__name__
            )

    def _lost(self, link: WorkerLink, why: str) -> None:
        if self.links.get(link.slot) is link:
            del self.links[link.slot]
        cut = self.telemetry.worker_gone(link.key, why)
        if cut and not link.stopping:
            log.warning("connections of the exited worker closed", worker=link.slot, count=cut)
        self._running.set(sum(1 for other in self.links.values() if other.ready))

    # -- attaching a (re)started worker -------------------------------------------------

    def _attach(self, link: WorkerLink) -> None:
        """Ready: send the current state, then start every current proxy in it."""
        self.flush_state()
        link.channel.post(self.state.snapshot())
        if self._log_filter is not None:
            link.channel.post(SetLogFilter(self._log_filter))
        link.ready = True
        self._running.set(sum(1 for other in self.links.values() if other.ready))
        if all(slot in self.links and self.links[slot].ready for slot in range(self.count)):
            self._all_ready.set()
        if self.groups:
            link.nursery.start_soon(self._start_all_in, link)

    async def _start_all_in(self, link: WorkerLink) -> None:
        for group in list(self.groups.values()):
            error = await self._start_in(link, group, group.restart_addresses())
            if error is not None:
                group.errors[link.slot] = error
                log.error(
                    "proxy did not start in the restarted worker",
                    uid=group.uid,
                    worker=link.slot,
                    error=error,
                )

    # -- proxies ----------------------------------------------------------------------

    async def start_group(self, group: ProxyGroup) -> None:
        """Start ``group`` in every running worker; raises OSError if any cannot bind."""
        self.flush_state()
        live = [link for _, link in sorted(self.links.items()) if link.ready]
        self.groups[group.uid] = group
        started: list[WorkerLink] = []
        try:
            if live:
                first, rest = live[0], live[1:]
                await self._start_or_raise(first, group, group.addresses, started)
                addresses = group.restart_addresses()  # later workers bind the same ports
                async with trio.open_nursery() as nursery:
                    for link in rest:
                        nursery.start_soon(self._start_or_raise, link, group, addresses, started)
        except BaseException:
            if self.groups.get(group.uid) is group:
                del self.groups[group.uid]
            with trio.CancelScope(shield=True):
                for link in started:
                    await self._drain_in(link, group, 0.0)
            raise

    async def _start_or_raise(
        self,
        link: WorkerLink,
        group: ProxyGroup,
        addresses: ProxyAddresses,
        started: list[WorkerLink],
    ) -> None:
        error = await self._start_in(link, group, addresses)
        if error is None:
            started.append(link)
            return
        code = errno.EIO
        raise OSError(code, f"worker {link.slot}: {error}")

    async def _start_in(
        self, link: WorkerLink, group: ProxyGroup, addresses: ProxyAddresses
    ) -> str | None:
        """Start the group's proxy in one worker; the error text, or None."""
        fds = (group.netns.fd,) if group.netns is not None else ()
        path = group.netns.path if group.netns is not None else None
        try:
            reply = await link.request(
                lambda r: StartProxy(
                    r, group.uid, group.info, addresses, group.orig_src, path, group.agent_services
                ),
                fds,
            )
        except WorkerGone as exc:
            return str(exc)
        assert isinstance(reply, Started)
        if reply.error:
            return reply.error
        link.proxies.add(group.uid)
        group.errors.pop(link.slot, None)
        if not group.bound:
            group.bound, group.transparent = dict(reply.bound), reply.transparent
        return None

    async def drain_group(self, group: ProxyGroup, deadline: float) -> None:
        """Drain the group's proxy in every worker at once (each up to ``deadline`` s)."""
        if self.groups.get(group.uid) is group:
            del self.groups[group.uid]
        async with trio.open_nursery() as nursery:
            for link in list(self.links.values()):
                if group.uid in link.proxies:
                    nursery.start_soon(self._drain_in, link, group, deadline)

    async def _drain_in(self, link: WorkerLink, group: ProxyGroup, deadline: float) -> None:
        link.proxies.discard(group.uid)
        with contextlib.suppress(WorkerGone):  # gone: its connections went with it
            await link.request(lambda r: DrainProxy(r, group.uid, deadline))

    # -- state --------------------------------------------------------------------------

    def _state_changed(self, _kinds: frozenset[Kind]) -> None:
        self._state_dirty.set()

    async def _sync_state(self) -> None:
        while True:
            await self._state_dirty.wait()
            self._state_dirty = trio.Event()
            self.flush_state()

    def flush_state(self) -> None:
        """Post the store's changes since the last flush to every attached worker."""
        delta = self.state.delta()
        if not delta:
            return
        for link in self.links.values():
            if link.ready:
                link.channel.post(delta)

    # -- certificates -------------------------------------------------------------------

    async def _serve_certificate(self, link: WorkerLink, message: CertificateRequest) -> None:
        try:
            cert = await self.secrets.fetch(message.identity)
        except (CAError, CertificateError) as exc:
            link.channel.post(CertificateReply(message.request, None, str(exc)))
            return
        link.identities.add(message.identity)
        link.channel.post(CertificateReply(message.request, material_of(cert)))

    def _certificate_issued(self, identity: Identity, cert: WorkloadCertificate) -> None:
        material = None
        for link in self.links.values():
            if identity in link.identities and link.ready:
                material = material or material_of(cert)
                link.channel.post(CertificateUpdate(material))

    def forget_certificate(self, identity: Identity) -> None:
        for link in self.links.values():
            if identity in link.identities:
                link.identities.discard(identity)
                link.channel.post(ForgetCertificate(identity))

    def set_log_filter(self, spec: str) -> None:
        """The admin endpoint changed the log filter: the workers follow (and restarted
        ones start with it)."""
        self._log_filter = spec
        for link in self.links.values():
            if link.ready:
                link.channel.post(SetLogFilter(spec))

    # -- inspection ---------------------------------------------------------------------

    def not_ready_reason(self) -> str | None:
        reasons = []
        for slot in range(self.count):
            link = self.links.get(slot)
            if link is None or not link.ready:
                last = self.last_exit.get(slot)
                reasons.append(
                    f"worker {slot}: restarting after it exited ({last})"
                    if last
                    else f"worker {slot}: starting"
                )
        for group in self.groups.values():
            reasons += [f"proxy {group.uid} in worker {s}: {e}" for s, e in group.errors.items()]
        return "; ".join(reasons) or None

    def dump(self) -> list[dict[str, Any]]:
        """config_dump's ``workers``: one entry per worker slot."""
        out = []
        for slot in range(self.count):
            link = self.links.get(slot)
            entry: dict[str, Any] = {
                "index": slot,
                "state": "running" if link and link.ready else "starting",
                "pid": link.pid if link else None,
                "restarts": self.restarts[slot],
                "lastExit": self.last_exit.get(slot),
            }
            if link is not None:
                entry["proxies"] = sorted(link.proxies)
                entry["openConnections"] = self.telemetry.open_count(link.key)
                entry["connectionsOpened"] = self.telemetry.opened.get(link.key, 0)
            out.append(entry)
        return out


def _exit_text(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"
