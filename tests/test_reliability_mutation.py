"""A short mutation run in CI: every mutant of the CONNECT authority validation and of the
CA's CSR key check must be caught by a test (scripts/mutation.py --quick; the full run over
the security modules and its score are in docs/reliability.md)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_quick_mutation_run_has_no_survivors(tmp_path: Path) -> None:
    pytest.importorskip("mutmut", reason="mutmut is not installed (pip install -e '.[test]')")
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs a git checkout (the run copies the tracked files)")
    proc = subprocess.run(
        [sys.executable, "scripts/mutation.py", "--quick", "--workdir", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    result = json.loads((tmp_path / "mutation-results.json").read_text())
    assert result["survived"] == [] and result["stats"]["killed"] >= 40
