"""Worker processes are forked out of the agent's imported modules (workers/zygote.py):
they share those pages with the control process, stay its children, and none outlives it,
whichever of the agent's processes is killed."""

from __future__ import annotations

import os
import signal
import socket
import struct
import time
from pathlib import Path

import pytest
import trio
from test_workers_process import _alive, _records, _start

from ztunnel.workers import zygote
from ztunnel.workers.zygote import Zygote

pytestmark = pytest.mark.timeout(120)
MIB = 1024 * 1024


def _children(pid: int) -> set[int]:
    found: set[int] = set()
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            found |= {int(child) for child in f.read().split()}
    return {child for child in found if _alive(child)}


def _ppid(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


def _shared_anonymous_bytes(pid: int) -> int:
    """Dirty pages this process shares with another: a forked child's inherited heap
    (a fresh interpreter shares only clean file pages: libraries, the executable)."""
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Shared_Dirty:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no Shared_Dirty in smaps_rollup")


def _until(cond: object, what: str, limit: float = 30.0) -> None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if callable(cond) and cond():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_workers_are_forked_children_sharing_the_agents_modules(tmp_path: Path) -> None:
    proc, log, pids = _start(tmp_path)
    try:
        assert len(pids) == 2
        others = _children(proc.pid) - set(pids)
        assert len(others) == 1, others  # the zygote
        (zygote_pid,) = others
        for pid in pids:
            assert _ppid(pid) == proc.pid  # reaped and watched by the control process
            assert _shared_anonymous_bytes(pid) >= 8 * MIB, pid
        # A worker that dies is forked again, sharing as much.
        os.kill(pids[0], signal.SIGKILL)
        known = {*pids, zygote_pid}
        _until(lambda: len(_children(proc.pid) - known) == 1, "the restart")
        (again,) = _children(proc.pid) - known
        _until(lambda: _shared_anonymous_bytes(again) >= 8 * MIB, "a forked restart")
        assert any("SIGKILL" in str(r.get("status")) for r in _records(log))
    finally:
        proc.kill()
        proc.wait()


def test_a_killed_zygote_is_replaced_and_nothing_outlives_the_agent(tmp_path: Path) -> None:
    proc, log, pids = _start(tmp_path)
    try:
        (zygote_pid,) = _children(proc.pid) - set(pids)
        os.kill(zygote_pid, signal.SIGKILL)
        time.sleep(0.5)
        assert all(_alive(p) for p in pids)  # the workers do not depend on it
        os.kill(pids[0], signal.SIGKILL)
        _until(
            lambda: len(_children(proc.pid) - {pids[1]}) == 2,
            "a new zygote and the restarted worker",
        )
        assert any(
            r.get("message") == "worker zygote gone, starting a new one" for r in _records(log)
        )
        family = _children(proc.pid) | {pids[1]}
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=20)
        _until(lambda: not any(_alive(p) for p in family), "every process of the agent to die")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


async def test_the_zygote_refuses_a_request_without_a_channel() -> None:
    """A malformed request gets an error answer (-EINVAL), not a worker; the zygote goes on."""
    zyg = Zygote.exec()
    try:
        sock = zyg._sock
        sock.send(zygote.SPAWN)  # no descriptor
        await trio.lowlevel.wait_readable(sock)
        (answer,) = struct.unpack("!i", sock.recv(4))
        assert answer < 0
        ours, theirs = socket.socketpair()
        with ours, theirs:
            worker = await zyg.spawn(theirs.fileno())
            assert _ppid(worker.pid) == os.getpid()
            ours.close()  # EOF before any Hello: the worker exits
            with trio.fail_after(30):
                while worker.poll() is None:  # noqa: ASYNC110 - a child's exit has no event here
                    await trio.sleep(0.05)
        assert worker.returncode is not None
    finally:
        zyg.close()
    assert not _alive(zyg.pid)
