"""The enrollment controller without root: a scripted pod source, the in-memory redirector,
a fake proxy host, and regular files standing in for pod network namespaces.

``NetNamespace.open`` works on any file: its ident is the file's (dev, inode), so one temp
file per pod gives distinct idents and replacing the file simulates a recreated sandbox.
Time is trio's autojump clock: the 5 s retry and the drain deadline take no real time.
"""

from __future__ import annotations

import dataclasses
import errno
import functools
import os
import socket
import textwrap
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any, TypeVar

import trio
import trio.testing
from structlog.testing import capture_logs

from ztunnel.agent import Agent
from ztunnel.config import Config
from ztunnel.enroll.controller import EnrollmentController
from ztunnel.identity.ca import FakeCA
from ztunnel.identity.certificate import WorkloadCertificate
from ztunnel.model.identity import Identity
from ztunnel.model.pod import MeshState, NetnsRef, Pod, PodPhase, PodSnapshot
from ztunnel.model.workload import TunnelProtocol, Workload
from ztunnel.proxy.sockets import LocalSocketFactory
from ztunnel.redirect.base import FakeRedirector
from ztunnel.redirect.iptables import IptablesError
from ztunnel.redirect.netns import NetNamespace, NetnsError
from ztunnel.sources.clusterfile.mesh import snapshot
from ztunnel.sources.clusterfile.spec import loads_spec

T = TypeVar("T")
DRAIN = 3.0
POLL = 0.5
STATE = MeshState()


async def inline(fn: Callable[[], T]) -> T:
    """The controller's blocking calls, run in the task (the fakes never block)."""
    await trio.lowlevel.checkpoint()
    return fn()


class ScriptedSource:
    def __init__(self) -> None:
        self.send, self._receive = trio.open_memory_channel[PodSnapshot](0)

    def __aiter__(self) -> AsyncIterator[PodSnapshot]:
        return self._receive.__aiter__()


@dataclass
class Redirector(FakeRedirector):
    """FakeRedirector that can also fail removals and counts presence checks."""

    fail_remove: Exception | None = None
    fail_describe: Exception | None = None
    checks: int = 0

    def describe(self, netns: NetNamespace) -> dict[str, Any]:
        if self.fail_describe is not None:
            raise self.fail_describe
        return super().describe(netns)

    def remove(self, netns: NetNamespace, pod: Pod | None = None) -> bool:
        if self.fail_remove is not None:
            self.calls.append(("remove failed", pod.key if pod else netns.path))
            raise self.fail_remove
        return super().remove(netns, pod)

    def installed(self, netns: NetNamespace) -> bool:
        self.checks += 1
        return super().installed(netns)


@dataclass
class FakeHost:
    """The agent as the controller sees it; ``log`` is shared with the redirector's calls."""

    log: list[tuple[str, str]]
    pending: dict[str, str] = field(default_factory=lambda: {"startup": "not reconciled"})
    running: dict[str, Pod] = field(default_factory=dict)  # by uid
    netns_of: dict[str, NetNamespace] = field(default_factory=dict)
    deadlines: dict[str, float] = field(default_factory=dict)
    states: list[MeshState] = field(default_factory=list)
    fail_start: dict[str, Exception] = field(default_factory=dict)
    reject_state: Exception | None = None
    start_delay: float = 0.0

    def apply_state(self, state: MeshState) -> None:
        if self.reject_state is not None:
            raise self.reject_state
        self.states.append(state)

    async def start_pod_proxy(self, pod: Pod, netns: NetNamespace) -> Mapping[str, Any]:
        await trio.sleep(self.start_delay)
        self.log.append(("start", pod.key))
        failure = self.fail_start.get(pod.key)
        if failure is not None:
            raise failure
        assert not netns.closed
        self.running[pod.uid] = pod
        self.netns_of[pod.uid] = netns
        return {"transparent": False}

    async def stop_pod_proxy(self, uid: str, deadline: float) -> None:
        pod = self.running.pop(uid)
        self.log.append(("stop", pod.key))
        self.deadlines[pod.key] = deadline
        await trio.sleep(deadline)  # draining
        self.log.append(("stopped", pod.key))

    def release_identity(self, pod: Pod) -> None:
        self.log.append(("release", pod.key))

    def mark_pending(self, pod_key: str, reason: str) -> None:
        self.pending[pod_key] = reason

    def clear_pending(self, pod_key: str) -> None:
        self.pending.pop(pod_key, None)

    def mark_reconciled(self) -> None:
        self.pending.pop("startup", None)

    @property
    def keys(self) -> set[str]:
        return {p.key for p in self.running.values()}


@dataclass
class Rig:
    dir: Path
    source: ScriptedSource
    redirector: Redirector
    host: FakeHost
    controller: EnrollmentController
    log: list[tuple[str, str]]

    def netns(self, name: str) -> NetnsRef:
        path = self.dir / name
        if not path.exists():
            path.write_text("")
        return NetnsRef(str(path))

    def recreate(self, name: str) -> None:
        """A new sandbox under the same name (the old file lives on while an fd holds it)."""
        fresh = self.dir / f"{name}.new"
        fresh.write_text("")
        os.replace(fresh, self.dir / name)

    def ident(self, name: str) -> tuple[int, int]:
        st = os.stat(self.dir / name)
        return (st.st_dev, st.st_ino)

    def pod(self, name: str, *, in_mesh: bool = True, **fields: Any) -> Pod:
        if "netns" not in fields:
            fields["netns"] = self.netns(name)
        return Pod(
            uid=f"Kubernetes//Pod/mesh/{name}",
            name=name,
            namespace="mesh",
            in_mesh=in_mesh,
            **fields,
        )

    async def send(self, *pods: Pod, state: MeshState | None = STATE) -> None:
        """Hand over a snapshot and let the controller finish a pass over it."""
        await self.source.send.send(PodSnapshot(pods, state, "test"))
        await trio.sleep(2 * POLL)

    def events(self, since: int = 0) -> list[tuple[str, str]]:
        return self.log[since:]


@asynccontextmanager
async def running(tmp_path: Path, *pods: Pod, **host: Any) -> AsyncIterator[Rig]:
    """A started controller whose first snapshot holds ``pods`` (built with ``rig.pod``
    after start: pass none here and ``send`` them)."""
    log: list[tuple[str, str]] = []
    source = ScriptedSource()
    redirector = Redirector(calls=log)
    fake = FakeHost(log, **host)
    controller = EnrollmentController(
        source,
        redirector,
        fake,
        initial=PodSnapshot(pods, STATE, "initial"),
        drain_deadline=DRAIN,
        poll=POLL,
        blocking=inline,
    )
    rig = Rig(tmp_path, source, redirector, fake, controller, log)
    async with trio.open_nursery() as nursery:
        await nursery.start(controller.run)
        yield rig
        nursery.cancel_scope.cancel()


def _netns_file(tmp_path: Path, name: str) -> NetnsRef:
    path = tmp_path / name
    path.write_text("")
    return NetnsRef(str(path))


# -- enrolling and un-enrolling ------------------------------------------------------------


async def test_enrolls_pods_in_the_mesh_only(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with running(tmp_path) as rig:
        assert rig.host.pending == {}  # reconciled (an empty first snapshot)
        await rig.send(rig.pod("a"), rig.pod("b", in_mesh=False), state=MeshState())
        assert rig.host.keys == {"mesh/a"}
        assert rig.events() == [("install", "mesh/a"), ("start", "mesh/a")]
        assert rig.redirector.state == {rig.ident("a"): "mesh/a"}
        assert rig.host.states == [STATE, STATE]
        assert not rig.controller.pods["mesh/a"].netns.closed
        assert rig.host.pending == {}
        # The same snapshot again, and more passes: nothing is done twice.
        await rig.send(rig.pod("a"), rig.pod("b", in_mesh=False))
        await trio.sleep(5)
        assert rig.events() == [("install", "mesh/a"), ("start", "mesh/a")]


async def test_the_first_snapshot_is_reconciled_before_the_controller_reports_started(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    a = Pod("Kubernetes//Pod/mesh/a", "a", "mesh", netns=_netns_file(tmp_path, "a"), in_mesh=True)
    async with running(tmp_path, a) as rig:
        assert rig.host.keys == {"mesh/a"} and rig.host.pending == {}
        assert rig.host.states == [STATE]


async def test_without_an_initial_snapshot_it_waits_for_the_sources_first(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    log: list[tuple[str, str]] = []
    source, host = ScriptedSource(), FakeHost(log)
    controller = EnrollmentController(
        source, Redirector(calls=log), host, poll=POLL, blocking=inline
    )
    a = Pod("Kubernetes//Pod/mesh/a", "a", "mesh", netns=_netns_file(tmp_path, "a"), in_mesh=True)
    async with trio.open_nursery() as nursery:
        started = trio.Event()

        async def run() -> None:
            await nursery.start(controller.run)
            started.set()

        nursery.start_soon(run)
        await trio.sleep(10)
        assert not started.is_set() and "startup" in host.pending
        await source.send.send(PodSnapshot((a,), STATE, "first"))
        await started.wait()
        assert host.keys == {"mesh/a"} and host.pending == {}
        nursery.cancel_scope.cancel()


async def test_leaving_the_mesh_drains_then_removes_redirection_then_releases(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with running(tmp_path) as rig:
        await rig.send(rig.pod("a"))
        held = rig.controller.pods["mesh/a"]
        mark = len(rig.log)
        start = trio.current_time()
        await rig.send(rig.pod("a", in_mesh=False))
        await trio.sleep(DRAIN)
        assert rig.events(mark) == [
            ("stop", "mesh/a"),
            ("stopped", "mesh/a"),
            ("remove", "mesh/a"),
            ("release", "mesh/a"),
        ]
        assert rig.host.deadlines["mesh/a"] == DRAIN  # graceful: the pod still runs
        assert trio.current_time() - start >= DRAIN
        assert rig.redirector.state == {} and held.netns.closed
        assert rig.controller.pods == {} and rig.host.running == {}
        # Back in the mesh: enrolled again, in the same netns.
        mark = len(rig.log)
        await rig.send(rig.pod("a"))
        assert rig.events(mark) == [("install", "mesh/a"), ("start", "mesh/a")]


async def test_pod_level_opt_out_through_the_cluster_file(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    text = textwrap.dedent(
        """\
        namespaces: {mesh: {labels: {istio.io/dataplane-mode: ambient}}}
        nodes: [n1]
        pods:
          - {name: a, namespace: mesh, node: n1}
          - {name: c, namespace: mesh, node: n1}
        """
    )
    async with running(tmp_path) as rig:

        async def send_file(yaml_text: str) -> None:
            snap, _ = snapshot(loads_spec(yaml_text), "zt000000", "n1")
            pods = [dataclasses.replace(p, netns=rig.netns(p.name)) for p in snap.pods]
            await rig.send(*pods, state=snap.state)

        await send_file(text)
        assert rig.host.keys == {"mesh/a", "mesh/c"}
        await send_file(
            text.replace(
                "name: c, namespace: mesh, node: n1",
                "name: c, namespace: mesh, node: n1, labels: {istio.io/dataplane-mode: none}",
            )
        )
        await trio.sleep(DRAIN)
        assert rig.host.keys == {"mesh/a"}
        assert ("remove", "mesh/c") in rig.log
        state = rig.host.states[-1]
        protocols = {w.name: w.protocol for w in state.workloads}
        assert protocols == {"a": TunnelProtocol.HBONE, "c": TunnelProtocol.TCP}


async def test_a_deleted_pod_is_stopped_at_once(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with running(tmp_path) as rig:
        await rig.send(rig.pod("a"), rig.pod("b"))
        mark = len(rig.log)
        await rig.send(rig.pod("b"))
        assert rig.events(mark) == [
            ("stop", "mesh/a"),
            ("stopped", "mesh/a"),
            ("remove", "mesh/a"),
            ("release", "mesh/a"),
        ]
        assert rig.host.deadlines["mesh/a"] == 0  # gone: nothing left to drain for
        assert rig.host.keys == {"mesh/b"}


async def test_terminated_pods_leave_the_mesh(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with running(tmp_path) as rig:
        await rig.send(rig.pod("a"))
        await rig.send(rig.pod("a", phase=PodPhase.SUCCEEDED))
        await trio.sleep(DRAIN)
        assert rig.host.keys == set()
        assert ("remove", "mesh/a") in rig.log


async def test_a_recreated_sandbox_is_reenrolled_in_the_new_netns(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with running(tmp_path) as rig:
        await rig.send(rig.pod("a"))
        old = rig.controller.pods["mesh/a"]
        old_ident = old.ident
        mark = len(rig.log)
        rig.recreate("a")
        await trio.sleep(2 * POLL)  # no new snapshot: the poll notices
        assert rig.events(mark) == [
            ("stop", "mesh/a"),
            ("stopped", "mesh/a"),
            ("install", "mesh/a"),
            ("start", "mesh/a"),
        ]  # no removal (the old netns is dead) and no release (same identity)
        assert rig.host.deadlines["mesh/a"] == 0
        new = rig.controller.pods["mesh/a"]
        assert new.ident == rig.ident("a") != old_ident
        assert old.netns.closed and not new.netns.closed
        assert rig.host.netns_of["Kubernetes//Pod/mesh/a"] is new.netns
        assert rig.redirector.state[new.ident] == "mesh/a"


async def test_a_new_service_account_reenrolls_and_releases_the_old_identity(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with running(tmp_path) as rig:
        await rig.send(rig.pod("a", service_account="one"))
        mark = len(rig.log)
        await rig.send(rig.pod("a", service_account="two"))
        assert rig.events(mark) == [
            ("stop", "mesh/a"),
            ("stopped", "mesh/a"),
            ("release", "mesh/a"),
            ("install", "mesh/a"),
            ("start", "mesh/a"),
        ]
        assert rig.host.running["Kubernetes//Pod/mesh/a"].service_account == "two"


# -- failures: pending, retried every 5 s, never the end of the agent ----------------------


async def test_a_proxy_that_cannot_start_is_pending_and_retried_after_5s(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    bind = OSError(errno.EADDRINUSE, "Address already in use")
    async with running(tmp_path, fail_start={"mesh/a": bind}) as rig:
        with capture_logs() as logs:
            await rig.send(rig.pod("a"))
        failed_at = trio.current_time() - 2 * POLL
        reason = rig.host.pending["mesh/a"]
        assert reason == "failure to start proxy: [Errno 98] Address already in use"
        assert "startup" not in rig.host.pending
        assert rig.redirector.state == {rig.ident("a"): "mesh/a"}  # fail closed meanwhile
        (entry,) = [e for e in logs if e["event"] == "pod enrollment failed; retrying"]
        assert entry["retry_in"] == 5.0 and entry["exc_info"] is False
        del rig.host.fail_start["mesh/a"]
        await trio.sleep(5 - 2 * POLL - 0.1)
        assert rig.log.count(("start", "mesh/a")) == 1  # not before 5 s
        await trio.sleep(POLL + 0.2)
        assert rig.log.count(("start", "mesh/a")) == 2
        assert rig.host.keys == {"mesh/a"} and rig.host.pending == {}
        assert trio.current_time() - failed_at >= 5


async def test_a_bug_in_starting_a_proxy_is_logged_with_its_traceback(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with running(tmp_path, fail_start={"mesh/a": TypeError("bug")}) as rig:
        with capture_logs() as logs:
            await rig.send(rig.pod("a"), rig.pod("b"))
        assert rig.host.pending == {"mesh/a": "failure to start proxy: bug"}
        assert rig.host.keys == {"mesh/b"}  # the other pod is not held up
        (entry,) = [e for e in logs if e["event"] == "pod enrollment failed; retrying"]
        assert entry["exc_info"] is True


async def test_redirection_that_cannot_be_installed_is_pending_and_retried(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with running(tmp_path) as rig:
        rig.redirector.fail_install = IptablesError("iptables-restore failed")
        await rig.send(rig.pod("a"))
        assert rig.host.pending == {
            "mesh/a": "failure to install redirection: iptables-restore failed"
        }
        assert rig.host.keys == set()  # no proxy without redirection
        rig.redirector.fail_install = None
        await trio.sleep(5 + POLL)
        assert rig.host.keys == {"mesh/a"} and rig.host.pending == {}


async def test_redirection_that_cannot_be_removed_is_removed_later_as_stranded(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with running(tmp_path) as rig:
        await rig.send(rig.pod("a"))
        held = rig.controller.pods["mesh/a"]
        rig.redirector.fail_remove = IptablesError("iptables-save: broken")
        with capture_logs() as logs:
            await rig.send(rig.pod("a", in_mesh=False))
            await trio.sleep(DRAIN + 3 * POLL)
        events = [e["event"] for e in logs]
        assert "could not remove pod rules" in events
        assert "could not check a pod for stranded rules" in events  # tried on later passes
        assert held.netns.closed and rig.host.keys == set()
        assert rig.redirector.state == {rig.ident("a"): "mesh/a"}
        rig.redirector.fail_remove = None
        with capture_logs() as logs:
            await trio.sleep(5 * POLL)
        assert rig.redirector.state == {}
        removed = [e for e in logs if e["event"].startswith("removed redirection rules")]
        assert [e["pod"] for e in removed] == ["mesh/a"]  # once


async def test_stranded_redirection_is_removed_once_per_netns(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    # A previous agent enrolled b; b left the mesh while no agent ran.
    b_netns = _netns_file(tmp_path, "b")
    with NetNamespace.open(b_netns.path) as ns:
        leftover = {ns.ident: "mesh/b"}
    b = Pod("Kubernetes//Pod/mesh/b", "b", "mesh", netns=b_netns, in_mesh=False)
    log: list[tuple[str, str]] = []
    redirector = Redirector(calls=log, state=dict(leftover))
    controller = EnrollmentController(
        ScriptedSource(),
        redirector,
        FakeHost(log),
        initial=PodSnapshot((b,), STATE),
        poll=POLL,
        blocking=inline,
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(controller.run)
        assert redirector.state == {}  # removed before the agent reports ready
        assert log == [("remove", "mesh/b")]
        await trio.sleep(10 * POLL)
        assert redirector.checks == 1  # checked once, not on every pass
        # A new sandbox under the same name is a new netns: checked again.
        fresh = tmp_path / "b.new"
        fresh.write_text("")
        os.replace(fresh, tmp_path / "b")
        await trio.sleep(2 * POLL)
        assert redirector.checks == 2
        assert log == [("remove", "mesh/b")]  # nothing there this time
        nursery.cancel_scope.cancel()


async def test_state_kept_outside_the_pods_is_pruned_after_the_first_pass_and_sandbox_changes(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """eBPF pins live in bpffs, not in the pod: the first pass prunes those of pods that went
    away while no agent ran, and a recreated sandbox's old pins go once it is let go."""
    a = Pod("Kubernetes//Pod/mesh/a", "a", "mesh", netns=_netns_file(tmp_path, "a"), in_mesh=True)
    async with running(tmp_path, a) as rig:
        assert rig.redirector.kept == [rig.ident("a")]  # before the agent reports ready
        rig.redirector.kept = None
        await rig.send(a, rig.pod("b"))
        await trio.sleep(5)
        assert rig.redirector.kept is None  # nothing let go: no prune on ordinary passes
        old = rig.ident("a")
        rig.recreate("a")
        await trio.sleep(2 * POLL)
        assert rig.redirector.kept == sorted([rig.ident("a"), rig.ident("b")])
        assert old not in rig.redirector.kept


async def test_the_redirection_view_shows_each_pod_as_installed(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with running(tmp_path) as rig:
        await rig.send(rig.pod("a"))
        rig.redirector.fail_describe = NetnsError("tc: not found")
        await rig.send(rig.pod("a"), rig.pod("b"))
        assert rig.host.keys == {"mesh/a", "mesh/b"}  # a view that fails stops no enrollment
        view = rig.controller.redirection()
        assert view["mode"] == "fake" and view["pods"] == {  # the summary, then per pod
            "Kubernetes//Pod/mesh/a": {
                "mode": "fake",
                "installed": True,
                "describedAt": view["pods"]["Kubernetes//Pod/mesh/a"]["describedAt"],
            },
            "Kubernetes//Pod/mesh/b": {
                "mode": "fake",
                "error": "tc: not found",
                "describedAt": view["pods"]["Kubernetes//Pod/mesh/b"]["describedAt"],
            },
        }
        assert view["pods"]["Kubernetes//Pod/mesh/a"]["describedAt"].endswith("+00:00")
        await rig.send(rig.pod("b"))
        await trio.sleep(DRAIN)
        assert set(rig.controller.redirection()["pods"]) == {"Kubernetes//Pod/mesh/b"}


async def test_a_pod_without_a_usable_netns_is_pending_until_it_has_one(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with running(tmp_path) as rig:
        unknown = Pod("Kubernetes//Pod/mesh/u", "u", "mesh", in_mesh=True)
        missing = rig.pod("m", netns=NetnsRef(str(tmp_path / "m")))
        blocker = socket.socket(socket.AF_UNIX)
        blocker.bind(str(tmp_path / "s"))  # exists, but open(2) of a socket fails (ENXIO)
        with blocker:
            await rig.send(unknown, missing, rig.pod("s", netns=NetnsRef(str(tmp_path / "s"))))
            assert rig.host.pending["mesh/u"] == "netns not known yet"
            assert rig.host.pending["mesh/m"] == f"netns {tmp_path / 'm'} not found"
            assert rig.host.pending["mesh/s"].startswith(f"cannot open netns {tmp_path / 's'}")
            assert rig.host.keys == set()
        (tmp_path / "s").unlink()
        rig.netns("m")
        await trio.sleep(2 * POLL)
        assert rig.host.keys == {"mesh/m"}
        assert set(rig.host.pending) == {"mesh/u", "mesh/s"}
        await rig.send(missing)  # u and s gone from the node: nothing left to wait for
        assert rig.host.pending == {}


# -- snapshots: one at a time, and only ones whose state was taken -------------------------


async def test_a_rejected_state_keeps_the_pods_on_the_last_good_snapshot(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with running(tmp_path) as rig:
        await rig.send(rig.pod("a"))
        rig.host.reject_state = ValueError("a service without ports")
        with capture_logs() as logs:
            await rig.send(rig.pod("a", in_mesh=False), state=MeshState())
            await trio.sleep(5)  # several passes
        (entry,) = [e for e in logs if e["event"].startswith("mesh state rejected")]
        assert entry["exc_info"] is True  # not one of our errors: a traceback
        assert rig.host.keys == {"mesh/a"}  # the host still has a in the mesh
        rig.host.reject_state = None
        fixed = MeshState(workloads=(Workload("Kubernetes//Pod/mesh/a", "a", "mesh"),))
        await rig.send(rig.pod("a", in_mesh=False), state=fixed)
        await trio.sleep(DRAIN)
        assert rig.host.keys == set()


async def test_a_malformed_snapshot_is_skipped(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with running(tmp_path) as rig:
        await rig.send(rig.pod("a"))
        with capture_logs() as logs:
            await rig.send(rig.pod("b"), rig.pod("b"))  # the same pod twice: a source bug
        assert [e["problem"] for e in logs if e["event"].startswith("pod snapshot rejected")] == [
            "duplicate pod 'mesh/b'"
        ]
        assert rig.host.keys == {"mesh/a"}
        await rig.send(rig.pod("b"))  # still following
        assert rig.host.keys == {"mesh/b"}


async def test_a_snapshot_without_state_leaves_the_state_alone(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with running(tmp_path) as rig:
        await rig.send(rig.pod("a"), state=None)  # e.g. ZDS: pods only
        assert rig.host.states == [STATE] and rig.host.keys == {"mesh/a"}


async def test_a_pod_dropped_mid_pass_is_not_enrolled(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with running(tmp_path, start_delay=1.0) as rig:
        await rig.source.send.send(PodSnapshot((rig.pod("c"), rig.pod("d")), STATE))
        while ("start", "mesh/c") not in rig.log:  # noqa: ASYNC110 - a fake's log
            await trio.sleep(0.1)  # the pass is now enrolling c; d is next
        await rig.source.send.send(PodSnapshot((rig.pod("c"),), STATE))
        await trio.sleep(10)
        # d was enrolled by the pass that began before it left, then un-enrolled.
        assert rig.host.keys == {"mesh/c"}
        assert set(rig.controller.pods) == {"mesh/c"}
        assert rig.redirector.state == {rig.ident("c"): "mesh/c"}


async def test_shutdown_leaves_redirection_in_place_and_closes_the_netns_fds(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with running(tmp_path) as rig:
        await rig.send(rig.pod("a"))
        held = rig.controller.pods["mesh/a"]
    assert held.netns.closed
    assert rig.redirector.state == {rig.ident("a"): "mesh/a"}  # fail closed
    assert ("remove", "mesh/a") not in rig.log


# -- the agent as the host: certificates of pods that left are forgotten -------------------


def _workload(name: str, sa: str, ip: str) -> Workload:
    return Workload(
        uid=f"Kubernetes//Pod/mesh/{name}",
        name=name,
        namespace="mesh",
        service_account=sa,
        workload_ips=(IPv4Address(ip),),
        protocol=TunnelProtocol.HBONE,
    )


async def test_the_agent_forgets_the_certificate_of_an_identity_no_pod_uses(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    config = Config(
        node_name="n1",
        fake_ca=True,
        secret_ttl=60.0,  # renewed every ~30 s
        packet_mark=0,
        enable_orig_src=False,
        outbound_addr=("127.0.0.1", 0),
        inbound_addr=("127.0.0.1", 0),
        inbound_plaintext_addr=("127.0.0.1", 0),
        admin_addr=("127.0.0.1", 0),
        stats_addr=("127.0.0.1", 0),
        readiness_addr=("127.0.0.1", 0),
    )
    agent = Agent(
        config, ca=FakeCA.ephemeral(), pod_sockets=lambda netns, mark: LocalSocketFactory(mark)
    )
    issued: list[Identity] = []

    def on_issue(identity: Identity, cert: WorkloadCertificate) -> None:
        issued.append(identity)

    agent.secrets.subscribe(on_issue)
    shared = Identity("cluster.local", "mesh", "shared")
    alone = Identity("cluster.local", "mesh", "alone")
    state = MeshState(
        workloads=(
            _workload("a", "shared", "127.0.0.11"),
            _workload("a2", "shared", "127.0.0.12"),
            _workload("c", "alone", "127.0.0.13"),
        )
    )
    source = ScriptedSource()
    controller = EnrollmentController(
        source, FakeRedirector(), agent, poll=POLL, drain_deadline=0.5, blocking=inline
    )
    agent.extra_services.append(controller.run)

    def pod(name: str, sa: str) -> Pod:
        return Pod(
            f"Kubernetes//Pod/mesh/{name}",
            name,
            "mesh",
            service_account=sa,
            netns=_netns_file(tmp_path, name),
            in_mesh=True,
        )

    a, a2, c = pod("a", "shared"), pod("a2", "shared"), pod("c", "alone")

    def identities() -> set[str]:
        return {str(entry["identity"]) for entry in agent.secrets.dump()}

    async with trio.open_nursery() as nursery:
        nursery.start_soon(agent.run)
        await source.send.send(PodSnapshot((a, a2, c), state))
        while agent.readiness():  # noqa: ASYNC110 - certificates issued for every pod
            await trio.sleep(0.5)
        assert set(agent.proxies) == {a.uid, a2.uid, c.uid}
        assert identities() == {str(shared), str(alone)}
        await source.send.send(PodSnapshot((a, a2), state))  # c deleted
        await trio.sleep(2)
        assert set(agent.proxies) == {a.uid, a2.uid}
        assert identities() == {str(shared)}
        assert agent.secrets.get(alone) is None
        await source.send.send(PodSnapshot((a2,), state))  # a deleted: a2 still uses it
        await trio.sleep(2)
        assert identities() == {str(shared)}
        before = len(issued)
        await trio.sleep(120)  # the remaining identity is renewed; the forgotten one is not
        renewed = issued[before:]
        assert renewed and set(renewed) == {shared}
        await source.send.send(PodSnapshot((), state))
        await trio.sleep(2)
        assert identities() == set() and agent.proxies == {}
        before = len(issued)
        await trio.sleep(120)
        assert issued[before:] == []  # nothing renews any more
        nursery.cancel_scope.cancel()


async def test_a_shared_agent_is_not_ready_before_its_first_pass_enrolled_every_pod(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """The first pod's proxy running is not readiness: a pod later in the same pass (its
    redirection slow to install, as eBPF's tc calls are) still waits for enrollment."""
    config = Config(
        node_name="n1",
        fake_ca=True,
        packet_mark=0,
        enable_orig_src=False,
        outbound_addr=("127.0.0.1", 0),
        inbound_addr=("127.0.0.1", 0),
        inbound_plaintext_addr=("127.0.0.1", 0),
        admin_addr=("127.0.0.1", 0),
        stats_addr=("127.0.0.1", 0),
        readiness_addr=("127.0.0.1", 0),
    )
    agent = Agent(
        config, ca=FakeCA.ephemeral(), pod_sockets=lambda netns, mark: LocalSocketFactory(mark)
    )
    gate = trio.Event()

    async def slow_for_b(fn: Callable[[], T]) -> T:
        if isinstance(fn, functools.partial) and getattr(fn.args[1], "name", "") == "b":
            await gate.wait()
        return await inline(fn)

    source = ScriptedSource()
    controller = EnrollmentController(
        source, FakeRedirector(), agent, poll=POLL, blocking=slow_for_b
    )
    agent.extra_services.append(controller.run)
    a, b = (
        Pod(f"Kubernetes//Pod/mesh/{n}", n, "mesh", netns=_netns_file(tmp_path, n), in_mesh=True)
        for n in ("a", "b")
    )
    state = MeshState(
        workloads=(_workload("a", "default", "127.0.0.11"), _workload("b", "default", "127.0.0.12"))
    )
    async with trio.open_nursery() as nursery:
        nursery.start_soon(agent.run)
        await source.send.send(PodSnapshot((a, b), state))
        await trio.sleep(5)
        assert set(agent.proxies) == {a.uid}  # a runs, b's redirection is still going in
        assert "proxy: workload proxies not started" in agent.readiness()
        gate.set()
        with trio.fail_after(60):  # virtual time: a readiness that never comes fails, not hangs
            while agent.readiness():  # noqa: ASYNC110 - b enrolled, certificates issued
                await trio.sleep(0.5)
        assert set(agent.proxies) == {a.uid, b.uid}
        nursery.cancel_scope.cancel()
