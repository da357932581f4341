"""Requests from the waypoint to destination pods, over HBONE, with connection reuse.

An ``Endpoint`` is one pod port. The injected ``Connector`` opens a byte
stream to it: in the product an HBONE CONNECT through the pool with
``:authority = ip:targetPort`` (``hbone_connector``), in tests whatever fake
app they like. Over that stream the waypoint speaks HTTP/1.1 (h11) or HTTP/2
(``H2Connection``), as the service port declares, or as the client spoke.

Reuse: an HTTP/1.1 stream that finished a keep-alive exchange goes back to a
per-endpoint idle list; a watcher discards it as soon as the app closes it
(or after ``idle_timeout``), so a stale connection is never handed out. An
HTTP/2 connection per endpoint carries concurrent requests up to the app's
``MAX_CONCURRENT_STREAMS``; one dialer per endpoint at a time.

Failures become the ``UpstreamError`` the retry loop understands: the dial
(``connect-failure``), REFUSED_STREAM / GOAWAY-refused (``refused-stream``),
a reset or EOF before the response (``reset``), invalid HTTP (``protocol error``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv6Address

import h11
import trio

from ztunnel.errors import ZtunnelError
from ztunnel.model.identity import Identity
from ztunnel.model.workload import HBONE_PORT
from ztunnel.waypoint.errors import (
    UpstreamConnectError,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamRefusedError,
    UpstreamResetError,
)
from ztunnel.waypoint.h2conn import H2Connection, H2Stream, H2StreamError
from ztunnel.waypoint.h2proto import H2Limits
from ztunnel.waypoint.messages import Headers, Protocol, RequestHead, ResponseHead, strip_hop_by_hop

RECEIVE_SIZE = 64 * 1024
MAX_RESPONSE_HEADER_BYTES = 60 * 1024


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One destination pod port; ``identities`` are the SANs its certificate may carry."""

    uid: str
    ip: IPv4Address | IPv6Address
    port: int
    identities: tuple[Identity, ...] = ()
    hbone: bool = True
    hbone_port: int = HBONE_PORT

    @property
    def authority(self) -> str:
        return f"[{self.ip}]:{self.port}" if self.ip.version == 6 else f"{self.ip}:{self.port}"


Connector = Callable[[Endpoint], Awaitable[trio.abc.Stream]]


class UpstreamCall:
    """One request in flight to an endpoint (either protocol)."""

    endpoint: Endpoint
    response: ResponseHead | None = None
    trailers: Headers = ()

    async def send_data(self, data: bytes) -> None:
        raise NotImplementedError

    async def send_end(self, trailers: Headers = ()) -> None:
        raise NotImplementedError

    async def receive_response(self) -> ResponseHead:
        raise NotImplementedError

    async def receive_data(self) -> bytes:
        raise NotImplementedError

    async def close(self) -> None:
        """Done with the call: reuse the connection when the exchange completed cleanly."""
        raise NotImplementedError

    async def take_upgraded(self) -> tuple[trio.abc.Stream, bytes]:
        raise UpstreamProtocolError("the upstream protocol cannot switch")


# -- HTTP/1.1 ------------------------------------------------------------------------------------


def h1_request_headers(
    head: RequestHead, has_body: bool, endpoint: Endpoint
) -> list[tuple[str, str]]:
    upgrade = head.header("upgrade") is not None
    headers = [
        (k, v) for k, v in strip_hop_by_hop(head.headers, keep_upgrade=upgrade) if k != "cookie"
    ]
    cookies = [v for k, v in head.headers if k == "cookie"]
    if cookies:
        headers.append(("cookie", "; ".join(cookies)))  # RFC 9113 §8.2.3
    if upgrade:
        headers.append(("connection", "upgrade"))
    if has_body and head.header("content-length") is None:
        headers.append(("transfer-encoding", "chunked"))
    return [("host", head.authority or endpoint.authority), *headers]


class H1Call(UpstreamCall):
    def __init__(
        self, pool: UpstreamPool, endpoint: Endpoint, stream: trio.abc.Stream, conn: h11.Connection
    ) -> None:
        self._pool = pool
        self.endpoint = endpoint
        self._stream = stream
        self._conn = conn
        self._broken = False
        self._closed = False

    async def _send(self, event: h11.Event) -> None:
        try:
            data = self._conn.send(event)
            if data:
                await self._stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.LocalProtocolError) as exc:
            self._broken = True
            raise UpstreamResetError(f"sending to {self.endpoint.authority}: {exc}") from exc

    async def start(self, head: RequestHead, has_body: bool) -> None:
        headers = h1_request_headers(head, has_body, self.endpoint)
        await self._send(h11.Request(method=head.method, target=head.target, headers=headers))
        if not has_body:
            await self._send(h11.EndOfMessage())

    async def send_data(self, data: bytes) -> None:
        await self._send(h11.Data(data=data))

    async def send_end(self, trailers: Headers = ()) -> None:
        try:
            await self._send(h11.EndOfMessage(headers=list(trailers)))
        except UpstreamResetError:
            if self._broken and not trailers:
                raise
            await self._send(h11.EndOfMessage())  # trailers need chunked framing

    async def _event(self) -> object:
        while True:
            try:
                event = self._conn.next_event()
            except h11.RemoteProtocolError as exc:
                self._broken = True
                raise UpstreamProtocolError(f"{self.endpoint.authority}: {exc}") from exc
            if event is not h11.NEED_DATA:
                return event
            try:
                data = await self._stream.receive_some(RECEIVE_SIZE)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                self._broken = True
                raise UpstreamResetError(f"{self.endpoint.authority}: {exc}") from exc
            self._conn.receive_data(bytes(data))

    async def receive_response(self) -> ResponseHead:
        while True:
            event = await self._event()
            if isinstance(event, h11.InformationalResponse) and event.status_code != 101:
                continue
            if isinstance(event, h11.Response | h11.InformationalResponse):
                headers = tuple(
                    (k.decode("latin-1"), v.decode("latin-1")) for k, v in event.headers
                )
                self.response = ResponseHead(event.status_code, headers)
                return self.response
            self._broken = True
            raise UpstreamResetError(f"{self.endpoint.authority} closed before responding")

    async def receive_data(self) -> bytes:
        event = await self._event()
        if isinstance(event, h11.Data):
            return bytes(event.data)
        if isinstance(event, h11.EndOfMessage):
            self.trailers = tuple(
                (k.decode("latin-1"), v.decode("latin-1")) for k, v in event.headers
            )
            return b""
        self._broken = True
        raise UpstreamResetError(f"{self.endpoint.authority} closed mid-response")

    async def take_upgraded(self) -> tuple[trio.abc.Stream, bytes]:
        if self._conn.our_state is not h11.SWITCHED_PROTOCOL:
            raise UpstreamProtocolError("the upstream did not switch protocols")
        self._closed = True
        leftover, _ = self._conn.trailing_data
        return self._stream, bytes(leftover)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        c = self._conn
        if not self._broken and c.our_state is h11.DONE and c.their_state is h11.DONE:
            c.start_next_cycle()
            self._pool._release_h1(self.endpoint, self._stream, c)
            return
        await trio.aclose_forcefully(self._stream)


# -- HTTP/2 --------------------------------------------------------------------------------------


def _h2_error(endpoint: Endpoint, exc: H2StreamError) -> UpstreamError:
    if exc.refused:
        return UpstreamRefusedError(f"{endpoint.authority}: {exc}")
    return UpstreamResetError(f"{endpoint.authority}: {exc}")


class H2Call(UpstreamCall):
    def __init__(self, endpoint: Endpoint, stream: H2Stream) -> None:
        self.endpoint = endpoint
        self._stream = stream
        self._closed = False

    async def send_data(self, data: bytes) -> None:
        try:
            await self._stream.send_data(data)
        except H2StreamError as exc:
            raise _h2_error(self.endpoint, exc) from exc

    async def send_end(self, trailers: Headers = ()) -> None:
        try:
            if trailers:
                await self._stream.send_trailers(trailers)
            else:
                await self._stream.send_end()
        except H2StreamError as exc:
            raise _h2_error(self.endpoint, exc) from exc

    async def receive_response(self) -> ResponseHead:
        try:
            self.response = await self._stream.receive_response()
        except H2StreamError as exc:
            raise _h2_error(self.endpoint, exc) from exc
        return self.response

    async def receive_data(self) -> bytes:
        try:
            data = await self._stream.receive_data()
        except H2StreamError as exc:
            raise _h2_error(self.endpoint, exc) from exc
        if not data:
            self.trailers = self._stream.trailers
        return data

    async def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._stream.reset()  # a no-op when both sides ended
        await trio.lowlevel.checkpoint()


# -- the pool ------------------------------------------------------------------------------------


@dataclass
class _IdleH1:
    stream: trio.abc.Stream
    conn: h11.Connection
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    done: trio.Event = field(default_factory=trio.Event)
    taken: bool = False
    dead: bool = False


class UpstreamPool:
    """Upstream connections of one waypoint; ``run`` must be started in a nursery first."""

    def __init__(
        self,
        connector: Connector,
        *,
        h2_limits: H2Limits | None = None,
        max_idle_per_endpoint: int = 16,
        idle_timeout: float = 60.0,
    ) -> None:
        self._connector = connector
        self._h2_limits = h2_limits or H2Limits(max_concurrent_streams=1000)
        self._max_idle = max_idle_per_endpoint
        self._idle_timeout = idle_timeout
        self._idle: dict[Endpoint, list[_IdleH1]] = {}
        self._h2: dict[Endpoint, list[H2Connection]] = {}
        self._h2_locks: dict[Endpoint, trio.Lock] = {}
        self._nursery: trio.Nursery | None = None
        self.dials = 0  # connections opened (tests and the admin view)

    async def run(
        self, *, task_status: trio.TaskStatus[UpstreamPool] = trio.TASK_STATUS_IGNORED
    ) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started(self)
            await trio.sleep_forever()

    def idle_count(self, endpoint: Endpoint | None = None) -> int:
        lists = [self._idle.get(endpoint, [])] if endpoint else list(self._idle.values())
        return sum(len(x) for x in lists)

    async def _dial(self, endpoint: Endpoint) -> trio.abc.Stream:
        self.dials += 1
        try:
            return await self._connector(endpoint)
        except UpstreamError:
            raise
        except (OSError, trio.BrokenResourceError, trio.TooSlowError) as exc:
            raise UpstreamConnectError(f"{endpoint.authority}: {exc}") from exc

    async def dial_raw(self, endpoint: Endpoint) -> trio.abc.Stream:
        """A fresh byte stream to ``endpoint`` (plain TCP passthrough); the caller closes it."""
        return await self._dial(endpoint)

    async def open(
        self, endpoint: Endpoint, protocol: Protocol, head: RequestHead, *, has_body: bool
    ) -> UpstreamCall:
        """Send ``head`` to ``endpoint``; the body (if any) follows through the call."""
        if protocol is Protocol.HTTP2:
            return await self._open_h2(endpoint, head, has_body)
        stream, conn = await self._take_h1(endpoint)
        call = H1Call(self, endpoint, stream, conn)
        try:
            await call.start(head, has_body)
        except BaseException:
            await call.close()
            raise
        return call

    # -- HTTP/1.1 idle connections ---------------------------------------------------------------

    async def _take_h1(self, endpoint: Endpoint) -> tuple[trio.abc.Stream, h11.Connection]:
        idle = self._idle.get(endpoint, [])
        while idle:
            entry = idle.pop()
            entry.taken = True
            entry.scope.cancel()
            await entry.done.wait()
            if not entry.dead and entry.conn.our_state is h11.IDLE:
                return entry.stream, entry.conn
        stream = await self._dial(endpoint)
        conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_RESPONSE_HEADER_BYTES)
        return stream, conn

    def _release_h1(
        self, endpoint: Endpoint, stream: trio.abc.Stream, conn: h11.Connection
    ) -> None:
        idle = self._idle.setdefault(endpoint, [])
        if self._nursery is None or len(idle) >= self._max_idle:
            self._nursery_close(stream)
            return
        entry = _IdleH1(stream, conn)
        idle.append(entry)
        self._nursery.start_soon(self._watch_idle, endpoint, entry)

    def _nursery_close(self, stream: trio.abc.Stream) -> None:
        if self._nursery is not None:
            self._nursery.start_soon(trio.aclose_forcefully, stream)

    async def _watch_idle(self, endpoint: Endpoint, entry: _IdleH1) -> None:
        """Any byte or EOF on an idle connection means it is unusable: drop it."""
        try:
            with entry.scope:  # cancelled by the caller that takes the connection
                with trio.move_on_after(self._idle_timeout):
                    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                        await entry.stream.receive_some(1)
                entry.dead = True  # data, EOF, an error or the idle timeout
        finally:
            if entry.dead or not entry.taken:
                entry.dead = True
                with contextlib.suppress(ValueError):
                    self._idle.get(endpoint, []).remove(entry)
                if not self._idle.get(endpoint):
                    self._idle.pop(endpoint, None)
                with trio.CancelScope(shield=True):
                    await trio.aclose_forcefully(entry.stream)
            entry.done.set()

    # -- HTTP/2 connections ----------------------------------------------------------------------

    async def _open_h2(self, endpoint: Endpoint, head: RequestHead, has_body: bool) -> H2Call:
        conn = await self._h2_connection(endpoint)
        try:
            stream = await conn.open_stream(head, end_stream=not has_body)
        except H2StreamError as exc:
            raise UpstreamRefusedError(f"{endpoint.authority}: {exc}") from exc
        return H2Call(endpoint, stream)

    async def _h2_connection(self, endpoint: Endpoint) -> H2Connection:
        lock = self._h2_locks.setdefault(endpoint, trio.Lock())
        async with lock:
            for conn in self._h2.get(endpoint, []):
                if conn.accepting_streams and conn.active_streams < conn.max_streams:
                    return conn
            if self._nursery is None:
                raise RuntimeError("UpstreamPool.run() is not running")
            transport = await self._dial(endpoint)
            conn = H2Connection(
                transport, client=True, limits=self._h2_limits, idle_timeout=self._idle_timeout
            )
            self._h2.setdefault(endpoint, []).append(conn)
            await self._nursery.start(self._drive_h2, endpoint, conn)
            return conn

    async def _drive_h2(
        self,
        endpoint: Endpoint,
        conn: H2Connection,
        *,
        task_status: trio.TaskStatus[H2Connection] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        try:
            await conn.run(task_status=task_status)
        finally:
            conns = self._h2.get(endpoint, [])
            with contextlib.suppress(ValueError):
                conns.remove(conn)
            if not conns:
                self._h2.pop(endpoint, None)


# -- the product's connector ---------------------------------------------------------------------

HboneOpen = Callable[[Endpoint], Awaitable[trio.abc.Stream]]


def hbone_connector(open_hbone: HboneOpen, open_tcp: HboneOpen) -> Connector:
    """HBONE to mesh endpoints, plain TCP to others; errors become UpstreamConnectError."""

    async def connect(endpoint: Endpoint) -> trio.abc.Stream:
        opener = open_hbone if endpoint.hbone else open_tcp
        try:
            return await opener(endpoint)
        except (ZtunnelError, OSError, trio.TooSlowError, trio.BrokenResourceError) as exc:
            # HBONE, TLS, SPIFFE identity and certificate errors all mean: not connected.
            raise UpstreamConnectError(f"{endpoint.authority}: {exc}") from exc

    return connect
