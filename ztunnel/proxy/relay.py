"""Bidirectional copy between two half-closeable streams.

Theory of operation: one task per direction. EOF on one side becomes
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


@dataclass
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


async def copy_one_way(
    src: trio.abc.ReceiveStream,
    dst: trio.abc.HalfCloseableStream,
    count: Callable[[int], None],
) -> int:
    """Copy until EOF, then half-close ``dst``. Returns the bytes copied.

    Raises StreamFailed naming the stream (``src`` or ``dst``) whose operation failed.
    """
    total = 0

    def wrote(n: int) -> None:
        nonlocal total
        total += n
        count(n)

    direct = isinstance(src, HboneStream) and isinstance(dst, trio.SocketStream)
    if direct:
        assert isinstance(src, HboneStream) and isinstance(dst, trio.SocketStream)
        src.direct_sink = _socket_sink(dst, wrote)
    try:
        while True:
            try:
                data = await src.receive_some(read_size(total))
            except STREAM_ERRORS as exc:
                raise StreamFailed(src, exc) from exc
            if not data:
                break
            try:
                await dst.send_all(data)
            except STREAM_ERRORS as exc:
                raise StreamFailed(dst, exc) from exc
            wrote(len(data))
    finally:
        if direct:
            assert isinstance(src, HboneStream)
            src.direct_sink = None
    try:
        await dst.send_eof()
    except STREAM_ERRORS as exc:
        raise StreamFailed(dst, exc) from exc
    return total


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

    async def direction(
        src: trio.abc.HalfCloseableStream,
        dst: trio.abc.HalfCloseableStream,
        forward: bool,
        cancel: trio.CancelScope,
    ) -> None:
        def count(n: int) -> None:
            if forward:
                result.a_to_b += n
                on_a_to_b(n)
            else:
                result.b_to_a += n
                on_b_to_a(n)

        try:
            await copy_one_way(src, dst, count)
        except StreamFailed as exc:
            if result.error is None:
                result.error = str(exc)
                result.failed = "a" if exc.stream is a else "b"
            cancel.cancel()

    try:
        with trio.CancelScope() as scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(direction, a, b, True, scope)
                nursery.start_soon(direction, b, a, False, scope)
    except BaseException:  # cancelled from outside (drain deadline, policy cut) or a bug
        abort(a)
        abort(b)
        raise
    if result.error is not None:
        abort(a)
        abort(b)
    return result
