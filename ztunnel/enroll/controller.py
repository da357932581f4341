"""In-pod enrollment: which of this node's pods are in the mesh, and their proxies' lifecycle.

The controller follows a ``PodSource`` (full ``PodSnapshot``s) and, for the newest
snapshot, (1) hands the snapshot's mesh state to the ``ProxyHost`` (the agent) and
(2) reconciles this node's pods. A pod is enrolled when its source says it is in the
mesh (``Pod.in_mesh``) and it has not terminated. Enrolling holds one fd of the pod's
netns, installs redirection through the ``Redirector`` (idempotent, reconciling what a
previous agent left) and asks the host to start the pod's proxy with every socket in
that netns. Un-enrolling drains the proxy first (replies of spoofed connections need
our routing), then removes exactly our redirection, releases the pod's identity and
closes the fd.

Between snapshots the controller re-checks every pod's netns identity (dev + inode),
so a sandbox recreated under the same name is re-enrolled, and retries pods whose
redirection or proxy could not be set up every 5 s (they stay pending: readiness
reports them).

On agent shutdown the redirection is deliberately left in place, as istio-cni does: a
pod whose agent is gone fails closed (its traffic goes to ports nobody listens on)
instead of silently leaving the mesh; the next agent reuses it and takes over. If the
pod left the mesh while no agent ran, the next agent removes what it finds there.

Nothing one snapshot or one pod does ends the agent: failures are logged (with a
traceback when they are not one of our errors) and the pod is retried.

Sources that hand over netns fds they own (ZDS: ``NetnsRef.ephemeral``) may close them
once the controller asks for the next snapshot, so such a netns is opened while the
snapshot is taken (``_pin``) and the pod is followed through the controller's own fd;
the source's ``/proc/self/fd/<n>`` is never resolved again. A source that wants to
know how each start attempt went (ZDS acknowledges istio-cni's Add with it) passes
``on_start``; one that re-publishes an unchanged snapshot asks for failed pods to be
retried at once.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from typing import Any

import structlog
import trio

from ztunnel.enroll.host import (
    BlockingRunner,
    LeaveReporter,
    PodSource,
    ProxyHost,
    StartReporter,
    in_thread,
)
from ztunnel.errors import ZtunnelError
from ztunnel.model.pod import NetnsRef, Pod, PodPhase, PodSnapshot
from ztunnel.redirect.base import Redirector
from ztunnel.redirect.netns import NetNamespace

log = structlog.get_logger("ztunnel.enroll")

RETRY_INTERVAL = 5.0  # ztunnel retries a pod whose proxy failed to start every 5 s
Ident = tuple[int, int]
_TERMINATED = (PodPhase.SUCCEEDED, PodPhase.FAILED)


def netns_ident(ref: NetnsRef | None) -> Ident | None:
    """(dev, inode) of a pod's netns, None if it does not exist (no fd needed)."""
    if ref is None:
        return None
    try:
        st = os.stat(ref.path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def wants_enrollment(pod: Pod) -> bool:
    return pod.in_mesh and pod.phase not in _TERMINATED


def snapshot_problem(snapshot: PodSnapshot) -> str | None:
    """Why a snapshot cannot be followed (a source bug), or None."""
    for what, values in (
        ("pod", [p.key for p in snapshot.pods]),
        ("uid", [p.uid for p in snapshot.pods]),
    ):
        seen: set[str] = set()
        for value in values:
            if value in seen:
                return f"duplicate {what} {value!r}"
            seen.add(value)
    return None


def _identity(pod: Pod) -> tuple[str, str, str]:
    return (pod.namespace, pod.name, pod.service_account)


def _expected(exc: Exception) -> bool:
    """Our error taxonomy and the OS's: logged without a traceback."""
    return isinstance(exc, ZtunnelError | OSError)


@dataclass
class EnrolledPod:
    """One pod we hold: its netns fd, and whether its proxy runs."""

    pod: Pod
    netns: NetNamespace
    ident: Ident
    running: bool = False
    retry_at: float = 0.0
    # What the redirector reported right after installing (ctl, config_dump).
    redirection: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return self.pod.key


@dataclass
class _Draining:
    netns: NetNamespace
    done: trio.Event = field(default_factory=trio.Event)


class EnrollmentController:
    """Reconciles this node's pods against the newest snapshot, every ``poll`` seconds."""

    def __init__(
        self,
        source: PodSource,
        redirector: Redirector,
        host: ProxyHost,
        *,
        initial: PodSnapshot | None = None,
        drain_deadline: float = 5.0,
        poll: float = 0.5,
        retry_interval: float = RETRY_INTERVAL,
        blocking: BlockingRunner = in_thread,
        on_start: StartReporter | None = None,
        on_leave: LeaveReporter | None = None,
    ) -> None:
        self.source = source
        self.on_start = on_start
        self.on_leave = on_leave
        self.redirector = redirector
        self.host = host
        self.drain_deadline = drain_deadline
        self.poll = poll
        self.retry_interval = retry_interval
        self._blocking = blocking
        self._offered: PodSnapshot | None = None  # the newest snapshot as the source gave it
        self._latest: PodSnapshot | None = None  # ... with ephemeral netns refs pinned
        self._applied: PodSnapshot | None = None
        # The last snapshot whose state the host took: pods are reconciled against it, so
        # enrollment never follows a snapshot whose state was rejected.
        self._good: PodSnapshot | None = None
        self.pods: dict[str, EnrolledPod] = {}
        self._draining: dict[str, _Draining] = {}
        self._blocked: dict[str, str] = {}  # wanted pods we cannot open: key -> reason
        self._checked: dict[str, Ident] = {}  # not-in-mesh pods checked for stranded rules
        self._pins: dict[tuple[str, Ident], NetNamespace] = {}  # our fds of ephemeral netns
        # The redirector's state outside the pods is pruned after the first pass and after
        # a pod's netns was let go without removing its redirection (a recreated sandbox).
        self._prune_due = True
        self._wake = trio.Event()
        self._nursery: trio.Nursery | None = None
        if initial is not None:
            self._offer(initial)

    @property
    def nursery(self) -> trio.Nursery:
        if self._nursery is None:
            raise RuntimeError("EnrollmentController.run has not started")
        return self._nursery

    # -- service ---------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Started once the first snapshot (``initial``, else the source's first) is
        reconciled; then follows the source until cancelled."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._follow_source)
                while self._latest is None:
                    await self._wait_wake()
                await self.reconcile()
                self.host.mark_reconciled()
                task_status.started()
                while True:
                    with trio.move_on_after(self.poll):
                        await self._wait_wake()
                    await self.reconcile()
        finally:
            # Redirection stays installed on purpose (fail closed); only our fds go away.
            for pod in self.pods.values():
                pod.netns.close()
            for ns in self._pins.values():
                ns.close()
            self._pins.clear()

    async def _wait_wake(self) -> None:
        await self._wake.wait()
        self._wake = trio.Event()

    async def _follow_source(self) -> None:
        async for snapshot in self.source:
            self._offer(snapshot)

    def _offer(self, snapshot: PodSnapshot) -> None:
        """Take a snapshot from the source (synchronously: before asking for the next)."""
        if snapshot == self._offered:
            self._retry_now()  # the source re-published the same pods
            return
        self._offered = snapshot
        problem = snapshot_problem(snapshot)
        if problem is not None:
            log.error(
                "pod snapshot rejected; keeping the last good one",
                source=snapshot.source,
                problem=problem,
            )
            return
        self._latest = self._pin(snapshot)
        self._release_pins()
        self._wake.set()

    def _retry_now(self) -> None:
        """Pods whose start failed are tried again on the next pass, not in 5 s."""
        for held in self.pods.values():
            if not held.running:
                held.retry_at = 0.0
        self._wake.set()

    # -- ephemeral netns refs ------------------------------------------------------------

    def _pin(self, snapshot: PodSnapshot) -> PodSnapshot:
        """The snapshot with every ephemeral netns ref replaced by one of our own fds.

        A pin is keyed by (pod, netns ident), so the same netns keeps the same path
        across snapshots (no spurious "sandbox changed") and a new one gets a new path.
        """
        if not any(p.netns is not None and p.netns.ephemeral for p in snapshot.pods):
            return snapshot
        pods = tuple(self._pinned(p) for p in snapshot.pods)
        return dataclasses.replace(snapshot, pods=pods)

    def _pinned(self, pod: Pod) -> Pod:
        if pod.netns is None or not pod.netns.ephemeral:
            return pod
        try:
            ns = NetNamespace.open(pod.netns.path)
            ident = ns.ident
        except (ZtunnelError, OSError) as exc:  # the pod then waits for a usable netns
            log.warning("cannot open the pod's netns", pod=pod.key, error=str(exc))
            return dataclasses.replace(pod, netns=None)
        key = (pod.key, ident)
        if key in self._pins:
            ns.close()
        else:
            self._pins[key] = ns
        return dataclasses.replace(pod, netns=NetnsRef(f"/proc/self/fd/{self._pins[key].fd}"))

    def _release_pins(self) -> None:
        """Close pins neither the newest nor the last applied snapshot refers to."""
        used = {
            p.netns.path
            for snap in (self._latest, self._good)
            if snap is not None
            for p in snap.pods
            if p.netns is not None
        }
        for key, ns in list(self._pins.items()):
            if f"/proc/self/fd/{ns.fd}" not in used:
                del self._pins[key]
                ns.close()

    # -- reconciling -----------------------------------------------------------------

    async def reconcile(self) -> None:
        """One pass: state from the newest snapshot, then every pod of it.

        Pods follow one snapshot for the whole pass (a newer one may arrive at every
        await), and only one whose state was applied: store and enrollment stay in step.
        """
        snapshot = self._apply_state()
        if snapshot is None:
            return
        present = {p.key for p in snapshot.pods}
        wanted = {p.key: p for p in snapshot.pods if wants_enrollment(p)}
        for key in [k for k in self.pods if k not in wanted]:
            self._start_unenroll(
                self.pods.pop(key), graceful=key in present, uninstall=True, release=True
            )
        for key in [k for k in self._blocked if k not in wanted]:
            del self._blocked[key]
            self.host.clear_pending(key)
        for pod in wanted.values():
            await self._reconcile_pod(pod)
        others = [
            p
            for p in snapshot.pods
            if p.key not in wanted and p.key not in self.pods and p.key not in self._draining
        ]
        await self._remove_stranded(others)
        if self._prune_due:
            await self._prune()

    def _apply_state(self) -> PodSnapshot | None:
        """Apply the newest snapshot's state once; return the last cleanly applied snapshot."""
        snapshot = self._latest
        if snapshot is None or snapshot is self._applied:
            return self._good
        self._applied = snapshot
        state = snapshot.state
        if state is not None:
            try:
                self.host.apply_state(state)
            except Exception as exc:  # a snapshot we cannot take must never end the agent
                log.error(
                    "mesh state rejected; keeping the previous state",
                    source=snapshot.source,
                    error=repr(exc),
                    exc_info=not _expected(exc),
                )
                return self._good
            log.info(
                "mesh state applied",
                source=snapshot.source,
                workloads=len(state.workloads),
                services=len(state.services),
                policies=len(state.policies),
            )
        self._good = snapshot
        self._release_pins()
        return snapshot

    async def _reconcile_pod(self, pod: Pod) -> None:
        ident = netns_ident(pod.netns)
        held = self.pods.get(pod.key)
        if held is not None and (
            held.ident != ident or held.pod.netns != pod.netns or held.pod.uid != pod.uid
        ):
            # A new sandbox: the old proxy's netns is dead (or no longer the pod's).
            log.info("pod sandbox changed, re-enrolling", pod=pod.key)
            self._start_unenroll(self.pods.pop(pod.key), graceful=False, uninstall=False)
            held = None
        elif held is not None and _identity(held.pod) != _identity(pod):
            log.info("pod identity changed, re-enrolling", pod=pod.key)
            self._start_unenroll(
                self.pods.pop(pod.key), graceful=False, uninstall=False, release=True
            )
            held = None
        if ident is None:
            where = f"netns {pod.netns} not found" if pod.netns else "netns not known yet"
            self._block(pod, where)
            return
        if held is None:
            await self._wait_drained(pod.key)
            held = self._open(pod)
            if held is None:
                return
            self.pods[pod.key] = held
        held.pod = pod  # the newest labels and IPs
        if not held.running and trio.current_time() >= held.retry_at:
            await self._enroll(held)

    def _block(self, pod: Pod, reason: str) -> None:
        """A wanted pod we cannot even open: not ready (no proxy), logged once per reason."""
        key = pod.key
        self.host.mark_pending(key, reason)
        self._report(pod, reason)
        if self._blocked.get(key) != reason:
            self._blocked[key] = reason
            log.warning("pod cannot be enrolled; will retry", pod=key, reason=reason)

    def _report(self, pod: Pod, error: str | None) -> None:
        """Tell the source how a start attempt went (None: the proxy runs)."""
        if self.on_start is None:
            return
        try:
            self.on_start(pod, error)
        except Exception as exc:  # a reporting bug must never end the agent
            log.error("start report failed", pod=pod.key, error=repr(exc), exc_info=True)

    def _report_leave(self, pod: Pod) -> None:
        """Tell the source the pod left the mesh and our redirection is gone."""
        if self.on_leave is None:
            return
        try:
            self.on_leave(pod)
        except Exception as exc:  # a reporting bug must never end the agent
            log.error("leave report failed", pod=pod.key, error=repr(exc), exc_info=True)

    def _open(self, pod: Pod) -> EnrolledPod | None:
        assert pod.netns is not None  # _reconcile_pod found its ident
        try:
            ns = NetNamespace.open(pod.netns.path)
        except ZtunnelError as exc:
            self._block(pod, str(exc))
            return None
        try:
            ident = ns.ident
        except OSError as exc:
            ns.close()
            self._block(pod, f"cannot stat netns {pod.netns}: {exc}")
            return None
        self._blocked.pop(pod.key, None)  # pending stays until the proxy runs
        return EnrolledPod(pod, ns, ident)

    async def _enroll(self, held: EnrolledPod) -> None:
        pod, netns = held.pod, held.netns
        try:
            changed, held.redirection = await self._blocking(partial(self._install, netns, pod))
        except Exception as exc:  # one pod's failure must never end the agent
            self._failed(held, "failure to install redirection", exc)
            return
        try:
            facts = await self.host.start_pod_proxy(pod, netns)
        except Exception as exc:  # one pod's failure must never end the agent
            self._failed(held, "failure to start proxy", exc)
            return
        held.running = True
        self.host.clear_pending(held.key)
        self._report(pod, None)
        log.info(
            "pod enrolled",
            pod=held.key,
            uid=pod.uid,
            netns=str(pod.netns),
            redirection=self.redirector.mode,
            rules=self._rules("installed" if changed else "reused"),
            **facts,
        )

    def _install(self, netns: NetNamespace, pod: Pod) -> tuple[bool, dict[str, Any]]:
        """Install, then describe what is installed (blocking: one thread for both)."""
        changed = self.redirector.install(netns, pod)
        try:
            described = self.redirector.describe(netns)
        except (ZtunnelError, OSError) as exc:  # the capture is in place; only the view failed
            described = {"mode": self.redirector.mode, "error": str(exc)}
        described["describedAt"] = datetime.now(UTC).isoformat(timespec="seconds")
        return changed, described

    def redirection(self) -> dict[str, Any]:
        """For the admin endpoint: the mode, what it holds for all pods (read now), and per
        enrolled pod (by uid) what the redirector reported when it installed it."""
        try:
            summary = self.redirector.summary()
        except (ZtunnelError, OSError) as exc:
            summary = {"mode": self.redirector.mode, "error": str(exc)}
        pods = {p.pod.uid: p.redirection for p in self.pods.values() if p.redirection}
        return {**summary, "pods": pods}

    async def _prune(self) -> None:
        keep = [p.netns for p in self.pods.values()] + [d.netns for d in self._draining.values()]
        try:
            dropped = await self._blocking(partial(self.redirector.prune, keep))
        except Exception as exc:  # retried after the next pass
            log.warning(
                "could not prune redirection state of gone pods",
                error=str(exc),
                exc_info=not _expected(exc),
            )
            return
        self._prune_due = False
        if dropped:
            log.info("dropped redirection state of pods that are gone", netns=dropped)

    def _failed(self, held: EnrolledPod, what: str, exc: Exception) -> None:
        self.host.mark_pending(held.key, f"{what}: {exc}")
        self._report(held.pod, f"{what}: {exc}")
        held.retry_at = trio.current_time() + self.retry_interval
        log.error(
            "pod enrollment failed; retrying",
            pod=held.key,
            failure=what,
            error=str(exc),
            retry_in=self.retry_interval,
            exc_info=not _expected(exc),
        )

    # -- un-enrolling ----------------------------------------------------------------

    def _start_unenroll(
        self, held: EnrolledPod, *, graceful: bool, uninstall: bool, release: bool = False
    ) -> None:
        self.host.clear_pending(held.key)
        draining = self._draining[held.key] = _Draining(held.netns)
        self.nursery.start_soon(self._unenroll, held, graceful, uninstall, release, draining)

    async def _unenroll(
        self,
        held: EnrolledPod,
        graceful: bool,
        uninstall: bool,
        release: bool,
        draining: _Draining,
    ) -> None:
        """Drain first (replies of spoofed connections need our routing), then remove."""
        # Every failure is logged and the next step still runs: one pod must never end the agent.
        pod, netns = held.pod, held.netns
        try:
            if held.running:
                try:
                    await self.host.stop_pod_proxy(pod.uid, self.drain_deadline if graceful else 0)
                except Exception as exc:
                    log.error(
                        "could not stop pod proxy",
                        pod=held.key,
                        error=repr(exc),
                        exc_info=not _expected(exc),
                    )
            if uninstall:
                try:
                    await self._blocking(partial(self.redirector.remove, netns, pod))
                except Exception as exc:  # stranded: removed once the redirector works again
                    log.warning(
                        "could not remove pod rules",
                        pod=held.key,
                        error=str(exc),
                        exc_info=not _expected(exc),
                    )
                else:
                    self._report_leave(pod)
            if release:
                self.host.release_identity(pod)
            rules = self._rules("removed" if uninstall else "left")
            log.info("pod un-enrolled", pod=held.key, rules=rules)
        finally:
            self._prune_due |= not uninstall  # what the redirector keeps for it is stale now
            netns.close()
            draining.done.set()
            if self._draining.get(held.key) is draining:
                del self._draining[held.key]

    def _rules(self, what: str) -> str:
        """What happened to the pod's redirection, for the log (mode none: not ours)."""
        return "external" if self.redirector.mode == "none" else what

    async def _wait_drained(self, key: str) -> None:
        draining = self._draining.get(key)
        if draining is not None:
            await draining.done.wait()

    async def _remove_stranded(self, pods: Iterable[Pod]) -> None:
        """Remove our redirection from pods that left the mesh while no agent held them.

        Otherwise their traffic stays redirected to ports nobody listens on, forever. Each
        netns is checked once (a recreated sandbox has a new ident and is checked again).
        """
        pods = list(pods)
        keys = {p.key for p in pods}
        self._checked = {k: v for k, v in self._checked.items() if k in keys}
        for pod in pods:
            seen = netns_ident(pod.netns)
            if seen is None or self._checked.get(pod.key) == seen:
                continue
            try:
                ident, removed = await self._blocking(partial(self._strip, pod))
            except Exception as exc:  # retried next pass: stranded rules black-hole the pod
                log.warning(
                    "could not check a pod for stranded rules",
                    pod=pod.key,
                    error=str(exc),
                    exc_info=not _expected(exc),
                )
                continue
            self._checked[pod.key] = ident  # the fd's ident: the netns we really checked
            if removed:
                log.info("removed redirection rules of a pod no longer in the mesh", pod=pod.key)
                self._report_leave(pod)

    def _strip(self, pod: Pod) -> tuple[Ident, bool]:
        """(ident, whether our redirection was there and is now removed); blocking."""
        assert pod.netns is not None  # netns_ident found it
        with NetNamespace.open(pod.netns.path) as ns:
            ident = ns.ident
            if not self.redirector.installed(ns):
                return ident, False
            return ident, self.redirector.remove(ns, pod)
