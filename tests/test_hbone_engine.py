"""Transcript tests of the sans-IO HBONE engine: client and server engines in memory."""

from __future__ import annotations

import re
import time
from collections.abc import Callable

import h2.config
import h2.connection
import h2.events
import pytest
from hyperframe.frame import DataFrame, Frame, RstStreamFrame
from hypothesis import given, settings
from hypothesis import strategies as st

from ztunnel.hbone.engine import (
    FINISHED_STREAMS_KEPT,
    HboneEngine,
    StreamState,
    parse_authority,
    validate_connect,
)
from ztunnel.hbone.errors import ConnectionGoneError, StreamClosedError
from ztunnel.hbone.events import (
    ConnectionClosed,
    ConnectRequest,
    Data,
    ErrorCode,
    Event,
    GoAwayReceived,
    PingAcked,
    Response,
    StreamEnded,
    StreamReset,
)
from ztunnel.hbone.settings import HboneSettings

MIB = 1024 * 1024


class Pair:
    """Moves bytes between a client and a server engine until both are quiet."""

    def __init__(
        self,
        server_settings: HboneSettings | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.client = HboneEngine(client=True, clock=clock)
        self.server = HboneEngine(client=False, settings=server_settings, clock=clock)
        self.client_events: list[Event] = []
        self.server_events: list[Event] = []
        self.pump()
        self.take("client"), self.take("server")  # settings exchange

    def pump(self) -> None:
        while True:
            to_server, to_client = self.client.data_to_send(), self.server.data_to_send()
            if not to_server and not to_client:
                return
            if to_server:
                self.server_events += self.server.receive_data(to_server)
            if to_client:
                self.client_events += self.client.receive_data(to_client)

    def take(self, side: str) -> list[Event]:
        events = self.client_events if side == "client" else self.server_events
        out = list(events)
        events.clear()
        return out

    def open(self, authority: str = "10.0.0.2:8080") -> int:
        sid = self.client.send_connect(authority, [("baggage", "k8s.namespace.name=default")])
        self.pump()
        self.server.respond(sid, 200)
        self.pump()
        self.take("client"), self.take("server")
        return sid


def received(events: list[Event], sid: int) -> bytes:
    return b"".join(e.data for e in events if isinstance(e, Data) and e.stream_id == sid)


def test_connect_gets_200_and_carries_bytes_both_ways() -> None:
    pair = Pair()
    sid = pair.client.send_connect("10.0.0.2:8080", [("traceparent", "00-ab-cd-00")])
    pair.pump()
    req = pair.take("server")
    assert req == [
        ConnectRequest(sid, "CONNECT", "10.0.0.2:8080", (("traceparent", "00-ab-cd-00"),))
    ]
    pair.server.respond(sid, 200, [("baggage", "k8s.cluster.name=Kubernetes")])
    pair.pump()
    assert pair.take("client") == [
        Response(sid, 200, (("baggage", "k8s.cluster.name=Kubernetes"),))
    ]

    assert pair.client.send_data(sid, b"ping") == 4
    pair.server.send_data(sid, b"pong")
    pair.pump()
    assert received(pair.take("server"), sid) == b"ping"
    assert received(pair.take("client"), sid) == b"pong"


def test_connect_request_on_the_wire_has_no_scheme_or_path() -> None:
    client = HboneEngine(client=True)
    raw = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
    raw.initiate_connection()
    sid = client.send_connect("[fd00::7]:80", [("forwarded", 'for="10.0.0.1:5555"')])
    events = raw.receive_data(client.data_to_send())
    (req,) = [e for e in events if isinstance(e, h2.events.RequestReceived)]
    assert req.stream_id == sid
    assert req.stream_ended is None
    assert list(req.headers) == [
        (b":method", b"CONNECT"),
        (b":authority", b"[fd00::7]:80"),
        (b"forwarded", b'for="10.0.0.1:5555"'),
    ]


def test_settings_and_windows_match_ztunnel() -> None:
    pair = Pair()
    assert pair.client.peer_max_concurrent_streams == 200
    sid = pair.open()
    assert pair.client.send_window(sid) == 4 * MIB
    raw = pair.server._h2
    assert raw.remote_settings.max_frame_size == 1 * MIB
    assert raw.remote_settings.enable_push == 0
    assert raw.remote_settings.max_header_list_size == 16 * 1024
    assert pair.client._h2.remote_settings.max_header_list_size == 64 * 1024
    # connection window was raised to 16 MiB right after the preface
    assert pair.client._h2.outbound_flow_control_window == 16 * MIB


def test_half_close_each_way() -> None:
    pair = Pair()
    sid = pair.open()
    pair.client.send_data(sid, b"request")
    pair.client.end_stream(sid)
    pair.pump()
    server_events = pair.take("server")
    assert received(server_events, sid) == b"request"
    assert server_events[-1] == StreamEnded(sid)
    # the other direction stays open after the client's FIN
    pair.server.send_data(sid, b"response")
    pair.server.end_stream(sid)
    pair.pump()
    client_events = pair.take("client")
    assert received(client_events, sid) == b"response"
    assert client_events[-1] == StreamEnded(sid)
    with pytest.raises(StreamClosedError):
        pair.client.send_data(sid, b"late")


def test_server_can_finish_first() -> None:
    pair = Pair()
    sid = pair.open()
    pair.server.end_stream(sid)
    pair.pump()
    assert pair.take("client") == [StreamEnded(sid)]
    pair.client.send_data(sid, b"still talking")
    pair.pump()
    assert received(pair.take("server"), sid) == b"still talking"


def test_non_connect_method_is_400() -> None:
    server = HboneEngine(client=False)
    raw = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    raw.initiate_connection()
    raw.send_headers(
        1, [(":method", "GET"), (":scheme", "https"), (":path", "/"), (":authority", "a:80")]
    )
    (req,) = [e for e in server.receive_data(raw.data_to_send()) if isinstance(e, ConnectRequest)]
    assert req.method == "GET"
    assert validate_connect(req) == (400, "", 0)
    server.respond(1, 400, end_stream=True)
    events = raw.receive_data(server.data_to_send())
    (resp,) = [e for e in events if isinstance(e, h2.events.ResponseReceived)]
    assert dict(resp.headers)[b":status"] == b"400"


@pytest.mark.parametrize(
    ("authority", "expected"),
    [
        ("10.0.0.2:8080", ("10.0.0.2", 8080)),
        ("[fd00::1]:80", ("fd00::1", 80)),
        ("echo.default.svc.cluster.local:80", ("echo.default.svc.cluster.local", 80)),
        ("10.0.0.2", None),
        ("10.0.0.2:0", None),
        ("10.0.0.2:65536", None),
        ("10.0.0.2:-1", None),
        ("fd00::1:80", None),
        ("[fd00::zz]:80", None),
        (":80", None),
        ("bad host:80", None),
        ("", None),
    ],
)
def test_authority_parsing(authority: str, expected: tuple[str, int] | None) -> None:
    assert parse_authority(authority) == expected
    status = validate_connect(ConnectRequest(1, "CONNECT", authority))
    assert status == ((None, *expected) if expected else (400, "", 0))


@given(st.ip_addresses(), st.integers(1, 65535))
def test_any_ip_socket_address_is_valid(ip: object, port: int) -> None:
    text = f"[{ip}]:{port}" if ":" in str(ip) else f"{ip}:{port}"
    assert parse_authority(text) == (str(ip), port)


def test_reset_is_seen_by_peer_and_cancel_counts_as_eof() -> None:
    pair = Pair()
    sid = pair.open()
    pair.client.reset(sid, ErrorCode.CANCEL)
    pair.pump()
    (reset,) = pair.take("server")
    assert reset == StreamReset(sid, ErrorCode.CANCEL, remote=True)
    assert reset.is_eof
    assert not StreamReset(sid, ErrorCode.PROTOCOL_ERROR).is_eof
    with pytest.raises(StreamClosedError):
        pair.server.send_data(sid, b"x")
    pair.client.reset(sid)  # idempotent


def test_unacknowledged_receiver_stops_sender_at_window_and_ack_resumes() -> None:
    pair = Pair()
    sid = pair.open()
    payload = b"a" * (6 * MIB)
    sent = pair.client.send_data(sid, payload)
    assert sent == 4 * MIB  # the stream window, not more
    pair.pump()
    assert pair.client.send_data(sid, payload[sent:]) == 0
    assert len(received(pair.take("server"), sid)) == 4 * MIB
    # release half: the sender may go on, by exactly what was released
    pair.server.acknowledge(sid, 2 * MIB)
    pair.pump()
    resumed = pair.client.send_data(sid, payload[sent:])
    assert resumed == 2 * MIB


def test_connection_window_bounds_all_streams_together() -> None:
    pair = Pair()
    sids = [pair.open() for _ in range(5)]
    total = sum(pair.client.send_data(s, b"x" * (4 * MIB)) for s in sids)
    assert total == 16 * MIB  # 5 x 4 MiB stream windows, capped by the connection window
    pair.pump()
    assert sum(len(received(pair.server_events, s)) for s in sids) == 16 * MIB


def test_long_transfer_with_acknowledgement_never_stalls() -> None:
    pair = Pair()
    sid = pair.open()
    total, goal = 0, 40 * MIB
    chunk = b"z" * MIB
    while total < goal:
        n = pair.client.send_data(sid, chunk)
        assert n > 0, f"stalled after {total} bytes"
        total += n
        pair.pump()
        for event in pair.take("server"):
            if isinstance(event, Data):
                pair.server.acknowledge(event.stream_id, len(event.data))
        pair.pump()


def test_goaway_drains_open_streams_and_refuses_new_ones() -> None:
    pair = Pair()
    sid = pair.open()
    pair.server.goaway()
    # a stream the client opened before it saw the GOAWAY
    late = pair.client.send_connect("10.0.0.2:8080")
    pair.pump()
    client_events = pair.take("client")
    assert GoAwayReceived(ErrorCode.NO_ERROR, sid) in client_events
    assert StreamReset(late, ErrorCode.REFUSED_STREAM, remote=True) in client_events
    assert pair.take("server") == []  # never surfaced as a request
    with pytest.raises(ConnectionGoneError):
        pair.client.send_connect("10.0.0.2:8080")
    assert not pair.client.accepting_streams
    # the open stream still works both ways, to a clean finish
    pair.client.send_data(sid, b"after goaway")
    pair.server.send_data(sid, b"reply")
    pair.server.end_stream(sid)
    pair.client.end_stream(sid)
    pair.pump()
    assert received(pair.take("server"), sid) == b"after goaway"
    assert received(pair.take("client"), sid) == b"reply"


def test_garbage_instead_of_preface_closes_with_protocol_error() -> None:
    server = HboneEngine(client=False)
    server.data_to_send()
    events = server.receive_data(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert len(events) == 1 and isinstance(events[0], ConnectionClosed)
    assert events[0].error_code == ErrorCode.PROTOCOL_ERROR
    assert _goaway_code(server.data_to_send()) == ErrorCode.PROTOCOL_ERROR
    assert server.receive_data(b"more") == []


def test_garbage_frame_after_preface_closes_connection() -> None:
    pair = Pair()
    # a WINDOW_UPDATE on stream 0 with a zero increment is a connection PROTOCOL_ERROR
    events = pair.server.receive_data(b"\x00\x00\x04\x08\x00\x00\x00\x00\x00\x00\x00\x00\x00")
    assert [type(e) for e in events] == [ConnectionClosed]
    assert events[0].error_code == ErrorCode.PROTOCOL_ERROR
    pair.pump()
    assert GoAwayReceived(ErrorCode.PROTOCOL_ERROR, 0) in pair.take("client")


def test_oversized_headers_are_rejected() -> None:
    pair = Pair()
    pair.client.send_connect("10.0.0.2:80", [("x-big", "v" * (70 * 1024))])
    events = pair.server.receive_data(pair.client.data_to_send())
    assert [type(e) for e in events] == [ConnectionClosed]
    assert events[0].error_code == ErrorCode.ENHANCE_YOUR_CALM


def test_ping_is_answered() -> None:
    pair = Pair()
    payload = pair.client.ping()
    pair.pump()
    assert pair.take("client") == [PingAcked(payload)]


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_arbitrary_bytes_after_preface_never_raise(noise: bytes) -> None:
    pair = Pair()
    sid = pair.open()
    pair.client.send_data(sid, b"hello")
    frames = pair.client.data_to_send() + noise
    events = pair.server.receive_data(frames)
    assert all(not isinstance(e, ConnectionClosed) or e.error_code > 0 for e in events)
    pair.server.data_to_send()


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(1, 5000), min_size=1, max_size=20))
def test_byte_boundaries_do_not_matter(cuts: list[int]) -> None:
    pair = Pair()
    sid = pair.open()
    payload = bytes(range(256)) * 64
    pair.client.send_data(sid, payload)
    pair.client.end_stream(sid)
    wire = pair.client.data_to_send()
    events: list[Event] = []
    pos = 0
    for cut in [*cuts, len(wire)]:
        events += pair.server.receive_data(wire[pos : pos + cut])
        pos += cut
    events += pair.server.receive_data(wire[pos:])
    assert received(events, sid) == payload
    assert events[-1] == StreamEnded(sid)


def _goaway_code(wire: bytes) -> int | None:
    """Error code of the first GOAWAY frame in ``wire`` (frames only, no preface)."""
    pos = 0
    while pos + 9 <= len(wire):
        frame, length = Frame.parse_frame_header(memoryview(wire[pos : pos + 9]))
        frame.parse_body(memoryview(wire[pos + 9 : pos + 9 + length]))
        if frame.type == 0x07:
            return int(frame.error_code)  # type: ignore[attr-defined]
        pos += 9 + length
    return None


def _raw_server_answering(status: str) -> tuple[HboneEngine, int, list[Event]]:
    """A client engine whose CONNECT a plain h2 server answers with ``:status: status``."""
    client = HboneEngine(client=True)
    raw = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
    raw.initiate_connection()
    sid = client.send_connect("10.0.0.2:80")
    raw.receive_data(client.data_to_send())
    raw.send_headers(sid, [(":status", status)])
    return client, sid, client.receive_data(raw.data_to_send())


@pytest.mark.parametrize("status", ["abc", "2000", "20", "", "\uff12\uff10\uff10"])
def test_malformed_status_is_reported_as_0_not_raised(status: str) -> None:
    client, sid, events = _raw_server_answering(status)
    assert Response(sid, 0) in events
    assert not client.closed  # one bad answer does not end the connection


def test_three_digit_status_is_parsed() -> None:
    _, sid, events = _raw_server_answering("503")
    assert Response(sid, 503) in events


def test_pending_output_counts_unsent_replies() -> None:
    server = HboneEngine(client=False)
    server.data_to_send()
    raw = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    raw.initiate_connection()
    for i in range(10):
        raw.ping(i.to_bytes(8, "big"))
    server.receive_data(raw.data_to_send())
    unsent = server.pending_output
    assert unsent == 10 * 17 + 9  # ten PING ACKs and one SETTINGS ACK
    assert len(server.data_to_send()) == unsent
    assert server.pending_output == 0


# -- stream states (RFC 9113 §5.1 as HBONE uses it) ---------------------------------------

OPEN, HCL, HCR = StreamState.OPEN, StreamState.HALF_CLOSED_LOCAL, StreamState.HALF_CLOSED_REMOTE
CLOSED, RESET = StreamState.CLOSED, StreamState.RESET


def states(pair: Pair, sid: int) -> tuple[StreamState | None, StreamState | None]:
    return pair.client.stream_state(sid), pair.server.stream_state(sid)


def test_clean_close_client_first_walks_open_half_closed_closed() -> None:
    pair = Pair()
    sid = pair.client.send_connect("10.0.0.2:80")
    assert states(pair, sid) == (OPEN, None)
    pair.pump()
    assert states(pair, sid) == (OPEN, OPEN)
    assert pair.server.respond(sid, 200) is OPEN
    assert pair.client.end_stream(sid) is HCL
    pair.pump()
    assert states(pair, sid) == (HCL, HCR)
    pair.server.send_data(sid, b"still allowed in half-closed (remote)")
    assert pair.server.end_stream(sid) is CLOSED
    pair.pump()
    assert states(pair, sid) == (CLOSED, CLOSED)


def test_clean_close_server_first() -> None:
    pair = Pair()
    sid = pair.open()
    assert pair.server.end_stream(sid) is HCL
    pair.pump()
    assert states(pair, sid) == (HCR, HCL)
    assert pair.client.end_stream(sid) is CLOSED
    pair.pump()
    assert states(pair, sid) == (CLOSED, CLOSED)


def test_non_200_with_end_stream_half_closes_the_server_side() -> None:
    pair = Pair()
    sid = pair.client.send_connect("10.0.0.2:80")
    pair.pump()
    assert pair.server.respond(sid, 401, end_stream=True) is HCL
    pair.pump()
    assert states(pair, sid) == (HCR, HCL)


def test_connect_with_end_stream_on_headers_is_half_closed_remote() -> None:
    server = HboneEngine(client=False)
    raw = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    raw.initiate_connection()
    raw.send_headers(1, [(":method", "CONNECT"), (":authority", "a:80")], end_stream=True)
    events = server.receive_data(raw.data_to_send())
    assert [type(e) for e in events if isinstance(e, ConnectRequest | StreamEnded)] == [
        ConnectRequest,
        StreamEnded,
    ]
    assert server.stream_state(1) is HCR
    assert server.respond(1, 200) is HCR
    assert server.end_stream(1) is CLOSED


def _in_state(state: StreamState) -> tuple[Pair, int]:
    """A pair with one stream that is ``state`` on the client side."""
    pair = Pair()
    sid = pair.open()
    if state in (HCL, CLOSED):
        pair.client.end_stream(sid)
    if state in (HCR, CLOSED):
        pair.server.end_stream(sid)
    if state is RESET:
        pair.server.reset(sid, ErrorCode.CANCEL)
    pair.pump()
    pair.take("client"), pair.take("server")
    assert pair.client.stream_state(sid) is state
    return pair, sid


@pytest.mark.parametrize("state", [OPEN, HCL, HCR])
def test_reset_of_a_live_stream_is_sent_and_final(state: StreamState) -> None:
    pair, sid = _in_state(state)
    assert pair.client.reset(sid, ErrorCode.INTERNAL_ERROR) is RESET
    pair.pump()
    assert pair.take("server") == [StreamReset(sid, ErrorCode.INTERNAL_ERROR, remote=True)]
    assert states(pair, sid) == (RESET, RESET)
    for engine in (pair.client, pair.server):
        with pytest.raises(StreamClosedError):
            engine.send_data(sid, b"x")
        with pytest.raises(StreamClosedError):
            engine.end_stream(sid)
    with pytest.raises(StreamClosedError):
        pair.server.respond(sid, 200)


@pytest.mark.parametrize("state", [CLOSED, RESET])
def test_reset_of_a_finished_stream_sends_nothing(state: StreamState) -> None:
    pair, sid = _in_state(state)
    assert pair.client.reset(sid) is state
    assert pair.client.data_to_send() == b""
    assert pair.client.stream_state(sid) is state


@pytest.mark.parametrize("state", [OPEN, HCL, HCR])
def test_reset_received_in_each_live_state(state: StreamState) -> None:
    pair, sid = _in_state(state)
    pair.server.reset(sid, ErrorCode.CANCEL)
    pair.pump()
    assert pair.take("client") == [StreamReset(sid, ErrorCode.CANCEL, remote=True)]
    assert pair.client.stream_state(sid) is RESET


@pytest.mark.parametrize(
    ("state", "allowed"),
    [(OPEN, True), (HCR, True), (HCL, False), (CLOSED, False), (RESET, False)],
)
def test_send_and_end_are_refused_where_the_state_forbids_them(
    state: StreamState, allowed: bool
) -> None:
    pair, sid = _in_state(state)
    if allowed:
        assert pair.client.send_data(sid, b"data") == 4
        assert pair.client.end_stream(sid) is state.after_local_end()
        return
    with pytest.raises(StreamClosedError, match=re.escape(f"is {state.label}")):
        pair.client.send_data(sid, b"data")
    with pytest.raises(StreamClosedError):
        pair.client.end_stream(sid)
    assert pair.client.data_to_send() == b""  # nothing reached the wire
    assert pair.client.stream_state(sid) is state


def test_operations_on_unknown_streams_are_refused() -> None:
    pair = Pair()
    with pytest.raises(StreamClosedError, match="not open"):
        pair.client.send_data(99, b"x")
    with pytest.raises(StreamClosedError):
        pair.server.respond(7, 200)
    assert pair.client.reset(99) is None
    assert pair.client.data_to_send() == b"" and pair.server.data_to_send() == b""


def test_a_stream_the_peer_breaks_is_reset_with_stream_closed() -> None:
    pair, sid = _in_state(HCR)  # the server sent END_STREAM ...
    # ... and then (a broken peer) DATA on the same stream: h2 resets it for us.
    events = pair.client.receive_data(DataFrame(sid, b"late").serialize())
    assert StreamReset(sid, ErrorCode.STREAM_CLOSED, remote=False) in events
    assert pair.client.stream_state(sid) is RESET
    assert _frame_types(pair.client.data_to_send()) == [RstStreamFrame.type]


def test_connection_close_refuses_every_stream_operation() -> None:
    pair = Pair()
    sid = pair.open()
    pair.client.close()
    with pytest.raises(StreamClosedError, match="connection closed"):
        pair.client.send_data(sid, b"x")
    with pytest.raises(StreamClosedError):
        pair.client.end_stream(sid)


def test_finished_streams_are_remembered_a_bounded_time() -> None:
    pair = Pair()
    first = pair.open()
    pair.client.reset(first)
    pair.pump()
    assert states(pair, first) == (RESET, RESET)
    for _ in range(FINISHED_STREAMS_KEPT):
        pair.client.reset(pair.open())
        pair.pump()
    assert states(pair, first) == (None, None)  # forgotten: memory stays bounded


def test_state_transition_rules() -> None:
    assert [s.after_remote_end() for s in StreamState] == [HCR, CLOSED, HCR, CLOSED, RESET]
    assert [s.after_reset() for s in StreamState] == [RESET, RESET, RESET, CLOSED, RESET]
    assert [s.after_local_end() for s in (OPEN, HCR)] == [HCL, CLOSED]
    for done in (HCL, CLOSED, RESET):
        with pytest.raises(StreamClosedError):
            done.after_local_end()


def _frame_types(wire: bytes) -> list[int]:
    types, pos = [], 0
    while pos + 9 <= len(wire):
        frame, length = Frame.parse_frame_header(memoryview(wire[pos : pos + 9]))
        types.append(frame.type)
        pos += 9 + length
    return types
