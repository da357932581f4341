"""SOCKS5 outbound (127.0.0.1:15080, off by default): mesh entry without redirection.

A domain name is looked up in the mesh state (service hostname -> its VIP,
then workload hostname), never in DNS: the agent only proxies what it knows.
The SOCKS reply is sent once the upstream is connected, so a client sees a
denied or failed connection as a SOCKS error instead of an instant EOF.
"""

from __future__ import annotations

import ipaddress
import socket
from typing import TYPE_CHECKING

import trio

from ztunnel.config import Address
from ztunnel.proxy.outbound import proxy_outbound
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

if TYPE_CHECKING:
    from ztunnel.proxy.workload_proxy import WorkloadProxy

HANDSHAKE_TIMEOUT = 10.0
MAX_HANDSHAKE = 600  # greeting (257) + request (262) is the most SOCKS5 can need


async def serve_socks5_connection(proxy: WorkloadProxy, conn: socket.socket, peer: Address) -> None:
    stream = socket_stream(conn)
    request: Socks5Request | None = None
    leftover = b""
    try:
        with trio.move_on_after(HANDSHAKE_TIMEOUT):
            request, leftover = await _handshake(stream)
        if request is None:  # refused, malformed, or too slow: already answered or closed
            return
        dst = _resolve(proxy, request)
        if dst is None:
            proxy.ctx.tracker.connection_failed(
                peer, (request.host, request.port), "outbound", "unknown SOCKS5 hostname"
            )
            await stream.send_all(encode_reply(Reply.HOST_UNREACHABLE))
            return

        async def ready(ok: bool, reason: str) -> None:
            if ok:
                reply = Reply.SUCCEEDED
            else:
                reply = Reply.NOT_ALLOWED if "401" in reason else Reply.GENERAL_FAILURE
            await stream.send_all(encode_reply(reply))

        await proxy_outbound(proxy, stream, peer, dst, ready=ready, early_data=leftover)
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        pass
    finally:
        await trio.aclose_forcefully(stream)


async def _handshake(stream: trio.SocketStream) -> tuple[Socks5Request | None, bytes]:
    buf = b""
    try:
        while (greeting := parse_greeting(buf)) is None:
            buf = await _more(stream, buf)
        no_auth, used = greeting
        await stream.send_all(encode_method_choice(no_auth))
        if not no_auth:
            return None, b""
        buf = buf[used:]
        while (parsed := parse_request(buf)) is None:
            buf = await _more(stream, buf)
    except Socks5Error as exc:
        await stream.send_all(encode_reply(exc.reply))
        return None, b""
    except EOFError:
        return None, b""
    request, used = parsed
    return request, buf[used:]


async def _more(stream: trio.SocketStream, buf: bytes) -> bytes:
    data = await stream.receive_some(MAX_HANDSHAKE)
    if not data or len(buf) + len(data) > MAX_HANDSHAKE:
        raise EOFError
    return buf + data


def _resolve(proxy: WorkloadProxy, request: Socks5Request) -> Address | None:
    if not request.is_domain:
        return request.host, request.port
    try:
        return str(ipaddress.ip_address(request.host)), request.port
    except ValueError:
        pass
    store = proxy.ctx.store
    service = store.service_by_hostname(request.host)
    if service is not None and service.vips:
        return str(service.vips[0].address), request.port
    for workload in store.workloads():
        if workload.hostname == request.host and workload.workload_ips:
            return str(workload.workload_ips[0]), request.port
    return None
