"""Build and drive the C load generator and app of bench/compare.py (``bench/loadgen.c``).

The binary is compiled with gcc on first use into a cache directory keyed by the source's
hash, so an edited ``loadgen.c`` is rebuilt and an unchanged one costs nothing. Each client
command prints one JSON line, returned here as a dict.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

SOURCE = Path(__file__).resolve().with_name("loadgen.c")
APP_PORT = 8080  # where ``loadgen serve`` listens in every topology


class LoadgenError(RuntimeError):
    """The load generator failed or printed no result (its stderr says why)."""


class BenchError(RuntimeError):
    """A path could not be set up or measured; the message says why."""


@dataclass
class BenchPath:
    group: str
    kind: str  # one of report.KINDS
    opts: list[str]  # loadgen target options (--connect, --socks-dst, --src)
    conn_opts: list[str]  # the same for new-connection runs (may rotate the source)
    prefix: list[str] = field(default_factory=list)  # e.g. nsenter into a pod
    proxies: dict[str, int] = field(default_factory=dict)  # process label -> pid
    fds_per_conn: int = 1  # in the busiest proxy process: 2 for a stunnel client
    app_pid: int | None = None  # the app this path ends in (for the machine-load figure)


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "ztunnel-bench"


def build(directory: Path | None = None) -> Path:
    """Compile loadgen.c unless this exact source is already built; return the binary."""
    source = SOURCE.read_bytes()
    digest = hashlib.sha256(source).hexdigest()[:16]
    directory = directory or cache_dir()
    binary = directory / f"loadgen-{digest}"
    if binary.exists():
        return binary
    gcc = shutil.which("gcc") or shutil.which("cc")
    if gcc is None:
        raise LoadgenError("no C compiler (apt-get install gcc; scripts/install.sh does)")
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".loadgen-")
    os.close(fd)
    result = subprocess.run(
        [gcc, "-O2", "-pthread", "-o", tmp, str(SOURCE)], capture_output=True, text=True
    )
    if result.returncode != 0:
        os.unlink(tmp)
        raise LoadgenError(f"gcc failed:\n{result.stderr}")
    os.replace(tmp, binary)  # atomic: parallel builds of the same source are harmless
    return binary


def parse_result(stdout: str, stderr: str = "") -> dict[str, Any]:
    """The last JSON line of a client command's output."""
    for line in reversed(stdout.strip().splitlines()):
        if line.startswith("{"):
            try:
                result: dict[str, Any] = json.loads(line)
            except ValueError:
                break
            return result
    raise LoadgenError(f"no result from the load generator: {(stderr or stdout)[-500:]}")


def run(
    binary: Path,
    command: str,
    options: Sequence[str],
    *,
    prefix: Sequence[str] = (),
    timeout: float = 120.0,
) -> dict[str, Any]:
    """Run one client command (``tput``, ``rr``, ``conn``) to completion."""
    argv = [*prefix, str(binary), command, *options]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    # A result line also comes with a non-zero exit (e.g. rr with lost responses): the
    # caller reads the counts; only a missing result is an error here.
    return parse_result(proc.stdout, proc.stderr)


class Hold:
    """``loadgen hold``: N open connections until ``release``."""

    def __init__(self, binary: Path, options: Sequence[str], *, prefix: Sequence[str] = ()) -> None:
        self.proc = subprocess.Popen(
            [*prefix, str(binary), "hold", *options],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def wait_open(self) -> dict[str, Any]:
        out: IO[str] | None = self.proc.stdout
        line = out.readline() if out else ""
        if not line:
            self.proc.wait()
            err = self.proc.stderr.read() if self.proc.stderr else ""
            raise LoadgenError(f"hold exited {self.proc.returncode}: {err[-500:]}")
        return parse_result(line)

    def release(self, timeout: float = 60.0) -> None:
        if self.proc.stdin:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream:
                stream.close()
