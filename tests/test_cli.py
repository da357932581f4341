"""The command line as a user runs it: help, bad config, and a real `ztunnel run`."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ztunnel.testing.loopback import random_base

ROOT = Path(__file__).resolve().parent.parent
ZTUNNEL = [sys.executable, "-m", "ztunnel.cli"]


def run(
    args: list[str], env: dict[str, str] | None = None, timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if k not in ("PROXY_MODE", "LOCAL_XDS_PATH")}
    full_env.update(env or {})
    return subprocess.run(
        ZTUNNEL + args, capture_output=True, text=True, env=full_env, timeout=timeout, cwd=ROOT
    )


def test_help_lists_every_option_with_its_environment_variable() -> None:
    out = run(["run", "--help"]).stdout
    for env in (
        "LOCAL_XDS_PATH",
        "PROXY_MODE",
        "PROXY_WORKLOAD_INFO",
        "TRUST_DOMAIN",
        "FAKE_CA",
        "SECRET_TTL",
        "POOL_MAX_STREAMS_PER_CONNECTION",
        "HTTP2_STREAM_WINDOW_SIZE",
        "LOG_FORMAT",
        "CLUSTER_ID",
        "NODE_NAME",
        "CA_DIR",
        "ZTUNNEL_ADMIN_ADDR",
        "XDS_ADDRESS",
        "CA_ADDRESS",
        "CA_ROOT_CA",
        "AUTH_TOKEN",
        "INPOD_UDS",
        "CA_HEADER_*",
        "ISTIO_METAJSON_*",
    ):
        assert env in out
    assert run(["--help"]).returncode == 0
    assert "init" in run(["ca", "--help"]).stdout


@pytest.mark.parametrize(
    ("env", "needle"),
    [
        ({"PROXY_MODE": "sideways"}, "PROXY_MODE"),
        ({"PROXY_MODE": "dedicated"}, "PROXY_WORKLOAD_INFO"),
        ({"SECRET_TTL": "forever"}, "SECRET_TTL"),
        ({"ZTUNNEL_ADMIN_ADDR": "localhost:99"}, "ZTUNNEL_ADMIN_ADDR"),
        ({"PROXY_MODE": "dedicated", "PROXY_WORKLOAD_INFO": "a/b/c"}, "CA_DIR"),
    ],
)
def test_bad_settings_exit_2_naming_the_setting(env: dict[str, str], needle: str) -> None:
    result = run(["run"], env)
    assert result.returncode == 2
    assert needle in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_ebpf_mode_that_cannot_run_is_one_line_exit_2_before_anything_is_written(
    tmp_path: Path,
) -> None:
    """Without root the missing capabilities are named, as root the missing bpffs (the pin
    directory is a plain directory here): either way one line, and nothing pinned."""
    cluster = tmp_path / "cluster.yaml"
    cluster.write_text(
        "namespaces: {mesh: {}}\nnodes: [n1]\npods: [{name: a, namespace: mesh, node: n1}]\n"
    )
    pins = tmp_path / "pins"
    argv = ["run", "--redirect", "ebpf", "--cluster", str(cluster), "--cluster-prefix"]
    env = {"FAKE_CA": "true", "NODE_NAME": "n1", "ZTUNNEL_BPF_PIN_DIR": str(pins)}
    result = run([*argv, "zt000000"], env)
    assert result.returncode == 2, result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("ztunnel: configuration error: REDIRECT_MODE=ebpf: ")
    assert ("missing capabilities" in line) if os.geteuid() else ("no bpf filesystem" in line)
    assert not pins.exists()
    bad = run(["run", "--redirect", "nftables"])
    assert bad.returncode == 2 and "expected one of iptables, ebpf, none" in bad.stderr


@pytest.mark.root
def test_ebpf_mode_without_cap_net_admin_is_one_line_exit_2(tmp_path: Path) -> None:
    """Root whose bounding set lacks CAP_NET_ADMIN (a container granted too little): the
    capability is named, nothing is pinned, no traceback."""
    cluster = tmp_path / "cluster.yaml"
    cluster.write_text(
        "namespaces: {mesh: {}}\nnodes: [n1]\npods: [{name: a, namespace: mesh, node: n1}]\n"
    )
    pins = tmp_path / "pins"
    drop = ["setpriv", "--bounding-set", "-net_admin", "--inh-caps", "-net_admin", "--"]
    argv = ["run", "--redirect", "ebpf", "--cluster", str(cluster), "--cluster-prefix", "zt000001"]
    env = {k: v for k, v in os.environ.items() if k not in ("PROXY_MODE", "LOCAL_XDS_PATH")}
    env.update({"FAKE_CA": "true", "NODE_NAME": "n1", "ZTUNNEL_BPF_PIN_DIR": str(pins)})
    result = subprocess.run(
        drop + ZTUNNEL + argv, capture_output=True, text=True, env=env, timeout=30, cwd=ROOT
    )
    assert result.returncode == 2, result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line == (
        "ztunnel: configuration error: REDIRECT_MODE=ebpf: missing capabilities CAP_NET_ADMIN: "
        "run the agent as root (or grant them to its container)"
    )
    assert not pins.exists()


def test_demo_redirect_mode_must_redirect_by_itself() -> None:
    from ztunnel.config import RedirectMode
    from ztunnel.demo import demo_redirect_mode
    from ztunnel.errors import ConfigError

    assert demo_redirect_mode(None, {}) is RedirectMode.IPTABLES
    assert demo_redirect_mode(None, {"REDIRECT_MODE": "eBPF"}) is RedirectMode.EBPF
    assert demo_redirect_mode("iptables", {"REDIRECT_MODE": "ebpf"}) is RedirectMode.IPTABLES
    with pytest.raises(ConfigError, match="--redirect: the demo runs with iptables or ebpf"):
        demo_redirect_mode("none", {})
    with pytest.raises(ConfigError, match="REDIRECT_MODE: the demo runs with iptables or ebpf"):
        demo_redirect_mode(None, {"REDIRECT_MODE": "nft"})


def test_bad_local_config_names_file_and_field(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("workloads:\n- name: x\n  namespace: ns\n  workloadIps: ['10.0.0.300']\n")
    result = run(
        ["run"],
        {
            "PROXY_MODE": "dedicated",
            "PROXY_WORKLOAD_INFO": "ns/x/default",
            "FAKE_CA": "true",
            "LOCAL_XDS_PATH": str(bad),
        },
    )
    assert result.returncode == 2
    assert str(bad) in result.stderr
    assert "workloads[0].workloadIps[0]" in result.stderr


def test_ca_init_writes_istio_layout_and_refuses_to_overwrite(tmp_path: Path) -> None:
    assert run(["ca", "init", str(tmp_path / "ca")]).returncode == 0
    names = sorted(p.name for p in (tmp_path / "ca").iterdir())
    assert names == ["ca-cert.pem", "ca-key.pem", "cert-chain.pem", "root-cert.pem"]
    again = run(["ca", "init", str(tmp_path / "ca")])
    assert again.returncode == 2


def test_ztunnel_run_with_localhost_example_serves_and_drains(tmp_path: Path) -> None:
    """`ztunnel run` with ztunnel's own examples/localhost.yaml, a file CA, SIGTERM drain."""
    assert run(["ca", "init", str(tmp_path / "ca")]).returncode == 0
    ip = f"{random_base()}.1"
    env = {k: v for k, v in os.environ.items()}
    env.update(
        {
            "PROXY_MODE": "dedicated",
            "PROXY_WORKLOAD_INFO": "default/local/default",
            "LOCAL_XDS_PATH": str(ROOT / "examples" / "localhost.yaml"),
            "CA_DIR": str(tmp_path / "ca"),
            "LOG_FORMAT": "json",
            "UNSTABLE_ENABLE_SOCKS5": "true",
            "PACKET_MARK": "0",
        }
    )
    args = ["run"]
    for flag in (
        "outbound-addr",
        "inbound-addr",
        "inbound-plaintext-addr",
        "socks5-addr",
        "admin-addr",
        "stats-addr",
        "readiness-addr",
    ):
        args += [f"--{flag}", f"{ip}:0"]
    proc = subprocess.Popen(ZTUNNEL + args, env=env, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        ready = wait_for_log(proc, "agent ready", timeout=20)
        assert ready["mode"] == "dedicated"
        admin = ready["admin"]
        import urllib.request

        with urllib.request.urlopen(f"http://{admin}/config_dump", timeout=5) as resp:
            dump = json.load(resp)
        assert {w["name"] for w in dump["workloads"]} == {"local", "local-tcp"}
        assert {s["hostname"] for s in dump["services"]} == {"example.com", "example2.com"}
        assert dump["policies"][0]["name"] == "deny-9999"
        assert dump["staticConfig"]["workloads"][0]["uid"] == "cluster1//v1/Pod/default/local"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        assert proc.stderr is not None
        proc.stderr.close()


def wait_for_log(proc: subprocess.Popen[str], message: str, timeout: float) -> dict[str, str]:
    """The first JSON log record with ``message``; reads the raw fd (no buffered readline,
    which would hide lines from select)."""
    assert proc.stderr is not None
    fd = proc.stderr.fileno()
    deadline = time.monotonic() + timeout
    buf, seen = b"", []
    while time.monotonic() < deadline:
        if not select.select([fd], [], [], 0.2)[0]:
            if proc.poll() is not None:
                break
            continue
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        buf += chunk
        while b"\n" in buf:
            raw, buf = buf.split(b"\n", 1)
            line = raw.decode(errors="replace")
            seen.append(line)
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if record.get("message") == message or record.get("event") == message:
                return record
    raise AssertionError(f"{message!r} not logged; got: {chr(10).join(seen)[-2000:]}")
