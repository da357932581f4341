"""Shared helpers for the HBONE tests: certificates from the identity layer's FakeCA,
TLS contexts, and connected TLSStream pairs over real sockets."""

from __future__ import annotations

import errno
import functools
import os
import socket
import ssl

import trio

from ztunnel.hbone.connection import Handler, HboneServerConnection, serve_hbone
from ztunnel.hbone.tlsstream import TLSStream, tls_handshake
from ztunnel.identity.ca import FakeCA
from ztunnel.identity.certificate import WorkloadCertificate
from ztunnel.identity.tls import client_context, server_context
from ztunnel.model.identity import Identity

CLIENT_ID = Identity("cluster.local", "default", "sleep")
SERVER_ID = Identity("cluster.local", "default", "echo")


@functools.cache
def ca() -> FakeCA:
    return FakeCA.ephemeral()


@functools.cache
def cert(identity: Identity) -> WorkloadCertificate:
    return ca().workload_certificate(identity)


def client_ctx(identity: Identity = CLIENT_ID) -> ssl.SSLContext:
    return client_context(cert(identity))


def server_ctx(identity: Identity = SERVER_ID) -> ssl.SSLContext:
    return server_context(cert(identity))


def tcp_socketpair() -> tuple[socket.socket, socket.socket]:
    """A connected TCP pair on 127.0.0.1 (client, server)."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        client = socket.create_connection(listener.getsockname())
        server, _ = listener.accept()
    return client, server


async def tls_pair(
    client_context: ssl.SSLContext | None = None,
    server_context: ssl.SSLContext | None = None,
) -> tuple[TLSStream, TLSStream]:
    """Handshake both ends of a loopback TCP pair concurrently: (client, server)."""
    a, b = tcp_socketpair()
    result: dict[str, TLSStream] = {}

    async def side(name: str, sock: socket.socket, ctx: ssl.SSLContext, server: bool) -> None:
        result[name] = await tls_handshake(sock, ctx, server_side=server)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(side, "c", a, client_context or client_ctx(), False)
        nursery.start_soon(side, "s", b, server_context or server_ctx(), True)
    return result["c"], result["s"]


async def connect_tcp(addr: tuple[str, int]) -> socket.socket:
    """Non-blocking TCP connect of a stdlib socket (tls_handshake consumes it)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    err = sock.connect_ex(addr)
    if err not in (0, errno.EINPROGRESS):
        sock.close()
        raise OSError(err, os.strerror(err))
    await trio.lowlevel.wait_writable(sock)
    err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    if err:
        sock.close()
        raise OSError(err, os.strerror(err))
    return sock


async def serve_loopback(
    handler: Handler,
    *,
    task_status: trio.TaskStatus[tuple[tuple[str, int], list[HboneServerConnection]]] = (
        trio.TASK_STATUS_IGNORED
    ),
) -> None:
    """An HBONE server on 127.0.0.1:<ephemeral>; started() gives (addr, connections)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(128)
    listener.setblocking(False)
    conns: list[HboneServerConnection] = []

    async def one(sock: socket.socket) -> None:
        tls = await tls_handshake(sock, server_ctx(), server_side=True)
        async with trio.open_nursery() as nursery:
            conns.append(await nursery.start(serve_hbone, tls, handler))

    with listener:
        async with trio.open_nursery() as nursery:
            task_status.started((listener.getsockname(), conns))
            while True:
                await trio.lowlevel.wait_readable(listener)
                sock, _ = listener.accept()
                nursery.start_soon(one, sock)
