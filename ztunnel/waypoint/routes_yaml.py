"""Parse Gateway API ``HTTPRoute`` / ``GRPCRoute`` documents into ``routes.Route`` (strict).

Every malformed field raises ``RouteConfigError(source, "spec.rules[0].matches[1].path.value",
problem)``. Valid input the waypoint does not implement (RequestMirror, CORS,
ExternalAuth and ExtensionRef filters, sessionPersistence, parents that are not
Services) is reported in ``warnings``; a rule with an unsupported filter is
dropped as a whole, like Istio rejects it, so traffic never silently skips a
filter its author relied on.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ztunnel.docfields import FieldReader
from ztunnel.waypoint.errors import RouteConfigError
from ztunnel.waypoint.routes import (
    DEFAULT_RETRY_ATTEMPTS,
    DEFAULT_RETRY_ON,
    BackendRef,
    Filters,
    HeaderModifier,
    ParentRef,
    PathKind,
    PathMatch,
    PathModifier,
    PathModifierKind,
    Redirect,
    RetryPolicy,
    Rewrite,
    Route,
    RouteKind,
    RouteMatch,
    RouteRule,
    ValueMatch,
)

__all__ = ["RouteDocuments", "parse_duration", "parse_route", "parse_route_documents"]

_VERSIONS = {
    RouteKind.HTTP: frozenset(
        {"gateway.networking.k8s.io/v1", "gateway.networking.k8s.io/v1beta1"}
    ),
    RouteKind.GRPC: frozenset(
        {"gateway.networking.k8s.io/v1", "gateway.networking.k8s.io/v1alpha2"}
    ),
}
_METHODS = frozenset(
    {"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"}
)
_DURATION = re.compile(r"^([0-9]{1,5}(h|m|s|ms)){1,4}$")
_DURATION_PART = re.compile(r"([0-9]{1,5})(h|ms|m|s)")
_UNIT = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
_HEADER_NAME = re.compile(r"^[A-Za-z0-9!#$%&'*+\-.^_`|~]+$")
_UNSUPPORTED_FILTERS = frozenset({"RequestMirror", "CORS", "ExternalAuth", "ExtensionRef"})


def parse_duration(text: str) -> float:
    """A Gateway API Duration (GEP-2257: ``1h``, ``500ms``, ``1m30s``) in seconds."""
    if not _DURATION.match(text):
        raise ValueError(f"{text!r} is not a Gateway API duration (e.g. 10s, 500ms, 1m30s)")
    return sum(int(n) * _UNIT[u] for n, u in _DURATION_PART.findall(text))


class _Doc(FieldReader):
    __slots__ = ()
    error = RouteConfigError

    def string(self, value: Any, path: str, *, required: bool = True) -> str:
        if value is None and not required:
            return ""
        if not isinstance(value, str) or (required and not value):
            raise self.fail(path, "must be a non-empty string")
        return value

    def integer(self, value: Any, path: str, low: int, high: int) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise self.fail(path, f"must be an integer in {low}..{high}, got {value!r}")
        return value

    def duration(self, value: Any, path: str) -> float:
        try:
            return parse_duration(self.string(value, path))
        except ValueError as exc:
            raise self.fail(path, str(exc)) from None

    def regex(self, value: str, path: str) -> re.Pattern[str]:
        try:
            return re.compile(value)
        except re.error as exc:
            raise self.fail(path, f"invalid regular expression: {exc}") from None


@dataclass
class RouteDocuments:
    routes: list[Route] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def parse_route_documents(docs: Iterable[Any], *, source: str = "<documents>") -> RouteDocuments:
    """Every HTTPRoute / GRPCRoute among ``docs``; other kinds are skipped."""
    out = RouteDocuments()
    for index, doc in enumerate(docs):
        if doc is None:
            continue
        if not isinstance(doc, Mapping):
            raise RouteConfigError(f"{source}: document {index}", "", "must be a mapping")
        kind = next((k for k in RouteKind if k.value == doc.get("kind")), None)
        if kind is None:
            continue
        where = _Doc(f"{source}: document {index}")
        if doc.get("apiVersion") not in _VERSIONS[kind]:
            raise where.fail(
                "apiVersion", f"{doc.get('apiVersion')!r} is not a {kind.value} version"
            )
        route, warnings = parse_route(doc, kind, where)
        out.routes.append(route)
        out.warnings.extend(f"{kind.value} {route.key}: {w}" for w in warnings)
    return out


def parse_route(doc: Mapping[str, Any], kind: RouteKind, where: _Doc) -> tuple[Route, list[str]]:
    meta = where.mapping(doc.get("metadata"), "metadata")
    name = where.string(meta.get("name"), "metadata.name")
    namespace = where.string(meta.get("namespace", "default"), "metadata.namespace")
    created = str(meta.get("creationTimestamp") or "")
    where = _Doc(f"{where.source} ({kind.value} {namespace}/{name})")
    spec = where.mapping(doc.get("spec"), "spec")
    where.known_keys(spec, "spec", ("parentRefs", "hostnames", "rules"))
    warnings: list[str] = []
    parents = _parents(spec, namespace, where, warnings)
    hostnames = tuple(
        where.string(h, f"spec.hostnames[{i}]").lower()
        for i, h in enumerate(where.sequence(spec.get("hostnames"), "spec.hostnames"))
    )
    rules: list[RouteRule] = []
    raw_rules = where.sequence(spec.get("rules"), "spec.rules") or [{}]
    for i, raw in enumerate(raw_rules):
        rule = _rule(raw, f"spec.rules[{i}]", i, kind, namespace, where, warnings)
        if rule is not None:
            rules.append(rule)
    return Route(kind, name, namespace, parents, tuple(rules), hostnames, created), warnings


def _parents(
    spec: Mapping[str, Any], namespace: str, where: _Doc, warnings: list[str]
) -> tuple[ParentRef, ...]:
    out = []
    for i, raw in enumerate(where.sequence(spec.get("parentRefs"), "spec.parentRefs")):
        path = f"spec.parentRefs[{i}]"
        ref = where.mapping(raw, path)
        where.known_keys(ref, path, ("group", "kind", "name", "namespace", "port", "sectionName"))
        kind = ref.get("kind", "Gateway")
        group = ref.get("group", "gateway.networking.k8s.io")
        name = where.string(ref.get("name"), f"{path}.name")
        if kind != "Service" or group not in ("", "core"):
            warnings.append(f"{path}: parent {group}/{kind} {name} is not a Service; ignored")
            continue
        port = None
        if ref.get("port") is not None:
            port = where.integer(ref.get("port"), f"{path}.port", 1, 65535)
        ns = where.string(ref.get("namespace", namespace), f"{path}.namespace")
        out.append(ParentRef(ns, name, port))
    if not out:
        warnings.append("no Service parentRef: the route applies to nothing")
    return tuple(out)


def _rule(
    raw: Any,
    path: str,
    index: int,
    kind: RouteKind,
    namespace: str,
    where: _Doc,
    warnings: list[str],
) -> RouteRule | None:
    rule = where.mapping(raw, path)
    keys = ["name", "matches", "filters", "backendRefs", "sessionPersistence"]
    if kind is RouteKind.HTTP:
        keys += ["timeouts", "retry"]
    where.known_keys(rule, path, keys)
    if rule.get("sessionPersistence"):
        warnings.append(f"{path}.sessionPersistence is not supported; ignored")
    parse_match = _http_match if kind is RouteKind.HTTP else _grpc_match
    matches = tuple(
        parse_match(m, f"{path}.matches[{i}]", where)
        for i, m in enumerate(where.sequence(rule.get("matches"), f"{path}.matches"))
    ) or (RouteMatch(PathMatch(PathKind.PREFIX, "/")) if kind is RouteKind.HTTP else RouteMatch(),)
    filters = _filters(rule.get("filters"), f"{path}.filters", kind, where, warnings)
    if filters is None:
        return None
    _check_prefix_rewrite(filters, matches, path, where)
    backends = tuple(
        _backend(b, f"{path}.backendRefs[{i}]", kind, namespace, where, warnings)
        for i, b in enumerate(where.sequence(rule.get("backendRefs"), f"{path}.backendRefs"))
    )
    if filters.redirect is not None and backends:
        raise where.fail(f"{path}.filters", "RequestRedirect cannot be used with backendRefs")
    for b in backends:
        if b is not None and b.filters.redirect is not None:
            raise where.fail(f"{path}.backendRefs", "RequestRedirect is not allowed on a backend")
    retry, timeout = _retry_and_timeouts(rule, path, where)
    name = where.string(rule.get("name"), f"{path}.name", required=False)
    return RouteRule(
        matches,
        filters,
        tuple(b for b in backends if b is not None),
        timeout,
        retry,
        name,
        index,
    )


def _path_match(raw: Any, path: str, where: _Doc) -> PathMatch:
    spec = where.mapping(raw, path)
    where.known_keys(spec, path, ("type", "value"))
    kind_text = spec.get("type", "PathPrefix")
    value = spec.get("value", "/")
    if not isinstance(value, str) or not value:
        raise where.fail(f"{path}.value", "must be a non-empty string")
    if kind_text == "RegularExpression":
        return PathMatch(PathKind.REGEX, value, where.regex(value, f"{path}.value"))
    if kind_text not in ("Exact", "PathPrefix"):
        raise where.fail(
            f"{path}.type", f"{kind_text!r} is not Exact, PathPrefix or RegularExpression"
        )
    if not value.startswith("/") or "//" in value or "/./" in value or "/../" in value:
        raise where.fail(f"{path}.value", f"{value!r} must be an absolute, normalized path")
    if kind_text == "Exact":
        return PathMatch(PathKind.EXACT, value)
    # "When specified, a trailing / is ignored."
    return PathMatch(PathKind.PREFIX, value.rstrip("/") or "/")


def _value_matches(raw: Any, path: str, where: _Doc, *, header: bool) -> tuple[ValueMatch, ...]:
    out: list[ValueMatch] = []
    seen: set[str] = set()
    for i, item in enumerate(where.sequence(raw, path)):
        at = f"{path}[{i}]"
        spec = where.mapping(item, at)
        where.known_keys(spec, at, ("type", "name", "value"))
        name = where.string(spec.get("name"), f"{at}.name")
        if header and not _HEADER_NAME.match(name):
            raise where.fail(f"{at}.name", f"{name!r} is not a valid header name")
        value = where.string(spec.get("value"), f"{at}.value")
        kind = spec.get("type", "Exact")
        key = name.lower() if header else name
        if key in seen:
            continue  # "only the first entry with an equivalent name MUST be considered"
        seen.add(key)
        if kind == "Exact":
            out.append(ValueMatch(key, value))
        elif kind == "RegularExpression":
            out.append(ValueMatch(key, value, where.regex(value, f"{at}.value")))
        else:
            raise where.fail(f"{at}.type", f"{kind!r} is not Exact or RegularExpression")
    return tuple(out)


def _http_match(raw: Any, path: str, where: _Doc) -> RouteMatch:
    spec = where.mapping(raw, path)
    where.known_keys(spec, path, ("path", "headers", "queryParams", "method"))
    match_path = _path_match(spec.get("path"), f"{path}.path", where)
    method = spec.get("method")
    if method is not None and method not in _METHODS:
        raise where.fail(f"{path}.method", f"{method!r} is not an HTTP method")
    return RouteMatch(
        match_path,
        method,
        _value_matches(spec.get("headers"), f"{path}.headers", where, header=True),
        _value_matches(spec.get("queryParams"), f"{path}.queryParams", where, header=False),
    )


_GRPC_SERVICE = re.compile(r"^\.?[A-Za-z_][A-Za-z_0-9]*(\.[A-Za-z_][A-Za-z_0-9]*)*$")
_GRPC_METHOD = re.compile(r"^[A-Za-z_][A-Za-z_0-9]*$")


def _grpc_match(raw: Any, path: str, where: _Doc) -> RouteMatch:
    spec = where.mapping(raw, path)
    where.known_keys(spec, path, ("method", "headers"))
    headers = _value_matches(spec.get("headers"), f"{path}.headers", where, header=True)
    if spec.get("method") is None:
        return RouteMatch(None, None, headers)
    at = f"{path}.method"
    method = where.mapping(spec.get("method"), at)
    where.known_keys(method, at, ("type", "service", "method"))
    kind = method.get("type", "Exact")
    svc = where.string(method.get("service"), f"{at}.service", required=False)
    name = where.string(method.get("method"), f"{at}.method", required=False)
    if not svc and not name:
        raise where.fail(at, "one or both of service and method must be set")
    if kind == "Exact":
        if svc and not _GRPC_SERVICE.match(svc):
            raise where.fail(f"{at}.service", f"{svc!r} is not a gRPC service name")
        if name and not _GRPC_METHOD.match(name):
            raise where.fail(f"{at}.method", f"{name!r} is not a gRPC method name")
        if not name:
            match = PathMatch(PathKind.STRING_PREFIX, f"/{svc}/")
        elif not svc:
            pattern = f"/[^/]+/{re.escape(name)}"
            match = PathMatch(PathKind.REGEX, pattern, re.compile(pattern))
        else:
            match = PathMatch(PathKind.EXACT, f"/{svc}/{name}")
    elif kind == "RegularExpression":
        pattern = f"/{svc or '[^/]+'}/{name or '.+'}"
        match = PathMatch(PathKind.REGEX, pattern, where.regex(pattern, at))
    else:
        raise where.fail(f"{at}.type", f"{kind!r} is not Exact or RegularExpression")
    return RouteMatch(match, None, headers)


def _header_modifier(raw: Any, path: str, where: _Doc) -> HeaderModifier:
    spec = where.mapping(raw, path)
    where.known_keys(spec, path, ("set", "add", "remove"))
    lists: dict[str, tuple[tuple[str, str], ...]] = {}
    names: set[str] = set()
    for key in ("set", "add"):
        items = []
        for i, item in enumerate(where.sequence(spec.get(key), f"{path}.{key}")):
            at = f"{path}.{key}[{i}]"
            entry = where.mapping(item, at)
            where.known_keys(entry, at, ("name", "value"))
            name = where.string(entry.get("name"), f"{at}.name").lower()
            value = where.string(entry.get("value"), f"{at}.value")
            if not _HEADER_NAME.match(name):
                raise where.fail(f"{at}.name", f"{name!r} is not a valid header name")
            if any(c in value for c in "\r\n\0"):
                raise where.fail(f"{at}.value", "header values must not contain CR, LF or NUL")
            if name in names:
                raise where.fail(f"{at}.name", f"{name!r} has more than one action")
            names.add(name)
            items.append((name, value))
        lists[key] = tuple(items)
    remove = []
    for i, item in enumerate(where.sequence(spec.get("remove"), f"{path}.remove")):
        name = where.string(item, f"{path}.remove[{i}]").lower()
        if name in names:
            raise where.fail(f"{path}.remove[{i}]", f"{name!r} has more than one action")
        names.add(name)
        remove.append(name)
    return HeaderModifier(lists["set"], lists["add"], tuple(remove))


def _path_modifier(raw: Any, path: str, where: _Doc) -> PathModifier | None:
    if raw is None:
        return None
    spec = where.mapping(raw, path)
    where.known_keys(spec, path, ("type", "replaceFullPath", "replacePrefixMatch"))
    kind = spec.get("type")
    if kind == "ReplaceFullPath":
        value = spec.get("replaceFullPath")
        if not isinstance(value, str) or not value.startswith("/"):
            raise where.fail(f"{path}.replaceFullPath", "must be an absolute path")
        return PathModifier(PathModifierKind.FULL, value)
    if kind == "ReplacePrefixMatch":
        value = spec.get("replacePrefixMatch")
        if not isinstance(value, str) or (value and not value.startswith("/")):
            raise where.fail(f"{path}.replacePrefixMatch", "must be empty or an absolute path")
        return PathModifier(PathModifierKind.PREFIX, value)
    raise where.fail(f"{path}.type", f"{kind!r} is not ReplaceFullPath or ReplacePrefixMatch")


def _hostname(value: Any, path: str, where: _Doc) -> str | None:
    if value is None:
        return None
    host = where.string(value, path).lower()
    if "*" in host or not re.match(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$", host):
        raise where.fail(path, f"{host!r} is not a precise hostname")
    return host


def _redirect(raw: Any, path: str, where: _Doc) -> Redirect:
    spec = where.mapping(raw, path)
    where.known_keys(spec, path, ("scheme", "hostname", "path", "port", "statusCode"))
    scheme = spec.get("scheme")
    if scheme is not None and scheme not in ("http", "https"):
        raise where.fail(f"{path}.scheme", f"{scheme!r} is not http or https")
    status = spec.get("statusCode", 302)
    if status not in (301, 302, 303, 307, 308):
        raise where.fail(f"{path}.statusCode", f"{status!r} is not 301, 302, 303, 307 or 308")
    port = spec.get("port")
    if port is not None:
        port = where.integer(port, f"{path}.port", 1, 65535)
    return Redirect(
        scheme,
        _hostname(spec.get("hostname"), f"{path}.hostname", where),
        _path_modifier(spec.get("path"), f"{path}.path", where),
        port,
        status,
    )


def _rewrite(raw: Any, path: str, where: _Doc) -> Rewrite:
    spec = where.mapping(raw, path)
    where.known_keys(spec, path, ("hostname", "path"))
    return Rewrite(
        _hostname(spec.get("hostname"), f"{path}.hostname", where),
        _path_modifier(spec.get("path"), f"{path}.path", where),
    )


_FILTER_FIELDS = {
    "RequestHeaderModifier": "requestHeaderModifier",
    "ResponseHeaderModifier": "responseHeaderModifier",
    "RequestRedirect": "requestRedirect",
    "URLRewrite": "urlRewrite",
    "RequestMirror": "requestMirror",
    "CORS": "cors",
    "ExternalAuth": "externalAuth",
    "ExtensionRef": "extensionRef",
}
_GRPC_FILTERS = frozenset(
    {"RequestHeaderModifier", "ResponseHeaderModifier", "RequestMirror", "ExtensionRef"}
)


def _filters(
    raw: Any, path: str, kind: RouteKind, where: _Doc, warnings: list[str]
) -> Filters | None:
    """The parsed filters, or None when one is valid but unsupported (rule dropped)."""
    found: dict[str, Any] = {}
    for i, item in enumerate(where.sequence(raw, path)):
        at = f"{path}[{i}]"
        spec = where.mapping(item, at)
        ftype = spec.get("type")
        allowed = _GRPC_FILTERS if kind is RouteKind.GRPC else frozenset(_FILTER_FIELDS)
        if ftype not in allowed:
            raise where.fail(f"{at}.type", f"{ftype!r} is not a {kind.value} filter type")
        where.known_keys(spec, at, ("type", _FILTER_FIELDS[ftype]))
        if ftype in found:
            raise where.fail(f"{at}.type", f"{ftype} cannot be repeated")
        if ftype in _UNSUPPORTED_FILTERS:
            warnings.append(f"{at}: the {ftype} filter is not supported; the rule is dropped")
            return None
        body = spec.get(_FILTER_FIELDS[ftype])
        if body is None:
            raise where.fail(f"{at}.{_FILTER_FIELDS[ftype]}", f"required for type {ftype}")
        found[ftype] = (body, f"{at}.{_FILTER_FIELDS[ftype]}")
    if "RequestRedirect" in found and "URLRewrite" in found:
        raise where.fail(path, "RequestRedirect and URLRewrite cannot be combined")

    def parsed(ftype: str, fn: Any) -> Any:
        if ftype not in found:
            return None
        body, at = found[ftype]
        return fn(body, at, where)

    return Filters(
        parsed("RequestHeaderModifier", _header_modifier),
        parsed("ResponseHeaderModifier", _header_modifier),
        parsed("RequestRedirect", _redirect),
        parsed("URLRewrite", _rewrite),
    )


def _check_prefix_rewrite(
    filters: Filters, matches: tuple[RouteMatch, ...], path: str, where: _Doc
) -> None:
    modifiers = [
        f.path for f in (filters.redirect, filters.rewrite) if f is not None and f.path is not None
    ]
    if not any(m.kind is PathModifierKind.PREFIX for m in modifiers):
        return
    only = matches[0].path if len(matches) == 1 else None
    if only is None or only.kind is not PathKind.PREFIX:
        raise where.fail(
            f"{path}.matches",
            "ReplacePrefixMatch needs exactly one PathPrefix match in the rule",
        )


def _backend(
    raw: Any, path: str, kind: RouteKind, namespace: str, where: _Doc, warnings: list[str]
) -> BackendRef | None:
    spec = where.mapping(raw, path)
    where.known_keys(
        spec, path, ("group", "kind", "name", "namespace", "port", "weight", "filters")
    )
    name = where.string(spec.get("name"), f"{path}.name")
    weight = spec.get("weight", 1)
    weight = where.integer(weight, f"{path}.weight", 0, 1_000_000)
    group, bkind = spec.get("group", ""), spec.get("kind", "Service")
    filters = _filters(spec.get("filters"), f"{path}.filters", kind, where, warnings)
    if filters is None:
        return None
    ns = where.string(spec.get("namespace", namespace), f"{path}.namespace")
    invalid = ""
    if bkind != "Service" or group not in ("", "core"):
        invalid = f"backend kind {group}/{bkind} is not supported"
    elif ns != namespace:
        invalid = "cross-namespace backendRefs need a ReferenceGrant, which is not read here"
    if spec.get("port") is None:
        if not invalid:
            raise where.fail(f"{path}.port", "required for a Service backend")
        port = 0
    else:
        port = where.integer(spec.get("port"), f"{path}.port", 1, 65535)
    if invalid:
        warnings.append(f"{path}: {invalid}; its share of requests gets 500")
    return BackendRef(name, ns, port, weight, filters, invalid)


def _retry_and_timeouts(
    rule: Mapping[str, Any], path: str, where: _Doc
) -> tuple[RetryPolicy, float | None]:
    retry = RetryPolicy()
    raw_retry = rule.get("retry")
    if raw_retry is not None:
        spec = where.mapping(raw_retry, f"{path}.retry")
        where.known_keys(spec, f"{path}.retry", ("codes", "attempts", "backoff"))
        codes = frozenset(
            where.integer(c, f"{path}.retry.codes[{i}]", 400, 599)
            for i, c in enumerate(where.sequence(spec.get("codes"), f"{path}.retry.codes"))
        )
        attempts = DEFAULT_RETRY_ATTEMPTS
        if spec.get("attempts") is not None:
            attempts = where.integer(spec.get("attempts"), f"{path}.retry.attempts", 0, 1000)
        backoff = retry.backoff
        if spec.get("backoff") is not None:
            backoff = where.duration(spec.get("backoff"), f"{path}.retry.backoff")
        retry = RetryPolicy(attempts, DEFAULT_RETRY_ON, codes, backoff)
    timeout: float | None = None
    timeouts = where.mapping(rule.get("timeouts"), f"{path}.timeouts")
    where.known_keys(timeouts, f"{path}.timeouts", ("request", "backendRequest"))
    if timeouts.get("request") is not None:
        timeout = where.duration(timeouts["request"], f"{path}.timeouts.request") or None
    if timeouts.get("backendRequest") is not None:
        backend = where.duration(timeouts["backendRequest"], f"{path}.timeouts.backendRequest")
        if timeout is not None and backend > timeout:
            raise where.fail(
                f"{path}.timeouts.backendRequest", "cannot be longer than the request timeout"
            )
        if backend:
            if raw_retry is not None:
                retry = RetryPolicy(
                    retry.attempts, retry.retry_on, retry.codes, retry.backoff, backend
                )
            else:
                timeout = backend  # Istio: without a retry stanza it is the route timeout
    return retry, timeout
