"""What the L4 (``rbac``) and L7 (``l7``) evaluators share: the log message of each outcome
and how a decision is explained to a person (``explain``) and to a machine (findings JSON).

The two evaluators decide over different policies and attributes, but an operator reads
their answers side by side (``ztunnel explain``, the waypoint's ``/debug/authz``): the same
outcome must read the same, so the rendering exists once.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Sequence
from typing import Any, Protocol

# How many failed ALLOW policies an explanation spells out before summarising.
EXPLAIN_LIMIT = 20

# ztunnel's log message per outcome (by the reason's value, shared by L4 and L7 reasons).
MESSAGES = {
    "NoPolicies": "no policies, allow",
    "NoAllowPolicies": "no allow policies, allow",
    "AllowMatched": "allow policy match",
    "CustomDenied": "custom policy match without an extension provider, deny",
    "ExplicitlyDenied": "deny policy match",
    "NotAllowed": "no allow policies matched",
}


class Finding(Protocol):
    """A dry-run (or AUDIT) policy's would-be outcome; ``policy`` None: none matched."""

    @property
    def message(self) -> str: ...
    @property
    def action(self) -> enum.Enum: ...
    @property
    def policy(self) -> str | None: ...
    @property
    def rule(self) -> int | None: ...


def explanation(
    *,
    allowed: bool,
    reason: enum.Enum,
    subject: str | None,
    policy: str | None,
    rule: int | None,
    findings: Iterable[Finding],
    mismatches: Sequence[tuple[str, Sequence[str]]],
) -> str:
    """Multi-line text: the verdict, what it was about (``subject``, e.g. ``connection: ...``),
    what decided it, the findings, and why each failed ALLOW policy did not match (the
    first EXPLAIN_LIMIT; pass none unless the reason is NotAllowed)."""
    verdict = "ALLOW" if allowed else "DENY"
    lines = [f"{verdict}: {MESSAGES[reason.value]} ({reason.value})"]
    if subject is not None:
        lines.append(f"  {subject}")
    if policy is not None:
        lines.append(f"  decided by policy {policy} rule {rule}")
    for f in findings:
        where = f" {f.policy} rule {f.rule}" if f.policy else ""
        lines.append(f"  {f.message}{where}")
    for key, reasons in mismatches[:EXPLAIN_LIMIT]:
        lines.append(f"  allow policy {key} did not match:")
        lines.extend(f"    {why}" for why in reasons)
    if len(mismatches) > EXPLAIN_LIMIT:
        lines.append(f"  ... and {len(mismatches) - EXPLAIN_LIMIT} more allow policies")
    return "\n".join(lines)


def finding_json(f: Finding) -> dict[str, Any]:
    return {"message": f.message, "action": f.action.value, "policy": f.policy, "rule": f.rule}
