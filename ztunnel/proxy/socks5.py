"""SOCKS5 outbound (127.0.0.1:15080, off by default): mesh entry without redirection.

A domain name is looked up in the mesh state (service hostname -> its VIP,
then workload hostname), never in DNS: the agent only proxies what it knows.
The SOCKS reply is sent once the upstream is connected, so a client sees a
denied or failed connection as a SOCKS error instead of an instant EOF; the
reply code follows the failure's kind (``REPLIES``): a self call or a policy
denial is "not allowed", an unknown name or no usable destination "host
unreachable", a refused dial "connection refused", anything else "general
failure".
"""

from __future__ import annotations

import contextlib
import os
import socket

import trio

from ztunnel.model.address import Authority, SocketAddr
from ztunnel.model.outcome import Failure, FailureKind
from ztunnel.proxy.deps import FlowDeps
from ztunnel.proxy.outbound import proxy_outbound
from ztunnel.proxy.relay import abort, close_now
from ztunnel.proxy.sockets import socket_stream
from ztunnel.proxy.socks5_proto import (
    Reply,
    Socks5Error,
    Socks5Request,
    encode_method_choice,
    encode_reply,
    parse_greeting,
    parse_request,
)
from ztunnel.state.store import StateStore

MAX_HANDSHAKE = 600  # greeting (257) + request (262) is the most SOCKS5 can need

# The SOCKS5 reply for each way a connection can fail before it is relayed.
REPLIES: dict[FailureKind, Reply] = {
    FailureKind.SELF_CALL: Reply.NOT_ALLOWED,
    FailureKind.DENIED: Reply.NOT_ALLOWED,
    FailureKind.UPSTREAM_DENIED: Reply.NOT_ALLOWED,  # the destination's policy (HBONE 401)
    FailureKind.UNKNOWN_HOST: Reply.HOST_UNREACHABLE,
    FailureKind.NO_ROUTE: Reply.HOST_UNREACHABLE,
    FailureKind.UNREACHABLE: Reply.HOST_UNREACHABLE,
    FailureKind.CONNECT_TIMEOUT: Reply.HOST_UNREACHABLE,
    FailureKind.CONNECT_REFUSED: Reply.CONNECTION_REFUSED,
}

# Errors of writing to a SOCKS client that went away.
_CLIENT_GONE = (trio.BrokenResourceError, trio.ClosedResourceError)


def reply_for(failure: Failure | None) -> Reply:
    if failure is None:
        return Reply.SUCCEEDED
    return REPLIES.get(failure.kind, Reply.GENERAL_FAILURE)


async def serve_socks5_connection(deps: FlowDeps, conn: socket.socket, peer: SocketAddr) -> None:
    stream = socket_stream(conn)
    try:
        await proxy_socks5(deps, stream, peer)
    except BaseException:  # cut midway (drain deadline, a bug): RST, never a clean-looking FIN
        abort(stream)
        raise
    finally:
        await close_now(stream)


async def proxy_socks5(
    deps: FlowDeps, stream: trio.abc.HalfCloseableStream, peer: SocketAddr
) -> None:
    """Negotiate, then carry the requested connection; never raises for network trouble."""
    request: Socks5Request | None = None
    leftover = b""
    try:
        with trio.move_on_after(deps.settings.socks5_handshake_timeout):
            request, leftover = await _handshake(stream)
    except _CLIENT_GONE:
        return
    if request is None:  # refused, malformed, or too slow: already answered or closed
        return

    async def answer(failure: Failure | None) -> None:
        with contextlib.suppress(*_CLIENT_GONE):
            await _send(stream, encode_reply(reply_for(failure)))

    dst = resolve_target(deps.store, request.target)
    if dst is None:
        failure = Failure(FailureKind.UNKNOWN_HOST, "unknown SOCKS5 hostname")
        deps.tracker.connection_failed(peer, request.target, "outbound", failure)
        await answer(failure)
        return
    await proxy_outbound(deps, stream, peer, dst, ready=answer, early_data=leftover)


def resolve_target(store: StateStore, target: Authority) -> SocketAddr | None:
    """An address as is; a name through the mesh state (service VIP, then workload IP)."""
    if isinstance(target, SocketAddr):
        return target
    service = store.service_by_hostname(target.host)
    if service is not None and service.vips:
        return SocketAddr(service.vips[0].address, target.port)
    for workload in store.workloads():
        if workload.hostname == target.host and workload.workload_ips:
            return SocketAddr(workload.workload_ips[0], target.port)
    return None


async def _handshake(stream: trio.abc.Stream) -> tuple[Socks5Request | None, bytes]:
    buf = b""
    try:
        while (greeting := parse_greeting(buf)) is None:
            buf = await _more(stream, buf)
        no_auth, used = greeting
        await _send(stream, encode_method_choice(no_auth))
        if not no_auth:
            return None, b""
        buf = buf[used:]
        while (parsed := parse_request(buf)) is None:
            buf = await _more(stream, buf)
    except Socks5Error as exc:
        await _send(stream, encode_reply(exc.reply))
        return None, b""
    except EOFError:
        return None, b""
    request, used = parsed
    return request, buf[used:]


async def _more(stream: trio.abc.Stream, buf: bytes) -> bytes:
    now = _read_now(stream)
    data = now if now is not None else await stream.receive_some(MAX_HANDSHAKE)
    if not data or len(buf) + len(data) > MAX_HANDSHAKE:
        raise EOFError
    return buf + data


# The handshake's few small reads and writes go straight to a TCP socket when it is ready
# (the usual case), without the task switch trio's socket calls make per operation; the
# handshake ends within a few of them, so it cannot starve other tasks.


def _read_now(stream: trio.abc.Stream) -> bytes | None:
    """What a TCP client already sent (None: nothing yet, or not a TCP socket)."""
    if type(stream) is not trio.SocketStream:
        return None
    fd = stream.socket.fileno()  # -1 once closed: never read a reused descriptor
    if fd < 0:
        raise trio.ClosedResourceError("SOCKS5 client socket is closed")
    try:
        return os.read(fd, MAX_HANDSHAKE)
    except BlockingIOError:
        return None
    except OSError as exc:
        raise trio.BrokenResourceError(f"SOCKS5 client read failed: {exc}") from exc


async def _send(stream: trio.abc.Stream, data: bytes) -> None:
    """``send_all``, one non-blocking write first (a SOCKS5 answer is 2 or 10 bytes)."""
    if type(stream) is trio.SocketStream and (fd := stream.socket.fileno()) >= 0:
        try:
            data = data[os.write(fd, data) :]
        except BlockingIOError:
            pass
        except OSError as exc:
            raise trio.BrokenResourceError(f"SOCKS5 client write failed: {exc}") from exc
        if not data:
            return
    await stream.send_all(data)
