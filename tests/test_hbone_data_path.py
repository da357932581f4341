"""Transcript tests of the engine's DATA fast path (engine.py: ``_PlainData``,
``send_plain_data``, ``acknowledge``): DATA frames without flags bypass hyperframe's
frame objects and h2's per-frame machinery, so each rule h2 enforced for them is
checked here on the wire: windows, stream states, frame sizes, budgets, ordering
with the frames h2 still handles (padding, END_STREAM, header blocks), and that a
stock h2 peer reads what the fast path writes."""

from __future__ import annotations

import h2.config
import h2.connection
import h2.events
import h2.settings
import pytest
from hyperframe.frame import (
    Frame,
    HeadersFrame,
    WindowUpdateFrame,
)

from tests.test_hbone_engine import MIB, Pair, received
from ztunnel.hbone.engine import HboneEngine, StreamState
from ztunnel.hbone.errors import StreamClosedError
from ztunnel.hbone.events import (
    ConnectionClosed,
    Data,
    ErrorCode,
    Event,
    StreamEnded,
    StreamReset,
)
from ztunnel.hbone.limits import Budget, FloodLimits, Limit
from ztunnel.hbone.settings import HboneSettings


def frames(wire: bytes) -> list[Frame]:
    """Every frame in ``wire`` (no preface), parsed by hyperframe."""
    out, pos = [], 0
    while pos + 9 <= len(wire):
        frame, length = Frame.parse_frame_header(memoryview(wire[pos : pos + 9]))
        frame.parse_body(memoryview(wire[pos + 9 : pos + 9 + length]))
        out.append(frame)
        pos += 9 + length
    assert pos == len(wire), "trailing bytes: not whole frames"
    return out


def data_frame(sid: int, payload: bytes, *flags: str, pad: int | None = None) -> bytes:
    """A DATA frame built by hand (hyperframe refuses some we need: stream 0)."""
    bits = 0x1 if "END_STREAM" in flags else 0
    body = payload
    if pad is not None:
        bits |= 0x8
        body = bytes([pad]) + payload + b"\0" * pad
    return len(body).to_bytes(3, "big") + bytes([0, bits]) + sid.to_bytes(4, "big") + body


def closed(events: list[Event]) -> ConnectionClosed:
    (event,) = [e for e in events if isinstance(e, ConnectionClosed)]
    return event


def goaway_code(engine: HboneEngine) -> int:
    (goaway,) = [f for f in frames(engine.data_to_send()) if f.type == 0x07]
    return int(goaway.error_code)  # type: ignore[attr-defined]


# -- send ------------------------------------------------------------------------------


def test_fast_frames_are_split_at_the_peers_frame_size_and_read_by_stock_h2() -> None:
    client = HboneEngine(client=True)
    raw = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
    raw.initiate_connection()
    raw.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 1 << 20})
    raw.increment_flow_control_window(1 << 20)
    sid = client.send_connect("10.0.0.2:80")
    raw.receive_data(client.data_to_send())
    raw.send_headers(sid, [(":status", "200")])
    client.receive_data(raw.data_to_send())
    payload = bytes(range(256)) * 160  # 40 KiB: three frames of at most 16 KiB
    assert client.send_data(sid, payload) == len(payload)
    wire = client.data_to_send()
    data = [f for f in frames(wire) if f.type == 0x00]
    assert [len(f.data) for f in data] == [16384, 16384, 40960 - 32768]  # type: ignore[attr-defined]
    assert all(not f.flags for f in data)
    events = raw.receive_data(wire)
    got = b"".join(e.data for e in events if isinstance(e, h2.events.DataReceived))
    assert got == payload
    assert raw.remote_flow_control_window(sid) == (1 << 20) - len(payload)


def test_send_takes_no_more_than_the_window_and_nothing_at_zero() -> None:
    pair = Pair()
    sid = pair.open()
    assert pair.client.send_data(sid, b"a" * (5 * MIB)) == 4 * MIB
    queued = pair.client.pending_output
    assert pair.client.send_data(sid, b"more") == 0  # zero window: nothing queued
    assert pair.client.pending_output == queued
    assert pair.client.send_window(sid) == 0
    pair.pump()
    assert len(received(pair.take("server"), sid)) == 4 * MIB


def test_a_window_made_negative_by_settings_takes_nothing() -> None:
    pair = Pair()
    sid = pair.open()
    pair.client.send_data(sid, b"a" * 1000)
    pair.pump()
    # the server lowers INITIAL_WINDOW_SIZE below what is in flight (RFC 9113 §6.9.2)
    pair.server._h2.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 100})
    pair.pump()
    assert pair.client.send_window(sid) == 0
    assert pair.client.send_data(sid, b"b" * 10) == 0


def test_sending_after_end_stream_is_refused_and_writes_nothing() -> None:
    pair = Pair()
    sid = pair.open()
    pair.client.end_stream(sid)
    pair.client.data_to_send()
    with pytest.raises(StreamClosedError):
        pair.client.send_data(sid, b"x")
    assert pair.client.data_to_send() == b""


def test_window_update_budget_is_credited_per_fast_frame() -> None:
    # A peer answering our DATA with WINDOW_UPDATEs does useful work: 2 x 20 DATA frames
    # earn 40 WINDOW_UPDATEs, twice the budget's burst, which never refills on its own.
    flood = FloodLimits(window_updates=Budget(20, 0.0))
    client = HboneEngine(client=True, settings=HboneSettings(flood=flood))
    server = HboneEngine(client=False, settings=HboneSettings(max_frame_size=16384))
    server.receive_data(client.data_to_send())
    client.receive_data(server.data_to_send())
    sid = client.send_connect("10.0.0.2:80")
    server.receive_data(client.data_to_send())
    server.respond(sid, 200)
    client.receive_data(server.data_to_send())
    updates = b"".join(
        bytes(WindowUpdateFrame(sid, window_increment=1).serialize()) for _ in range(20)
    )
    for _ in range(2):
        assert client.send_data(sid, b"x" * (20 * 16384)) == 20 * 16384
        assert not any(isinstance(e, ConnectionClosed) for e in client.receive_data(updates))
    # Without DATA sent, the same updates are a flood.
    events = client.receive_data(updates * 2)
    assert closed(events).limit == Limit.WINDOW_UPDATES


# -- receive ---------------------------------------------------------------------------


def test_received_data_consumes_both_windows_as_h2_does() -> None:
    pair = Pair()
    sid = pair.open()
    pair.client.send_data(sid, b"q" * 5000)
    pair.pump()
    assert received(pair.take("server"), sid) == b"q" * 5000
    raw = pair.server._h2
    assert raw.remote_flow_control_window(sid) == 4 * MIB - 5000
    assert raw._inbound_flow_control_window_manager.current_window_size == 16 * MIB - 5000
    pair.server.acknowledge(sid, 5000)
    # Below half the window: no WINDOW_UPDATE yet, but the bytes count for the next one.
    assert pair.server.data_to_send() == b""
    pair.client.send_data(sid, b"r" * (2 * MIB))
    pair.pump()
    pair.server.acknowledge(sid, 2 * MIB)
    updates = [f for f in frames(pair.server.data_to_send()) if f.type == 0x08]
    assert [(f.stream_id, f.window_increment) for f in updates] == [  # type: ignore[attr-defined]
        (sid, 2 * MIB + 5000)
    ]


def test_stream_window_overflow_is_a_flow_control_connection_error() -> None:
    pair = Pair(HboneSettings(stream_window=65535))
    sid = pair.open()
    assert received(pair.server.receive_data(data_frame(sid, b"x" * 40000)), sid) == b"x" * 40000
    events = pair.server.receive_data(data_frame(sid, b"y" * 40000))
    assert not [e for e in events if isinstance(e, Data)]
    event = closed(events)
    assert event.error_code == ErrorCode.FLOW_CONTROL_ERROR
    assert goaway_code(pair.server) == ErrorCode.FLOW_CONTROL_ERROR
    assert pair.server.receive_data(data_frame(sid, b"z")) == []  # closed: nothing more


def test_connection_window_overflow_is_a_flow_control_connection_error() -> None:
    pair = Pair()
    sids = [pair.open() for _ in range(5)]
    chunk = b"c" * (1 * MIB)
    within = b"".join(data_frame(s, chunk) for s in sids[:4] for _ in range(4))  # 16 MiB
    events = pair.server.receive_data(within)
    assert sum(len(received(events, s)) for s in sids) == 16 * MIB
    events = pair.server.receive_data(data_frame(sids[4], b"!"))  # within its stream window
    assert closed(events).error_code == ErrorCode.FLOW_CONTROL_ERROR
    assert goaway_code(pair.server) == ErrorCode.FLOW_CONTROL_ERROR


def test_oversized_data_frame_is_a_frame_size_error() -> None:
    pair = Pair(HboneSettings(max_frame_size=16384))
    sid = pair.open()
    events = pair.server.receive_data(data_frame(sid, b"x" * 16385))
    assert not [e for e in events if isinstance(e, Data)]
    assert closed(events).error_code == ErrorCode.FRAME_SIZE_ERROR


def test_data_on_stream_zero_is_a_protocol_error() -> None:
    pair = Pair()
    pair.open()
    events = pair.server.receive_data(data_frame(0, b"x"))
    assert closed(events).error_code == ErrorCode.PROTOCOL_ERROR


def test_data_on_a_never_opened_stream_is_a_protocol_error() -> None:
    pair = Pair()
    sid = pair.open()
    events = pair.server.receive_data(data_frame(sid + 2, b"x"))
    assert not [e for e in events if isinstance(e, Data)]
    assert closed(events).error_code == ErrorCode.PROTOCOL_ERROR


def test_data_on_a_reset_stream_is_answered_with_rst_stream_and_budgeted() -> None:
    pair = Pair()
    sid = pair.open()
    pair.server.reset(sid, ErrorCode.CANCEL)
    pair.server.data_to_send()
    events = pair.server.receive_data(data_frame(sid, b"late"))
    assert not [e for e in events if isinstance(e, Data | ConnectionClosed)]
    resets = [f for f in frames(pair.server.data_to_send()) if f.type == 0x03]
    assert [(f.stream_id, f.error_code) for f in resets] == [  # type: ignore[attr-defined]
        (sid, ErrorCode.STREAM_CLOSED)
    ]
    # Each such frame is charged to the stream-error budget: a flood ends the connection.
    flood = b"".join(data_frame(sid, b"late") for _ in range(10_000))
    events = pair.server.receive_data(flood)
    assert closed(events).limit == Limit.STREAM_ERRORS
    assert goaway_code(pair.server) == ErrorCode.ENHANCE_YOUR_CALM


def test_data_after_the_peers_end_stream_is_a_stream_error() -> None:
    pair = Pair()
    sid = pair.open()
    pair.client.end_stream(sid)
    pair.pump()
    assert pair.take("server") == [StreamEnded(sid)]
    events = pair.server.receive_data(data_frame(sid, b"after end"))
    assert not [e for e in events if isinstance(e, Data)]
    assert StreamReset(sid, ErrorCode.STREAM_CLOSED, False) in events
    assert pair.server.stream_state(sid) is StreamState.RESET


def test_data_inside_a_header_block_is_a_protocol_error() -> None:
    pair = Pair()
    sid = pair.open()
    headers = HeadersFrame(sid + 2, b"")  # no END_HEADERS: a CONTINUATION must follow
    wire = bytes(headers.serialize()) + data_frame(sid, b"x")
    events = pair.server.receive_data(wire)
    assert not [e for e in events if isinstance(e, Data)]
    assert closed(events).error_code == ErrorCode.PROTOCOL_ERROR


def test_padded_data_is_unpadded_and_its_padding_released_at_once() -> None:
    pair = Pair()
    sid = pair.open()
    wire = data_frame(sid, b"a" * 100) + data_frame(sid, b"pad", pad=200) + data_frame(sid, b"b")
    events = pair.server.receive_data(wire)
    data = [e for e in events if isinstance(e, Data)]
    assert [(e.data, e.flow_controlled_length) for e in data] == [
        (b"a" * 100, 100),
        (b"pad", 204),
        (b"b", 1),
    ]
    pair.server.acknowledge(sid, 104)
    # padding (201 bytes) acknowledged by the engine, the payload by us: all released
    assert pair.server._h2._inbound_flow_control_window_manager._bytes_processed == 305


def test_end_stream_on_data_keeps_order_with_plain_frames() -> None:
    pair = Pair()
    sid = pair.open()
    wire = (
        data_frame(sid, b"one")
        + data_frame(sid, b"two", "END_STREAM")
        + data_frame(sid, b"three")  # after END_STREAM: a stream error
    )
    events = pair.server.receive_data(wire)
    assert events[:3] == [Data(sid, b"one", 3), Data(sid, b"two", 3), StreamEnded(sid)]
    assert StreamReset(sid, ErrorCode.STREAM_CLOSED, False) in events[3:]
    assert received(events, sid) == b"onetwo"


def test_empty_data_without_end_stream_is_charged_as_an_empty_frame() -> None:
    pair = Pair()
    sid = pair.open()
    flood = b"".join(data_frame(sid, b"") for _ in range(10_000))
    events = pair.server.receive_data(flood)
    assert closed(events).limit == Limit.EMPTY_FRAMES


def test_frame_budget_per_call_counts_fast_frames() -> None:
    pair = Pair()
    sid = pair.open()
    wire = b"".join(data_frame(sid, bytes([i])) for i in range(5))
    first = pair.server.receive_data(wire, max_frames=2)
    assert received(first, sid) == b"\x00\x01"
    assert pair.server.input_pending
    rest = pair.server.receive_data(b"", max_frames=10)
    assert received(rest, sid) == b"\x02\x03\x04"
    assert not pair.server.input_pending


def test_data_before_the_response_reaches_the_client_in_order() -> None:
    pair = Pair()
    sid = pair.client.send_connect("10.0.0.2:80")
    pair.pump()
    pair.take("server")
    pair.server.respond(sid, 200)
    pair.server.send_data(sid, b"hello")
    events = pair.client.receive_data(pair.server.data_to_send())
    assert [type(e).__name__ for e in events] == ["Response", "Data"]
