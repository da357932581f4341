"""Transcript tests of the inbound flows: HBONE stream handling, inbound plaintext, and
their common tail (authorize, dial the app, relay, live policy cuts), in memory.

The destination pod is ``SERVER`` (10.0.0.2); the peer is ``CLIENT`` (10.0.0.1) with its
verified identity. Each test reads back the HTTP status on the CONNECT stream, the dial
(from which source IP), the access log and the metrics with their response flags.
"""

from __future__ import annotations

import errno
import ipaddress

import pytest
import trio
import trio.testing
from proxy_fakes import (
    CLIENT,
    SERVER,
    Bench,
    FakeServerStream,
    bounded,
    connect_request,
    fail,
    hang,
    read_until_eof,
    sa,
)

from ztunnel.model.authorization import (
    Action,
    Authorization,
    Match,
    MatchKind,
    Scope,
    StringMatch,
)
from ztunnel.model.outcome import Failure, FailureKind
from ztunnel.policy.rbac import Reason
from ztunnel.proxy.authorize import authorize, denial
from ztunnel.proxy.inbound import InboundConnection
from ztunnel.proxy.inbound_plain import proxy_plaintext
from ztunnel.proxy.policy_watch import watch_policies

PEER = sa("10.0.0.1:40000")
LOCAL = sa("10.0.0.2:15008")


def deny_client(ports: tuple[int, ...] = ()) -> Authorization:
    return Authorization(
        name="deny-client",
        namespace="ns",
        scope=Scope.NAMESPACE,
        action=Action.DENY,
        rules=(
            (
                (
                    Match(
                        principals=(StringMatch(MatchKind.EXACT, "cluster.local/ns/ns/sa/client"),)
                    ),
                ),
                ((Match(destination_ports=ports),) if ports else ()),
            ),
        ),
    )


# STRICT PeerAuthentication as istiod translates it: deny any identity-less connection.
STRICT = Authorization(
    name="istio_converted_static_strict",
    namespace="ns",
    scope=Scope.NAMESPACE,
    action=Action.DENY,
    rules=((((Match(not_principals=(StringMatch(MatchKind.PRESENCE),)),)),),),
)


def hbone(bench: Bench) -> InboundConnection:
    return InboundConnection(bench.deps, SERVER, CLIENT.identity, PEER, LOCAL)


async def start_stream(
    bench: Bench, authority: str, nursery: trio.Nursery, *headers: tuple[str, str]
) -> FakeServerStream:
    stream = FakeServerStream()
    nursery.start_soon(hbone(bench).handle_stream, connect_request(authority, *headers), stream)
    await trio.testing.wait_all_tasks_blocked()
    return stream


async def stream_to_end(bench: Bench, authority: str) -> FakeServerStream:
    """A stream that never gets to relaying: the handler ends on its own."""
    stream = FakeServerStream()
    with trio.fail_after(60):  # virtual time: a hang fails at once
        await hbone(bench).handle_stream(connect_request(authority), stream)
    return stream


# --- HBONE: the whole transcript of an allowed stream ------------------------------------------


async def test_allowed_stream_is_dialled_from_the_client_ip_and_relayed(
    autojump_clock: object,
) -> None:
    bench = Bench(local=SERVER, transparent=True)
    async with bounded() as nursery:
        stream = await start_stream(
            bench, "10.0.0.2:8080", nursery, ("forwarded", 'for="10.0.0.1:40000";host=x')
        )
        # Authorized, then the app dialled from the client's IP, and only then 200.
        [dialed] = bench.net.dials
        assert (dialed.dst, dialed.src_ip, dialed.transparent) == (
            sa("10.0.0.2:8080"),
            ipaddress.ip_address("10.0.0.1"),
            True,
        )
        [(status, headers)] = stream.responses
        assert status == 200 and headers[0][0] == "baggage"
        assert "k8s.namespace.name=ns" in headers[0][1]
        [app] = bench.net.peers
        await stream.client.send_all(b"GET /")
        assert await app.receive_some(100) == b"GET /"
        await trio.sleep(0.25)
        await app.send_all(b"200 OK")
        assert await stream.client.receive_some(100) == b"200 OK"
        await stream.client.send_eof()
        assert await read_until_eof(app) == b""
        await app.send_eof()
        assert await read_until_eof(stream.client) == b""
    complete = bench.log.one("connection complete")
    assert complete.level == "info"
    assert complete.fields == {
        "src.addr": "10.0.0.1:40000",
        "src.workload": "client",
        "src.namespace": "ns",
        "src.identity": "spiffe://cluster.local/ns/ns/sa/client",
        "dst.addr": "10.0.0.2:8080",
        "dst.hbone_addr": "10.0.0.2:8080",
        "dst.service": None,
        "dst.workload": "server",
        "dst.namespace": "ns",
        "dst.identity": "spiffe://cluster.local/ns/ns/sa/server",
        "direction": "inbound",
        "bytes_sent": 6,
        "bytes_recv": 5,
        "duration": "250ms",
        "error": None,
    }
    [labels] = bench.labels("istio_tcp_connections_closed_total")
    assert (labels["reporter"], labels["response_flags"]) == ("destination", "-")
    assert labels["source_principal"] == "spiffe://cluster.local/ns/ns/sa/client"
    assert labels["connection_security_policy"] == "mutual_tls"


async def test_hostname_authority_maps_to_the_service_target_port(autojump_clock: object) -> None:
    bench = Bench(local=SERVER)
    async with bounded() as nursery:
        stream = await start_stream(bench, "echo.ns.svc.cluster.local:80", nursery)
        assert [d.dst for d in bench.net.dials] == [sa("10.0.0.2:8080")]
        assert bench.net.dials[0].src_ip is None  # not transparent: the kernel picks
        assert stream.responses[0][0] == 200
        nursery.cancel_scope.cancel()
    complete = bench.log.one("connection complete")
    assert complete.fields["dst.hbone_addr"] == "echo.ns.svc.cluster.local:80"
    assert complete.fields["dst.service"] == "echo.ns.svc.cluster.local"


# --- HBONE: refused before the app is dialled --------------------------------------------------


@pytest.mark.parametrize(
    ("authority", "status", "kind_error"),
    [
        ("10.0.0.9:8080", 400, "IPMismatch: authority 10.0.0.9 is not the destination 10.0.0.2"),
        ("10.0.0.2:15008", 503, "SelfCall: target port 15008 is one of the agent's own ports"),
        ("10.0.0.2:15001", 503, "SelfCall: target port 15001 is one of the agent's own ports"),
        ("nowhere.ns.svc.cluster.local:80", 503, "NoHostname: no service nowhere.ns.svc"),
    ],
)
async def test_unresolvable_streams_are_answered_and_never_dialled(
    autojump_clock: object, authority: str, status: int, kind_error: str
) -> None:
    bench = Bench(local=SERVER)
    stream = await stream_to_end(bench, authority)
    assert stream.responses == [(status, [])]
    assert bench.net.dials == []
    record = bench.log.one("connection failed")
    assert record.fields["error"].startswith(kind_error)
    assert bench.labels("istio_tcp_connections_opened_total") == []


async def test_policy_deny_answers_401_before_any_dial(autojump_clock: object) -> None:
    bench = Bench(local=SERVER, policies=(deny_client(),))
    stream = await stream_to_end(bench, "10.0.0.2:8080")
    assert stream.responses == [(401, [])]
    assert bench.net.dials == []
    complete = bench.log.one("connection complete")
    assert complete.level == "error"
    assert complete.fields["error"] == "connection denied: deny policy match by ns/deny-client"
    assert bench.metric("istio_tcp_connections_closed_total", response_flags="DENY") == 1
    assert bench.metric("istio_tcp_connections_failed_total", response_flags="DENY") == 1


@pytest.mark.parametrize(
    ("script", "error"),
    [
        (
            fail(ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused")),
            "connect to 10.0.0.2:8080 failed: connection refused",
        ),
        (hang(), "connect to 10.0.0.2:8080 failed: connect to 10.0.0.2:8080 timed out"),
    ],
)
async def test_app_dial_failure_answers_503_with_connect_flag(
    autojump_clock: object, script: object, error: str
) -> None:
    bench = Bench(local=SERVER)
    bench.net.script[sa("10.0.0.2:8080")] = script  # type: ignore[assignment]
    stream = await stream_to_end(bench, "10.0.0.2:8080")
    assert stream.responses == [(503, [])]
    assert bench.log.one("connection complete").fields["error"] == error
    assert bench.metric("istio_tcp_connections_failed_total", response_flags="CONNECT") == 1


# --- live policy: cuts of open connections -----------------------------------------------------


async def test_policy_change_cuts_an_open_stream(autojump_clock: object) -> None:
    bench = Bench(local=SERVER)
    unwatch = watch_policies(bench.store, bench.tracker)
    try:
        async with bounded() as nursery:
            stream = await start_stream(bench, "10.0.0.2:8080", nursery)
            [app] = bench.net.peers
            await stream.client.send_all(b"one")
            assert await app.receive_some(10) == b"one"
            bench.store.upsert_policy(deny_client())  # the watcher re-checks open connections
            await trio.testing.wait_all_tasks_blocked()
            # The relay is gone: the app's connection is closed by the agent.
            assert await read_until_eof(app) == b""
    finally:
        unwatch()
    complete = bench.log.one("connection complete")
    assert complete.fields["error"] == "connection closed by the agent: no longer allowed by policy"
    assert complete.fields["bytes_recv"] == 3  # inbound: received from the client
    assert bench.metric("istio_tcp_connections_closed_total", response_flags="DENY") == 1
    assert bench.tracker.open_connections() == []


async def test_policy_change_while_dialling_cuts_before_the_200(autojump_clock: object) -> None:
    bench = Bench(local=SERVER)
    bench.net.script[sa("10.0.0.2:8080")] = hang()
    unwatch = watch_policies(bench.store, bench.tracker)
    try:
        async with bounded() as nursery:
            stream = await start_stream(bench, "10.0.0.2:8080", nursery)
            assert len(bench.net.dials) == 1 and stream.responses == []
            await trio.sleep(1)
            bench.store.upsert_policy(deny_client())
    finally:
        unwatch()
    assert stream.responses == []  # never told 200; the HBONE server resets the stream
    complete = bench.log.one("connection complete")
    assert complete.fields["error"] == "connection closed by the agent: no longer allowed by policy"
    assert bench.metric("istio_tcp_connections_closed_total", response_flags="DENY") == 1


async def test_a_bug_closes_the_stream_as_failed_and_propagates(autojump_clock: object) -> None:
    bench = Bench(local=SERVER)
    bench.net.script[sa("10.0.0.2:8080")] = fail(AttributeError("no such thing"))
    with pytest.raises(AttributeError):  # to the HBONE server's handler, which logs it
        await stream_to_end(bench, "10.0.0.2:8080")
    complete = bench.log.one("connection complete")
    assert complete.fields["error"] == "internal error: AttributeError: no such thing"
    assert bench.tracker.open_connections() == []


# --- inbound plaintext (15006) -----------------------------------------------------------------


async def plaintext(bench: Bench, dst: str, nursery: trio.Nursery) -> trio.abc.HalfCloseableStream:
    client, mine = trio.testing.memory_stream_pair()
    nursery.start_soon(proxy_plaintext, bench.deps, mine, PEER, sa(dst))
    await trio.testing.wait_all_tasks_blocked()
    return client


async def test_plaintext_is_authorized_without_identity_and_relayed(
    autojump_clock: object,
) -> None:
    bench = Bench(local=SERVER, transparent=True)
    async with bounded() as nursery:
        client = await plaintext(bench, "10.0.0.2:8080", nursery)
        [dialed] = bench.net.dials
        assert (dialed.dst, dialed.src_ip) == (
            sa("10.0.0.2:8080"),
            ipaddress.ip_address("10.0.0.1"),
        )
        [app] = bench.net.peers
        await client.send_all(b"hi")
        assert await app.receive_some(10) == b"hi"
        await client.send_eof()
        await app.send_eof()
    complete = bench.log.one("connection complete")
    assert complete.fields["src.identity"] is None
    assert complete.fields["src.workload"] == "client"  # by IP, for telemetry only
    assert complete.fields["dst.hbone_addr"] is None
    [labels] = bench.labels("istio_tcp_connections_closed_total")
    assert (labels["connection_security_policy"], labels["source_principal"]) == (
        "unknown",
        "unknown",
    )


async def test_strict_mtls_denies_plaintext(autojump_clock: object) -> None:
    bench = Bench(local=SERVER, policies=(STRICT,))
    async with bounded() as nursery:
        await plaintext(bench, "10.0.0.2:8080", nursery)
    assert bench.net.dials == []
    complete = bench.log.one("connection complete")
    assert complete.fields["error"] == (
        "connection denied: deny policy match by ns/istio_converted_static_strict"
    )
    assert bench.metric("istio_tcp_connections_closed_total", response_flags="DENY") == 1


@pytest.mark.parametrize("port", [15001, 15006, 15008])
async def test_plaintext_to_a_proxy_port_is_a_self_call(autojump_clock: object, port: int) -> None:
    bench = Bench(local=SERVER)
    async with bounded() as nursery:
        await plaintext(bench, f"10.0.0.2:{port}", nursery)
    assert bench.net.dials == []
    record = bench.log.one("connection failed")
    assert record.fields["error"] == f"self call to port {port} refused"


async def test_plaintext_for_an_unknown_workload_is_refused(autojump_clock: object) -> None:
    bench = Bench(local=SERVER, known=False)
    async with bounded() as nursery:
        await plaintext(bench, "10.0.0.2:8080", nursery)
    assert bench.net.dials == []
    record = bench.log.one("connection failed")
    assert record.fields["error"].startswith("unknown source workload ns/server")


# --- authorize: the decision itself ------------------------------------------------------------


def test_authorize_sees_identity_source_and_target_port() -> None:
    bench = Bench(local=SERVER, policies=(deny_client(ports=(9090,)),))
    src = ipaddress.ip_address("10.0.0.1")
    allowed = authorize(bench.store, SERVER, src, sa("10.0.0.2:8080"), CLIENT.identity)
    denied = authorize(bench.store, SERVER, src, sa("10.0.0.2:9090"), CLIENT.identity)
    anonymous = authorize(bench.store, SERVER, src, sa("10.0.0.2:9090"), None)
    assert (allowed.allowed, denied.allowed, anonymous.allowed) == (True, False, True)
    assert denied.reason is Reason.EXPLICITLY_DENIED
    assert denial(denied) == Failure(
        FailureKind.DENIED, "connection denied: deny policy match by ns/deny-client"
    )
