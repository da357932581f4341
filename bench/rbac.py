"""L4 policy evaluation cost: 10,000 policies x 10 rules (the size of ztunnel's rbac bench).

Run: ``.venv/bin/python bench/rbac.py`` (about 20 s on the 2-core VM).

Each rule is one clause with one match shaped like ztunnel's benches/throughput.rs
(namespaces and principals as prefix/suffix/exact, a source and a destination
CIDR), with values distinct per policy so nothing is shared between policies.
Two shapes:

* ``ports``: every match also lists a destination port that the connection does
  not use, as ztunnel's bench does (``destination_ports: [0]``); the per-policy
  port prefilter rejects each policy with one set lookup;
* ``no-ports``: the same without ports, so every rule of every policy is
  evaluated (the worst case).

The last rule of the last policy allows one identity: the *allowed* connection
walks all 10,000 policies before matching, the *denied* one walks them all and
is refused. The baseline evaluates one policy of the same shape in the same run.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from ipaddress import ip_address, ip_network
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

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
from ztunnel.policy.rbac import ConnectionAttrs, evaluate

N_POLICIES = 10_000
N_RULES = 10
NET = ip_network("198.51.100.0/24")
ALLOWED_ID = Identity("cluster.local", "allowed", "client")
ALLOWED = ConnectionAttrs(ip_address("10.0.0.1"), ip_address("10.0.0.2"), 8080, ALLOWED_ID)
DENIED = ConnectionAttrs(
    ip_address("10.0.0.1"), ip_address("10.0.0.2"), 8080, Identity("cluster.local", "x", "y")
)


def _rule(i: int, r: int, ports: bool) -> Rule:
    tag = f"{i}-{r}"
    strings = (
        StringMatch(MatchKind.PREFIX, f"random-prefix-{tag}"),
        StringMatch(MatchKind.SUFFIX, f"random-postfix-{tag}"),
        StringMatch(MatchKind.EXACT, f"random-exact-{tag}"),
    )
    match = Match(
        namespaces=strings,
        principals=strings,
        source_ips=(NET,),
        destination_ips=(NET,),
        destination_ports=(0,) if ports else (),
    )
    return ((match,),)


def build(n: int, ports: bool) -> list[Authorization]:
    policies = []
    for i in range(n):
        rules = [_rule(i, r, ports) for r in range(N_RULES)]
        if i == n - 1:
            allow = Match(principals=(StringMatch(MatchKind.EXACT, ALLOWED_ID.principal),))
            rules[-1] = ((allow,),)
        policies.append(
            Authorization(f"policy-{i}", "default", Scope.GLOBAL, Action.ALLOW, tuple(rules))
        )
    return policies


def per_decision_us(fn: Callable[[], object], min_seconds: float = 1.0) -> float:
    fn()  # warm (compiles and caches the policies)
    count, start = 0, time.perf_counter()
    while True:
        fn()
        count += 1
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds:
            return elapsed / count * 1e6


def run(shape: str, ports: bool) -> None:
    t0 = time.perf_counter()
    many = build(N_POLICIES, ports)
    one = build(1, ports)
    evaluate(many, ALLOWED)
    setup = time.perf_counter() - t0
    print(f"[{shape}] {N_POLICIES} policies x {N_RULES} rules; build+compile {setup:.2f} s")
    for label, conn, expect in (("allowed", ALLOWED, True), ("denied", DENIED, False)):
        assert evaluate(many, conn).allowed is expect
        assert evaluate(one, conn).allowed is expect
        big = per_decision_us(lambda c=conn: evaluate(many, c))  # type: ignore[misc]
        base = per_decision_us(lambda c=conn: evaluate(one, c))  # type: ignore[misc]
        print(
            f"  {label:7s}: {1e6 / big:10.1f} decisions/s  {big:10.1f} us/decision  "
            f"(1 policy: {base:6.2f} us; ratio {big / base:8.0f}x)"
        )


def main() -> None:
    print(f"python {sys.version.split()[0]}")
    run("ports", ports=True)
    run("no-ports", ports=False)


if __name__ == "__main__":
    main()
