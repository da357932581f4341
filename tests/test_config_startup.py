"""Every bad setting or file stops `ztunnel run` with one line naming the setting and exit
status 2, never a traceback (issue 14): bad log filters, a missing CA directory, deeply
nested YAML, a listener address already in use, values that cannot work."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from ztunnel import cli
from ztunnel.telemetry import logging as zlog

ROOT = Path(__file__).resolve().parent.parent
# Free ports everywhere, so only the setting under test can fail.
DEDICATED = {
    "PROXY_MODE": "dedicated",
    "PROXY_WORKLOAD_INFO": "ns/a/sa",
    "FAKE_CA": "true",
    **{
        f"ZTUNNEL_{name}_ADDR": "127.0.0.1:0"
        for name in ("ADMIN", "STATS", "READINESS", "OUTBOUND", "INBOUND", "INBOUND_PLAINTEXT")
    },
}
RunAgent = Callable[..., tuple[int, str]]  # (env, *args) -> (exit status, stderr)
DEEP = "workloads: " + "[" * 50_000 + "]" * 50_000


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A loopback port that is bound and listening (a second bind fails with EADDRINUSE)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


@pytest.fixture
def run_agent(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> Iterator[RunAgent]:
    def run(env: dict[str, str], *args: str) -> tuple[int, str]:
        for key in list(os.environ):
            if key in DEDICATED or key.startswith(("ZTUNNEL_", "LOCAL_XDS", "CA_DIR")):
                monkeypatch.delenv(key)
        for key, value in {**DEDICATED, **env}.items():
            monkeypatch.setenv(key, value)
        code = cli.main(["run", *args])
        return code, capsys.readouterr().err

    yield run
    zlog.unconfigure_logging()


def _one_line(err: str) -> str:
    """The one error line. Info records logged before the failure (with worker processes:
    "workers ready") may precede it; nothing else may: no traceback, no other warning."""
    lines = [line for line in err.strip().splitlines() if "\tinfo\t" not in line]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert lines[0].startswith("ztunnel: configuration error: ")
    return lines[0]


@pytest.mark.parametrize(
    ("env", "needle"),
    [
        ({"RUST_LOG": "ztunnel=verbose"}, "RUST_LOG: invalid log level 'verbose'"),
        ({"HTTP2_FRAME_SIZE": "99999999999"}, "HTTP2_FRAME_SIZE: must be an integer in 16384.."),
        ({"SECRET_TTL": "0s"}, "SECRET_TTL: must be longer than 0s"),
        ({"SECRET_TTL": "nan"}, "SECRET_TTL"),
        ({"FAKE_CA": "false", "CA_DIR": "/nonexistent-ca-dir"}, "CA_DIR: /nonexistent-ca-dir:"),
        ({"LOCAL_XDS": DEEP}, "LOCAL_XDS: YAML error: nested too deeply"),
        (
            {"LOCAL_XDS": "workloads: [{uid: a, namespace: n, workloadIps: ['fe80::1%eth0']}]"},
            "LOCAL_XDS: workloads[0].workloadIps[0]",
        ),
        (
            {"LOCAL_XDS": "workloads: [{uid: a, namespace: n, workloadIps: [10.0.0.1]},"
             " {uid: b, namespace: n, workloadIps: [10.0.0.1]}]"},
            "LOCAL_XDS: workloads[1].workloadIps[0]: 10.0.0.1 is already the address",
        ),
    ],
)  # fmt: skip
def test_bad_setting_is_one_line_and_exit_2(
    env: dict[str, str], needle: str, run_agent: RunAgent
) -> None:
    code, err = run_agent(env)
    assert code == 2
    assert needle in _one_line(err)


def test_ca_dir_that_is_not_a_ca_is_one_line(tmp_path: Path, run_agent: RunAgent) -> None:
    (tmp_path / "ca-cert.pem").write_text("not a certificate")
    code, err = run_agent({"FAKE_CA": "false", "CA_DIR": str(tmp_path)})
    assert code == 2 and f"CA_DIR: {tmp_path}" in _one_line(err)


@pytest.mark.parametrize("listener", ["ADMIN", "STATS", "READINESS"])
def test_admin_listener_in_use_names_the_setting(
    listener: str,
    busy_port: int,
    run_agent: RunAgent,
) -> None:
    code, err = run_agent({f"ZTUNNEL_{listener}_ADDR": f"127.0.0.1:{busy_port}"})
    assert code == 2
    line = _one_line(err)
    assert f"ZTUNNEL_{listener}_ADDR: 127.0.0.1:{busy_port}: cannot listen:" in line
    assert "in use" in line


def test_proxy_listener_in_use_names_the_proxy_settings(
    busy_port: int, run_agent: RunAgent
) -> None:
    code, err = run_agent({"ZTUNNEL_INBOUND_ADDR": f"127.0.0.1:{busy_port}"})
    assert code == 2
    line = _one_line(err)
    assert f"ZTUNNEL_INBOUND_ADDR=127.0.0.1:{busy_port}" in line and "cannot listen" in line


def test_deep_policy_file_is_one_line(tmp_path: Path, run_agent: RunAgent) -> None:
    (tmp_path / "deep.yaml").write_text(DEEP)
    code, err = run_agent({}, "--policies", str(tmp_path))
    assert code == 2 and "deep.yaml: YAML nested too deeply" in _one_line(err)


def test_a_real_process_prints_one_line_and_exits_2(busy_port: int) -> None:
    """The same through a real process: nothing else on stderr, no traceback."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ZTUNNEL_", "PROXY_"))}
    env.update(DEDICATED, ZTUNNEL_ADMIN_ADDR=f"127.0.0.1:{busy_port}")
    proc = subprocess.run(
        [sys.executable, "-m", "ztunnel.cli", "run"],
        capture_output=True, text=True, env=env, timeout=60, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "ZTUNNEL_ADMIN_ADDR" in _one_line(proc.stderr)


class _Exec(Exception):
    pass


def _capture_exec(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, list[str], dict[str, str]]]:
    calls: list[tuple[str, list[str], dict[str, str]]] = []

    def execve(path: str, argv: list[str], env: dict[str, str]) -> None:
        calls.append((path, argv, env))
        raise _Exec

    monkeypatch.setattr(os, "execve", execve)
    return calls


def test_run_restarts_itself_with_the_malloc_allocator(monkeypatch: pytest.MonkeyPatch) -> None:
    """``ztunnel run`` re-executes itself (same pid, same arguments) with
    PYTHONMALLOC=malloc: memory comes back after a burst (docs/reliability.md)."""
    calls = _capture_exec(monkeypatch)
    monkeypatch.delenv("PYTHONMALLOC", raising=False)
    # Without the restart this would end at once with a configuration error.
    monkeypatch.setattr(sys, "argv", ["ztunnel", "run", "--secret-ttl", "0s"])
    with pytest.raises(_Exec):
        cli.main()
    [(path, argv, env)] = calls
    assert path == sys.executable and argv == [sys.executable, *sys.orig_argv[1:]]
    assert env["PYTHONMALLOC"] == "malloc"


@pytest.mark.parametrize("argv", [["ztunnel", "ca", "--help"], ["ztunnel", "ctl", "--help"]])
def test_only_run_restarts_and_an_operators_allocator_is_kept(
    monkeypatch: pytest.MonkeyPatch, argv: list[str]
) -> None:
    calls = _capture_exec(monkeypatch)
    monkeypatch.setenv("PYTHONMALLOC", "pymalloc")
    cli._use_malloc(os.environ)  # the operator's choice stands
    monkeypatch.delenv("PYTHONMALLOC")
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit):
        cli.main()  # other commands run in this process
    assert calls == []
