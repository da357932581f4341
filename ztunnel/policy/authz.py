"""Istio ``AuthorizationPolicy`` → ztunnel ``Authorization`` (``convertAuthorizationPolicy``).

Each ``to``, ``from`` and ``when`` of a rule becomes one clause, in that order.
L7 attributes cannot be enforced by ztunnel: in an ALLOW rule the whole rule is
dropped (more restrictive); in a DENY rule only the L7 fields are dropped, which
can leave empty matches that ztunnel skips, so such a DENY may become a no-op.
Every such case produces istiod's status text as a warning.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ztunnel.model.authorization import Action, Authorization, Clause, Match, Rule, Scope
from ztunnel.policy._fields import (
    Where,
    parse_go_bool,
    service_account_matches,
    string_matches,
)

DRY_RUN_ANNOTATION = "istio.io/dry-run"

_L4_SOURCE = frozenset(
    {
        "principals",
        "notPrincipals",
        "namespaces",
        "notNamespaces",
        "ipBlocks",
        "notIpBlocks",
        "serviceAccounts",
        "notServiceAccounts",
    }
)
_L7_SOURCE = (
    "remoteIpBlocks",
    "notRemoteIpBlocks",
    "requestPrincipals",
    "notRequestPrincipals",
    "trustDomains",
    "notTrustDomains",
)
_L7_OPERATION = ("hosts", "notHosts", "methods", "notMethods", "paths", "notPaths")
_L4_WHEN = frozenset(
    {"source.ip", "source.namespace", "source.principal", "destination.ip", "destination.port"}
)
_RULE_KEYS = frozenset({"from", "to", "when"})
_SPEC_KEYS = frozenset({"selector", "action", "rules", "provider", "targetRef", "targetRefs"})

_HTTP_FMT = (
    "ztunnel does not support HTTP attributes (found: {found}). "
    "In ambient mode you must use a waypoint proxy to enforce HTTP rules. {tail}"
)
_DENY_NO_EFFECT = (
    "After omitting unsupported HTTP attributes, this DENY policy has no enforceable rules at "
    "ztunnel and will have no effect. Deploy a waypoint proxy and use a targetRef to enforce "
    "this policy."
)
_DENY_MIXED = (
    "DENY policy with HTTP attributes is enforced without the HTTP rules. "
    "This will be more restrictive than requested."
)
_ALLOW_DROPPED = (
    "Within an ALLOW policy, rules matching HTTP attributes are omitted. "
    "This will be more restrictive than requested."
)


@dataclass(frozen=True, slots=True)
class ConvertedAuthz:
    authorization: Authorization
    selector: Mapping[str, str] | None
    warnings: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Unsupported:
    """The policy is valid Istio but not for ztunnel (AUDIT/CUSTOM action, targetRefs)."""

    message: str


def convert_authorization_policy(
    doc: Mapping[str, Any], name: str, namespace: str, root_namespace: str, where: Where
) -> ConvertedAuthz | Unsupported:
    spec = where.mapping(doc.get("spec"), "spec")
    where.known_keys(spec, "spec", _SPEC_KEYS)
    if spec.get("targetRef") or spec.get("targetRefs"):
        return Unsupported("targetRef(s) bind the policy to a waypoint, not to ztunnel; skipped")
    action = _action(spec.get("action"), where)
    if isinstance(action, Unsupported):
        return action
    selector = _selector(spec, where)
    scope = _scope(selector, namespace, root_namespace)
    dry_run, dry_warning = _dry_run(doc, where)
    rules: list[Rule] = []
    l7_found: set[str] = set()
    for i, raw in enumerate(where.sequence(spec.get("rules"), "spec.rules")):
        rule, found = _rule(raw, f"spec.rules[{i}]", namespace, where)
        l7_found |= found
        if not (found and action is Action.ALLOW):
            rules.append(rule)
    authz = Authorization(name, namespace, scope, action, tuple(rules), dry_run)
    warnings = [w for w in (dry_warning, _l7_warning(action, tuple(rules), l7_found)) if w]
    return ConvertedAuthz(authz, selector, tuple(warnings))


def _action(value: Any, where: Where) -> Action | Unsupported:
    if value is None or value == "ALLOW":
        return Action.ALLOW
    if value == "DENY":
        return Action.DENY
    if value in ("AUDIT", "CUSTOM"):
        return Unsupported(f"ztunnel does not support the {value} action")
    raise where.fail("spec.action", f"{value!r} is not one of ALLOW, DENY, AUDIT, CUSTOM")


def _selector(spec: Mapping[str, Any], where: Where) -> dict[str, str] | None:
    if "selector" not in spec or spec["selector"] is None:
        return None
    selector = where.mapping(spec["selector"], "spec.selector")
    labels = where.mapping(selector.get("matchLabels"), "spec.selector.matchLabels")
    for key, value in labels.items():
        if not isinstance(value, str):
            raise where.fail(f"spec.selector.matchLabels.{key}", "label values must be strings")
    return dict(labels)


def _scope(selector: Mapping[str, str] | None, namespace: str, root_namespace: str) -> Scope:
    if selector is not None:
        return Scope.WORKLOAD_SELECTOR
    return Scope.GLOBAL if namespace == root_namespace else Scope.NAMESPACE


def _dry_run(doc: Mapping[str, Any], where: Where) -> tuple[bool, str | None]:
    metadata = where.mapping(doc.get("metadata"), "metadata")
    annotations = where.mapping(metadata.get("annotations"), "metadata.annotations")
    raw = annotations.get(DRY_RUN_ANNOTATION)
    if raw is None or raw == "":
        return False, None
    parsed = parse_go_bool(str(raw))
    if parsed is None:
        # istiod logs the parse error and enforces the policy.
        return False, f"cannot parse {DRY_RUN_ANNOTATION}={raw!r}; the policy is enforced"
    return parsed, None


def _rule(raw: Any, path: str, namespace: str, where: Where) -> tuple[Rule, set[str]]:
    rule = where.mapping(raw, path)
    where.known_keys(rule, path, _RULE_KEYS)
    l7: set[str] = set()
    clauses: list[Clause] = []
    to = [_operation(op, f"{path}.to[{i}]", l7, where) for i, op in _items(rule, "to", path, where)]
    if to:
        clauses.append(tuple(to))
    src = [
        _source(s, f"{path}.from[{i}]", namespace, l7, where)
        for i, s in _items(rule, "from", path, where)
    ]
    if src:
        clauses.append(tuple(src))
    for i, cond in _items(rule, "when", path, where):
        clauses.append((_when(cond, f"{path}.when[{i}]", l7, where),))
    return tuple(clauses), l7


def _items(rule: Mapping[str, Any], key: str, path: str, where: Where) -> list[tuple[int, Any]]:
    return list(enumerate(where.sequence(rule.get(key), f"{path}.{key}")))


def _operation(raw: Any, path: str, l7: set[str], where: Where) -> Match:
    entry = where.mapping(raw, path)
    where.known_keys(entry, path, frozenset({"operation"}))
    op = where.mapping(entry.get("operation"), f"{path}.operation")
    if not op:
        raise where.fail(f"{path}.operation", "must not be empty")
    path = f"{path}.operation"
    where.known_keys(op, path, frozenset({"ports", "notPorts", *_L7_OPERATION}))
    l7.update(k for k in _L7_OPERATION if op.get(k))
    return Match(
        destination_ports=where.ports(op.get("ports"), f"{path}.ports"),
        not_destination_ports=where.ports(op.get("notPorts"), f"{path}.notPorts"),
    )


def _source(raw: Any, path: str, namespace: str, l7: set[str], where: Where) -> Match:
    entry = where.mapping(raw, path)
    where.known_keys(entry, path, frozenset({"source"}))
    src = where.mapping(entry.get("source"), f"{path}.source")
    if not src:
        raise where.fail(f"{path}.source", "must not be empty")
    path = f"{path}.source"
    where.known_keys(src, path, _L4_SOURCE | frozenset(_L7_SOURCE))
    l7.update(k for k in _L7_SOURCE if src.get(k))

    def strs(key: str) -> list[str]:
        return where.strings(src.get(key), f"{path}.{key}")

    return Match(
        namespaces=string_matches(strs("namespaces")),
        not_namespaces=string_matches(strs("notNamespaces")),
        service_accounts=service_account_matches(strs("serviceAccounts"), namespace),
        not_service_accounts=service_account_matches(strs("notServiceAccounts"), namespace),
        principals=string_matches(strs("principals")),
        not_principals=string_matches(strs("notPrincipals")),
        source_ips=where.networks(src.get("ipBlocks"), f"{path}.ipBlocks"),
        not_source_ips=where.networks(src.get("notIpBlocks"), f"{path}.notIpBlocks"),
    )


def _when(raw: Any, path: str, l7: set[str], where: Where) -> Match:
    cond = where.mapping(raw, path)
    where.known_keys(cond, path, frozenset({"key", "values", "notValues"}))
    key = cond.get("key")
    if not isinstance(key, str) or not key:
        raise where.fail(f"{path}.key", "must be a non-empty string")
    if key not in _L4_WHEN:
        l7.add(key)
        return Match()  # emitted empty, as istiod does; ztunnel skips it
    values = where.strings(cond.get("values"), f"{path}.values")
    not_values = where.strings(cond.get("notValues"), f"{path}.notValues")
    return _when_match(key, values, not_values, path, where)


def _when_match(
    key: str, values: list[str], not_values: list[str], path: str, where: Where
) -> Match:
    if key == "source.namespace":
        return Match(namespaces=string_matches(values), not_namespaces=string_matches(not_values))
    if key == "source.principal":
        return Match(principals=string_matches(values), not_principals=string_matches(not_values))
    if key == "source.ip":
        return Match(
            source_ips=where.networks(values, f"{path}.values"),
            not_source_ips=where.networks(not_values, f"{path}.notValues"),
        )
    if key == "destination.ip":
        return Match(
            destination_ips=where.networks(values, f"{path}.values"),
            not_destination_ips=where.networks(not_values, f"{path}.notValues"),
        )
    return Match(
        destination_ports=where.ports(values, f"{path}.values"),
        not_destination_ports=where.ports(not_values, f"{path}.notValues"),
    )


def _l7_warning(action: Action, rules: tuple[Rule, ...], found: set[str]) -> str | None:
    if not found:
        return None
    if action is Action.ALLOW:
        tail = _ALLOW_DROPPED
    elif not has_effective_rules(rules):
        tail = _DENY_NO_EFFECT
    else:
        tail = _DENY_MIXED
    return _HTTP_FMT.format(found=", ".join(sorted(found)), tail=tail)


def has_effective_rules(rules: tuple[Rule, ...]) -> bool:
    """Whether some rule can ever match (istiod ``hasEffectiveRules``)."""
    return any(all(any(not m.is_empty() for m in clause) for clause in rule) for rule in rules)
