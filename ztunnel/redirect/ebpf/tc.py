"""tc attachments of our programs inside a pod netns: plan, list, attach, detach.

Driven through iproute2's ``tc`` in the netns (like the iptables mode drives iptables), with
``bpf da object-pinned <path>``: the filter takes its own reference on the pinned program, so
attachments outlive the agent and a restarted agent finds them with ``tc -j filter show``.
Our filters sit at one fixed (prio, handle) per hook and are only ever written with
``tc filter replace``, so there is never more than one of ours per hook and swapping a
program is atomic.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ztunnel.errors import ZtunnelError
from ztunnel.redirect.netns import NetNamespace, NetnsError

TC_PRIO = 1
TC_HANDLE = 0x2D7  # arbitrary, fixed: (prio, handle) names our filter on each hook
PROG_PREFIX = "zt_"
INGRESS, EGRESS = "ingress", "egress"


class EbpfError(ZtunnelError):
    """Attaching, listing or detaching our programs in a pod netns failed."""


@dataclass(frozen=True, slots=True)
class Hook:
    """Where one program goes: a device of the pod netns and a direction."""

    device: str
    direction: str
    program: str


@dataclass(frozen=True, slots=True)
class Attached:
    """A bpf filter as tc shows it."""

    device: str
    direction: str
    prio: int
    handle: int
    prog_id: int
    prog_name: str
    prog_tag: str

    @property
    def ours(self) -> bool:
        return (
            self.prio == TC_PRIO
            and self.handle == TC_HANDLE
            and self.prog_name.startswith(PROG_PREFIX)
        )


def _run(ns: NetNamespace, argv: list[str], check: bool = True) -> str:
    try:
        return ns.run(argv, check=check).stdout
    except NetnsError as exc:
        raise EbpfError(str(exc)) from exc


def _json_list(text: str, what: str) -> list[dict[str, Any]]:
    text = text.strip()
    if not text:
        return []
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise EbpfError(f"{what}: not JSON: {exc}") from exc
    if not isinstance(data, list):
        raise EbpfError(f"{what}: expected a JSON list")
    return [d for d in data if isinstance(d, dict)]


def devices(ns: NetNamespace) -> list[tuple[str, str]]:
    """(name, link type) of every device in the netns."""
    links = _json_list(_run(ns, ["ip", "-j", "link", "show"]), "ip -j link show")
    return [(str(li.get("ifname", "")), str(li.get("link_type", ""))) for li in links]


def plan(ns: NetNamespace) -> list[Hook]:
    """lo ingress first (harmless alone: it only acts on packets we loop back), then every
    Ethernet device of the pod: ingress captures inbound, egress outbound and replies."""
    hooks = [Hook("lo", INGRESS, "zt_loopback")]
    for name, link_type in devices(ns):
        if name != "lo" and link_type == "ether":
            hooks += [Hook(name, INGRESS, "zt_ingress"), Hook(name, EGRESS, "zt_egress")]
    return hooks


def has_clsact(ns: NetNamespace, device: str) -> bool:
    qdiscs = _json_list(
        _run(ns, ["tc", "-j", "qdisc", "show", "dev", device]), f"tc qdisc show dev {device}"
    )
    return any(q.get("kind") == "clsact" for q in qdiscs)


def filters(ns: NetNamespace, device: str, direction: str) -> list[Attached]:
    """The bpf filters on one hook (empty when the device has no clsact qdisc)."""
    if not has_clsact(ns, device):
        return []
    out = _run(ns, ["tc", "-j", "filter", "show", "dev", device, direction])
    return parse_filters(out, device, direction)


def parse_filters(text: str, device: str, direction: str) -> list[Attached]:
    found = []
    for entry in _json_list(text, f"tc filter show dev {device} {direction}"):
        options = entry.get("options")
        if entry.get("kind") != "bpf" or not isinstance(options, dict):
            continue  # the per-prio header line, or another classifier
        prog = options.get("prog")
        if not isinstance(prog, dict):
            prog = {}
        found.append(
            Attached(
                device=device,
                direction=direction,
                prio=int(entry.get("pref", 0)),
                handle=int(str(options.get("handle", "0")), 0),
                prog_id=int(prog.get("id", 0)),
                prog_name=str(prog.get("name", "")),
                prog_tag=str(prog.get("tag", "")),
            )
        )
    return found


def ours(ns: NetNamespace, device_names: Iterable[str] | None = None) -> list[Attached]:
    """Our filters on every hook of the given devices (default: all devices of the netns)."""
    names = [n for n, _ in devices(ns)] if device_names is None else list(device_names)
    return [
        f
        for name in names
        for direction in (INGRESS, EGRESS)
        for f in filters(ns, name, direction)
        if f.ours
    ]


def attach(ns: NetNamespace, hook: Hook, pinned: Path) -> None:
    """Attach (or atomically replace) our filter on ``hook`` with the pinned program."""
    if not has_clsact(ns, hook.device):
        _run(ns, ["tc", "qdisc", "add", "dev", hook.device, "clsact"])
    foreign = [
        f
        for f in filters(ns, hook.device, hook.direction)
        if f.prio == TC_PRIO and f.handle == TC_HANDLE and not f.ours
    ]
    if foreign:
        raise EbpfError(
            f"{hook.device} {hook.direction}: a foreign filter {foreign[0].prog_name!r} holds "
            f"prio {TC_PRIO} handle {TC_HANDLE:#x}"
        )
    argv = _filter_argv("replace", hook.device, hook.direction)
    _run(ns, [*argv, "bpf", "da", "object-pinned", str(pinned)])


def detach(ns: NetNamespace, device: str, direction: str) -> None:
    _run(ns, [*_filter_argv("del", device, direction), "bpf"])


def drop_clsact_if_empty(ns: NetNamespace, device: str) -> bool:
    """Delete the clsact qdisc when no filter at all is left on it (ours are gone)."""
    if not has_clsact(ns, device) or _any_filter(ns, device):
        return False
    _run(ns, ["tc", "qdisc", "del", "dev", device, "clsact"])
    return True


def _any_filter(ns: NetNamespace, device: str) -> bool:
    """Non-bpf filters count too: a user's u32/flower filter keeps the qdisc alive."""
    for direction in (INGRESS, EGRESS):
        out = _run(ns, ["tc", "-j", "filter", "show", "dev", device, direction])
        if _json_list(out, f"tc filter show dev {device} {direction}"):
            return True
    return False


def _filter_argv(verb: str, device: str, direction: str) -> list[str]:
    prio, handle = str(TC_PRIO), hex(TC_HANDLE)
    return ["tc", "filter", verb, "dev", device, direction, "prio", prio, "handle", handle]
