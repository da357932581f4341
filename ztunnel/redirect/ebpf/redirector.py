"""``EbpfRedirector``: the ``Redirector`` that captures a pod's traffic with tc BPF programs.

What one ``install`` puts in a pod netns (and ``remove`` takes out again):

- our tc filters: lo ingress → ``zt_loopback``; every Ethernet device: ingress →
  ``zt_ingress``, egress → ``zt_egress`` (ebpf/redirect.c says what each does);
- the ip rule ``fwmark 0x111/0xfff lookup 100`` + ``local default dev lo table 100`` (the
  same as the iptables mode), which deliver looped-back packets locally;
- ``net.ipv4.conf.lo.accept_local=1``: looped-back packets carry the pod's own source address;
- an sk_lookup link on the netns (``zt_sk_lookup``: the TIME_WAIT handoff), pinned;
- pins of the attached programs under ``<pin root>/pods/netns-<netns cookie>/``, next to the
  link: the record a restarted agent (and bpftool) reads.

No iptables rule is involved. The programs and maps themselves are shared by all pods and
pinned once per build (``build.py``).
"""

from __future__ import annotations

import os
import socket
import struct
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import ztunnel.redirect.ebpf.bpfsys as bpfsys
import ztunnel.redirect.ebpf.tc as tc
from ztunnel.model.address import SocketAddr
from ztunnel.model.pod import Pod
from ztunnel.redirect import iptables, routes
from ztunnel.redirect.base import Redirector, RedirectPorts
from ztunnel.redirect.ebpf.bpfsys import ATTACH_SK_LOOKUP
from ztunnel.redirect.ebpf.build import Build, default_source_dir, load, remove_tree
from ztunnel.redirect.ebpf.environment import check_environment
from ztunnel.redirect.ebpf.layout import (
    FLAG_CAPTURE_INBOUND,
    FLAG_CAPTURE_OUTBOUND,
    FLAG_IPV6,
    MapConfig,
)
from ztunnel.redirect.ebpf.tc import EbpfError, Hook
from ztunnel.redirect.netns import NetNamespace, NetnsError

DEFAULT_PIN_ROOT = Path("/sys/fs/bpf/ztunnel")
PODS_DIR = "pods"
ACCEPT_LOCAL = "net.ipv4.conf.lo.accept_local"
SO_NETNS_COOKIE = 71
LINK_PIN = "sk_lookup"  # the pod's sk_lookup link, pinned next to its program pins


def original_dst(sock: Any) -> SocketAddr:
    """The original destination of a connection captured in eBPF mode.

    ``bpf_sk_assign`` hands the unmodified packet to the listener, so the accepted socket's
    own local address *is* the destination the client dialled (outbound: the remote
    ``ip:port``; inbound: the pod IP and the app port). No NAT happened, so there is no
    SO_ORIGINAL_DST to ask, and nothing a stale conntrack entry could make disagree.
    """
    return SocketAddr.from_sockaddr(sock.getsockname())


def netns_cookie(netns: NetNamespace) -> int:
    """The kernel's 64-bit cookie of a netns: unique for the machine's uptime, unlike the
    nsfs inode, which a new netns may reuse once an old one is gone."""
    with netns.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        raw = sock.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8)
    return int(struct.unpack("=Q", raw)[0])


def pod_dir_name(cookie: int) -> str:
    return f"netns-{cookie}"


def pin_name(hook: Hook) -> str:
    """``eth0-ingress``; bpffs refuses dots in names, which device names may have."""
    return f"{hook.device.replace('.', '~')}-{hook.direction}"


def parse_pod_dir_name(name: str) -> int | None:
    prefix, sep, cookie = name.partition("-")
    if prefix != "netns" or not sep or not cookie.isdigit():
        return None
    return int(cookie)


@dataclass(frozen=True, slots=True)
class EbpfSettings:
    """What eBPF mode needs beyond ``RedirectPorts`` (defaults are istio-cni's constants)."""

    loop_mark: int = 0x111
    mark_mask: int = 0xFFF
    route_table: int = 100
    ipv6: bool = False


class EbpfRedirector:
    """Installs, reconciles and removes eBPF redirection in pod network namespaces.

    ``prepare`` checks the machine (``EbpfUnavailable``, a ConfigError, says what is missing)
    and loads or reuses the pinned programs; the agent calls it at start so a broken
    environment stops it before any pod is touched. ``install`` calls it when needed.
    """

    mode = "ebpf"

    def __init__(
        self,
        ports: RedirectPorts | None = None,
        *,
        settings: EbpfSettings | None = None,
        pin_root: Path = DEFAULT_PIN_ROOT,
        source_dir: Path | None = None,
    ) -> None:
        self.ports = ports or RedirectPorts()
        self.settings = settings or EbpfSettings()
        self.pin_root = pin_root
        self.source_dir = source_dir or default_source_dir()
        self._build: Build | None = None
        self._lock = threading.Lock()

    # -- configuration ----------------------------------------------------------

    def map_config(self) -> MapConfig:
        flags = FLAG_CAPTURE_OUTBOUND | FLAG_CAPTURE_INBOUND
        if self.settings.ipv6:
            flags |= FLAG_IPV6
        return MapConfig(
            agent_mark=self.ports.mark,
            mark_mask=self.settings.mark_mask,
            loop_mark=self.settings.loop_mark,
            outbound_port=self.ports.outbound,
            inbound_plaintext_port=self.ports.inbound_plaintext,
            inbound_port=self.ports.inbound,
            flags=flags,
        )

    def prepare(self) -> Build:
        """Check the environment, then load (or reuse) the pinned build. Idempotent."""
        with self._lock:
            if self._build is None:
                check_environment(self.pin_root, self.source_dir)
                try:
                    self._build = load(self.pin_root, self.source_dir, self.map_config())
                except (bpfsys.BpfError, OSError) as exc:
                    where = self.pin_root
                    raise EbpfError(f"cannot pin the BPF programs in {where}: {exc}") from exc
            return self._build

    def pod_dir(self, netns: NetNamespace) -> Path:
        return _pod_dir(netns, self.pin_root)

    # -- Redirector --------------------------------------------------------------

    def install(self, netns: NetNamespace, pod: Pod) -> bool:
        """Attach (or keep) our programs, routes and sysctl.

        On failure a first install is rolled back to nothing; a reconcile of a pod that was
        already redirected leaves what is attached (each tc replace is atomic), so a
        transient error never turns an enrolled pod's capture off.
        """
        build = self.prepare()
        fresh = True
        try:
            current = {(a.device, a.direction): a for a in tc.ours(netns)}
            fresh = not current and not self.pod_dir(netns).exists()
            changed = self._install_routes(netns)
            changed |= _set_accept_local(netns, True)
            hooks = tc.plan(netns)
            for hook in hooks:
                attached = current.pop((hook.device, hook.direction), None)
                if attached is None or attached.prog_id != build.prog_ids[hook.program]:
                    tc.attach(netns, hook, build.path(hook.program))
                    changed = True
            for stale in current.values():  # ours on a hook the plan no longer has
                tc.detach(netns, stale.device, stale.direction)
                changed = True
            changed |= self._sync_pins(netns, build, hooks)
            changed |= self._sync_sk_lookup(netns, build)
        except (EbpfError, NetnsError, bpfsys.BpfError, OSError) as exc:
            if fresh:
                self._remove(netns, quiet=True)
            raise EbpfError(f"eBPF redirection for {pod.key} failed: {exc}") from exc
        return changed

    def remove(self, netns: NetNamespace, pod: Pod | None = None) -> bool:
        return self._remove(netns, quiet=False)

    def installed(self, netns: NetNamespace) -> bool:
        return self.pod_dir(netns).exists() or bool(tc.ours(netns))

    def describe(self, netns: NetNamespace) -> dict[str, Any]:
        attached = tc.ours(netns)
        build = self._build
        out: dict[str, Any] = {
            "mode": self.mode,
            "installed": bool(attached) or self.pod_dir(netns).exists(),
            "pin_dir": str(self.pod_dir(netns)),
            "programs": [
                {
                    "device": a.device,
                    "direction": a.direction,
                    "id": a.prog_id,
                    "name": a.prog_name,
                    "tag": a.prog_tag,
                    "current": build is not None and build.prog_ids.get(a.prog_name) == a.prog_id,
                }
                for a in attached
            ],
        }
        out["sk_lookup"] = self._describe_link(netns)
        state = routes.routes_state(
            netns,
            fwmark=self.settings.loop_mark,
            mask=self.settings.mark_mask,
            table=self.settings.route_table,
        )
        out["routes"] = {"rule": state.rule, "route": state.route}
        if build is not None:
            out["build"] = build.id
        return out

    def summary(self) -> dict[str, Any]:
        """The agent-wide part, from bpf syscalls only (no subprocess): the build, its maps
        and the counters of all pods; cheap enough for every admin request."""
        out: dict[str, Any] = {"mode": self.mode, "pin_dir": str(self.pin_root)}
        build = self._build
        if build is not None:
            out["build"] = build.id
            out["reused"] = build.reused
            out["programs"] = dict(sorted(build.prog_ids.items()))
            out["maps"] = _maps(build)
            out["counters"] = build.counters()
        return out

    def _describe_link(self, netns: NetNamespace) -> dict[str, Any] | None:
        path = self.pod_dir(netns) / LINK_PIN
        if not path.exists():
            return None
        fd = bpfsys.obj_get(path)
        try:
            info = bpfsys.link_info(fd)
        finally:
            os.close(fd)
        build = self._build
        return {
            "link_id": info.id,
            "prog_id": info.prog_id,
            "attached": info.netns_ino == netns.ident[1],
            "current": build is not None and build.prog_ids.get("zt_sk_lookup") == info.prog_id,
        }

    # -- lifecycle ---------------------------------------------------------------------------

    def prune(self, keep: Iterable[NetNamespace]) -> list[str]:
        """Drop the pins of pods whose netns is not in ``keep`` (gone while no agent ran)."""
        wanted = {self.pod_dir(ns).name for ns in keep}
        pods = self.pin_root / PODS_DIR
        dropped = []
        if pods.is_dir():
            for child in sorted(pods.iterdir()):
                if parse_pod_dir_name(child.name) is not None and child.name not in wanted:
                    remove_tree(child)
                    dropped.append(child.name)
        return dropped

    # -- internals -------------------------------------------------------------------------

    def _install_routes(self, netns: NetNamespace) -> bool:
        s = self.settings
        before = [
            routes.routes_state(
                netns, fwmark=s.loop_mark, mask=s.mark_mask, table=s.route_table, family=f
            )
            for f in ((4, 6) if s.ipv6 else (4,))
        ]
        routes.install_routes(
            netns, fwmark=s.loop_mark, mask=s.mark_mask, table=s.route_table, ipv6=s.ipv6
        )
        return not all(st.rule and st.route for st in before)

    def _sync_pins(self, netns: NetNamespace, build: Build, hooks: list[Hook]) -> bool:
        """Make the pod's pin directory hold exactly the attached programs, one per hook."""
        directory = self.pod_dir(netns)
        directory.mkdir(parents=True, exist_ok=True)
        want = {pin_name(h): h.program for h in hooks}
        changed = False
        for child in directory.iterdir():
            if child.name not in want and child.name != LINK_PIN:
                child.unlink()
                changed = True
        for name, program in want.items():
            path = directory / name
            if path.exists() and _pinned_prog_id(path) == build.prog_ids[program]:
                continue
            path.unlink(missing_ok=True)
            fd = bpfsys.obj_get(build.path(program))
            try:
                bpfsys.obj_pin(fd, path)
            finally:
                os.close(fd)
            changed = True
        return changed

    def _sync_sk_lookup(self, netns: NetNamespace, build: Build) -> bool:
        """One sk_lookup link in the pod netns, pinned, running the current program."""
        path = self.pod_dir(netns) / LINK_PIN
        want = build.prog_ids["zt_sk_lookup"]
        if path.exists():
            fd = bpfsys.obj_get(path)
            try:
                info = bpfsys.link_info(fd)
                if info.netns_ino == netns.ident[1] and info.attach_type == ATTACH_SK_LOOKUP:
                    if info.prog_id == want:
                        return False
                    _with_fd(build.path("zt_sk_lookup"), lambda prog: bpfsys.link_update(fd, prog))
                    return True
            finally:
                os.close(fd)
            path.unlink()  # a link of a netns that is gone, or not ours
        prog = bpfsys.obj_get(build.path("zt_sk_lookup"))
        try:
            link = bpfsys.link_create(prog, netns.fd, ATTACH_SK_LOOKUP)
        finally:
            os.close(prog)
        try:
            bpfsys.obj_pin(link, path)
        finally:
            os.close(link)
        return True

    def _remove(self, netns: NetNamespace, *, quiet: bool) -> bool:
        """Detach and unpin ours, and drop the routes unless the iptables mode still uses
        them. ``quiet`` (rollback after a failed install) never raises."""
        try:
            found = _detach(netns, self.pod_dir(netns))
            if not _iptables_present(netns):
                found |= _remove_routes(netns, self.settings)
        except (EbpfError, NetnsError, OSError):
            if not quiet:
                raise
            return False
        return found


def _maps(build: Build) -> list[dict[str, Any]]:
    return [
        {
            "name": m.name,
            "type": m.type,
            "id": m.id,
            "max_entries": m.max_entries,
            "key_size": m.key_size,
            "value_size": m.value_size,
        }
        for m in build.maps()
    ]


def _with_fd(path: Path, use: Callable[[int], None]) -> None:
    fd = bpfsys.obj_get(path)
    try:
        use(fd)
    finally:
        os.close(fd)


def _pinned_prog_id(path: Path) -> int | None:
    try:
        fd = bpfsys.obj_get(path)
    except bpfsys.BpfError:
        return None
    try:
        return bpfsys.prog_info(fd).id
    finally:
        os.close(fd)


def _set_accept_local(netns: NetNamespace, on: bool) -> bool:
    """Set lo's accept_local; True if it changed."""
    want = "1" if on else "0"
    current = netns.run(["sysctl", "-n", ACCEPT_LOCAL]).stdout.strip()
    if current == want:
        return False
    netns.run(["sysctl", "-qw", f"{ACCEPT_LOCAL}={want}"])
    return True


def _iptables_present(netns: NetNamespace) -> bool:
    """Whether the iptables mode's chains are in the pod (its routes are then not ours)."""
    try:
        return not iptables.installed(netns, 4).empty
    except iptables.IptablesError:
        return False  # no iptables in this netns (or no binary): nothing of that mode here


def _detach(netns: NetNamespace, pod_dir: Path) -> bool:
    """Our filters (and the clsact qdiscs we leave empty), the pod's pins and, if any of
    those were there, lo's accept_local. True if anything of ours was found."""
    attached = tc.ours(netns)
    for a in attached:
        tc.detach(netns, a.device, a.direction)
    for device in sorted({a.device for a in attached}):
        tc.drop_clsact_if_empty(netns, device)
    found = bool(attached)
    link = pod_dir / LINK_PIN
    if link.exists():
        _with_fd(link, bpfsys.link_detach)  # detached even if someone else holds the link
    if pod_dir.exists():
        remove_tree(pod_dir)
        found = True
    if found:
        _set_accept_local(netns, False)
    return found


def _remove_routes(netns: NetNamespace, s: EbpfSettings) -> bool:
    state = routes.routes_state(netns, fwmark=s.loop_mark, mask=s.mark_mask, table=s.route_table)
    routes.uninstall_routes(
        netns, fwmark=s.loop_mark, mask=s.mark_mask, table=s.route_table, ipv6=s.ipv6
    )
    return state.rule or state.route


def _remove_iptables_chains(netns: NetNamespace) -> bool:
    """The iptables mode's chains and jumps in both families, its routes untouched."""
    found = False
    for family, tool in ((4, "iptables-restore"), (6, "ip6tables-restore")):
        try:
            state = iptables.installed(netns, family)
        except iptables.IptablesError:
            continue  # no such tool or table in this netns: nothing of ours there
        if state.empty:
            continue
        try:
            netns.run([tool, "--noflush"], input=iptables.render_removal(state))
        except NetnsError as exc:
            raise iptables.IptablesError(str(exc)) from exc
        found = True
    return found


def clean_other_modes(
    netns: NetNamespace,
    active: str,
    *,
    pin_root: Path = DEFAULT_PIN_ROOT,
    settings: EbpfSettings | None = None,
) -> list[str]:
    """Remove what the redirection modes other than ``active`` left in a pod netns.

    ``active`` is ``iptables``, ``ebpf`` or ``none``. Meant to run *after* the active mode's
    ``install`` (so the pod is never without capture); the ip rule and local route, which both
    modes use, stay when the active mode needs them. Returns the modes that were cleaned.
    Needs no compiler: eBPF state is found through tc and the pin directory.
    """
    s = settings or EbpfSettings()
    cleaned = []
    if active != "ebpf" and _ebpf_possible(pin_root) and _detach(netns, _pod_dir(netns, pin_root)):
        cleaned.append("ebpf")
    if active != "iptables" and _remove_iptables_chains(netns):
        cleaned.append("iptables")
    if cleaned and active == "none":
        _remove_routes(netns, s)
    return cleaned


def other_modes_present(
    netns: NetNamespace, active: str, *, pin_root: Path = DEFAULT_PIN_ROOT
) -> bool:
    """Whether a mode other than ``active`` left state in the pod (what ``clean_other_modes``
    would remove): for the agent's check of pods that left the mesh while it was away."""
    if active != "iptables" and _iptables_present(netns):
        return True
    if active == "ebpf" or not _ebpf_possible(pin_root):
        return False
    return _pod_dir(netns, pin_root).exists() or bool(tc.ours(netns))


def _ebpf_possible(pin_root: Path) -> bool:
    """Whether eBPF mode can have left anything: it pins every pod it captures under
    ``<pin root>/pods``. Skipping the look otherwise keeps the iptables mode free of tc
    and of SO_NETNS_COOKIE (Linux >= 5.14) on machines that never ran eBPF mode."""
    return (pin_root / PODS_DIR).is_dir()


def _pod_dir(netns: NetNamespace, pin_root: Path) -> Path:
    return pin_root / PODS_DIR / pod_dir_name(netns_cookie(netns))


if TYPE_CHECKING:  # mypy holds EbpfRedirector to the Redirector protocol
    _conforms: Redirector = EbpfRedirector()
