"""``ztunnel demo``: a two-node ambient cluster in network namespaces, real traffic, explained.

Builds the simulated cluster (``ztunnel/cluster/demo.yaml`` unless a file is given), starts
the CA service (``ztunnel ca serve``, in its own netns on the pod network: the agents hold
no CA key, only a token and the root), one real agent process per node inside its node
netns, runs the pod programs, sends
traffic from every idle pod (to each service VIP, several times so several endpoints are
hit, and to each server pod on its own node), then reads the agents' JSON access logs and
prints who talked to whom, with which identities, over mTLS or not, allowed or denied.
Everything is torn down at the end, also on Ctrl-C or errors (agents stopped gracefully
first); ``--keep`` leaves it running until Ctrl-C and prints how to look inside.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from types import FrameType
from typing import Any, TextIO

from ztunnel.cluster import apps, waypoint_scene
from ztunnel.cluster.forward import PortForward
from ztunnel.cluster.net import BPF_ROOT, ClusterNet, build, cleanup_stale
from ztunnel.config import RedirectMode
from ztunnel.errors import ConfigError, ZtunnelError
from ztunnel.redirect.ebpf.build import default_source_dir
from ztunnel.redirect.ebpf.environment import check_environment
from ztunnel.sources.clusterfile.layout import PodNet
from ztunnel.sources.clusterfile.mesh import in_mesh as is_enrolled
from ztunnel.sources.clusterfile.spec import (
    ClusterSpec,
    PodSpec,
    ServiceSpec,
    load_spec,
    loads_spec,
)
from ztunnel.testing.ca_service import CA_PORT, METRICS_PORT, CAService, start_ca_service
from ztunnel.testing.harness import (
    ADMIN_PORT,
    AgentProcess,
    config_dump,
    start_agent,
    stop_agents,
    wait_ready,
)
from ztunnel.testing.waypoint import (
    WaypointProcess,
    start_waypoints,
    stop_waypoints,
    wait_waypoint_ready,
    waypoint_pods,
)

EXIT_FAILED = 1
EXIT_NOT_ROOT = 2
PAYLOAD = 2000  # bytes per demo connection: small, the point is who talks to whom
# Service traffic repeats (endpoints are picked at random) until every endpoint was
# reached, at least VIP_MIN_TRIES and at most VIP_MAX_TRIES times.
VIP_MIN_TRIES = 2
VIP_MAX_TRIES = 10
LOG_SETTLE = 2.0  # access logs are written when both sides closed; wait at most this
APPS = ("python", "-m", "ztunnel.cluster.apps")


# -- what we run -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Planned:
    src: PodSpec
    target: str  # ip:port the app connects to
    service: ServiceSpec | None = None
    dst: PodSpec | None = None  # direct pod-to-pod
    tries: tuple[int, int] = (1, 1)  # (min, max) connections; stop early once all endpoints seen


@dataclass
class Observed:
    planned: Planned
    result: dict[str, Any]
    records: list[tuple[str, dict[str, Any]]] = field(default_factory=list)  # (node, record)


def plan_traffic(spec: ClusterSpec) -> list[Planned]:
    """Idle pods (no program) are clients; pods with ports are servers. Waypoint pods and
    the HTTP Services behind a waypoint (and their pods) belong to the waypoint scene."""
    skip_pods, skip_services = waypoint_scene.excluded_from_l4(spec)
    clients = [p for p in spec.pods if p.program is None and p.key not in skip_pods]
    servers = [p for p in spec.pods if p.ports and p.key not in skip_pods]
    plan: list[Planned] = []
    tries = (VIP_MIN_TRIES, VIP_MAX_TRIES)
    for client in clients:
        for svc in spec.services:
            if svc.key in skip_services or not {p.key for p in spec.selected_pods(svc)} - skip_pods:
                continue
            if spec.selected_pods(svc):
                port = next(iter(svc.ports))
                plan.append(Planned(client, f"{svc.vip}:{port}", service=svc, tries=tries))
        for server in servers:
            if server.node == client.node:
                plan.append(Planned(client, "", dst=server))
    return plan


def _target(net: ClusterNet, planned: Planned) -> str:
    if planned.dst is not None:
        return f"{net.pods[planned.dst.key].ip}:{planned.dst.ports[0]}"
    return planned.target


class AccessLogs:
    """New "connection complete" records of every agent since the last look."""

    def __init__(self, agents: dict[str, AgentProcess]) -> None:
        self.agents = agents
        self.seen = {node: 0 for node in agents}

    def new_records(self) -> list[tuple[str, dict[str, Any]]]:
        out: list[tuple[str, dict[str, Any]]] = []
        for node, agent in self.agents.items():
            records = [r for r in agent.log_lines() if r.get("message") == "connection complete"]
            out += [(node, r) for r in records[self.seen[node] :]]
            self.seen[node] = len(records)
        return out


def _expected_records(spec: ClusterSpec, planned: Planned) -> int:
    dst_enrolled = any(is_enrolled(spec, p) for p in _destinations(spec, planned))
    return int(is_enrolled(spec, planned.src)) + int(dst_enrolled)


def _destinations(spec: ClusterSpec, planned: Planned) -> Sequence[PodSpec]:
    if planned.dst is not None:
        return (planned.dst,)
    assert planned.service is not None
    return spec.selected_pods(planned.service)


def run_traffic(net: ClusterNet, logs: AccessLogs, plan: Sequence[Planned]) -> list[Observed]:
    """One connection at a time, so each one's access-log records are exactly the new ones."""
    observed: list[Observed] = []
    for planned in plan:
        endpoints = {p.key for p in _destinations(net.spec, planned)}
        reached: set[str] = set()
        least, most = planned.tries
        for attempt in range(1, most + 1):
            obs = _connect_once(net, logs, planned)
            observed.append(obs)
            pod = _reached(net, obs)
            reached |= {pod.key} if pod is not None else set()
            if attempt >= least and reached >= endpoints:
                break
    return observed


def _connect_once(net: ClusterNet, logs: AccessLogs, planned: Planned) -> Observed:
    argv = [*APPS, "send", "--to", _target(net, planned), "--bytes", str(PAYLOAD)]
    proc = apps.run_in_pod(net, planned.src.key, [*argv, "--timeout", "5"], timeout=15)
    try:
        result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        result = {"ok": False, "error": (proc.stderr.strip() or "no output")[-300:]}
    obs = Observed(planned, result)
    want = _expected_records(net.spec, planned)
    deadline = time.monotonic() + LOG_SETTLE
    while True:
        obs.records += logs.new_records()
        if len(obs.records) >= want or time.monotonic() > deadline:
            return obs
        time.sleep(0.05)


# -- explaining it ---------------------------------------------------------------------


def _pod_label(net: ClusterNet, pod: PodSpec | PodNet) -> str:
    pn = net.pods[pod.key]
    return f"{pn.name} ({pn.ip}, {pn.node})"


def _record(obs: Observed, direction: str) -> tuple[str, dict[str, Any]] | None:
    found = [(n, r) for n, r in obs.records if r.get("direction") == direction]
    return found[0] if found else None


def _reached(net: ClusterNet, obs: Observed) -> PodNet | None:
    """The endpoint that got the connection, from the agents' point of view."""
    for direction in ("inbound", "outbound"):
        rec = _record(obs, direction)
        if rec and rec[1].get("dst.workload"):
            name, ns = rec[1]["dst.workload"], rec[1].get("dst.namespace", "")
            return net.pods.get(f"{ns}/{name}")
    return None


def verdict(obs: Observed) -> str:
    """ALLOWED, DENIED (by policy) or FAILED."""
    inbound = _record(obs, "inbound")
    errors = [str(r.get("error", "")) for _, r in obs.records if r.get("error")]
    if any("denied" in e or "401" in e for e in errors):
        return "DENIED"
    if obs.result.get("ok"):
        return "ALLOWED"
    if inbound is not None and "policy" in str(inbound[1].get("error", "")):
        return "DENIED"
    return "FAILED"


def _policies_of(spec: ClusterSpec, pod: PodSpec) -> list[str]:
    """The L4 policies (no targetRefs: those are the waypoint's) that select the pod."""
    names = []
    for doc in spec.policies:
        meta, body = doc.get("metadata", {}), doc.get("spec") or {}
        if doc.get("kind") != "AuthorizationPolicy" or body.get("targetRefs"):
            continue
        selector = (body.get("selector") or {}).get("matchLabels") or {}
        same_ns = meta.get("namespace") in (pod.namespace, "istio-system")
        if same_ns and all(pod.labels.get(k) == v for k, v in selector.items()):
            action = body.get("action", "ALLOW")
            names.append(f"{meta.get('namespace')}/{meta.get('name')} ({action})")
    return names


def _group_key(net: ClusterNet, obs: Observed) -> tuple[str, ...]:
    p = obs.planned
    dst = p.dst.key if p.dst is not None else p.target
    reached = _reached(net, obs)
    v = verdict(obs)
    error = str(obs.result.get("error")) if v == "FAILED" else ""
    return (p.src.key, dst, v, reached.key if reached else "", error)


def group(net: ClusterNet, observed: Sequence[Observed]) -> list[list[Observed]]:
    """Identical outcomes (same pods, endpoint and verdict) shown once, with a count."""
    groups: dict[tuple[str, ...], list[Observed]] = {}
    for obs in observed:
        groups.setdefault(_group_key(net, obs), []).append(obs)
    return list(groups.values())


def explain(net: ClusterNet, obs: Observed, index: int, count: int = 1) -> list[str]:
    p = obs.planned
    spec = net.spec
    if p.service is not None:
        to = f"service {p.service.hostname} (VIP {p.target})"
    else:
        assert p.dst is not None
        to = f"pod {_pod_label(net, p.dst)} directly"
    v = verdict(obs)
    times = f" (x{count})" if count > 1 else ""
    lines = [f"{index:>2}. {_pod_label(net, p.src)} -> {to}: {v}{times}"]
    reached = _reached(net, obs)
    out, inb = _record(obs, "outbound"), _record(obs, "inbound")
    if reached:
        nodes = sorted({n for n, _ in obs.records})
        via = " and ".join(f"agent@{n}" for n in nodes) or "no agent"
        where = "same node" if reached.node == p.src.node else "cross-node"
        lines.append(f"      reached {_pod_label(net, reached)} ({where}); carried by {via}")
    rec = (out or inb or (None, {}))[1]
    src_id, dst_id = rec.get("src.identity"), rec.get("dst.identity")
    if out is not None and out[1].get("dst.hbone_addr"):
        lines.append(f"      mTLS (HBONE to {out[1].get('dst.addr')}): {src_id} -> {dst_id or '?'}")
    elif inb is not None and inb[1].get("src.identity"):
        lines.append(f"      mTLS: {inb[1]['src.identity']} -> {inb[1].get('dst.identity')}")
    elif inb is not None:
        lines.append(
            "      plaintext: the client is not in the mesh; captured by the destination's "
            "agent on 15006, no client identity"
        )
    else:
        lines.append("      plaintext: neither side is in the mesh, no agent involved")
    if v == "DENIED":
        error = next((str(r.get("error")) for _, r in obs.records if r.get("error")), "")
        dsts = [
            d
            for d in _destinations(spec, p)
            if d.name == (inb or out or ("", {}))[1].get("dst.workload")
        ]
        pols = _policies_of(spec, dsts[0]) if dsts else []
        by = f"; policies on the destination: {', '.join(pols)}" if pols else ""
        lines.append(f"      denied by the destination's agent: {error}{by}")
    elif v == "ALLOWED":
        sent = rec.get("bytes_sent", obs.result.get("bytes"))
        recv = rec.get("bytes_recv", obs.result.get("bytes"))
        lines.append(
            f"      {PAYLOAD} bytes sent, echoed back intact "
            f"(the agent counted {sent} out / {recv} back)"
        )
    else:
        lines.append(f"      failed: {obs.result.get('error')}")
    return lines


LEGEND = """\
Legend
  ALLOWED    the bytes went through and came back unchanged (checksummed).
  DENIED     the destination pod's agent refused the connection: its L4 AuthorizationPolicy
             did not allow this source (ALLOW policies match on the client's SPIFFE identity,
             which only mesh clients have; plaintext clients have none).
  mTLS       HTTP/2 CONNECT inside mutual TLS to the destination pod's port 15008 (HBONE); both
             ends proved a SPIFFE identity spiffe://<trust domain>/ns/<namespace>/sa/<account>.
  plaintext  plain TCP: at least one side is outside the mesh.
  agent@N    the node agent of node N; it runs the proxies *inside* each mesh pod's network
             namespace (outbound 15001, inbound 15008, inbound plaintext 15006)."""


def describe_cluster(net: ClusterNet, out: TextIO) -> None:
    spec = net.spec
    print(f"Cluster {net.prefix}: {len(spec.nodes)} nodes, {len(spec.pods)} pods", file=out)
    waypoint_keys = {p.key for p in waypoint_pods(spec)}
    for node, nn in net.nodes.items():
        print(f"  {node}: agent at {nn.ip} (netns {nn.netns})", file=out)
        for pod in (p for p in spec.pods if p.node == node):
            mesh = "in the mesh" if is_enrolled(spec, pod) else "not in the mesh"
            if pod.key in waypoint_keys:
                mesh = "waypoint (ztunnel waypoint, speaks HBONE itself)"
            sa = f"sa {pod.service_account}"
            print(f"    pod {pod.key:<22} {net.pods[pod.key].ip}  {sa:<12} {mesh}", file=out)
    for svc in spec.services:
        eps = ", ".join(p.name for p in spec.selected_pods(svc)) or "no endpoints"
        ports = ", ".join(f"{k}->{v}" for k, v in svc.ports.items())
        print(f"  service {svc.hostname} VIP {svc.vip} ports {ports}: {eps}", file=out)
    for doc in spec.policies:
        meta = doc.get("metadata", {})
        body = doc.get("spec") or {}
        if doc.get("kind") == "AuthorizationPolicy":
            via = " via the waypoint" if body.get("targetRefs") or body.get("targetRef") else ""
            what = f" ({body.get('action', 'ALLOW')}{via})"
        else:
            what = ""
        print(f"  {doc.get('kind')} {meta.get('namespace')}/{meta.get('name')}{what}", file=out)


def report(net: ClusterNet, observed: Sequence[Observed], out: TextIO) -> None:
    print("\nTraffic (connections in order; identical outcomes counted once):", file=out)
    for i, same in enumerate(group(net, observed), 1):
        for line in explain(net, same[0], i, len(same)):
            print(line, file=out)
    counts: dict[str, int] = {}
    for obs in observed:
        counts[verdict(obs)] = counts.get(verdict(obs), 0) + 1
    text = ", ".join(f"{n} {v.lower()}" for v, n in sorted(counts.items()))
    print(f"\nSummary: {len(observed)} connections: {text}\n", file=out)
    print(LEGEND, file=out)


def forward_admin_ports(net: ClusterNet) -> dict[str, PortForward]:
    """One host loopback port per agent's admin (the UI): 15000, 15001, ... or any free one."""
    forwards: dict[str, PortForward] = {}
    for i, (node, nn) in enumerate(net.nodes.items()):
        for port in (ADMIN_PORT + i, 0):
            fwd = PortForward(nn.netns, ("127.0.0.1", ADMIN_PORT), ("127.0.0.1", port))
            try:
                fwd.start()
            except OSError:
                continue
            forwards[node] = fwd
            break
    return forwards


def describe_ca(ca: CAService, out: TextIO) -> None:
    host = ca.host
    print(
        f"  CA service: ztunnel ca serve at {host.ip}:{CA_PORT} (netns {host.netns}); "
        "it signs a pod's identity only for the node agent of the pod's node.\n"
        "  Agents hold no CA key: each has its own token (AUTH_TOKEN) and the root "
        "(CA_ROOT_CA).",
        file=out,
    )


def report_ca(ca: CAService, out: TextIO) -> None:
    """What the CA service did for this run (from its metrics)."""
    try:
        issued, refused = int(ca.issued()), int(ca.refusals())
    except (OSError, RuntimeError, ValueError) as exc:
        print(f"\nCA service: metrics unavailable ({exc})", file=out)
        return
    print(
        f"\nCA service: {issued} certificates issued over the Istio CA protocol, "
        f"{refused} requests refused",
        file=out,
    )


REDIRECTION = {
    RedirectMode.IPTABLES: "redirection: iptables rules in each mesh pod",
    RedirectMode.EBPF: "redirection: eBPF programs in each mesh pod, no iptables",
}


def describe_redirection(agents: dict[str, AgentProcess], out: TextIO) -> None:
    """What each agent installed in its pods, from its config_dump (the ctl view)."""
    for node, agent in agents.items():
        dump = config_dump(agent)
        summary = dump.get("redirection") or {}
        pods = [
            (state.get("info", {}), state.get("redirection") or {})
            for state in (dump.get("workloadState") or {}).values()
        ]
        line = f"  agent@{node}: {summary.get('mode', '?')}"
        if summary.get("build"):
            ids = ", ".join(f"{n}#{i}" for n, i in (summary.get("programs") or {}).items())
            line += f", build {summary['build']} ({ids}), pinned in {summary.get('pin_dir')}"
        print(line, file=out)
        for info, red in sorted(pods, key=lambda p: str(p[0].get("name"))):
            print(
                f"    {info.get('namespace')}/{info.get('name')}: {_pod_redirection(red)}", file=out
            )


def _pod_redirection(red: dict[str, Any]) -> str:
    if red.get("mode") == "ebpf":
        progs = red.get("programs") or []
        hooks = ", ".join(f"{p['device']} {p['direction']} {p['name']}" for p in progs)
        link = red.get("sk_lookup") or {}
        return f"eBPF {hooks}; sk_lookup link #{link.get('link_id', '?')}"
    if red.get("mode") == "iptables":
        chains = sorted({c for cs in (red.get("chains") or {}).values() for c in cs})
        return f"iptables chains {', '.join(chains)}"
    return str(red.get("mode", "not reported"))


def keep_instructions(
    net: ClusterNet,
    cluster_file: Path,
    out: TextIO,
    ui: dict[str, PortForward] | None = None,
    ca: CAService | None = None,
    waypoints: dict[str, WaypointProcess] | None = None,
    redirect: RedirectMode = RedirectMode.IPTABLES,
) -> None:
    print(
        "\nThe cluster keeps running. Open the UI (live graph of each agent's connections):",
        file=out,
    )
    for node, fwd in (ui or {}).items():
        print(f"  UI agent@{node}: http://127.0.0.1:{fwd.port}/", file=out)
    print("Look inside:", file=out)
    for node, nn in net.nodes.items():
        print(f"  agent@{node}: admin http://127.0.0.1:15000 inside netns {nn.netns}", file=out)
        print(f"    ip netns exec {nn.netns} curl -s 127.0.0.1:15000/config_dump", file=out)
        print(
            f"    ip netns exec {nn.netns} ztunnel ctl --admin http://127.0.0.1:15000 workloads",
            file=out,
        )
        print(f"    ip netns exec {nn.netns} curl -s 127.0.0.1:15020/metrics", file=out)
    print("  pods (run anything inside with `ip netns exec <netns> ...`):", file=out)
    for pod in net.pods.values():
        print(f"    {pod.key:<22} {pod.ip}  netns {pod.netns}", file=out)
    first = next(iter(net.pods.values()))
    if redirect is RedirectMode.EBPF:
        where = f"nsenter --net={first.netns_path}"
        print(f"  programs in a pod: {where} tc filter show dev eth0 ingress", file=out)
        print(f"                     {where} bpftool net show", file=out)
        node = next(iter(net.nodes))
        print(f"  pinned state:      ls -R {net.bpf_pin_dir(node)}", file=out)
    else:
        print(f"  rules in a pod:  ip netns exec {first.netns} iptables-save", file=out)
    print(f"  agent logs:      {net.log_dir}/agent-*.log", file=out)
    if ca is not None:
        print(
            f"  CA service:      ip netns exec {ca.host.netns} curl -s 127.0.0.1:{METRICS_PORT}"
            f"/metrics  (log {ca.log_path})",
            file=out,
        )
    for line in waypoint_scene.keep_lines(net, waypoints or {}):
        print(line, file=out)
    print(
        f"  edit {cluster_file} (e.g. a namespace label) and the agents re-enroll live.", file=out
    )
    print("Press Ctrl-C to tear everything down.", file=out, flush=True)


# -- running it ------------------------------------------------------------------------


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM and SIGINT both end the demo with a teardown. SIGINT is set explicitly: a
    process started in the background by a shell without job control inherits it ignored,
    and "Press Ctrl-C" (or ``kill -INT``) must still work there."""
    previous = {
        signal.SIGTERM: signal.signal(signal.SIGTERM, _raise_interrupt),
        signal.SIGINT: signal.signal(signal.SIGINT, signal.default_int_handler),
    }
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _demo_spec_file(cluster_file: str | None, workdir: Path) -> tuple[ClusterSpec, Path]:
    if cluster_file is not None:
        path = Path(cluster_file).resolve()
        return load_spec(path), path
    text = resources.files("ztunnel.cluster").joinpath("demo.yaml").read_text(encoding="utf-8")
    path = workdir / "cluster.yaml"
    path.write_text(text)
    return loads_spec(text, str(path)), path


@contextlib.contextmanager
def _signals_ignored() -> Iterator[None]:
    """Teardown must finish: a second Ctrl-C would otherwise leave namespaces behind."""
    previous = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


class Demo:
    def __init__(
        self,
        keep: bool,
        cluster_file: str | None,
        out: TextIO,
        redirect: RedirectMode = RedirectMode.IPTABLES,
    ) -> None:
        self.keep, self.cluster_file, self.out = keep, cluster_file, out
        self.redirect = redirect
        self.net: ClusterNet | None = None
        self.agents: dict[str, AgentProcess] = {}
        self.ca: CAService | None = None
        self.programs: dict[str, Any] = {}
        self.forwards: dict[str, PortForward] = {}
        self.waypoints: dict[str, WaypointProcess] = {}
        self.workdir = Path(tempfile.mkdtemp(prefix="ztunnel-demo-"))

    def run(self) -> int:
        out = self.out
        spec, path = _demo_spec_file(self.cluster_file, self.workdir)
        cleanup_stale()
        started = time.monotonic()
        print("Building the cluster (network namespaces, bridge, veths)...", file=out, flush=True)
        self.net = net = build(spec)
        print("Starting the CA service (ztunnel ca serve)...", file=out, flush=True)
        self.ca = ca = start_ca_service(net, self.workdir / "ca-service")
        describe_cluster(net, out)
        describe_ca(ca, out)
        print(
            f"\nStarting one agent per node ({REDIRECTION[self.redirect]}) and the pod programs...",
            file=out,
            flush=True,
        )
        env = {"REDIRECT_MODE": self.redirect.value}
        for node in net.nodes:
            self.agents[node] = start_agent(net, node, path, ca, extra_env=env)
        self.waypoints = start_waypoints(net, path, ca)
        self.programs = apps.start_pod_programs(net)
        for agent in self.agents.values():
            # Returns as soon as ready (seconds); the bound only matters on a machine so busy
            # that starting every process and compiling the BPF programs takes a minute.
            wait_ready(agent, timeout=90)
        for wp in self.waypoints.values():
            wait_waypoint_ready(wp, timeout=20)
        describe_redirection(self.agents, out)
        for pod in spec.pods:
            for port in pod.ports if pod.program else ():
                apps.wait_listening(net, pod.key, port, timeout=10)
        logs = AccessLogs(self.agents)
        observed = run_traffic(net, logs, plan_traffic(spec))
        report(net, observed, out)
        report_ca(ca, out)
        for problem in waypoint_scene.run_scene(net, self.waypoints, self.agents, out):
            print(f"  problem: {problem}", file=out)
        print(f"\n(demo ran in {time.monotonic() - started:.1f}s)", file=out, flush=True)
        if self.keep:
            self.forwards = forward_admin_ports(net)
            keep_instructions(net, path, out, self.forwards, ca, self.waypoints, self.redirect)
            while True:
                signal.pause()
        return 0

    def teardown(self) -> None:
        """Agents first (graceful drain), then programs, then the network; always all of it."""
        for fwd in self.forwards.values():
            with contextlib.suppress(Exception):
                fwd.stop()
        with contextlib.suppress(Exception):
            stop_waypoints(self.waypoints)
        with contextlib.suppress(Exception):
            stop_agents(self.agents)
        if self.ca is not None:
            with contextlib.suppress(Exception):
                self.ca.stop()
        with contextlib.suppress(Exception):
            apps.stop_programs(self.programs)
        if self.net is not None:
            self.net.teardown()
        shutil.rmtree(self.workdir, ignore_errors=True)


def demo_redirect_mode(flag: str | None, env: Mapping[str, str]) -> RedirectMode:
    """``--redirect``, else ``REDIRECT_MODE``, else iptables; the demo needs a mode that
    redirects by itself (raises ConfigError otherwise)."""
    name = "--redirect" if flag is not None else "REDIRECT_MODE"
    raw = flag if flag is not None else env.get("REDIRECT_MODE", RedirectMode.IPTABLES.value)
    try:
        mode = RedirectMode(raw.strip().lower())
    except ValueError:
        mode = RedirectMode.NONE
    if mode not in REDIRECTION:
        raise ConfigError(name, "", f"the demo runs with iptables or ebpf, got {raw!r}")
    return mode


def check_redirect_mode(mode: RedirectMode) -> None:
    """eBPF mode's requirements, checked before anything is built (EbpfUnavailable)."""
    if mode is RedirectMode.EBPF:
        check_environment(BPF_ROOT, default_source_dir())


def demo_command(
    keep: bool,
    cluster_file: str | None,
    out: TextIO | None = None,
    redirect: str | None = None,
) -> int:
    """``ztunnel demo [--keep] [--cluster FILE] [--redirect MODE]``; exit 0 when it ran."""
    out = out or sys.stdout
    if os.geteuid() != 0:
        print(
            "ztunnel demo: needs root (it creates network namespaces and iptables rules); "
            "try: sudo ztunnel demo",
            file=sys.stderr,
        )
        return EXIT_NOT_ROOT
    try:
        mode = demo_redirect_mode(redirect, os.environ)
        check_redirect_mode(mode)
    except ConfigError as exc:
        print(f"ztunnel demo: {exc}", file=sys.stderr)
        return EXIT_NOT_ROOT
    demo = Demo(keep, cluster_file, out, mode)
    try:
        with _sigterm_as_interrupt():
            return demo.run()
    except KeyboardInterrupt:
        print("\nInterrupted; tearing down.", file=out, flush=True)
        return 0 if keep else 130
    except (ZtunnelError, RuntimeError, OSError, TimeoutError) as exc:
        print(f"ztunnel demo: {exc}", file=sys.stderr)
        return EXIT_FAILED
    finally:
        with _signals_ignored():
            demo.teardown()
        what = "rules" if demo.redirect is RedirectMode.IPTABLES else "programs, pins"
        print(f"Torn down: no namespaces, {what} or processes left.", file=out, flush=True)
