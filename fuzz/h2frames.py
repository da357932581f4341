"""Structured HTTP/2 client conversations for the HTTP/2 targets.

Random bytes almost never get past the preface and the first SETTINGS, and a CONNECT
needs a well-formed HPACK block: the issue measured ~1% of random inputs reaching a
CONNECT answer. Here the fuzzer's bytes choose *which* frames to send (a valid
preface and SETTINGS most of the time, HEADERS whose header list is built from a
dictionary of valid and hostile values, then any mix of DATA, RST_STREAM, PING,
SETTINGS, WINDOW_UPDATE, PRIORITY, GOAWAY, CONTINUATION and unknown frames), and
the frame bytes are encoded here. Frames are encoded by hand (not hyperframe) so
lengths, flags, reserved bits and stream ids can be wrong on purpose.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

import hpack

from fuzz.cursor import Cursor

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY = range(8)
WINDOW_UPDATE, CONTINUATION = 8, 9
END_STREAM, ACK, END_HEADERS, PADDED, PRIORITY_FLAG = 0x1, 0x1, 0x4, 0x8, 0x20

Header = tuple[bytes, bytes]
HeaderSource = Callable[[Cursor], list[Header]]

# Values at and around every limit a peer can hit.
_INTERESTING = (
    0,
    1,
    2,
    100,
    16_383,
    16_384,
    16_385,
    65_535,
    65_536,
    (1 << 24) - 1,
    1 << 24,
    (1 << 31) - 1,
    1 << 31,
    (1 << 32) - 1,
)
_STREAM_IDS = (1, 1, 1, 3, 3, 5, 7, 0, 2, 4, 101, (1 << 31) - 1)


def frame(kind: int, flags: int, stream_id: int, payload: bytes) -> bytes:
    length = struct.pack(">I", len(payload) & 0xFFFFFF)[1:]
    return length + bytes((kind & 0xFF, flags & 0xFF)) + struct.pack(">I", stream_id) + payload


def _value(c: Cursor) -> int:
    return c.pick(_INTERESTING) if c.bool() else c.int(0, (1 << 32) - 1)


def _stream_id(c: Cursor) -> int:
    return c.pick(_STREAM_IDS) if not c.chance(8) else c.int(0, (1 << 32) - 1)


# Valid values of each setting a client sends (HEADER_TABLE_SIZE, ENABLE_PUSH,
# MAX_CONCURRENT_STREAMS, INITIAL_WINDOW_SIZE, MAX_FRAME_SIZE, MAX_HEADER_LIST_SIZE).
_VALID_SETTINGS = (
    (1, (0, 4096, 65_536)),
    (2, (0,)),
    (3, (0, 100, 1 << 31)),
    (4, (0, 1, 65_535, (1 << 31) - 1)),
    (5, (16_384, (1 << 24) - 1)),
    (6, (0, 100, 1 << 20)),
)


def settings_frame(c: Cursor) -> bytes:
    """Mostly valid settings (a connection error here ends the input early); one in
    four values anything, ids included."""
    entries = []
    for _ in range(c.int(0, 4)):
        if c.chance(4):
            entries.append(
                struct.pack(">HI", c.pick((1, 2, 3, 4, 5, 6, 8, 9, 0, 0xFFFF)), _value(c))
            )
        else:
            ident, values = c.pick(_VALID_SETTINGS)
            entries.append(struct.pack(">HI", ident, c.pick(values)))
    return frame(SETTINGS, 0, 0, b"".join(entries))


class Conversation:
    """One client's byte stream, frame by frame (an HPACK encoder keeps its table)."""

    def __init__(self, c: Cursor, headers: HeaderSource, *, grpc: bool = False) -> None:
        self.c = c
        self.headers = headers
        self.grpc = grpc  # DATA carries gRPC length-prefixed messages, mostly
        self.encoder = hpack.Encoder()
        self.frames: list[bytes] = []
        self.connects = 0  # HEADERS frames sent whose header list came from ``headers``

    def build(self, max_frames: int = 10) -> list[bytes]:
        c = self.c
        preface = PREFACE
        if c.chance(32):
            at = c.int(0, len(PREFACE) - 1)
            preface = PREFACE[:at] + bytes([c.byte()]) + PREFACE[at + 1 :]
        self.frames.append(preface)
        if not c.chance(16):
            self.frames.append(settings_frame(c))
        if not c.chance(8):
            self._headers(1)  # the first request, on the first client stream
            if not c.chance(3):
                self._data(1)  # and its first bytes
        for _ in range(c.int(0, max_frames)):
            self._next_frame()
        if c.left:
            self.frames.append(c.rest())  # whatever the fuzzer appended: raw bytes
        return self.frames

    def _next_frame(self) -> None:
        c = self.c
        kind = c.pick(
            (HEADERS, HEADERS, HEADERS, DATA, DATA, RST_STREAM, PING, SETTINGS, WINDOW_UPDATE,
             PRIORITY, GOAWAY, CONTINUATION, PUSH_PROMISE, 0x42)
        )  # fmt: skip
        sid = _stream_id(c)
        if kind == HEADERS:
            self._headers(sid)
        elif kind == DATA:
            self._data(sid)
        elif kind == RST_STREAM:
            self.frames.append(frame(RST_STREAM, 0, sid, struct.pack(">I", c.pick((0, 8, 1, 2)))))
        elif kind == PING:
            self.frames.append(frame(PING, ACK if c.chance(4) else 0, 0, c.bytes(8).ljust(8, b"p")))
        elif kind == SETTINGS:
            self.frames.append(frame(SETTINGS, ACK, 0, b"") if c.bool() else settings_frame(c))
        elif kind == WINDOW_UPDATE:
            increment = c.pick((1, 0, 65_535, (1 << 31) - 1, 1 << 31))
            target = c.pick((0, sid))
            self.frames.append(frame(WINDOW_UPDATE, 0, target, struct.pack(">I", increment)))
        elif kind == PRIORITY:
            self.frames.append(frame(PRIORITY, 0, sid, struct.pack(">IB", c.pick((0, sid, 3)), 16)))
        elif kind == GOAWAY:
            self.frames.append(frame(GOAWAY, 0, 0, struct.pack(">II", sid, c.pick((0, 1, 11)))))
        else:  # a stray CONTINUATION, PUSH_PROMISE from a client, an unknown type
            self.frames.append(frame(kind, c.byte(), sid, c.blob(24)))

    def _headers(self, sid: int) -> None:
        c = self.c
        block = self.encoder.encode(self.headers(c))
        self.connects += 1
        flags = END_STREAM if c.chance(6) else 0
        payload = block
        if c.chance(12):
            flags |= PRIORITY_FLAG
            payload = struct.pack(">IB", c.pick((0, sid)), 15) + payload
        if c.chance(12):
            flags |= PADDED
            pad = c.int(0, 20)
            payload = bytes([pad]) + payload + bytes(pad if c.bool() else max(0, pad - 1))
        if not c.chance(10):
            self.frames.append(frame(HEADERS, flags | END_HEADERS, sid, payload))
            return
        # The block split over CONTINUATION frames, sometimes never ended.
        cut = c.int(0, len(payload))
        self.frames.append(frame(HEADERS, flags, sid, payload[:cut]))
        rest = payload[cut:]
        for _ in range(c.int(0, 3)):
            self.frames.append(frame(CONTINUATION, 0, sid, rest[:8]))
            rest = rest[8:]
        if not c.chance(4):
            self.frames.append(frame(CONTINUATION, END_HEADERS, c.pick((sid, sid, 3)), rest))

    def _data(self, sid: int) -> None:
        c = self.c
        flags = END_STREAM if c.chance(3) else 0
        body = c.blob(64)
        if self.grpc and not c.chance(4):
            body = struct.pack(">BI", 0, len(body)) + body
        if c.chance(10):
            flags |= PADDED
            body = bytes([c.int(0, 70)]) + body
        self.frames.append(frame(DATA, flags, sid, body))


def chunked(c: Cursor, frames: list[bytes]) -> list[bytes]:
    """The conversation as the reads a server would see: a read per frame (mostly: a
    protocol error discards the events of its whole read), all in one, or cut anywhere."""
    how = c.int(0, 3)
    data = b"".join(frames)
    if how <= 1 or len(data) < 2:
        return list(frames)
    if how == 2:
        return [data]
    cuts = sorted({c.int(1, len(data) - 1) for _ in range(c.int(1, 3))})
    return [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]


# -- header lists ---------------------------------------------------------------------------

_AUTHORITIES = (
    "10.0.0.2:80",
    "10.0.0.2:8080",
    "[fd00::2]:80",
    "[::ffff:127.0.0.1]:15000",
    "127.0.0.1:15008",
    "[fe80::1%eth0]:80",
    "echo.default.svc.cluster.local:80",
    "echo:80",
    "10.0.0.2:0",
    "10.0.0.2:65536",
    "10.0.0.2:080",
    "10.0.0.2",
    ":80",
    "[::1]",
    "a..b:80",
    "-a.b:80",
    "10.0.0.2:80 ",
    "a" * 64 + ":80",
    ".".join(["a" * 63] * 4) + ":80",
)
_EXTRA = (
    ("baggage", "k8s.namespace.name=default,k8s.pod.name=shell"),
    ("traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
    ("forwarded", "for=10.0.0.1"),
    ("x-istio-attributes", "Cg=="),
)
# Headers HTTP/2 forbids: each one is a connection error, so they come rarely.
_HOSTILE = (
    ("connection", "close"),
    ("te", "trailers"),
    ("Upper-Case", "x"),
    ("", "empty-name"),
    ("x", "a" * 300),
)


def _text(c: Cursor, pool: tuple[str, ...]) -> bytes:
    if c.chance(5):
        return c.blob(40)
    return pool[c.int(0, len(pool) - 1)].encode()


def connect_headers(c: Cursor) -> list[Header]:
    """An HBONE CONNECT, mostly well-formed; the fuzzer picks the damage."""
    method = b"CONNECT" if not c.chance(12) else c.pick((b"GET", b"connect", b"", b"POST"))
    headers: list[Header] = [(b":method", method), (b":authority", _text(c, _AUTHORITIES))]
    if c.chance(24):
        headers.append((b":path", b"/"))
    if c.chance(24):
        headers.append((b":scheme", b"https"))
    headers.extend(_extra_headers(c))
    if c.chance(24):
        headers.reverse()  # a regular header before a pseudo-header
    if c.chance(32):
        headers.append((b":authority", _text(c, _AUTHORITIES)))
    return headers


def _extra_headers(c: Cursor) -> list[Header]:
    out = []
    for _ in range(c.int(0, 2)):
        name, value = c.pick(_HOSTILE if c.chance(8) else _EXTRA)
        out.append((name.encode(), value.encode() if not c.chance(8) else c.blob(30)))
    return out


_PATHS = ("/", "/a?b=c", "*", "http://x/", "/%00", "//", "/" + "a" * 200)


def request_headers(c: Cursor) -> list[Header]:
    """An HTTP/2 request (GET/POST/gRPC) for the waypoint's and gRPC's servers."""
    headers: list[Header] = [
        (b":method", c.pick((b"GET", b"POST", b"CONNECT", b"HEAD", b"get", b""))),
        (b":scheme", c.pick((b"http", b"https", b""))),
        (b":path", _text(c, _PATHS)),
        (b":authority", _text(c, _AUTHORITIES)),
    ]
    if c.chance(12):
        del headers[c.int(0, 3)]
    if c.bool():
        headers.append((b"content-type", c.pick((b"application/grpc", b"application/grpc+proto",
                                                 b"text/plain"))))  # fmt: skip
        headers.append((b"te", b"trailers"))
    if c.chance(4):
        headers.append((b"grpc-timeout", c.pick((b"1S", b"10m", b"999999999H", b"x", b"1n"))))
    if c.chance(6):
        headers.append((b"content-length", c.pick((b"0", b"5", b"-1", b"1,1", b"99999999999"))))
    headers.extend(_extra_headers(c))
    return headers


def grpc_headers(c: Cursor) -> list[Header]:
    """A gRPC call (POST, application/grpc, te: trailers), with rare damage."""
    if c.chance(6):
        return request_headers(c)
    headers: list[Header] = [
        (b":method", b"POST"),
        (b":scheme", b"http"),
        (b":path", c.pick((b"/istio.v1.auth.IstioCertificateService/CreateCertificate",
                           b"/envoy.service.discovery.v3.AggregatedDiscoveryService/"
                           b"DeltaAggregatedResources", b"/x"))),
        (b":authority", b"istiod:15012"),
        (b"content-type", c.pick((b"application/grpc", b"application/grpc+proto"))),
        (b"te", b"trailers"),
    ]  # fmt: skip
    if c.chance(4):
        headers.append((b"grpc-timeout", c.pick((b"1S", b"10m", b"99999999H", b"x", b"1n"))))
    headers.extend(_extra_headers(c))
    return headers
