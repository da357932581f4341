"""A tiny HTTP/1.1 server core (trio + h11) shared by the admin, metrics and readiness servers.

h11 is the sans-IO protocol; this module is only its driver: read, feed, answer
with what the (synchronous) handler returns, repeat while the client keeps the
connection alive. Requests are small by design: headers and bodies are bounded,
and a slow or idle client is dropped after a timeout.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TypeAlias
from urllib.parse import parse_qs, urlsplit

import h11
import structlog
import trio

MAX_HEADER_BYTES = 16 * 1024
MAX_BODY_BYTES = 64 * 1024
RECEIVE_TIMEOUT = 30.0  # per read: bounds both idle keep-alive and slow requests
_RECV_SIZE = 16 * 1024
LINGER_TIMEOUT = 1.0
LINGER_BYTES = 256 * 1024

_log = structlog.stdlib.get_logger("ztunnel.admin")


@dataclass(frozen=True, slots=True)
class Request:
    method: str
    target: str
    path: str
    query: Mapping[str, list[str]] = field(default_factory=dict)
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes = b""
    # The client's IP as the socket reports it; empty when the stream is not an IP socket
    # (a Unix socket, an in-memory stream): then only local processes can be the client.
    peer: str = ""


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    body: bytes = b""
    content_type: str = "text/plain; charset=utf-8"
    headers: tuple[tuple[str, str], ...] = ()

    @classmethod
    def text(cls, status: int, text: str) -> Response:
        return cls(status, text.encode())

    @classmethod
    def json(cls, obj: object, status: int = 200) -> Response:
        body = json.dumps(obj, indent=2, default=str) + "\n"
        return cls(status, body.encode(), "application/json")


Handler: TypeAlias = Callable[[Request], Response]
ListenTarget: TypeAlias = trio.SocketListener | trio.socket.SocketType | tuple[str, int]


async def open_listener(target: ListenTarget) -> trio.SocketListener:
    """A listener from an address ``(host, port)``, a bound trio socket, or a listener."""
    if isinstance(target, trio.SocketListener):
        return target
    if isinstance(target, tuple):
        host, port = target
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = trio.socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            await sock.bind((host, port))
        except OSError:
            sock.close()
            raise
        target = sock
    target.listen(128)
    return trio.SocketListener(target)


async def serve_http(
    target: ListenTarget,
    handler: Handler,
    *,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``handler`` until cancelled; reports the bound port via ``task_status``."""
    listener = await open_listener(target)
    port: int = listener.socket.getsockname()[1]

    async def run(stream: trio.SocketStream) -> None:
        await serve_connection(stream, handler)

    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(trio.serve_listeners, run, [listener])
            task_status.started(port)
    finally:
        await trio.aclose_forcefully(listener)


async def serve_connection(stream: trio.abc.Stream, handler: Handler) -> None:
    """Answer requests on one connection until the client or protocol ends it."""
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEADER_BYTES)
    peer = _peer_ip(stream)
    try:
        while True:
            request = await _read_request(stream, conn, peer)
            if request is None:
                return
            await _send(stream, conn, _call(handler, request), head=request.method == "HEAD")
            if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                return
            conn.start_next_cycle()
    except h11.RemoteProtocolError as exc:
        await _send_error(stream, conn, exc.error_status_hint, str(exc))
    except (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError):
        pass
    finally:
        await trio.aclose_forcefully(stream)


def _peer_ip(stream: trio.abc.Stream) -> str:
    if not isinstance(stream, trio.SocketStream) or stream.socket.family == socket.AF_UNIX:
        return ""
    try:
        return str(stream.socket.getpeername()[0])
    except OSError:  # already reset by the peer: no answer will reach it anyway
        return "0.0.0.0"


def _call(handler: Handler, request: Request) -> Response:
    try:
        return handler(request)
    except Exception as exc:
        _log.exception("admin handler failed", path=request.path)
        return Response.text(500, f"internal error: {exc}\n")


async def _next_event(stream: trio.abc.Stream, conn: h11.Connection) -> object:
    while True:
        event = conn.next_event()
        if event is not h11.NEED_DATA:
            return event
        with trio.fail_after(RECEIVE_TIMEOUT):
            data = await stream.receive_some(_RECV_SIZE)
        conn.receive_data(bytes(data))


async def _read_request(stream: trio.abc.Stream, conn: h11.Connection, peer: str) -> Request | None:
    event = await _next_event(stream, conn)
    if isinstance(event, h11.ConnectionClosed):
        return None
    if not isinstance(event, h11.Request):
        raise h11.RemoteProtocolError(f"unexpected {type(event).__name__}", 400)
    body = bytearray()
    while True:
        part = await _next_event(stream, conn)
        if isinstance(part, h11.EndOfMessage):
            return _to_request(event, bytes(body), peer)
        if isinstance(part, h11.Data):
            body += part.data
            if len(body) > MAX_BODY_BYTES:
                raise h11.RemoteProtocolError("request body too large", 413)
        else:
            raise h11.RemoteProtocolError("connection closed mid-request", 400)


def _to_request(event: h11.Request, body: bytes, peer: str) -> Request:
    target = event.target.decode("latin-1")
    url = urlsplit(target)
    return Request(
        method=event.method.decode("ascii"),
        target=target,
        path=url.path or "/",
        query=parse_qs(url.query, keep_blank_values=True),
        headers=tuple((k.decode("latin-1"), v.decode("latin-1")) for k, v in event.headers),
        body=body,
        peer=peer,
    )


async def _send(
    stream: trio.abc.Stream, conn: h11.Connection, response: Response, *, head: bool = False
) -> None:
    headers = [
        ("content-type", response.content_type),
        ("content-length", str(len(response.body))),
        *response.headers,
    ]
    out = conn.send(h11.Response(status_code=response.status, headers=headers)) or b""
    if response.body and not head:
        out += conn.send(h11.Data(data=response.body)) or b""
    out += conn.send(h11.EndOfMessage()) or b""
    await stream.send_all(out)


async def _send_error(stream: trio.abc.Stream, conn: h11.Connection, status: int, why: str) -> None:
    if conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
        return
    with contextlib.suppress(h11.LocalProtocolError, trio.BrokenResourceError):
        await _send(stream, conn, Response.text(status, f"bad request: {why}\n"))
        await _linger(stream)


async def _linger(stream: trio.abc.Stream) -> None:
    """Half-close, then drain a bounded amount of unread input before closing.

    Closing a socket with unread input makes the kernel send RST, which can
    destroy the error response before the client reads it.
    """
    if isinstance(stream, trio.abc.HalfCloseableStream):
        await stream.send_eof()
    drained = 0
    with trio.move_on_after(LINGER_TIMEOUT):
        while drained < LINGER_BYTES and (chunk := await stream.receive_some(_RECV_SIZE)):
            drained += len(chunk)


def is_loopback_host(host: str) -> bool:
    """``localhost``, ``127.x.y.z`` or ``[::1]``, with or without a port."""
    name = host.strip().lower()
    if name.startswith("["):
        name = name[1:].partition("]")[0]
    elif name.count(":") == 1:
        name = name.partition(":")[0]
    if name in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False
