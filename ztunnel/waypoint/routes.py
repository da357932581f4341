"""Gateway API ``HTTPRoute`` / ``GRPCRoute`` as the waypoint applies them (data only).

Routes attach to Services (``parentRefs`` kind Service, GAMMA / Istio ambient).
What Istio's translation does is mirrored in the parsed form
(``pilot/pkg/config/kube/gateway/conversion.go``):

* a ``PathPrefix`` loses its trailing ``/`` and matches whole path elements;
  a match without a path is ``PathPrefix /``; a rule without matches matches all;
* a GRPCRoute method match becomes a path match (``/svc/method`` exact,
  ``/svc/`` prefix, ``/[^/]+/method`` regex);
* with no ``retry`` stanza Istio's default applies: 2 retries on
  connect-failure, refused-stream, gRPC unavailable and cancelled; a ``retry``
  stanza adds its ``codes`` and ``attempts`` (default 2, 0 disables) and
  ``backoff``; ``timeouts.request`` bounds the whole exchange and
  ``timeouts.backendRequest`` each try (the route timeout when there is no
  ``retry`` stanza).
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field

DEFAULT_RETRY_ATTEMPTS = 2  # Istio's DefaultPolicy numRetries
DEFAULT_BACKOFF = 0.025  # Envoy's retry base interval
# Istio's defaultRetryOn minus status codes; an HTTPRoute retry stanza adds its codes.
DEFAULT_RETRY_ON = frozenset({"connect-failure", "refused-stream", "unavailable", "cancelled"})


class RouteKind(enum.Enum):
    HTTP = "HTTPRoute"
    GRPC = "GRPCRoute"


class PathKind(enum.Enum):
    EXACT = "Exact"
    PREFIX = "PathPrefix"  # whole path elements (Envoy path_separated_prefix)
    STRING_PREFIX = "StringPrefix"  # plain startswith (GRPCRoute service match)
    REGEX = "RegularExpression"


# Istio's ranking: Exact > Prefix > Regex.
PATH_RANK = {PathKind.EXACT: 3, PathKind.PREFIX: 2, PathKind.STRING_PREFIX: 2, PathKind.REGEX: 1}


@dataclass(frozen=True, slots=True)
class PathMatch:
    kind: PathKind
    value: str
    regex: re.Pattern[str] | None = field(default=None, compare=False, repr=False)

    def matches(self, path: str) -> bool:
        if self.kind is PathKind.EXACT:
            return path == self.value
        if self.kind is PathKind.STRING_PREFIX:
            return path.startswith(self.value)
        if self.kind is PathKind.PREFIX:
            if self.value == "/":
                return True
            return path == self.value or path.startswith(self.value + "/")
        assert self.regex is not None
        return self.regex.fullmatch(path) is not None


@dataclass(frozen=True, slots=True)
class ValueMatch:
    """A header (name lower-case) or query parameter match, Exact or RegularExpression."""

    name: str
    value: str
    regex: re.Pattern[str] | None = field(default=None, compare=False, repr=False)

    def matches(self, candidate: str | None) -> bool:
        if candidate is None:
            return False
        if self.regex is not None:
            return self.regex.fullmatch(candidate) is not None
        return candidate == self.value


@dataclass(frozen=True, slots=True)
class RouteMatch:
    path: PathMatch | None = None  # None: any path (GRPCRoute without a method match)
    method: str | None = None
    headers: tuple[ValueMatch, ...] = ()
    query: tuple[ValueMatch, ...] = ()


@dataclass(frozen=True, slots=True)
class HeaderModifier:
    set: tuple[tuple[str, str], ...] = ()
    add: tuple[tuple[str, str], ...] = ()
    remove: tuple[str, ...] = ()

    def apply(self, headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
        """Set (replace every value), add (append), remove; names compared lower-case."""
        replaced = {n for n, _ in self.set} | set(self.remove)
        out = [(k, v) for k, v in headers if k not in replaced]
        out += list(self.set)
        out += list(self.add)
        return out


class PathModifierKind(enum.Enum):
    FULL = "ReplaceFullPath"
    PREFIX = "ReplacePrefixMatch"


@dataclass(frozen=True, slots=True)
class PathModifier:
    kind: PathModifierKind
    value: str


@dataclass(frozen=True, slots=True)
class Redirect:
    scheme: str | None = None
    hostname: str | None = None
    path: PathModifier | None = None
    port: int | None = None
    status: int = 302


@dataclass(frozen=True, slots=True)
class Rewrite:
    hostname: str | None = None
    path: PathModifier | None = None


@dataclass(frozen=True, slots=True)
class Filters:
    request_headers: HeaderModifier | None = None
    response_headers: HeaderModifier | None = None
    redirect: Redirect | None = None
    rewrite: Rewrite | None = None


@dataclass(frozen=True, slots=True)
class BackendRef:
    """A weighted Service backend; ``invalid`` names why requests to it get 500."""

    name: str
    namespace: str
    port: int
    weight: int = 1
    filters: Filters = field(default_factory=Filters)
    invalid: str = ""


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    attempts: int = DEFAULT_RETRY_ATTEMPTS  # retries after the first try
    retry_on: frozenset[str] = DEFAULT_RETRY_ON
    codes: frozenset[int] = frozenset()
    backoff: float = DEFAULT_BACKOFF
    per_try_timeout: float | None = None


@dataclass(frozen=True, slots=True)
class RouteRule:
    matches: tuple[RouteMatch, ...]
    filters: Filters = field(default_factory=Filters)
    backends: tuple[BackendRef, ...] = ()
    timeout: float | None = None  # None: no request timeout (Istio's default)
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    name: str = ""
    index: int = 0


@dataclass(frozen=True, slots=True)
class ParentRef:
    namespace: str
    name: str
    port: int | None = None


@dataclass(frozen=True, slots=True)
class Route:
    kind: RouteKind
    name: str
    namespace: str
    parents: tuple[ParentRef, ...]
    rules: tuple[RouteRule, ...]
    hostnames: tuple[str, ...] = ()
    created: str = ""  # metadata.creationTimestamp (RFC 3339 sorts as text)

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    def attaches_to(self, namespace: str, name: str, port: int) -> bool:
        return any(
            p.namespace == namespace and p.name == name and p.port in (None, port)
            for p in self.parents
        )
