"""The L4 and L7 evaluators explain their decisions through one renderer (policy/verdict.py):
the same outcome reads the same, and both cap the list of failed ALLOW policies."""

from __future__ import annotations

from ipaddress import ip_address

from ztunnel.model.authorization import Action, Authorization, Match, MatchKind, Scope, StringMatch
from ztunnel.model.identity import Identity
from ztunnel.policy import l7, rbac
from ztunnel.policy.l7istio import translate_l7_documents
from ztunnel.policy.l7match import RequestAttrs
from ztunnel.policy.verdict import EXPLAIN_LIMIT

SLEEP = Identity("cluster.local", "default", "sleep")
MANY = EXPLAIN_LIMIT + 2


def l4_allows(n: int) -> list[Authorization]:
    nobody = StringMatch(MatchKind.EXACT, "cluster.local/ns/x/sa/nobody")
    rule = ((Match(principals=(nobody,)),),)
    return [Authorization(f"a{i}", "ns", Scope.GLOBAL, Action.ALLOW, (rule,)) for i in range(n)]


def l7_allows(n: int) -> list[l7.L7Policy]:
    docs = [
        {
            "apiVersion": "security.istio.io/v1",
            "kind": "AuthorizationPolicy",
            "metadata": {"name": f"a{i}", "namespace": "default"},
            "spec": {
                "targetRefs": [{"kind": "Service", "group": "", "name": "echo"}],
                "rules": [{"to": [{"operation": {"methods": ["POST"]}}]}],
            },
        }
        for i in range(n)
    ]
    return translate_l7_documents(docs, source="t.yaml").policies


def test_both_layers_render_a_not_allowed_denial_alike_and_cap_the_mismatches() -> None:
    conn = rbac.ConnectionAttrs(ip_address("10.0.0.5"), ip_address("10.0.0.6"), 80, SLEEP)
    request = RequestAttrs(ip_address("10.0.0.5"), 80, "GET", "/", "echo", (), SLEEP, None, True)
    l4_text = rbac.explain(rbac.evaluate(l4_allows(MANY), conn)).splitlines()
    l7_text = l7.explain(l7.evaluate(l7_allows(MANY), request)).splitlines()
    for lines, subject in ((l4_text, "  connection: "), (l7_text, "  request: ")):
        assert lines[0] == "DENY: no allow policies matched (NotAllowed)"
        assert lines[1].startswith(subject)
        assert sum(1 for line in lines if line.startswith("  allow policy ")) == EXPLAIN_LIMIT
        assert lines[-1] == "  ... and 2 more allow policies"


def test_findings_serialise_alike() -> None:
    conn = rbac.ConnectionAttrs(ip_address("10.0.0.5"), ip_address("10.0.0.6"), 80, SLEEP)
    dry = Authorization(
        "d", "ns", Scope.GLOBAL, Action.DENY, (((Match(destination_ports=(80,)),),),), True
    )
    out = rbac.decision_to_json(rbac.evaluate([dry], conn))
    assert out["dryRun"] == [
        {"message": "dry-run: deny policy match", "action": "Deny", "policy": "ns/d", "rule": 0}
    ]
