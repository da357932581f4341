"""What enrollment offers sources that own their pods' netns fds and want each start
attempt reported (ZDS): ephemeral netns refs are opened while the snapshot is taken and
never resolved again, every start attempt is reported, and a re-published snapshot
retries failed pods at once. No root: regular files stand in for network namespaces
(as in test_enroll_controller.py), time is trio's autojump clock."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import trio
import trio.testing
from structlog.testing import capture_logs

from tests.test_enroll_controller import POLL, STATE, FakeHost, Redirector, ScriptedSource, inline
from ztunnel.enroll.controller import RETRY_INTERVAL, EnrollmentController
from ztunnel.model.pod import NetnsRef, Pod, PodSnapshot

Reports = list[tuple[str, str | None]]


def _ident(path: Path) -> tuple[int, int]:
    st = os.stat(path)
    return (st.st_dev, st.st_ino)


def _pod(name: str, path: Path, **fields: object) -> Pod:
    return Pod(
        f"Kubernetes//Pod/mesh/{name}",
        name,
        "mesh",
        netns=NetnsRef(str(path), ephemeral=True),
        in_mesh=True,
        **fields,  # type: ignore[arg-type]
    )


def _recreate(path: Path) -> None:
    """The path now names another namespace (the old file lives on while an fd holds it)."""
    fresh = path.with_suffix(".new")
    fresh.write_text("")
    os.replace(fresh, path)


def _controller(
    source: object, host: FakeHost, reports: Reports, initial: PodSnapshot | None = None
) -> EnrollmentController:
    return EnrollmentController(
        source,  # type: ignore[arg-type]
        Redirector(calls=host.log),
        host,
        initial=initial,
        poll=POLL,
        blocking=inline,
        on_start=lambda pod, error: reports.append((pod.key, error)),
    )


async def test_an_ephemeral_netns_is_opened_when_the_snapshot_is_taken(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """Like ZDS: once the consumer asks for the next snapshot, the source closes the fd
    of a pod it dropped and the path may name another netns. The pods of the snapshot
    in hand must still be followed in the netns it named."""
    path = tmp_path / "fd-7"
    path.write_text("")
    original = _ident(path)

    async def source() -> AsyncIterator[PodSnapshot]:
        yield PodSnapshot((_pod("a", path),), None, "zds")
        _recreate(path)  # asked for the next one: the number now names another netns
        await trio.sleep_forever()

    class Source:
        def __aiter__(self) -> AsyncIterator[PodSnapshot]:
            return source()

    reports: Reports = []
    host = FakeHost([])
    controller = _controller(Source(), host, reports)
    async with trio.open_nursery() as nursery:
        await nursery.start(controller.run)
        await trio.sleep(10 * POLL)  # several passes, each re-checking the netns ident
        assert host.keys == {"mesh/a"}
        assert host.netns_of["Kubernetes//Pod/mesh/a"].ident == original
        assert [e for e in host.log if e[0] in ("start", "stop")] == [("start", "mesh/a")]
        assert reports == [("mesh/a", None)]
        nursery.cancel_scope.cancel()


async def test_the_same_ephemeral_netns_across_snapshots_is_not_a_new_sandbox(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    path = tmp_path / "fd-9"
    path.write_text("")
    source, host, reports = ScriptedSource(), FakeHost([]), Reports()
    controller = _controller(source, host, reports, PodSnapshot((), None, "zds"))
    async with trio.open_nursery() as nursery:
        await nursery.start(controller.run)
        for labels in ({"v": "1"}, {"v": "2"}, {"v": "3"}):
            await source.send.send(PodSnapshot((_pod("a", path, labels=labels),), None, "zds"))
            await trio.sleep(2 * POLL)
        assert [e for e in host.log if e[0] in ("start", "stop")] == [("start", "mesh/a")]
        assert reports == [("mesh/a", None)]  # one start attempt, reported once
        # One pin of ours per netns, not one per snapshot.
        assert len(controller._pins) == 1
        nursery.cancel_scope.cancel()
    assert controller._pins == {}  # closed with the controller


async def test_pins_are_closed_when_no_snapshot_names_them(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    a, b = tmp_path / "fd-a", tmp_path / "fd-b"
    a.write_text("")
    b.write_text("")
    source, host, reports = ScriptedSource(), FakeHost([]), Reports()
    before = len(os.listdir("/proc/self/fd"))
    first = PodSnapshot((_pod("a", a), _pod("b", b)), None, "zds")
    controller = _controller(source, host, reports, first)
    async with trio.open_nursery() as nursery:
        await nursery.start(controller.run)
        await trio.sleep(2 * POLL)
        await source.send.send(PodSnapshot((_pod("a", a),), None, "zds"))  # b deleted
        await trio.sleep(2 * POLL)
        assert host.keys == {"mesh/a"}
        assert {key for key, _ in controller._pins} == {"mesh/a"}
        nursery.cancel_scope.cancel()
    assert len(os.listdir("/proc/self/fd")) == before


async def test_every_start_attempt_is_reported(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    path = tmp_path / "fd-a"
    path.write_text("")
    source, reports = ScriptedSource(), Reports()
    host = FakeHost([], fail_start={"mesh/a": OSError(98, "Address already in use")})
    controller = _controller(source, host, reports, PodSnapshot((_pod("a", path),), None, "zds"))
    async with trio.open_nursery() as nursery:
        await nursery.start(controller.run)
        await trio.sleep(RETRY_INTERVAL + 2 * POLL)
        failures = [r for r in reports if r[1] is not None]
        assert len(failures) == 2  # the first attempt and the retry 5 s later
        assert all("failure to start proxy" in str(r[1]) for r in failures)
        assert "Address already in use" in str(failures[0][1])
        del host.fail_start["mesh/a"]
        await trio.sleep(RETRY_INTERVAL)
        assert reports[-1] == ("mesh/a", None) and host.keys == {"mesh/a"}
        nursery.cancel_scope.cancel()


async def test_a_pod_whose_netns_cannot_be_opened_is_reported(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    source, host, reports = ScriptedSource(), FakeHost([]), Reports()
    controller = _controller(
        source, host, reports, PodSnapshot((_pod("a", tmp_path / "gone"),), None, "zds")
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(controller.run)
        await trio.sleep(2 * POLL)
        assert reports and reports[0][0] == "mesh/a" and reports[0][1] is not None
        assert "mesh/a" in host.pending
        nursery.cancel_scope.cancel()


async def test_a_republished_snapshot_retries_failed_pods_at_once(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """istio-cni re-sends the Add of a pod whose start failed; ZDS re-publishes the same
    pods, and the controller must not wait out the 5 s retry (the Ack is due in 5 s)."""
    path = tmp_path / "fd-a"
    path.write_text("")
    source, reports = ScriptedSource(), Reports()
    host = FakeHost([], fail_start={"mesh/a": OSError(98, "Address already in use")})
    snap = PodSnapshot((_pod("a", path),), None, "zds")
    controller = _controller(source, host, reports, snap)
    async with trio.open_nursery() as nursery:
        await nursery.start(controller.run)
        await trio.sleep(POLL)
        del host.fail_start["mesh/a"]
        start = trio.current_time()
        await source.send.send(snap)
        await _until(lambda: host.keys == {"mesh/a"})
        assert trio.current_time() - start < 1.0
        assert reports[-1] == ("mesh/a", None)
        nursery.cancel_scope.cancel()


async def test_a_broken_reporter_does_not_stop_enrollment(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    path = tmp_path / "fd-a"
    path.write_text("")
    source, host = ScriptedSource(), FakeHost([])

    def broken(pod: Pod, error: str | None) -> None:
        raise RuntimeError("bug")

    controller = EnrollmentController(
        source,
        Redirector(calls=host.log),
        host,
        initial=PodSnapshot((_pod("a", path),), STATE, "zds"),
        poll=POLL,
        blocking=inline,
        on_start=broken,
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(controller.run)
        await trio.sleep(2 * POLL)
        assert host.keys == {"mesh/a"}
        nursery.cancel_scope.cancel()


async def _until(cond: Callable[[], bool]) -> None:
    with trio.fail_after(30):
        while not cond():  # noqa: ASYNC110 - the fake host has no event to wait on
            await trio.sleep(0.01)


# -- leaving the mesh (Kubernetes: the annotation is taken off) ------------------------------


def _leave_controller(
    source: ScriptedSource, host: FakeHost, left: list[str], initial: PodSnapshot
) -> tuple[EnrollmentController, Redirector]:
    redirector = Redirector(calls=host.log)

    def report(pod: Pod) -> None:
        left.append(pod.key)
        host.log.append(("left", pod.key))

    controller = EnrollmentController(
        source,
        redirector,
        host,
        initial=initial,
        poll=POLL,
        blocking=inline,
        drain_deadline=0.0,
        on_leave=report,
    )
    return controller, redirector


def _plain(name: str, path: Path, **fields: object) -> Pod:
    """A pod whose netns the source names by path (Kubernetes, the cluster file)."""
    return Pod(
        f"Kubernetes//Pod/mesh/{name}",
        name,
        "mesh",
        netns=NetnsRef(str(path)),
        **{"in_mesh": True, **fields},  # type: ignore[arg-type]
    )


async def test_leaving_the_mesh_is_reported_once_the_redirection_is_removed(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    paths = {n: tmp_path / n for n in ("a", "b", "c")}
    for path in paths.values():
        path.write_text("")
    pods = {n: _plain(n, p) for n, p in paths.items()}
    source, host, left = ScriptedSource(), FakeHost([]), list[str]()
    controller, _ = _leave_controller(source, host, left, PodSnapshot(tuple(pods.values())))
    async with trio.open_nursery() as nursery:
        await nursery.start(controller.run)
        assert host.keys == {"mesh/a", "mesh/b", "mesh/c"} and left == []
        # a leaves the mesh (label removed), b is deleted, c's sandbox is recreated.
        _recreate(paths["c"])
        await source.send.send(PodSnapshot((_plain("a", paths["a"], in_mesh=False), pods["c"])))
        await trio.sleep(4 * POLL)
        assert sorted(left) == ["mesh/a", "mesh/b"]
        a_events = [e for e in host.log if e[1] == "mesh/a"][-3:]
        assert a_events == [("remove", "mesh/a"), ("left", "mesh/a"), ("release", "mesh/a")]
        assert host.keys == {"mesh/c"}  # re-enrolled in its new netns: it never left
        nursery.cancel_scope.cancel()
    assert sorted(left) == ["mesh/a", "mesh/b"]  # shutdown leaves everyone in the mesh


async def test_a_failed_removal_is_reported_when_the_stranded_rules_go(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    path = tmp_path / "a"
    path.write_text("")
    source, host, left = ScriptedSource(), FakeHost([]), list[str]()
    controller, redirector = _leave_controller(
        source, host, left, PodSnapshot((_plain("a", path),))
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(controller.run)
        redirector.fail_remove = OSError("iptables-restore: resource busy")
        await source.send.send(PodSnapshot((_plain("a", path, in_mesh=False),)))
        await trio.sleep(4 * POLL)
        assert left == []  # the pod's traffic is still redirected: it has not left yet
        redirector.fail_remove = None
        await trio.sleep(4 * POLL)
        assert left == ["mesh/a"]
        nursery.cancel_scope.cancel()


async def test_a_broken_leave_reporter_does_not_stop_unenrollment(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    path = tmp_path / "a"
    path.write_text("")
    source, host = ScriptedSource(), FakeHost([])

    def broken(pod: Pod) -> None:
        raise RuntimeError("bug")

    controller = EnrollmentController(
        source,
        Redirector(calls=host.log),
        host,
        initial=PodSnapshot((_plain("a", path),)),
        poll=POLL,
        blocking=inline,
        drain_deadline=0.0,
        on_leave=broken,
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(controller.run)
        with capture_logs() as logs:
            await source.send.send(PodSnapshot((_plain("a", path, in_mesh=False),)))
            await trio.sleep(4 * POLL)
        assert host.keys == set() and ("release", "mesh/a") in host.log
        assert any(e["event"] == "leave report failed" for e in logs)
        nursery.cancel_scope.cancel()
