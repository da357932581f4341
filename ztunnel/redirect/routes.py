"""The in-pod policy routing istio-cni adds next to its iptables rules.

Replies of the app to a connection ztunnel opened with a *spoofed* source carry connmark
0x111 (restored into the packet mark in mangle OUTPUT); this rule + table send them back
over lo to ztunnel's transparent socket:

    ip rule add fwmark 0x111/0xfff pref 32764 lookup 100
    ip route add local 0.0.0.0/0 dev lo table 100     (and ::/0 with IPv6)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from ztunnel.redirect.netns import NetNamespace, NetnsError

RULE_PRIORITY = 32764


@dataclass(frozen=True, slots=True)
class RouteState:
    rule: bool  # the fwmark rule at RULE_PRIORITY exists
    route: bool  # the local default route exists in the table


def _ip(family: int) -> list[str]:
    return ["ip", "-6" if family == 6 else "-4"]


def _json(ns: NetNamespace, argv: list[str]) -> list[dict[str, Any]]:
    proc = ns.run(argv, check=False)
    if proc.returncode != 0:
        if "does not exist" in proc.stderr:
            return []  # an empty routing table is not an error, just nothing of ours
        raise NetnsError(f"{' '.join(argv)} in netns {ns.path} failed: {proc.stderr.strip()}")
    out = proc.stdout.strip()
    try:
        data = json.loads(out) if out else []
    except ValueError as exc:
        raise NetnsError(f"{' '.join(argv)} in netns {ns.path}: not JSON: {exc}") from exc
    if not isinstance(data, list):
        raise NetnsError(f"{' '.join(argv)} in netns {ns.path}: expected a JSON list")
    return [d for d in data if isinstance(d, dict)]


def _number(value: object, default: str) -> int:
    """A mark/mask as ``ip -j`` prints it ("0x111" or 273)."""
    try:
        return int(str(default if value is None else value), 0)
    except ValueError as exc:
        raise NetnsError(f"unexpected number {value!r} in ip -j output") from exc


def _our_rules(
    ns: NetNamespace, fwmark: int, mask: int, table: int, family: int
) -> list[dict[str, Any]]:
    rules = _json(ns, [*_ip(family), "-j", "rule", "show"])
    return [
        r
        for r in rules
        if r.get("priority") == RULE_PRIORITY
        and _number(r.get("fwmark"), "0") == fwmark
        and _number(r.get("fwmask"), "0xffffffff") == mask
        and str(r.get("table")) == str(table)
    ]


def _has_route(ns: NetNamespace, table: int, family: int) -> bool:
    routes = _json(ns, [*_ip(family), "-j", "route", "show", "table", str(table)])
    return any(
        r.get("type") == "local" and r.get("dst") == "default" and r.get("dev") == "lo"
        for r in routes
    )


def routes_state(
    ns: NetNamespace, *, fwmark: int, mask: int, table: int, family: int = 4
) -> RouteState:
    return RouteState(
        rule=bool(_our_rules(ns, fwmark, mask, table, family)),
        route=_has_route(ns, table, family),
    )


def install_routes(
    ns: NetNamespace, *, fwmark: int, mask: int, table: int, ipv6: bool = False
) -> None:
    """Add the rule and route unless present (idempotent)."""
    for family in (4, 6) if ipv6 else (4,):
        state = routes_state(ns, fwmark=fwmark, mask=mask, table=table, family=family)
        if not state.rule:
            ns.run(
                [
                    *_ip(family),
                    "rule",
                    "add",
                    "fwmark",
                    f"{fwmark:#x}/{mask:#x}",
                    "pref",
                    str(RULE_PRIORITY),
                    "lookup",
                    str(table),
                ]
            )
        if not state.route:
            dst = "::/0" if family == 6 else "0.0.0.0/0"
            ns.run([*_ip(family), "route", "add", "local", dst, "dev", "lo", "table", str(table)])


def uninstall_routes(
    ns: NetNamespace, *, fwmark: int, mask: int, table: int, ipv6: bool = False
) -> None:
    """Remove exactly our rule(s) and route; anything else in the netns stays."""
    for family in (4, 6) if ipv6 else (4,):
        for _ in _our_rules(ns, fwmark, mask, table, family):
            ns.run(
                [
                    *_ip(family),
                    "rule",
                    "del",
                    "fwmark",
                    f"{fwmark:#x}/{mask:#x}",
                    "pref",
                    str(RULE_PRIORITY),
                    "lookup",
                    str(table),
                ]
            )
        if _has_route(ns, table, family):
            dst = "::/0" if family == 6 else "0.0.0.0/0"
            ns.run([*_ip(family), "route", "del", "local", dst, "dev", "lo", "table", str(table)])
