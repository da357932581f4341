"""The project's own standards, enforced in CI: strict mypy and ruff on the package."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _tool(name: str) -> str:
    found = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    if found is None:
        pytest.skip(f"{name} is not installed (pip install -e '.[test]')")
    return found


def test_mypy_strict_passes() -> None:
    # A per-user cache outside the checkout: works when the checkout is not writable.
    cache = Path(tempfile.gettempdir()) / f"ztunnel-mypy-cache-{os.getuid()}"
    result = subprocess.run(
        [_tool("mypy"), "--cache-dir", str(cache)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff_passes() -> None:
    result = subprocess.run(
        [_tool("ruff"), "check", "ztunnel", "tests", "bench", "fuzz", "scripts"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
