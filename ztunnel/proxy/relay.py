"""Bidirectional copy between two half-closeable streams.

Theory of operation: one coroutine per direction (a -> b in the caller's task,
b -> a in one child task: a task and its frames are most of what an idle
connection holds). EOF on one side becomes
``send_eof`` on the other (TCP FIN <-> HTTP/2 END_STREAM) and that direction
ends; the relay ends when both have. A failure in either direction is not a
half-close: it cancels the other direction and is reported as the error, with
the stream that failed (so the access log can say which side ended it).

A relay that does not end cleanly (a failure, or cancelled: drain deadline,
policy cut) *aborts* both streams before returning: a truncated connection must
never look like a clean end (RFC 9113 §8.5): a TCP socket is closed with RST
(SO_LINGER 0), an HBONE stream with RST_STREAM(CONNECT_ERROR), which ztunnel and
we treat as an error (only NO_ERROR and CANCEL are EOF). The peer agent then
resets its own app connection, so an abort travels end to end as an abort.

Read sizes grow like ztunnel's copy loop (1 KiB, then 16 KiB after 128 KiB,
then 256 KiB after 10 MiB), so idle or chatty connections stay small while bulk
transfers get large reads. Byte counts are reported live through callbacks.

HBONE stream -> TCP socket: while the copy task waits for data, the HBONE reader
writes each DATA frame (up to the current read size) straight to the socket
without blocking (``HboneStream.direct_sink``), which saves two task switches
per frame on request/response traffic; whatever the socket does not take is
queued and copied by the task as usual.
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import trio

from ztunnel.hbone.events import ErrorCode
from ztunnel.hbone.stream import HboneStream
from ztunnel.proxy.outcome import describe

SMALL, MEDIUM, LARGE = 1024, 16 * 1024 - 64, 256 * 1024 - 64
MEDIUM_AFTER, LARGE_AFTER = 128 * 1024, 10 * 1024 * 1024


def read_size(transferred: int) -> int:
    if transferred >= LARGE_AFTER:
        return LARGE
    if transferred >= MEDIUM_AFTER:
        return MEDIUM
    return SMALL


_LINGER_RESET = struct.pack("ii", 1, 0)
# What a broken stream raises while relaying.
STREAM_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)


@dataclass(slots=True)
class RelayResult:
    a_to_b: int = 0
    b_to_a: int = 0
    error: str | None = None
    failed: Literal["a", "b"] | None = None  # the stream whose read or write failed first


class StreamFailed(Exception):
    """A read from or a write to ``stream`` failed while copying (``cause``)."""

    def __init__(self, stream: trio.abc.AsyncResource, cause: BaseException) -> None:
        super().__init__(describe(cause))
        self.stream = stream
        self.cause = cause


def abort(stream: trio.abc.AsyncResource) -> None:
    """Make the coming close of ``stream`` say "truncated", never "finished".

    Synchronous and idempotent: a TCP socket gets SO_LINGER 0 (its close sends RST
    and drops unsent bytes), an HBONE stream is reset with CONNECT_ERROR now.
    Other streams (in-memory ones in tests) are left alone.
    """
    if isinstance(stream, HboneStream):
        stream.reset(ErrorCode.CONNECT_ERROR)
    elif isinstance(stream, trio.SocketStream):
        with contextlib.suppress(OSError):  # already closed: nothing left to reset
            stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)


async def close_now(stream: trio.abc.AsyncResource) -> None:
    """Close ``stream`` without blocking, like ``trio.aclose_forcefully``, but without its
    cancel scope and Cancelled for the two kinds a flow holds (a TCP socket, an HBONE
    stream): their close is synchronous (~100 fewer calls per connection end)."""
    if type(stream) is trio.SocketStream:
        stream.socket.close()
    elif isinstance(stream, HboneStream):
        stream.close()
    else:
        await trio.aclose_forcefully(stream)


class _Direction:
    """One direction's counters: ``wrote`` is both the copy loop's and the direct sink's
    byte callback (one small object per direction instead of closures and cells)."""

    __slots__ = ("forward", "on_count", "result", "total")

    def __init__(self, result: RelayResult, forward: bool, on_count: Callable[[int], None]):
        self.result = result
        self.forward = forward
        self.on_count = on_count
        self.total = 0

    def wrote(self, n: int) -> None:
        self.total += n
        if self.forward:
            self.result.a_to_b += n
        else:
            self.result.b_to_a += n
        self.on_count(n)


async def copy_one_way(
    src: trio.abc.ReceiveStream,
    dst: trio.abc.HalfCloseableStream,
    count: Callable[[int], None],
) -> int:
    """Copy until EOF, then half-close ``dst``. Returns the bytes copied.

    Raises StreamFailed naming the stream (``src`` or ``dst``) whose operation failed.
    """
    direction = _Direction(RelayResult(), True, count)
    await _copy(src, dst, direction, None)
    return direction.total


async def _copy(
    src: trio.abc.ReceiveStream,
    dst: trio.abc.HalfCloseableStream,
    direction: _Direction,
    cancel: trio.CancelScope | None,
) -> None:
    """Copy until EOF, then half-close ``dst``. Without ``cancel``, a failure raises
    StreamFailed; with it, the failure is recorded in the result (the first one wins)
    and cancels the relay.

    A plain socket is read here directly (os.read, wait_readable only when it would
    block) rather than through SocketStream.receive_some, its socket's recv and
    _nonblocking_helper: an idle direction waits in one ztunnel frame instead of four,
    and each read makes fewer calls. Same checkpoints as trio's: one wait, or one yield
    after a read that did not wait. The last chunk is dropped before the next wait.
    """
    direct = isinstance(src, HboneStream) and isinstance(dst, trio.SocketStream)
    if direct:
        assert isinstance(src, HboneStream) and isinstance(dst, trio.SocketStream)
        src.direct_sink = _socket_sink(dst, direction.wrote)
    sock = src.socket if type(src) is trio.SocketStream else None
    out = dst.socket if type(dst) is trio.SocketStream else None
    # Our reads checkpoint: an HBONE destination takes each chunk without send_all's own.
    hbone_dst = dst if isinstance(dst, HboneStream) else None
    drained = False  # the last read was short: the socket had nothing more then
    try:
        try:
            while True:
                size = read_size(direction.total)
                try:
                    if sock is None:
                        data = await src.receive_some(size)
                    elif not drained and (now := _read_now(sock, size)) is not None:
                        data = now
                        await trio.lowlevel.checkpoint()
                    else:
                        # Wait first after a short read: reading again would only
                        # fail with EAGAIN (one syscall per request saved).
                        while True:
                            await trio.lowlevel.wait_readable(sock)
                            if (now := _read_now(sock, size)) is not None:
                                data = now
                                break
                    drained = len(data) < size
                except STREAM_ERRORS as exc:
                    raise StreamFailed(src, exc) from exc
                if not data:
                    break
                try:
                    if out is not None:
                        if (rest := _write_now(out, data)) is None:
                            await dst.send_all(data)
                        elif rest:  # the socket took part of it: trio waits for room
                            await dst.send_all(rest)
                    else:
                        taken = 0
                        if hbone_dst is not None and type(data) is bytes:
                            taken = hbone_dst.send_nowait(data)
                        if taken < len(data):
                            await dst.send_all(data[taken:] if taken else data)
                except STREAM_ERRORS as exc:
                    raise StreamFailed(dst, exc) from exc
                direction.wrote(len(data))
                del data  # an idle direction holds no buffer
                now = None
        finally:
            if direct:
                assert isinstance(src, HboneStream)
                src.direct_sink = None
        try:
            if out is None:
                await dst.send_eof()
            elif not out.did_shutdown_SHUT_WR:  # trio's send_eof, without its task switch
                out.shutdown(socket.SHUT_WR)
        except STREAM_ERRORS as exc:
            raise StreamFailed(dst, exc) from exc
    except StreamFailed as exc:
        if cancel is None:
            raise
        result = direction.result
        if result.error is None:
            result.error = str(exc)
            # forward: src is a; backward: src is b
            result.failed = "a" if (exc.stream is src) == direction.forward else "b"
        cancel.cancel()


def _read_now(sock: trio.socket.SocketType, size: int) -> bytes | None:
    """One non-blocking read (None: nothing yet). The descriptor is looked up each time:
    -1 once closed, so a reused descriptor is never read."""
    try:
        return os.read(sock.fileno(), size)
    except BlockingIOError:
        return None


def _write_now(sock: trio.socket.SocketType, data: bytes | bytearray) -> bytes | bytearray | None:
    """One non-blocking write: what is left of ``data`` (b"": all written), or None when
    the socket is closed (trio's send_all then raises the right error). Raises OSError.
    A ready socket takes the chunk without the task switch trio's send makes; the copy
    loop's read has checkpointed already."""
    fd = sock.fileno()  # -1 once closed: never write to a reused descriptor
    if fd < 0:
        return None
    try:
        n = os.write(fd, data)
    except BlockingIOError:
        return data
    return data[n:] if n < len(data) else b""


def _socket_sink(dst: trio.SocketStream, wrote: Callable[[int], None]) -> Callable[[bytes], int]:
    sock = dst.socket

    def sink(data: bytes) -> int:
        fd = sock.fileno()  # -1 once closed: never write to a reused descriptor
        if fd < 0:
            return 0
        try:
            n = os.write(fd, data)
        except OSError:  # full, or failed: the copy task's own send reports errors
            return 0
        wrote(n)
        return n

    return sink


async def relay(
    a: trio.abc.HalfCloseableStream,
    b: trio.abc.HalfCloseableStream,
    *,
    on_a_to_b: Callable[[int], None] = lambda n: None,
    on_b_to_a: Callable[[int], None] = lambda n: None,
) -> RelayResult:
    """Relay until both directions reach EOF or one fails. Does not close a or b, but
    aborts both (``abort``) unless the relay ended cleanly, also when cancelled."""
    result = RelayResult()
    try:
        # A failure cancels the nursery's own scope (no second scope): the nursery
        # absorbs that Cancelled; one from outside propagates.
        async with trio.open_nursery() as nursery:
            cancel = nursery.cancel_scope
            backward = _Direction(result, False, on_b_to_a)
            nursery.start_soon(_copy, b, a, backward, cancel, name=_TASK_NAME)
            await _copy(a, b, _Direction(result, True, on_a_to_b), cancel)
    except BaseException:  # cancelled from outside (drain deadline, policy cut) or a bug
        abort(a)
        abort(b)
        raise
    if result.error is not None:
        abort(a)
        abort(b)
    return result


_TASK_NAME = "relay"  # a constant: trio would otherwise format a name string per task
