"""HboneStream on its own: a fake connection (StreamHost) over in-memory engines delivers
events through the StreamEvents protocol exactly as the connection's reader does."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import trio

from ztunnel.hbone.engine import HboneEngine, StreamState
from ztunnel.hbone.errors import ConnectionGoneError, StreamRefusedError
from ztunnel.hbone.events import (
    Data,
    ErrorCode,
    Event,
    Response,
    StreamEnded,
    StreamReset,
    WindowOpened,
)
from ztunnel.hbone.stream import HboneStream, StreamEvents

ROOT = Path(__file__).resolve().parent.parent


class FakeHost:
    """The StreamHost side of a connection, with the peer (a server engine) in memory."""

    def __init__(self) -> None:
        self.engine = HboneEngine(client=True)
        self.peer = HboneEngine(client=False)
        self.kicks = 0
        self.written = 0  # the highest seq waited for: "written" once someone waits
        self.finished: list[StreamEvents] = []
        self.peer_events: list[Event] = []
        self.exchange()

    # -- StreamHost --------------------------------------------------------------------

    def kick(self) -> int:
        self.kicks += 1
        return self.kicks

    def flushed(self, seq: int) -> bool:
        return seq <= self.written

    async def wait_flushed(self, seq: int) -> None:
        self.written = max(self.written, seq)
        await trio.lowlevel.checkpoint()

    def stream_finished(self, stream: StreamEvents) -> None:
        self.finished.append(stream)

    # -- the wire ----------------------------------------------------------------------

    def exchange(self, stream: StreamEvents | None = None) -> None:
        """Move bytes both ways until quiet; deliver the client's events to ``stream``."""
        while True:
            up, down = self.engine.data_to_send(), self.peer.data_to_send()
            if not up and not down:
                return
            if up:
                self.peer_events += self.peer.receive_data(up)
            if down:
                for event in self.engine.receive_data(down):
                    if stream is not None:
                        dispatch(stream, event)

    def open(self) -> HboneStream:
        """A client stream the peer answered with 200 (events not yet delivered)."""
        sid = self.engine.send_connect("10.0.0.2:80")
        self.exchange()
        self.peer.respond(sid, 200)
        self.peer_events.clear()
        return HboneStream(self, sid)


def dispatch(stream: StreamEvents, event: Event) -> None:
    """What the connection's reader does for one stream's events."""
    if isinstance(event, Data):
        stream.deliver_data(event.data)
    elif isinstance(event, StreamEnded):
        stream.deliver_end()
    elif isinstance(event, StreamReset):
        stream.deliver_reset(event.error_code)
    elif isinstance(event, WindowOpened):
        stream.deliver_window()
    elif isinstance(event, Response):
        stream.deliver_response(event.status, event.headers)


async def test_state_follows_a_clean_exchange_and_finishes_once() -> None:
    host = FakeHost()
    stream = host.open()
    host.exchange(stream)
    assert stream.state is StreamState.OPEN
    assert await stream.wait_response() == (200, ())
    await stream.send_all(b"ping")
    await stream.send_eof()
    assert stream.state is StreamState.HALF_CLOSED_LOCAL
    assert host.finished == []
    host.peer.send_data(stream.stream_id, b"pong")
    host.peer.end_stream(stream.stream_id)
    host.exchange(stream)
    assert stream.state is StreamState.CLOSED and stream.finished
    assert host.finished == [stream]
    assert await stream.receive_some() == b"pong"
    assert await stream.receive_some() == b""
    assert await stream.receive_some() == b""  # EOF is sticky
    await stream.aclose()
    assert StreamReset not in {type(e) for e in host.peer_events}  # finished: no RST


async def test_data_and_eof_before_an_error_reset_are_still_read() -> None:
    host = FakeHost()
    stream = host.open()
    host.peer.send_data(stream.stream_id, b"all of it")
    host.peer.end_stream(stream.stream_id)
    host.exchange(stream)
    # Our end is half-closed (remote); the peer then breaks the stream.
    stream.deliver_reset(ErrorCode.INTERNAL_ERROR)
    assert stream.state is StreamState.RESET
    assert await stream.receive_some() == b"all of it"
    assert await stream.receive_some() == b""
    with pytest.raises(trio.BrokenResourceError, match="code 2"):
        await stream.send_all(b"x")


async def test_error_reset_breaks_the_reader_after_the_queued_data() -> None:
    host = FakeHost()
    stream = host.open()
    host.peer.send_data(stream.stream_id, b"partial")
    host.peer.reset(stream.stream_id, ErrorCode.INTERNAL_ERROR)
    host.exchange(stream)
    assert stream.reset_code == ErrorCode.INTERNAL_ERROR
    assert host.finished == [stream]
    assert await stream.receive_some() == b"partial"
    with pytest.raises(trio.BrokenResourceError, match="reset by peer"):
        await stream.receive_some()


@pytest.mark.parametrize("code", [ErrorCode.NO_ERROR, ErrorCode.CANCEL])
async def test_reset_no_error_or_cancel_reads_as_eof(code: ErrorCode) -> None:
    host = FakeHost()
    stream = host.open()
    host.peer.send_data(stream.stream_id, b"last words")
    host.peer.reset(stream.stream_id, code)
    host.exchange(stream)
    assert await stream.receive_some() == b"last words"
    assert await stream.receive_some() == b""
    with pytest.raises(trio.BrokenResourceError, match="was reset"):
        await stream.send_all(b"x")


async def test_connection_lost_after_end_stream_still_reads_eof() -> None:
    host = FakeHost()
    stream = host.open()
    host.peer.send_data(stream.stream_id, b"done")
    host.peer.end_stream(stream.stream_id)
    host.exchange(stream)
    stream.connection_lost("peer closed the connection")
    assert await stream.receive_some() == b"done"
    assert await stream.receive_some() == b""
    with pytest.raises(trio.BrokenResourceError, match="connection lost: peer closed"):
        await stream.send_all(b"x")


async def test_connection_lost_mid_stream_breaks_both_directions() -> None:
    host = FakeHost()
    stream = host.open()
    host.exchange(stream)
    stream.connection_lost("read failed")
    with pytest.raises(trio.BrokenResourceError, match="connection lost: read failed"):
        await stream.receive_some()
    with pytest.raises(trio.BrokenResourceError):
        await stream.send_eof()
    await stream.aclose()
    assert host.engine.data_to_send() == b""  # no RST on a lost connection


async def test_wait_response_fails_on_reset_or_lost_connection() -> None:
    host = FakeHost()
    refused = host.open()
    refused.deliver_reset(ErrorCode.REFUSED_STREAM)
    # Unprocessed by the peer: the one refusal a caller may retry.
    with pytest.raises(StreamRefusedError):
        await refused.wait_response()
    reset = host.open()
    reset.deliver_reset(ErrorCode.INTERNAL_ERROR)
    with pytest.raises(ConnectionGoneError, match=r"refused \(reset code 2\)") as info:
        await reset.wait_response()
    assert not isinstance(info.value, StreamRefusedError)
    lost = host.open()
    lost.connection_lost("read failed")
    with pytest.raises(ConnectionGoneError, match="before response: read failed") as info:
        await lost.wait_response()
    assert not isinstance(info.value, StreamRefusedError)


async def test_aclose_resets_an_unfinished_stream_and_closes_it_for_good() -> None:
    host = FakeHost()
    stream = host.open()
    host.exchange(stream)
    await stream.aclose()
    host.exchange()
    assert StreamReset(stream.stream_id, ErrorCode.CANCEL, remote=True) in host.peer_events
    assert stream.closed and stream.state is StreamState.RESET
    with pytest.raises(trio.ClosedResourceError):
        await stream.receive_some()
    with pytest.raises(trio.ClosedResourceError):
        await stream.send_all(b"x")
    with pytest.raises(trio.ClosedResourceError):
        await stream.send_eof()
    await stream.aclose()  # idempotent


async def test_reset_sends_the_code_and_breaks_further_io() -> None:
    host = FakeHost()
    stream = host.open()
    host.exchange(stream)
    stream.reset(ErrorCode.INTERNAL_ERROR)
    host.exchange()
    assert StreamReset(stream.stream_id, ErrorCode.INTERNAL_ERROR) in host.peer_events
    with pytest.raises(trio.BrokenResourceError, match="was reset"):
        await stream.receive_some()
    stream.reset(ErrorCode.CANCEL)  # already finished: nothing more is sent
    assert host.engine.data_to_send() == b""


async def test_send_after_eof_is_closed_resource() -> None:
    host = FakeHost()
    stream = host.open()
    host.exchange(stream)
    await stream.send_eof()
    await stream.send_eof()  # a second EOF is a no-op
    with pytest.raises(trio.ClosedResourceError, match="EOF was already sent"):
        await stream.send_all(b"x")


def _private_reach_through(path: Path) -> list[str]:
    """``x._name`` where x is not ``self``/``cls``/``super()`` or a class of the same module."""
    tree = ast.parse(path.read_text())
    own_classes = {n.name for n in ast.walk(tree) if isinstance(n, ast.ClassDef)}
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute) or not node.attr.startswith("_"):
            continue
        if node.attr.startswith("__"):
            continue
        owner = node.value
        if isinstance(owner, ast.Name) and owner.id in {"self", "cls", *own_classes}:
            continue
        if isinstance(owner, ast.Call) and getattr(owner.func, "id", None) == "super":
            continue
        found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {ast.unparse(node)}")
    return found


def test_hbone_and_its_users_touch_no_private_members_of_other_objects() -> None:
    paths = sorted((ROOT / "ztunnel" / "hbone").glob("*.py"))
    paths += [ROOT / "ztunnel" / "proxy" / "relay.py"]
    assert [hit for path in paths for hit in _private_reach_through(path)] == []


async def test_send_nowait_takes_what_the_window_allows_one_unwritten_chunk_at_a_time() -> None:
    host = FakeHost()
    stream = host.open()
    host.exchange(stream)
    assert stream.send_nowait(b"first") == 5
    # Not written yet (nobody waited): a second chunk is refused, send_all must wait.
    assert stream.send_nowait(b"second") == 0
    await stream.send_all(b"second")
    assert stream.send_nowait(b"third") == 5
    host.exchange(stream)
    assert [e.data for e in host.peer_events if isinstance(e, Data)] == [
        b"first",
        b"second",
        b"third",
    ]
    # The window bounds it: 4 MiB of 5 taken, the rest is for send_all.
    await host.wait_flushed(host.kicks)
    big = b"w" * (5 * 1024 * 1024)
    taken = stream.send_nowait(big)
    assert taken == 4 * 1024 * 1024 - 16  # the peer's stream window less what it holds
    assert stream.send_nowait(big[taken:]) == 0


async def test_send_nowait_leaves_errors_to_send_all() -> None:
    host = FakeHost()
    stream = host.open()
    host.exchange(stream)
    await stream.send_eof()
    assert stream.send_nowait(b"x") == 0
    with pytest.raises(trio.ClosedResourceError, match="EOF was already sent"):
        await stream.send_all(b"x")
    other = host.open()
    host.exchange(other)
    other.reset()
    assert other.send_nowait(b"x") == 0
    with pytest.raises(trio.BrokenResourceError):
        await other.send_all(b"x")
