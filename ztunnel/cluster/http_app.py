"""HTTP pod programs of the simulated cluster: ``python -m ztunnel.cluster.http_app <cmd> ...``.

- ``serve --name N --port P``: HTTP/1.1 (keep-alive) and HTTP/2 with prior knowledge (h2c)
  on one port, told apart by the connection preface; gRPC over HTTP/2. Every answer carries
  ``x-pod: N``. By path: ``/status/<code>`` answers that status; ``/flaky/<key>`` answers
  503 the first time this pod sees ``key``, then 200; ``/slow/<ms>`` waits, then 200;
  gRPC ``/test.Echo/Say`` echoes the message with ``grpc-status: 0``; anything else 200
  with JSON ``{"pod", "method", "path", "headers"}``.
- ``load --to ip:port --count N [--path P] [--method M] [--header k:v ...]``: N HTTP/1.1
  requests on one keep-alive connection (a new one only if the server closes it); prints
  JSON ``{"ok", "statuses": {code: n}, "pods": {pod: n}, "connections", "error"}``.
- ``grpc --to ip:port [--message TEXT]``: one unary gRPC call over h2c; prints JSON
  ``{"ok", "status", "grpc_status", "message", "pod", "error"}``.

Clients use blocking sockets and h11 / h2 directly (not the waypoint's HTTP code), so the
waypoint is checked against an independent implementation on both sides.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import socket
import struct
import sys
from collections import Counter
from collections.abc import Sequence
from typing import Any

import h2.config
import h2.connection
import h2.events
import h11
import trio

H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
CHUNK = 65536


class App:
    """One pod's server state (the flaky keys it has seen)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.seen: set[str] = set()

    def answer(
        self, method: str, path: str, headers: list[tuple[str, str]]
    ) -> tuple[int, bytes, float]:
        """(status, body, delay in s) for one plain HTTP request."""
        status, delay = 200, 0.0
        parts = path.split("?", 1)[0].split("/")
        if len(parts) >= 3 and parts[1] == "status" and parts[2].isdigit():
            status = int(parts[2])
        elif len(parts) >= 3 and parts[1] == "flaky" and parts[2] not in self.seen:
            self.seen.add(parts[2])
            status = 503
        elif len(parts) >= 3 and parts[1] == "slow" and parts[2].isdigit():
            delay = int(parts[2]) / 1000
        body = {"pod": self.name, "method": method, "path": path, "headers": dict(headers)}
        return status, json.dumps(body).encode(), delay

    async def serve(self, stream: trio.SocketStream) -> None:
        first = b""
        try:
            while len(first) < len(H2_PREFACE) and H2_PREFACE.startswith(first):
                chunk = await stream.receive_some(CHUNK)
                if not chunk:
                    return
                first += chunk
            if first.startswith(H2_PREFACE):
                await self._serve_h2(stream, first)
            else:
                await self._serve_h1(stream, first)
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError):
            pass
        finally:
            await trio.aclose_forcefully(stream)

    async def _serve_h1(self, stream: trio.SocketStream, first: bytes) -> None:
        conn = h11.Connection(h11.SERVER)
        conn.receive_data(first)
        while True:
            event = await _h11_next(conn, stream)
            if not isinstance(event, h11.Request):
                return
            while not isinstance(ev := await _h11_next(conn, stream), h11.EndOfMessage):
                if not isinstance(ev, h11.Data):
                    return
            headers = [(k.decode(), v.decode()) for k, v in event.headers]
            status, body, delay = self.answer(event.method.decode(), event.target.decode(), headers)
            await trio.sleep(delay)
            out = conn.send(
                h11.Response(
                    status_code=status,
                    headers=[
                        ("x-pod", self.name),
                        ("content-type", "application/json"),
                        ("content-length", str(len(body))),
                    ],
                )
            )
            out = (out or b"") + (conn.send(h11.Data(data=body)) or b"")
            out += conn.send(h11.EndOfMessage()) or b""
            await stream.send_all(out)
            if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                return
            conn.start_next_cycle()

    async def _serve_h2(self, stream: trio.SocketStream, first: bytes) -> None:
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
        conn.initiate_connection()
        lock = trio.Lock()

        async def flush() -> None:
            async with lock:
                data = conn.data_to_send()
                if data:
                    await stream.send_all(data)

        await flush()
        pending: dict[int, tuple[list[tuple[str, str]], bytearray]] = {}
        data = first
        async with trio.open_nursery() as nursery:
            while True:
                if not data:
                    data = await stream.receive_some(CHUNK)
                    if not data:
                        nursery.cancel_scope.cancel()
                        return
                for ev in conn.receive_data(data):
                    if isinstance(ev, h2.events.RequestReceived):
                        pending[ev.stream_id] = (_text_headers(ev.headers or []), bytearray())
                    elif isinstance(ev, h2.events.DataReceived) and ev.stream_id in pending:
                        pending[ev.stream_id][1].extend(ev.data or b"")
                        conn.acknowledge_received_data(ev.flow_controlled_length or 0, ev.stream_id)
                    elif isinstance(ev, h2.events.StreamEnded) and ev.stream_id in pending:
                        headers, body = pending.pop(ev.stream_id)
                        nursery.start_soon(
                            self._h2_answer, conn, flush, ev.stream_id, headers, body
                        )
                    elif isinstance(ev, h2.events.ConnectionTerminated):
                        nursery.cancel_scope.cancel()
                        return
                data = b""
                await flush()

    async def _h2_answer(
        self,
        conn: h2.connection.H2Connection,
        flush: Any,
        sid: int,
        headers: list[tuple[str, str]],
        body: bytearray,
    ) -> None:
        pseudo = dict(h for h in headers if h[0].startswith(":"))
        plain = [h for h in headers if not h[0].startswith(":")]
        path = pseudo.get(":path", "/")
        base = [("x-pod", self.name)]
        if dict(plain).get("content-type", "").startswith("application/grpc"):
            message = bytes(body[5:])
            reply = struct.pack(">BI", 0, len(message)) + message
            conn.send_headers(
                sid, [(":status", "200"), ("content-type", "application/grpc"), *base]
            )
            conn.send_data(sid, reply)
            conn.send_headers(sid, [("grpc-status", "0")], end_stream=True)
            await flush()
            return
        status, payload, delay = self.answer(pseudo.get(":method", "GET"), path, plain)
        await trio.sleep(delay)
        conn.send_headers(
            sid,
            [(":status", str(status)), ("content-type", "application/json"), *base],
        )
        conn.send_data(sid, payload, end_stream=True)
        await flush()


def _text_headers(raw: Any) -> list[tuple[str, str]]:
    return [
        (k.decode() if isinstance(k, bytes) else k, v.decode() if isinstance(v, bytes) else v)
        for k, v in raw
    ]


async def _h11_next(conn: h11.Connection, stream: trio.SocketStream) -> Any:
    while True:
        event = conn.next_event()
        if event is not h11.NEED_DATA:
            return event
        conn.receive_data(await stream.receive_some(CHUNK))


async def serve(name: str, port: int) -> None:
    app = App(name)
    async with trio.open_nursery() as nursery:
        await nursery.start(functools.partial(trio.serve_tcp, app.serve, port, host="0.0.0.0"))
        print(json.dumps({"listening": port, "app": "http", "name": name}), flush=True)


# -- clients (blocking: they run once and exit) ---------------------------------------------


def _split(to: str) -> tuple[str, int]:
    host, _, port = to.rpartition(":")
    return host.strip("[]"), int(port)


def _h1_exchange(
    sock: socket.socket, conn: h11.Connection, request: h11.Request
) -> tuple[int, dict[str, str]]:
    sock.sendall(conn.send(request) + (conn.send(h11.EndOfMessage()) or b""))
    status, headers = 0, {}
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            data = sock.recv(CHUNK)
            conn.receive_data(data)
            continue
        if isinstance(event, h11.Response):
            status = event.status_code
            headers = {k.decode(): v.decode() for k, v in event.headers}
        elif isinstance(event, h11.EndOfMessage):
            return status, headers
        elif isinstance(event, h11.ConnectionClosed):
            raise ConnectionError("server closed the connection mid-response")


def load(
    to: str,
    count: int,
    path: str = "/",
    method: str = "GET",
    headers: Sequence[tuple[str, str]] = (),
    timeout: float = 10.0,
) -> dict[str, Any]:
    """``count`` requests, keep-alive; a new connection only when the server closes one."""
    host, port = _split(to)
    statuses: Counter[int] = Counter()
    pods: Counter[str] = Counter()
    out: dict[str, Any] = {"ok": False, "connections": 0, "error": None}
    sock: socket.socket | None = None
    conn = h11.Connection(h11.CLIENT)
    try:
        for _ in range(count):
            if sock is None or conn.our_state is not h11.IDLE:
                if sock is not None:
                    sock.close()
                sock = socket.create_connection((host, port), timeout=timeout)
                conn = h11.Connection(h11.CLIENT)
                out["connections"] += 1
            request = h11.Request(method=method, target=path, headers=[("host", to), *headers])
            status, got = _h1_exchange(sock, conn, request)
            statuses[status] += 1
            pods[got.get("x-pod", "-")] += 1
            if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
                conn.start_next_cycle()
        out["ok"] = True
    except (OSError, h11.ProtocolError) as exc:
        out["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        if sock is not None:
            sock.close()
    out["statuses"] = {str(k): v for k, v in sorted(statuses.items())}
    out["pods"] = dict(sorted(pods.items()))
    return out


def grpc_call(to: str, message: str, timeout: float = 10.0) -> dict[str, Any]:
    """One unary call ``/test.Echo/Say`` over HTTP/2 with prior knowledge."""
    host, port = _split(to)
    out: dict[str, Any] = {"ok": False, "status": 0, "grpc_status": None, "message": None}
    out.update(pod=None, error=None)
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            conn.initiate_connection()
            sid = conn.get_next_available_stream_id()
            conn.send_headers(
                sid,
                [
                    (":method", "POST"),
                    (":scheme", "http"),
                    (":authority", to),
                    (":path", "/test.Echo/Say"),
                    ("content-type", "application/grpc"),
                    ("te", "trailers"),
                ],
            )
            payload = message.encode()
            conn.send_data(sid, struct.pack(">BI", 0, len(payload)) + payload, end_stream=True)
            sock.sendall(conn.data_to_send())
            body = bytearray()
            while True:
                data = sock.recv(CHUNK)
                if not data:
                    raise ConnectionError("connection closed before the call ended")
                ended = False
                for ev in conn.receive_data(data):
                    if isinstance(ev, h2.events.ResponseReceived):
                        hdrs = dict(_text_headers(ev.headers or []))
                        out["status"] = int(hdrs.get(":status", "0"))
                        out["pod"] = hdrs.get("x-pod")
                        out["grpc_status"] = hdrs.get("grpc-status", out["grpc_status"])
                    elif isinstance(ev, h2.events.DataReceived):
                        body.extend(ev.data or b"")
                        conn.acknowledge_received_data(ev.flow_controlled_length or 0, sid)
                    elif isinstance(ev, h2.events.TrailersReceived):
                        out["grpc_status"] = dict(_text_headers(ev.headers or [])).get(
                            "grpc-status"
                        )
                    elif isinstance(ev, h2.events.StreamEnded | h2.events.StreamReset):
                        ended = True
                sock.sendall(conn.data_to_send())
                if ended:
                    break
        out["message"] = bytes(body[5:]).decode(errors="replace") if body else None
        out["ok"] = out["grpc_status"] == "0" and out["message"] == message
    except (OSError, h2.exceptions.H2Error) as exc:
        out["error"] = f"{type(exc).__name__}: {exc}"
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ztunnel.cluster.http_app")
    sub = parser.add_subparsers(dest="cmd", required=True)
    sp = sub.add_parser("serve")
    sp.add_argument("--name", required=True)
    sp.add_argument("--port", type=int, required=True)
    sp = sub.add_parser("load")
    sp.add_argument("--to", required=True)
    sp.add_argument("--count", type=int, default=1)
    sp.add_argument("--path", default="/")
    sp.add_argument("--method", default="GET")
    sp.add_argument("--header", action="append", default=[], help="name:value")
    sp = sub.add_parser("grpc")
    sp.add_argument("--to", required=True)
    sp.add_argument("--message", default="hello")
    args = parser.parse_args(argv)
    if args.cmd == "serve":
        with contextlib.suppress(KeyboardInterrupt):
            trio.run(serve, args.name, args.port)
        return 0
    if args.cmd == "load":
        headers = [tuple(h.split(":", 1)) for h in args.header]
        result = load(
            args.to,
            args.count,
            args.path,
            args.method,
            [(k.strip(), v.strip()) for k, v in headers],
        )
    else:
        result = grpc_call(args.to, args.message)
    print(json.dumps(result), flush=True)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
