"""Why a policy did not match a connection, in words an operator can act on.

Only used off the hot path (explaining a denial), so it re-walks the plain
model instead of the compiled form and reports the *first* failing field of
each match, e.g. ``rule 0 clause 1: source principal 'cluster.local/ns/a/sa/b'
not in [Exact 'cluster.local/ns/x/sa/y']``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from ztunnel.model.authorization import Authorization, Clause, Match, StringMatch
from ztunnel.model.workload import IPAddress, IPNetwork
from ztunnel.policy.match import (
    ConnectionAttrs,
    Subject,
    compile_match,
    describe_string_match,
    ip_in_any,
    namespace_matches,
    principal_matches,
    sa_matches,
)


def describe_mismatch(policy: Authorization, conn: ConnectionAttrs) -> tuple[str, ...]:
    """One line per rule saying why it failed; a single line when there are no rules."""
    if not policy.rules:
        return ("policy has no rules, so it never matches",)
    subj = Subject.of(conn)
    lines = []
    for r, rule in enumerate(policy.rules):
        for c, clause in enumerate(rule):
            why = _clause_failure(clause, subj, conn)
            if why is not None:
                lines.append(f"rule {r} clause {c}: {why}")
                break
        else:
            lines.append(f"rule {r}: matches")
    return tuple(lines)


def _clause_failure(clause: Clause, subj: Subject, conn: ConnectionAttrs) -> str | None:
    if not clause:
        return None
    live = [m for m in clause if not m.is_empty()]
    if not live:
        return "every match is empty, and empty matches never match"
    reasons = []
    for m in live:
        if all(check(subj) for check in compile_match(m)):
            return None
        reasons.append(_match_failure(m, subj, conn))
    if len(reasons) == 1:
        return reasons[0]
    return "; ".join(f"match {i}: {why}" for i, why in enumerate(reasons))


def _match_failure(m: Match, subj: Subject, conn: ConnectionAttrs) -> str:
    for describe in _FIELD_DESCRIBERS:
        why = describe(m, subj, conn)
        if why is not None:
            return why
    return "no field failed (inconsistent match)"  # unreachable when called on a failing match


def _ports(m: Match, subj: Subject, conn: ConnectionAttrs) -> str | None:
    port = conn.dst_port
    if m.destination_ports and port not in m.destination_ports:
        return f"destination port {port} not in {list(m.destination_ports)}"
    if port in m.not_destination_ports:
        return f"destination port {port} in notDestinationPorts {list(m.not_destination_ports)}"
    return None


def _ips(
    label: str, ip: IPAddress, pos: Sequence[IPNetwork], neg: Sequence[IPNetwork]
) -> str | None:
    if pos and not ip_in_any(ip, pos):
        return f"{label} {ip} not in [{_nets(pos)}]"
    if neg and ip_in_any(ip, neg):
        return f"{label} {ip} in not-list [{_nets(neg)}]"
    return None


def _src_ips(m: Match, subj: Subject, conn: ConnectionAttrs) -> str | None:
    return _ips("source ip", conn.src_ip, m.source_ips, m.not_source_ips)


def _dst_ips(m: Match, subj: Subject, conn: ConnectionAttrs) -> str | None:
    return _ips("destination ip", conn.dst_ip, m.destination_ips, m.not_destination_ips)


def _strings(
    label: str,
    shown: str,
    pos: Sequence[StringMatch],
    neg: Sequence[StringMatch],
    test: Callable[[StringMatch], bool],
) -> str | None:
    if pos and not any(test(sm) for sm in pos):
        return f"{label} {shown} not in [{_smatches(pos)}]"
    if neg and any(test(sm) for sm in neg):
        return f"{label} {shown} matches not-list [{_smatches(neg)}]"
    return None


def _namespaces(m: Match, subj: Subject, conn: ConnectionAttrs) -> str | None:
    return _strings(
        "source namespace",
        repr(subj.namespace) if subj.identity else "'' (no mTLS identity)",
        m.namespaces,
        m.not_namespaces,
        lambda sm: namespace_matches(sm, subj),
    )


def _principals(m: Match, subj: Subject, conn: ConnectionAttrs) -> str | None:
    return _strings(
        "source principal",
        repr(subj.principal) if subj.principal is not None else "(none: no mTLS identity)",
        m.principals,
        m.not_principals,
        lambda sm: principal_matches(sm, subj),
    )


def _service_accounts(m: Match, subj: Subject, conn: ConnectionAttrs) -> str | None:
    ident = subj.identity
    shown = f"'{ident.namespace}/{ident.service_account}'" if ident else "(none: no mTLS identity)"
    if m.service_accounts and not any(sa_matches(sa, ident) for sa in m.service_accounts):
        listed = ", ".join(f"{sa.namespace}/{sa.service_account}" for sa in m.service_accounts)
        return f"source service account {shown} not in [{listed}]"
    if any(sa_matches(sa, ident) for sa in m.not_service_accounts):
        listed = ", ".join(f"{sa.namespace}/{sa.service_account}" for sa in m.not_service_accounts)
        return f"source service account {shown} in not-list [{listed}]"
    return None


_FIELD_DESCRIBERS: tuple[Callable[[Match, Subject, ConnectionAttrs], str | None], ...] = (
    _ports,
    _src_ips,
    _dst_ips,
    _namespaces,
    _principals,
    _service_accounts,
)


def _nets(nets: Sequence[IPNetwork]) -> str:
    return ", ".join(str(n) for n in nets)


def _smatches(matches: Sequence[StringMatch]) -> str:
    return ", ".join(describe_string_match(sm) for sm in matches)
