"""One worker process as the control process sees it: spawn, requests and replies, reaping.

The worker is forked by the zygote (``workers/zygote.py``) and reparented to the control
process, whose main thread (the trio thread, which lives as long as the agent:
PR_SET_PDEATHSIG fires when the parent *thread* exits) reaps it. Its exit is watched
through a pidfd.
"""

from __future__ import annotations

import itertools
import os
import socket
import time
from collections.abc import Awaitable, Callable

import trio

from ztunnel.config import Config
from ztunnel.model.identity import Identity
from ztunnel.workers.channel import Channel
from ztunnel.workers.process import WorkerProcess
from ztunnel.workers.protocol import Hello

_keys = itertools.count(1)


async def spawn_link(
    slot: int,
    config: Config,
    fork: Callable[[int], Awaitable[WorkerProcess]],
    workers: int = 1,
) -> WorkerLink:
    """A new worker: ``fork(fd)`` starts the process that serves ``fd``, the far end of
    its channel."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        proc = await fork(theirs.fileno())
    except BaseException:
        ours.close()
        raise
    finally:
        theirs.close()
    return WorkerLink(slot, config, proc, ours, workers)


class WorkerGone(Exception):
    """The worker exited (or its channel closed) before it answered."""


class _Pending:
    def __init__(self) -> None:
        self.done = trio.Event()
        self.reply: object = None


class WorkerLink:
    """A spawned worker: its process, channel, the proxies and certificates it holds."""

    def __init__(
        self,
        slot: int,
        config: Config,
        proc: WorkerProcess,
        channel: socket.socket,
        workers: int = 1,
    ) -> None:
        """``proc`` serves the other end of ``channel``; ``workers`` is the pool's size."""
        self.slot = slot
        self.key = next(_keys)  # unique per process, across restarts of a slot
        self.proc = proc
        self.pid = proc.pid
        self.started = time.monotonic()
        self.channel = Channel(channel)
        self.channel.post(Hello(config, slot, workers))
        self.ready = False  # Ready received and state snapshot sent
        self.proxies: set[str] = set()  # group uids running in this worker
        self.identities: set[Identity] = set()  # certificates it asked for
        self.gone = False
        self.stopping = False  # asked to shut down: its EOF is expected
        self.nursery: trio.Nursery  # set by the pool while it serves this worker
        self._requests = itertools.count(1)
        self._pending: dict[int, _Pending] = {}

    def next_request(self) -> int:
        return next(self._requests)

    async def request(self, make: Callable[[int], object], fds: tuple[int, ...] = ()) -> object:
        """Post ``make(request_id)`` and wait for the reply with that id; WorkerGone if the
        worker exits first."""
        if self.gone:
            raise WorkerGone(f"worker {self.slot} is not running")
        request = self.next_request()
        pending = self._pending[request] = _Pending()
        self.channel.post(make(request), fds)
        try:
            await pending.done.wait()
        finally:
            self._pending.pop(request, None)
        if self.gone and pending.reply is None:
            raise WorkerGone(f"worker {self.slot} exited before answering")
        return pending.reply

    def answer(self, request: int, reply: object) -> None:
        pending = self._pending.get(request)
        if pending is not None:
            pending.reply = reply
            pending.done.set()

    def mark_gone(self) -> None:
        self.gone = True
        self.ready = False
        for pending in self._pending.values():
            pending.done.set()

    async def wait_exit(self) -> int:
        """Wait until the process exits; its return code."""
        code = self.proc.poll()
        if code is not None:
            return code
        try:
            pidfd = os.pidfd_open(self.pid)
        except ProcessLookupError:
            return self.proc.wait()
        try:
            await trio.lowlevel.wait_readable(pidfd)
        finally:
            os.close(pidfd)
        return self.proc.wait()

    async def reap(self, grace: float) -> int:
        """Close the channel (the worker exits on EOF), wait ``grace`` s, then SIGKILL."""
        self.mark_gone()
        self.channel.close()
        with trio.move_on_after(grace):
            return await self.wait_exit()
        self.proc.kill()  # unless it exited meanwhile (a reaped pid may be reused)
        return self.proc.wait()
