"""What redirection a pod of the simulated cluster holds, read from the kernel (both modes).

The e2e tests assert the same outcomes for iptables and eBPF mode; these helpers say what
"captured exactly once" and "untouched" mean for each: iptables chains, tc filters, the
sk_lookup link and the agent's pins of the pod.
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from ztunnel.cluster.net import ClusterNet
from ztunnel.redirect import iptables
from ztunnel.redirect.ebpf import tc
from ztunnel.redirect.ebpf.redirector import netns_cookie, pod_dir_name

EXPECTED_RULES = iptables.expected_state(iptables.InpodConfig())
# (device, direction, program): one of ours on each hook of a pod with one Ethernet device.
EXPECTED_HOOKS = [
    ("eth0", "egress", "zt_egress"),
    ("eth0", "ingress", "zt_ingress"),
    ("lo", "ingress", "zt_loopback"),
]


class Mesh(Protocol):
    """A running simulated cluster (cluster file or Kubernetes way) and its agents' mode."""

    net: ClusterNet
    mode: str


@dataclass(frozen=True)
class PodCapture:
    rules: iptables.InstalledState  # our iptables chains (IPv4)
    iptables_save: str
    filters: list[tc.Attached]  # every bpf filter on the pod's devices, ours or not
    pin_dir: Path
    links: list[int]  # ids of the sk_lookup links attached to the pod's netns
    ip_rule: bool
    local_route: bool

    @property
    def hooks(self) -> list[tuple[str, str, str]]:
        return sorted((f.device, f.direction, f.prog_name) for f in self.filters)

    @property
    def prog_ids(self) -> dict[tuple[str, str], int]:
        return {(f.device, f.direction): f.prog_id for f in self.filters}


def sk_lookup_links(netns_ino: int) -> list[int]:
    """The sk_lookup links attached to one netns, as bpftool lists them."""
    out = subprocess.run(
        ["bpftool", "-j", "link", "show"], capture_output=True, text=True, check=True
    ).stdout
    return sorted(
        int(link["id"])
        for link in json.loads(out or "[]")
        if link.get("attach_type") == "sk_lookup" and link.get("netns_ino") == netns_ino
    )


def pod_capture(mesh: Mesh, pod: str) -> PodCapture:
    pn = mesh.net.pod(pod)
    with mesh.net.open_netns(pn) as ns:
        saved = ns.run(["iptables-save"]).stdout
        filters = [
            f
            for device, _ in tc.devices(ns)
            for direction in (tc.INGRESS, tc.EGRESS)
            for f in tc.filters(ns, device, direction)
        ]
        pin_dir = mesh.net.bpf_pin_dir(pn.node) / "pods" / pod_dir_name(netns_cookie(ns))
        rules = ns.run(["ip", "rule", "show"]).stdout
        route = ns.run(["ip", "route", "show", "table", "100"], check=False).stdout
        links = sk_lookup_links(ns.ident[1])
    return PodCapture(
        rules=iptables.parse_save(saved),
        iptables_save=saved,
        filters=filters,
        pin_dir=pin_dir,
        links=links,
        ip_rule="fwmark 0x111/0xfff lookup 100" in rules,
        local_route="local" in route,
    )


def assert_captured_once(mesh: Mesh, pod: str) -> PodCapture:
    """The mesh's mode is installed in the pod exactly once, and the other mode not at all."""
    got = pod_capture(mesh, pod)
    assert got.ip_rule and got.local_route  # both modes deliver marked packets locally
    if mesh.mode == "iptables":
        assert got.rules == EXPECTED_RULES
        assert got.filters == [] and not got.pin_dir.exists() and got.links == []
    else:
        assert got.rules.empty and "ISTIO" not in got.iptables_save  # no iptables rule of ours
        assert got.hooks == EXPECTED_HOOKS  # one filter per hook, nothing twice
        assert all(f.ours for f in got.filters)
        assert len(got.links) == 1 and (got.pin_dir / "sk_lookup").exists()
    return got


def is_captured(mesh: Mesh, pod: str) -> bool:
    """The mesh's mode is installed in the pod (a quick look, for waiting on an agent)."""
    got = pod_capture(mesh, pod)
    return not got.rules.empty if mesh.mode == "iptables" else bool(got.filters)


def is_untouched(mesh: Mesh, pod: str) -> bool:
    """No redirection of either mode in the pod."""
    got = pod_capture(mesh, pod)
    return (
        got.rules.empty
        and "ISTIO" not in got.iptables_save
        and not got.filters
        and not got.pin_dir.exists()
        and not got.links
        and not got.ip_rule
    )
