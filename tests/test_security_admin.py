"""Every state-changing admin endpoint is loopback-only, whatever address the admin binds.

The admin binds ``127.0.0.1`` by default (so nothing else can even connect: see
tests/test_security_reach.py for pods and the pod network). An operator may bind it wider
(``ZTUNNEL_ADMIN_ADDR``); then reading stays possible from elsewhere, but any request other
than GET/HEAD from a non-loopback peer is refused with 403 before any route runs: the agent
cannot be drained (``/quitquitquit``) or its logging changed (``/logging``) from the network.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from ztunnel.admin.http import Request, Response, serve_http
from ztunnel.admin.server import ENDPOINTS, AdminHandler, MetricsHandler, ReadinessHandler
from ztunnel.telemetry import logging as zlog
from ztunnel.testing.netns_agent import http, scratch_netns, start_dedicated, wait_until

ROUTES = sorted({path.split("?")[0] for path, _ in ENDPOINTS} | {"/logging", "/quitquitquit"})
NOT_LOOPBACK = ["10.244.1.2", "::ffff:10.0.0.1", "2001:db8::1", "0.0.0.0"]
LOOPBACK = ["127.0.0.1", "127.3.4.5", "::1", "::ffff:127.0.0.1", ""]  # "": not an IP socket


class Quit:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self) -> None:
        self.calls += 1


@pytest.fixture(autouse=True)
def _restore_logging() -> object:
    before = zlog.current_filter()
    yield None
    zlog.set_filter(before)


@pytest.mark.parametrize("peer", NOT_LOOPBACK)
@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH"])
def test_no_route_changes_state_for_a_non_loopback_peer(peer: str, method: str) -> None:
    quit_ = Quit()
    handler = AdminHandler(on_quit=quit_)
    before = zlog.current_filter()
    for path in ROUTES:
        query = {"level": ["trace"]} if path == "/logging" else {}
        response = handler(Request(method, path, path, query=query, peer=peer))
        assert response.status == 403, (path, response)
    assert quit_.calls == 0
    assert zlog.current_filter() == before


@pytest.mark.parametrize("peer", LOOPBACK)
def test_loopback_peers_can_drain_and_change_logging(peer: str) -> None:
    quit_ = Quit()
    handler = AdminHandler(on_quit=quit_)
    level = Request("POST", "/logging", "/logging", query={"level": ["debug"]}, peer=peer)
    assert handler(level).status == 200
    assert zlog.current_filter().startswith("debug")
    assert handler(Request("POST", "/quitquitquit", "/quitquitquit", peer=peer)).status == 200
    assert quit_.calls == 1


def test_a_non_loopback_peer_may_still_read() -> None:
    handler = AdminHandler()
    response = handler(Request("GET", "/config_dump", "/config_dump", peer="10.244.1.2"))
    assert response.status == 200


class Exposition:
    def exposition(self) -> bytes:
        return b"# metrics\n"


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH"])
def test_metrics_and_readiness_which_pods_may_reach_only_answer_reads(method: str) -> None:
    """15020 and 15021 bind 0.0.0.0 by design (scrapes, kubelet probes): one path each,
    read-only; anything else is 405 or 404 from any peer."""
    metrics, readiness = MetricsHandler(Exposition()), ReadinessHandler(list)
    for path in ("/metrics", "/stats/prometheus"):
        assert metrics(Request("GET", path, path, peer="10.244.1.2")).status == 200
        assert metrics(Request(method, path, path, peer="10.244.1.2")).status == 405
    ready = "/healthz/ready"
    assert readiness(Request("GET", ready, ready, peer="10.244.1.2")).status == 200
    assert readiness(Request(method, ready, ready, peer="10.244.1.2")).status == 405
    for path in ("/", "/quitquitquit", "/logging"):
        assert metrics(Request(method, path, path)).status == 404
        assert readiness(Request(method, path, path)).status == 404


async def test_the_server_hands_the_real_peer_to_the_handler() -> None:
    seen: list[str] = []

    def handler(request: Request) -> Response:
        seen.append(request.peer)
        return AdminHandler()(request)

    async with trio.open_nursery() as nursery:
        port = await nursery.start(serve_http, ("127.0.0.1", 0), handler)
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        await stream.send_all(b"GET /config_dump HTTP/1.1\r\nHost: localhost\r\n\r\n")
        assert (await stream.receive_some(12)).startswith(b"HTTP/1.1 200")
        await stream.aclose()
        nursery.cancel_scope.cancel()
    assert seen == ["127.0.0.1"]


@pytest.mark.root
def test_an_admin_bound_wide_refuses_to_drain_from_the_network(tmp_path: Path) -> None:
    """A real agent with its admin on 0.0.0.0: from the netns' own non-loopback address a
    POST /quitquitquit is refused and the agent keeps running; from 127.0.0.1 it exits."""
    with scratch_netns("ztad") as scratch:
        outside = scratch.addresses[0]
        agent = start_dedicated(
            scratch, tmp_path / "agent.log", {"ZTUNNEL_ADMIN_ADDR": "0.0.0.0:15000"}
        )
        try:
            agent.wait_logged("agent ready")
            assert http(scratch.ns, outside, 15000, "/config_dump")[0] == 200
            for path in ("/quitquitquit", "/logging?level=trace"):
                status, body = http(scratch.ns, outside, 15000, path, method="POST")
                assert (status, body) == (
                    403,
                    "state-changing requests are accepted from loopback only\n",
                )
            assert agent.alive
            assert http(scratch.ns, "127.0.0.1", 15000, "/quitquitquit", method="POST")[0] == 200
            wait_until(lambda: not agent.alive, "the agent to exit", timeout=30)
        finally:
            agent.stop()
