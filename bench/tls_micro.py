"""TLS plumbing micro-benchmark: trio.SSLStream vs ``ztunnel.hbone.tlsstream``.

Run: ``.venv/bin/python bench/tls_micro.py [--mib 1024] [--repeat 3] [--no-h2]``.

One loopback TCP connection, TLS 1.3 mutual auth with the agent's own contexts
(``ztunnel.identity.tls``, P-256 workload certificates from ``FakeCA``), sender and
receiver in two processes (forked, so each has its own core and GIL). The sender writes
256 KiB chunks, half-closes; the receiver counts until EOF and answers with the count,
and the sender's clock runs from the first byte to that answer. Four transports:

* ``plain``: trio SocketStream, no TLS (the ceiling of the harness);
* ``sslstream``: ``trio.SSLStream`` (MemoryBIO, two copies and a lock per call);
* ``tlsstream``: non-blocking ``ssl.SSLSocket`` driven by trio (what HBONE uses);
* with h2 (unless ``--no-h2``): one HBONE CONNECT stream (``HboneClientConnection`` /
  ``serve_hbone``, ztunnel's window and frame sizes) over each of the two TLS transports.

Prints the median MB/s of ``--repeat`` runs per transport, and the ratios.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import ssl
import statistics
import sys
import time
import traceback
from collections.abc import Awaitable, Callable
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ztunnel.hbone import (
    ConnectRequest,
    HboneClientConnection,
    HboneServerStream,
    HboneSettings,
    serve_hbone,
    tls_handshake,
)
from ztunnel.identity.ca import FakeCA
from ztunnel.identity.tls import client_context, server_context
from ztunnel.model.identity import Identity

CHUNK = 256 * 1024
NO_PING = HboneSettings(ping_interval=None)  # ztunnel's sizes, no keepalive timer
RECEIVE = 64 * 1024
TRANSPORTS = ("plain", "sslstream", "tlsstream")
StreamMaker = Callable[[socket.socket, bool], Awaitable[trio.abc.Stream]]


async def _plain(sock: socket.socket, _server: bool) -> trio.abc.Stream:
    return trio.SocketStream(trio.socket.from_stdlib_socket(sock))


def _sslstream(ctx: ssl.SSLContext) -> StreamMaker:
    async def make(sock: socket.socket, server: bool) -> trio.abc.Stream:
        raw = trio.SocketStream(trio.socket.from_stdlib_socket(sock))
        # https_compatible: a TCP EOF without close_notify reads as EOF (our half-close)
        stream = trio.SSLStream(
            raw, ctx, server_side=server, server_hostname=None, https_compatible=True
        )
        await stream.do_handshake()
        return stream

    return make


def _tlsstream(ctx: ssl.SSLContext) -> StreamMaker:
    async def make(sock: socket.socket, server: bool) -> trio.abc.Stream:
        return await tls_handshake(sock, ctx, server_side=server)

    return make


# -- raw byte stream over the transport --------------------------------------------------


async def sink(stream: trio.abc.Stream) -> None:
    # A length prefix instead of half-close: Python's TLS has none, and trio.SSLStream
    # treats a TCP-level EOF without close_notify as a broken stream.
    header = b""
    while len(header) < 8:
        header += await stream.receive_some(8 - len(header))
    left = int.from_bytes(header, "big")
    total = 0
    while total < left:
        data = await stream.receive_some(min(RECEIVE, left - total))
        if not data:
            break
        total += len(data)
    await stream.send_all(str(total).encode().ljust(20))
    await stream.aclose()


async def push(stream: trio.abc.Stream, nbytes: int) -> float:
    chunk = b"\x5a" * CHUNK
    start = time.perf_counter()
    await stream.send_all(nbytes.to_bytes(8, "big"))
    left = nbytes
    while left > 0:
        await stream.send_all(chunk if left >= CHUNK else chunk[:left])
        left -= CHUNK
    reply = b""
    while len(reply) < 20:
        part = await stream.receive_some(20 - len(reply))
        if not part:
            break
        reply += part
    elapsed = time.perf_counter() - start
    if int(reply) != nbytes:
        raise RuntimeError(f"receiver counted {reply!r}, sent {nbytes}")
    await stream.aclose()
    return nbytes / elapsed / 1e6


# -- HBONE (h2 CONNECT) over the transport ------------------------------------------------


async def hbone_sink(tls: trio.abc.Stream) -> None:
    async def handler(_request: ConnectRequest, stream: HboneServerStream) -> None:
        await stream.respond(200)
        total = 0
        while data := await stream.receive_some():
            total += len(data)
        await stream.send_all(str(total).encode())
        await stream.send_eof()

    await serve_hbone(tls, handler, settings=NO_PING)


async def hbone_push(tls: trio.abc.Stream, nbytes: int) -> float:
    async with trio.open_nursery() as nursery:
        conn = HboneClientConnection(tls, settings=NO_PING)
        await nursery.start(conn.run)
        stream = await conn.open_stream("127.0.0.1:8080")
        chunk = b"\x5a" * CHUNK
        start = time.perf_counter()
        left = nbytes
        while left > 0:
            await stream.send_all(chunk if left >= CHUNK else chunk[:left])
            left -= CHUNK
        await stream.send_eof()
        reply = b""
        while part := await stream.receive_some():
            reply += part
        elapsed = time.perf_counter() - start
        if int(reply) != nbytes:
            raise RuntimeError(f"receiver counted {reply!r}, sent {nbytes}")
        nursery.cancel_scope.cancel()
    return nbytes / elapsed / 1e6


# -- one measured run: fork a sender, receive here ----------------------------------------


def one_run(make: StreamMaker, h2: bool, nbytes: int) -> float:
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the sender; reports MB/s through the pipe
        code = 1
        try:
            listener.close()
            os.close(rfd)
            result = trio.run(_send_side, make, h2, port, nbytes)
            os.write(wfd, f"{result}".encode())
            code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    os.close(wfd)
    try:
        conn, _ = listener.accept()
        listener.close()
        trio.run(_receive_side, make, h2, conn)
        with os.fdopen(rfd, "rb") as f:
            out = f.read()
    except BaseException:
        os.kill(pid, signal.SIGKILL)
        raise
    finally:
        _, status = os.waitpid(pid, 0)
    if status != 0 or not out:
        raise RuntimeError(f"sender failed (status {status})")
    return float(out)


async def _send_side(make: StreamMaker, h2: bool, port: int, nbytes: int) -> float:
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    stream = await make(sock, False)
    return await (hbone_push(stream, nbytes) if h2 else push(stream, nbytes))


async def _receive_side(make: StreamMaker, h2: bool, conn: socket.socket) -> None:
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    stream = await make(conn, True)
    await (hbone_sink(stream) if h2 else sink(stream))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mib", type=int, default=1024, help="bytes per run (MiB)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per transport (median)")
    parser.add_argument("--no-h2", action="store_true", help="skip HBONE over each transport")
    args = parser.parse_args(argv)

    ca = FakeCA.ephemeral()
    cert = ca.workload_certificate(Identity("cluster.local", "default", "bench"))
    server_ctx, client_ctx = server_context(cert), client_context(cert)

    def maker(name: str, server_side: bool) -> StreamMaker:
        if name == "plain":
            return _plain
        ctx = server_ctx if server_side else client_ctx
        return _sslstream(ctx) if name == "sslstream" else _tlsstream(ctx)

    def both(name: str) -> StreamMaker:
        async def make(sock: socket.socket, server: bool) -> trio.abc.Stream:
            return await maker(name, server)(sock, server)

        return make

    cases = [(name, False) for name in TRANSPORTS]
    if not args.no_h2:
        cases += [("sslstream", True), ("tlsstream", True)]
    nbytes = args.mib * 1024 * 1024
    results: dict[str, float] = {}
    print(f"{args.mib} MiB per run, median of {args.repeat}; TLS 1.3 mTLS, P-256, loopback")
    for name, h2 in cases:
        label = f"{name} + HBONE h2" if h2 else name
        runs = [one_run(both(name), h2, nbytes) for _ in range(args.repeat)]
        results[label] = statistics.median(runs)
        spread = ", ".join(f"{r:.0f}" for r in runs)
        gbit = results[label] * 8 / 1000
        print(f"{label:24} {results[label]:8.1f} MB/s  {gbit:5.2f} Gbit/s   (runs: {spread})")
    print()
    print(f"tlsstream / sslstream: x{results['tlsstream'] / results['sslstream']:.2f}")
    if not args.no_h2:
        ratio = results["tlsstream + HBONE h2"] / results["sslstream + HBONE h2"]
        print(f"with HBONE h2 on top:  x{ratio:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
