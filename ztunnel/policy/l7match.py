"""Matching L7 policy conditions against one HTTP request (sans-IO).

Value syntax is Istio's (``pilot/pkg/security/authz/matcher``): ``*`` is
presence, ``*x`` a suffix, ``x*`` a prefix, anything else exact. Per field:

* principals compare against ``<td>/ns/<ns>/sa/<sa>`` (no identity: nothing
  matches, so ``notPrincipals: ["*"]`` catches plaintext); namespaces are globs
  over the identity's namespace (``*`` may appear anywhere, istiod turns it into
  ``.*``); service accounts are ``ns/sa`` or ``sa`` (the policy's namespace);
  trust domains are globs over the identity's trust domain;
* ``ipBlocks`` / ``source.ip`` read the TCP peer of the HBONE connection,
  ``remoteIpBlocks`` / ``remote.ip`` the client address derived from
  ``x-forwarded-for`` (Envoy's trusted client address);
* hosts compare case-insensitively with ``Host`` / ``:authority``; methods
  case-sensitively; paths against the normalized path *without* the query, and
  ``{*}`` / ``{**}`` are Istio's path templates (one segment / the rest);
* ``request.headers[h]`` joins repeated headers with ``,`` as Envoy does; ``*``
  means the header is present (even empty);
* request principals and claims come from validated JWTs, which this waypoint
  does not do: they are always absent (what Istio evaluates without a JWT).
"""

from __future__ import annotations

import functools
import ipaddress
import re
from collections.abc import Callable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address
from urllib.parse import urlsplit

from ztunnel.model.identity import Identity
from ztunnel.policy.l7model import Attr, Condition

IPAddress = IPv4Address | IPv6Address
Predicate = Callable[["RequestAttrs"], bool]


@dataclass(frozen=True, slots=True)
class RequestAttrs:
    """What L7 policy sees of one request (``http=False`` for a plain TCP stream)."""

    src_ip: IPAddress
    dst_port: int
    method: str = ""
    path: str = ""  # the request target as received (query included)
    host: str = ""
    headers: tuple[tuple[str, str], ...] = ()  # lower-case names
    src_identity: Identity | None = None
    remote_ip: IPAddress | None = None  # None: the same as src_ip
    dst_ip: IPAddress | None = None
    sni: str = ""
    http: bool = True

    @property
    def url_path(self) -> str:
        """The normalized path without query or fragment (what ``paths`` match)."""
        return normalize_path(self.path)

    @property
    def client_ip(self) -> IPAddress:
        return self.remote_ip if self.remote_ip is not None else self.src_ip

    def header(self, name: str) -> str | None:
        """All values of ``name`` joined by ``,``; None when absent."""
        lower = name.lower()
        if lower in ("host", ":authority"):
            return self.host or None
        if lower == ":method":
            return self.method or None
        if lower == ":path":
            return self.path or None
        found = [v for k, v in self.headers if k == lower]
        return ",".join(found) if found else None


# -- path normalization ---------------------------------------------------------------------


def normalize_path(target: str) -> str:
    """The path of a request target, dot segments removed (RFC 3986 §5.2.4).

    Envoy normalizes paths before routing and RBAC (Istio's default ``BASE``
    normalization), so ``/public/../admin`` is judged as ``/admin``. Encoded dots
    (``%2e``) count as dots for that purpose. Absolute-form targets
    (``http://host/p``) yield their path; ``*`` stays ``*``.
    """
    if target == "*":
        return target
    if "://" in target.split("/", 1)[0] or target.startswith(("http://", "https://")):
        target = urlsplit(target).path or "/"
    path = target.split("?", 1)[0].split("#", 1)[0]
    if not path.startswith("/"):
        path = "/" + path
    return _remove_dot_segments(path)


_DOT = frozenset({".", "%2e", "%2E"})
_DOTDOT = frozenset({"..", ".%2e", ".%2E", "%2e.", "%2E.", "%2e%2e", "%2E%2E", "%2e%2E", "%2E%2e"})


def _remove_dot_segments(path: str) -> str:
    out: list[str] = []
    segments = path.split("/")[1:]
    for i, seg in enumerate(segments):
        last = i == len(segments) - 1
        if seg in _DOT:
            if last:
                out.append("")
        elif seg in _DOTDOT:
            if out:
                out.pop()
            if last:
                out.append("")
        else:
            out.append(seg)
    return "/" + "/".join(out)


# -- value matchers --------------------------------------------------------------------------


def string_predicate(value: str, *, ignore_case: bool = False) -> Callable[[str | None], bool]:
    """Istio's ``*`` / ``*x`` / ``x*`` / exact; None (absent) never matches."""
    if value == "*":
        return lambda s: s is not None and s != ""
    if ignore_case:
        value = value.lower()

    def fold(s: str) -> str:
        return s.lower() if ignore_case else s

    if value.startswith("*"):
        suffix = value[1:]
        return lambda s: s is not None and fold(s).endswith(suffix)
    if value.endswith("*"):
        prefix = value[:-1]
        return lambda s: s is not None and fold(s).startswith(prefix)
    return lambda s: s is not None and fold(s) == value


def glob_regex(value: str, *, segment: bool = False) -> re.Pattern[str]:
    """``*`` anywhere as a wildcard (``[^/]*`` within one segment when ``segment``)."""
    star = "[^/]*" if segment else ".*"
    return re.compile(star.join(re.escape(part) for part in value.split("*")))


def path_template_regex(value: str) -> re.Pattern[str]:
    """Istio path templates: ``{*}`` one segment, ``{**}`` any remainder."""
    out = []
    for token in re.split(r"(\{\*\*\}|\{\*\})", value):
        if token == "{**}":
            out.append(".*")
        elif token == "{*}":
            out.append("[^/]+")
        else:
            out.append(re.escape(token))
    return re.compile("".join(out))


def is_path_template(value: str) -> bool:
    return "{*}" in value or "{**}" in value


def _value_predicate(attr: Attr, value: str, arg: str, policy_ns: str) -> Predicate:
    builder = _BUILDERS.get(attr)
    if builder is None:
        raise ValueError(f"no matcher for {attr.value}")
    return builder(value, arg, policy_ns)


def _principal(value: str, arg: str, ns: str) -> Predicate:
    match = string_predicate(value)
    return lambda r: r.src_identity is not None and match(r.src_identity.principal)


def _namespace(value: str, arg: str, ns: str) -> Predicate:
    rx = glob_regex(value)
    return lambda r: (
        r.src_identity is not None and rx.fullmatch(r.src_identity.namespace) is not None
    )


def _service_account(value: str, arg: str, ns: str) -> Predicate:
    sa_ns, sep, sa = value.partition("/")
    if not sep:
        sa_ns, sa = ns, value
    return lambda r: (
        r.src_identity is not None
        and r.src_identity.namespace == sa_ns
        and r.src_identity.service_account == sa
    )


def _trust_domain(value: str, arg: str, ns: str) -> Predicate:
    if value == "*":
        return lambda r: r.src_identity is not None
    rx = glob_regex(value, segment=True)
    return lambda r: (
        r.src_identity is not None and rx.fullmatch(r.src_identity.trust_domain) is not None
    )


def _cidr(value: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    return ipaddress.ip_network(value, strict=False)


def _source_ip(value: str, arg: str, ns: str) -> Predicate:
    net = _cidr(value)
    return lambda r: r.src_ip.version == net.version and r.src_ip in net


def _remote_ip(value: str, arg: str, ns: str) -> Predicate:
    net = _cidr(value)
    return lambda r: r.client_ip.version == net.version and r.client_ip in net


def _destination_ip(value: str, arg: str, ns: str) -> Predicate:
    net = _cidr(value)
    return lambda r: r.dst_ip is not None and r.dst_ip.version == net.version and r.dst_ip in net


def _port(value: str, arg: str, ns: str) -> Predicate:
    port = int(value)
    return lambda r: r.dst_port == port


def _host(value: str, arg: str, ns: str) -> Predicate:
    match = string_predicate(value, ignore_case=True)
    return lambda r: match(r.host or None)


def _method(value: str, arg: str, ns: str) -> Predicate:
    match = string_predicate(value)
    return lambda r: match(r.method or None)


def _path(value: str, arg: str, ns: str) -> Predicate:
    if is_path_template(value):
        rx = path_template_regex(value)
        return lambda r: bool(r.path) and rx.fullmatch(r.url_path) is not None
    match = string_predicate(value)
    return lambda r: bool(r.path) and match(r.url_path)


def _header(value: str, arg: str, ns: str) -> Predicate:
    if value == "*":
        return lambda r: r.header(arg) is not None
    match = string_predicate(value)
    return lambda r: match(r.header(arg))


def _sni(value: str, arg: str, ns: str) -> Predicate:
    match = string_predicate(value)
    return lambda r: match(r.sni or None)


def _absent(value: str, arg: str, ns: str) -> Predicate:
    # No JWT is ever validated here, so there is nothing for these to match.
    return lambda r: False


_BUILDERS: dict[Attr, Callable[[str, str, str], Predicate]] = {
    Attr.SOURCE_PRINCIPAL: _principal,
    Attr.SOURCE_NAMESPACE: _namespace,
    Attr.SOURCE_SERVICE_ACCOUNT: _service_account,
    Attr.SOURCE_TRUST_DOMAIN: _trust_domain,
    Attr.SOURCE_IP: _source_ip,
    Attr.REMOTE_IP: _remote_ip,
    Attr.DESTINATION_IP: _destination_ip,
    Attr.DESTINATION_PORT: _port,
    Attr.HOST: _host,
    Attr.METHOD: _method,
    Attr.PATH: _path,
    Attr.HEADER: _header,
    Attr.CONNECTION_SNI: _sni,
    Attr.REQUEST_PRINCIPAL: _absent,
    Attr.REQUEST_CLAIM: _absent,
    Attr.REQUEST_AUDIENCE: _absent,
    Attr.REQUEST_PRESENTER: _absent,
}


@functools.lru_cache(maxsize=65536)
def compile_condition(cond: Condition, policy_ns: str) -> Predicate | None:
    """A predicate for ``cond`` (any value, no not-value); None for UNSUPPORTED."""
    if cond.attr is Attr.UNSUPPORTED:
        return None
    positive = [_value_predicate(cond.attr, v, cond.arg, policy_ns) for v in cond.values]
    negative = [_value_predicate(cond.attr, v, cond.arg, policy_ns) for v in cond.not_values]

    def check(r: RequestAttrs) -> bool:
        if positive and not any(p(r) for p in positive):
            return False
        return not any(n(r) for n in negative)

    return check


def observed(cond: Condition, r: RequestAttrs) -> str:
    """The request's value for ``cond``'s attribute, for explanations."""
    ident = r.src_identity
    values: dict[Attr, object] = {
        Attr.SOURCE_PRINCIPAL: ident.principal if ident else "<no identity>",
        Attr.SOURCE_NAMESPACE: ident.namespace if ident else "<no identity>",
        Attr.SOURCE_SERVICE_ACCOUNT: (
            f"{ident.namespace}/{ident.service_account}" if ident else "<no identity>"
        ),
        Attr.SOURCE_TRUST_DOMAIN: ident.trust_domain if ident else "<no identity>",
        Attr.SOURCE_IP: r.src_ip,
        Attr.REMOTE_IP: r.client_ip,
        Attr.DESTINATION_IP: r.dst_ip if r.dst_ip is not None else "<none>",
        Attr.DESTINATION_PORT: r.dst_port,
        Attr.HOST: r.host,
        Attr.METHOD: r.method,
        Attr.PATH: r.url_path if r.path else "<none>",
        Attr.HEADER: r.header(cond.arg) if r.header(cond.arg) is not None else "<absent>",
        Attr.CONNECTION_SNI: r.sni or "<none>",
    }
    return str(values.get(cond.attr, "<no validated JWT>"))
