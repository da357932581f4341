"""L7 authorization policies as a waypoint enforces them (data only).

An Istio ``AuthorizationPolicy`` bound to a waypoint with ``targetRefs`` becomes
one ``L7Policy``. Its structure follows what istiod generates for Envoy's RBAC
filter (``pilot/pkg/security/authz/model``): a rule matches when *any* of its
``from`` sources, *any* of its ``to`` operations and *all* of its ``when``
conditions match; a missing ``from``/``to`` matches anything; rules are OR'ed;
a policy without rules matches nothing.

Each ``Condition`` keeps the raw Istio strings (so explanations can quote the
policy) plus the attribute it reads; matching lives in ``l7match``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class L7Action(enum.Enum):
    ALLOW = "ALLOW"
    DENY = "DENY"
    CUSTOM = "CUSTOM"  # needs an ext_authz provider; without one it denies what it matches
    AUDIT = "AUDIT"  # no audit sink: reported, never affects the decision


class Attr(enum.Enum):
    """Which request attribute a condition reads."""

    SOURCE_PRINCIPAL = "source.principal"
    SOURCE_NAMESPACE = "source.namespace"
    SOURCE_SERVICE_ACCOUNT = "source.serviceAccount"
    SOURCE_TRUST_DOMAIN = "source.trustDomain"
    SOURCE_IP = "source.ip"
    REMOTE_IP = "remote.ip"
    REQUEST_PRINCIPAL = "request.auth.principal"
    REQUEST_CLAIM = "request.auth.claims"
    REQUEST_AUDIENCE = "request.auth.audiences"
    REQUEST_PRESENTER = "request.auth.presenter"
    HOST = "request.host"
    METHOD = "request.method"
    PATH = "request.path"
    HEADER = "request.headers"
    DESTINATION_PORT = "destination.port"
    DESTINATION_IP = "destination.ip"
    CONNECTION_SNI = "connection.sni"
    # Valid Istio, but nothing here can evaluate it (experimental.envoy.filters.*).
    UNSUPPORTED = "unsupported"


# Attributes that only exist for HTTP. Evaluating a policy for plain TCP follows
# istiod's ``forTCP`` rule: an ALLOW rule using one never matches, a DENY rule
# ignores the condition (so it matches more, never less).
HTTP_ONLY = frozenset(
    {
        Attr.REQUEST_PRINCIPAL,
        Attr.REQUEST_CLAIM,
        Attr.REQUEST_AUDIENCE,
        Attr.REQUEST_PRESENTER,
        Attr.HOST,
        Attr.METHOD,
        Attr.PATH,
        Attr.HEADER,
    }
)


@dataclass(frozen=True, slots=True)
class Condition:
    """One field (or ``when`` key): any of ``values`` and none of ``not_values``.

    ``where`` names the field in the policy (``rules[0].to[1].operation.paths``);
    ``arg`` is the header or claim name for HEADER / REQUEST_CLAIM.
    """

    attr: Attr
    where: str
    values: tuple[str, ...] = ()
    not_values: tuple[str, ...] = ()
    arg: str = ""


Clause = tuple[Condition, ...]  # all must hold


@dataclass(frozen=True, slots=True)
class L7Rule:
    sources: tuple[Clause, ...] = ()  # any; empty = any source
    operations: tuple[Clause, ...] = ()  # any; empty = any operation
    when: Clause = ()  # all


@dataclass(frozen=True, slots=True)
class TargetRef:
    """What a policy is bound to: a Service, the waypoint's Gateway, or its GatewayClass."""

    kind: str  # "Service" | "Gateway" | "GatewayClass" | "ServiceEntry"
    name: str
    namespace: str
    group: str = ""

    def __str__(self) -> str:
        return f"{self.kind}/{self.namespace}/{self.name}"


@dataclass(frozen=True, slots=True)
class L7Policy:
    name: str
    namespace: str
    action: L7Action
    rules: tuple[L7Rule, ...] = ()
    targets: tuple[TargetRef, ...] = ()
    dry_run: bool = False
    provider: str = ""  # CUSTOM only

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True, slots=True)
class WaypointRef:
    """The waypoint a policy set is evaluated for (its Gateway object)."""

    namespace: str
    name: str
    gateway_class: str = "istio-waypoint"


def applies(
    policy: L7Policy,
    waypoint: WaypointRef,
    service: tuple[str, str] | None,
    root_namespace: str,
) -> bool:
    """Whether ``policy`` binds to this request: its Service ``(namespace, name)``, the
    waypoint's Gateway, or (from the root namespace) the waypoint's GatewayClass."""
    for ref in policy.targets:
        if ref.kind == "Service" and service is not None and (ref.namespace, ref.name) == service:
            return True
        if ref.kind == "Gateway" and (ref.namespace, ref.name) == (
            waypoint.namespace,
            waypoint.name,
        ):
            return True
        if (
            ref.kind == "GatewayClass"
            and policy.namespace == root_namespace
            and ref.name == waypoint.gateway_class
        ):
            return True
    return False
