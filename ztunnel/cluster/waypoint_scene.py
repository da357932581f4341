"""The demo's waypoint scene: HTTP through ``ztunnel waypoint``, explained.

For every Service of the cluster file bound to a waypoint (``istio.io/use-waypoint``) with an
HTTP port, the first mesh client pod sends, through the Service VIP:

1. ``GET /``: shown with its answer and the L7 decision (the deciding policy, from the
   waypoint's access log);
2. ``GET /admin``: likewise (the demo file denies it);
3. ``SPLIT_REQUESTS`` requests on one keep-alive connection: answers counted per version
   (the pod that served each one, by its version label);
4. one connection straight to a backend pod, around the waypoint: what the pod's agent says.

The L4 scene (``demo.py``) leaves these Services, their pods and the waypoint pods alone.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TextIO

from ztunnel.cluster import apps
from ztunnel.cluster.net import ClusterNet
from ztunnel.model.workload import AppProtocol
from ztunnel.sources.clusterfile.mesh import in_mesh, index_waypoints
from ztunnel.sources.clusterfile.spec import ClusterSpec, PodSpec, ServiceSpec
from ztunnel.sources.waypoints import ServiceInfo, app_protocol, service_waypoint
from ztunnel.testing.harness import AgentProcess
from ztunnel.testing.waypoint import WaypointProcess, waypoint_pods

SPLIT_REQUESTS = 100
HTTP_APP = ("python", "-m", "ztunnel.cluster.http_app")
LOG_SETTLE = 2.0


@dataclass(frozen=True, slots=True)
class Bound:
    service: ServiceSpec
    port: int
    waypoint: str  # ns/name of its waypoint Gateway


def bound_services(spec: ClusterSpec) -> list[Bound]:
    """Services with a waypoint and an HTTP port (by appProtocol or name), in file order."""
    index = index_waypoints(spec)
    out = []
    for svc in spec.services:
        ns = spec.namespaces.get(svc.namespace)
        info = ServiceInfo(svc.name, svc.namespace, svc.hostname, svc.labels)
        wp = service_waypoint(index, info, ns.labels if ns is not None else {})
        if wp is None:
            continue
        for port, pinfo in svc.port_info.items():
            if app_protocol(port, pinfo.name, pinfo.app_protocol) is AppProtocol.HTTP11:
                out.append(Bound(svc, port, wp.key))
                break
    return out


def _referenced(spec: ClusterSpec) -> set[tuple[str, str]]:
    """(namespace, name) of Services a route attaches to or an L7 policy targets."""
    found = set()
    for doc in spec.policies:
        meta, body = doc.get("metadata") or {}, doc.get("spec") or {}
        refs = [*(body.get("parentRefs") or []), *(body.get("targetRefs") or [])]
        for ref in refs:
            if isinstance(ref, Mapping) and ref.get("kind") == "Service":
                found.add((str(ref.get("namespace") or meta.get("namespace")), str(ref["name"])))
    return found


def scene_services(spec: ClusterSpec) -> list[Bound]:
    """The bound Services the scene talks to: those with routes or L7 policies (a backend
    that only a route points at is shown through its front Service), else all of them."""
    bound = bound_services(spec)
    referenced = _referenced(spec)
    front = [b for b in bound if (b.service.namespace, b.service.name) in referenced]
    return front or bound


def excluded_from_l4(spec: ClusterSpec) -> tuple[set[str], set[str]]:
    """(pod keys, service keys) the L4 scene skips: waypoint pods, HTTP services behind a
    waypoint and their pods (they answer HTTP, not the L4 scene's echo)."""
    bound = bound_services(spec)
    pods = {p.key for p in waypoint_pods(spec)}
    for b in bound:
        pods |= {p.key for p in spec.selected_pods(b.service)}
    return pods, {b.service.key for b in bound}


def _client(spec: ClusterSpec, skip: set[str]) -> PodSpec | None:
    for pod in spec.pods:
        if pod.program is None and pod.key not in skip and in_mesh(spec, pod):
            return pod
    return None


def _load(net: ClusterNet, client: PodSpec, to: str, path: str, count: int = 1) -> dict[str, Any]:
    argv = [*HTTP_APP, "load", "--to", to, "--path", path, "--count", str(count)]
    proc = apps.run_in_pod(net, client.key, argv, timeout=60)
    try:
        result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        result = {"ok": False, "error": (proc.stderr.strip() or "no output")[-300:]}
    return result


def _record(wp: WaypointProcess | None, path: str) -> dict[str, Any] | None:
    if wp is None:
        return None
    deadline = time.monotonic() + LOG_SETTLE
    while True:
        found = [r for r in wp.requests() if r.get("path") == path]
        if found or time.monotonic() > deadline:
            return found[-1] if found else None
        time.sleep(0.05)


def _decision(record: dict[str, Any] | None) -> str:
    if record is None:
        return "no access-log record from the waypoint"
    reason, policy = record.get("authz"), record.get("authz.policy")
    if policy:
        verb = "allowed" if record.get("response_code") != 403 else "denied"
        return f"{verb} by policy {policy} ({reason})"
    return f"no L7 policy decided ({reason or 'none apply'})"


def _versions(spec: ClusterSpec, pods: Mapping[str, int]) -> str:
    by_version: Counter[str] = Counter()
    for name, n in pods.items():
        found = [p for p in spec.pods if p.name == name]
        label = found[0].labels.get("version", name) if found else name
        by_version[label] += n
    return ", ".join(f"{v}: {n}" for v, n in sorted(by_version.items()))


def run_scene(
    net: ClusterNet,
    waypoints: Mapping[str, WaypointProcess],
    agents: Mapping[str, AgentProcess],
    out: TextIO,
) -> list[str]:
    """Run the scene, print it; returns the problems seen (empty when all went as planned)."""
    spec = net.spec
    bound = scene_services(spec)
    if not bound:
        return []
    skip, _ = excluded_from_l4(spec)
    client = _client(spec, skip)
    if client is None:
        return ["waypoint scene: no idle mesh client pod"]
    print("\nWaypoint (L7): HTTP through ztunnel waypoint", file=out)
    by_gateway = {w.gateway: w for w in waypoints.values()}
    problems: list[str] = []
    for b in bound:
        wp = by_gateway.get(b.waypoint)
        to = f"{b.service.vip}:{b.port}"
        where = f"waypoint {b.waypoint}" + (f" ({wp.pod.ip})" if wp else "")
        print(f"  service {b.service.hostname} (VIP {to}) -> {where}", file=out)
        for path in ("/", "/admin"):
            result = _load(net, client, to, path)
            status = next(iter(result.get("statuses") or {"-": 0}))
            pod = next(iter(result.get("pods") or {"-": 0}))
            served = f", served by {pod}" if status == "200" else ""
            print(
                f"    {client.name}: GET {path:<7} -> {status}{served}; "
                f"{_decision(_record(wp, path))}",
                file=out,
            )
        split = _load(net, client, to, "/split", SPLIT_REQUESTS)
        if split.get("ok"):
            print(
                f"    {SPLIT_REQUESTS} requests on one keep-alive connection, answers per "
                f"version: {_versions(spec, split.get('pods') or {})}",
                file=out,
            )
        else:
            problems.append(f"split requests to {to}: {split.get('error')}")
        problems += _around(net, agents, client, b, out)
    return problems


def _refusal(agents: Mapping[str, AgentProcess], client: PodSpec, pod: PodSpec) -> str | None:
    """The error the agents logged for the client's connection to ``pod``, if any."""
    deadline = time.monotonic() + LOG_SETTLE
    while True:
        for agent in agents.values():
            for record in reversed(agent.log_lines()):
                if (
                    record.get("src.workload") == client.name
                    and record.get("dst.workload") == pod.name
                    and record.get("error")
                ):
                    return str(record["error"])
        if time.monotonic() > deadline:
            return None
        time.sleep(0.05)


def _around(
    net: ClusterNet,
    agents: Mapping[str, AgentProcess],
    client: PodSpec,
    b: Bound,
    out: TextIO,
) -> list[str]:
    """One connection straight to a backend pod: what the pod's agent says."""
    backends = net.spec.selected_pods(b.service)
    if not backends:
        return []
    pod = backends[0]
    target = f"{net.pods[pod.key].ip}:{b.service.ports[b.port]}"
    result = _load(net, client, target, "/around")
    error = None if result.get("ok") else _refusal(agents, client, pod)
    if result.get("ok"):
        outcome = f"{next(iter(result.get('statuses') or {'-': 0}))} (nothing refuses it)"
    elif error is not None:
        outcome = f"refused by the pod's agent ({error}: only the waypoint is allowed)"
    else:
        outcome = f"failed ({result.get('error')})"
    print(
        f"    {client.name} -> {pod.name} directly ({target}), around the waypoint: {outcome}",
        file=out,
    )
    return [] if result.get("ok") or error is not None else [f"around {target}: {outcome}"]


def keep_lines(net: ClusterNet, waypoints: Mapping[str, WaypointProcess]) -> list[str]:
    """What ``--keep`` prints for the waypoint: curl through it, and its admin."""
    spec = net.spec
    bound = scene_services(spec)
    skip, _ = excluded_from_l4(spec)
    client = _client(spec, skip)
    if not bound or client is None:
        return []
    netns = net.pods[client.key].netns
    lines = ["  through the waypoint (HTTP, from the client pod):"]
    for b in bound[:1]:
        base = f"http://{b.service.vip}" + ("" if b.port == 80 else f":{b.port}")
        lines += [
            f"    ip netns exec {netns} curl -s {base}/",
            f"    ip netns exec {netns} curl -s -i {base}/admin        # 403 RBAC: access denied",
            f"    ip netns exec {netns} curl -s -X POST {base}/        # 403: only GET allowed",
        ]
    for wp in waypoints.values():
        ns = wp.pod.netns
        lines += [
            f"  waypoint {wp.gateway}: admin http://127.0.0.1:15000 inside netns {ns}",
            f"    ip netns exec {ns} ztunnel ctl --admin http://127.0.0.1:15000 routes",
            f"    ip netns exec {ns} ztunnel ctl --admin http://127.0.0.1:15000 l7-policies",
            f"    ip netns exec {ns} ztunnel ctl --admin http://127.0.0.1:15000 explain "
            f"--to {bound[0].service.vip}:{bound[0].port} --method GET --path /admin",
            f"    ip netns exec {ns} curl -s 127.0.0.1:15020/metrics | grep istio_requests_total",
            f"    log: {wp.log_path}",
        ]
    return lines


__all__: Sequence[str] = (
    "Bound",
    "bound_services",
    "excluded_from_l4",
    "keep_lines",
    "run_scene",
)
