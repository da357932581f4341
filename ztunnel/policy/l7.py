"""L7 authorization decisions in a waypoint (Envoy RBAC as istiod configures it).

Order, for the policies bound to the request (``l7model.applies``):

1. CUSTOM policies: this waypoint has no ext_authz provider, and istiod, when a
   CUSTOM policy's provider is missing, generates a DENY for its rules
   ("will generate deny configs"), so a matching CUSTOM denies
   (``CUSTOM_DENIED``);
2. dry-run DENY policies that match are recorded only; any enforced DENY that
   matches denies (``EXPLICITLY_DENIED``);
3. dry-run ALLOW policies are recorded only; no enforced ALLOW policy allows;
   any enforced ALLOW that matches allows; otherwise deny (``NOT_ALLOWED``).

AUDIT policies never change the decision (there is no audit sink); a match is
recorded as a finding. Conditions this evaluation cannot read (HTTP attributes
of a plain TCP stream, unsupported ``when`` keys) follow istiod's error rule:
in an ALLOW rule the whole rule never matches, in any other action the
condition is dropped, so the rule matches more, never less.

A denied HTTP request is answered ``403`` with Envoy's body ``RBAC: access
denied``; a denied TCP stream is closed.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from ztunnel.policy.l7match import RequestAttrs, compile_condition, observed
from ztunnel.policy.l7model import (
    HTTP_ONLY,
    Attr,
    Clause,
    Condition,
    L7Action,
    L7Policy,
    L7Rule,
)
from ztunnel.policy.verdict import MESSAGES, explanation, finding_json

__all__ = [
    "DENY_BODY",
    "DENY_STATUS",
    "L7Decision",
    "L7Finding",
    "L7Reason",
    "decision_to_json",
    "evaluate",
    "explain",
    "rule_matches",
]

DENY_STATUS = 403
DENY_BODY = b"RBAC: access denied"


class L7Reason(enum.Enum):
    NO_POLICIES = "NoPolicies"
    NO_ALLOW_POLICIES = "NoAllowPolicies"
    ALLOW_MATCHED = "AllowMatched"
    CUSTOM_DENIED = "CustomDenied"
    EXPLICITLY_DENIED = "ExplicitlyDenied"
    NOT_ALLOWED = "NotAllowed"


@dataclass(frozen=True, slots=True)
class L7Finding:
    """A dry-run or AUDIT policy that matched (``policy`` None: no dry-run ALLOW matched)."""

    message: str
    action: L7Action
    policy: str | None = None
    rule: int | None = None


@dataclass(frozen=True)
class L7Decision:
    allowed: bool
    reason: L7Reason
    policy: str | None = None
    rule: int | None = None
    findings: tuple[L7Finding, ...] = ()
    attrs: RequestAttrs | None = field(default=None, compare=False)
    failed_allow: tuple[L7Policy, ...] = field(default=(), repr=False, compare=False)

    @property
    def message(self) -> str:
        return MESSAGES[self.reason.value]

    @cached_property
    def mismatches(self) -> tuple[tuple[str, tuple[str, ...]], ...]:
        """For NOT_ALLOWED: (policy key, one line per rule saying why it failed)."""
        if self.attrs is None:
            return ()
        attrs = self.attrs
        return tuple((p.key, describe_mismatch(p, attrs)) for p in self.failed_allow)


# -- matching ----------------------------------------------------------------------------------


class _Never(Exception):
    """An ALLOW rule holds a condition that cannot be evaluated: it never matches."""


def _unreadable(cond: Condition, attrs: RequestAttrs) -> bool:
    return cond.attr is Attr.UNSUPPORTED or (not attrs.http and cond.attr in HTTP_ONLY)


def _holds(cond: Condition, attrs: RequestAttrs, policy: L7Policy) -> bool:
    if _unreadable(cond, attrs):
        if policy.action is L7Action.ALLOW:
            raise _Never
        return True  # dropped: istiod ignores the error outside ALLOW
    check = compile_condition(cond, policy.namespace)
    assert check is not None
    return check(attrs)


def _clause_holds(clause: Clause, attrs: RequestAttrs, policy: L7Policy) -> bool:
    # Evaluate every condition (not short-circuit) so an unreadable one in an ALLOW
    # rule always drops the rule, as istiod drops it at generation time.
    results = [_holds(c, attrs, policy) for c in clause]
    return all(results)


def _any_clause(clauses: tuple[Clause, ...], attrs: RequestAttrs, policy: L7Policy) -> bool:
    if not clauses:
        return True
    results = [_clause_holds(c, attrs, policy) for c in clauses]
    return any(results)


def rule_matches(rule: L7Rule, attrs: RequestAttrs, policy: L7Policy) -> bool:
    try:
        when = _clause_holds(rule.when, attrs, policy)
        sources = _any_clause(rule.sources, attrs, policy)
        operations = _any_clause(rule.operations, attrs, policy)
    except _Never:
        return False
    return when and sources and operations


def _first_rule(policy: L7Policy, attrs: RequestAttrs) -> int | None:
    for index, rule in enumerate(policy.rules):
        if rule_matches(rule, attrs, policy):
            return index
    return None


def _first_match(policies: list[L7Policy], attrs: RequestAttrs) -> tuple[str, int] | None:
    for policy in policies:
        rule = _first_rule(policy, attrs)
        if rule is not None:
            return policy.key, rule
    return None


# -- evaluation ---------------------------------------------------------------------------------


@dataclass
class _Sorted:
    custom: list[L7Policy] = field(default_factory=list)
    dry_custom: list[L7Policy] = field(default_factory=list)
    deny: list[L7Policy] = field(default_factory=list)
    dry_deny: list[L7Policy] = field(default_factory=list)
    allow: list[L7Policy] = field(default_factory=list)
    dry_allow: list[L7Policy] = field(default_factory=list)
    audit: list[L7Policy] = field(default_factory=list)

    @classmethod
    def of(cls, policies: Iterable[L7Policy]) -> _Sorted:
        out = cls()
        for p in policies:
            if p.action is L7Action.AUDIT:
                out.audit.append(p)
                continue
            bucket = {
                L7Action.CUSTOM: (out.custom, out.dry_custom),
                L7Action.DENY: (out.deny, out.dry_deny),
                L7Action.ALLOW: (out.allow, out.dry_allow),
            }[p.action]
            bucket[1 if p.dry_run else 0].append(p)
        return out

    @property
    def empty(self) -> bool:
        return not any(
            (self.custom, self.dry_custom, self.deny, self.dry_deny, self.allow, self.dry_allow)
        )


def _findings(policies: list[L7Policy], attrs: RequestAttrs, what: str) -> list[L7Finding]:
    found = []
    for p in policies:
        rule = _first_rule(p, attrs)
        if rule is not None:
            found.append(L7Finding(f"{what} policy match", p.action, p.key, rule))
    return found


def evaluate(policies: Iterable[L7Policy], attrs: RequestAttrs) -> L7Decision:
    """Decide whether the request (or TCP stream) described by ``attrs`` may pass."""
    s = _Sorted.of(policies)
    findings = _findings(s.audit, attrs, "audit (no effect)")
    findings += _findings(s.dry_custom, attrs, "dry-run: custom")
    hit = _first_match(s.custom, attrs)
    if hit is not None:
        return L7Decision(False, L7Reason.CUSTOM_DENIED, *hit, tuple(findings), attrs)
    findings += _findings(s.dry_deny, attrs, "dry-run: deny")
    hit = _first_match(s.deny, attrs)
    if hit is not None:
        return L7Decision(False, L7Reason.EXPLICITLY_DENIED, *hit, tuple(findings), attrs)
    if s.dry_allow:
        dry = _first_match(s.dry_allow, attrs)
        if dry is None:
            findings.append(L7Finding("dry-run: no allow policies match", L7Action.ALLOW))
        else:
            findings.append(L7Finding("dry-run: allow policy match", L7Action.ALLOW, *dry))
    if not s.allow:
        reason = L7Reason.NO_POLICIES if s.empty else L7Reason.NO_ALLOW_POLICIES
        return L7Decision(True, reason, findings=tuple(findings), attrs=attrs)
    hit = _first_match(s.allow, attrs)
    if hit is not None:
        return L7Decision(True, L7Reason.ALLOW_MATCHED, *hit, tuple(findings), attrs)
    return L7Decision(
        False, L7Reason.NOT_ALLOWED, None, None, tuple(findings), attrs, tuple(s.allow)
    )


# -- explanations ------------------------------------------------------------------------------


def _quote(values: tuple[str, ...]) -> str:
    return "[" + ", ".join(repr(v) for v in values) + "]"


def _condition_failure(cond: Condition, attrs: RequestAttrs, policy: L7Policy) -> str | None:
    if _unreadable(cond, attrs):
        why = "unsupported" if cond.attr is Attr.UNSUPPORTED else "HTTP-only, this is TCP"
        return f"{cond.where}: {why}, so the rule never matches"
    check = compile_condition(cond, policy.namespace)
    if check is None or check(attrs):
        return None
    seen = observed(cond, attrs)
    only_positive = Condition(cond.attr, cond.where, cond.values, (), cond.arg)
    positive = compile_condition(only_positive, policy.namespace)
    if cond.values and positive is not None and not positive(attrs):
        return f"{cond.where}: {seen!r} not in {_quote(cond.values)}"
    return f"{cond.where}: {seen!r} matches a not-value {_quote(cond.not_values)}"


def _clause_failure(clause: Clause, attrs: RequestAttrs, policy: L7Policy) -> str | None:
    for cond in clause:
        why = _condition_failure(cond, attrs, policy)
        if why is not None:
            return why
    return None


def _any_failure(clauses: tuple[Clause, ...], attrs: RequestAttrs, policy: L7Policy) -> str | None:
    reasons = []
    for clause in clauses:
        why = _clause_failure(clause, attrs, policy)
        if why is None:
            return None
        reasons.append(why)
    return "; ".join(reasons) if reasons else None


def describe_mismatch(policy: L7Policy, attrs: RequestAttrs) -> tuple[str, ...]:
    """One line per rule of an ALLOW policy saying why it did not match."""
    if not policy.rules:
        return ("policy has no rules, so it never matches",)
    lines = []
    for index, rule in enumerate(policy.rules):
        why = (
            _clause_failure(rule.when, attrs, policy)
            or _any_failure(rule.sources, attrs, policy)
            or _any_failure(rule.operations, attrs, policy)
        )
        lines.append(f"rule {index}: {why}" if why else f"rule {index}: matches")
    return tuple(lines)


def describe_request(attrs: RequestAttrs) -> str:
    ident = str(attrs.src_identity) if attrs.src_identity is not None else "no identity"
    if not attrs.http:
        return f"tcp from {attrs.src_ip} ({ident}) to port {attrs.dst_port}"
    return (
        f"{attrs.method} {attrs.host}{attrs.url_path} from {attrs.src_ip} ({ident}) "
        f"to port {attrs.dst_port}"
    )


def explain(decision: L7Decision) -> str:
    """Multi-line text: verdict, deciding policy and rule, findings, ALLOW mismatches."""
    attrs = decision.attrs
    return explanation(
        allowed=decision.allowed,
        reason=decision.reason,
        subject=f"request: {describe_request(attrs)}" if attrs is not None else None,
        policy=decision.policy,
        rule=decision.rule,
        findings=decision.findings,
        mismatches=decision.mismatches if decision.reason is L7Reason.NOT_ALLOWED else (),
    )


def decision_to_json(decision: L7Decision) -> dict[str, Any]:
    out: dict[str, Any] = {
        "allowed": decision.allowed,
        "reason": decision.reason.value,
        "message": decision.message,
        "policy": decision.policy,
        "rule": decision.rule,
        "findings": [finding_json(f) for f in decision.findings],
    }
    if decision.attrs is not None:
        out["request"] = describe_request(decision.attrs)
    if decision.reason is L7Reason.NOT_ALLOWED:
        out["allowPolicyMismatches"] = [
            {"policy": key, "reasons": list(reasons)} for key, reasons in decision.mismatches
        ]
    return out
