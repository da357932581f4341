"""Run the waypoints of a simulated cluster: ``ztunnel waypoint`` in each waypoint pod's netns.

A waypoint pod is a pod labelled ``gateway.networking.k8s.io/gateway-name: <gateway>`` where
``<gateway>`` is an ``istio-waypoint`` Gateway of the cluster file (Istio's deployment
controller labels its waypoint pods so). Its process reads the same cluster file (mesh,
routes, L7 policies), has its pod's identity (namespace, service account), and writes JSON
logs to ``<log_dir>/waypoint-<ns>-<name>.log``.

Certificates: from the cluster's CA service (``testing/ca_service.py``), like Istio's
waypoint asks istiod for its own identity with its own service-account token: the pod gets
a token of its own (added to the service's token file, identity = the pod's, no
impersonation) and ``CA_ADDRESS`` / ``CA_ROOT_CA`` / ``AUTH_TOKEN``. Or, standalone, a CA
directory (``CA_DIR``).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ztunnel.cluster.net import ClusterNet
from ztunnel.model.identity import Identity
from ztunnel.sources.clusterfile.layout import PodNet
from ztunnel.sources.clusterfile.spec import ClusterSpec, PodSpec
from ztunnel.sources.waypoints import GATEWAY_NAME_LABEL, is_waypoint_gateway
from ztunnel.testing import http as testing_http
from ztunnel.testing.ca_service import CAService
from ztunnel.testing.process import LoggedProcess, project_pythonpath

_CA_VARIABLES = ("CA_DIR", "FAKE_CA", "CA_ADDRESS", "CA_ROOT_CA", "AUTH_TOKEN", "XDS_ADDRESS")
ADMIN_PORT = 15000
STATS_PORT = 15020
READINESS_PORT = 15021


def waypoint_pods(spec: ClusterSpec) -> list[PodSpec]:
    """Pods that are instances of an ``istio-waypoint`` Gateway of the file."""
    gateways = {
        (str(d["metadata"].get("namespace") or "default"), str(d["metadata"]["name"]))
        for d in spec.policies
        if is_waypoint_gateway(d)
    }
    return [p for p in spec.pods if (p.namespace, p.labels.get(GATEWAY_NAME_LABEL, "")) in gateways]


@dataclass
class WaypointProcess(LoggedProcess):
    pod: PodNet
    gateway: str
    proc: subprocess.Popen[bytes]
    log_path: Path

    def requests(self) -> list[dict[str, Any]]:
        """Its access log: one record per HTTP request."""
        return [r for r in self.log_lines() if r.get("message") == "request complete"]

    def get(self, port: int, path: str, timeout: float = 5.0) -> tuple[int, bytes]:
        return pod_http_get(self.pod, port, path, timeout=timeout)

    def config_dump(self) -> dict[str, Any]:
        status, body = self.get(ADMIN_PORT, "/config_dump")
        if status != 200:
            raise RuntimeError(f"waypoint config_dump: HTTP {status}")
        data: dict[str, Any] = json.loads(body)
        return data


def pod_http_get(
    pod: PodNet, port: int, path: str, *, timeout: float = 2.0, host: str = "127.0.0.1"
) -> tuple[int, bytes]:
    """A tiny HTTP/1.1 GET to a port inside the pod netns: (status, body)."""
    return testing_http.get_in(pod.netns, port, path, timeout=timeout, host=host)


def waypoint_token(ca: CAService, pod: PodSpec, trust_domain: str = "cluster.local") -> Path:
    """A token of the pod's own identity (no impersonation), added to the CA service's file
    (which it re-reads on change); returns the token file the pod's process reads."""
    token = secrets.token_urlsafe(24)
    path = ca.workdir / "tokens" / f"waypoint-{pod.namespace}-{pod.name}"
    path.write_text(token + "\n")
    tokens_file = ca.workdir / "tokens.yaml"
    doc = yaml.safe_load(tokens_file.read_text()) or {}
    entries = [e for e in doc.get("tokens") or [] if not str(e.get("token", "")).startswith("#")]
    identity = str(Identity(trust_domain, pod.namespace, pod.service_account))
    entries.append({"token": token, "node": pod.node, "identity": identity})
    tmp = tokens_file.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump({"tokens": entries}))
    tmp.replace(tokens_file)  # atomic: the service never reads half a file
    return path


def _ca_env(ca: CAService | str | os.PathLike[str], pod: PodSpec) -> dict[str, str]:
    if isinstance(ca, CAService):
        return {
            "CA_ADDRESS": ca.address,
            "CA_ROOT_CA": str(ca.root_cert),
            "AUTH_TOKEN": str(waypoint_token(ca, pod)),
        }
    return {"CA_DIR": os.fspath(ca)}


def start_waypoint(
    net: ClusterNet,
    pod: PodSpec,
    cluster_file: str | os.PathLike[str],
    ca: CAService | str | os.PathLike[str],
    *,
    extra_env: Mapping[str, str] | None = None,
    config: tuple[str, ...] = (),
) -> WaypointProcess:
    place = net.pods[pod.key]
    gateway = pod.labels[GATEWAY_NAME_LABEL]
    log_path = net.log_dir / f"waypoint-{pod.namespace}-{pod.name}.log"
    env = {k: v for k, v in os.environ.items() if k not in _CA_VARIABLES}
    env.update(_ca_env(ca, pod))
    env.update(
        POD_NAMESPACE=pod.namespace,
        SERVICE_ACCOUNT=pod.service_account,
        GATEWAY_NAME=gateway,
        LOG_FORMAT="json",
        PYTHONUNBUFFERED="1",
        PYTHONPATH=project_pythonpath(env),
    )
    env.update(extra_env or {})
    argv = [
        "nsenter", f"--net={place.netns_path}", "--",
        sys.executable, "-m", "ztunnel.cli", "waypoint",
        "--cluster", os.fspath(cluster_file), "--cluster-prefix", net.prefix,
    ]  # fmt: skip
    for path in config:
        argv += ["--config", path]
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env
        )
    return WaypointProcess(place, f"{pod.namespace}/{gateway}", proc, log_path)


def wait_waypoint_ready(wp: WaypointProcess, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    last: tuple[int, bytes] = (0, b"")
    while time.monotonic() < deadline:
        if not wp.alive:
            raise RuntimeError(
                f"waypoint {wp.pod.key} exited ({wp.proc.returncode}):\n{wp.log_tail()}"
            )
        with contextlib.suppress(OSError):
            last = wp.get(READINESS_PORT, "/healthz/ready", timeout=2.0)
            if last[0] == 200:
                return
        time.sleep(0.1)
    raise RuntimeError(
        f"waypoint {wp.pod.key} not ready after {timeout}s ({last[0]} {last[1]!r}):\n"
        f"{wp.log_tail()}"
    )


def start_waypoints(
    net: ClusterNet,
    cluster_file: str | os.PathLike[str],
    ca: CAService | str | os.PathLike[str],
    **kwargs: Any,
) -> dict[str, WaypointProcess]:
    """One process per waypoint pod of the cluster file, by ``ns/pod``."""
    return {
        p.key: start_waypoint(net, p, cluster_file, ca, **kwargs) for p in waypoint_pods(net.spec)
    }


def stop_waypoints(waypoints: Mapping[str, WaypointProcess], timeout: float = 10.0) -> None:
    for wp in waypoints.values():
        if wp.alive:
            wp.proc.send_signal(signal.SIGTERM)
    for wp in waypoints.values():
        wp.stop(timeout)
