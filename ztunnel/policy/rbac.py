"""L4 authorization decisions (ztunnel ``DemandProxyState::assert_rbac``).

Order, for the policies that apply to the destination workload:

1. dry-run DENY policies that match are recorded only;
2. any enforced DENY that matches denies (``EXPLICITLY_DENIED``);
3. dry-run ALLOW policies are recorded only (match, or "no allow policies match");
4. no enforced ALLOW policy at all allows (``NO_POLICIES`` / ``NO_ALLOW_POLICIES``);
5. any enforced ALLOW that matches allows (``ALLOW_MATCHED``);
6. otherwise deny (``NOT_ALLOWED``).

The first matching policy in the given order decides, and its rule index is
kept. Why each ALLOW policy failed is computed lazily, only when asked for.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from ztunnel.model.authorization import Action, Authorization
from ztunnel.policy.match import (
    CompiledPolicy,
    ConnectionAttrs,
    Subject,
    compiled,
    policy_matches,
)
from ztunnel.policy.mismatch import describe_mismatch
from ztunnel.policy.verdict import MESSAGES, explanation, finding_json

__all__ = [
    "ConnectionAttrs",
    "Decision",
    "DryRunFinding",
    "PolicyMismatch",
    "Reason",
    "decision_to_json",
    "evaluate",
    "explain",
    "policy_matches",
]


class Reason(enum.Enum):
    NO_POLICIES = "NoPolicies"  # nothing applies to the destination
    NO_ALLOW_POLICIES = "NoAllowPolicies"  # policies apply, none is an enforced ALLOW
    ALLOW_MATCHED = "AllowMatched"
    EXPLICITLY_DENIED = "ExplicitlyDenied"
    NOT_ALLOWED = "NotAllowed"


@dataclass(frozen=True, slots=True)
class DryRunFinding:
    """What a dry-run policy would have done; ``policy`` is None for "no allow matched"."""

    message: str
    action: Action
    policy: str | None = None
    rule: int | None = None


@dataclass(frozen=True, slots=True)
class PolicyMismatch:
    policy: str
    reasons: tuple[str, ...]


@dataclass(frozen=True)
class Decision:
    allowed: bool
    reason: Reason
    policy: str | None = None  # "namespace/name" of the deciding policy
    rule: int | None = None  # index of its matching rule
    dry_run: tuple[DryRunFinding, ...] = ()
    conn: ConnectionAttrs | None = field(default=None, compare=False)
    failed_allow: tuple[Authorization, ...] = field(default=(), repr=False, compare=False)

    @property
    def message(self) -> str:
        """ztunnel's log message for this outcome."""
        return MESSAGES[self.reason.value]

    @cached_property
    def mismatches(self) -> tuple[PolicyMismatch, ...]:
        """For a NOT_ALLOWED denial: why each enforced ALLOW policy did not match."""
        if self.conn is None:
            return ()
        conn = self.conn
        return tuple(PolicyMismatch(p.key, describe_mismatch(p, conn)) for p in self.failed_allow)


def evaluate(policies: Iterable[Authorization], conn: ConnectionAttrs) -> Decision:
    """Decide whether ``conn`` may reach the workload these ``policies`` apply to."""
    dry_deny: list[CompiledPolicy] = []
    deny: list[CompiledPolicy] = []
    dry_allow: list[CompiledPolicy] = []
    allows: list[CompiledPolicy] = []
    for policy in policies:
        cp = compiled(policy)
        if policy.action is Action.DENY:
            (dry_deny if policy.dry_run else deny).append(cp)
        else:
            (dry_allow if policy.dry_run else allows).append(cp)
    subj = Subject.of(conn)
    findings = _dry_run_denies(dry_deny, subj)
    denied = _first_match(deny, subj)
    if denied is not None:
        key, rule = denied
        return Decision(False, Reason.EXPLICITLY_DENIED, key, rule, findings, conn)
    findings += _dry_run_allows(dry_allow, subj)
    if not allows:
        empty = not (dry_deny or deny or dry_allow)
        reason = Reason.NO_POLICIES if empty else Reason.NO_ALLOW_POLICIES
        return Decision(True, reason, dry_run=findings, conn=conn)
    allowed = _first_match(allows, subj)
    if allowed is not None:
        key, rule = allowed
        return Decision(True, Reason.ALLOW_MATCHED, key, rule, findings, conn)
    failed = tuple(cp.policy for cp in allows)
    return Decision(False, Reason.NOT_ALLOWED, None, None, findings, conn, failed)


def _first_match(policies: list[CompiledPolicy], subj: Subject) -> tuple[str, int] | None:
    for cp in policies:
        rule = cp.first_matching_rule(subj)
        if rule is not None:
            return cp.policy.key, rule
    return None


def _dry_run_denies(policies: list[CompiledPolicy], subj: Subject) -> tuple[DryRunFinding, ...]:
    found = []
    for cp in policies:
        rule = cp.first_matching_rule(subj)
        if rule is not None:
            found.append(
                DryRunFinding("dry-run: deny policy match", Action.DENY, cp.policy.key, rule)
            )
    return tuple(found)


def _dry_run_allows(policies: list[CompiledPolicy], subj: Subject) -> tuple[DryRunFinding, ...]:
    if not policies:
        return ()
    matched = _first_match(policies, subj)
    if matched is None:
        return (DryRunFinding("dry-run: no allow policies match", Action.ALLOW),)
    key, rule = matched
    return (DryRunFinding("dry-run: allow policy match", Action.ALLOW, key, rule),)


def explain(decision: Decision) -> str:
    """Multi-line text: the verdict, what decided it, dry-run findings, and for a
    NOT_ALLOWED denial why each ALLOW policy failed (the first EXPLAIN_LIMIT)."""
    conn = decision.conn
    failed = decision.mismatches if decision.reason is Reason.NOT_ALLOWED else ()
    return explanation(
        allowed=decision.allowed,
        reason=decision.reason,
        subject=f"connection: {_describe_conn(conn)}" if conn is not None else None,
        policy=decision.policy,
        rule=decision.rule,
        findings=decision.dry_run,
        mismatches=[(m.policy, m.reasons) for m in failed],
    )


def decision_to_json(decision: Decision) -> dict[str, Any]:
    """A JSON-ready dict (for the admin endpoint and access logs)."""
    out: dict[str, Any] = {
        "allowed": decision.allowed,
        "reason": decision.reason.value,
        "message": decision.message,
        "policy": decision.policy,
        "rule": decision.rule,
        "dryRun": [finding_json(f) for f in decision.dry_run],
    }
    if decision.conn is not None:
        out["connection"] = _conn_json(decision.conn)
    if decision.reason is Reason.NOT_ALLOWED:
        out["allowPolicyMismatches"] = [
            {"policy": m.policy, "reasons": list(m.reasons)} for m in decision.mismatches
        ]
    return out


def _describe_conn(conn: ConnectionAttrs) -> str:
    ident = str(conn.src_identity) if conn.src_identity is not None else "no identity"
    return f"{conn.src_ip} ({ident}) -> {conn.dst_ip}:{conn.dst_port}"


def _conn_json(conn: ConnectionAttrs) -> dict[str, Any]:
    return {
        "srcIp": str(conn.src_ip),
        "dstIp": str(conn.dst_ip),
        "dstPort": conn.dst_port,
        "srcIdentity": str(conn.src_identity) if conn.src_identity is not None else None,
    }
