"""Gateway API HTTPRoute / GRPCRoute: strict parsing, precedence, splits, filters, retries."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from ztunnel.waypoint.errors import RouteConfigError
from ztunnel.waypoint.messages import RequestHead, ResponseHead
from ztunnel.waypoint.routes import DEFAULT_RETRY_ON, Redirect, Route
from ztunnel.waypoint.routes_yaml import parse_duration, parse_route_documents
from ztunnel.waypoint.routing import (
    RouteTable,
    apply_request_filters,
    apply_response_filters,
    default_rule,
    pick_backend,
    redirect_response,
    replace_prefix,
)

HEAD = """
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: {name}, namespace: default{extra}}}
spec:
  parentRefs: [{{group: "", kind: Service, name: echo, port: 80}}]
"""


def routes(text: str) -> list[Route]:
    return parse_route_documents(yaml.safe_load_all(text), source="r.yaml").routes


def route(rules: str, name: str = "r", extra: str = "") -> Route:
    (r,) = routes(HEAD.format(name=name, extra=extra) + rules)
    return r


def get(target: str = "/", method: str = "GET", **headers: str) -> RequestHead:
    hs = tuple((k.replace("_", "-"), v) for k, v in headers.items())
    return RequestHead(method, target, "echo.default.svc.cluster.local", hs)


def select(rs: list[Route], request: RequestHead) -> str | None:
    table = RouteTable(rs).for_service("default", "echo", 80)
    assert table is not None
    chosen = table.select(request)
    return None if chosen is None else chosen.rule.backends[0].name


# -- precedence -------------------------------------------------------------------------------

RULES = """
  rules:
  - matches: [{path: {type: PathPrefix, value: /}}]
    backendRefs: [{name: root, port: 80}]
  - matches: [{path: {type: PathPrefix, value: /api}}]
    backendRefs: [{name: api, port: 80}]
  - matches: [{path: {type: PathPrefix, value: /api/v2/}}]
    backendRefs: [{name: api-v2, port: 80}]
  - matches: [{path: {type: Exact, value: /api/health}}]
    backendRefs: [{name: health, port: 80}]
  - matches: [{path: {type: RegularExpression, value: '/api/[0-9]+'}}]
    backendRefs: [{name: numeric, port: 80}]
  - matches: [{path: {type: PathPrefix, value: /api}, method: POST}]
    backendRefs: [{name: api-post, port: 80}]
  - matches: [{path: {type: PathPrefix, value: /api}, headers: [{name: X-Canary, value: 'yes'}]}]
    backendRefs: [{name: canary, port: 80}]
"""


@pytest.mark.parametrize(
    ("request_", "backend"),
    [
        (get("/"), "root"),
        (get("/apix"), "root"),  # PathPrefix matches whole elements only
        (get("/api"), "api"),
        (get("/api/users"), "api"),
        (get("/api/v2/x"), "api-v2"),  # longer prefix wins
        (get("/api/health"), "health"),  # exact beats every prefix
        (get("/api/123"), "api"),  # prefix beats regex
        (get("/api/users", "POST"), "api-post"),  # method match beats none
        (get("/api/users", x_canary="yes"), "canary"),
        (get("/api/users", "POST", x_canary="yes"), "api-post"),  # method before headers
        (get("/api/users?x=1"), "api"),
    ],
)
def test_precedence(request_: RequestHead, backend: str) -> None:
    assert select([route(RULES)], request_) == backend


def test_regex_only_when_no_prefix_or_exact_matches() -> None:
    r = route(
        """
  rules:
  - matches: [{path: {type: RegularExpression, value: '/v[0-9]/.*'}}]
    backendRefs: [{name: rx, port: 80}]
  - matches: [{path: {type: PathPrefix, value: /other}}]
    backendRefs: [{name: other, port: 80}]
"""
    )
    assert select([r], get("/v1/x")) == "rx"
    assert select([r], get("/v1")) is None  # full match required → 404


def test_query_params_and_header_regex() -> None:
    r = route(
        """
  rules:
  - matches: [{queryParams: [{name: tier, value: gold}]}]
    backendRefs: [{name: gold, port: 80}]
  - matches: [{headers: [{name: user-agent, type: RegularExpression, value: '.*curl.*'}]}]
    backendRefs: [{name: curl, port: 80}]
  - backendRefs: [{name: rest, port: 80}]
"""
    )
    assert select([r], get("/?tier=gold")) == "gold"
    assert select([r], get("/?tier=silver", user_agent="curl/8.0")) == "curl"
    assert select([r], get("/")) == "rest"


def test_ties_go_to_the_oldest_route_then_name() -> None:
    rule = "  rules: [{backendRefs: [{name: %s, port: 80}]}]\n"
    old = route(rule % "old", "zzz", ", creationTimestamp: '2024-01-01T00:00:00Z'")
    new = route(rule % "new", "aaa", ", creationTimestamp: '2025-01-01T00:00:00Z'")
    assert select([new, old], get()) == "old"
    a, b = route(rule % "a", "a"), route(rule % "b", "b")
    assert select([b, a], get()) == "a"


def test_routes_attach_by_service_and_port() -> None:
    r = route(RULES)
    table = RouteTable([r])
    assert table.for_service("default", "echo", 8080) is None
    assert table.for_service("default", "other", 80) is None
    assert table.for_service("default", "echo", 80) is not None


def test_grpc_route_method_matching() -> None:
    text = """
apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {name: g, namespace: default}
spec:
  parentRefs: [{kind: Service, group: "", name: echo}]
  rules:
  - matches: [{method: {service: helloworld.Greeter, method: SayHello}}]
    backendRefs: [{name: exact, port: 80}]
  - matches: [{method: {service: helloworld.Greeter}}]
    backendRefs: [{name: service, port: 80}]
  - matches: [{method: {method: Check}}]
    backendRefs: [{name: method, port: 80}]
"""
    rs = routes(text)
    assert select(rs, get("/helloworld.Greeter/SayHello", "POST")) == "exact"
    assert select(rs, get("/helloworld.Greeter/Other", "POST")) == "service"
    assert select(rs, get("/grpc.health.v1.Health/Check", "POST")) == "method"
    assert select(rs, get("/x.Y/Z", "POST")) is None


def test_the_older_route_kind_wins_a_conflict() -> None:
    http = route("  rules: [{backendRefs: [{name: h, port: 80}]}]", "h", ", creationTimestamp: '1'")
    grpc_text = """
apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {name: g, namespace: default, creationTimestamp: '2'}
spec:
  parentRefs: [{kind: Service, group: "", name: echo}]
  rules: [{backendRefs: [{name: g, port: 80}]}]
"""
    table = RouteTable([*routes(grpc_text), http])
    assert select([*routes(grpc_text), http], get()) == "h"
    assert any("GRPCRoute default/g ignored" in c for c in table.conflicts())


# -- weighted split ---------------------------------------------------------------------------


def test_weighted_split_follows_the_weights() -> None:
    r = route(
        """
  rules:
  - backendRefs:
    - {name: v1, port: 80, weight: 90}
    - {name: v2, port: 80, weight: 10}
    - {name: zero, port: 80, weight: 0}
"""
    )
    rng = random.Random(7)
    counts = {"v1": 0, "v2": 0, "zero": 0}
    for _ in range(10_000):
        chosen = pick_backend(r.rules[0], rng)
        assert chosen is not None
        counts[chosen.name] += 1
    assert counts["zero"] == 0
    # 10,000 draws of p=0.1: sd = 30; 5 sd either way.
    assert 850 <= counts["v2"] <= 1150


def test_all_zero_weights_mean_500() -> None:
    r = route("  rules: [{backendRefs: [{name: v1, port: 80, weight: 0}]}]")
    assert pick_backend(r.rules[0], random.Random(1)) is None


# -- filters ----------------------------------------------------------------------------------


def test_request_and_response_header_modifiers() -> None:
    r = route(
        """
  rules:
  - filters:
    - type: RequestHeaderModifier
      requestHeaderModifier:
        set: [{name: X-Env, value: prod}]
        add: [{name: X-Trace, value: b}]
        remove: [x-secret]
    - type: ResponseHeaderModifier
      responseHeaderModifier: {add: [{name: X-Served-By, value: waypoint}], remove: [server]}
    backendRefs: [{name: echo, port: 80}]
"""
    )
    rule = r.rules[0]
    out = apply_request_filters(
        rule.filters,
        rule.matches[0],
        get(x_env="dev", x_trace="a", x_secret="s"),
    )
    assert out.headers == (("x-trace", "a"), ("x-env", "prod"), ("x-trace", "b"))
    resp = apply_response_filters(rule.filters, ResponseHead(200, (("server", "app"),)))
    assert resp.headers == (("x-served-by", "waypoint"),)


@pytest.mark.parametrize(
    ("path", "prefix", "replacement", "expected"),
    [
        ("/foo/bar", "/foo", "/xyz", "/xyz/bar"),
        ("/foo/bar", "/foo", "/xyz/", "/xyz/bar"),
        ("/foo/bar", "/foo/", "/xyz", "/xyz/bar"),
        ("/foo", "/foo", "/xyz", "/xyz"),
        ("/foo/", "/foo", "/xyz", "/xyz/"),
        ("/foo/bar", "/foo", "", "/bar"),
        ("/foo/", "/foo", "", "/"),
        ("/foo", "/foo", "", "/"),
        ("/foo/", "/foo", "/", "/"),
        ("/foo", "/foo", "/", "/"),
    ],
)
def test_replace_prefix_match_table_from_the_spec(
    path: str, prefix: str, replacement: str, expected: str
) -> None:
    assert replace_prefix(path, prefix, replacement) == expected


def test_url_rewrite_keeps_the_query() -> None:
    r = route(
        """
  rules:
  - matches: [{path: {type: PathPrefix, value: /old}}]
    filters:
    - type: URLRewrite
      urlRewrite:
        hostname: new.example
        path: {type: ReplacePrefixMatch, replacePrefixMatch: /new}
    backendRefs: [{name: echo, port: 80}]
"""
    )
    rule = r.rules[0]
    out = apply_request_filters(rule.filters, rule.matches[0], get("/old/page?q=1"))
    assert (out.authority, out.target) == ("new.example", "/new/page?q=1")


def test_redirect_location() -> None:
    r = route(
        """
  rules:
  - matches: [{path: {type: PathPrefix, value: /old}}]
    filters:
    - type: RequestRedirect
      requestRedirect:
        scheme: https
        hostname: www.example.com
        statusCode: 301
        path: {type: ReplacePrefixMatch, replacePrefixMatch: /new}
"""
    )
    rule = r.rules[0]
    assert rule.filters.redirect is not None
    resp = redirect_response(rule.filters.redirect, rule.matches[0], get("/old/x?a=b"), 80)
    assert resp.status == 301
    assert resp.header("location") == "https://www.example.com/new/x?a=b"
    plain = redirect_response(Redirect(), rule.matches[0], RequestHead("GET", "/p", "h:8080"), 80)
    assert plain.header("location") == "http://h:8080/p"


# -- retries and timeouts ---------------------------------------------------------------------


def test_default_retry_is_istios() -> None:
    r = route("  rules: [{backendRefs: [{name: echo, port: 80}]}]")
    retry = r.rules[0].retry
    assert (retry.attempts, retry.retry_on, retry.codes) == (2, DEFAULT_RETRY_ON, frozenset())
    assert r.rules[0].timeout is None
    assert default_rule("default", "echo", 80).rule.retry == retry


def test_retry_stanza_and_timeouts() -> None:
    r = route(
        """
  rules:
  - backendRefs: [{name: echo, port: 80}]
    retry: {codes: [503, 502], attempts: 3, backoff: 100ms}
    timeouts: {request: 10s, backendRequest: 2s}
"""
    )
    rule = r.rules[0]
    assert rule.retry.codes == frozenset({502, 503})
    assert (rule.retry.attempts, rule.retry.backoff, rule.retry.per_try_timeout) == (3, 0.1, 2.0)
    assert rule.timeout == 10.0


def test_backend_request_without_retry_is_the_route_timeout() -> None:
    r = route("  rules: [{backendRefs: [{name: echo, port: 80}], timeouts: {backendRequest: 1s}}]")
    assert r.rules[0].timeout == 1.0


def test_unsupported_filter_drops_the_rule_with_a_warning() -> None:
    text = HEAD.format(name="m", extra="") + (
        "  rules:\n"
        "  - filters: [{type: RequestMirror, requestMirror: {backendRef: {name: x, port: 80}}}]\n"
        "    backendRefs: [{name: echo, port: 80}]\n"
    )
    result = parse_route_documents(yaml.safe_load_all(text))
    assert result.routes[0].rules == ()
    assert any("RequestMirror" in w for w in result.warnings)


def test_cross_namespace_backend_is_invalid_not_silently_routed() -> None:
    text = HEAD.format(name="x", extra="") + (
        "  rules: [{backendRefs: [{name: echo, namespace: other, port: 80}]}]\n"
    )
    result = parse_route_documents(yaml.safe_load_all(text))
    assert result.routes[0].rules[0].backends[0].invalid
    assert any("ReferenceGrant" in w for w in result.warnings)


@pytest.mark.parametrize(
    ("rules", "field"),
    [
        ("  rules: [{matches: [{path: {type: Prefix, value: /}}]}]", "matches[0].path.type"),
        ("  rules: [{matches: [{path: {value: 'a'}}]}]", "matches[0].path.value"),
        ("  rules: [{matches: [{path: {type: RegularExpression, value: '('}}]}]", "path.value"),
        ("  rules: [{matches: [{method: FETCH}]}]", "matches[0].method"),
        ("  rules: [{backendRefs: [{name: a}]}]", "backendRefs[0].port"),
        ("  rules: [{backendRefs: [{name: a, port: 80, weight: -1}]}]", "backendRefs[0].weight"),
        ("  rules: [{timeouts: {request: 10}}]", "timeouts.request"),
        ("  rules: [{timeouts: {request: 1s, backendRequest: 2s}}]", "backendRequest"),
        ("  rules: [{retry: {codes: [200]}}]", "retry.codes[0]"),
        ("  rules: [{filters: [{type: Bogus}]}]", "filters[0].type"),
        (
            "  rules: [{filters: [{type: RequestHeaderModifier, requestHeaderModifier: "
            "{set: [{name: a, value: b}], remove: [a]}}]}]",
            "remove[0]",
        ),
        (
            "  rules: [{matches: [{path: {type: Exact, value: /a}}], filters: [{type: URLRewrite, "
            "urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /b}}}]}]",
            "matches",
        ),
        ("  rules: [{backendRefs: [{name: a, port: 80}], matchez: []}]", "matchez"),
    ],
)
def test_bad_routes_name_the_field(rules: str, field: str) -> None:
    with pytest.raises(RouteConfigError) as err:
        route(rules)
    assert field in err.value.field


def test_durations() -> None:
    assert parse_duration("1h30m") == 5400.0
    assert parse_duration("250ms") == 0.25
    for bad in ("1.5s", "10", "-1s", "1d"):
        with pytest.raises(ValueError):
            parse_duration(bad)


# -- properties -------------------------------------------------------------------------------


@given(st.lists(st.sampled_from(["a", "b", "c"]), min_size=0, max_size=4))
def test_prefix_rewrite_to_itself_is_identity(parts: list[str]) -> None:
    path = "/p" + "".join("/" + p for p in parts)
    assert replace_prefix(path, "/p", "/p") == path


@given(st.permutations(["a", "b", "c", "d"]))
def test_selection_does_not_depend_on_route_order(names: list[str]) -> None:
    rule = (
        "  rules: [{matches: [{path: {type: PathPrefix, value: /%s}}], "
        "backendRefs: [{name: %s, port: 80}]}]\n"
    )
    rs = [route(rule % (n * (i + 1), n), n) for i, n in enumerate(["a", "b", "c", "d"])]
    ordered = [next(r for r in rs if r.name == n) for n in names]
    assert select(ordered, get("/dddd/x")) == "d"
    assert select(ordered, get("/a/x")) == "a"


# -- explain and dump (what ctl and the admin page will show) -----------------------------------


def test_explain_request_reports_decision_and_route() -> None:
    from waypoint_testlib import SLEEP, Mesh

    from ztunnel.model.identity import Identity
    from ztunnel.policy.l7model import WaypointRef
    from ztunnel.waypoint.explain import ExplainError, config_dump, explain_request
    from ztunnel.waypoint.state import L7Config, WaypointState

    docs = HEAD.format(name="r", extra="") + (
        "  rules:\n"
        "  - matches: [{headers: [{name: x-canary, value: 'yes'}]}]\n"
        "    backendRefs: [{name: echo-canary, port: 80}]\n"
        "  - backendRefs: [{name: echo, port: 80, weight: 9},\n"
        "                  {name: echo-canary, port: 80, weight: 1}]\n"
        "---\n"
        "apiVersion: security.istio.io/v1\n"
        "kind: AuthorizationPolicy\n"
        "metadata: {name: ns-only, namespace: default}\n"
        "spec:\n"
        "  targetRefs: [{kind: Service, group: '', name: echo}]\n"
        "  rules: [{from: [{source: {namespaces: [default]}}]}]\n"
    )
    state = WaypointState(
        Mesh().store(),
        WaypointRef("default", "waypoint"),
        L7Config.from_documents(yaml.safe_load_all(docs)),
    )
    allowed = explain_request(
        state, "10.96.0.10:80", "GET", "/", headers=(("X-Canary", "yes"),), source=SLEEP
    )
    assert allowed["decision"]["allowed"] is True
    assert allowed["route"]["backends"] == [
        {"service": "default/echo-canary", "port": 80, "weight": 1}
    ]
    split = explain_request(state, "echo.default.svc.cluster.local:80", "GET", "/", source=SLEEP)
    assert [b["weight"] for b in split["route"]["backends"]] == [9, 1]
    denied = explain_request(
        state, "10.96.0.10:80", "GET", "/", source=Identity("cluster.local", "x", "y")
    )
    assert denied["response"]["status"] == 403
    assert "source.namespaces" in denied["explanation"]
    with pytest.raises(ExplainError):
        explain_request(state, "10.1.1.1:80", "GET", "/")
    dump = config_dump(state)
    assert dump["routes"][0]["name"] == "r" and dump["l7Policies"][0]["name"] == "ns-only"
    assert dump["routes"][0]["rules"][0]["matches"][0]["headers"][0]["name"] == "x-canary"


def test_l7_config_loads_files_and_declared_protocols(tmp_path: Path) -> None:
    from ztunnel.errors import ConfigError
    from ztunnel.waypoint.messages import Protocol
    from ztunnel.waypoint.sniff import declared_protocol
    from ztunnel.waypoint.state import L7Config

    (tmp_path / "routes.yaml").write_text(HEAD.format(name="r", extra="") + "  rules: [{}]\n")
    (tmp_path / "svc.yml").write_text(
        "apiVersion: v1\nkind: Service\nmetadata: {name: echo, namespace: default}\n"
        "spec: {ports: [{name: http-web, port: 80}, {name: db, port: 5432, appProtocol: tcp}]}\n"
    )
    cfg = L7Config.load([tmp_path])
    assert [r.name for r in cfg.routes.routes] == ["r"]
    assert cfg.ports[("default", "echo", 80)] == (None, "http-web")
    assert declared_protocol(*cfg.ports[("default", "echo", 80)]) is Protocol.HTTP1
    assert declared_protocol(*cfg.ports[("default", "echo", 5432)]) is Protocol.TCP
    assert declared_protocol("kubernetes.io/h2c", None) is Protocol.HTTP2
    assert declared_protocol(None, "unnamed") is None  # sniffed
    (tmp_path / "bad.yaml").write_text("kind: HTTPRoute\napiVersion: v9\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml"):
        L7Config.load([tmp_path])
