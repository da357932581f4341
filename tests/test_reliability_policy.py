"""L4 policy evaluation: tests for the mutants of policy/rbac.py and policy/match.py that
survived scripts/mutation.py (issue 14). Each test names the check it protects."""

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
    StringMatch,
)
from ztunnel.model.identity import Identity
from ztunnel.policy.match import Subject, namespace_matches, principal_matches
from ztunnel.policy.rbac import (
    ConnectionAttrs,
    DryRunFinding,
    Reason,
    evaluate,
    policy_matches,
)

ALICE = Identity("td", "ns", "alice")


def conn(
    src: str = "10.0.0.1", dst: str = "10.1.0.1", port: int = 80, who: Identity | None = ALICE
) -> ConnectionAttrs:
    return ConnectionAttrs(ip_address(src), ip_address(dst), port, who)


def pol(
    *rules: Rule, action: Action = Action.ALLOW, name: str = "p", dry_run: bool = False
) -> Authorization:
    return Authorization(name, "ns", Scope.GLOBAL, action, tuple(rules), dry_run)


def only(m: Match, **kw: object) -> Authorization:
    return pol(((m,),), **kw)  # type: ignore[arg-type]


# -- IP lists with more than one network (a separate code path from the single-network one) --

NETS = (ip_network("192.168.0.0/16"), ip_network("10.0.0.0/8"), ip_network("fd00::/8"))


@pytest.mark.parametrize(
    ("src", "expected"),
    [("10.2.3.4", True), ("192.168.9.9", True), ("172.16.0.1", False), ("fd00::5", True),
     ("fe80::1", False)],
)  # fmt: skip
def test_several_source_networks(src: str, expected: bool) -> None:
    assert policy_matches(only(Match(source_ips=NETS)), conn(src=src)) is expected
    assert policy_matches(only(Match(not_source_ips=NETS)), conn(src=src)) is not expected


@pytest.mark.parametrize(
    ("dst", "expected"),
    [("10.2.3.4", True), ("192.168.9.9", True), ("172.16.0.1", False), ("fd00::5", True)],
)
def test_several_destination_networks(dst: str, expected: bool) -> None:
    c = conn(src="172.31.0.1", dst=dst)  # the source is in none of them
    assert policy_matches(only(Match(destination_ips=NETS)), c) is expected
    assert policy_matches(only(Match(not_destination_ips=NETS)), c) is not expected


# -- principals -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "value", "who", "expected"),
    [
        (MatchKind.SUFFIX, "/sa/alice", ALICE, True),
        (MatchKind.SUFFIX, "/sa/bob", ALICE, False),  # present, but another suffix
        (MatchKind.SUFFIX, "/sa/alice", None, False),  # no identity: fails, never raises
        (MatchKind.PREFIX, "td/ns/other/", ALICE, False),
        (MatchKind.EXACT, "td/ns/ns/sa/alice", ALICE, True),
        (MatchKind.EXACT, "td/ns/ns/sa/alice", None, False),
    ],
)
def test_principal_match_kinds(
    kind: MatchKind, value: str, who: Identity | None, expected: bool
) -> None:
    sm = StringMatch(kind, value)
    c = conn(who=who)
    assert policy_matches(only(Match(principals=(sm,))), c) is expected
    # The explain path (policy/mismatch.py) must agree with the compiled check.
    assert principal_matches(sm, Subject(c)) is expected


def test_namespace_match_for_explanations() -> None:
    assert namespace_matches(StringMatch(MatchKind.EXACT, "ns"), Subject(conn()))
    assert not namespace_matches(StringMatch(MatchKind.EXACT, "other"), Subject(conn()))
    assert namespace_matches(StringMatch(MatchKind.EXACT, ""), Subject(conn(who=None)))


# -- the port prefilter must never skip a policy that can match ------------------------------


def test_a_deny_with_rules_on_different_ports_applies_to_each_port() -> None:
    deny = pol(((Match(destination_ports=(80,)),),), ((Match(destination_ports=(22,)),),),
               action=Action.DENY)  # fmt: skip
    for port in (80, 22):
        decision = evaluate([deny], conn(port=port))
        assert (decision.allowed, decision.reason) == (False, Reason.EXPLICITLY_DENIED), port
    assert evaluate([deny], conn(port=443)).allowed


def test_clauses_of_one_rule_intersect_their_ports() -> None:
    rule = ((Match(destination_ports=(80, 443)),), (Match(destination_ports=(443,)),))
    allow = pol(rule)
    assert [evaluate([allow], conn(port=p)).allowed for p in (80, 443, 8080)] == [
        False, True, False
    ]  # fmt: skip


# -- what a decision carries (logged and explained to operators) -------------------------------


def test_decisions_carry_the_connection_and_the_deciding_rule() -> None:
    c = conn()
    deny = only(Match(destination_ports=(80,)), action=Action.DENY, name="d")
    allow = pol(((Match(destination_ports=(22,)),),), (), name="a")
    denied = evaluate([deny], c)
    assert (denied.policy, denied.rule, denied.conn) == ("ns/d", 0, c)
    allowed = evaluate([allow], c)
    assert (allowed.reason, allowed.policy, allowed.rule, allowed.conn) == (
        Reason.ALLOW_MATCHED, "ns/a", 1, c
    )  # fmt: skip
    assert evaluate([], c).conn == c


def test_dry_run_findings_name_action_policy_and_rule() -> None:
    c = conn()
    dry_deny = pol(((Match(destination_ports=(22,)),),), (), action=Action.DENY,
                   name="dd", dry_run=True)  # fmt: skip
    dry_allow = pol(((Match(destination_ports=(22,)),),), (), name="da", dry_run=True)
    dry_allow_miss = only(Match(destination_ports=(22,)), name="dm", dry_run=True)
    decision = evaluate([dry_deny, dry_allow], c)
    assert decision.allowed and decision.reason is Reason.NO_ALLOW_POLICIES
    assert decision.dry_run == (
        DryRunFinding("dry-run: deny policy match", Action.DENY, "ns/dd", 1),
        DryRunFinding("dry-run: allow policy match", Action.ALLOW, "ns/da", 1),
    )
    assert evaluate([dry_allow_miss], c).dry_run == (
        DryRunFinding("dry-run: no allow policies match", Action.ALLOW),
    )


@pytest.mark.parametrize("src", ["10.2.3.4", "192.168.9.9", "172.16.0.1"])
def test_exactly_two_source_networks(src: str) -> None:
    two = (ip_network("192.168.0.0/16"), ip_network("10.0.0.0/8"))
    assert policy_matches(only(Match(source_ips=two)), conn(src=src)) is (src != "172.16.0.1")
