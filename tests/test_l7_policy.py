"""L7 authorization in the waypoint: Istio translation, evaluation order, explanations."""

from __future__ import annotations

from ipaddress import ip_address

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from ztunnel.model.identity import Identity
from ztunnel.policy._fields import PolicyTranslationError
from ztunnel.policy.l7 import DENY_BODY, L7Reason, decision_to_json, evaluate, explain
from ztunnel.policy.l7istio import translate_l7_documents
from ztunnel.policy.l7match import RequestAttrs, normalize_path
from ztunnel.policy.l7model import L7Action, L7Policy, WaypointRef, applies

SLEEP = Identity("cluster.local", "default", "sleep")
ADMIN = Identity("cluster.local", "ops", "admin")


def req(
    path: str = "/",
    method: str = "GET",
    *,
    ident: Identity | None = SLEEP,
    headers: tuple[tuple[str, str], ...] = (),
    host: str = "echo.default.svc.cluster.local",
    port: int = 80,
    src: str = "10.0.0.5",
    remote: str | None = None,
    http: bool = True,
) -> RequestAttrs:
    return RequestAttrs(
        src_ip=ip_address(src),
        dst_port=port,
        method=method,
        path=path,
        host=host,
        headers=headers,
        src_identity=ident,
        remote_ip=ip_address(remote) if remote else None,
        http=http,
    )


def policies(text: str) -> list[L7Policy]:
    result = translate_l7_documents(yaml.safe_load_all(text), source="test.yaml")
    return result.policies


def one(spec: str, *, action: str = "ALLOW", annotations: str = "") -> L7Policy:
    text = f"""
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: p
  namespace: default
  {annotations}
spec:
  targetRefs: [{{kind: Service, group: "", name: echo}}]
  action: {action}
{spec}
"""
    (policy,) = policies(text)
    return policy


# -- paths, methods, hosts, ports -------------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "path", "expected"),
    [
        ("/api", "/api", True),
        ("/api", "/api/", False),
        ("/api/*", "/api/v1/users", True),
        ("/api/*", "/api", False),  # prefix "/api/" needs the slash
        ("*.png", "/img/logo.png", True),
        ("*.png", "/img/logo.jpg", False),
        ("*", "/anything", True),
        ("/api", "/api?x=1", True),  # query is not part of the path
        ("/admin", "/public/../admin", True),  # normalized before matching
        ("/admin", "/public/%2e%2e/admin", True),
        ("/users/{*}/profile", "/users/42/profile", True),
        ("/users/{*}/profile", "/users/42/x/profile", False),
        ("/files/{**}", "/files/a/b/c.txt", True),
    ],
)
def test_path_forms(pattern: str, path: str, expected: bool) -> None:
    policy = one(f"  rules: [{{to: [{{operation: {{paths: ['{pattern}']}}}}]}}]")
    assert evaluate([policy], req(path)).allowed is expected


def test_not_paths_and_methods_combine_with_and() -> None:
    policy = one("  rules: [{to: [{operation: {methods: [GET, HEAD], notPaths: ['/admin/*']}}]}]")
    assert evaluate([policy], req("/data")).allowed
    assert not evaluate([policy], req("/data", "POST")).allowed
    assert not evaluate([policy], req("/admin/users")).allowed


def test_hosts_are_case_insensitive_and_ports_match_the_service_port() -> None:
    policy = one("  rules: [{to: [{operation: {hosts: ['*.svc.cluster.local'], ports: ['80']}}]}]")
    assert evaluate([policy], req(host="ECHO.default.SVC.cluster.local")).allowed
    assert not evaluate([policy], req(host="echo.example.com")).allowed
    assert not evaluate([policy], req(port=8080)).allowed


def test_method_presence_and_not_hosts() -> None:
    policy = one("  rules: [{to: [{operation: {methods: ['*'], notHosts: ['evil*']}}]}]")
    assert evaluate([policy], req()).allowed
    assert not evaluate([policy], req(host="evil.example.com")).allowed


# -- sources ----------------------------------------------------------------------------------


def test_principals_namespaces_and_no_identity() -> None:
    policy = one(
        "  rules:\n"
        "  - from: [{source: {principals: ['cluster.local/ns/default/sa/sleep']}}]\n"
        "  - from: [{source: {namespaces: ['op*']}}]\n"
    )
    assert evaluate([policy], req(ident=SLEEP)).allowed
    assert evaluate([policy], req(ident=ADMIN)).rule == 1
    assert not evaluate([policy], req(ident=Identity("cluster.local", "x", "y"))).allowed
    assert not evaluate([policy], req(ident=None)).allowed


def test_not_principals_presence_denies_plaintext() -> None:
    policy = one("  rules: [{from: [{source: {notPrincipals: ['*']}}]}]", action="DENY")
    assert evaluate([policy], req(ident=SLEEP)).allowed
    assert not evaluate([policy], req(ident=None)).allowed


def test_service_accounts_default_to_the_policy_namespace() -> None:
    policy = one("  rules: [{from: [{source: {serviceAccounts: [sleep, ops/admin]}}]}]")
    assert evaluate([policy], req(ident=SLEEP)).allowed
    assert evaluate([policy], req(ident=ADMIN)).allowed
    assert not evaluate([policy], req(ident=Identity("cluster.local", "ops", "sleep"))).allowed


def test_ip_blocks_read_the_peer_and_remote_ip_blocks_the_forwarded_client() -> None:
    policy = one(
        "  rules: [{from: [{source: {ipBlocks: ['10.0.0.0/24'], "
        "notRemoteIpBlocks: ['192.0.2.0/24']}}]}]"
    )
    assert evaluate([policy], req(src="10.0.0.9")).allowed
    assert not evaluate([policy], req(src="10.0.1.9")).allowed
    assert not evaluate([policy], req(src="10.0.0.9", remote="192.0.2.7")).allowed
    assert evaluate([policy], req(src="10.0.0.9", remote="198.51.100.7")).allowed


# -- when -----------------------------------------------------------------------------------------


def test_when_headers_and_source_attributes() -> None:
    policy = one(
        "  rules:\n"
        "  - when:\n"
        "    - {key: 'request.headers[X-User]', values: ['alice', 'bob*']}\n"
        "    - {key: source.namespace, values: [default]}\n"
        "    - {key: source.principal, notValues: ['*/sa/blocked']}\n"
        "    - {key: destination.port, values: ['80']}\n"
    )
    assert evaluate([policy], req(headers=(("x-user", "alice"),))).allowed
    assert evaluate([policy], req(headers=(("x-user", "bobby"),))).allowed
    assert not evaluate([policy], req(headers=(("x-user", "carol"),))).allowed
    assert not evaluate([policy], req()).allowed  # header absent
    blocked = Identity("cluster.local", "default", "blocked")
    assert not evaluate([policy], req(ident=blocked, headers=(("x-user", "alice"),))).allowed


def test_header_presence_matches_an_empty_value_and_repeated_headers_join() -> None:
    policy = one("  rules: [{when: [{key: 'request.headers[x-a]', values: ['*']}]}]")
    assert evaluate([policy], req(headers=(("x-a", ""),))).allowed
    joined = one("  rules: [{when: [{key: 'request.headers[x-a]', values: ['1,2']}]}]")
    assert evaluate([joined], req(headers=(("x-a", "1"), ("x-a", "2")))).allowed


def test_connection_sni_and_remote_ip_when_keys() -> None:
    policy = one(
        "  rules: [{when: [{key: remote.ip, values: ['10.0.0.0/8']}, "
        "{key: connection.sni, notValues: ['bad.example']}]}]"
    )
    assert evaluate([policy], req(remote="10.1.2.3")).allowed
    assert not evaluate([policy], req(src="192.168.1.1")).allowed


# -- order: CUSTOM, DENY, ALLOW -------------------------------------------------------------------


ORDERED = """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: ext, namespace: default}
spec:
  targetRefs: [{kind: Service, name: echo}]
  action: CUSTOM
  provider: {name: opa}
  rules: [{to: [{operation: {paths: ['/custom']}}]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-admin, namespace: default}
spec:
  targetRefs: [{kind: Service, name: echo}]
  action: DENY
  rules: [{to: [{operation: {paths: ['/admin*']}}]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-get, namespace: default}
spec:
  targetRefs: [{kind: Service, name: echo}]
  rules: [{to: [{operation: {methods: [GET]}}]}]
"""


def test_custom_then_deny_then_allow() -> None:
    pols = policies(ORDERED)
    custom = evaluate(pols, req("/custom"))
    assert (custom.allowed, custom.reason, custom.policy) == (
        False,
        L7Reason.CUSTOM_DENIED,
        "default/ext",
    )
    deny = evaluate(pols, req("/admin/x"))
    assert (deny.reason, deny.policy, deny.rule) == (
        L7Reason.EXPLICITLY_DENIED,
        "default/deny-admin",
        0,
    )
    assert evaluate(pols, req("/data")).reason is L7Reason.ALLOW_MATCHED
    post = evaluate(pols, req("/data", "POST"))
    assert (post.allowed, post.reason) == (False, L7Reason.NOT_ALLOWED)


def test_custom_and_audit_are_reported() -> None:
    result = translate_l7_documents(
        yaml.safe_load_all(
            ORDERED
            + """
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: audit, namespace: default}
spec:
  targetRefs: [{kind: Service, name: echo}]
  action: AUDIT
  rules: [{}]
"""
        )
    )
    assert any("CUSTOM provider 'opa'" in w for w in result.warnings)
    assert any("AUDIT" in w and "no effect" in w for w in result.warnings)
    audit = [p for p in result.policies if p.action is L7Action.AUDIT]
    decision = evaluate(audit, req())
    assert decision.allowed and decision.findings[0].policy == "default/audit"


def test_no_policies_and_deny_only() -> None:
    assert evaluate([], req()).reason is L7Reason.NO_POLICIES
    deny = one("  rules: [{to: [{operation: {paths: ['/x']}}]}]", action="DENY")
    assert evaluate([deny], req("/y")).reason is L7Reason.NO_ALLOW_POLICIES


def test_policy_without_rules_allows_nothing_and_empty_rule_everything() -> None:
    assert not evaluate([one("")], req()).allowed
    assert evaluate([one("  rules: [{}]")], req()).allowed


def test_dry_run_policies_only_record() -> None:
    annotations = "annotations: {istio.io/dry-run: 'true'}"
    dry_deny = one("  rules: [{}]", action="DENY", annotations=annotations)
    decision = evaluate([dry_deny], req())
    assert decision.allowed
    assert decision.findings[0].message == "dry-run: deny policy match"


# -- TCP streams and unsupported keys (istiod's error rule) ----------------------------------------


def test_http_only_fields_for_tcp() -> None:
    allow = one(
        "  rules: [{to: [{operation: {paths: ['/api']}}]}, {from: [{source: {namespaces: [ops]}}]}]"
    )
    tcp = req(http=False, path="", method="")
    assert not evaluate([allow], tcp).allowed  # rule 0 dropped, rule 1 needs ops
    assert evaluate([allow], req(http=False, path="", ident=ADMIN)).rule == 1
    deny = one("  rules: [{to: [{operation: {paths: ['/api'], ports: ['80']}}]}]", action="DENY")
    assert not evaluate([deny], tcp).allowed  # path ignored: denies the whole port
    assert evaluate([deny], req(http=False, path="", port=81)).allowed


def test_unsupported_when_key_drops_allow_rule_and_widens_deny() -> None:
    key = "experimental.envoy.filters.network.mysql_proxy[db.table]"
    allow = one(f"  rules: [{{when: [{{key: '{key}', values: ['[update]']}}]}}]")
    assert not evaluate([allow], req()).allowed
    deny = one(f"  rules: [{{when: [{{key: '{key}', values: ['[update]']}}]}}]", action="DENY")
    assert not evaluate([deny], req()).allowed


def test_jwt_attributes_are_absent_and_reported() -> None:
    text = """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: jwt, namespace: default}
spec:
  targetRefs: [{kind: Service, name: echo}]
  rules: [{from: [{source: {requestPrincipals: ['*']}}]}]
"""
    result = translate_l7_documents(yaml.safe_load_all(text))
    assert any("validates no JWTs" in w for w in result.warnings)
    assert not evaluate(result.policies, req()).allowed


# -- binding and parsing --------------------------------------------------------------------------


def test_policies_without_target_refs_belong_to_the_agent() -> None:
    text = """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: l4, namespace: default}
spec: {rules: [{}]}
"""
    assert translate_l7_documents(yaml.safe_load_all(text)).policies == []


def test_binding_to_service_gateway_and_gateway_class() -> None:
    text = """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: gw, namespace: infra}
spec:
  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: cls, namespace: istio-system}
spec:
  targetRef: {kind: GatewayClass, group: gateway.networking.k8s.io, name: istio-waypoint}
"""
    gw, cls = policies(text)
    wp = WaypointRef("infra", "waypoint")
    assert applies(gw, wp, None, "istio-system")
    assert not applies(gw, WaypointRef("other", "waypoint"), None, "istio-system")
    assert applies(cls, wp, ("default", "echo"), "istio-system")
    svc = one("  rules: [{}]")
    assert applies(svc, wp, ("default", "echo"), "istio-system")
    assert not applies(svc, wp, ("default", "other"), "istio-system")


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ("  rules: [{to: [{operation: {paths: ['/a/{**}/b']}}]}]", "paths[0]"),
        ("  rules: [{from: [{source: {ipBlocks: ['10.0.0.300']}}]}]", "ipBlocks[0]"),
        ("  rules: [{to: [{operation: {ports: ['http']}}]}]", "ports[0]"),
        ("  rules: [{when: [{key: request.regex, values: [x]}]}]", "when[0].key"),
        ("  rules: [{when: [{key: source.ip}]}]", "when[0]"),
        ("  rules: [{to: [{operation: {}}]}]", "to[0].operation"),
        ("  rules: [{to: [{operation: {verbs: [GET]}}]}]", "operation.verbs"),
        ("  selector: {matchLabels: {a: b}}", "spec.selector"),
    ],
)
def test_bad_documents_name_the_field(spec: str, field: str) -> None:
    with pytest.raises(PolicyTranslationError) as err:
        one(spec)
    assert field in err.value.field


def test_custom_needs_a_provider() -> None:
    with pytest.raises(PolicyTranslationError, match="provider"):
        one("  rules: [{}]", action="CUSTOM")


# -- explanations ---------------------------------------------------------------------------------


def test_explain_names_the_deciding_policy_and_why_allows_failed() -> None:
    pols = policies(ORDERED)
    denied = evaluate(pols, req("/admin/users"))
    text = explain(denied)
    assert "DENY: deny policy match" in text
    assert "default/deny-admin rule 0" in text
    post = evaluate(pols, req("/data", "POST"))
    assert "to[0].operation.methods: 'POST' not in ['GET']" in explain(post)
    out = decision_to_json(post)
    assert out["allowPolicyMismatches"][0]["policy"] == "default/allow-get"
    assert DENY_BODY == b"RBAC: access denied"


# -- properties ---------------------------------------------------------------------------

_segment = st.text(alphabet="abc", min_size=1, max_size=3)
_paths = st.lists(_segment, min_size=1, max_size=4).map(lambda parts: "/" + "/".join(parts))


@given(_paths, st.sampled_from(["GET", "POST", "PUT"]))
def test_a_deny_everything_policy_wins_over_any_allow(path: str, method: str) -> None:
    allow = one("  rules: [{}]")
    deny = one("  rules: [{}]", action="DENY")
    assert not evaluate([allow, deny], req(path, method)).allowed


@given(_paths, _paths)
def test_values_and_not_values_partition_requests(pattern: str, path: str) -> None:
    pos = one(f"  rules: [{{to: [{{operation: {{paths: ['{pattern}*']}}}}]}}]")
    neg = one(f"  rules: [{{to: [{{operation: {{notPaths: ['{pattern}*']}}}}]}}]")
    assert evaluate([pos], req(path)).allowed != evaluate([neg], req(path)).allowed


@given(_paths)
def test_normalization_is_idempotent_and_stays_absolute(path: str) -> None:
    once = normalize_path(path + "/../x/./y")
    assert once.startswith("/") and normalize_path(once) == once
    assert "/./" not in once and "/../" not in once


@given(st.lists(st.sampled_from(["ALLOW", "DENY"]), min_size=1, max_size=4), _paths)
def test_allowed_iff_no_deny_matches_and_some_allow_matches_or_none_exist(
    actions: list[str], path: str
) -> None:
    # Each policy matches only paths under /a; order of policies never matters.
    pols = [one("  rules: [{to: [{operation: {paths: ['/a*']}}]}]", action=a) for a in actions]
    matches = path.startswith("/a")
    deny_hit = matches and "DENY" in actions
    allow_exists = "ALLOW" in actions
    expected = not deny_hit and (not allow_exists or matches)
    decision = evaluate(pols, req(path))
    assert decision.allowed is expected
    assert evaluate(list(reversed(pols)), req(path)).allowed is expected
