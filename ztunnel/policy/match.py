"""Matching one L4 authorization policy against one connection (ztunnel ``src/rbac.rs``).

Theory of operation. A policy is compiled once into nested tuples of small
checks and cached by object identity, because the inbound path evaluates the
same long-lived policy objects for every connection. Semantics follow ztunnel:

* zero rules never match; rules are OR'ed; a rule's clauses are AND'ed and a
  rule with no clauses matches everything;
* a clause with no matches matches; otherwise its matches are OR'ed and an
  *empty* Match is skipped, so a clause made only of empty matches never
  matches (istiod relies on this to neutralise DENY rules that had only L7
  fields);
* inside a Match, field types are AND'ed (positive list: any value; ``not_``
  list: none of the values), so checking the cheapest field first and stopping
  at the first failure gives the same answer as ztunnel's full evaluation.

Principals are compared without ``spiffe://``; with no peer identity every
principal matcher fails (ztunnel fails to strip the prefix), while namespaces
are compared against ``""`` and service accounts never match.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address

from ztunnel.model.authorization import (
    Authorization,
    Clause,
    Match,
    MatchKind,
    Rule,
    ServiceAccountMatch,
    StringMatch,
)
from ztunnel.model.identity import Identity
from ztunnel.model.workload import IPAddress, IPNetwork


@dataclass(frozen=True, slots=True)
class ConnectionAttrs:
    """What L4 policy sees of a connection; ``dst_port`` is the resolved target port."""

    src_ip: IPAddress
    dst_ip: IPAddress
    dst_port: int
    src_identity: Identity | None = None


class Subject:
    """A connection with the derived values every check needs, computed once.

    A plain slotted class (not a frozen dataclass) because one is built per
    decision and frozen-dataclass construction is several times slower.
    """

    __slots__ = ("dst_i", "dst_v", "identity", "namespace", "port", "principal", "src_i", "src_v")

    def __init__(self, conn: ConnectionAttrs) -> None:
        ident = conn.src_identity
        self.src_v, self.src_i = _ip_key(conn.src_ip)
        self.dst_v, self.dst_i = _ip_key(conn.dst_ip)
        self.port = conn.dst_port
        # None: no identity, so every principal matcher fails.
        self.principal = ident.principal if ident is not None else None
        self.namespace = ident.namespace if ident is not None else ""
        self.identity = ident

    @classmethod
    def of(cls, conn: ConnectionAttrs) -> Subject:
        return cls(conn)


Check = Callable[[Subject], bool]


@dataclass(frozen=True, slots=True)
class CompiledPolicy:
    policy: Authorization
    rules: tuple[Check, ...]
    # Ports the policy can possibly match (None: any). Lets evaluation skip
    # most policies with one set lookup.
    ports: frozenset[int] | None

    def first_matching_rule(self, subj: Subject) -> int | None:
        if self.ports is not None and subj.port not in self.ports:
            return None
        for index, rule in enumerate(self.rules):
            if rule(subj):
                return index
        return None


def policy_matches(policy: Authorization, conn: ConnectionAttrs) -> bool:
    """True when any rule of ``policy`` matches ``conn`` (ztunnel ``Authorization::matches``)."""
    return compiled(policy).first_matching_rule(Subject(conn)) is not None


# -- compilation ------------------------------------------------------------------------------
# Each level collapses to a single closure, and one-element levels to their only
# element, because Python call and generator overhead dominates the cost.

_CACHE_LIMIT = 100_000
# id(policy) -> (policy, compiled). Holding the policy keeps its id from being reused.
_cache: dict[int, tuple[Authorization, CompiledPolicy]] = {}


def compiled(policy: Authorization) -> CompiledPolicy:
    """The compiled form of ``policy``, cached by identity (bounded)."""
    hit = _cache.get(id(policy))
    if hit is not None and hit[0] is policy:
        return hit[1]
    result = CompiledPolicy(
        policy, tuple(_rule_predicate(r) for r in policy.rules), _policy_ports(policy)
    )
    if len(_cache) >= _CACHE_LIMIT:
        _cache.clear()
    _cache[id(policy)] = (policy, result)
    return result


def _always(subj: Subject) -> bool:
    return True


def _never(subj: Subject) -> bool:
    return False


def _all_of(checks: Sequence[Check]) -> Check:
    if not checks:
        return _always
    if len(checks) == 1:
        return checks[0]

    def all_of(subj: Subject) -> bool:
        # A plain loop: all() over a generator costs about twice as much here.
        for check in checks:  # noqa: SIM110
            if not check(subj):
                return False
        return True

    return all_of


def _any_of(checks: Sequence[Check]) -> Check:
    if not checks:
        return _never
    if len(checks) == 1:
        return checks[0]

    def any_of(subj: Subject) -> bool:
        for check in checks:  # noqa: SIM110
            if check(subj):
                return True
        return False

    return any_of


def _rule_predicate(rule: Rule) -> Check:
    # A clause without matches always holds, so it adds no check.
    return _all_of([_clause_predicate(c) for c in rule if c])


def _clause_predicate(clause: Clause) -> Check:
    # Empty matches are skipped; a clause of only empty matches never holds.
    return _any_of([_all_of(compile_match(m)) for m in clause if not m.is_empty()])


def compile_match(m: Match) -> tuple[Check, ...]:
    """Checks for one Match (all must hold), cheapest first."""
    checks: list[Check] = []
    if m.destination_ports:
        ports = frozenset(m.destination_ports)
        checks.append(lambda s: s.port in ports)
    if m.not_destination_ports:
        not_ports = frozenset(m.not_destination_ports)
        checks.append(lambda s: s.port not in not_ports)
    if m.source_ips:
        checks.append(_ip_check(m.source_ips, src=True))
    if m.not_source_ips:
        checks.append(_negate(_ip_check(m.not_source_ips, src=True)))
    if m.destination_ips:
        checks.append(_ip_check(m.destination_ips, src=False))
    if m.not_destination_ips:
        checks.append(_negate(_ip_check(m.not_destination_ips, src=False)))
    if m.namespaces:
        checks.append(_any_of([_namespace_check(sm) for sm in m.namespaces]))
    if m.not_namespaces:
        checks.append(_negate(_any_of([_namespace_check(sm) for sm in m.not_namespaces])))
    if m.principals:
        checks.append(_any_of([_principal_check(sm) for sm in m.principals]))
    if m.not_principals:
        checks.append(_negate(_any_of([_principal_check(sm) for sm in m.not_principals])))
    if m.service_accounts:
        sas = tuple(m.service_accounts)
        checks.append(lambda s: any(sa_matches(sa, s.identity) for sa in sas))
    if m.not_service_accounts:
        not_sas = tuple(m.not_service_accounts)
        checks.append(lambda s: not any(sa_matches(sa, s.identity) for sa in not_sas))
    return tuple(checks)


def _negate(check: Check) -> Check:
    return lambda s: not check(s)


def _ip_check(nets: Sequence[IPNetwork], *, src: bool) -> Check:
    keys = tuple(_net_key(n) for n in nets)
    if len(keys) == 1:
        ((version, addr, mask),) = keys
        if src:
            return lambda s: s.src_v == version and s.src_i & mask == addr
        return lambda s: s.dst_v == version and s.dst_i & mask == addr
    if src:
        return lambda s: _in_any((s.src_v, s.src_i), keys)
    return lambda s: _in_any((s.dst_v, s.dst_i), keys)


def _namespace_check(sm: StringMatch) -> Check:
    value = sm.value
    if sm.kind is MatchKind.EXACT:
        return lambda s: s.namespace == value
    if sm.kind is MatchKind.PREFIX:
        return lambda s: s.namespace.startswith(value)
    if sm.kind is MatchKind.SUFFIX:
        return lambda s: s.namespace.endswith(value)
    return lambda s: s.namespace != ""


def _principal_check(sm: StringMatch) -> Check:
    # ``principal`` is None without an identity: every kind fails then.
    value = sm.value
    if sm.kind is MatchKind.EXACT:
        return lambda s: s.principal == value
    if sm.kind is MatchKind.PREFIX:
        return lambda s: s.principal is not None and s.principal.startswith(value)
    if sm.kind is MatchKind.SUFFIX:
        return lambda s: s.principal is not None and s.principal.endswith(value)
    return lambda s: bool(s.principal)


def principal_matches(sm: StringMatch, subj: Subject) -> bool:
    return subj.principal is not None and sm.matches(subj.principal)


def namespace_matches(sm: StringMatch, subj: Subject) -> bool:
    return sm.matches(subj.namespace)


def sa_matches(sa: ServiceAccountMatch, identity: Identity | None) -> bool:
    # The trust domain is deliberately ignored, as in ztunnel.
    return (
        identity is not None
        and identity.namespace == sa.namespace
        and identity.service_account == sa.service_account
    )


def _ip_key(ip: IPAddress) -> tuple[int, int]:
    return (4 if isinstance(ip, IPv4Address) else 6, int(ip))


def _net_key(net: IPNetwork) -> tuple[int, int, int]:
    return (net.version, int(net.network_address), int(net.netmask))


def ip_in_any(ip: IPAddress, nets: Sequence[IPNetwork]) -> bool:
    return _in_any(_ip_key(ip), tuple(_net_key(n) for n in nets))


def _in_any(ip: tuple[int, int], nets: tuple[tuple[int, int, int], ...]) -> bool:
    version, value = ip
    return any(v == version and value & mask == addr for v, addr, mask in nets)


# -- port prefilter ---------------------------------------------------------------------------


def _policy_ports(policy: Authorization) -> frozenset[int] | None:
    """Union over rules of the ports each rule can match; None when some rule allows any port."""
    result: set[int] = set()
    for rule in policy.rules:
        ports = _rule_ports(rule)
        if ports is None:
            return None
        result |= ports
    return frozenset(result)


def _rule_ports(rule: Rule) -> frozenset[int] | None:
    result: frozenset[int] | None = None
    for clause in rule:
        ports = _clause_ports(clause)
        if ports is not None:
            result = ports if result is None else result & ports
    return result


def _clause_ports(clause: Clause) -> frozenset[int] | None:
    if not clause:
        return None  # an empty clause matches everything
    live = [m for m in clause if not m.is_empty()]
    if any(not m.destination_ports for m in live):
        return None
    # All-empty clauses yield the empty set: such a clause never matches.
    return frozenset(p for m in live for p in m.destination_ports)


def describe_string_match(sm: StringMatch) -> str:
    if sm.kind is MatchKind.PRESENCE:
        return "Presence"
    return f"{sm.kind.value} {sm.value!r}"
