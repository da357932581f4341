"""deploy/ and the Dockerfile: valid Kubernetes objects (offline OpenAPI schemas), and in
agreement with the code: env vars, ports, probes, mounts, grace period, RBAC against what
the Kubernetes source reads and writes, the tools the image must carry, and (as root) each
capability proven necessary with the exact set the manifest grants."""

from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

import ztunnel.sources.kubernetes as k8s
from ztunnel.config import Config, RedirectMode, parse_address, termination_deadline
from ztunnel.redirect.ebpf.build import SOURCE_DIR_ENV, remove_tree
from ztunnel.redirect.ebpf.environment import HEADERS_ENV, TOOLS
from ztunnel.sources.kubernetes.annotate import annotate_enrolled
from ztunnel.sources.kubernetes.client import ApiClient
from ztunnel.sources.kubernetes.derive import Settings
from ztunnel.sources.kubernetes.protocol import PODS
from ztunnel.sources.kubernetes.source import KubernetesPodSource

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S_VERSION = "1.35.0"
CAPS = {"NET_ADMIN", "SYS_ADMIN", "NET_RAW", "SYS_PTRACE"}


def documents() -> list[dict[str, Any]]:
    """The node agent's objects (deploy/waypoint.yaml has its own test file)."""
    docs = []
    for path in sorted(p for p in DEPLOY.glob("*.yaml") if p.name != "waypoint.yaml"):
        docs.extend(d for d in yaml.safe_load_all(path.read_text()) if d)
    return docs


def one(kind: str) -> dict[str, Any]:
    (found,) = [d for d in documents() if d["kind"] == kind]
    return found


def container() -> dict[str, Any]:
    (c,) = one("DaemonSet")["spec"]["template"]["spec"]["containers"]
    return c


def env() -> dict[str, Any]:
    """Container env (values, or the fieldRef path) plus the ConfigMap it loads."""
    out: dict[str, Any] = dict(one("ConfigMap")["data"])
    for e in container()["env"]:
        out[e["name"]] = e.get("value", e.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath"))
    return out


def test_every_object_validates_against_the_kubernetes_schema() -> None:
    docs = documents()
    assert {d["kind"] for d in docs} == {
        "DaemonSet",
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "ConfigMap",
    }
    for doc in docs:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_env_vars_are_ones_the_agent_reads() -> None:
    # TERMINATION_GRACE_PERIOD_SECONDS is read by Config.from_sources (drain deadline).
    known = {*Config.env_names().values(), *k8s.ENV_NAMES, "TERMINATION_GRACE_PERIOD_SECONDS"}
    unknown = set(env()) - known
    assert not unknown, f"the agent reads no such variables: {unknown}"
    values = env()
    assert values["NODE_NAME"] == "spec.nodeName"  # downward API
    assert values["POD_NAME"] == "metadata.name"
    assert values["POD_NAMESPACE"] == "metadata.namespace"
    Config.from_sources({k: v for k, v in values.items() if k in known})


def test_mounts_match_what_the_code_opens() -> None:
    pod_spec = one("DaemonSet")["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod_spec["volumes"]}
    mounts = {m["mountPath"]: volumes[m["name"]] for m in container()["volumeMounts"]}
    values = env()
    assert mounts[values["HOST_PROC"]]["hostPath"]["path"] == "/proc"
    assert "secret" in mounts[values["CA_DIR"]]
    assert "emptyDir" in mounts["/tmp"]  # read-only root: temp files (kubeconfig data)
    # eBPF mode pins under the host's bpffs (a restarted agent finds its programs there).
    pins = Path(values.get("ZTUNNEL_BPF_PIN_DIR", Config().bpf_pin_dir))
    assert mounts["/sys/fs/bpf"]["hostPath"]["path"] == "/sys/fs/bpf"
    assert pins.is_relative_to("/sys/fs/bpf")
    assert len(mounts) == 4, "every mount is used by the code"


def test_the_image_carries_what_ebpf_mode_compiles_and_runs() -> None:
    """bcc, the ebpf/ sources where ZTUNNEL_EBPF_DIR points, a header tree where
    BCC_KERNEL_SOURCE points, and the commands eBPF mode runs (environment.TOOLS)."""
    text = (ROOT / "Dockerfile").read_text()
    envs = dict(re.findall(r"(\w+)=(/\S+)", text.split("\nENV ", 1)[1].split("\n\n", 1)[0]))
    assert set(envs) == {SOURCE_DIR_ENV, HEADERS_ENV}
    assert f"COPY ebpf {envs[SOURCE_DIR_ENV]}" in text
    assert f'cp -rsf "$tree/." {envs[HEADERS_ENV]}/' in text
    for package in ("python3-bpfcc", "bpftool", "linux-headers-", "iproute2", "procps"):
        assert package in text, package
    assert set(TOOLS) <= {"tc", "ip", "nsenter", "sysctl"}  # iproute2, util-linux, procps
    values = env()
    assert Config.from_sources({"REDIRECT_MODE": values["REDIRECT_MODE"]}).redirect_mode in (
        RedirectMode.IPTABLES,
        RedirectMode.EBPF,
    )


def test_ports_and_probe_match_the_agent() -> None:
    values = env()
    stats = parse_address(values["ZTUNNEL_STATS_ADDR"], "ZTUNNEL_STATS_ADDR")
    ready = parse_address(values["ZTUNNEL_READINESS_ADDR"], "ZTUNNEL_READINESS_ADDR")
    assert (stats[1], ready[1]) == (Config().stats_addr[1], Config().readiness_addr[1])
    assert stats[0] == ready[0] == "::"  # reachable by the kubelet and Prometheus
    ports = {p["name"]: p["containerPort"] for p in container()["ports"]}
    assert ports == {"http-monitoring": stats[1], "http-readiness": ready[1]}
    probe = container()["readinessProbe"]["httpGet"]
    assert probe["port"] == ready[1]
    assert probe["path"] in (ROOT / "ztunnel" / "admin" / "server.py").read_text()


def test_grace_period_covers_the_drain_deadline() -> None:
    grace = one("DaemonSet")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    values = env()
    assert int(values["TERMINATION_GRACE_PERIOD_SECONDS"]) == grace
    assert termination_deadline(values) < grace


def test_pod_shape() -> None:
    spec = one("DaemonSet")["spec"]["template"]["spec"]
    assert not spec.get("hostNetwork") and not spec.get("hostPID")
    assert spec["priorityClassName"] == "system-node-critical"
    sc = container()["securityContext"]
    assert sc["privileged"] is False and sc["capabilities"]["drop"] == ["ALL"]
    assert set(sc["capabilities"]["add"]) == CAPS
    assert container()["resources"]["requests"]


def test_rbac_is_exactly_what_the_source_uses() -> None:
    src = KubernetesPodSource(ApiClient(None), Settings(node_name="n"))  # type: ignore[arg-type]
    read = set()
    for reflector in src.reflectors.values():
        for kind in reflector.kinds:
            read.add((kind.group, kind.plural))
    granted: dict[tuple[str, str], set[str]] = {}
    for rule in one("ClusterRole")["rules"]:
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                granted.setdefault((group, resource), set()).update(rule["verbs"])
    writes = {(PODS.group, f"{PODS.plural}/status"): {"patch"}}  # annotate.py
    assert granted == {**{r: {"list", "watch"} for r in read}, **writes}
    assert 'subresource="status"' in Path(annotate_enrolled.__code__.co_filename).read_text()
    binding = one("ClusterRoleBinding")
    (subject,) = binding["subjects"]
    sa = one("ServiceAccount")["metadata"]
    assert binding["roleRef"]["name"] == one("ClusterRole")["metadata"]["name"]
    assert (subject["name"], subject["namespace"]) == (sa["name"], sa["namespace"])
    ds = one("DaemonSet")
    assert ds["spec"]["template"]["spec"]["serviceAccountName"] == sa["name"]
    assert ds["metadata"]["namespace"] == sa["namespace"]


def test_dockerfile_carries_the_tools_and_entrypoint() -> None:
    text = (ROOT / "Dockerfile").read_text()
    (base,) = [ln for ln in text.splitlines() if ln.startswith("FROM ")]
    assert base.startswith("FROM debian:")
    packages = set(text.split("install -y --no-install-recommends", 1)[1].split("&&", 1)[0].split())
    packages.discard("\\")
    # The executables the agent runs, and the Debian package of each.
    used = {
        "iptables-restore": "iptables",
        "ip6tables-save": "iptables",
        "ip": "iproute2",
        "nsenter": "util-linux",
    }
    code = "".join(p.read_text() for p in (ROOT / "ztunnel" / "redirect").glob("*.py"))
    for exe, package in used.items():
        stem = exe.split("-")[0]
        assert f'"{stem}' in code or f'"{exe}"' in code, exe
        assert package in packages, f"{exe} needs {package}"
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert 'ENTRYPOINT ["/opt/ztunnel/bin/ztunnel"]' in text and "ztunnel" in scripts
    args = container()["args"]
    help_run = subprocess.run(
        [sys.executable, "-m", "ztunnel.cli", *args, "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert help_run.returncode == 0, help_run.stderr


# --- every capability, really needed ------------------------------------------------------

PROBE = r"""
import ctypes, fcntl, os, socket, struct, sys
pid = sys.argv[1]
out = {}
libc = ctypes.CDLL(None, use_errno=True)
try:  # the agent opens pod netns through /proc/<pid>/ns/net
    fd = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY); out["SYS_PTRACE"] = True
except PermissionError:
    fd = os.open("/proc/self/ns/net", os.O_RDONLY); out["SYS_PTRACE"] = False
out["SYS_ADMIN"] = libc.setns(fd, 0x40000000) == 0  # and enters them
if out["SYS_ADMIN"] and out["SYS_PTRACE"]:  # in the test's own netns only: bring lo up
    s = socket.socket()
    try:
        fcntl.ioctl(s, 0x8914, struct.pack("16sH14x", b"lo", 0x49))  # SIOCSIFFLAGS up
        out["NET_ADMIN"] = True
    except PermissionError:
        out["NET_ADMIN"] = False
try:  # iptables-legacy's raw socket
    socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW); out["NET_RAW"] = True
except PermissionError:
    out["NET_RAW"] = False
print(" ".join(sorted(k for k, v in out.items() if v)))
"""


def _probe(caps: set[str], pid: int) -> set[str]:
    bounding = ",".join(["-all", *(f"+{c.lower()}" for c in sorted(caps))])
    proc = subprocess.run(
        [
            "setpriv",
            f"--bounding-set={bounding}",
            "--inh-caps=-all",
            sys.executable,
            "-c",
            PROBE,
            str(pid),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    return set(proc.stdout.split())


@pytest.mark.root
def test_each_granted_capability_is_needed() -> None:
    if os.system("command -v setpriv >/dev/null") != 0:
        pytest.skip("setpriv (util-linux) is not installed")
    name = f"zt{secrets.token_hex(3)}-caps"
    subprocess.run(["ip", "netns", "add", name], check=True)
    # A pod process as the pause container runs it: another user, another netns.
    sleeper = subprocess.Popen(
        [
            "ip",
            "netns",
            "exec",
            name,
            "setpriv",
            "--reuid=65535",
            "--regid=65535",
            "--clear-groups",
            "sleep",
            "60",
        ]
    )
    try:
        for _ in range(100):
            if Path(f"/proc/{sleeper.pid}/status").read_text().count("65535") >= 2:
                break
            subprocess.run(["sleep", "0.02"], check=False)
        granted = set(container()["securityContext"]["capabilities"]["add"])
        assert _probe(granted, sleeper.pid) == CAPS
        for cap in granted:
            assert cap not in _probe(granted - {cap}, sleeper.pid), (
                f"{cap} is granted but not needed"
            )
    finally:
        sleeper.kill()
        sleeper.wait()
        subprocess.run(["ip", "netns", "del", name], check=False)


EBPF_PROBE = r"""
import json, sys
from pathlib import Path
from ztunnel.model.pod import Pod
from ztunnel.redirect.ebpf import EbpfRedirector, tc
from ztunnel.redirect.netns import NetNamespace
redirector = EbpfRedirector(pin_root=Path(sys.argv[2]))
with NetNamespace.open(sys.argv[1]) as ns:
    redirector.install(ns, Pod(uid="u", name="app", namespace="demo"))
    hooks = sorted(f"{a.device} {a.direction} {a.prog_name}" for a in tc.ours(ns))
    link = redirector.describe(ns)["sk_lookup"]
    removed = redirector.remove(ns)
print(json.dumps({"hooks": hooks, "link": bool(link and link["attached"]), "removed": removed}))
"""


@pytest.mark.root
def test_ebpf_mode_runs_with_exactly_the_granted_capabilities() -> None:
    """Compile, load, pin, attach (tc, sk_lookup link) and detach in a pod netns, with no
    capability but the manifest's: CAP_BPF and CAP_PERFMON are not needed on top."""
    if os.system("command -v setpriv >/dev/null") != 0:
        pytest.skip("setpriv (util-linux) is not installed")
    tag = secrets.token_hex(3)
    name, pins = f"zt{tag}-ebpfcaps", Path(f"/sys/fs/bpf/ztunnel-caps-{tag}")
    peer = f"zt{tag}-ebpfpeer"
    subprocess.run(["ip", "netns", "add", name], check=True)
    subprocess.run(["ip", "netns", "add", peer], check=True)
    try:
        veth = ["link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", peer]
        subprocess.run(["ip", "-n", name, *veth], check=True)
        granted = set(container()["securityContext"]["capabilities"]["add"])
        bounding = ",".join(["-all", *(f"+{c.lower()}" for c in sorted(granted))])
        setpriv = ["setpriv", f"--bounding-set={bounding}", "--inh-caps=-all"]
        proc = subprocess.run(
            [*setpriv, sys.executable, "-c", EBPF_PROBE, f"/var/run/netns/{name}", str(pins)],
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout) == {
            "hooks": ["eth0 egress zt_egress", "eth0 ingress zt_ingress", "lo ingress zt_loopback"],
            "link": True,
            "removed": True,
        }
    finally:
        remove_tree(pins)
        for netns in (name, peer):
            subprocess.run(["ip", "netns", "del", netns], check=False)
