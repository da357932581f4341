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


@dataclass(frozen=True, slots=True)
class Subject:
    """A connection with the derived values every check needs, computed once."""

    src: tuple[int, int]  # (ip version, integer address)
    dst: tuple[int, int]
    port: int
    principal: str | None  # None: no identity, so every principal matcher fails
    namespace: str
    identity: Identity | None

    @classmethod
    def of(cls, conn: ConnectionAttrs) -> Subject:
        ident = conn.src_identity
        return cls(
            src=_ip_key(conn.src_ip),
            dst=_ip_key(conn.dst_ip),
            port=conn.dst_port,
            principal=ident.principal if ident is not None else None,
            namespace=ident.namespace if ident is not None else "",
            identity=ident,
        )


Check = Callable[[Subject], bool]
CompiledMatch = tuple[Check, ...]  # all must hold
CompiledClause = tuple[CompiledMatch, ...]  # non-empty matches only; any may hold
# (compiled non-empty matches, clause had no matches at all)
CompiledClauseEntry = tuple[CompiledClause, bool]
CompiledRule = tuple[CompiledClauseEntry, ...]


@dataclass(frozen=True, slots=True)
class CompiledPolicy:
    policy: Authorization
    rules: tuple[CompiledRule, ...]
    # Ports the policy can possibly match (None: any). Lets evaluation skip
    # most policies with one set lookup.
    ports: frozenset[int] | None

    def first_matching_rule(self, subj: Subject) -> int | None:
        if self.ports is not None and subj.port not in self.ports:
            return None
        for index, rule in enumerate(self.rules):
            if _rule_matches(rule, subj):
                return index
        return None


def policy_matches(policy: Authorization, conn: ConnectionAttrs) -> bool:
    """True when any rule of ``policy`` matches ``conn`` (ztunnel ``Authorization::matches``)."""
    return compiled(policy).first_matching_rule(Subject.of(conn)) is not None


def _rule_matches(rule: CompiledRule, subj: Subject) -> bool:
    for matches, no_matches in rule:
        if no_matches:
            continue
        if not any(all(check(subj) for check in match) for match in matches):
            return False
    return True


# -- compilation ------------------------------------------------------------------------------

_CACHE_LIMIT = 100_000
# id(policy) -> (policy, compiled). Holding the policy keeps its id from being reused.
_cache: dict[int, tuple[Authorization, CompiledPolicy]] = {}


def compiled(policy: Authorization) -> CompiledPolicy:
    """The compiled form of ``policy``, cached by identity (bounded)."""
    hit = _cache.get(id(policy))
    if hit is not None and hit[0] is policy:
        return hit[1]
    result = CompiledPolicy(
        policy, tuple(_compile_rule(r) for r in policy.rules), _policy_ports(policy)
    )
    if len(_cache) >= _CACHE_LIMIT:
        _cache.clear()
    _cache[id(policy)] = (policy, result)
    return result


def _compile_rule(rule: Rule) -> CompiledRule:
    return tuple(
        (tuple(compile_match(m) for m in clause if not m.is_empty()), not clause) for clause in rule
    )


def compile_match(m: Match) -> CompiledMatch:
    """Checks for one Match, cheapest first."""
    checks: list[Check] = []
    if m.destination_ports:
        ports = frozenset(m.destination_ports)
        checks.append(lambda s: s.port in ports)
    if m.not_destination_ports:
        not_ports = frozenset(m.not_destination_ports)
        checks.append(lambda s: s.port not in not_ports)
    _add_ip_checks(checks, m.source_ips, m.not_source_ips, lambda s: s.src)
    _add_ip_checks(checks, m.destination_ips, m.not_destination_ips, lambda s: s.dst)
    _add_string_checks(checks, m.namespaces, m.not_namespaces, namespace_matches)
    _add_string_checks(checks, m.principals, m.not_principals, principal_matches)
    if m.service_accounts:
        sas = tuple(m.service_accounts)
        checks.append(lambda s: any(sa_matches(sa, s.identity) for sa in sas))
    if m.not_service_accounts:
        not_sas = tuple(m.not_service_accounts)
        checks.append(lambda s: not any(sa_matches(sa, s.identity) for sa in not_sas))
    return tuple(checks)


def _add_ip_checks(
    checks: list[Check],
    positive: Sequence[IPNetwork],
    negative: Sequence[IPNetwork],
    pick: Callable[[Subject], tuple[int, int]],
) -> None:
    if positive:
        nets = tuple(_net_key(n) for n in positive)
        checks.append(lambda s: _in_any(pick(s), nets))
    if negative:
        not_nets = tuple(_net_key(n) for n in negative)
        checks.append(lambda s: not _in_any(pick(s), not_nets))


def _add_string_checks(
    checks: list[Check],
    positive: Sequence[StringMatch],
    negative: Sequence[StringMatch],
    test: Callable[[StringMatch, Subject], bool],
) -> None:
    if positive:
        pos = tuple(positive)
        checks.append(lambda s: any(test(sm, s) for sm in pos))
    if negative:
        neg = tuple(negative)
        checks.append(lambda s: not any(test(sm, s) for sm in neg))


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
