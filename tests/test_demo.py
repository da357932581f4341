"""``ztunnel demo`` as a user runs it: a subprocess, its output, its exit code, its cleanup."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cluster_mesh import MODES, mode_param

from ztunnel.cluster.net import BPF_ROOT
from ztunnel.redirect.ebpf import bpfsys
from ztunnel.redirect.netns import list_named

ROOT = Path(__file__).resolve().parents[1]
DEMO = [sys.executable, "-m", "ztunnel.cli", "demo"]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _prefix(output: str) -> str:
    m = re.search(r"^Cluster (zt[0-9a-f]{6}):", output, re.M)
    assert m, output
    return m.group(1)


def _leftovers(prefix: str) -> list[str]:
    return [n for n in list_named() if n.startswith(prefix)]


def _bpf_ids(output: str) -> tuple[set[int], set[int]]:
    """The program and sk_lookup link ids the demo's agents reported (eBPF mode)."""
    progs = {int(i) for i in re.findall(r"zt_[a-z_]+#(\d+)", output)}
    links = {int(i) for i in re.findall(r"sk_lookup link #(\d+)", output)}
    return progs, links


def _loaded(progs: set[int], links: set[int]) -> set[str]:
    """Which of these programs and links the kernel still holds."""
    alive = set()
    for prog_id in progs:
        try:
            os.close(bpfsys.prog_fd_by_id(prog_id))
            alive.add(f"prog {prog_id}")
        except bpfsys.BpfError:
            pass
    listed = subprocess.run(
        ["bpftool", "-j", "link", "show"], capture_output=True, text=True, check=True
    ).stdout
    alive |= {f"link {li['id']}" for li in json.loads(listed or "[]") if li["id"] in links}
    return alive


@pytest.mark.root
@pytest.mark.parametrize("mode", MODES)
def test_demo_runs_traffic_explains_it_and_cleans_up(mode: str) -> None:
    mode_param(mode)
    argv = [*DEMO, "--redirect", mode]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=240, env=_env(), cwd=ROOT)
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    lines = out.splitlines()
    allowed = [line for line in lines if ": ALLOWED" in line]
    denied = [line for line in lines if "DENIED" in line and "->" in line]
    # The client's connections through the service VIP are allowed, over mTLS, both ways.
    assert any(line.lstrip()[0].isdigit() and "client (10.244.1.2" in line for line in allowed)
    assert (
        "spiffe://cluster.local/ns/demo/sa/client -> spiffe://cluster.local/ns/demo/sa/echo" in out
    )
    assert "(cross-node); carried by agent@node1 and agent@node2" in out
    assert "(same node); carried by agent@node1" in out
    # The policy denies `other` (a mesh identity it does not allow) and the plaintext client.
    assert any(line.split(". ", 1)[1].startswith("other ") for line in denied)
    assert any("legacy-client" in line for line in denied)
    assert "demo/echo-allow-client" in out
    assert "plaintext: the client is not in the mesh" in out
    # Service traffic repeats until both endpoints were reached: never all on one.
    assert "reached echo-1" in out and "reached echo-2" in out
    assert re.search(r"Summary: \d+ connections: \d+ allowed, \d+ denied\n", out), out
    # Certificates came from `ztunnel ca serve`, which refused nothing: every agent asked
    # only for identities of pods on its own node (4 mesh pods, one identity per node each).
    ca = re.search(r"CA service: (\d+) certificates issued .*, (\d+) requests refused", out)
    assert ca, out
    assert int(ca.group(1)) >= 4 and int(ca.group(2)) == 0
    assert "Agents hold no CA key" in out
    # The waypoint scene: an allowed and a denied request with the deciding policy, a split.
    assert re.search(
        r"GET / +-> 200, served by web-v[12]; allowed by policy demo/web-allow-get", out
    )
    assert re.search(r"GET /admin +-> 403; denied by policy demo/web-deny-admin", out), out
    split = re.search(r"100 requests on one keep-alive connection, .*: v1: (\d+), v2: (\d+)", out)
    assert split, out
    v1, v2 = map(int, split.groups())
    # Binomial(100, 0.1): 0 or over 30 canary answers happen less than 3 times in 100,000.
    assert v1 + v2 == 100 and 1 <= v2 <= 30, (v1, v2)
    assert "around the waypoint: refused by the pod's agent" in out
    prefix = _prefix(out)
    assert not _leftovers(prefix)
    # What each agent installed, per mesh pod, as its config_dump reported it.
    if mode == "iptables":
        assert "demo/client: iptables chains ISTIO_OUTPUT, ISTIO_PRERT" in out
        return
    hooks = "eBPF lo ingress zt_loopback, eth0 ingress zt_ingress, eth0 egress zt_egress"
    assert f"demo/client: {hooks}; sk_lookup link #" in out
    # Nothing left attached: no pins, and the programs and links are gone from the kernel
    # (a deleted netns releases its tc filters asynchronously: allow it a few seconds).
    assert not list(BPF_ROOT.glob(f"{prefix}-*"))
    progs, links = _bpf_ids(out)
    mesh_pods = len(re.findall(r"^    pod .*(?<!not) in the mesh$", out, re.M))
    assert mesh_pods == 6, out
    assert len(progs) == 8 and len(links) == mesh_pods  # 4 programs per agent, a link per pod
    deadline = time.monotonic() + 15
    while (alive := _loaded(progs, links)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not alive


def _agent_environments(prefix: str) -> dict[str, dict[str, str]]:
    """The environment of every process in the demo's node netns (the agents)."""
    found: dict[str, dict[str, str]] = {}
    for name in list_named():
        if not name.startswith(f"{prefix}-node-"):
            continue
        pids = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True)
        for pid in pids.stdout.split():
            try:
                raw = Path(f"/proc/{pid}/environ").read_bytes()
            except OSError:
                continue
            env = dict(
                item.split("=", 1)
                for item in raw.decode(errors="replace").split("\0")
                if "=" in item
            )
            found[f"{name}/{pid}"] = env
    return found


@pytest.mark.root
def test_demo_keep_stays_up_until_ctrl_c() -> None:
    # SIGINT ignored as a shell without job control leaves it for background jobs: the demo
    # must still honour Ctrl-C (it sets the handler itself).
    proc = subprocess.Popen(
        [*DEMO, "--keep"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
    )
    out = ""
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 60
        while "Press Ctrl-C" not in out and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            out += line
        assert "Press Ctrl-C" in out, out
        prefix = _prefix(out)
        assert _leftovers(prefix)  # still running
        # No agent holds a CA key: each has the CA service's address, its token, the root.
        envs = _agent_environments(prefix)
        assert len(envs) >= 2, envs.keys()
        for where, env in envs.items():
            assert "CA_DIR" not in env and "FAKE_CA" not in env, where
            assert env["CA_ADDRESS"].startswith("https://10.244.0.2:"), where
            assert Path(env["AUTH_TOKEN"]).is_file() and Path(env["CA_ROOT_CA"]).is_file()
            assert "ca-key.pem" not in " ".join(env.values()), where
        # The printed inspection command works as printed.
        cmd = next(
            line.strip() for line in out.splitlines() if line.strip().endswith("/config_dump")
        )
        if shutil.which("curl"):
            dump = subprocess.run(cmd.split(), capture_output=True, text=True, timeout=10)
            assert '"workloadState"' in dump.stdout and "Kubernetes//Pod/demo/" in dump.stdout
            # The printed curl commands go through the waypoint: 200, and 403 for /admin.
            curls = [line.split("#")[0].split() for line in out.splitlines() if " curl -s" in line]
            through = [c for c in curls if c[-1].startswith("http://10.96.0.20")]
            assert len(through) >= 2, out
            for cmd_line in through:
                got = subprocess.run(cmd_line, capture_output=True, text=True, timeout=10)
                if cmd_line[-1].endswith("/admin"):
                    assert "403" in got.stdout and "RBAC: access denied" in got.stdout, got
                elif "-X" not in cmd_line:
                    assert '"pod": "web-v' in got.stdout, got
        proc.send_signal(signal.SIGINT)
        # Generous: the teardown drains agents and deletes netns, slow on a loaded machine.
        try:
            rest, err = proc.communicate(timeout=90)
        except subprocess.TimeoutExpired:
            proc.kill()
            rest, err = proc.communicate()
            raise AssertionError(f"no teardown after SIGINT:\n{rest}\n{err[-3000:]}") from None
        assert proc.returncode == 0, rest + err[-3000:]
        assert "Torn down" in rest
        assert not _leftovers(prefix)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()  # reap it and close its pipes (no ResourceWarning in a later test)


def test_demo_without_root_says_so_and_exits_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Through the real CLI, as an unprivileged user would run it (euid faked when root, so
    the check does not depend on whether an unprivileged uid can read this checkout)."""
    from ztunnel.cli import main

    if os.geteuid() == 0:
        monkeypatch.setattr(os, "geteuid", lambda: 65534)
    assert main(["demo"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert len(captured.err.strip().splitlines()) == 1
    assert "root" in captured.err
