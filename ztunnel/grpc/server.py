"""The gRPC server on trio: unary methods, deadlines, status trailers (what ``ca serve`` needs).

Theory of operation: one task per connection reads and feeds the sans-IO engine;
each call whose request is complete runs its handler in a child task under the
client's deadline (grpc-timeout). A handler answers with bytes, or raises
``GrpcError`` for a status; anything else it raises is a bug, logged and answered
with INTERNAL so the other calls on the connection carry on. A client reset cancels
the handler. Transport errors end only their connection.
"""

from __future__ import annotations

import contextlib
import math
import ssl
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field

import structlog
import trio

from ztunnel.grpc.engine import (
    CallCancelled,
    CallStarted,
    ConnectionFailed,
    Event,
    GoAway,
    GrpcEngine,
    HalfClosed,
    MessageReceived,
    Metadata,
)
from ztunnel.grpc.framing import DEFAULT_MAX_MESSAGE
from ztunnel.grpc.status import GrpcError, StatusCode

LOGGER = structlog.get_logger("ztunnel.grpc")

_TRANSPORT_ERRORS = (OSError, trio.BrokenResourceError, trio.ClosedResourceError, ssl.SSLError)
_READ_SIZE = 65536
HANDSHAKE_TIMEOUT = 10.0
# A connection with no call in flight for this long is closed (clients reconnect on
# demand), so idle or stuck peers cannot pin tasks and sockets forever.
IDLE_TIMEOUT = 300.0


@dataclass(frozen=True, slots=True)
class ServerContext:
    """What a handler knows about its call."""

    path: str
    metadata: Metadata
    peer: str
    deadline: float | None  # trio clock, from the client's grpc-timeout

    def header(self, name: str) -> str | None:
        """First value of metadata ``name`` (lower-case), or None."""
        return next((v for k, v in self.metadata if k == name), None)


UnaryHandler = Callable[[bytes, ServerContext], Awaitable[bytes]]


@dataclass(eq=False)
class _ServerCall:
    started: CallStarted
    messages: list[bytes] = field(default_factory=list)
    scope: trio.CancelScope | None = None
    cancelled: bool = False


class GrpcServer:
    """Serves unary methods by full path (``/package.Service/Method``)."""

    def __init__(
        self,
        handlers: Mapping[str, UnaryHandler],
        *,
        ssl_context: ssl.SSLContext | None = None,
        max_message: int = DEFAULT_MAX_MESSAGE,
        idle_timeout: float = IDLE_TIMEOUT,
    ) -> None:
        self.handlers = dict(handlers)
        self.ssl_context = ssl_context
        self.max_message = max_message
        self.idle_timeout = idle_timeout

    async def serve_tcp(
        self,
        port: int,
        host: str | None = None,
        *,
        task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Listen on ``host:port`` (0 = any free port) until cancelled; reports the listeners."""
        listeners = await trio.open_tcp_listeners(port, host=host)
        async with trio.open_nursery() as nursery:
            task_status.started(listeners)
            await trio.serve_listeners(self._accepted, listeners, handler_nursery=nursery)

    async def _accepted(self, stream: trio.SocketStream) -> None:
        try:
            peer = _peer(stream)
        except OSError:
            await trio.aclose_forcefully(stream)
            return
        await self.handle_connection(stream, peer)

    async def handle_connection(self, stream: trio.abc.Stream, peer: str) -> None:
        """Serve one accepted connection (TLS is added here when configured) until it ends."""
        if self.ssl_context is not None:
            tls = trio.SSLStream(stream, self.ssl_context, server_side=True)
            with trio.move_on_after(HANDSHAKE_TIMEOUT):
                try:
                    await tls.do_handshake()
                except _TRANSPORT_ERRORS as exc:
                    LOGGER.info("gRPC TLS handshake failed", peer=str(peer), error=str(exc))
                    await trio.aclose_forcefully(tls)
                    return
                stream = tls
            if stream is not tls:
                LOGGER.info("gRPC TLS handshake timed out", peer=str(peer))
                await trio.aclose_forcefully(tls)
                return
        try:
            await _ServerConnection(self, stream, peer).run()
        finally:
            await trio.aclose_forcefully(stream)


class _ServerConnection:
    def __init__(self, server: GrpcServer, stream: trio.abc.Stream, peer: str) -> None:
        self.server = server
        self.stream = stream
        self.peer = peer
        self.engine = GrpcEngine(client=False, max_message=server.max_message)
        self.calls: dict[int, _ServerCall] = {}
        self.send_lock = trio.Lock()
        # Reading stops (and the connection closes) once no call was in flight for
        # the idle timeout; the deadline moves as calls start and end.
        self.read_scope = trio.CancelScope()
        self._idle()

    def _idle(self) -> None:
        if self.calls:
            self.read_scope.deadline = math.inf
        else:
            self.read_scope.deadline = trio.current_time() + self.server.idle_timeout

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            self.nursery = nursery
            try:
                with self.read_scope:
                    await self.flush()
                    while not self.engine.closed:
                        data = await self.stream.receive_some(_READ_SIZE)
                        if not data:
                            break
                        for event in self.engine.receive_data(data):
                            self.dispatch(event)
                        await self.flush()
            except _TRANSPORT_ERRORS as exc:
                LOGGER.debug("gRPC connection ended", peer=str(self.peer), error=repr(exc))
            nursery.cancel_scope.cancel()

    async def flush(self) -> None:
        async with self.send_lock:
            data = self.engine.data_to_send()
            if data:
                await self.stream.send_all(data)

    def dispatch(self, event: Event) -> None:
        if isinstance(event, CallStarted):
            self.calls[event.stream_id] = _ServerCall(event)
            self._idle()
        elif isinstance(event, MessageReceived):
            # A unary request is at most max_message bytes: credit it at once.
            self.engine.acknowledge(event.stream_id, event.size)
            call = self.calls.get(event.stream_id)
            if call is not None:
                call.messages.append(event.message)
        elif isinstance(event, HalfClosed):
            call = self.calls.get(event.stream_id)
            if call is not None:
                self.nursery.start_soon(self.run_call, call)
        elif isinstance(event, CallCancelled):
            call = self.calls.pop(event.stream_id, None)
            self._idle()
            if call is not None:
                call.cancelled = True
                if call.scope is not None:
                    call.scope.cancel()
        elif isinstance(event, GoAway | ConnectionFailed):
            self.engine.close()

    async def run_call(self, call: _ServerCall) -> None:
        sid = call.started.stream_id
        code, message, response = await self._invoke(call)
        self.calls.pop(sid, None)
        self._idle()
        if call.cancelled:
            return
        try:
            if response is not None:
                self.engine.send_message(sid, response)
            self.engine.finish(sid, code, message)
        except GrpcError:  # the stream died while the handler ran: nobody to answer
            return
        with contextlib.suppress(*_TRANSPORT_ERRORS):
            await self.flush()

    async def _invoke(self, call: _ServerCall) -> tuple[StatusCode, str, bytes | None]:
        started = call.started
        handler = self.server.handlers.get(started.path)
        if handler is None:
            return StatusCode.UNIMPLEMENTED, f"unknown method {started.path}", None
        if len(call.messages) != 1:
            count = len(call.messages)
            return StatusCode.INTERNAL, f"expected 1 request message, got {count}", None
        deadline = trio.current_time() + started.timeout if started.timeout is not None else None
        ctx = ServerContext(started.path, started.metadata, self.peer, deadline)
        with trio.CancelScope(deadline=deadline if deadline is not None else float("inf")) as scope:
            call.scope = scope
            try:
                return StatusCode.OK, "", await handler(call.messages[0], ctx)
            except GrpcError as exc:
                return exc.code, exc.message, None
            except Exception:  # a handler bug: answer this call, keep serving the others
                LOGGER.exception("gRPC handler failed", path=started.path)
                return StatusCode.INTERNAL, "internal error", None
        return StatusCode.DEADLINE_EXCEEDED, "deadline exceeded", None


def _peer(stream: trio.SocketStream) -> str:
    host, port = stream.socket.getpeername()[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
