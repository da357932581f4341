"""Test apps for the loopback mesh: an echo server and checksummed transfers."""

from __future__ import annotations

import hashlib
import os

import trio


async def echo_handler(stream: trio.SocketStream) -> None:
    """Echo until EOF, then half-close: lets tests observe half-close both ways."""
    try:
        while data := await stream.receive_some(256 * 1024):
            await stream.send_all(data)
        await stream.send_eof()
    except trio.BrokenResourceError:
        pass
    finally:
        await trio.aclose_forcefully(stream)


async def serve_echo(
    host: str, port: int, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    listeners = await trio.open_tcp_listeners(port, host=host)
    task_status.started()
    await trio.serve_listeners(echo_handler, listeners)


def payload(size: int) -> bytes:
    # Repeat a random block: cheap to build, still catches reordering and corruption.
    block = os.urandom(min(size, 1 << 20))
    reps, rest = divmod(size, len(block)) if block else (0, 0)
    return block * reps + block[:rest]


async def echo_roundtrip(stream: trio.abc.HalfCloseableStream, data: bytes) -> bytes:
    """Send data, half-close, and collect everything echoed back until EOF."""
    received = bytearray()

    async def sender() -> None:
        view = memoryview(data)
        for i in range(0, len(data), 256 * 1024):
            await stream.send_all(view[i : i + 256 * 1024])
        await stream.send_eof()

    async def receiver() -> None:
        while chunk := await stream.receive_some(256 * 1024):
            received.extend(chunk)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(sender)
        nursery.start_soon(receiver)
    return bytes(received)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
