"""Route selection and request/response rewriting for one request (sans-IO).

Precedence is the Gateway API's, as Istio sorts it (``sortHTTPRoutes``), across
every rule of every route attached to the Service port: an Exact path, then a
PathPrefix, then a RegularExpression; then the longer path; then a method
match; then more header matches; then more query matches; then the older route
(``creationTimestamp``), then ``namespace/name``; then rule and match order.
The first match in that order wins. When routes are attached and none
matches, the answer is 404 (Envoy's "route not found"). Only one kind is used
per Service: if both HTTPRoutes and GRPCRoutes attach, the older kind wins
(the spec's conflict rule) and the other is reported.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

from ztunnel.waypoint.messages import Headers, RequestHead, ResponseHead, split_authority
from ztunnel.waypoint.routes import (
    PATH_RANK,
    BackendRef,
    Filters,
    PathKind,
    PathModifier,
    PathModifierKind,
    Redirect,
    RetryPolicy,
    Route,
    RouteKind,
    RouteMatch,
    RouteRule,
)


@dataclass(frozen=True, slots=True)
class Selected:
    """The chosen rule and the match that selected it; ``route`` None = the implicit
    default route (no routes attached: forward to the addressed Service itself)."""

    route: Route | None
    rule: RouteRule
    match: RouteMatch

    @property
    def name(self) -> str:
        if self.route is None:
            return "default"
        return f"{self.route.key}.{self.rule.index}"


@dataclass(frozen=True, slots=True)
class _Entry:
    route: Route
    rule: RouteRule
    match: RouteMatch
    order: tuple[object, ...]


def _order(
    route: Route, rule: RouteRule, match: RouteMatch, match_index: int
) -> tuple[object, ...]:
    path = match.path
    rank = PATH_RANK[path.kind] if path is not None else -1
    length = len(path.value) if path is not None else 0
    return (
        -rank,
        -length,
        match.method is None,
        -len(match.headers),
        -len(match.query),
        route.created or "~",  # routes without a timestamp sort after dated ones
        route.key,
        rule.index,
        match_index,
    )


def _match_holds(match: RouteMatch, req: RequestHead) -> bool:
    if match.path is not None and not match.path.matches(req.path):
        return False
    if match.method is not None and req.method != match.method:
        return False
    if not all(h.matches(req.header(h.name)) for h in match.headers):
        return False
    return all(q.matches(req.query_param(q.name)) for q in match.query)


def _host_matches(route: Route, host: str) -> bool:
    if not route.hostnames:
        return True
    for pattern in route.hostnames:
        if pattern.startswith("*."):
            if host.endswith(pattern[1:]) and host != pattern[2:]:
                return True
        elif host == pattern:
            return True
    return False


class ServiceRoutes:
    """The routes attached to one Service port, in precedence order."""

    def __init__(self, routes: Sequence[Route], namespace: str, name: str, port: int) -> None:
        entries = []
        for route in routes:
            for rule in route.rules:
                for i, match in enumerate(rule.matches):
                    entries.append(_Entry(route, rule, match, _order(route, rule, match, i)))
        entries.sort(key=lambda e: e.order)
        self.entries = tuple(entries)
        self.kind = routes[0].kind if routes else RouteKind.HTTP
        self.service = (namespace, name, port)

    def select(self, req: RequestHead) -> Selected | None:
        """The winning rule for ``req``; None means 404 (routes exist, none matches)."""
        host = req.host
        for e in self.entries:
            if _host_matches(e.route, host) and _match_holds(e.match, req):
                return Selected(e.route, e.rule, e.match)
        return None


class RouteTable:
    """All parsed routes, indexed by the Service port they attach to."""

    def __init__(self, routes: Iterable[Route]) -> None:
        self.routes = sorted(routes, key=lambda r: (r.created or "~", r.key))
        self.warnings: list[str] = []

    def for_service(self, namespace: str, name: str, port: int) -> ServiceRoutes | None:
        attached = [r for r in self.routes if r.attaches_to(namespace, name, port)]
        if not attached:
            return None
        kind = attached[0].kind  # the oldest route's kind wins
        chosen = [r for r in attached if r.kind is kind]
        return ServiceRoutes(chosen, namespace, name, port)

    def conflicts(self) -> list[str]:
        """Routes ignored because an older route of the other kind attaches to the same Service."""
        out = []
        for route in self.routes:
            for parent in route.parents:
                attached = [
                    r
                    for r in self.routes
                    if any(
                        (p.namespace, p.name) == (parent.namespace, parent.name) for p in r.parents
                    )
                ]
                if attached and attached[0].kind is not route.kind:
                    out.append(
                        f"{route.kind.value} {route.key} ignored for Service "
                        f"{parent.namespace}/{parent.name}: {attached[0].kind.value} "
                        f"{attached[0].key} is older"
                    )
        return sorted(set(out))


def default_rule(namespace: str, name: str, port: int) -> Selected:
    """No route attached: send to the addressed Service with Istio's default retries."""
    backend = BackendRef(name, namespace, port)
    rule = RouteRule((RouteMatch(),), Filters(), (backend,), None, RetryPolicy())
    return Selected(None, rule, RouteMatch())


def pick_backend(rule: RouteRule, rng: random.Random) -> BackendRef | None:
    """Weighted choice among the rule's backends; None when every weight is 0 (→ 500)."""
    candidates = [b for b in rule.backends if b.weight > 0]
    if not candidates:
        return None
    return rng.choices(candidates, weights=[b.weight for b in candidates])[0]


# -- rewriting ----------------------------------------------------------------------------------


def replace_prefix(path: str, prefix: str, replacement: str) -> str:
    """Gateway API ReplacePrefixMatch (the table in the spec): whole path elements."""
    prefix = "" if prefix == "/" else prefix.rstrip("/")
    rest = path[len(prefix) :] if path.startswith(prefix) else path
    new = replacement.rstrip("/") + rest
    return new or "/"


def _new_path(modifier: PathModifier, match: RouteMatch, path: str) -> str:
    if modifier.kind is PathModifierKind.FULL:
        return modifier.value
    prefix = (
        match.path.value if match.path is not None and match.path.kind is PathKind.PREFIX else ""
    )
    return replace_prefix(path, prefix, modifier.value)


def _with_query(path: str, query: str) -> str:
    return f"{path}?{query}" if query else path


def apply_request_filters(filters: Filters, match: RouteMatch, req: RequestHead) -> RequestHead:
    """Request header modifier, then URL rewrite (hostname, path)."""
    out = req
    if filters.request_headers is not None:
        out = out.with_headers(tuple(filters.request_headers.apply(list(out.headers))))
    rw = filters.rewrite
    if rw is not None:
        if rw.hostname is not None:
            out = replace(out, authority=rw.hostname)
        if rw.path is not None:
            out = replace(out, target=_with_query(_new_path(rw.path, match, out.path), out.query))
    return out


def apply_response_filters(filters: Filters, resp: ResponseHead) -> ResponseHead:
    if filters.response_headers is None:
        return resp
    return ResponseHead(resp.status, tuple(filters.response_headers.apply(list(resp.headers))))


_DEFAULT_PORT = {"http": 80, "https": 443}


def redirect_response(
    redirect: Redirect, match: RouteMatch, req: RequestHead, listener_port: int
) -> ResponseHead:
    """The redirect's status and ``Location`` (scheme, host, port and path rules of the spec)."""
    scheme = redirect.scheme or req.scheme
    host = redirect.hostname or req.host
    if redirect.port is not None:
        port = redirect.port
    elif redirect.scheme is not None:
        port = _DEFAULT_PORT[redirect.scheme]
    else:
        # Istio: FROM_REQUEST_PORT (the Host header's port, else the listener's).
        port = split_authority(req.authority)[1] or listener_port
    path = _new_path(redirect.path, match, req.path) if redirect.path is not None else req.path
    shown_port = "" if _DEFAULT_PORT.get(scheme) == port else f":{port}"
    host_text = f"[{host}]" if ":" in host else host
    location = f"{scheme}://{host_text}{shown_port}{_with_query(path, req.query)}"
    headers: Headers = (("location", location),)
    return ResponseHead(redirect.status, headers)
