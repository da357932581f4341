"""The gRPC client on trio: one HTTP/2 connection, unary and bidirectional-streaming calls.

Theory of operation: ``connect`` dials (TCP, then TLS with ALPN h2), checks the
server's name and yields a ``Connection`` whose reader and keepalive tasks live in
the context's nursery. A connection is never re-dialled: when it breaks (EOF, a
GOAWAY, a keepalive PING unanswered for ``keepalive_timeout``) every call on it ends
with UNAVAILABLE and the caller reconnects with its own backoff (the xDS client), or
opens a connection per call (the CA client). Transport errors are translated here,
once, into ``GrpcError(UNAVAILABLE)``; a call's deadline ends it with
DEADLINE_EXCEEDED and resets its stream.
"""

from __future__ import annotations

import contextlib
import math
import socket
import ssl
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass

import trio

from ztunnel.grpc.engine import (
    CallEnded,
    ConnectionFailed,
    Event,
    GoAway,
    GrpcEngine,
    MessageReceived,
    PingAcked,
    ResponseHeaders,
)
from ztunnel.grpc.framing import DEFAULT_MAX_MESSAGE
from ztunnel.grpc.status import GrpcError, StatusCode
from ztunnel.grpc.tls import check_server_name

_TRANSPORT_ERRORS = (OSError, trio.BrokenResourceError, trio.ClosedResourceError, ssl.SSLError)
_READ_SIZE = 65536


@dataclass(frozen=True, slots=True)
class ChannelOptions:
    """ztunnel's control-plane channel settings (src/tls/control.rs)."""

    connect_timeout: float = 5.0
    keepalive_interval: float = 30.0  # HTTP/2 PING every ...
    keepalive_timeout: float = 10.0  # ... and give up when unanswered for this long
    max_message: int = DEFAULT_MAX_MESSAGE


@dataclass(frozen=True, slots=True)
class Target:
    """Where a channel dials: ``https://host:port`` (TLS), ``http://host:port`` or ``host:port``."""

    host: str
    port: int
    tls: bool = True

    @classmethod
    def parse(cls, text: str) -> Target:
        """Raises ValueError for anything but [scheme://]host:port."""
        tls = True
        rest = text.strip()
        for scheme, secure in (("https://", True), ("http://", False)):
            if rest.startswith(scheme):
                rest, tls = rest[len(scheme) :], secure
        rest = rest.rstrip("/")
        host, sep, port = rest.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"expected [https://]host:port, got {text!r}")
        return cls(host.strip("[]"), int(port), tls)

    @property
    def authority(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def __str__(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.authority}"


class _CallState:
    def __init__(self) -> None:
        self.send, self.receive = trio.open_memory_channel[Event](math.inf)
        self.headers: ResponseHeaders | None = None


class Connection:
    """One HTTP/2 connection to a gRPC server; make calls with ``unary`` and ``call``."""

    def __init__(self, stream: trio.abc.Stream, target: Target, options: ChannelOptions) -> None:
        self._stream = stream
        self.target = target
        self.options = options
        self._engine = GrpcEngine(client=True, max_message=options.max_message)
        self._calls: dict[int, _CallState] = {}
        self._send_lock = trio.Lock()
        self._ping_acked = trio.Event()
        self.error: GrpcError | None = None  # why the connection ended, once it has

    @property
    def alive(self) -> bool:
        return self.error is None

    async def unary(
        self,
        path: str,
        request: bytes,
        *,
        metadata: Iterable[tuple[str, str]] = (),
        time_limit: float | None = None,
    ) -> bytes:
        """One request, one response. Raises GrpcError with the call's status."""
        async with self.call(path, metadata=metadata, time_limit=time_limit) as call:
            await call.send(request)
            await call.done_writing()
            response = await call.receive()
            if response is None:
                raise GrpcError(StatusCode.INTERNAL, "server sent no response message")
            if await call.receive() is not None:
                raise GrpcError(StatusCode.INTERNAL, "server sent more than one response")
            return response

    @contextlib.asynccontextmanager
    async def call(
        self,
        path: str,
        *,
        metadata: Iterable[tuple[str, str]] = (),
        time_limit: float | None = None,
    ) -> AsyncIterator[Call]:
        """A call's stream; leaving the block before the status arrived cancels it.

        ``time_limit`` (seconds) is sent as grpc-timeout and enforced here too."""
        if self.error is not None:
            raise GrpcError(self.error.code, self.error.message)
        deadline = trio.current_time() + time_limit if time_limit is not None else math.inf
        scheme = "https" if self.target.tls else "http"
        stream_id = self._engine.start_call(
            path,
            authority=self.target.authority,
            scheme=scheme,
            metadata=metadata,
            timeout=time_limit,
        )
        state = self._calls[stream_id] = _CallState()
        call = Call(self, stream_id, state, deadline)
        try:
            await self._flush()
            yield call
        finally:
            self._calls.pop(stream_id, None)
            if not call.finished:
                self._engine.cancel(stream_id)
                with trio.CancelScope(shield=True):
                    await self._flush_quietly()

    # -- internals ----------------------------------------------------------------------

    async def _flush(self) -> None:
        async with self._send_lock:
            data = self._engine.data_to_send()
            if not data:
                return
            try:
                await self._stream.send_all(data)
            except _TRANSPORT_ERRORS as exc:
                self._fail(GrpcError(StatusCode.UNAVAILABLE, f"connection lost: {exc!r}"))
                raise GrpcError(StatusCode.UNAVAILABLE, f"connection lost: {exc!r}") from exc

    async def _flush_quietly(self) -> None:
        with contextlib.suppress(GrpcError):
            await self._flush()

    def _fail(self, error: GrpcError) -> None:
        if self.error is not None:
            return
        self.error = error
        self._engine.close()
        for stream_id, state in list(self._calls.items()):
            state.send.send_nowait(CallEnded(stream_id, error.code, error.message))

    async def _read_loop(self) -> None:
        while self.error is None:
            try:
                data = await self._stream.receive_some(_READ_SIZE)
            except _TRANSPORT_ERRORS as exc:
                self._fail(GrpcError(StatusCode.UNAVAILABLE, f"connection lost: {exc!r}"))
                return
            if not data:
                self._fail(GrpcError(StatusCode.UNAVAILABLE, "connection closed by server"))
                return
            for event in self._engine.receive_data(data):
                self._dispatch(event)
            await self._flush_quietly()

    def _dispatch(self, event: Event) -> None:
        if isinstance(event, PingAcked):
            self._ping_acked.set()
        elif isinstance(event, GoAway):
            # h2 stops all streams on a GOAWAY; the caller reconnects (as ztunnel does on
            # "received prior goaway").
            reason = f"server sent GOAWAY ({event.error_code})"
            self._fail(GrpcError(StatusCode.UNAVAILABLE, reason))
        elif isinstance(event, ConnectionFailed):
            self._fail(GrpcError(StatusCode.UNAVAILABLE, f"protocol error: {event.reason}"))
        elif isinstance(event, ResponseHeaders | MessageReceived | CallEnded):
            state = self._calls.get(event.stream_id)
            if state is not None:
                state.send.send_nowait(event)
            elif isinstance(event, MessageReceived):
                self._engine.acknowledge(event.stream_id, event.size)

    async def _keepalive_loop(self) -> None:
        opts = self.options
        while self.error is None:
            await trio.sleep(opts.keepalive_interval)
            self._ping_acked = trio.Event()
            self._engine.ping()
            await self._flush_quietly()
            with trio.move_on_after(opts.keepalive_timeout):
                await self._ping_acked.wait()
                continue
            self._fail(GrpcError(StatusCode.UNAVAILABLE, "keepalive PING not answered"))
            with contextlib.suppress(*_TRANSPORT_ERRORS):
                await self._stream.aclose()


class Call:
    """One call's stream: ``send``, ``done_writing``, then ``receive`` until None (status OK)."""

    def __init__(
        self, conn: Connection, stream_id: int, state: _CallState, deadline: float
    ) -> None:
        self._conn = conn
        self.stream_id = stream_id
        self._state = state
        self._deadline = deadline
        self.finished = False  # the final status arrived (or the deadline ended the call)
        self.status: CallEnded | None = None

    @property
    def response_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._state.headers.metadata if self._state.headers else ()

    async def send(self, message: bytes) -> None:
        """Queue a message. On a call the server already ended this is a no-op, as in
        gRPC: the call's status is what ``receive`` reports."""
        self._raise_if_finished()
        if not self._conn._engine.sending(self.stream_id):
            return
        self._conn._engine.send_message(self.stream_id, message)
        await self._conn._flush()

    async def done_writing(self) -> None:
        self._raise_if_finished()
        self._conn._engine.end_call(self.stream_id)
        await self._conn._flush()

    async def receive(self) -> bytes | None:
        """The next message; None when the call ended with OK. Raises GrpcError otherwise."""
        if self.finished:
            self._end(self.status)
            return None
        while True:
            with trio.move_on_at(self._deadline):
                event = await self._state.receive.receive()
                break
            self.finished = True
            self._conn._engine.cancel(self.stream_id)
            await self._conn._flush_quietly()
            raise GrpcError(StatusCode.DEADLINE_EXCEEDED, "deadline exceeded")
        if isinstance(event, ResponseHeaders):
            self._state.headers = event
            return await self.receive()
        if isinstance(event, MessageReceived):
            self._conn._engine.acknowledge(self.stream_id, event.size)
            await self._conn._flush_quietly()
            return event.message
        assert isinstance(event, CallEnded)
        self.finished, self.status = True, event
        self._end(event)
        return None

    def __aiter__(self) -> Call:
        return self

    async def __anext__(self) -> bytes:
        message = await self.receive()
        if message is None:
            raise StopAsyncIteration
        return message

    def _end(self, status: CallEnded | None) -> None:
        """Raise the call's error status; return on OK."""
        if status is None:
            raise GrpcError(StatusCode.DEADLINE_EXCEEDED, "deadline exceeded")
        if status.code is not StatusCode.OK:
            raise GrpcError(status.code, status.message)
        return None

    def _raise_if_finished(self) -> None:
        if self.finished:
            self._end(self.status)
            raise GrpcError(StatusCode.INTERNAL, "call already finished")


def _tcp_keepalive(sock: trio.socket.SocketType) -> None:
    # ztunnel's control-plane sockets: idle 300 s, interval 75 s, 9 probes.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 300)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 75)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 9)


async def _dial(
    target: Target,
    ssl_context: ssl.SSLContext | None,
    verify_names: Sequence[str],
    options: ChannelOptions,
) -> trio.abc.Stream:
    with trio.move_on_after(options.connect_timeout):
        try:
            tcp = await trio.open_tcp_stream(target.host, target.port)
        except OSError as exc:
            raise GrpcError(StatusCode.UNAVAILABLE, f"cannot connect to {target}: {exc}") from exc
        _tcp_keepalive(tcp.socket)
        if not target.tls:
            return tcp
        context = ssl_context or ssl.create_default_context()
        names = tuple(verify_names) or (target.host,)
        sni = next((n for n in names if not _is_ip(n)), None)
        tls = trio.SSLStream(tcp, context, server_hostname=sni)
        try:
            await tls.do_handshake()
            if tls.selected_alpn_protocol() != "h2":
                raise GrpcError(StatusCode.UNAVAILABLE, f"{target} did not negotiate h2 (ALPN)")
            check_server_name(tls.getpeercert(binary_form=True), names)
        except _TRANSPORT_ERRORS as exc:
            await trio.aclose_forcefully(tls)
            raise GrpcError(StatusCode.UNAVAILABLE, f"TLS with {target} failed: {exc}") from exc
        except GrpcError:
            await trio.aclose_forcefully(tls)
            raise
        return tls
    raise GrpcError(StatusCode.UNAVAILABLE, f"connecting to {target} timed out")


def _is_ip(name: str) -> bool:
    try:
        socket.inet_pton(socket.AF_INET6 if ":" in name else socket.AF_INET, name)
    except OSError:
        return False
    return True


@contextlib.asynccontextmanager
async def connect(
    target: Target,
    *,
    ssl_context: ssl.SSLContext | None = None,
    verify_names: Sequence[str] = (),
    options: ChannelOptions | None = None,
) -> AsyncIterator[Connection]:
    """Dial ``target`` and yield a connection; closed when the block ends.

    ``verify_names``: the names the server certificate may be valid for (default: the
    target's host); the first one that is not an IP is sent as SNI. Raises GrpcError
    (UNAVAILABLE) when the server cannot be reached or fails verification.
    """
    opts = options or ChannelOptions()
    stream = await _dial(target, ssl_context, verify_names, opts)
    conn = Connection(stream, target, opts)
    # The caller's error is re-raised outside the nursery, so it is not wrapped in an
    # ExceptionGroup (the background tasks never raise).
    error: Exception | None = None
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(conn._read_loop)
            nursery.start_soon(conn._keepalive_loop)
            try:
                await conn._flush()  # the connection preface and our SETTINGS
                yield conn
            except Exception as exc:
                error = exc
            finally:
                nursery.cancel_scope.cancel()
        if error is not None:
            raise error
    finally:
        conn._fail(GrpcError(StatusCode.UNAVAILABLE, "connection closed"))
        with trio.CancelScope(shield=True):
            with contextlib.suppress(*_TRANSPORT_ERRORS):
                data = conn._engine.data_to_send()
                if data:
                    with trio.move_on_after(1):
                        await stream.send_all(data)
            await trio.aclose_forcefully(stream)
