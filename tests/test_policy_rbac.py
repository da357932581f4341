"""L4 authorization semantics (ztunnel src/rbac.rs) and decision order (assert_rbac)."""

from __future__ import annotations

from ipaddress import ip_address, ip_network

import pytest

from ztunnel.model.authorization import (
    Action,
    Authorization,
    Match,
    MatchKind,
    Rule,
    Scope,
    ServiceAccountMatch,
    StringMatch,
)
from ztunnel.model.identity import Identity
from ztunnel.policy.rbac import (
    ConnectionAttrs,
    Reason,
    decision_to_json,
    evaluate,
    explain,
    policy_matches,
)

PLAIN = ConnectionAttrs(ip_address("127.0.0.1"), ip_address("127.0.0.2"), 8080, None)
TLS = ConnectionAttrs(
    ip_address("127.0.0.1"), ip_address("127.0.0.2"), 8080, Identity("td", "namespace", "account")
)
TLS_ALT = ConnectionAttrs(
    ip_address("127.0.0.3"), ip_address("127.0.0.4"), 9090, Identity("td-alt", "ns-alt", "sa-alt")
)
V6 = ConnectionAttrs(ip_address("::1"), ip_address("::2"), 8080, Identity("td", "namespace", "x"))


def exact(v: str) -> StringMatch:
    return StringMatch(MatchKind.EXACT, v)


def policy(
    *rules: Rule, action: Action = Action.ALLOW, name: str = "p", dry_run: bool = False
) -> Authorization:
    return Authorization(name, "ns", Scope.GLOBAL, action, tuple(rules), dry_run)


def one(
    m: Match, *, action: Action = Action.ALLOW, name: str = "p", dry_run: bool = False
) -> Authorization:
    return policy(((m,),), action=action, name=name, dry_run=dry_run)


SA = ServiceAccountMatch("namespace", "account")
NET1 = ip_network("127.0.0.1/32")
NET2 = ip_network("127.0.0.2/32")

# (match, expected for PLAIN, TLS, TLS_ALT): every Match field and its not_ twin.
FIELD_CASES = [
    ("namespaces", Match(namespaces=(exact("namespace"),)), (False, True, False)),
    ("not_namespaces", Match(not_namespaces=(exact("namespace"),)), (True, False, True)),
    ("service_accounts", Match(service_accounts=(SA,)), (False, True, False)),
    ("not_service_accounts", Match(not_service_accounts=(SA,)), (True, False, True)),
    ("principals", Match(principals=(exact("td/ns/namespace/sa/account"),)), (False, True, False)),
    (
        "not_principals",
        Match(not_principals=(exact("td/ns/namespace/sa/account"),)),
        (True, False, True),
    ),
    ("source_ips", Match(source_ips=(NET1,)), (True, True, False)),
    ("not_source_ips", Match(not_source_ips=(NET1,)), (False, False, True)),
    ("destination_ips", Match(destination_ips=(NET2,)), (True, True, False)),
    ("not_destination_ips", Match(not_destination_ips=(NET2,)), (False, False, True)),
    ("cidr", Match(destination_ips=(ip_network("127.0.0.0/24"),)), (True, True, True)),
    ("destination_ports", Match(destination_ports=(8080,)), (True, True, False)),
    ("not_destination_ports", Match(not_destination_ports=(8080,)), (False, False, True)),
]


@pytest.mark.parametrize(
    ("label", "match", "expected"), FIELD_CASES, ids=[c[0] for c in FIELD_CASES]
)
def test_every_match_field(label: str, match: Match, expected: tuple[bool, bool, bool]) -> None:
    pol = one(match)
    assert (policy_matches(pol, PLAIN), policy_matches(pol, TLS), policy_matches(pol, TLS_ALT)) == (
        expected
    )


STRING_CASES = [
    (StringMatch(MatchKind.EXACT, "foo"), "foo", True),
    (StringMatch(MatchKind.EXACT, "foo"), "foobar", False),
    (StringMatch(MatchKind.PREFIX, "foo"), "foobar", True),
    (StringMatch(MatchKind.PREFIX, "foo"), "barfoo", False),
    (StringMatch(MatchKind.SUFFIX, "foo"), "barfoo", True),
    (StringMatch(MatchKind.SUFFIX, "foo"), "foobar", False),
    (StringMatch(MatchKind.PRESENCE), "x", True),
]


@pytest.mark.parametrize(("sm", "namespace", "expected"), STRING_CASES)
def test_string_match_kinds_on_namespaces(sm: StringMatch, namespace: str, expected: bool) -> None:
    conn = ConnectionAttrs(PLAIN.src_ip, PLAIN.dst_ip, 80, Identity("td", namespace, "sa"))
    assert policy_matches(one(Match(namespaces=(sm,))), conn) is expected


@pytest.mark.parametrize(
    ("sm", "expected"),
    [
        (StringMatch(MatchKind.PREFIX, "td/ns/namespace/"), True),
        (StringMatch(MatchKind.SUFFIX, "/sa/account"), True),
        (StringMatch(MatchKind.PREFIX, "spiffe://"), False),  # matched without the scheme
        (StringMatch(MatchKind.PRESENCE), True),
    ],
)
def test_principals_compare_without_spiffe_prefix(sm: StringMatch, expected: bool) -> None:
    assert policy_matches(one(Match(principals=(sm,))), TLS) is expected


def test_no_identity_semantics() -> None:
    presence = StringMatch(MatchKind.PRESENCE)
    assert not policy_matches(one(Match(principals=(presence,))), PLAIN)
    assert policy_matches(one(Match(not_principals=(presence,))), PLAIN)
    assert not policy_matches(one(Match(namespaces=(presence,))), PLAIN)
    assert not policy_matches(one(Match(service_accounts=(SA,))), PLAIN)
    # Even a matcher that accepts "" fails for principals: there is nothing to strip.
    assert not policy_matches(one(Match(principals=(StringMatch(MatchKind.PREFIX, ""),))), PLAIN)
    # ... while namespaces are compared against "".
    assert policy_matches(one(Match(namespaces=(exact(""),))), PLAIN)


def test_service_account_ignores_trust_domain() -> None:
    other_td = ConnectionAttrs(
        PLAIN.src_ip, PLAIN.dst_ip, 1, Identity("other", "namespace", "account")
    )
    assert policy_matches(one(Match(service_accounts=(SA,))), other_td)


def test_ipv6_cidr_and_family_mismatch() -> None:
    assert policy_matches(one(Match(source_ips=(ip_network("::/64"),))), V6)
    assert not policy_matches(one(Match(source_ips=(ip_network("0.0.0.0/0"),))), V6)
    assert not policy_matches(one(Match(source_ips=(ip_network("::/0"),))), TLS)


def test_fields_and_values_combine() -> None:
    both = Match(namespaces=(exact("namespace"),), destination_ports=(9090,))
    assert not policy_matches(one(both), TLS)  # fields AND
    values = Match(destination_ports=(1, 8080))
    assert policy_matches(one(values), TLS)  # values OR
    pos_and_neg = Match(destination_ports=(8080,), not_destination_ports=(8080,))
    assert not policy_matches(one(pos_and_neg), TLS)  # both lists must hold


def test_structure_rules_or_clauses_and_matches_or() -> None:
    ns_a, ns_b = Match(namespaces=(exact("a"),)), Match(namespaces=(exact("b"),))
    port80 = Match(destination_ports=(80,))
    nested = policy(((ns_a, ns_b), (port80,)))

    def conn(ns: str, port: int) -> ConnectionAttrs:
        return ConnectionAttrs(PLAIN.src_ip, PLAIN.dst_ip, port, Identity("td", ns, "sa"))

    assert policy_matches(nested, conn("a", 80))
    assert policy_matches(nested, conn("b", 80))
    assert not policy_matches(nested, conn("bad", 80))
    assert not policy_matches(nested, conn("b", 81))
    multi = policy(((ns_a,),), ((ns_b,),))
    assert policy_matches(multi, conn("b", 1))


def test_empty_structures() -> None:
    assert not policy_matches(policy(), PLAIN)  # zero rules: never
    assert policy_matches(policy(()), PLAIN)  # a rule without clauses: always
    assert policy_matches(policy(((),)), PLAIN)  # an empty clause: matches
    assert not policy_matches(policy(((Match(),),)), PLAIN)  # only empty matches: never
    # An empty match is skipped, the others still decide.
    assert policy_matches(policy(((Match(), Match(destination_ports=(8080,))),)), PLAIN)


def test_port_prefilter_agrees_with_full_evaluation() -> None:
    # Rule 0 is port-constrained, rule 1 is not: the prefilter must not hide rule 1.
    pol = policy(((Match(destination_ports=(1,)),),), ((Match(source_ips=(NET1,)),),))
    assert policy_matches(pol, PLAIN)
    only_ports = policy(((Match(destination_ports=(1,)),), (Match(destination_ports=(1, 8080)),)))
    assert not policy_matches(only_ports, PLAIN)


# -- evaluation order -------------------------------------------------------------------------

ALLOW_NS = one(Match(namespaces=(exact("namespace"),)), name="allow-ns")
ALLOW_OTHER = one(Match(namespaces=(exact("other"),)), name="allow-other")
DENY_PORT = one(Match(destination_ports=(8080,)), action=Action.DENY, name="deny-8080")
DENY_9 = one(Match(destination_ports=(9,)), action=Action.DENY, name="deny-9")


def test_no_policies_allows() -> None:
    d = evaluate([], TLS)
    assert (d.allowed, d.reason, d.policy) == (True, Reason.NO_POLICIES, None)


def test_only_non_matching_deny_allows() -> None:
    d = evaluate([DENY_9], TLS)
    assert (d.allowed, d.reason) == (True, Reason.NO_ALLOW_POLICIES)


def test_deny_wins_over_allow() -> None:
    d = evaluate([ALLOW_NS, DENY_PORT], TLS)
    assert (d.allowed, d.reason, d.policy, d.rule) == (
        False,
        Reason.EXPLICITLY_DENIED,
        "ns/deny-8080",
        0,
    )


def test_allow_match_and_no_match() -> None:
    d = evaluate([ALLOW_OTHER, ALLOW_NS], TLS)
    assert (d.allowed, d.reason, d.policy) == (True, Reason.ALLOW_MATCHED, "ns/allow-ns")
    d = evaluate([ALLOW_OTHER], TLS)
    assert (d.allowed, d.reason, d.policy) == (False, Reason.NOT_ALLOWED, None)


def test_deciding_rule_index() -> None:
    pol = policy(((Match(destination_ports=(1,)),),), ((Match(destination_ports=(8080,)),),))
    assert evaluate([pol], TLS).rule == 1


def test_dry_run_deny_is_logged_only() -> None:
    dry = one(Match(destination_ports=(8080,)), action=Action.DENY, name="dry", dry_run=True)
    d = evaluate([dry, ALLOW_NS], TLS)
    assert (d.allowed, d.reason) == (True, Reason.ALLOW_MATCHED)
    assert [(f.message, f.policy) for f in d.dry_run] == [("dry-run: deny policy match", "ns/dry")]


def test_dry_run_allow_is_logged_only() -> None:
    dry = one(Match(namespaces=(exact("other"),)), name="dry", dry_run=True)
    d = evaluate([dry], TLS)
    assert (d.allowed, d.reason) == (True, Reason.NO_ALLOW_POLICIES)
    assert [f.message for f in d.dry_run] == ["dry-run: no allow policies match"]
    dry_ok = one(Match(namespaces=(exact("namespace"),)), name="dry-ok", dry_run=True)
    d = evaluate([dry_ok, ALLOW_OTHER], TLS)
    assert (d.allowed, d.reason) == (False, Reason.NOT_ALLOWED)
    assert [(f.message, f.policy) for f in d.dry_run] == [
        ("dry-run: allow policy match", "ns/dry-ok")
    ]


def test_strict_policy_denies_plaintext_only() -> None:
    strict = one(Match(not_principals=(StringMatch(MatchKind.PRESENCE),)), action=Action.DENY)
    assert not evaluate([strict], PLAIN).allowed
    assert evaluate([strict], TLS).allowed


# -- explanation ------------------------------------------------------------------------------


def test_explain_names_deciding_policy_and_rule() -> None:
    text = explain(evaluate([ALLOW_NS, DENY_PORT], TLS))
    assert text.splitlines()[0] == "DENY: deny policy match (ExplicitlyDenied)"
    assert "decided by policy ns/deny-8080 rule 0" in text


def test_explain_says_why_each_allow_failed() -> None:
    principal = one(Match(principals=(exact("cluster.local/ns/x/sa/y"),)), name="by-principal")
    port = policy(((Match(destination_ports=(80, 443)),), (Match(),)), name="by-port")
    conn = ConnectionAttrs(PLAIN.src_ip, PLAIN.dst_ip, 8080, Identity("cluster.local", "a", "b"))
    d = evaluate([principal, port], conn)
    assert [m.policy for m in d.mismatches] == ["ns/by-principal", "ns/by-port"]
    assert d.mismatches[0].reasons == (
        "rule 0 clause 0: source principal 'cluster.local/ns/a/sa/b' not in "
        "[Exact 'cluster.local/ns/x/sa/y']",
    )
    assert d.mismatches[1].reasons == ("rule 0 clause 0: destination port 8080 not in [80, 443]",)
    text = explain(d)
    assert "allow policy ns/by-principal did not match:" in text
    plain = evaluate([principal], PLAIN)
    assert "(none: no mTLS identity)" in plain.mismatches[0].reasons[0]


def test_explain_empty_match_clause() -> None:
    d = evaluate([policy(((Match(destination_ports=(8080,)),), (Match(),)))], TLS)
    assert d.mismatches[0].reasons == (
        "rule 0 clause 1: every match is empty, and empty matches never match",
    )


def test_decision_to_json() -> None:
    out = decision_to_json(evaluate([ALLOW_OTHER], TLS))
    assert out["allowed"] is False
    assert out["reason"] == "NotAllowed"
    assert out["connection"]["srcIdentity"] == "spiffe://td/ns/namespace/sa/account"
    assert out["allowPolicyMismatches"][0]["policy"] == "ns/allow-other"
    assert "not in [Exact 'other']" in out["allowPolicyMismatches"][0]["reasons"][0]
