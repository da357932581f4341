"""The trio driver of ``workers/protocol.py``: one unix stream socket, messages and fds.

Sending is queued: ``post`` never blocks (it is called from store and certificate
callbacks), a writer task drains the queue in order, so messages reach the peer in the
order they were posted. Descriptors handed to ``post`` are duplicated at once, so the
caller may close its own copy (a pod's netns may be closed by enrollment meanwhile).
"""

from __future__ import annotations

import array
import errno
import math
import os
import socket
from collections.abc import Sequence

import trio

from ztunnel.workers.protocol import MAX_FDS, FrameDecoder, encode

RECV_SIZE = 256 * 1024
_CMSG_SPACE = socket.CMSG_SPACE(MAX_FDS * array.array("i").itemsize)


class ChannelClosed(Exception):
    """The peer went away (EOF or a broken socket)."""


class Channel:
    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.sock = sock
        self._decoder = FrameDecoder()
        self._ready: list[tuple[object, list[int]]] = []
        self._send, self._queue = trio.open_memory_channel[tuple[bytes, list[int]]](math.inf)
        self._current: tuple[memoryview, list[int]] | None = None  # the frame being sent
        self._finished = False
        self.closed = False

    def post(self, message: object, fds: Sequence[int] = ()) -> None:
        """Queue ``message`` (with duplicates of ``fds``) for the writer task."""
        if self.closed or self._finished:
            return
        frame = encode(message, len(fds))
        self._send.send_nowait((frame, [os.dup(fd) for fd in fds]))

    async def run_writer(self) -> None:
        """Send queued frames in order until ``finish``; raises ChannelClosed on a dead peer.

        Cancellation may stop it mid-frame: the rest of that frame goes first when it runs
        again (a graceful stop restarts it to flush), so the stream never desynchronises."""
        while True:
            if self._current is None:
                try:
                    frame, fds = await self._queue.receive()
                except trio.EndOfChannel:
                    return
                self._current = (memoryview(frame), fds)
            await self._send_current()

    async def _send_current(self) -> None:
        assert self._current is not None
        view, fds = self._current
        ancillary = (
            [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
        )
        while view:
            try:
                sent = self.sock.sendmsg([view], ancillary)
            except BlockingIOError:
                await trio.lowlevel.wait_writable(self.sock)
                continue
            except OSError as exc:
                raise ChannelClosed(f"send failed: {exc}") from exc
            if ancillary:  # the descriptors went with the first byte
                ancillary = []
                self._close_fds(fds)
                fds = []
            view = view[sent:]
            self._current = (view, fds)
        self._current = None

    def finish(self) -> None:
        """No more messages: the writer returns once everything queued is sent."""
        self._finished = True
        self._send.close()

    @staticmethod
    def _close_fds(fds: list[int]) -> None:
        for fd in fds:
            os.close(fd)

    async def receive(self) -> tuple[object, list[int]]:
        """The next message and its descriptors (the caller owns them)."""
        while not self._ready:
            await trio.lowlevel.wait_readable(self.sock)
            try:
                data, ancdata, _flags, _addr = self.sock.recvmsg(
                    RECV_SIZE, _CMSG_SPACE, socket.MSG_CMSG_CLOEXEC
                )
            except BlockingIOError:
                continue
            except OSError as exc:
                if exc.errno in (errno.ECONNRESET, errno.EPIPE, errno.EBADF):
                    raise ChannelClosed(str(exc)) from exc
                raise
            fds = _fds_of(ancdata)
            if not data:
                for fd in fds:
                    os.close(fd)
                raise ChannelClosed("peer closed the channel")
            self._decoder.feed(data, fds)
            self._ready.extend(self._decoder.frames())
        return self._ready.pop(0)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._send.close()
        if self._current is not None:
            self._close_fds(self._current[1])
            self._current = None
        while True:  # frames never sent: their duplicated descriptors are ours to close
            try:
                _frame, fds = self._queue.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                break
            for fd in fds:
                os.close(fd)
        self._decoder.close()
        for _, fds in self._ready:
            for fd in fds:
                os.close(fd)
        self._ready.clear()
        self.sock.close()


def _fds_of(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(data) - len(data) % array.array("i").itemsize
            fds.extend(array.array("i", data[:usable]))
    return fds
