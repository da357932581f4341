"""``ztunnel ca serve`` in the simulated cluster: the CA runs beside the agents, they hold no key.

``start_ca_service`` attaches a control-plane netns ``<prefix>-ca`` to the pod network
at 10.244.0.2 (reachable from every node netns), writes what the service needs from the
cluster file — a tokens file with one random token per node agent (identity
``istio-system/ztunnel``) and a placement file listing, per node, the identities of the
pods scheduled there — and runs ``python -m ztunnel.cli ca serve`` in that netns.

Only the CA process reads the CA directory. An agent gets ``ca.agent_env(node)``:
``CA_ADDRESS`` (by IP; the serving certificate carries it), ``CA_ROOT_CA`` (a copy of the
root, outside the CA directory) and ``AUTH_TOKEN`` (its own token file): the same three
variables ztunnel gets in a cluster.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from pathlib import Path

import yaml
from prometheus_client.parser import text_string_to_metric_families

from ztunnel.cluster.net import ClusterNet
from ztunnel.identity.ca import ROOT_CERT, init_ca_dir
from ztunnel.model.identity import Identity
from ztunnel.sources.clusterfile.layout import NodeNet
from ztunnel.sources.clusterfile.spec import ClusterSpec
from ztunnel.testing.harness import http_get
from ztunnel.testing.process import LoggedProcess, project_pythonpath

CA_IP = IPv4Address("10.244.0.2")
CA_PORT = 15012
METRICS_PORT = 15014
NODE_AGENT = ("istio-system", "ztunnel")  # the service account agents' tokens belong to


@dataclass
class CAService(LoggedProcess):
    """A running ``ztunnel ca serve`` of one simulated cluster."""

    host: NodeNet
    proc: subprocess.Popen[bytes]
    workdir: Path
    log_path: Path
    tokens: dict[str, Path] = field(default_factory=dict)  # node -> token file

    @property
    def address(self) -> str:
        return f"https://{self.host.ip}:{CA_PORT}"

    @property
    def root_cert(self) -> Path:
        return self.workdir / "trust" / ROOT_CERT

    @property
    def ca_dir(self) -> Path:
        """The CA key's directory: only the CA process is given this path."""
        return self.workdir / "ca"

    def agent_env(self, node: str) -> dict[str, str]:
        return {
            "CA_ADDRESS": self.address,
            "CA_ROOT_CA": str(self.root_cert),
            "AUTH_TOKEN": str(self.tokens[node]),
        }

    def metrics(self) -> dict[str, float]:
        """Every sample of its /metrics: ``name{label="v"}`` (labels sorted) -> value."""
        status, body = http_get(self.host, METRICS_PORT, "/metrics", timeout=5.0)
        if status != 200:
            raise RuntimeError(f"ca serve metrics: HTTP {status}")
        out: dict[str, float] = {}
        for family in text_string_to_metric_families(body.decode()):
            for sample in family.samples:
                labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
                out[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
        return out

    def refusals(self) -> float:
        return sum(
            v for k, v in self.metrics().items() if k.startswith("ztunnel_ca_refusals_total")
        )

    def issued(self) -> float:
        return self.metrics().get("ztunnel_ca_certificates_issued_total", 0.0)

    def stop(self, timeout: float = 5.0) -> int:
        return super().stop(timeout)  # the CA has nothing to drain: a shorter wait


def placement(spec: ClusterSpec, trust_domain: str = "cluster.local") -> dict[str, list[str]]:
    """Which identities have a pod on which node (the pod list ``ca serve`` checks)."""
    nodes: dict[str, list[str]] = {node: [] for node in spec.nodes}
    for pod in spec.pods:
        spiffe = str(Identity(trust_domain, pod.namespace, pod.service_account))
        if spiffe not in nodes[pod.node]:
            nodes[pod.node].append(spiffe)
    return nodes


def write_inputs(spec: ClusterSpec, workdir: Path, trust_domain: str) -> dict[str, Path]:
    """The tokens and placement files, and one token file per node agent; returns those."""
    agent = str(Identity(trust_domain, *NODE_AGENT))
    tokens_dir = workdir / "tokens"
    tokens_dir.mkdir(mode=0o700)
    entries, files = [], {}
    for node in spec.nodes:
        token = secrets.token_urlsafe(24)
        entries.append({"token": token, "node": node, "identity": agent})
        files[node] = tokens_dir / node
        files[node].write_text(token + "\n")
    (workdir / "tokens.yaml").write_text(yaml.safe_dump({"tokens": entries}))
    placed = {"nodes": placement(spec, trust_domain)}
    (workdir / "placement.yaml").write_text(yaml.safe_dump(placed))
    return files


def start_ca_service(
    net: ClusterNet,
    workdir: Path,
    *,
    trust_domain: str = "cluster.local",
    ready_timeout: float = 20.0,
) -> CAService:
    """Create the CA, its inputs and its netns, start it and wait until it listens."""
    workdir.mkdir(parents=True, exist_ok=True)
    ca_dir = workdir / "ca"
    ca_dir.mkdir(mode=0o700)
    init_ca_dir(ca_dir, trust_domain=trust_domain)
    (workdir / "trust").mkdir()
    shutil.copy(ca_dir / ROOT_CERT, workdir / "trust" / ROOT_CERT)
    tokens = write_inputs(net.spec, workdir, trust_domain)
    host = net.attach_host("ca", CA_IP)
    log_path = net.log_dir / "ca-serve.log"
    argv = [
        "ip", "netns", "exec", host.netns,
        sys.executable, "-m", "ztunnel.cli", "ca", "serve",
        "--ca-dir", str(ca_dir),
        "--tokens", str(workdir / "tokens.yaml"),
        "--placement", str(workdir / "placement.yaml"),
        "--host", str(CA_IP), "--port", str(CA_PORT), "--ip", str(CA_IP),
        "--metrics-port", str(METRICS_PORT),
        "--trust-domain", trust_domain,
    ]  # fmt: skip
    env = dict(os.environ)
    env["PYTHONPATH"] = project_pythonpath(env)
    env["PYTHONUNBUFFERED"] = "1"
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env
        )
    service = CAService(host, proc, workdir, log_path, tokens)
    _wait_listening(service, ready_timeout)
    return service


def _wait_listening(service: CAService, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not service.alive:
            code = service.proc.returncode
            raise RuntimeError(f"ca serve exited ({code}):\n{service.log_tail()}")
        text = service.log_path.read_text(errors="replace")
        if "ca serve: listening on" in text and "ca serve: metrics on" in text:
            return
        time.sleep(0.05)
    service.stop()
    raise RuntimeError(f"ca serve did not start in {timeout}s:\n{service.log_tail()}")
