"""istio-cni's in-pod iptables rules (REDIRECT mode), rendered, installed and reconciled.

Semantics follow istio-cni's ``AppendInpodRules`` (reference §3.1). Rules are written in the
canonical form ``iptables-save`` prints, so the installed state can be compared with the
expected one line by line: reconciling after an agent restart is then "equal → keep,
different → replace our chains in one iptables-restore transaction".
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from ztunnel.errors import ZtunnelError
from ztunnel.model.pod import Pod
from ztunnel.redirect import routes
from ztunnel.redirect.base import RedirectPorts
from ztunnel.redirect.netns import NetNamespace, NetnsError

CHAIN_PRERT = "ISTIO_PRERT"
CHAIN_OUTPUT = "ISTIO_OUTPUT"
OUR_CHAINS = (CHAIN_PRERT, CHAIN_OUTPUT)
# Builtin chain -> our chain it jumps to (same pair in every table we touch).
JUMPS = (("PREROUTING", CHAIN_PRERT), ("OUTPUT", CHAIN_OUTPUT))
TABLES = ("mangle", "nat", "raw")
PROBE_SNAT_V4 = "169.254.7.127"
PROBE_SNAT_V6 = "fd16:9254:7127:1337:ffff:ffff:ffff:ffff"


class IptablesError(ZtunnelError):
    """iptables-save/-restore failed inside a pod netns."""


@dataclass(frozen=True, slots=True)
class InpodConfig:
    outbound_port: int = 15001
    inbound_plaintext_port: int = 15006
    inbound_port: int = 15008
    mark: int = 0x539
    tproxy_mark: int = 0x111
    mask: int = 0xFFF
    route_table: int = 100
    ipv6: bool = False
    # Off by default: there is no DNS proxy on 15053 yet, and capturing DNS would break it.
    dns_capture: bool = False
    dns_port: int = 15053

    @classmethod
    def from_ports(cls, ports: RedirectPorts) -> InpodConfig:
        return cls(
            outbound_port=ports.outbound,
            inbound_plaintext_port=ports.inbound_plaintext,
            inbound_port=ports.inbound,
            mark=ports.mark,
        )


@dataclass(frozen=True, slots=True)
class TableState:
    """Our part of one table: rule specs per our chain, and the jumps into them."""

    chains: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    jumps: tuple[tuple[str, str], ...] = ()  # (builtin chain, rule spec)


@dataclass(frozen=True, slots=True)
class InstalledState:
    """Our rules as found (or expected) in one address family; tables without any are absent."""

    tables: Mapping[str, TableState] = field(default_factory=dict)

    @property
    def empty(self) -> bool:
        return not self.tables


def _mark(value: int, mask: int) -> str:
    return f"{value:#x}/{mask:#x}"


def _chain_rules(cfg: InpodConfig, family: int) -> dict[str, dict[str, tuple[str, ...]]]:
    """table -> our chain -> rule specs, exactly as iptables-save prints them."""
    lo_net = "::1/128" if family == 6 else "127.0.0.1/32"
    probe = (PROBE_SNAT_V6 + "/128") if family == 6 else (PROBE_SNAT_V4 + "/32")
    mark = _mark(cfg.mark, cfg.mask)
    tmark = _mark(cfg.tproxy_mark, cfg.mask)
    not_ours = f"-m mark ! --mark {mark}"
    dns_out: tuple[str, ...] = ()
    if cfg.dns_capture:
        dns_out = (
            f"! -o lo -p udp {not_ours} -m udp --dport 53 -j REDIRECT --to-ports {cfg.dns_port}",
            f"! -d {lo_net} -p tcp -m tcp --dport 53 {not_ours} "
            f"-j REDIRECT --to-ports {cfg.dns_port}",
        )
    tables: dict[str, dict[str, tuple[str, ...]]] = {
        "mangle": {
            CHAIN_PRERT: (f"-m mark --mark {mark} -j CONNMARK --set-xmark {tmark}",),
            CHAIN_OUTPUT: (
                f"-m connmark --mark {tmark} -j CONNMARK --restore-mark "
                "--nfmask 0xffffffff --ctmask 0xffffffff",
            ),
        },
        "nat": {
            CHAIN_PRERT: (
                f"-s {probe} -p tcp -m tcp -j ACCEPT",
                f"! -d {lo_net} -p tcp -m tcp ! --dport {cfg.inbound_port} {not_ours} "
                f"-j REDIRECT --to-ports {cfg.inbound_plaintext_port}",
            ),
            CHAIN_OUTPUT: (
                f"-d {probe} -p tcp -m tcp -j ACCEPT",
                *dns_out,
                f"-p tcp -m mark --mark {tmark} -j ACCEPT",
                f"! -d {lo_net} -o lo -j ACCEPT",
                f"! -d {lo_net} -p tcp {not_ours} -j REDIRECT --to-ports {cfg.outbound_port}",
            ),
        },
    }
    if cfg.dns_capture:
        tables["raw"] = {
            CHAIN_PRERT: (f"-p udp {not_ours} -m udp --sport 53 -j CT --zone 1",),
            CHAIN_OUTPUT: (f"-p udp -m mark --mark {mark} -m udp --dport 53 -j CT --zone 1",),
        }
    return tables


def expected_state(cfg: InpodConfig, family: int = 4) -> InstalledState:
    jumps = tuple((builtin, f"-j {ours}") for builtin, ours in JUMPS)
    return InstalledState(
        {t: TableState(chains, jumps) for t, chains in _chain_rules(cfg, family).items()}
    )


def render_rules(cfg: InpodConfig, family: int = 4) -> str:
    """The iptables-restore (--noflush) text installing our rules into a clean netns."""
    lines: list[str] = []
    for table, st in expected_state(cfg, family).tables.items():
        lines.append(f"*{table}")
        lines += [f"-N {chain}" for chain in st.chains]
        lines += [f"-A {builtin} {spec}" for builtin, spec in st.jumps]
        for chain, specs in st.chains.items():
            lines += [f"-A {chain} {spec}" for spec in specs]
        lines.append("COMMIT")
    return "\n".join(lines) + "\n"


def render_replace(current: InstalledState, cfg: InpodConfig, family: int = 4) -> str:
    """One transaction that turns ``current`` (ours, possibly stale) into the expected rules."""
    want = expected_state(cfg, family).tables
    lines: list[str] = []
    for table in TABLES:
        have, new = current.tables.get(table), want.get(table)
        if have is None and new is None:
            continue
        lines.append(f"*{table}")
        if have is not None:
            lines += [f"-D {builtin} {spec}" for builtin, spec in have.jumps]
            for chain in have.chains:
                lines.append(f"-F {chain}")
                if new is None or chain not in new.chains:
                    lines.append(f"-X {chain}")
        if new is not None:
            existing = have.chains if have is not None else {}
            lines += [f"-N {chain}" for chain in new.chains if chain not in existing]
            lines += [f"-A {builtin} {spec}" for builtin, spec in new.jumps]
            for chain, specs in new.chains.items():
                lines += [f"-A {chain} {spec}" for spec in specs]
        lines.append("COMMIT")
    return "\n".join(lines) + "\n"


def render_removal(current: InstalledState) -> str:
    """Delete our jumps and chains, nothing else."""
    lines: list[str] = []
    for table, st in current.tables.items():
        lines.append(f"*{table}")
        lines += [f"-D {builtin} {spec}" for builtin, spec in st.jumps]
        for chain in st.chains:
            lines += [f"-F {chain}", f"-X {chain}"]
        lines.append("COMMIT")
    return "\n".join(lines) + "\n"


def parse_save(text: str) -> InstalledState:
    """Extract our chains and the jumps into them from ``iptables-save`` output."""
    chains: dict[str, dict[str, list[str]]] = {}
    jumps: dict[str, list[tuple[str, str]]] = {}
    table = ""
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("*"):
            table = line[1:]
        elif line.startswith(":"):
            name = line[1:].split()[0]
            if name in OUR_CHAINS:
                chains.setdefault(table, {}).setdefault(name, [])
        elif line.startswith("-A "):
            _, chain, spec = line.split(" ", 2)
            if chain in OUR_CHAINS:
                chains.setdefault(table, {}).setdefault(chain, []).append(spec)
            elif spec.split()[-2:-1] == ["-j"] and spec.split()[-1] in OUR_CHAINS:
                jumps.setdefault(table, []).append((chain, spec))
    tables = {
        t: TableState(
            {c: tuple(specs) for c, specs in chains.get(t, {}).items()},
            tuple(jumps.get(t, ())),
        )
        for t in TABLES
        if t in chains or t in jumps
    }
    return InstalledState(tables)


def _tool(family: int, name: str) -> str:
    return ("ip6tables-" if family == 6 else "iptables-") + name


def installed(ns: NetNamespace, family: int = 4) -> InstalledState:
    try:
        return parse_save(ns.run([_tool(family, "save")]).stdout)
    except NetnsError as exc:
        raise IptablesError(str(exc)) from exc


def _restore(ns: NetNamespace, script: str, family: int) -> None:
    try:
        ns.run([_tool(family, "restore"), "--noflush"], input=script)
    except NetnsError as exc:
        raise IptablesError(f"{exc}\n--- script ---\n{script}") from exc


def _families(cfg: InpodConfig) -> tuple[int, ...]:
    return (4, 6) if cfg.ipv6 else (4,)


def install(ns: NetNamespace, cfg: InpodConfig) -> bool:
    """Install (or reconcile to) the expected rules + routes; True if iptables changed."""
    changed = False
    for family in _families(cfg):
        current = installed(ns, family)
        if current == expected_state(cfg, family):
            continue  # a previous agent left exactly these rules: reuse them
        script = (
            render_rules(cfg, family) if current.empty else render_replace(current, cfg, family)
        )
        _restore(ns, script, family)
        changed = True
    routes.install_routes(
        ns, fwmark=cfg.tproxy_mark, mask=cfg.mask, table=cfg.route_table, ipv6=cfg.ipv6
    )
    return changed


def uninstall(ns: NetNamespace, cfg: InpodConfig) -> bool:
    """Remove our chains, the jumps into them, and our ip rule/route; a user's rules survive.
    True if any of our chains were there."""
    found = False
    for family in _families(cfg):
        current = installed(ns, family)
        if not current.empty:
            _restore(ns, render_removal(current), family)
            found = True
    routes.uninstall_routes(
        ns, fwmark=cfg.tproxy_mark, mask=cfg.mask, table=cfg.route_table, ipv6=cfg.ipv6
    )
    return found


class IptablesRedirector:
    """istio-cni's in-pod iptables rules behind the ``Redirector`` interface
    (``REDIRECT_MODE=iptables``, the default)."""

    mode = "iptables"

    def __init__(
        self, ports: RedirectPorts, *, ipv6: bool = False, dns_capture: bool = False
    ) -> None:
        self.config = replace(InpodConfig.from_ports(ports), ipv6=ipv6, dns_capture=dns_capture)

    def install(self, netns: NetNamespace, pod: Pod) -> bool:
        return install(netns, self.config)

    def remove(self, netns: NetNamespace, pod: Pod | None = None) -> bool:
        return uninstall(netns, self.config)

    def installed(self, netns: NetNamespace) -> bool:
        return any(not installed(netns, f).empty for f in _families(self.config))

    def describe(self, netns: NetNamespace) -> dict[str, Any]:
        state = installed(netns)
        return {
            "mode": self.mode,
            "installed": not state.empty,
            "current": state == expected_state(self.config),
            "chains": {t: sorted(st.chains) for t, st in state.tables.items()},
        }

    def summary(self) -> dict[str, Any]:
        return {"mode": self.mode, "ipv6": self.config.ipv6, "dnsCapture": self.config.dns_capture}

    def prune(self, keep: Iterable[NetNamespace]) -> list[str]:
        return []  # the rules live in the pod netns and go with it
