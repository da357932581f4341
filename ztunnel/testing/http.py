"""The tests' tiny HTTP/1.1 client inside a network namespace: one request, Connection: close,
read to EOF. Enough for admin, readiness and metrics endpoints and the pods' apps."""

from __future__ import annotations

import socket
from collections.abc import Mapping

from ztunnel.redirect.netns import NetNamespace


def request(
    path: str, host: str, *, method: str = "GET", headers: Mapping[str, str] | None = None
) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}", "Connection: close"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    if method == "POST":
        lines.append("Content-Length: 0")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def read_response(sock: socket.socket) -> tuple[int, bytes]:
    """(status, body) of the response on ``sock``, read until the peer closes; status 0 when
    what came back is not HTTP."""
    chunks = []
    while data := sock.recv(65536):
        chunks.append(data)
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1]) if head.startswith(b"HTTP/") else 0
    return status, body


def get_in(
    netns: str, port: int, path: str, *, timeout: float = 2.0, host: str = "127.0.0.1"
) -> tuple[int, bytes]:
    """GET ``path`` from ``host:port`` inside the named netns: (status, body)."""
    with NetNamespace.named(netns) as ns, ns.socket() as sock:
        sock.settimeout(timeout)
        sock.connect((host, port))
        sock.sendall(request(path, host))
        return read_response(sock)
