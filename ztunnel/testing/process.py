"""A product process started by a test helper (agent, waypoint, CA service): its JSON log file,
and a graceful stop. One place, so every helper reads logs and stops processes alike."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

PROJECT_ROOT = str(Path(__file__).resolve().parents[2])


def project_pythonpath(env: Mapping[str, str]) -> str:
    """``PYTHONPATH`` for a child that must import this checkout's ``ztunnel`` first."""
    return os.pathsep.join(filter(None, [PROJECT_ROOT, env.get("PYTHONPATH")]))


class LoggedProcess:
    """Mixin for a dataclass with ``proc`` (the child) and ``log_path`` (its JSON log)."""

    proc: subprocess.Popen[bytes]
    log_path: Path

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_lines(self) -> list[dict[str, Any]]:
        """The JSON log records (non-JSON lines, e.g. tracebacks, are skipped)."""
        out: list[dict[str, Any]] = []
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return out
        for line in text.splitlines():
            with contextlib.suppress(ValueError):
                record = json.loads(line)
                if isinstance(record, dict):
                    out.append(record)
        return out

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM (graceful drain), then SIGKILL if it does not exit in time."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode
