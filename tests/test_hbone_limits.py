"""Limits against hostile HBONE peers (issue 14): flood budgets, header blocks capped while
they arrive, bounded work per turn, the pending-connect limit, the idle timeout, and a peer
that makes our send window negative.

Engine transcripts first (sans-IO, a fake clock: budgets do not refill unless the test
moves time), then the trio driver over real TLS with a plain h2 peer (hbone_certs).
"""

from __future__ import annotations

from collections.abc import Callable

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.settings
import pytest
import structlog
import trio
from hbone_certs import tls_pair
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    Frame,
    HeadersFrame,
    PingFrame,
    SettingsFrame,
    WindowUpdateFrame,
)
from test_hbone_engine import Pair, _goaway_code
from test_hbone_hostile import RawPeer

from ztunnel.hbone.connection import HboneServerStream, serve_hbone
from ztunnel.hbone.engine import HboneEngine
from ztunnel.hbone.events import ConnectionClosed, ConnectRequest, ErrorCode, Event, StreamReset
from ztunnel.hbone.limits import Budget, FloodLimits, Limit, TokenBucket
from ztunnel.hbone.settings import HboneSettings
from ztunnel.telemetry.metrics import Metrics

AUTHORITY = "10.0.0.2:80"
CALM = ErrorCode.ENHANCE_YOUR_CALM


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def closed_by(events: list[Event]) -> list[ConnectionClosed]:
    return [e for e in events if isinstance(e, ConnectionClosed)]


def settings(**flood: Budget) -> HboneSettings:
    return HboneSettings(ping_interval=None, flood=FloodLimits(**flood))


# -- engine: rapid reset -----------------------------------------------------------------


def test_rapid_reset_past_the_budget_gets_goaway_enhance_your_calm() -> None:
    pair = Pair(settings(resets=Budget(10, 0.0)), clock=Clock())
    for i in range(10):
        sid = pair.client.send_connect(AUTHORITY)
        pair.client.reset(sid, ErrorCode.CANCEL)
        pair.pump()
        assert not closed_by(pair.take("server")), f"closed after {i + 1} resets"
    sid = pair.client.send_connect(AUTHORITY)
    pair.client.reset(sid, ErrorCode.CANCEL)
    (closed,) = closed_by(pair.server.receive_data(pair.client.data_to_send()))
    assert closed.limit == Limit.RESETS and closed.error_code == CALM
    assert _goaway_code(pair.server.data_to_send()) == CALM
    assert pair.server.closed


def test_resets_of_answered_streams_are_not_counted() -> None:
    # A client cancelling streams it got a 200 for is ordinary (a closed app socket).
    pair = Pair(settings(resets=Budget(10, 0.0)), clock=Clock())
    for _ in range(50):
        sid = pair.open()
        pair.client.reset(sid, ErrorCode.CANCEL)
        pair.pump()
        assert not closed_by(pair.take("server"))
    assert not pair.server.closed


def test_budget_refills_with_time() -> None:
    clock = Clock()
    pair = Pair(settings(resets=Budget(5, 10.0)), clock=clock)
    for _ in range(4):
        for _ in range(5):
            sid = pair.client.send_connect(AUTHORITY)
            pair.client.reset(sid, ErrorCode.CANCEL)
        pair.pump()
        assert not closed_by(pair.take("server"))
        clock.now += 0.5  # 5 tokens back at 10/s
    assert not pair.server.closed


def test_token_bucket_never_exceeds_its_burst() -> None:
    clock = Clock()
    bucket = TokenBucket(Budget(3, 1.0), clock)
    assert [bucket.take() for _ in range(3)] == [True, True, True]
    clock.now = 1000.0  # a long quiet time refills the burst, never more
    assert [bucket.take() for _ in range(4)] == [True, True, True, False]


# -- engine: control-frame floods ----------------------------------------------------------


def _raw_server(flood: FloodLimits) -> tuple[HboneEngine, int]:
    """Our server engine after a plain h2 client's preface and one answered CONNECT."""
    server = HboneEngine(
        client=False, settings=HboneSettings(ping_interval=None, flood=flood), clock=Clock()
    )
    peer = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    peer.initiate_connection()
    peer.send_headers(1, [(":method", "CONNECT"), (":authority", AUTHORITY)])
    server.receive_data(peer.data_to_send())
    server.respond(1, 200)
    server.data_to_send()
    return server, 1


# (budget, limit, frame, frames of that budget the preface already spent)
FLOODS: list[tuple[str, str, Frame, int]] = [
    ("pings", Limit.PINGS, PingFrame(0, b"12345678"), 0),
    ("settings", Limit.SETTINGS, SettingsFrame(0), 1),
    ("window_updates", Limit.WINDOW_UPDATES, WindowUpdateFrame(0, window_increment=1), 0),
    ("empty_frames", Limit.EMPTY_FRAMES, DataFrame(1, b""), 0),
]


@pytest.mark.parametrize(("field", "limit", "frame", "spent"), FLOODS, ids=[f[0] for f in FLOODS])
def test_control_frame_flood_past_its_budget_gets_goaway_enhance_your_calm(
    field: str, limit: str, frame: Frame, spent: int
) -> None:
    server, _ = _raw_server(FloodLimits(**{field: Budget(20, 0.0)}))
    wire = frame.serialize()
    for i in range(20 - spent):
        assert not closed_by(server.receive_data(wire)), f"closed after {i + 1} frames"
    (closed,) = closed_by(server.receive_data(wire))
    assert closed.limit == limit and closed.error_code == CALM
    assert _goaway_code(server.data_to_send()) == CALM


def test_data_with_bytes_is_not_an_empty_frame() -> None:
    server, sid = _raw_server(FloodLimits(empty_frames=Budget(2, 0.0)))
    for _ in range(50):
        assert not closed_by(server.receive_data(DataFrame(sid, b"x").serialize()))
        server.acknowledge(sid, 1)


def test_data_we_send_earns_window_update_budget() -> None:
    # Every DATA frame we send earns the peer one WINDOW_UPDATE: a bulk download is never
    # cut for acknowledging what it received.
    server, sid = _raw_server(FloodLimits(window_updates=Budget(5, 0.0)))
    update = WindowUpdateFrame(0, window_increment=1).serialize()
    for _ in range(100):
        server.send_data(sid, b"x")
        assert not closed_by(server.receive_data(update))


# -- engine: header blocks capped while they arrive ---------------------------------------


def test_unfinished_header_block_is_refused_as_soon_as_it_passes_the_cap() -> None:
    server = HboneEngine(client=False, settings=HboneSettings(ping_interval=None))
    cap = server.settings.server_max_header_list_size
    peer = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    peer.initiate_connection()
    server.receive_data(peer.data_to_send())
    chunk = b"\x00" * 16_000  # h2's default max frame size is 16 KiB; ours is larger
    server.receive_data(HeadersFrame(1, chunk).serialize())  # no END_HEADERS
    received = len(chunk)
    events: list[Event] = []
    while not events:
        events = server.receive_data(ContinuationFrame(1, chunk).serialize())
        received += len(chunk)
        buffered = sum(len(f.data) for f in server._input._headers_buffer)
        assert buffered <= cap, "more than the cap buffered"
    (closed,) = closed_by(events)
    assert closed.limit == Limit.HEADER_LIST_SIZE and closed.error_code == CALM
    assert received <= cap + len(chunk)  # refused at the first frame past the cap


# -- engine: bounded work per call ---------------------------------------------------------


def test_receive_data_handles_at_most_max_frames_and_keeps_the_rest() -> None:
    server, _ = _raw_server(FloodLimits(pings=Budget(10**6, 0.0)))
    ping = PingFrame(0, b"12345678").serialize()
    server.receive_data(ping * 250, max_frames=100)
    assert len(server.data_to_send()) == 100 * len(ping)  # 100 ACKs, no more
    assert server.input_pending
    server.receive_data(b"", max_frames=100)
    server.receive_data(b"", max_frames=100)
    assert len(server.data_to_send()) == 150 * len(ping)
    assert not server.input_pending


# -- engine: a peer that makes our send window negative (rel branch finding) --------------


def _negative_window() -> tuple[HboneEngine, h2.connection.H2Connection]:
    server = HboneEngine(client=False)
    peer = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    peer.initiate_connection()
    peer.send_headers(1, [(":method", "CONNECT"), (":authority", AUTHORITY)])
    server.receive_data(peer.data_to_send())
    peer.receive_data(server.data_to_send())
    server.respond(1, 200)
    assert server.send_data(1, b"x" * 100_000) == 65_535
    peer.receive_data(server.data_to_send())
    peer.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 0})
    server.receive_data(peer.data_to_send())
    return server, peer


def test_negative_send_window_means_wait_for_window_update() -> None:
    server, peer = _negative_window()
    assert server.send_window(1) == 0
    assert server.send_data(1, b"y" * 10) == 0
    # The window is -65,535: it takes that much credit before one byte may go.
    peer.increment_flow_control_window(65_535 + 10, stream_id=1)
    peer.increment_flow_control_window(10)  # the connection window was spent too
    server.receive_data(peer.data_to_send())
    assert server.send_window(1) == 10
    assert server.send_data(1, b"y" * 100) == 10


@pytest.mark.timeout(30)  # a frozen event loop fails here (SIGALRM), it cannot hang the run
async def test_a_peer_lowering_the_window_cannot_freeze_the_driver() -> None:
    second_send_done = trio.Event()

    async def handler(request: ConnectRequest, stream: HboneServerStream) -> None:
        await stream.respond(200)
        await stream.send_all(b"x" * 65_535)
        await trio.sleep(0.2)  # the peer lowers INITIAL_WINDOW_SIZE meanwhile
        await stream.send_all(b"y" * 10)
        second_send_done.set()

    client_tls, server_tls = await tls_pair()
    with trio.fail_after(15):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                lambda: serve_hbone(server_tls, handler, settings=HboneSettings(ping_interval=None))
            )
            peer = RawPeer(client_tls, client=True)
            peer.h2.send_headers(1, [(":method", "CONNECT"), (":authority", AUTHORITY)])
            await peer.flush()
            got = 0
            while got < 65_535:
                for ev in await peer.events():
                    if isinstance(ev, h2.events.DataReceived):
                        got += len(ev.data)  # not acknowledged: the window stays spent
            peer.h2.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 0})
            await peer.flush()
            await trio.sleep(0.5)
            assert not second_send_done.is_set()  # waiting for window, loop alive
            peer.h2.increment_flow_control_window(65_535 + 10, stream_id=1)
            peer.h2.increment_flow_control_window(10)
            await peer.flush()
            tail = b""
            while len(tail) < 10:
                for ev in await peer.events():
                    if isinstance(ev, h2.events.DataReceived):
                        tail += ev.data
            assert tail == b"y" * 10
            await second_send_done.wait()
            nursery.cancel_scope.cancel()
            await trio.aclose_forcefully(client_tls)


# -- driver: limits end the connection with GOAWAY, counted and logged ---------------------


async def _never_answer(request: ConnectRequest, stream: HboneServerStream) -> None:
    await trio.sleep_forever()


async def _goaway_of(peer: RawPeer) -> int:
    while True:
        try:
            events = await peer.events()
        except (EOFError, trio.BrokenResourceError):
            raise AssertionError("closed without GOAWAY") from None
        for ev in events:
            if isinstance(ev, h2.events.ConnectionTerminated):
                return int(ev.error_code)


async def _flood_and_watch(
    hbone: HboneSettings, send: Callable[[RawPeer], bytes], metrics: Metrics
) -> tuple[int, list[dict[str, object]]]:
    """Serve one connection, let ``send(peer)`` flood it; the GOAWAY code and the logs."""
    client_tls, server_tls = await tls_pair()
    with structlog.testing.capture_logs() as logs, trio.fail_after(15):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                lambda: serve_hbone(
                    server_tls, _never_answer, settings=hbone, on_limit=metrics.limit_hit
                )
            )
            peer = RawPeer(client_tls, client=True)
            raw = send(peer)
            await peer.flush()
            await peer.stream.send_all(raw)
            code = await _goaway_of(peer)
            nursery.cancel_scope.cancel()
            await trio.aclose_forcefully(client_tls)
    return code, logs


def _hits(metrics: Metrics, limit: str) -> float:
    value = metrics.registry.get_sample_value("ztunnel_limit_hits_total", {"limit": limit})
    return value or 0.0


def _rapid_reset(peer: RawPeer) -> bytes:
    for _ in range(300):
        sid = peer.h2.get_next_available_stream_id()
        peer.h2.send_headers(sid, [(":method", "CONNECT"), (":authority", AUTHORITY)])
        peer.h2.reset_stream(sid, h2.errors.ErrorCodes.CANCEL)
    return b""


def _ping_flood(peer: RawPeer) -> bytes:
    for i in range(300):
        peer.h2.ping(i.to_bytes(8, "big"))
    return b""


@pytest.mark.parametrize(
    ("send", "limit"), [(_rapid_reset, Limit.RESETS), (_ping_flood, Limit.PINGS)]
)
async def test_flood_over_tls_gets_goaway_is_counted_and_logged_once(
    send: Callable[[RawPeer], bytes], limit: str
) -> None:
    metrics = Metrics()
    code, logs = await _flood_and_watch(HboneSettings(ping_interval=None), send, metrics)
    assert code == CALM
    assert _hits(metrics, limit) == 1
    lines = [e for e in logs if e.get("limit") == limit]
    assert len(lines) == 1 and lines[0]["event"] == "peer exceeded a limit, closing connection"


async def test_pending_connect_limit_refuses_streams_counts_and_logs() -> None:
    metrics = Metrics()
    hbone = HboneSettings(ping_interval=None, max_pending_connects=3)
    client_tls, server_tls = await tls_pair()
    refused: list[int] = []
    with structlog.testing.capture_logs() as logs, trio.fail_after(15):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                lambda: serve_hbone(
                    server_tls, _never_answer, settings=hbone, on_limit=metrics.limit_hit
                )
            )
            peer = RawPeer(client_tls, client=True)
            for sid in (1, 3, 5, 7, 9):
                peer.h2.send_headers(sid, [(":method", "CONNECT"), (":authority", AUTHORITY)])
            await peer.flush()
            while len(refused) < 2:
                for ev in await peer.events():
                    if isinstance(ev, h2.events.StreamReset):
                        assert ev.error_code == ErrorCode.REFUSED_STREAM
                        refused.append(ev.stream_id)
            nursery.cancel_scope.cancel()
            await trio.aclose_forcefully(client_tls)
    assert refused == [7, 9]  # three pending, the rest refused; the connection stays
    assert _hits(metrics, Limit.PENDING_CONNECTS) == 2
    assert [e["event"] for e in logs if e.get("limit") == Limit.PENDING_CONNECTS] == [
        "pending-connect limit reached, refusing streams"
    ]


async def test_idle_timeout_closes_an_authenticated_idle_connection() -> None:
    metrics = Metrics()
    hbone = HboneSettings(ping_interval=None, idle_timeout=0.3)

    async def echo_once(request: ConnectRequest, stream: HboneServerStream) -> None:
        await stream.respond(200)

    client_tls, server_tls = await tls_pair()
    with trio.fail_after(15):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                lambda: serve_hbone(
                    server_tls, echo_once, settings=hbone, on_limit=metrics.limit_hit
                )
            )
            peer = RawPeer(client_tls, client=True)
            peer.h2.send_headers(1, [(":method", "CONNECT"), (":authority", AUTHORITY)])
            await peer.flush()
            start = trio.current_time()
            code = await _goaway_of(peer)
            assert code == ErrorCode.NO_ERROR
            assert trio.current_time() - start >= 0.3
            nursery.cancel_scope.cancel()
            await trio.aclose_forcefully(client_tls)
    assert _hits(metrics, Limit.IDLE_TIMEOUT) == 1


async def test_idle_timeout_spares_a_connection_with_an_open_stream() -> None:
    hbone = HboneSettings(ping_interval=None, idle_timeout=0.2)
    client_tls, server_tls = await tls_pair()
    with trio.fail_after(15):
        async with trio.open_nursery() as nursery:
            conn = await nursery.start(
                lambda task_status: serve_hbone(
                    server_tls, _never_answer, settings=hbone, task_status=task_status
                )
            )
            peer = RawPeer(client_tls, client=True)
            peer.h2.send_headers(1, [(":method", "CONNECT"), (":authority", AUTHORITY)])
            await peer.flush()
            await trio.sleep(1.0)  # five timeouts with a stream open (a quiet long transfer)
            assert not conn.is_closed
            nursery.cancel_scope.cancel()
            await trio.aclose_forcefully(client_tls)


async def test_unfinished_header_block_over_tls_is_cut_before_it_ends() -> None:
    metrics = Metrics()

    def continuation_flood(peer: RawPeer) -> bytes:
        # 96 KB of one header block (the cap is 64 KiB), never ended: before the fix h2
        # buffered up to 64 such frames and answered nothing.
        chunk = b"\x00" * 16_000
        frames = [HeadersFrame(1, chunk), *[ContinuationFrame(1, chunk) for _ in range(5)]]
        return b"".join(f.serialize() for f in frames)

    code, _ = await _flood_and_watch(HboneSettings(ping_interval=None), continuation_flood, metrics)
    assert code == CALM
    assert _hits(metrics, Limit.HEADER_LIST_SIZE) == 1


def test_refused_stream_event_types() -> None:
    # The engine's refusal is an ordinary RST_STREAM(REFUSED_STREAM) to the peer.
    pair = Pair(HboneSettings(ping_interval=None), clock=Clock())
    sid = pair.client.send_connect(AUTHORITY)
    pair.pump()
    assert pair.server.unanswered_streams == 1
    assert pair.server.refuse(sid) is None
    pair.pump()
    assert StreamReset(sid, ErrorCode.REFUSED_STREAM, True) in pair.take("client")
    assert pair.server.unanswered_streams == 0
