"""The h2 boundary shared by the gRPC engine and the waypoint's HTTP/2 protocol: header
decoding and the error code a protocol failure closes the connection with."""

from __future__ import annotations

import h2.connection
import h2.errors
import h2.exceptions
import h2.frame_buffer
import hyperframe.exceptions

from ztunnel.grpc.engine import GrpcEngine
from ztunnel.h2wire import decode_headers, error_code
from ztunnel.waypoint.h2proto import ConnectionFailed, H2Protocol


def test_headers_decode_byte_for_byte_whatever_their_encoding() -> None:
    raw = [(b":path", b"/caf\xc3\xa9"), (b"x-bin", b"\xff\x00"), ("x-text", "ok")]
    decoded = decode_headers(raw)
    assert decoded == [(":path", "/cafÃ©"), ("x-bin", "ÿ\x00"), ("x-text", "ok")]
    assert [(k.encode("latin-1"), v.encode("latin-1")) for k, v in decoded][:2] == raw[:2]


def test_a_failure_closes_with_its_own_code_else_protocol_error() -> None:
    flow = h2.exceptions.FlowControlError("window exceeded")
    assert error_code(flow) == h2.errors.ErrorCodes.FLOW_CONTROL_ERROR
    assert error_code(hyperframe.exceptions.InvalidFrameError("bad")) == (
        h2.errors.ErrorCodes.PROTOCOL_ERROR
    )


def _oversized_frame() -> bytes:
    # A whole DATA frame one byte over the default SETTINGS_MAX_FRAME_SIZE (both engines').
    size = 16 * 1024 + 1
    return size.to_bytes(3, "big") + b"\x00\x00" + (1).to_bytes(4, "big") + b"x" * size


def test_both_engines_close_with_frame_size_error_on_an_oversized_frame() -> None:
    client = h2.connection.H2Connection()
    client.initiate_connection()
    preface = client.data_to_send() + _oversized_frame()
    grpc = GrpcEngine(client=False)
    grpc.receive_data(preface)
    assert grpc.closed
    assert _goaway_code(grpc.data_to_send()) == h2.errors.ErrorCodes.FRAME_SIZE_ERROR
    waypoint = H2Protocol(client=False)
    (failed,) = [e for e in waypoint.receive_data(preface) if isinstance(e, ConnectionFailed)]
    assert failed.error_code == h2.errors.ErrorCodes.FRAME_SIZE_ERROR


def _goaway_code(data: bytes) -> int:
    buffer = h2.frame_buffer.FrameBuffer(server=False)
    buffer.max_frame_size = 2**24 - 1
    buffer.add_data(data)
    codes = [f.error_code for f in buffer if type(f).__name__ == "GoAwayFrame"]
    return int(codes[-1])
