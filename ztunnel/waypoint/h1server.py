"""The waypoint's HTTP/1.1 server side: h11 driven over one (CONNECT) stream.

Requests on one connection are served one after another (keep-alive).
Pipelined requests are handled in order: h11 parks the bytes of the next
request until the current response is complete, and nothing more is read
meanwhile, so the buffer stays bounded. An ``Upgrade`` request (WebSocket) is
forwarded; when the upstream answers ``101`` the connection becomes a raw byte
relay.

Bad input never takes more than its own connection: an oversized head
(``max_header_bytes``) is answered ``431``, invalid framing (bad chunk sizes,
conflicting lengths, missing Host) ``400``, a head that does not complete
within ``header_timeout`` ``408``; then the connection is closed after a short
linger so the client can read the answer. Keep-alive connections idle for
``idle_timeout`` are closed silently; a request body that stalls for
``body_timeout`` ends the exchange.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import h11
import trio

from ztunnel.waypoint.exchange import DownstreamGone, DownstreamProtocolError, Exchange
from ztunnel.waypoint.messages import (
    Headers,
    Protocol,
    RequestHead,
    ResponseHead,
    header_value,
    is_upgrade,
    strip_hop_by_hop,
)

RECEIVE_SIZE = 64 * 1024
LINGER_TIMEOUT = 1.0
LINGER_BYTES = 256 * 1024


@dataclass(frozen=True, slots=True)
class H1Limits:
    max_header_bytes: int = 60 * 1024  # Envoy's max_request_headers_kb default
    header_timeout: float = 10.0
    idle_timeout: float = 60.0
    body_timeout: float = 300.0  # no progress reading or writing a body (Envoy's stream idle)
    max_drain_bytes: int = 64 * 1024  # unread request body discarded to keep the connection


def request_head(event: h11.Request) -> tuple[RequestHead, bool, bool]:
    """(head, has_body, is an upgrade) of an h11 request."""
    raw = tuple((k.decode("latin-1"), v.decode("latin-1")) for k, v in event.headers)
    upgrade = is_upgrade(raw)
    headers = strip_hop_by_hop(raw, keep_upgrade=upgrade)
    authority = header_value(raw, "host") or ""
    headers = tuple((k, v) for k, v in headers if k not in ("host", "expect"))
    length = header_value(raw, "content-length")
    chunked = "chunked" in (header_value(raw, "transfer-encoding") or "").lower()
    has_body = chunked or (length is not None and length.strip() not in ("", "0"))
    version = event.http_version.decode("ascii")
    method, target = event.method.decode("ascii"), event.target.decode("latin-1")
    head = RequestHead(method, target, authority, headers, "http", version)
    return head, has_body, upgrade


def _head_size(event: h11.Request) -> int:
    return len(event.target) + sum(len(k) + len(v) + 4 for k, v in event.headers)


def _ambiguous_length(event: h11.Request) -> bool:
    names = {k for k, _ in event.headers}
    return b"content-length" in names and b"transfer-encoding" in names


def _h11_headers(headers: Headers) -> list[tuple[str, str]]:
    return [(k, v) for k, v in headers]


class _Timeout(Exception):
    """A read deadline passed; ``status`` is what to answer (None: close silently)."""

    def __init__(self, status: int | None) -> None:
        self.status = status


class H1Connection:
    def __init__(self, transport: trio.abc.Stream, limits: H1Limits) -> None:
        self.transport = transport
        self.limits = limits
        self.conn = h11.Connection(h11.SERVER, max_incomplete_event_size=limits.max_header_bytes)
        self._cycle_bytes = 0  # bytes received since the current request cycle began
        self.must_close = False

    async def read_event(self, *, body: bool = False) -> object:
        while True:
            event = self.conn.next_event()
            if event is not h11.NEED_DATA:
                return event
            if body:
                timeout, status = self.limits.body_timeout, 408
            elif self._cycle_bytes == 0:
                timeout, status = self.limits.idle_timeout, None
            else:
                timeout, status = self.limits.header_timeout, 408
            with trio.move_on_after(timeout) as scope:
                data = await self.transport.receive_some(RECEIVE_SIZE)
            if scope.cancelled_caught:
                raise _Timeout(status)
            self._cycle_bytes += len(data)
            self.conn.receive_data(bytes(data))

    async def send(self, event: h11.Event) -> None:
        data = self.conn.send(event)
        if data:
            # A client that stops reading must not hold the exchange (and its upstream) forever.
            with trio.move_on_after(self.limits.body_timeout) as scope:
                await self.transport.send_all(data)
            if scope.cancelled_caught:
                self.must_close = True
                raise trio.BrokenResourceError("client stopped reading")

    def next_cycle(self) -> None:
        self.conn.start_next_cycle()
        self._cycle_bytes = 0


class H1Exchange(Exchange):
    protocol = Protocol.HTTP1

    def __init__(
        self, conn: H1Connection, head: RequestHead, has_body: bool, upgrade: bool = False
    ) -> None:
        self._c = conn
        self.head = head
        self.has_body = has_body
        self._upgrade = upgrade
        self._request_done = False
        self.switched = False

    @property
    def request_done(self) -> bool:
        return self._request_done or self._c.conn.their_state in (h11.DONE, h11.MUST_CLOSE)

    async def receive_data(self) -> bytes:
        if self.request_done:
            return b""
        conn = self._c.conn
        try:
            if conn.they_are_waiting_for_100_continue:
                # Envoy answers 100-continue itself and does not forward Expect.
                await self._c.send(h11.InformationalResponse(status_code=100, headers=[]))
            event = await self._c.read_event(body=True)
        except h11.RemoteProtocolError as exc:
            self._c.must_close = True
            raise DownstreamProtocolError(f"request body: {exc}", exc.error_status_hint) from exc
        except _Timeout as exc:
            self._c.must_close = True
            raise DownstreamProtocolError("request body timeout", 408) from exc
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self._c.must_close = True
            raise DownstreamGone(f"request body: {exc!r}") from exc
        if isinstance(event, h11.Data):
            return bytes(event.data)
        if isinstance(event, h11.EndOfMessage):
            self._request_done = True
            self.request_trailers = tuple(
                (k.decode("latin-1"), v.decode("latin-1")) for k, v in event.headers
            )
            return b""
        self._c.must_close = True
        raise DownstreamGone(f"unexpected {type(event).__name__} in request body")

    async def send_response(self, head: ResponseHead, *, end_stream: bool = False) -> None:
        self.responded = True
        headers = _h11_headers(strip_hop_by_hop(head.headers))
        if self.head.version == "1.0" or self._c.must_close:
            headers.append(("connection", "close"))
        try:
            await self._c.send(h11.Response(status_code=head.status, headers=headers))
            if end_stream:
                await self._c.send(h11.EndOfMessage())
        except (h11.LocalProtocolError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self._c.must_close = True
            raise DownstreamGone(f"response: {exc}") from exc

    async def send_data(self, data: bytes) -> None:
        try:
            await self._c.send(h11.Data(data=data))
        except (h11.LocalProtocolError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self._c.must_close = True
            raise DownstreamGone(f"response body: {exc}") from exc

    async def send_end(self, trailers: Headers = ()) -> None:
        try:
            try:
                await self._c.send(h11.EndOfMessage(headers=_h11_headers(trailers)))
            except h11.LocalProtocolError:
                # Trailers need chunked framing; with a Content-Length they are dropped.
                await self._c.send(h11.EndOfMessage())
        except (h11.LocalProtocolError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self._c.must_close = True
            raise DownstreamGone(f"response end: {exc}") from exc

    def abort(self) -> None:
        self._c.must_close = True

    @property
    def can_upgrade(self) -> bool:
        return self._upgrade and self.head.version == "1.1"

    async def switch_protocols(self, head: ResponseHead) -> tuple[trio.abc.Stream, bytes]:
        headers = [(k, v) for k, v in head.headers if k not in ("connection", "upgrade")]
        upgrade = head.header("upgrade") or self.head.header("upgrade") or ""
        headers += [("connection", "Upgrade"), ("upgrade", upgrade)]
        self.responded = True
        try:
            await self._c.send(h11.InformationalResponse(status_code=101, headers=headers))
        except (h11.LocalProtocolError, trio.BrokenResourceError) as exc:
            self._c.must_close = True
            raise DownstreamGone(f"switching protocols: {exc}") from exc
        self.switched = True
        leftover, _closed = self._c.conn.trailing_data
        return self._c.transport, bytes(leftover)


Handler = Callable[[Exchange], Awaitable[None]]


async def serve_h1(
    transport: trio.abc.Stream,
    handler: Handler,
    limits: H1Limits | None = None,
    initial: bytes = b"",
) -> None:
    """Serve HTTP/1.1 requests on ``transport`` until the client or the protocol ends it."""
    c = H1Connection(transport, limits or H1Limits())
    if initial:
        c._cycle_bytes = len(initial)
        c.conn.receive_data(initial)
    try:
        while True:
            event = await c.read_event()
            if isinstance(event, h11.ConnectionClosed):
                return
            if not isinstance(event, h11.Request):
                raise h11.RemoteProtocolError(f"unexpected {type(event).__name__}", 400)
            if _head_size(event) > c.limits.max_header_bytes:
                # h11 bounds only incomplete heads; a complete one can arrive in one read.
                raise h11.RemoteProtocolError("request headers too large", 431)
            if _ambiguous_length(event):
                # Both framings at once is how requests get smuggled; Envoy refuses it too.
                raise h11.RemoteProtocolError("both Content-Length and Transfer-Encoding", 400)
            head, has_body, upgrade = request_head(event)
            ex = H1Exchange(c, head, has_body, upgrade)
            await handler(ex)
            if ex.switched or not await _finish_cycle(c, ex):
                return
    except _Timeout as exc:
        if exc.status is not None:
            await _send_error(c, exc.status, "request timeout")
    except h11.RemoteProtocolError as exc:
        await _send_error(c, exc.error_status_hint, str(exc))
    except (trio.BrokenResourceError, trio.ClosedResourceError, DownstreamGone):
        pass


async def _finish_cycle(c: H1Connection, ex: H1Exchange) -> bool:
    """Prepare the connection for the next request; False: close it."""
    if c.must_close or c.conn.our_state is not h11.DONE:
        return False
    drained = 0
    while not ex.request_done:
        # The handler answered without reading the whole body (a 403, a redirect):
        # discard a bounded amount so the connection stays usable.
        try:
            chunk = await ex.receive_data()
        except DownstreamGone:
            return False
        drained += len(chunk)
        if drained > c.limits.max_drain_bytes:
            return False
    if c.conn.their_state is not h11.DONE:
        return False
    c.next_cycle()
    return True


async def _send_error(c: H1Connection, status: int, why: str) -> None:
    if c.conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
        return
    body = f"{h11_reason(status)}: {why}\n".encode()
    headers = [
        ("content-type", "text/plain"),
        ("content-length", str(len(body))),
        ("connection", "close"),
    ]
    with contextlib.suppress(
        h11.LocalProtocolError, trio.BrokenResourceError, trio.ClosedResourceError
    ):
        await c.send(h11.Response(status_code=status, headers=headers))
        await c.send(h11.Data(data=body))
        await c.send(h11.EndOfMessage())
        await _linger(c.transport)


def h11_reason(status: int) -> str:
    return {400: "Bad Request", 408: "Request Timeout", 431: "Request Header Fields Too Large"}.get(
        status, "Error"
    )


async def _linger(stream: trio.abc.Stream) -> None:
    """Half-close, then drain a bounded amount of input, so the kernel does not RST our answer."""
    if isinstance(stream, trio.abc.HalfCloseableStream):
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await stream.send_eof()
    drained = 0
    with trio.move_on_after(LINGER_TIMEOUT):
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            while drained < LINGER_BYTES and (chunk := await stream.receive_some(RECEIVE_SIZE)):
                drained += len(chunk)
