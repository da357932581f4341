"""Copy bytes both ways between two streams with half-close (upgraded HTTP, plain TCP).

EOF on one side becomes ``send_eof`` on the other when it can half-close, so a
client that finishes sending still gets the rest of the answer; the relay ends
when both directions ended or one side broke.
"""

from __future__ import annotations

import contextlib

import trio

RECEIVE_SIZE = 64 * 1024


async def _copy(
    src: trio.abc.Stream, dst: trio.abc.Stream, first: bytes, counter: list[int]
) -> None:
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
        if first:
            await dst.send_all(first)
            counter[0] += len(first)
        while chunk := await src.receive_some(RECEIVE_SIZE):
            await dst.send_all(chunk)
            counter[0] += len(chunk)
        if isinstance(dst, trio.abc.HalfCloseableStream):
            await dst.send_eof()
            return
    # A broken side or a peer that cannot half-close ends the whole relay.
    raise _Done


class _Done(Exception):
    pass


async def relay(
    a: trio.abc.Stream, b: trio.abc.Stream, *, a_first: bytes = b"", b_first: bytes = b""
) -> tuple[int, int]:
    """Relay until both directions end; returns (bytes a->b, bytes b->a).

    ``a_first`` / ``b_first`` are bytes already read from ``a`` / ``b`` (e.g. what an
    HTTP parser buffered past a 101) that must go out before anything else.
    """
    a_to_b, b_to_a = [0], [0]
    with contextlib.suppress(_Done, trio.BrokenResourceError, trio.ClosedResourceError):
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_copy, a, b, a_first, a_to_b)
                nursery.start_soon(_copy, b, a, b_first, b_to_a)
        except BaseExceptionGroup as group:
            _, rest = group.split(_Done)
            if rest is not None:
                raise rest from None
    return a_to_b[0], b_to_a[0]


class PrefixedStream(trio.abc.HalfCloseableStream):
    """``inner`` with ``prefix`` (bytes already read from it, e.g. by sniffing) put back."""

    def __init__(self, inner: trio.abc.Stream, prefix: bytes = b"") -> None:
        self.inner = inner
        self._prefix = prefix

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self._prefix:
            size = len(self._prefix) if max_bytes is None else max_bytes
            chunk, self._prefix = self._prefix[:size], self._prefix[size:]
            await trio.lowlevel.checkpoint()
            return chunk
        return bytes(await self.inner.receive_some(max_bytes))

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        if isinstance(self.inner, trio.abc.HalfCloseableStream):
            await self.inner.send_eof()
        else:
            await self.inner.aclose()

    async def aclose(self) -> None:
        await self.inner.aclose()
