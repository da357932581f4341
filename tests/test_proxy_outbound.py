"""Transcript tests of the outbound flow (15001 and SOCKS5 share it), in memory.

Each test drives ``proxy_outbound`` with an in-memory app connection, a fake
network and a fake HBONE pool (tests/proxy_fakes.py), on trio's autojump clock,
and reads back what operators see: the pool key and CONNECT headers, the bytes,
the access log lines and the metrics with their response flags.
"""

from __future__ import annotations

import dataclasses
import errno
import io
import re
from ipaddress import ip_address

import pytest
import trio
import trio.testing
from proxy_fakes import (
    CLIENT,
    SERVER,
    Bench,
    bounded,
    fail,
    hang,
    read_until_eof,
    sa,
)

from ztunnel.hbone.errors import HboneStatusError, TLSHandshakeError
from ztunnel.hbone.pool import PoolKey
from ztunnel.identity.errors import TLSIdentityError
from ztunnel.model.address import SocketAddr
from ztunnel.model.ports import AgentPorts
from ztunnel.proxy.outbound import proxy_outbound
from ztunnel.proxy.workload_proxy import run_handler
from ztunnel.telemetry import logging as zlog

APP = sa("10.0.0.1:40000")  # the client app's socket, as accepted


async def start(
    bench: Bench, dst: SocketAddr, nursery: trio.Nursery
) -> trio.abc.HalfCloseableStream:
    """Open an app connection to ``dst`` through the outbound flow; returns the app's end."""
    app, downstream = trio.testing.memory_stream_pair()
    nursery.start_soon(proxy_outbound, bench.deps, downstream, APP, dst)
    await trio.testing.wait_all_tasks_blocked()
    return app


async def run_to_end(bench: Bench, dst: SocketAddr) -> None:
    """A connection whose upstream never connects: the flow ends on its own."""
    _app, downstream = trio.testing.memory_stream_pair()
    with trio.fail_after(60):  # virtual time: a hang fails at once
        await proxy_outbound(bench.deps, downstream, APP, dst)


# --- the whole transcript of a good connection ----------------------------------------------


async def test_service_vip_goes_over_hbone_to_an_endpoint(autojump_clock: object) -> None:
    bench = Bench()
    async with bounded() as nursery:
        app = await start(bench, sa("10.96.0.1:80"), nursery)

        # Resolution and the pool: VIP -> endpoint 10.0.0.2, HBONE port, target port 8080.
        [opened] = bench.pool.opened
        assert opened.key == PoolKey(
            src_identity=CLIENT.identity,
            dst_identities=frozenset({SERVER.identity}),
            dst=sa("10.0.0.2:15008"),
            src_ip=ip_address("10.0.0.1"),
        )
        assert opened.authority == "10.0.0.2:8080"
        headers = dict(opened.headers)
        assert headers["forwarded"] == 'for="10.0.0.1:40000";host=echo.ns.svc.cluster.local'
        assert "k8s.namespace.name=ns" in headers["baggage"]
        assert re.fullmatch(r"00-[0-9a-f]{32}-[0-9a-f]{16}-00", headers["traceparent"])
        assert bench.net.dials == []

        # Tracked as open, before any byte moved.
        assert bench.log.events() == [("debug", "connection opened")]
        assert bench.metric("istio_tcp_sockets_open", reporter="source") == 1

        # Bytes both ways, then half-close each way.
        [remote] = bench.pool.peers
        await app.send_all(b"ping")
        assert await remote.receive_some(100) == b"ping"
        await trio.sleep(1.5)
        await remote.send_all(b"pong!")
        assert await app.receive_some(100) == b"pong!"
        await app.send_eof()
        assert await read_until_eof(remote) == b""
        await remote.send_eof()
        assert await read_until_eof(app) == b""

    complete = bench.log.one("connection complete")
    assert complete.level == "info"
    assert complete.fields == {
        "src.addr": "10.0.0.1:40000",
        "src.workload": "client",
        "src.namespace": "ns",
        "src.identity": "spiffe://cluster.local/ns/ns/sa/client",
        "dst.addr": "10.0.0.2:15008",
        "dst.hbone_addr": "10.0.0.2:8080",
        "dst.service": "echo.ns.svc.cluster.local",
        "dst.workload": "server",
        "dst.namespace": "ns",
        "dst.identity": "spiffe://cluster.local/ns/ns/sa/server",
        "direction": "outbound",
        "bytes_sent": 4,
        "bytes_recv": 5,
        "duration": "1500ms",
        "error": None,
    }
    [labels] = bench.labels("istio_tcp_connections_closed_total")
    assert (labels["reporter"], labels["response_flags"]) == ("source", "-")
    assert labels["connection_security_policy"] == "mutual_tls"
    assert labels["destination_service"] == "echo.ns.svc.cluster.local"
    assert labels["destination_workload"] == "server"
    assert bench.metric("istio_tcp_sent_bytes_total") == 4
    assert bench.metric("istio_tcp_received_bytes_total") == 5
    assert bench.metric("istio_tcp_connections_failed_total") == 0
    assert bench.metric("istio_tcp_sockets_open", reporter="source") == 0


@pytest.mark.parametrize(
    ("dst", "expected_dial", "security"),
    [
        pytest.param("10.9.9.9:443", "10.9.9.9:443", "unknown", id="passthrough"),
        pytest.param("10.0.0.3:5432", "10.0.0.3:5432", "unknown", id="known-tcp-workload"),
    ],
)
async def test_non_mesh_destinations_are_dialled_as_plain_tcp(
    autojump_clock: object, dst: str, expected_dial: str, security: str
) -> None:
    bench = Bench()
    async with bounded() as nursery:
        app = await start(bench, sa(dst), nursery)
        assert [d.dst for d in bench.net.dials] == [sa(expected_dial)]
        assert bench.pool.opened == []
        [upstream] = bench.net.peers
        await app.send_all(b"x")
        assert await upstream.receive_some(10) == b"x"
        await app.send_eof()
        await upstream.send_eof()
    complete = bench.log.one("connection complete")
    assert (complete.fields["dst.addr"], complete.fields["dst.hbone_addr"]) == (expected_dial, None)
    [labels] = bench.labels("istio_tcp_connections_closed_total")
    assert labels["connection_security_policy"] == security


# --- self calls: refused before anything is dialled ------------------------------------------


@pytest.mark.parametrize("port", [15001, 15006, 15008, 15000, 15020, 15021])
@pytest.mark.parametrize("host", ["127.0.0.1", "::ffff:127.0.0.1", "::1", "127.0.0.53", "0.0.0.0"])
async def test_self_calls_are_refused_before_any_dial(
    autojump_clock: object, host: str, port: int
) -> None:
    bench = Bench()
    await run_to_end(bench, SocketAddr.of(host, port))
    # Without the outbound check these would be passthrough dials (or HBONE to a mesh
    # workload on loopback, whose agent would refuse): nothing may leave at all.
    assert bench.net.dials == [] and bench.pool.opened == []
    [record] = bench.log.records
    assert (record.level, record.event) == ("warning", "connection failed")
    canonical = SocketAddr.of(host, port)
    assert record.fields["error"] == f"self call to {canonical} refused"
    assert record.fields["dst.addr"] == str(canonical)
    assert bench.labels("istio_tcp_connections_opened_total") == []


async def test_a_mesh_workload_on_loopback_is_not_tunnelled_into_the_agent(
    autojump_clock: object,
) -> None:
    looped = dataclasses.replace(SERVER, workload_ips=(ip_address("127.0.0.2"),))
    bench = Bench(workloads=(CLIENT, looped))
    await run_to_end(bench, sa("127.0.0.2:15001"))
    # 127.0.0.2 is an HBONE workload: without the outbound check the pool would open a
    # CONNECT to its agent (which would refuse the target port with 503).
    assert bench.pool.opened == [] and bench.net.dials == []
    record = bench.log.one("connection failed")
    assert record.fields["error"] == "self call to 127.0.0.2:15001 refused"


async def test_configured_ports_are_self_calls_too(autojump_clock: object) -> None:
    bench = Bench(ports=AgentPorts.of({16001, 16006, 16008}, {19000}))
    await run_to_end(bench, sa("127.0.0.1:19000"))
    await run_to_end(bench, sa("127.0.0.1:16008"))
    assert bench.net.dials == []
    bench.net.script[sa("127.0.0.1:8080")] = fail(ConnectionRefusedError(errno.ECONNREFUSED, ""))
    await run_to_end(bench, sa("127.0.0.1:8080"))  # an app on loopback: not ours
    assert [d.dst for d in bench.net.dials] == [sa("127.0.0.1:8080")]


# --- failures before a connection is tracked ---------------------------------------------------


async def test_unknown_source_workload_is_refused_after_waiting(autojump_clock: object) -> None:
    bench = Bench(known=False)
    started = trio.current_time()
    await run_to_end(bench, sa("10.0.0.2:8080"))
    assert trio.current_time() - started == pytest.approx(5.0)  # ztunnel's wait for xDS
    assert bench.net.dials == [] and bench.pool.opened == []
    record = bench.log.one("connection failed")
    assert record.fields["error"] == "unknown source workload ns/client (sa client) after 5s"


async def test_source_workload_appearing_while_waiting_is_used(autojump_clock: object) -> None:
    bench = Bench(known=False)
    async with bounded() as nursery:
        app = await start(bench, sa("10.0.0.2:8080"), nursery)
        await trio.sleep(2)
        bench.store.upsert_workload(CLIENT)
        await trio.testing.wait_all_tasks_blocked()
        assert len(bench.pool.opened) == 1
        await app.send_eof()
        await bench.pool.peers[0].send_eof()


async def test_service_without_endpoints_has_no_healthy_upstream(autojump_clock: object) -> None:
    bench = Bench()
    await run_to_end(bench, sa("10.96.0.9:80"))
    assert bench.net.dials == [] and bench.pool.opened == []
    record = bench.log.one("connection failed")
    assert record.fields["error"].startswith("NoHealthyUpstream: service empty.ns.svc")
    assert bench.labels("istio_tcp_connections_opened_total") == []


# --- failures of the upstream: tracked, flag CONNECT ------------------------------------------


@pytest.mark.parametrize(
    ("exc", "error"),
    [
        (HboneStatusError(401), "http status: 401"),
        (HboneStatusError(503), "http status: 503"),
        (trio.TooSlowError(), "connect to upstream failed: TooSlowError"),
        (
            TLSHandshakeError("TLS handshake failed: certificate verify failed"),
            "connect to upstream failed: TLS handshake failed: certificate verify failed",
        ),
        (
            TLSIdentityError("server certificate identity is not one of: x"),
            "connect to upstream failed: server certificate identity is not one of: x",
        ),
        (
            ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused"),
            "connect to upstream failed: connection refused",
        ),
    ],
)
async def test_hbone_upstream_failures_are_connect_failures(
    autojump_clock: object, exc: BaseException, error: str
) -> None:
    bench = Bench()
    bench.pool.behaviour = fail(exc)
    await run_to_end(bench, sa("10.0.0.2:8080"))
    complete = bench.log.one("connection complete")
    assert (complete.level, complete.fields["error"]) == ("error", error)
    assert complete.fields["dst.hbone_addr"] == "10.0.0.2:8080"
    assert bench.metric("istio_tcp_connections_closed_total", response_flags="CONNECT") == 1
    assert bench.metric("istio_tcp_connections_failed_total", response_flags="CONNECT") == 1
    assert bench.metric("istio_tcp_sockets_open") == 0


async def test_dial_timeout_is_a_connect_failure_after_the_deadline(autojump_clock: object) -> None:
    bench = Bench()
    bench.net.script[sa("10.9.9.9:443")] = hang()
    started = trio.current_time()
    await run_to_end(bench, sa("10.9.9.9:443"))
    assert trio.current_time() - started == pytest.approx(10.0)
    complete = bench.log.one("connection complete")
    assert (
        complete.fields["error"] == "connect to upstream failed: connect to 10.9.9.9:443 timed out"
    )
    assert complete.fields["duration"] == "10000ms"
    assert bench.metric("istio_tcp_connections_failed_total", response_flags="CONNECT") == 1


async def test_broken_upstream_mid_relay_is_logged_without_a_flag(autojump_clock: object) -> None:
    bench = Bench()
    async with bounded() as nursery:
        app = await start(bench, sa("10.9.9.9:443"), nursery)
        [upstream] = bench.net.peers
        await app.send_all(b"hello")
        assert await upstream.receive_some(10) == b"hello"
        await upstream.aclose()  # the peer vanishes: our next send breaks
        await app.send_all(b"more")
    complete = bench.log.one("connection complete")
    assert complete.level == "error" and complete.fields["error"]
    assert complete.fields["bytes_sent"] == 5
    assert bench.metric("istio_tcp_connections_closed_total", response_flags="-") == 1


async def test_drain_cancelling_a_connection_still_closes_it(autojump_clock: object) -> None:
    bench = Bench()
    async with bounded() as nursery:
        await start(bench, sa("10.0.0.2:8080"), nursery)
        assert bench.metric("istio_tcp_sockets_open") == 1
        nursery.cancel_scope.cancel()
    complete = bench.log.one("connection complete")
    assert complete.fields["error"] == "connection closed by the agent before completion"
    assert bench.metric("istio_tcp_sockets_open") == 0
    assert bench.tracker.open_connections() == []


# --- bugs are not network trouble ------------------------------------------------------------


async def test_a_bug_reaches_the_handler_log_with_its_traceback(autojump_clock: object) -> None:
    bench = Bench()
    bench.pool.behaviour = fail(KeyError("pool bookkeeping"))
    out = io.StringIO()
    zlog.configure_logging("info", "plain", out)
    try:
        _app, downstream = trio.testing.memory_stream_pair()

        async def handler(conn: object, peer: SocketAddr) -> None:
            await proxy_outbound(bench.deps, downstream, peer, sa("10.0.0.2:8080"))

        await run_handler("outbound", handler, None, APP)  # type: ignore[arg-type]
    finally:
        zlog.unconfigure_logging()
    text = out.getvalue()
    assert "connection handler failed" in text and 'listener="outbound"' in text
    assert "Traceback (most recent call last)" in text and "KeyError: 'pool bookkeeping'" in text
    # The connection is still accounted for, as failed.
    complete = bench.log.one("connection complete")
    assert complete.fields["error"] == "internal error: KeyError: 'pool bookkeeping'"
    assert bench.tracker.open_connections() == []
    assert bench.metric("istio_tcp_sockets_open") == 0
