"""The child-process helper behind the agent, waypoint and CA-service harnesses (no root)."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

from ztunnel.testing.process import PROJECT_ROOT, LoggedProcess, project_pythonpath


@dataclass
class Child(LoggedProcess):
    proc: subprocess.Popen[bytes]
    log_path: Path


def start(tmp_path: Path, body: str) -> Child:
    log_path = tmp_path / "child.log"
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(body)], stdout=log, stderr=subprocess.STDOUT
        )
    return Child(proc, log_path)


def test_json_records_are_read_and_other_lines_skipped(tmp_path: Path) -> None:
    child = start(tmp_path, 'print(\'{"message": "up"}\'); print("Traceback ..."); print("[1]")')
    child.proc.wait(10)
    assert child.log_lines() == [{"message": "up"}]
    assert child.log_tail(1) == "[1]"
    assert not child.alive


def test_stop_terminates_then_kills_a_child_that_ignores_sigterm(tmp_path: Path) -> None:
    polite = start(tmp_path, "import time; time.sleep(60)")
    assert polite.alive
    assert polite.stop() == -signal.SIGTERM
    stubborn = start(
        tmp_path,
        """
        import signal, sys, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print("ready", flush=True)
        time.sleep(60)
        """,
    )
    while "ready" not in stubborn.log_tail():
        assert stubborn.alive
        time.sleep(0.01)
    assert stubborn.stop(timeout=0.2) == -signal.SIGKILL


def test_children_import_this_checkout_first() -> None:
    assert project_pythonpath({}) == PROJECT_ROOT
    assert project_pythonpath({"PYTHONPATH": "/x"}).split(":") == [PROJECT_ROOT, "/x"]
