"""The sans-IO gRPC engine, client and server engines wired back to back (no sockets):
framing, trailers and trailers-only, hostile input, flow control."""

from __future__ import annotations

import struct

import h2.config
import h2.connection
import pytest

from ztunnel.grpc.engine import (
    CallCancelled,
    CallEnded,
    CallStarted,
    ConnectionFailed,
    Event,
    GrpcEngine,
    HalfClosed,
    MessageReceived,
    ResponseHeaders,
)
from ztunnel.grpc.framing import MessageReader, frame_message
from ztunnel.grpc.status import GrpcError, StatusCode, decode_message, encode_message


class Pair:
    def __init__(self, max_message: int = 1 << 20) -> None:
        self.client = GrpcEngine(client=True, max_message=max_message)
        self.server = GrpcEngine(client=False, max_message=max_message)
        self.pump()

    def pump(self) -> tuple[list[Event], list[Event]]:
        """Exchange bytes until quiet: (client events, server events)."""
        c_events: list[Event] = []
        s_events: list[Event] = []
        while True:
            to_server, to_client = self.client.data_to_send(), self.server.data_to_send()
            if not to_server and not to_client:
                return c_events, s_events
            if to_server:
                s_events += self.server.receive_data(to_server)
            if to_client:
                c_events += self.client.receive_data(to_client)


def _types(events: list[Event]) -> list[type]:
    return [type(e) for e in events]


def test_unary_round_trip_with_status_message() -> None:
    pair = Pair()
    sid = pair.client.start_call("/s/M", authority="x:1", metadata=[("k", "v")], timeout=2)
    pair.client.send_message(sid, b"req")
    pair.client.end_call(sid)
    _, server_events = pair.pump()
    started = server_events[0]
    assert isinstance(started, CallStarted)
    assert started.path == "/s/M" and ("k", "v") in started.metadata
    assert started.timeout is not None and 1.99 < started.timeout <= 2
    assert _types(server_events) == [CallStarted, MessageReceived, HalfClosed]
    pair.server.send_message(sid, b"resp")
    pair.server.finish(sid, StatusCode.NOT_FOUND, "nö 50%")
    client_events, _ = pair.pump()
    assert _types(client_events) == [ResponseHeaders, MessageReceived, CallEnded]
    ended = client_events[-1]
    assert isinstance(ended, CallEnded)
    assert ended.code is StatusCode.NOT_FOUND and ended.message == "nö 50%"


def test_trailers_only_error() -> None:
    pair = Pair()
    sid = pair.client.start_call("/s/M", authority="x:1")
    pair.client.end_call(sid)
    pair.pump()
    pair.server.finish(sid, StatusCode.UNAUTHENTICATED, "no")
    client_events, _ = pair.pump()
    assert client_events == [CallEnded(sid, StatusCode.UNAUTHENTICATED, "no")]


def test_oversized_request_is_refused_before_buffering() -> None:
    pair = Pair(max_message=100)
    sid = pair.client.start_call("/s/M", authority="x:1")
    pair.client.send_message(sid, b"x" * 101)
    client_events, server_events = pair.pump()
    assert CallCancelled in _types(server_events)
    ended = [e for e in client_events if isinstance(e, CallEnded)]
    assert ended and ended[0].code is StatusCode.RESOURCE_EXHAUSTED


def test_compressed_flag_without_encoding_is_internal() -> None:
    reader = MessageReader()
    with pytest.raises(GrpcError) as info:
        reader.feed(struct.pack(">BI", 1, 3) + b"abc")
    assert info.value.code is StatusCode.INTERNAL


def test_reader_reassembles_split_messages() -> None:
    reader = MessageReader()
    data = frame_message(b"hello") + frame_message(b"") + frame_message(b"world")
    out = []
    for i in range(len(data)):
        out += reader.feed(data[i : i + 1])
    assert out == [b"hello", b"", b"world"] and not reader.partial


def test_non_grpc_request_gets_415_and_client_sees_a_status() -> None:
    raw = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    raw.initiate_connection()
    sid = raw.get_next_available_stream_id()
    raw.send_headers(sid, [(":method", "POST"), (":scheme", "http"), (":path", "/x"),
                           (":authority", "a"), ("content-type", "text/plain")],
                     end_stream=True)  # fmt: skip
    server = GrpcEngine(client=False)
    assert server.receive_data(raw.data_to_send()) == []
    events = raw.receive_data(server.data_to_send())
    statuses = [dict(e.headers).get(b":status") for e in events if hasattr(e, "headers")]
    assert b"415" in statuses


def test_http_error_response_maps_to_grpc_status() -> None:
    client = GrpcEngine(client=True)
    raw = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
    raw.initiate_connection()
    raw.receive_data(client.data_to_send())
    sid = client.start_call("/s/M", authority="x:1")
    raw.receive_data(client.data_to_send())
    raw.send_headers(sid, [(":status", "503")], end_stream=True)
    events = client.receive_data(raw.data_to_send())
    assert next(e for e in events if isinstance(e, CallEnded)).code is StatusCode.UNAVAILABLE


def test_garbage_fails_the_connection() -> None:
    server = GrpcEngine(client=False)
    events = server.receive_data(b"this is not the HTTP/2 preface at all")
    assert _types(events) == [ConnectionFailed]
    assert server.closed


def test_unconsumed_messages_stop_the_sender_at_the_window() -> None:
    pair = Pair(max_message=100_000)  # stream window: one whole message (100 005 bytes)
    sid = pair.client.start_call("/s/M", authority="x:1")
    pair.client.end_call(sid)
    pair.pump()
    for _ in range(5):
        pair.server.send_message(sid, b"y" * 90_000)
    client_events, _ = pair.pump()
    got = [e for e in client_events if isinstance(e, MessageReceived)]
    assert len(got) == 1  # the window holds one message until the consumer takes it
    assert pair.server.pending_send(sid) > 0
    pair.client.acknowledge(sid, got[0].size)
    client_events, _ = pair.pump()
    assert len([e for e in client_events if isinstance(e, MessageReceived)]) == 1


def test_status_message_encoding() -> None:
    for text in ("plain", "100%", "ünïcode", "line\nbreak"):
        assert decode_message(encode_message(text)) == text
    assert encode_message("a%b") == "a%25b"
