"""``ztunnel ca init``: the files it writes and its refusal to overwrite."""

from __future__ import annotations

from pathlib import Path

import pytest

from ztunnel.identity.ca import FileCA
from ztunnel.identity.cli import ca_init_command


def test_ca_init_writes_loadable_ca(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = tmp_path / "ca"
    assert ca_init_command(str(d), "example.org", force=False) == 0
    out = capsys.readouterr().out
    assert f"wrote {d / 'ca-key.pem'}" in out and "example.org" in out
    assert FileCA.load(d).roots_pem == (d / "root-cert.pem").read_bytes()


def test_ca_init_refuses_existing_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert ca_init_command(str(tmp_path), "cluster.local", force=False) == 0
    key = (tmp_path / "ca-key.pem").read_bytes()
    capsys.readouterr()
    assert ca_init_command(str(tmp_path), "cluster.local", force=False) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "already holds" in err
    assert (tmp_path / "ca-key.pem").read_bytes() == key
    assert ca_init_command(str(tmp_path), "cluster.local", force=True) == 0
    assert (tmp_path / "ca-key.pem").read_bytes() != key


def test_ca_init_reports_unwritable_directory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    assert ca_init_command(str(blocker / "ca"), "cluster.local", force=False) == 1
    assert "cannot write" in capsys.readouterr().err
