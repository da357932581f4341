"""Istio ``AuthorizationPolicy`` with ``targetRefs`` -> ``L7Policy`` (what a waypoint enforces).

Only policies bound with ``targetRef``/``targetRefs`` reach a waypoint; the rest
belong to the node agent (``policy.authz``) and are skipped here. Parsing is
strict, as istiod's validation webhook is: unknown fields, unknown ``when``
keys, bad CIDRs, ports or path templates raise ``PolicyTranslationError``
naming the field. Valid input this waypoint cannot honour exactly is *kept*
with a warning, never dropped silently:

* CUSTOM: no ext_authz provider exists here; like istiod with a missing
  provider, the policy's rules deny what they match;
* AUDIT: no audit sink, so the policy has no effect;
* ``requestPrincipals`` and ``request.auth.*``: no JWT is validated, so they are
  always absent (ALLOW rules on them never match);
* ``experimental.envoy.filters.*``: cannot be evaluated; istiod's error rule
  applies (an ALLOW rule never matches, elsewhere the condition is dropped);
* a ``ServiceEntry`` target: not supported, the reference is ignored.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from ipaddress import ip_network
from typing import Any

from ztunnel.policy._fields import PolicyTranslationError, Where, parse_go_bool
from ztunnel.policy.l7match import is_path_template
from ztunnel.policy.l7model import Attr, Clause, Condition, L7Action, L7Policy, L7Rule, TargetRef

__all__ = ["L7Translation", "convert_l7_policy", "translate_l7_documents"]

DRY_RUN_ANNOTATION = "istio.io/dry-run"
_API_VERSIONS = frozenset({"security.istio.io/v1", "security.istio.io/v1beta1"})
_SPEC_KEYS = frozenset({"selector", "action", "rules", "provider", "targetRef", "targetRefs"})
_GATEWAY_GROUP = "gateway.networking.k8s.io"

# Field name -> (attribute, positive?) for from[].source and to[].operation.
_SOURCE_FIELDS: dict[str, tuple[Attr, bool]] = {
    "principals": (Attr.SOURCE_PRINCIPAL, True),
    "notPrincipals": (Attr.SOURCE_PRINCIPAL, False),
    "requestPrincipals": (Attr.REQUEST_PRINCIPAL, True),
    "notRequestPrincipals": (Attr.REQUEST_PRINCIPAL, False),
    "namespaces": (Attr.SOURCE_NAMESPACE, True),
    "notNamespaces": (Attr.SOURCE_NAMESPACE, False),
    "ipBlocks": (Attr.SOURCE_IP, True),
    "notIpBlocks": (Attr.SOURCE_IP, False),
    "remoteIpBlocks": (Attr.REMOTE_IP, True),
    "notRemoteIpBlocks": (Attr.REMOTE_IP, False),
    "serviceAccounts": (Attr.SOURCE_SERVICE_ACCOUNT, True),
    "notServiceAccounts": (Attr.SOURCE_SERVICE_ACCOUNT, False),
    "trustDomains": (Attr.SOURCE_TRUST_DOMAIN, True),
    "notTrustDomains": (Attr.SOURCE_TRUST_DOMAIN, False),
}
_OPERATION_FIELDS: dict[str, tuple[Attr, bool]] = {
    "hosts": (Attr.HOST, True),
    "notHosts": (Attr.HOST, False),
    "ports": (Attr.DESTINATION_PORT, True),
    "notPorts": (Attr.DESTINATION_PORT, False),
    "methods": (Attr.METHOD, True),
    "notMethods": (Attr.METHOD, False),
    "paths": (Attr.PATH, True),
    "notPaths": (Attr.PATH, False),
}
_WHEN_KEYS: dict[str, Attr] = {
    "source.ip": Attr.SOURCE_IP,
    "remote.ip": Attr.REMOTE_IP,
    "source.namespace": Attr.SOURCE_NAMESPACE,
    "source.principal": Attr.SOURCE_PRINCIPAL,
    "source.serviceAccount": Attr.SOURCE_SERVICE_ACCOUNT,
    "source.trustDomain": Attr.SOURCE_TRUST_DOMAIN,
    "request.auth.principal": Attr.REQUEST_PRINCIPAL,
    "request.auth.audiences": Attr.REQUEST_AUDIENCE,
    "request.auth.presenter": Attr.REQUEST_PRESENTER,
    "destination.ip": Attr.DESTINATION_IP,
    "destination.port": Attr.DESTINATION_PORT,
    "connection.sni": Attr.CONNECTION_SNI,
}
_JWT_ATTRS = frozenset(
    {Attr.REQUEST_PRINCIPAL, Attr.REQUEST_CLAIM, Attr.REQUEST_AUDIENCE, Attr.REQUEST_PRESENTER}
)
_BRACKETED = re.compile(r"^(request\.headers|request\.auth\.claims)\[(.+)\]$")


@dataclass
class L7Translation:
    policies: list[L7Policy] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def extend(self, other: L7Translation) -> None:
        self.policies.extend(other.policies)
        self.warnings.extend(other.warnings)


def translate_l7_documents(docs: Iterable[Any], *, source: str = "<documents>") -> L7Translation:
    """Every ``AuthorizationPolicy`` with targetRefs among ``docs`` (others are skipped)."""
    result = L7Translation()
    for index, doc in enumerate(docs):
        if doc is None:
            continue
        where = Where(f"{source}: document {index}")
        if not isinstance(doc, Mapping):
            raise where.fail("", "a document must be a mapping")
        if doc.get("kind") != "AuthorizationPolicy" or doc.get("apiVersion") not in _API_VERSIONS:
            continue
        name, namespace = _identify(doc, where)
        where = Where(f"{source}: AuthorizationPolicy {namespace}/{name}")
        converted = convert_l7_policy(doc, name, namespace, where)
        if converted is not None:
            policy, warnings = converted
            result.policies.append(policy)
            result.warnings.extend(f"{where.source}: {w}" for w in warnings)
    return result


def _identify(doc: Mapping[str, Any], where: Where) -> tuple[str, str]:
    metadata = where.mapping(doc.get("metadata"), "metadata")
    name = metadata.get("name")
    if not isinstance(name, str) or not name:
        raise where.fail("metadata.name", "must be a non-empty string")
    namespace = metadata.get("namespace", "default")
    if not isinstance(namespace, str) or not namespace:
        raise where.fail("metadata.namespace", "must be a non-empty string")
    return name, namespace


def convert_l7_policy(
    doc: Mapping[str, Any], name: str, namespace: str, where: Where
) -> tuple[L7Policy, list[str]] | None:
    """(policy, warnings), or None when the policy has no targetRefs (the agent's, not ours)."""
    spec = where.mapping(doc.get("spec"), "spec")
    where.known_keys(spec, "spec", _SPEC_KEYS)
    if not (spec.get("targetRef") or spec.get("targetRefs")):
        return None
    if spec.get("selector"):
        raise where.fail("spec.selector", "a policy may not have both a selector and targetRefs")
    warnings: list[str] = []
    targets = _targets(spec, namespace, where, warnings)
    action, provider = _action(spec, where, warnings)
    dry_run = _dry_run(doc, where, warnings)
    rules = tuple(
        _rule(raw, f"spec.rules[{i}]", where, warnings)
        for i, raw in enumerate(where.sequence(spec.get("rules"), "spec.rules"))
    )
    policy = L7Policy(name, namespace, action, rules, targets, dry_run, provider)
    return policy, list(dict.fromkeys(warnings))


def _targets(
    spec: Mapping[str, Any], namespace: str, where: Where, warnings: list[str]
) -> tuple[TargetRef, ...]:
    raw: list[tuple[str, Any]] = []
    if spec.get("targetRef"):
        raw.append(("spec.targetRef", spec["targetRef"]))
    raw += [
        (f"spec.targetRefs[{i}]", r)
        for i, r in enumerate(where.sequence(spec.get("targetRefs"), "spec.targetRefs"))
    ]
    out = []
    for path, value in raw:
        ref = where.mapping(value, path)
        where.known_keys(ref, path, frozenset({"group", "kind", "name", "namespace"}))
        kind, name = ref.get("kind"), ref.get("name")
        group = ref.get("group", "")
        if not isinstance(kind, str) or not kind:
            raise where.fail(f"{path}.kind", "must be a non-empty string")
        if not isinstance(name, str) or not name:
            raise where.fail(f"{path}.name", "must be a non-empty string")
        if not isinstance(group, str):
            raise where.fail(f"{path}.group", "must be a string")
        ref_ns = ref.get("namespace") or namespace
        if ref_ns != namespace:
            raise where.fail(f"{path}.namespace", "cross-namespace targetRefs are not allowed")
        if kind == "ServiceEntry":
            warnings.append(f"{path}: ServiceEntry targets are not supported; reference ignored")
            continue
        expected = {"Service": ("", "core"), "Gateway": (_GATEWAY_GROUP,)}
        expected["GatewayClass"] = (_GATEWAY_GROUP,)
        if kind not in expected:
            raise where.fail(f"{path}.kind", f"{kind!r} is not Service, Gateway or GatewayClass")
        if group not in expected[kind]:
            raise where.fail(f"{path}.group", f"{group!r} is not the group of a {kind}")
        out.append(TargetRef(kind, name, namespace, group))
    return tuple(out)


def _action(spec: Mapping[str, Any], where: Where, warnings: list[str]) -> tuple[L7Action, str]:
    value = spec.get("action") or "ALLOW"
    try:
        action = L7Action(value)
    except ValueError:
        raise where.fail(
            "spec.action", f"{value!r} is not one of ALLOW, DENY, AUDIT, CUSTOM"
        ) from None
    provider = where.mapping(spec.get("provider"), "spec.provider")
    where.known_keys(provider, "spec.provider", frozenset({"name"}))
    name = provider.get("name", "")
    if action is L7Action.CUSTOM:
        if not isinstance(name, str) or not name:
            raise where.fail("spec.provider.name", "a CUSTOM policy needs a provider name")
        warnings.append(
            f"CUSTOM provider {name!r} is not available in this waypoint: requests matching "
            "the rules are denied (what istiod generates when the provider is missing)"
        )
    elif provider:
        raise where.fail("spec.provider", "only a CUSTOM policy may name a provider")
    if action is L7Action.AUDIT:
        warnings.append("AUDIT has no audit sink in this waypoint: the policy has no effect")
    return action, str(name)


def _dry_run(doc: Mapping[str, Any], where: Where, warnings: list[str]) -> bool:
    metadata = where.mapping(doc.get("metadata"), "metadata")
    annotations = where.mapping(metadata.get("annotations"), "metadata.annotations")
    raw = annotations.get(DRY_RUN_ANNOTATION)
    if raw is None or raw == "":
        return False
    parsed = parse_go_bool(str(raw))
    if parsed is None:
        warnings.append(f"cannot parse {DRY_RUN_ANNOTATION}={raw!r}; the policy is enforced")
        return False
    return parsed


def _rule(raw: Any, path: str, where: Where, warnings: list[str]) -> L7Rule:
    rule = where.mapping(raw, path)
    where.known_keys(rule, path, frozenset({"from", "to", "when"}))
    sources = tuple(
        _clause(s, f"{path}.from[{i}]", "source", _SOURCE_FIELDS, where, warnings)
        for i, s in enumerate(where.sequence(rule.get("from"), f"{path}.from"))
    )
    operations = tuple(
        _clause(o, f"{path}.to[{i}]", "operation", _OPERATION_FIELDS, where, warnings)
        for i, o in enumerate(where.sequence(rule.get("to"), f"{path}.to"))
    )
    when = tuple(
        _when(c, f"{path}.when[{i}]", where, warnings)
        for i, c in enumerate(where.sequence(rule.get("when"), f"{path}.when"))
    )
    return L7Rule(sources, operations, when)


def _clause(
    raw: Any,
    path: str,
    key: str,
    fields: Mapping[str, tuple[Attr, bool]],
    where: Where,
    warnings: list[str],
) -> Clause:
    entry = where.mapping(raw, path)
    where.known_keys(entry, path, frozenset({key}))
    body = where.mapping(entry.get(key), f"{path}.{key}")
    path = f"{path}.{key}"
    if not body:
        raise where.fail(path, "must not be empty")
    where.known_keys(body, path, frozenset(fields))
    if body.get("principals") and body.get("serviceAccounts"):
        raise where.fail(path, "serviceAccounts and principals cannot be set together")
    by_attr: dict[Attr, tuple[list[str], list[str], list[str]]] = {}
    for name, (attr, positive) in fields.items():
        values = where.strings(body.get(name), f"{path}.{name}")
        if not values:
            continue
        _validate(attr, values, f"{path}.{name}", where)
        slot = by_attr.setdefault(attr, ([], [], []))
        slot[0 if positive else 1].extend(values)
        slot[2].append(f"{path}.{name}")
        _warn_for(attr, f"{path}.{name}", warnings)
    return tuple(
        Condition(attr, " & ".join(names), tuple(pos), tuple(neg))
        for attr, (pos, neg, names) in by_attr.items()
    )


def _when(raw: Any, path: str, where: Where, warnings: list[str]) -> Condition:
    cond = where.mapping(raw, path)
    where.known_keys(cond, path, frozenset({"key", "values", "notValues"}))
    key = cond.get("key")
    if not isinstance(key, str) or not key:
        raise where.fail(f"{path}.key", "must be a non-empty string")
    values = where.strings(cond.get("values"), f"{path}.values")
    not_values = where.strings(cond.get("notValues"), f"{path}.notValues")
    if not values and not not_values:
        raise where.fail(path, "needs values or notValues")
    label = f"{path} ({key})"
    arg = ""
    if key in _WHEN_KEYS:
        attr = _WHEN_KEYS[key]
    elif m := _BRACKETED.match(key):
        attr = Attr.HEADER if m.group(1) == "request.headers" else Attr.REQUEST_CLAIM
        arg = m.group(2)
    elif key.startswith("experimental.envoy.filters."):
        attr = Attr.UNSUPPORTED
        warnings.append(
            f"{label}: cannot be evaluated by this waypoint; an ALLOW rule using it never "
            "matches, a DENY rule ignores it"
        )
    else:
        raise where.fail(f"{path}.key", f"unknown attribute {key!r}")
    _validate(attr, values, f"{path}.values", where)
    _validate(attr, not_values, f"{path}.notValues", where)
    _warn_for(attr, label, warnings)
    return Condition(attr, label, tuple(values), tuple(not_values), arg)


def _warn_for(attr: Attr, where: str, warnings: list[str]) -> None:
    if attr in _JWT_ATTRS:
        warnings.append(
            f"{where}: this waypoint validates no JWTs, so request principals and claims are "
            "always absent (ALLOW rules on them never match)"
        )


def _validate(attr: Attr, values: list[str], path: str, where: Where) -> None:
    for i, value in enumerate(values):
        at = f"{path}[{i}]"
        if attr in (Attr.SOURCE_IP, Attr.REMOTE_IP, Attr.DESTINATION_IP):
            try:
                ip_network(value, strict=False)
            except ValueError:
                raise where.fail(at, f"{value!r} is not an IP or CIDR") from None
        elif attr is Attr.DESTINATION_PORT:
            if not value.isdigit() or not 0 <= int(value) <= 65535:
                raise where.fail(at, f"{value!r} is not a port number")
        elif attr is Attr.PATH and is_path_template(value):
            _check_template(value, at, where)
        elif value == "":
            raise where.fail(at, "must not be empty")


_TEMPLATE_SEGMENT = re.compile(r"^(\{\*\}|\{\*\*\}|[^{}*]*)$")


def _check_template(value: str, at: str, where: Where) -> None:
    """Istio's rules: ``{*}``/``{**}`` are whole segments, ``{**}`` at most once and last,
    no other ``*`` and no other braces."""
    segments = value.split("/")
    if not value.startswith("/") or not all(_TEMPLATE_SEGMENT.match(s) for s in segments):
        raise where.fail(at, f"{value!r} is not a valid path template")
    if "{**}" in segments[:-1] or segments.count("{**}") > 1:
        raise where.fail(at, f"{value!r}: {{**}} must be the last segment")


__all__ += ["PolicyTranslationError"]
