"""The admin UI over real loopback HTTP: the /api/graph contract, the bounded history, the
table pages, escaping of hostile names and values, and the browser-facing hardening.

The world is the demo's shape written as ztunnel local config (so the dump and
``/explain`` are the agent's real ones), plus a workload whose names are hostile;
traffic is reported to a real ConnectionTracker as the proxies report it.
"""

from __future__ import annotations

import io
import json
import re
import sys
from collections.abc import AsyncIterator, Iterator, Mapping
from html.parser import HTMLParser
from ipaddress import ip_address
from typing import Any

import pytest
import trio
from test_admin_server import request

from ztunnel.admin import ctl
from ztunnel.admin.server import serve_admin
from ztunnel.admin.ui import CSP, is_loopback_host
from ztunnel.model.address import HostPort, SocketAddr
from ztunnel.model.outcome import Failure, FailureKind
from ztunnel.model.workload import Workload
from ztunnel.policy.query import explain_connection
from ztunnel.sources.dump import policy_to_dump, service_to_dump, workload_to_dump
from ztunnel.sources.localconfig import load_local_config
from ztunnel.state.store import StateStore
from ztunnel.telemetry import logging as zlog
from ztunnel.telemetry.connections import ConnectionInfo, ConnectionTracker
from ztunnel.telemetry.history import MAX_FIELD_CHARS, ConnectionHistory
from ztunnel.telemetry.metrics import Metrics

HOSTILE = "<script>alert('x')</script>\"&"
BAGGAGE = 'k8s.pod.name=a\r\nX-Injected: 1,<img src=x onerror="alert(1)">'

WORLD = f"""
workloads:
- {{uid: c//Pod/demo/client, name: client, namespace: demo, serviceAccount: client,
   workloadIps: [10.244.1.2], protocol: HBONE, node: node1}}
- {{uid: c//Pod/demo/echo-1, name: echo-1, namespace: demo, serviceAccount: echo,
   workloadIps: [10.244.1.3], protocol: HBONE, node: node1,
   authorizationPolicies: [demo/echo-allow-client],
   services: {{"demo/echo.demo.svc.cluster.local": {{80: 8080}}}}}}
- {{uid: c//Pod/demo/echo-2, name: echo-2, namespace: demo, serviceAccount: echo,
   workloadIps: [10.244.2.2], protocol: HBONE, node: node2,
   authorizationPolicies: [demo/echo-allow-client],
   services: {{"demo/echo.demo.svc.cluster.local": {{80: 8080}}}}}}
- {{uid: c//Pod/demo/other, name: other, namespace: demo, serviceAccount: other,
   workloadIps: [10.244.2.3], protocol: HBONE, node: node2}}
- {{uid: c//Pod/legacy/legacy-client, name: legacy-client, namespace: legacy,
   workloadIps: [10.244.2.4], protocol: TCP, node: node2}}
- {{uid: c//Pod/evil/x, name: {json.dumps(HOSTILE)}, namespace: evil,
   serviceAccount: {json.dumps(HOSTILE)}, workloadIps: [10.244.1.9], protocol: HBONE, node: node1}}
services:
- {{name: echo, namespace: demo, hostname: echo.demo.svc.cluster.local, vips: [/10.96.0.10],
   ports: {{80: 8080}}}}
policies:
- name: echo-allow-client
  namespace: demo
  scope: WorkloadSelector
  action: Allow
  rules:
  - - - principals: [!Exact cluster.local/ns/demo/sa/client]
"""


def deny(message: str) -> Failure:
    """This agent's policy refused the connection (flag DENY)."""
    return Failure(FailureKind.DENIED, message)


class World:
    """The admin's providers, built the way the agent builds them."""

    def __init__(self, capacity: int = 1000) -> None:
        cfg = load_local_config(WORLD, "world.yaml")
        self.store = StateStore()
        self.store.replace_all(cfg.workloads, cfg.services, cfg.policies)
        self.history = ConnectionHistory(capacity)
        self.tracker = ConnectionTracker(Metrics(), history=self.history)
        self.port = 0

    def w(self, name: str) -> Workload:
        found = [w for w in self.store.workloads() if w.name == name]
        assert found, name
        return found[0]

    def dump(self) -> dict[str, object]:
        return {
            "workloads": [workload_to_dump(w) for w in self.store.workloads()],
            "services": [service_to_dump(s) for s in self.store.services()],
            "policies": [policy_to_dump(p) for p in self.store.policies()],
            "certificates": [
                {
                    "identity": "spiffe://cluster.local/ns/demo/sa/client",
                    "state": "Available",
                    "certChain": [
                        {
                            "serialNumber": "4242",
                            "validFrom": "2026-01-01T00:00:00+00:00",
                            "expirationTime": "2026-01-02T00:00:00+00:00",
                        }
                    ],
                }
            ],
            "config": {"nodeName": "node1"},
            "workloadState": {
                self.w("client").uid: {"state": "Up"},
                self.w("echo-1").uid: {"state": "Up"},
            },
        }

    def explain(self, source: str, destination: str) -> Mapping[str, object]:
        return explain_connection(self.store, source, destination)

    def connection(
        self, src: str, dst: str, direction: str = "inbound", *, mtls: bool = True, **kw: Any
    ) -> ConnectionInfo:
        s, d = self.w(src), self.w(dst)
        port = 15008 if mtls else 8080
        fields: dict[str, Any] = dict(
            direction=direction,
            reporter="destination" if direction == "inbound" else "source",
            src_addr=SocketAddr.of(s.workload_ips[0], 40000),
            dst_addr=SocketAddr.of(d.workload_ips[0], 8080 if direction == "inbound" else port),
            hbone_addr=SocketAddr.of(d.workload_ips[0], 8080) if mtls else None,
            src_workload=s,
            dst_workload=d,
            dst_service=self.store.service_by_hostname("echo.demo.svc.cluster.local"),
            src_identity=s.identity if mtls else None,
            dst_identity=d.identity,
            security_policy="mutual_tls" if mtls else "unknown",
            proxy_uid=(d if direction == "inbound" else s).uid,
        )
        fields.update(kw)
        return ConnectionInfo(**fields)

    def demo_traffic(self) -> None:
        """What node1's agent sees in the demo: allowed, denied (mTLS and plaintext), open."""
        t = self.tracker
        for direction in ("outbound", "inbound"):  # same node: both sides report it
            c = t.open(self.connection("client", "echo-1", direction))
            c.add_sent(2000)
            c.add_received(2000)
            c.close()
        out = t.open(self.connection("client", "echo-2", "outbound"))
        out.add_sent(2000)
        out.close()
        t.open(self.connection("other", "echo-1")).close(
            deny("connection denied: no allow policies matched")
        )
        t.open(self.connection("legacy-client", "echo-1", mtls=False)).close(
            deny("connection denied: no allow policies matched")
        )
        self.open_conn = t.open(self.connection("client", "echo-1"))  # still open


@pytest.fixture
def log_stream() -> Iterator[io.StringIO]:
    out = io.StringIO()
    zlog.configure_logging("info", "json", out)
    yield out
    zlog.unconfigure_logging()


@pytest.fixture
async def world(log_stream: io.StringIO) -> AsyncIterator[World]:
    w = World()
    async with trio.open_nursery() as nursery:
        w.port = await nursery.start(
            lambda task_status: serve_admin(
                ("127.0.0.1", 0),
                dump_provider=w.dump,
                tracker=w.tracker,
                explainer=w.explain,
                task_status=task_status,
            )
        )
        yield w
        nursery.cancel_scope.cancel()


async def get(world: World, path: str) -> tuple[int, str, dict[str, str]]:
    with trio.fail_after(5):
        return await request(world.port, "GET", path)


async def graph_of(world: World) -> dict[str, Any]:
    status, body, headers = await get(world, "/api/graph")
    assert status == 200 and headers["content-type"].startswith("application/json")
    data: dict[str, Any] = json.loads(body)
    return data


def edge(graph: Mapping[str, Any], src: str, dst: str, outcome: str) -> dict[str, Any]:
    found = [
        e
        for e in graph["edges"]
        if (e["source"], e["target"], e["outcome"])
        == (f"wl:c//Pod/{src}", f"wl:c//Pod/{dst}", outcome)
    ]
    assert len(found) == 1, (src, dst, outcome, graph["edges"])
    return found[0]


# -- the /api/graph contract -------------------------------------------------------------


async def test_graph_contract_fields_and_types(world: World) -> None:
    world.demo_traffic()
    g = await graph_of(world)
    assert g["version"] == 1 and g["node"] == "node1"
    assert isinstance(g["generatedAt"], float)
    assert g["outcomes"] == ["mtls", "plaintext", "denied", "failed"]
    assert g["history"] == {"capacity": 1000, "size": 5, "recorded": 5, "evicted": 0}
    node_keys = {"id", "kind", "name", "addresses", "local"}
    for n in g["nodes"]:
        assert node_keys <= n.keys() and n["kind"] in ("workload", "service", "address")
        assert isinstance(n["addresses"], list) and isinstance(n["local"], bool)
    edge_types = {
        "id": str, "source": str, "target": str, "outcome": str, "open": int,
        "connections": int, "bytesSent": int, "bytesRecv": int, "reporters": dict,
        "services": list, "ports": list, "lastSeen": float,
    }  # fmt: skip
    ids = {n["id"] for n in g["nodes"]}
    for e in g["edges"]:
        for key, typ in edge_types.items():
            assert isinstance(e[key], typ), (key, e)
        assert e["source"] in ids and e["target"] in ids and e["outcome"] in g["outcomes"]
    client = next(n for n in g["nodes"] if n["id"] == "wl:c//Pod/demo/client")
    assert client["identity"] == "spiffe://cluster.local/ns/demo/sa/client"
    assert client["local"] is True and client["node"] == "node1"
    assert client["certificate"] == {
        "state": "Available",
        "serial": "4242",
        "validFrom": "2026-01-01T00:00:00+00:00",
        "expires": "2026-01-02T00:00:00+00:00",
    }
    other = next(n for n in g["nodes"] if n["id"] == "wl:c//Pod/demo/other")
    assert other["certificate"] is None and other["local"] is False
    svc = next(n for n in g["nodes"] if n["kind"] == "service")
    assert svc["endpoints"] == ["wl:c//Pod/demo/echo-1", "wl:c//Pod/demo/echo-2"]
    assert svc["addresses"] == ["10.96.0.10"]


async def test_graph_edges_by_outcome_with_counts_bytes_identities_and_policy_query(
    world: World,
) -> None:
    world.demo_traffic()
    g = await graph_of(world)
    allowed = edge(g, "demo/client", "demo/echo-1", "mtls")
    # Reported by both sides of one agent: counted once (the larger view), plus one open.
    assert allowed["reporters"] == {"destination": 2, "source": 1}
    assert (allowed["connections"], allowed["open"]) == (2, 1)
    assert (allowed["bytesSent"], allowed["bytesRecv"]) == (2000, 2000)
    assert allowed["srcIdentity"] == "spiffe://cluster.local/ns/demo/sa/client"
    assert allowed["dstIdentity"] == "spiffe://cluster.local/ns/demo/sa/echo"
    assert allowed["services"] == ["echo.demo.svc.cluster.local"]
    assert allowed["explain"] == {"from": "demo/client", "to": "10.244.1.3:8080"}
    assert edge(g, "demo/client", "demo/echo-2", "mtls")["connections"] == 1
    denied = edge(g, "demo/other", "demo/echo-1", "denied")
    assert denied["open"] == 0 and denied["connections"] == 1
    assert denied["srcIdentity"] == "spiffe://cluster.local/ns/demo/sa/other"
    assert "no allow policies matched" in denied["lastError"]
    plain = edge(g, "legacy/legacy-client", "demo/echo-1", "denied")
    assert plain["srcIdentity"] is None
    # The deciding policy, one request away: the edge's explain query through /explain.
    q = denied["explain"]
    status, body, _ = await get(world, f"/explain?from={q['from']}&to={q['to']}")
    [result] = json.loads(body)["results"]
    assert status == 200 and "demo/echo-allow-client" in result["explanation"]
    assert result["explanation"].startswith("DENY")


async def test_outbound_denial_seen_only_as_401_is_a_denied_edge(world: World) -> None:
    """Cross-node: the client's agent learns of the remote policy only as HBONE 401."""
    world.tracker.open(world.connection("other", "echo-2", "outbound")).close(
        Failure(FailureKind.UPSTREAM_DENIED, "http status: 401")
    )
    g = await graph_of(world)
    assert edge(g, "demo/other", "demo/echo-2", "denied")["reporters"] == {"source": 1}


async def test_connection_refused_before_tracking_is_kept_as_failed(world: World) -> None:
    world.tracker.connection_failed(
        SocketAddr.of("10.244.2.3", 5555),
        SocketAddr.of("10.244.1.3", 15008),
        "inbound",
        Failure(FailureKind.TLS_HANDSHAKE, "tls handshake failed: eof"),
    )
    g = await graph_of(world)
    e = edge(g, "demo/other", "demo/echo-1", "failed")
    assert e["lastError"] == "tls handshake failed: eof" and e["reporters"] == {"destination": 1}
    _, body, _ = await get(world, f"/api/connections?edge={e['id']}")
    [entry] = json.loads(body)["entries"]
    assert entry["log"]["message"] == "connection failed" and entry["log"]["level"] == "warn"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{6})?Z", entry["log"]["time"])
    assert list(entry["log"])[:4] == ["level", "time", "scope", "message"]


async def test_connections_api_filters_by_edge_and_node_newest_first(world: World) -> None:
    world.demo_traffic()
    g = await graph_of(world)
    denied = edge(g, "demo/other", "demo/echo-1", "denied")
    status, body, _ = await get(world, f"/api/connections?edge={denied['id']}")
    data = json.loads(body)
    [entry] = data["entries"]
    log = entry["log"]
    assert status == 200 and entry["edge"] == denied["id"] and entry["outcome"] == "denied"
    assert log["message"] == "connection complete" and log["level"] == "error"
    assert log["src.identity"] == "spiffe://cluster.local/ns/demo/sa/other"
    assert log["error"] == "connection denied: no allow policies matched"
    assert (log["src.addr"], log["dst.workload"]) == ("10.244.2.3:40000", "echo-1")
    status, body, _ = await get(world, "/api/connections?node=wl:c//Pod/demo/echo-1&limit=3")
    entries = json.loads(body)["entries"]
    assert [e["seq"] for e in entries] == [5, 4, 2]  # newest first, limited
    assert (await get(world, "/api/connections?limit=x"))[0] == 400


async def test_history_is_bounded_and_counts_what_it_dropped(log_stream: io.StringIO) -> None:
    world = World(capacity=5)
    for i in range(12):
        world.tracker.open(
            world.connection("other", "echo-1", src_addr=SocketAddr.of("10.244.2.3", i))
        ).close(deny("connection denied"))
    assert world.history.stats() == {"capacity": 5, "size": 5, "recorded": 12, "evicted": 7}
    assert [e.seq for e in world.history] == [8, 9, 10, 11, 12]
    # A huge value from the network is cut, so every entry's size is bounded too.
    world.tracker.open(world.connection("other", "echo-1")).close(deny("x" * 100_000))
    last = list(world.history)[-1]
    assert len(str(last.log["error"])) == MAX_FIELD_CHARS
    assert str(last.log["error"]).endswith("…")
    with pytest.raises(ValueError):
        ConnectionHistory(0)


async def test_denied_connection_stays_visible_after_it_closed(world: World) -> None:
    """The open-connection views forget a denial at once; the graph keeps it."""
    world.tracker.open(world.connection("other", "echo-1")).close(deny("connection denied"))
    status, body, _ = await get(world, "/config_dump")
    assert status == 200
    assert json.loads(body)["connections"] == []
    assert edge(await graph_of(world), "demo/other", "demo/echo-1", "denied")["connections"] == 1


# -- ztunnel ctl graph --------------------------------------------------------------------


async def test_ctl_graph_table_and_json(world: World) -> None:
    world.demo_traffic()
    admin = f"http://127.0.0.1:{world.port}"

    def run(*argv: str) -> tuple[int, str]:
        out = io.StringIO()
        return ctl.main(
            ["--admin", admin, "graph", *argv], out=out, err=io.StringIO()
        ), out.getvalue()

    code, text = await trio.to_thread.run_sync(run)
    lines = text.splitlines()
    assert code == 0 and lines[0].split() == ctl.GRAPH_HEADER
    row = next(line.split() for line in lines if line.startswith("demo/other "))
    assert row[:6] == [
        "demo/other",
        "demo/echo-1",
        "echo.demo.svc.cluster.local",
        "denied",
        "0",
        "1",
    ]
    assert "(history: last 5 of 5 ended connections, capacity 1000)" in text
    code, text = await trio.to_thread.run_sync(run, "-o", "json")
    assert code == 0 and json.loads(text)["history"]["recorded"] == 5


# -- pages without JavaScript ---------------------------------------------------------------


class Cells(HTMLParser):
    """Collects table cells' text, and every tag and attribute, from a page."""

    def __init__(self) -> None:
        super().__init__()
        self.cells: list[str] = []
        self.tags: list[tuple[str, list[tuple[str, str | None]]]] = []
        self._in: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, attrs))
        if tag in ("td", "th"):
            self._in = ""

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._in is not None:
            self.cells.append(self._in)
            self._in = None

    def handle_data(self, data: str) -> None:
        if self._in is not None:
            self._in += data


def parse(body: str) -> Cells:
    p = Cells()
    p.feed(body)
    return p


@pytest.mark.parametrize("view", ["workloads", "services", "policies", "certificates"])
async def test_table_pages_have_ctls_columns_and_rows(world: World, view: str) -> None:
    status, body, headers = await get(world, f"/ui/{view}")
    assert status == 200 and headers["content-type"] == "text/html; charset=utf-8"
    cells = parse(body).cells
    header = ctl.VIEWS[view][1]
    assert cells[: len(header)] == header
    table = ctl.render(view, world.dump(), "table").splitlines()[1:]
    rows = [cells[i : i + len(header)] for i in range(len(header), len(cells), len(header))]
    assert len(rows) == len(table)
    assert "<script" not in body.lower().replace('<script src="/ui/ui.js"', "")


async def test_connections_page_lists_open_and_recent_denials(world: World) -> None:
    world.demo_traffic()
    world.dump_connections = True
    status, body, _ = await get(world, "/ui/connections")
    cells = parse(body).cells
    assert status == 200 and "RECENT" not in cells
    assert "denied" in cells and "connection denied: no allow policies matched" in cells
    assert "spiffe://cluster.local/ns/demo/sa/other" in cells
    assert "last 5 of 5 ended connections (capacity 1000)" in body


async def test_edges_page_is_the_graph_as_a_table(world: World) -> None:
    world.demo_traffic()
    status, body, _ = await get(world, "/ui/graph")
    cells = parse(body).cells
    assert status == 200 and cells[:10] == ctl.GRAPH_HEADER
    assert cells.count("denied") == 2 and "legacy/legacy-client" in cells


async def test_index_is_the_graph_page_with_its_script_and_the_endpoint_list(world: World) -> None:
    status, body, headers = await get(world, "/")
    tags = parse(body).tags
    assert status == 200 and ("script", [("src", "/ui/ui.js"), ("defer", None)]) in tags
    assert not [t for t, attrs in tags if t == "script" and not dict(attrs).get("src")]
    assert all(not k.startswith("on") for _, attrs in tags for k, _ in attrs)
    for path in ("/config_dump", "/api/graph", "/ui/workloads", "/ui/connections"):
        assert f'href="{path}"' in body
    status, js, headers = await get(world, "/ui/ui.js")
    assert status == 200 and headers["content-type"].startswith("text/javascript")
    assert "innerHTML" not in js.replace("never innerHTML", "")
    assert (await get(world, "/ui/ui.css"))[0] == 200


# -- escaping -------------------------------------------------------------------------------


async def test_hostile_names_and_values_are_escaped_in_every_page(world: World) -> None:
    evil = world.w(HOSTILE)
    world.tracker.open(world.connection(HOSTILE, "echo-1")).close(deny(BAGGAGE + HOSTILE))
    world.tracker.connection_failed(
        SocketAddr.of("10.244.1.9", 1),
        HostPort(HOSTILE, 80),
        "outbound",
        Failure(FailureKind.NO_ROUTE, "bad authority " + BAGGAGE),
    )
    assert evil.identity is not None
    for path in ("/ui/workloads", "/ui/connections", "/ui/graph", "/ui/certificates", "/"):
        status, body, _ = await get(world, path)
        assert status == 200
        assert "<script>alert" not in body and "<img" not in body, path
        assert (
            "X-Injected: 1" not in body.replace("\n", " ").replace("\r", " ") or "&lt;img" in body
        )
        page = parse(body)
        # Nothing but our own markup: no tag or attribute came from the data.
        assert {t for t, _ in page.tags} <= {
            "html", "head", "meta", "title", "link", "body", "nav", "span", "a", "main", "h1",
            "h2", "p", "table", "thead", "tbody", "tr", "th", "td", "script", "header", "ul",
            "li", "noscript", "div", "svg", "aside", "details", "summary",
        }, path  # fmt: skip
        if path in ("/ui/workloads", "/ui/graph"):
            assert any(HOSTILE in c for c in page.cells), path  # shown, as text
    status, body, _ = await get(world, "/ui/connections")
    assert any(BAGGAGE + HOSTILE in c for c in parse(body).cells)


async def test_hostile_values_in_json_round_trip_and_form_no_markup(world: World) -> None:
    world.tracker.open(world.connection(HOSTILE, "echo-1")).close(deny(BAGGAGE))
    for path in ("/api/graph", "/api/connections"):
        status, body, headers = await get(world, path)
        assert status == 200 and headers["x-content-type-options"] == "nosniff"
        assert "<" not in body and ">" not in body and "&" not in body, path
        data = json.loads(body)
        text = json.dumps(data, ensure_ascii=False)
        assert HOSTILE in text or json.dumps(HOSTILE)[1:-1] in text
    g = await graph_of(world)
    node = next(n for n in g["nodes"] if n["id"] == "wl:c//Pod/evil/x")
    assert node["name"] == HOSTILE
    assert node["identity"] == f"spiffe://cluster.local/ns/evil/sa/{HOSTILE}"
    entries = json.loads((await get(world, "/api/connections"))[1])["entries"]
    assert entries[0]["log"]["error"] == BAGGAGE


# -- hardening ---------------------------------------------------------------------------


async def test_ui_responses_carry_a_strict_csp_and_nosniff(world: World) -> None:
    for path in ("/", "/ui/ui.js", "/ui/workloads", "/api/graph", "/api/connections"):
        status, _, headers = await get(world, path)
        assert status == 200
        assert headers["content-security-policy"] == CSP
        assert "'unsafe-inline'" not in CSP and "script-src 'self'" in CSP
        assert headers["x-content-type-options"] == "nosniff"
        assert headers["x-frame-options"] == "DENY" and headers["cache-control"] == "no-store"


async def _raw(port: int, head: bytes) -> bytes:
    async with await trio.open_tcp_stream("127.0.0.1", port) as s:
        await s.send_all(head)
        data = b""
        while chunk := await s.receive_some(65536):
            data += chunk
        return data


async def test_ui_refuses_non_loopback_host_names(world: World) -> None:
    """DNS rebinding: evil.example resolving to 127.0.0.1 must not read the agent's state."""
    with trio.fail_after(5):
        for host, ok in (
            ("evil.example", False),
            ("evil.example:15000", False),
            ("10.0.0.1:15000", False),
            ("localhost:15000", True),
            ("127.0.0.1:15000", True),
            ("[::1]:15000", True),
        ):
            reply = await _raw(
                world.port,
                f"GET /api/graph HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode(),
            )
            assert reply.startswith(b"HTTP/1.1 200 " if ok else b"HTTP/1.1 421 "), host


def test_loopback_host_names() -> None:
    assert (
        is_loopback_host("127.0.0.2")
        and is_loopback_host("[::1]")
        and is_loopback_host("LOCALHOST")
    )
    for bad in ("", "localhost.evil", "127.0.0.1.nip.io", "[::2]:1", "0.0.0.0"):
        assert not is_loopback_host(bad), bad


async def test_ui_is_read_only_and_cross_origin_posts_are_refused(world: World) -> None:
    with trio.fail_after(5):
        for path in ("/", "/api/graph", "/ui/workloads"):
            assert (await request(world.port, "POST", path))[0] == 405
        quit = b"POST /quitquitquit HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\n"
        reply = await _raw(
            world.port, quit + b"Origin: http://evil.example\r\nConnection: close\r\n\r\n"
        )
        assert reply.startswith(b"HTTP/1.1 403 ")
        reply = await _raw(world.port, quit + b"Origin: null\r\nConnection: close\r\n\r\n")
        assert reply.startswith(b"HTTP/1.1 403 ")
        level = b"POST /logging?level=debug HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\n"
        reply = await _raw(
            world.port, level + b"Origin: http://evil.example\r\nConnection: close\r\n\r\n"
        )
        assert reply.startswith(b"HTTP/1.1 403 ") and zlog.current_filter() == "info"
        reply = await _raw(
            world.port, level + b"Origin: http://127.0.0.1:8000\r\nConnection: close\r\n\r\n"
        )
        assert reply.startswith(b"HTTP/1.1 200 ")


def test_ip_address_literal_world_is_consistent() -> None:
    world = World()
    assert world.w("echo-1").workload_ips == (ip_address("10.244.1.3"),)


def test_history_entries_are_single_malloc_blocks_of_plain_values() -> None:
    """An entry recorded during a burst must not keep burst-time objects (or pymalloc
    arenas) alive: it is one bytes block above pymalloc's 512-byte small-object limit,
    decoded into plain copies on read (docs/reliability.md, "Memory after a burst")."""

    class Port(int):
        pass

    history = ConnectionHistory(capacity=3)
    addr = zlog.Bare("10.0.0.1:1234")
    history.failed({"src.addr": addr, "port": Port(8080)}, Failure(FailureKind.DENIED, "no"))
    history.closed({"bytesSent": 5}, {"src.addr": addr}, None)
    assert all(type(b) is bytes and sys.getsizeof(b) > 512 for b in history._entries)
    failed, closed = list(history)
    assert failed.log["src.addr"] == "10.0.0.1:1234" and type(failed.log["src.addr"]) is str
    assert failed.log["port"] == 8080 and type(failed.log["port"]) is int
    assert (failed.outcome, closed.outcome) == ("denied", "plaintext")
    assert closed.connection == {"bytesSent": 5} and closed.seq == 2
