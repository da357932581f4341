"""Istio AuthorizationPolicy / PeerAuthentication YAML → ztunnel policies, evaluated end to end.

The examples follow istio.io's AuthorizationPolicy reference and istiod's ambient
translation (pilot/pkg/serviceregistry/ambient/authorization.go).
"""

from __future__ import annotations

from collections.abc import Sequence
from ipaddress import ip_address
from pathlib import Path

import pytest
import yaml

from ztunnel.errors import ConfigError
from ztunnel.model.authorization import (
    Action,
    Authorization,
    Match,
    MatchKind,
    Scope,
    ServiceAccountMatch,
    StringMatch,
)
from ztunnel.model.identity import Identity
from ztunnel.model.workload import Workload
from ztunnel.policy.istio import (
    PolicyTranslationError,
    TranslationResult,
    attach_policies,
    load_policy_dir,
    translate_documents,
)
from ztunnel.policy.rbac import ConnectionAttrs, Decision, Reason, evaluate

HEADER = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n"


def translate(text: str, *, strict: bool = False) -> TranslationResult:
    return translate_documents(yaml.safe_load_all(text), strict=strict)


def only(text: str) -> Authorization:
    result = translate(text)
    assert len(result.policies) == 1, result
    return result.policies[0].authorization


def conn(
    ns: str | None = "default", sa: str = "sleep", port: int = 8080, src: str = "10.0.0.9"
) -> ConnectionAttrs:
    ident = Identity("cluster.local", ns, sa) if ns is not None else None
    return ConnectionAttrs(ip_address(src), ip_address("10.0.1.1"), port, ident)


def policies_for(wl: Workload, policies: Sequence[Authorization], root: str) -> list[Authorization]:
    """Reference §5.1: namespace + global policies, plus the workload's selector keys."""
    by_key = {p.key: p for p in policies}
    out = [p for p in policies if p.scope is Scope.NAMESPACE and p.namespace == wl.namespace]
    out += [p for p in policies if p.scope is Scope.GLOBAL and p.namespace == root]
    out += [by_key[k] for k in wl.authorization_policies if k in by_key]
    return out


def decide(
    text: str, c: ConnectionAttrs, labels: dict[str, str] | None = None, ns: str = "foo"
) -> Decision:
    result = translate(text)
    wl = Workload(uid="w1", name="httpbin", namespace=ns)
    (wl,), policies = attach_policies([wl], {"w1": labels or {"app": "httpbin"}}, result)
    return evaluate(policies_for(wl, policies, result.root_namespace), c)


# -- istio.io documentation examples ----------------------------------------------------------

ALLOW_NOTHING = HEADER + "metadata: {name: allow-nothing, namespace: foo}\nspec: {}\n"
DENY_ALL = HEADER + "metadata: {name: deny-all, namespace: foo}\nspec: {action: DENY, rules: [{}]}"
ALLOW_ALL = HEADER + "metadata: {name: allow-all, namespace: foo}\nspec: {rules: [{}]}"
ALLOW_NS = (
    HEADER
    + """
metadata: {name: httpbin, namespace: foo}
spec:
  selector: {matchLabels: {app: httpbin}}
  action: ALLOW
  rules:
  - from:
    - source: {namespaces: ["test"]}
"""
)
ALLOW_PRINCIPAL = (
    HEADER
    + """
metadata: {name: httpbin, namespace: foo}
spec:
  action: ALLOW
  rules:
  - from:
    - source: {principals: ["cluster.local/ns/default/sa/sleep"]}
"""
)
DENY_PORT = (
    HEADER
    + """
metadata: {name: deny-8080, namespace: foo}
spec:
  action: DENY
  rules:
  - to:
    - operation: {ports: ["8080"]}
"""
)
IP_BLOCKS = (
    HEADER
    + """
metadata: {name: ip-allow, namespace: foo}
spec:
  action: ALLOW
  rules:
  - from:
    - source: {ipBlocks: ["1.2.3.4", "5.6.7.0/24"]}
"""
)


def test_allow_nothing() -> None:
    pol = only(ALLOW_NOTHING)
    assert (pol.scope, pol.action, pol.rules) == (Scope.NAMESPACE, Action.ALLOW, ())
    d = decide(ALLOW_NOTHING, conn())
    assert (d.allowed, d.reason) == (False, Reason.NOT_ALLOWED)


def test_deny_all_and_allow_all() -> None:
    assert only(DENY_ALL).rules == ((),)
    d = decide(DENY_ALL, conn())
    assert (d.allowed, d.reason, d.policy) == (False, Reason.EXPLICITLY_DENIED, "foo/deny-all")
    assert decide(ALLOW_ALL, conn(None)).allowed


def test_allow_by_namespace_with_selector() -> None:
    pol = only(ALLOW_NS)
    assert pol.scope is Scope.WORKLOAD_SELECTOR
    assert decide(ALLOW_NS, conn("test")).allowed
    assert not decide(ALLOW_NS, conn("other")).allowed
    # Not selected: the policy does not apply, so nothing restricts the workload.
    assert decide(ALLOW_NS, conn("other"), labels={"app": "other"}).reason is Reason.NO_POLICIES


def test_allow_by_principal() -> None:
    assert decide(ALLOW_PRINCIPAL, conn("default", "sleep")).allowed
    d = decide(ALLOW_PRINCIPAL, conn("default", "other"))
    assert not d.allowed
    assert (
        "source principal 'cluster.local/ns/default/sa/other' not in"
        in (d.mismatches[0].reasons[0])
    )
    assert not decide(ALLOW_PRINCIPAL, conn(None)).allowed


def test_deny_a_port() -> None:
    assert not decide(DENY_PORT, conn(port=8080)).allowed
    d = decide(DENY_PORT, conn(port=9090))
    assert (d.allowed, d.reason) == (True, Reason.NO_ALLOW_POLICIES)


def test_ip_blocks() -> None:
    pol = only(IP_BLOCKS)
    assert [str(n) for n in pol.rules[0][0][0].source_ips] == ["1.2.3.4/32", "5.6.7.0/24"]
    assert decide(IP_BLOCKS, conn(src="1.2.3.4")).allowed
    assert decide(IP_BLOCKS, conn(src="5.6.7.200")).allowed
    assert not decide(IP_BLOCKS, conn(src="1.2.3.5")).allowed


# -- translation details ------------------------------------------------------------------------


def test_clause_order_to_from_when_and_wildcards() -> None:
    pol = only(
        HEADER
        + """
metadata: {name: p, namespace: foo}
spec:
  rules:
  - from:
    - source: {principals: ["*", "*/sa/x", "cluster.local/*"], notNamespaces: ["bad"]}
    - source: {serviceAccounts: ["sa1", "other/sa2"], notServiceAccounts: ["sa3"]}
    to:
    - operation: {ports: ["80"], notPorts: ["81"]}
    when:
    - {key: source.ip, values: ["10.0.0.0/8"], notValues: ["10.1.0.0/16"]}
    - {key: destination.port, values: ["80"]}
    - {key: source.principal, notValues: ["x"]}
"""
    )
    to, src, when_ip, when_port, when_principal = pol.rules[0]
    assert to == (Match(destination_ports=(80,), not_destination_ports=(81,)),)
    assert src[0].principals == (
        StringMatch(MatchKind.PRESENCE),
        StringMatch(MatchKind.SUFFIX, "/sa/x"),
        StringMatch(MatchKind.PREFIX, "cluster.local/"),
    )
    assert src[0].not_namespaces == (StringMatch(MatchKind.EXACT, "bad"),)
    assert src[1].service_accounts == (
        ServiceAccountMatch("foo", "sa1"),
        ServiceAccountMatch("other", "sa2"),
    )
    assert src[1].not_service_accounts == (ServiceAccountMatch("foo", "sa3"),)
    assert [str(n) for n in when_ip[0].not_source_ips] == ["10.1.0.0/16"]
    assert when_port == (Match(destination_ports=(80,)),)
    assert when_principal[0].not_principals == (StringMatch(MatchKind.EXACT, "x"),)


def test_scope_global_in_root_namespace_and_dry_run() -> None:
    text = (
        HEADER
        + """
metadata:
  name: mesh
  namespace: istio-system
  annotations: {istio.io/dry-run: "true"}
spec: {rules: [{}]}
"""
    )
    pol = only(text)
    assert (pol.scope, pol.dry_run) == (Scope.GLOBAL, True)
    custom_root = translate_documents(yaml.safe_load_all(text), root_namespace="mesh-root")
    assert custom_root.policies[0].authorization.scope is Scope.NAMESPACE


def test_l7_rule_dropped_in_allow() -> None:
    text = (
        HEADER
        + """
metadata: {name: p, namespace: foo}
spec:
  rules:
  - to: [{operation: {methods: ["GET"], ports: ["8080"]}}]
  - from: [{source: {namespaces: ["ok"]}}]
"""
    )
    result = translate(text)
    pol = result.policies[0].authorization
    assert len(pol.rules) == 1  # the L7 rule is gone: more restrictive
    assert "found: methods" in result.warnings[0]
    assert "rules matching HTTP attributes are omitted" in result.warnings[0]
    assert not decide(text, conn("default", port=8080)).allowed
    assert decide(text, conn("ok")).allowed


def test_l7_fields_dropped_in_deny() -> None:
    mixed = (
        HEADER
        + """
metadata: {name: p, namespace: foo}
spec:
  action: DENY
  rules:
  - to: [{operation: {methods: ["POST"], ports: ["8080"]}}]
"""
    )
    result = translate(mixed)
    assert result.policies[0].authorization.rules == (((Match(destination_ports=(8080,)),),),)
    assert "enforced without the HTTP rules" in result.warnings[0]
    assert not decide(mixed, conn(port=8080)).allowed  # broader: every method denied
    no_op = (
        HEADER
        + """
metadata: {name: p, namespace: foo}
spec:
  action: DENY
  rules:
  - from: [{source: {requestPrincipals: ["*"]}}]
    when: [{key: "request.headers[x-user]", values: ["bob"]}]
"""
    )
    result = translate(no_op)
    assert "will have no effect" in result.warnings[0]
    assert "request.headers[x-user], requestPrincipals" in result.warnings[0]
    assert decide(no_op, conn()).allowed


@pytest.mark.parametrize("action", ["AUDIT", "CUSTOM"])
def test_audit_and_custom_are_not_supported(action: str) -> None:
    text = HEADER + f"metadata: {{name: a, namespace: foo}}\nspec: {{action: {action}}}\n"
    result = translate(text)
    assert result.policies == []
    assert result.warnings == [
        f"<documents>: AuthorizationPolicy foo/a: ztunnel does not support the {action} action"
    ]
    with pytest.raises(PolicyTranslationError, match=f"foo/a.*does not support the {action}"):
        translate(text, strict=True)


def test_target_refs_and_unknown_kinds_are_skipped() -> None:
    text = (
        HEADER
        + "metadata: {name: wp, namespace: foo}\n"
        + "spec: {targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: w}]}\n"
        + "---\napiVersion: v1\nkind: ConfigMap\nmetadata: {name: c}\n"
    )
    result = translate(text)
    assert result.policies == []
    assert "waypoint" in result.warnings[0]
    assert "v1/ConfigMap is not handled" in result.warnings[1]


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        (
            "{rules: [{to: [{operation: {ports: ['http']}}]}]}",
            "spec.rules[0].to[0].operation.ports[0]",
        ),
        (
            "{rules: [{from: [{source: {ipBlocks: ['nope']}}]}]}",
            "spec.rules[0].from[0].source.ipBlocks[0]",
        ),
        (
            "{rules: [{from: [{source: {principal: ['typo']}}]}]}",
            "spec.rules[0].from[0].source.principal",
        ),
        ("{action: MAYBE}", "spec.action"),
        ("{rules: [{from: [{source: {}}]}]}", "spec.rules[0].from[0].source"),
    ],
)
def test_bad_field_names_file_policy_and_field(tmp_path: Path, spec: str, field: str) -> None:
    (tmp_path / "ok.yaml").write_text(ALLOW_NS)
    (tmp_path / "bad.yml").write_text(
        f"---\n{HEADER}metadata: {{name: bad, namespace: foo}}\nspec: {spec}\n"
    )
    with pytest.raises(ConfigError) as info:
        load_policy_dir(tmp_path)
    message = str(info.value)
    assert "bad.yml" in message and "foo/bad" in message and field in message


def test_load_policy_dir_reads_all_yaml_files(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(ALLOW_NS + "---\n" + DENY_PORT)
    sub = tmp_path / "sub"
    sub.mkdir()
    (sub / "b.yml").write_text(IP_BLOCKS)
    (tmp_path / "ignored.txt").write_text("not: yaml policy")
    result = load_policy_dir(tmp_path)
    assert [tp.authorization.key for tp in result.policies] == [
        "foo/httpbin",
        "foo/deny-8080",
        "foo/ip-allow",
    ]


# -- workload attachment ----------------------------------------------------------------------


def test_attach_selector_policies_by_namespace_and_labels() -> None:
    text = (
        ALLOW_NS
        + "---\n"
        + HEADER
        + "metadata: {name: mesh-sel, namespace: istio-system}\n"
        + "spec: {selector: {matchLabels: {tier: web}}, rules: [{}]}\n"
        + "---\n"
        + ALLOW_PRINCIPAL
    )
    result = translate(text)
    wls = [
        Workload(uid="a", name="a", namespace="foo", authorization_policies=("foo/existing",)),
        Workload(uid="b", name="b", namespace="bar"),
        Workload(uid="c", name="c", namespace="foo"),
    ]
    labels = {"a": {"app": "httpbin", "tier": "web"}, "b": {"app": "httpbin", "tier": "web"}}
    out, policies = attach_policies(wls, labels, result)
    assert out[0].authorization_policies == (
        "foo/existing",
        "foo/httpbin",
        "istio-system/mesh-sel",
    )
    assert out[1].authorization_policies == ("istio-system/mesh-sel",)  # root: every namespace
    assert out[2].authorization_policies == ()  # no labels; namespace policies are not listed
    assert [p.key for p in policies] == ["foo/httpbin", "istio-system/mesh-sel", "foo/httpbin"]


# -- PeerAuthentication -----------------------------------------------------------------------

PA = "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\n"
MESH_STRICT = (
    PA + "metadata: {name: default, namespace: istio-system}\nspec: {mtls: {mode: STRICT}}\n"
)
STRICT_KEY = "istio-system/istio_converted_static_strict"


def pa_decide(text: str, c: ConnectionAttrs, ns: str = "foo") -> tuple[Decision, Workload]:
    result = translate(text)
    wl = Workload(uid="w", name="w", namespace=ns)
    (wl,), policies = attach_policies([wl], {"w": {"app": "httpbin"}}, result)
    return evaluate(policies_for(wl, policies, result.root_namespace), c), wl


def test_mesh_strict_denies_plaintext_and_allows_identity() -> None:
    d, wl = pa_decide(MESH_STRICT, conn(None))
    assert wl.authorization_policies == (STRICT_KEY,)
    assert (d.allowed, d.reason, d.policy) == (False, Reason.EXPLICITLY_DENIED, STRICT_KEY)
    assert pa_decide(MESH_STRICT, conn("default"))[0].allowed


def test_namespace_permissive_overrides_mesh_strict() -> None:
    text = MESH_STRICT + "---\n" + PA + "metadata: {name: p, namespace: foo}\n"
    text += "spec: {mtls: {mode: PERMISSIVE}}\n"
    d, wl = pa_decide(text, conn(None))
    assert wl.authorization_policies == ()
    assert d.allowed
    # The static policy is still sent (some PeerAuthentication exists) but unreferenced.
    assert STRICT_KEY in [tp.authorization.key for tp in translate(text).policies]
    _, other_ns = pa_decide(text, conn(None), ns="bar")
    assert other_ns.authorization_policies == (STRICT_KEY,)


def test_workload_strict_with_permissive_port() -> None:
    text = (
        PA
        + """
metadata: {name: web, namespace: foo}
spec:
  selector: {matchLabels: {app: httpbin}}
  mtls: {mode: STRICT}
  portLevelMtls:
    8080: {mode: PERMISSIVE}
"""
    )
    d, wl = pa_decide(text, conn(None, port=9090))
    assert wl.authorization_policies == ("foo/converted_peer_authentication_web",)
    assert (d.allowed, d.policy) == (False, "foo/converted_peer_authentication_web")
    assert pa_decide(text, conn(None, port=8080))[0].allowed  # the permissive port
    assert pa_decide(text, conn("default", port=9090))[0].allowed


def test_permissive_mesh_with_strict_port() -> None:
    text = (
        PA
        + """
metadata: {name: web, namespace: foo}
spec:
  selector: {matchLabels: {app: httpbin}}
  portLevelMtls:
    9090: {mode: STRICT}
"""
    )
    result = translate(text)
    converted = [tp.authorization for tp in result.policies if tp.authorization.namespace == "foo"]
    assert converted[0].rules == (
        (
            (
                Match(
                    not_principals=(StringMatch(MatchKind.PRESENCE),),
                    destination_ports=(9090,),
                ),
            ),
        ),
    )
    assert not pa_decide(text, conn(None, port=9090))[0].allowed
    assert pa_decide(text, conn(None, port=8080))[0].allowed


def test_bad_mtls_mode_is_an_error() -> None:
    text = PA + "metadata: {name: x, namespace: foo}\nspec: {mtls: {mode: SOMETIMES}}\n"
    with pytest.raises(ConfigError, match=r"PeerAuthentication foo/x: spec\.mtls\.mode"):
        translate(text)


def test_unknown_security_istio_io_documents_fail_closed() -> None:
    """A DENY in an API version we cannot read must not silently vanish."""
    doc = {
        "apiVersion": "security.istio.io/v1beta2",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": "deny-all", "namespace": "ns"},
        "spec": {"action": "DENY", "rules": [{}]},
    }
    with pytest.raises(ConfigError) as info:
        translate_documents([doc])
    assert "security.istio.io/v1beta2" in str(info.value)
    other = {"apiVersion": "networking.istio.io/v1", "kind": "Gateway", "metadata": {"name": "g"}}
    assert translate_documents([other]).policies == []  # not a security document: skipped
