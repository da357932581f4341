"""An independent, blocking HBONE client (stdlib ssl + h2) for probing an agent's 15008.

Deliberately not the agent's own client code, so server-side checks are tested
against a second implementation.
"""

from __future__ import annotations

import socket
import ssl

import h2.config
import h2.connection
import h2.events


class HandshakeRejected(Exception):
    """The server refused the TLS connection or closed it without answering."""


def request(
    addr: tuple[str, int],
    ctx: ssl.SSLContext,
    headers: list[tuple[str, str]],
    *,
    body: bytes = b"",
    timeout: float = 5.0,
) -> tuple[int, bytes]:
    """Send one request on a fresh TLS+h2 connection; returns (status, response body so far)."""
    try:
        raw = socket.create_connection(addr, timeout=timeout)
        tls = ctx.wrap_socket(raw, server_hostname=None)
    except (ssl.SSLError, OSError) as exc:
        raise HandshakeRejected(str(exc)) from exc
    try:
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        conn.initiate_connection()
        conn.send_headers(1, headers, end_stream=False)
        if body:
            conn.send_data(1, body)
        try:
            tls.sendall(conn.data_to_send())
        except (ssl.SSLError, OSError) as exc:
            # TLS 1.3: a refused client certificate shows up on first use.
            raise HandshakeRejected(str(exc)) from exc
        status: int | None = None
        received = b""
        while True:
            try:
                data = tls.recv(65536)
            except (ssl.SSLError, OSError) as exc:
                if status is not None:
                    return status, received
                raise HandshakeRejected(str(exc)) from exc
            if not data:
                if status is None:
                    raise HandshakeRejected("connection closed without a response")
                return status, received
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.ResponseReceived):
                    status = int(dict(event.headers)[b":status"])
                    if status != 200:
                        return status, received
                elif isinstance(event, h2.events.DataReceived):
                    received += event.data
                    conn.acknowledge_received_data(event.flow_controlled_length, 1)
                    return status or 0, received
                elif isinstance(event, (h2.events.StreamEnded, h2.events.StreamReset)):
                    return status or 0, received
            try:
                tls.sendall(conn.data_to_send())
            except (ssl.SSLError, OSError) as exc:
                raise HandshakeRejected(str(exc)) from exc
    finally:
        tls.close()


def connect_headers(authority: str, method: str = "CONNECT") -> list[tuple[str, str]]:
    if method == "CONNECT":
        return [(":method", "CONNECT"), (":authority", authority)]
    return [(":method", method), (":scheme", "https"), (":path", "/"), (":authority", authority)]
