"""``bench/compare.py --profile DIR``: where the loopback agents' time goes.

Two kinds of evidence, for the 1 KiB request path (paced 1000 req/s over 4 connections)
and for the connection-setup path (1 worker: connect, SOCKS5, 1 KiB echo, close):

* py-spy flame graphs of agents A and B while the load runs (``<scenario>-agent-X.svg``,
  sampled without pausing the agents), and the same samples as collapsed stacks
  (``.txt``), summarised into ``summary.txt``: CPU per request, the top frames by self
  time, and the self time by area (trio scheduler, ssl, h2, ztunnel.hbone, ...);
* call counts per request from cProfile: two fresh agent pairs per scenario run under
  ``python -m cProfile``, one with a short and one with a long load; the difference of
  their call counts divided by the difference of requests (or connections) cancels start-up
  and idle work, leaving e.g. coroutine steps (= trio task switches), SSL reads/writes and
  socket sends per request (``calls.txt``).
"""

from __future__ import annotations

import contextlib
import pstats
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import loadgen
from common import cpu_parts
from loadgen import APP_PORT, BenchPath

CPROFILE_RATE = 500
RATE_HZ = 100  # two samplers per agent on 2 shared cores: keep their cost low
_ROOT = str(Path(__file__).resolve().parent.parent) + "/"

AREAS = (  # first prefix match of the leaf frame's file (py-spy prints short paths) wins
    ("trio scheduler", ("trio/_core/",)),
    ("trio sockets/streams/sync", ("trio/",)),
    ("ssl.py (OpenSSL calls)", ("ssl.py",)),
    ("h2/hpack/hyperframe", ("h2/", "hpack/", "hyperframe/")),
    ("ztunnel/hbone", ("ztunnel/hbone/",)),
    ("ztunnel/proxy", ("ztunnel/proxy/",)),
    ("ztunnel (other)", ("ztunnel/",)),
    ("logging/structlog", ("logging/", "structlog/")),
    ("stdlib socket/selectors", ("socket.py", "selectors.py")),
    ("outcome/attrs", ("outcome/", "<attrs")),
)
# The leaf frame of a thread parked in epoll_wait: py-spy cannot always tell this idle
# wait from work, so these samples are reported apart and left out of the CPU figures.
IDLE_CALL = "<method 'poll' of 'select.epoll' objects>"
IDLE_LEAVES = ("EpollIOManager.get_events (trio/_core/_io_epoll.py",)

KEY_CALLS = (  # cProfile function names worth counting per request
    ("trio task steps (Context.run)", "<method 'run' of '_contextvars.Context' objects>"),
    ("epoll waits", "<method 'poll' of 'select.epoll' objects>"),
    ("SSL reads (SSLSocket.recv_into)", "<method 'read' of '_ssl._SSLSocket' objects>"),
    ("SSL writes (SSLSocket.send)", "<method 'write' of '_ssl._SSLSocket' objects>"),
    ("socket recv_into", "<method 'recv_into' of '_socket.socket' objects>"),
    ("socket recv", "<method 'recv' of '_socket.socket' objects>"),
    ("socket send", "<method 'send' of '_socket.socket' objects>"),
    ("os.read (plain-side reads)", "<built-in method posix.read>"),
    ("os.write (plain-side direct writes)", "<built-in method posix.write>"),
    ("connect_ex (dial the app)", "<method 'connect_ex' of '_socket.socket' objects>"),
    ("socket shutdown", "<method 'shutdown' of '_socket.socket' objects>"),
    ("h2 frames parsed by hyperframe", "parse_frame_header"),
    ("DATA frames on the engine's fast path", "_receive_plain_data"),
    ("h2 events received", "receive_data"),
    ("h2 data_to_send", "data_to_send"),
    ("TLS handshakes", "<method 'do_handshake' of '_ssl._SSLSocket' objects>"),
    ("tasks spawned", "spawn_impl"),
    ("checkpoints", "checkpoint"),
    ("Python function calls (all)", "*"),
)


# -- py-spy --------------------------------------------------------------------------------


def _py_spy() -> str:
    found = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")
    if found is None:
        raise loadgen.BenchError("py-spy is not installed: pip install -e '.[bench]'")
    return found


def _scenarios(path: BenchPath, seconds: float) -> list[tuple[str, str, list[str]]]:
    s = f"{seconds:g}"
    return [
        ("rr1000", "rr", [*path.opts, "--rate", "1000", "--conns", "4", "--seconds", s]),
        ("conn1", "conn", [*path.conn_opts, "--workers", "1", "--seconds", s]),
    ]


def _units(command: str, result: dict[str, object]) -> int:
    value = result["done"] if command == "rr" else result["conns"]
    assert isinstance(value, int)
    return value


def flame_graphs(binary: Path, path: BenchPath, out: Path, seconds: float) -> list[str]:
    """py-spy record both agents during each scenario; returns summary lines."""
    py_spy = _py_spy()
    lines: list[str] = []
    for scenario, command, opts in _scenarios(path, seconds):
        recorders = []
        for label, pid in path.proxies.items():
            for fmt, ext in (("flamegraph", "svg"), ("raw", "txt")):
                argv = [
                    py_spy,
                    "record",
                    "--pid",
                    str(pid),
                    "--nonblocking",
                    "--rate",
                    str(RATE_HZ),
                    "--format",
                    fmt,
                    "-o",
                    str(out / f"{scenario}-{label}.{ext}"),
                ]
                recorders.append(
                    subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                )
        time.sleep(1.0)  # attached before the load starts
        started = time.monotonic()
        cpu0 = {label: cpu_parts(pid) for label, pid in path.proxies.items()}
        result = loadgen.run(binary, command, opts, prefix=path.prefix, timeout=seconds + 60)
        cpu1 = {label: cpu_parts(pid) for label, pid in path.proxies.items()}
        wall = time.monotonic() - started
        for rec in recorders:
            rec.send_signal(signal.SIGINT)  # py-spy writes its output on Ctrl-C
        for rec in recorders:
            try:
                rec.wait(30)
            except subprocess.TimeoutExpired:
                rec.kill()
        units = _units(command, result)
        what = "request" if command == "rr" else "connection"
        lines.append(f"## {scenario}: {units} {what}s in {wall:.1f} s")
        for label in path.proxies:
            user, system = (
                1000 * (cpu1[label][i] - cpu0[label][i]) / max(units, 1) for i in (0, 1)
            )
            lines.append(
                f"{label}: /proc: {user + system:.3f} ms CPU per {what} while sampled"
                f" (user {user:.3f}, system {system:.3f})"
            )
            raw = out / f"{scenario}-{label}.txt"
            if raw.exists():
                lines += summarize(raw.read_text(), units, what, label)
        lines.append("")
    return lines


def _frames(stack: str) -> list[str]:
    # py-spy raw: "process ...;thread ...;func (file:line);...;leaf (file:line) COUNT"
    return [f for f in stack.split(";") if not f.startswith(("process ", "thread "))]


def _file_of(frame: str) -> str:
    return frame.rsplit("(", 1)[-1].rstrip(")") if "(" in frame else frame


def area_of(frame: str) -> str:
    file = _file_of(frame)
    for area, needles in AREAS:
        if file.startswith(needles):
            return area
    return "other"


def summarize(raw: str, units: int, what: str, label: str, top: int = 12) -> list[str]:
    """Self time by frame and by area, and CPU per unit, from py-spy's collapsed stacks."""
    self_frames: Counter[str] = Counter()
    areas: Counter[str] = Counter()
    total = idle = 0
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = _frames(stack)
        if not frames:
            continue
        n = int(count)
        leaf = frames[-1]
        if leaf.startswith(IDLE_LEAVES):
            idle += n
            continue
        total += n
        self_frames[_short(leaf)] += n
        areas[area_of(leaf)] += n
    if not total:
        return [f"{label}: no samples"]
    ms_per = total / RATE_HZ * 1000 / max(units, 1)
    # py-spy counts a runnable thread that waits for a CPU as busy: on a loaded machine
    # this over-states CPU; /proc (above) is the CPU figure, the samples give the shares.
    out = [
        f"{label}: py-spy: {total} busy samples at {RATE_HZ} Hz = {ms_per:.3f} ms per {what}"
        f" (+{idle} samples parked in epoll_wait, left out)"
    ]
    out.append("  self time by area:")
    for area, n in areas.most_common():
        out.append(f"    {100 * n / total:5.1f}%  {area}")
    out.append(f"  top {top} frames by self time:")
    for frame, n in self_frames.most_common(top):
        out.append(f"    {100 * n / total:5.1f}%  {frame}")
    return out


def _short_path(file: str) -> str:
    if "site-packages/" in file:
        return file.split("site-packages/", 1)[1]
    if file.startswith(_ROOT):
        return file[len(_ROOT) :]
    for marker in ("site-packages/", "/lib/python3"):
        if marker in file:
            return (
                file.split(marker, 1)[1].split("/", 1)[-1]
                if marker != "site-packages/"
                else file.split(marker, 1)[1]
            )
    return file


def _short(frame: str) -> str:
    """``func (/long/path/site-packages/pkg/mod.py:12)`` -> ``func (pkg/mod.py:12)``."""
    name, _, file = frame.partition(" (")
    for marker in ("site-packages/", "/lib/python3", "/ztunnel/"):
        if marker in file:
            tail = file.split(marker, 1)[1]
            file = ("ztunnel/" + tail) if marker == "/ztunnel/" else tail
            break
    return f"{name} ({file}" if file else name


# -- cProfile call counts ------------------------------------------------------------------


def _profiled_pair(
    binary: Path, profile_dir: Path, command: str, seconds: float
) -> tuple[int, dict[str, pstats.Stats]]:
    from compare import QUIET_LOG, SOCKS_PORT
    from loopback import loopback_pair

    from ztunnel.testing.loopback import random_base

    base = random_base()
    app = [str(binary), "serve", f"{base}.2", str(APP_PORT), "2"]
    target = f"{base}.2:{APP_PORT}"
    opts = ["--connect", f"{base}.1:{SOCKS_PORT}", "--socks-dst", target, "--src", f"{base}.1"]
    if command == "rr":
        # 500/s: slow enough that the profiled agents keep up and each request is its
        # own frame and wake-up (the per-request counts then do not depend on batching)
        opts += ["--rate", str(CPROFILE_RATE), "--conns", "4", "--seconds", f"{seconds:g}"]
    else:
        opts += ["--workers", "1", "--seconds", f"{seconds:g}"]
    profile_dir.mkdir(parents=True, exist_ok=True)
    # One process per agent: cProfile sees only the process it runs, and with worker
    # processes the connections would be served (and counted) elsewhere.
    one = {"ZTUNNEL_WORKER_THREADS": "1"}
    with loopback_pair(base, QUIET_LOG, str(profile_dir), app_argv=app, extra_env=one):
        result = loadgen.run(binary, command, opts, timeout=seconds + 60)
    stats = {}
    for who in ("A", "B"):
        with contextlib.suppress(OSError, TypeError, EOFError):
            stats[who] = pstats.Stats(str(profile_dir / f"agent-{who}.prof"))
    return _units(command, result), stats


def _builtin_area(func: str) -> str:
    if "_ssl." in func:
        return "C: OpenSSL (_ssl)"
    if any(n in func for n in ("_socket.", "posix.", "select.epoll")):
        return "C: socket/epoll/os syscalls"
    return "C: other builtins"


def _calls(stats: pstats.Stats) -> Counter[str]:
    """Per function: calls ("@name"), own time ("t@name"); own time per area ("a@area")."""
    counts: Counter[str] = Counter()
    items = stats.stats.items()  # type: ignore[attr-defined]
    for (file, line, func), (_cc, nc, tottime, *_rest) in items:
        counts[func] += nc  # summed over every function of that name (KEY_CALLS)
        where = func if file == "~" else f"{func} ({_short_path(file)}:{line})"
        counts["@" + where] += nc  # one entry per function (the top list)
        counts["*"] += nc
        if func == IDLE_CALL:
            continue  # a wait, not work: kept out of the time figures
        counts["t@" + where] += tottime
        area = _builtin_area(func) if file == "~" else area_of(where)
        counts["a@" + area] += tottime
        counts["t*"] += tottime
    return counts


def _top_calls(
    c1: dict[str, Counter[str]], c2: dict[str, Counter[str]], du: int, what: str, top: int = 25
) -> list[str]:
    lines = []
    for who in ("A", "B"):
        if who not in c1 or who not in c2 or du <= 0:
            continue
        diff = Counter(
            {k[1:]: (c2[who][k] - c1[who][k]) / du for k in c2[who] if k.startswith("@")}
        )
        lines.append(f"agent {who}: the {top} most called functions, calls per {what}")
        for func, n in diff.most_common(top):
            lines.append(f"  {n:8.1f}  {func}")
        lines.append("")
        us = {k: (c2[who][k] - c1[who][k]) / du * 1e6 for k in c2[who] if k.startswith("t")}
        total = us.get("t*", 0.0)
        lines.append(
            f"agent {who}: own time per {what} under cProfile: {total:.0f} us in all, waits in"
            " epoll left out (wall clock: cProfile's overhead inflates Python calls and"
            " preemption on a busy machine lands anywhere; read the shares)"
        )
        areas = {k[2:]: (c2[who][k] - c1[who][k]) / du * 1e6 for k in c2[who] if k.startswith("a@")}
        for area, v in sorted(areas.items(), key=lambda kv: -kv[1]):
            lines.append(f"  {v:8.1f} us  {100 * v / total if total else 0:5.1f}%  {area}")
        lines.append(f"agent {who}: the {top} functions with the most own time, us per {what}")
        ranked = sorted(
            ((k[2:], v) for k, v in us.items() if k.startswith("t@")), key=lambda kv: -kv[1]
        )
        for func, v in ranked[:top]:
            lines.append(f"  {v:8.1f}  {func}")
        lines.append("")
    return lines


def call_counts(
    binary: Path, out: Path, short: float, long: float, commands: Sequence[str] = ("rr", "conn")
) -> list[str]:
    lines: list[str] = []
    with tempfile.TemporaryDirectory(prefix="zt-cprofile-") as tmp:
        for command, what in (("rr", "request"), ("conn", "connection")):
            if command not in commands:
                continue
            runs = []
            for seconds in (short, long):
                units, stats = _profiled_pair(
                    binary, Path(tmp) / f"{command}-{seconds:g}", command, seconds
                )
                runs.append((units, {w: _calls(s) for w, s in stats.items()}))
            (u1, c1), (u2, c2) = runs
            du = u2 - u1
            load = f" at {CPROFILE_RATE} req/s" if command == "rr" else ", 1 worker"
            lines.append(f"## per {what} (cProfile{load}, ({u2} - {u1}) {what}s)")
            lines.append(f"{'':40} {'agent A':>9} {'agent B':>9}")
            for label, func in KEY_CALLS:
                cells = []
                for who in ("A", "B"):
                    if who in c1 and who in c2 and du > 0:
                        cells.append(f"{(c2[who][func] - c1[who][func]) / du:9.1f}")
                    else:
                        cells.append(f"{'-':>9}")
                lines.append(f"{label:40} {' '.join(cells)}")
            # Several requests read at once share one frame and one wake-up: per frame
            # the cost is stable, per request it depends on how loaded the machine was.
            cells = []
            for who in ("A", "B"):
                frames = sum(
                    c2[who][f] - c1[who][f] for f in ("parse_frame_header", "_receive_plain_data")
                )
                calls = c2[who]["*"] - c1[who]["*"]
                cells.append(f"{calls / frames:9.1f}" if frames > 0 else f"{'-':>9}")
            lines.append(f"{'Python function calls per frame received':40} {' '.join(cells)}")
            lines.append("")
            lines += _top_calls(c1, c2, du, what)
    (out / "calls.txt").write_text("\n".join(lines) + "\n")
    return lines


def profile_loopback(binary: Path, path: BenchPath, out: Path, seconds: float) -> None:
    out.mkdir(parents=True, exist_ok=True)
    print(f"  profiling the loopback agents into {out} ...", flush=True)
    lines = flame_graphs(binary, path, out, seconds)
    (out / "summary.txt").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print("  cProfile call counts (4 extra agent pairs) ...", flush=True)
    print("\n".join(call_counts(binary, out, short=max(1.0, seconds / 4), long=seconds)))
