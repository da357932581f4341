"""Admin, metrics and readiness servers over real loopback HTTP."""

from __future__ import annotations

import io
import json
from collections.abc import AsyncIterator, Iterator

import h11
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families
from test_telemetry_metrics import ECHO, outbound

from ztunnel.admin.server import serve_admin, serve_metrics, serve_readiness
from ztunnel.telemetry import logging as zlog
from ztunnel.telemetry.connections import ConnectionTracker
from ztunnel.telemetry.metrics import Metrics

LOOPBACK = ("127.0.0.1", 0)


async def request(
    port: int, method: str, path: str, *, stream: trio.SocketStream | None = None
) -> tuple[int, str, dict[str, str]]:
    """One HTTP/1.1 request (on ``stream`` if given, for keep-alive) -> status, body, headers."""
    own = stream is None
    s = stream or await trio.open_tcp_stream("127.0.0.1", port)
    try:
        client = h11.Connection(h11.CLIENT)
        req = h11.Request(method=method, target=path, headers=[("host", "localhost")])
        await s.send_all(client.send(req) + client.send(h11.EndOfMessage()))
        status, headers, body = 0, {}, b""
        while True:
            event = client.next_event()
            if event is h11.NEED_DATA:
                client.receive_data(await s.receive_some(65536))
            elif isinstance(event, h11.Response):
                status = event.status_code
                headers = {k.decode(): v.decode() for k, v in event.headers}
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                return status, body.decode(), headers
    finally:
        if own:
            await s.aclose()


@pytest.fixture
def log_stream() -> Iterator[io.StringIO]:
    out = io.StringIO()
    zlog.configure_logging("info", "plain", out)
    yield out
    zlog.unconfigure_logging()


class Admin:
    def __init__(self) -> None:
        self.quits = 0
        self.metrics = Metrics()
        self.tracker = ConnectionTracker(self.metrics)
        self.port = 0

    def dump(self) -> dict[str, object]:
        return {
            "workloads": [{"uid": ECHO.uid, "name": "echo-1"}],
            "workloadState": {ECHO.uid: {"state": "Up", "info": {"name": "echo-1"}}},
        }

    def quit(self) -> None:
        self.quits += 1


@pytest.fixture
async def admin(log_stream: io.StringIO) -> AsyncIterator[Admin]:
    state = Admin()
    async with trio.open_nursery() as nursery:
        state.port = await nursery.start(
            lambda task_status: serve_admin(
                LOOPBACK,
                dump_provider=state.dump,
                tracker=state.tracker,
                on_quit=state.quit,
                task_status=task_status,
            )
        )
        yield state
        nursery.cancel_scope.cancel()


async def test_index_and_unknown_path(admin: Admin) -> None:
    with trio.fail_after(5):
        status, body, headers = await request(admin.port, "GET", "/")
        assert status == 200 and headers["content-type"].startswith("text/html")
        for path in ("/config_dump", "/logging", "/quitquitquit", "/debug/tasks"):
            assert f'href="{path}"' in body
        assert (await request(admin.port, "GET", "/nope"))[0] == 404


async def test_quitquitquit_needs_post(admin: Admin) -> None:
    with trio.fail_after(5):
        status, body, _ = await request(admin.port, "GET", "/quitquitquit")
        assert (status, admin.quits) == (405, 0)
        assert "POST /quitquitquit" in body
        assert await request(admin.port, "POST", "/quitquitquit") == (
            200,
            "shutdown now\n",
            {"content-type": "text/plain; charset=utf-8", "content-length": "13"},
        )
        assert admin.quits == 1


async def test_logging_endpoint_changes_levels(admin: Admin, log_stream: io.StringIO) -> None:
    with trio.fail_after(5):
        status, body, _ = await request(admin.port, "GET", "/logging")
        assert status == 405 and "usage: POST /logging" in body and "loglevel" in body
        assert (await request(admin.port, "POST", "/logging"))[:2] == (
            200,
            "current log level is info\n",
        )
        status, body, _ = await request(admin.port, "POST", "/logging?level=access=debug,warn")
        assert (status, body) == (200, "current log level is access=debug,warn\n")
        admin.tracker.open(outbound())  # DEBUG "connection opened" now shows
        assert "connection opened" in log_stream.getvalue()
        status, body, _ = await request(admin.port, "POST", "/logging?level=ztunnel::proxy:debug")
        assert status == 400 and "usage" in body
        assert zlog.current_filter() == "access=debug,warn"
        status, body, _ = await request(admin.port, "POST", "/logging?reset")
        assert (status, body) == (200, "current log level is info\n")


async def test_config_dump_has_provider_version_and_connections(admin: Admin) -> None:
    conn = admin.tracker.open(
        outbound(direction="inbound", reporter="destination", proxy_uid=ECHO.uid)
    )
    conn.add_sent(12)
    with trio.fail_after(5):
        status, body, headers = await request(admin.port, "GET", "/config_dump")
    assert status == 200 and headers["content-type"] == "application/json"
    dump = json.loads(body)
    assert dump["workloads"] == [{"uid": ECHO.uid, "name": "echo-1"}]
    assert dump["version"]["version"]
    [entry] = dump["connections"]
    assert (entry["direction"], entry["bytesSent"], entry["actualDst"]) == (
        "inbound",
        12,
        "10.244.1.7:15008",
    )
    pod = dump["workloadState"][ECHO.uid]
    assert pod["state"] == "Up"
    assert pod["connections"]["inbound"] == [
        {
            "src": "10.244.0.24:46238",
            "originalDst": "10.244.1.7:8080",
            "actualDst": "10.244.1.7:15008",
            "protocol": "HBONE",
        }
    ]
    conn.close()
    with trio.fail_after(5):
        dump = json.loads((await request(admin.port, "GET", "/config_dump"))[1])
    assert dump["connections"] == []


async def test_debug_endpoints(admin: Admin) -> None:
    with trio.fail_after(5):
        status, body, _ = await request(admin.port, "GET", "/debug/tasks")
        assert status == 200 and "serve_listeners" in body
        status, body, _ = await request(admin.port, "GET", "/debug/memory")
    report = json.loads(body)
    assert status == 200 and report["rssBytes"] > 0 and report["openFds"] > 0
    types = {t["type"]: t["count"] for t in report["topTypes"]}
    assert types["builtins.function"] > 1000  # the most numerous live objects, by type
    if report["malloc"] is not None:  # glibc 2.33+
        assert report["malloc"]["inUseBytes"] > 0


async def test_keep_alive_and_bad_requests(admin: Admin) -> None:
    with trio.fail_after(5):
        stream = await trio.open_tcp_stream("127.0.0.1", admin.port)
        async with stream:
            assert (await request(admin.port, "GET", "/", stream=stream))[0] == 200
            assert (await request(admin.port, "GET", "/nope", stream=stream))[0] == 404
        async with await trio.open_tcp_stream("127.0.0.1", admin.port) as bad:
            await bad.send_all(b"NOT AN HTTP REQUEST\r\n\r\n")
            reply = await _read_all(bad)
        assert reply.startswith(b"HTTP/1.1 400 ")
        async with await trio.open_tcp_stream("127.0.0.1", admin.port) as big:
            await big.send_all(b"GET / HTTP/1.1\r\nhost: x\r\nx-big: " + b"a" * 70000 + b"\r\n\r\n")
            reply = await _read_all(big)
        assert reply.startswith(b"HTTP/1.1 431 ")


async def _read_all(stream: trio.SocketStream) -> bytes:
    data = b""
    while chunk := await stream.receive_some(65536):
        data += chunk
    return data


async def test_handler_failure_is_500(log_stream: io.StringIO) -> None:
    def broken() -> dict[str, object]:
        raise RuntimeError("state not ready")

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            port = await nursery.start(
                lambda task_status: serve_admin(
                    LOOPBACK, dump_provider=broken, task_status=task_status
                )
            )
            status, body, _ = await request(port, "GET", "/config_dump")
            assert (status, body) == (500, "internal error: state not ready\n")
            assert (await request(port, "GET", "/"))[0] == 200  # server still serving
            nursery.cancel_scope.cancel()
    assert "admin handler failed" in log_stream.getvalue()


async def test_metrics_server_exposes_registry() -> None:
    metrics = Metrics()
    ConnectionTracker(metrics).open(outbound()).add_received(490)
    sock = trio.socket.socket()
    await sock.bind(LOOPBACK)  # a pre-bound socket works as well as an address
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            port = await nursery.start(serve_metrics, sock, metrics)
            for path in ("/metrics", "/stats/prometheus"):
                status, body, headers = await request(port, "GET", path)
                assert status == 200 and headers["content-type"].startswith("text/plain")
                received = [
                    s.value
                    for f in text_string_to_metric_families(body)
                    for s in f.samples
                    if s.name == "istio_tcp_received_bytes_total"
                ]
                assert received == [490]
            assert (await request(port, "GET", "/other"))[0] == 404
            assert (await request(port, "POST", "/metrics"))[0] == 405
            nursery.cancel_scope.cancel()


async def test_readiness_flips_when_pending_empties() -> None:
    pending = ["workload proxy manager", "state manager"]
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            port = await nursery.start(serve_readiness, LOOPBACK, lambda: list(pending))
            assert (await request(port, "GET", "/healthz/ready"))[:2] == (
                503,
                "not ready, pending: state manager, workload proxy manager\n",
            )
            pending.clear()
            assert (await request(port, "GET", "/healthz/ready"))[:2] == (200, "ready\n")
            assert (await request(port, "POST", "/healthz/ready"))[0] == 405
            assert (await request(port, "GET", "/healthz"))[0] == 404
            nursery.cancel_scope.cancel()
