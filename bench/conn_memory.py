"""What one open idle mesh connection holds in the agents: tracemalloc by allocation site.

Run: ``.venv/bin/python bench/conn_memory.py [--conns 1000] [--top 25]`` (~10-30 s).

Both agents of the loopback mesh (``ztunnel.testing.loopback.loopback_mesh``: A with
SOCKS5, B with the HBONE inbound) run in this process; the app (``bench/common.py
serve``, echo) is its own process. After a few warm-up connections (the pooled HBONE
connection, certificates), ``--conns`` connections are opened through SOCKS5, each
echoes 16 bytes once (so the whole path is set up), and the Python memory allocated
meanwhile (tracemalloc, after a gc) is divided by the connection count: per connection
for the two agents together (client A + server B). The client's own sockets are
allocated in this file and are left out. Prints the total and the top allocation sites
(file:line, and with ``--traceback`` their call chains), and RSS for comparison (RSS
also counts the client side and malloc's overhead).
"""

from __future__ import annotations

import argparse
import gc
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import MODE_ECHO, proc_sample

from ztunnel.telemetry.logging import configure_logging
from ztunnel.testing.loopback import APP_PORT, loopback_mesh, random_base, socks5_connect

ROOT = Path(__file__).resolve().parent.parent
PAYLOAD = b"x" * 16


async def open_conn(mesh_socks5: tuple[str, int], base: str) -> trio.SocketStream:
    stream = await socks5_connect(mesh_socks5, f"{base}.2", APP_PORT, local_ip=f"{base}.1")
    await stream.send_all(MODE_ECHO + PAYLOAD)
    got = b""
    while len(got) < len(PAYLOAD):
        got += await stream.receive_some(64)
    return stream


async def run(args: argparse.Namespace, base: str) -> None:
    async with loopback_mesh(base=base, extra_env={"RUST_LOG": "warn"}) as mesh:
        warm = [await open_conn(mesh.socks5, base) for _ in range(5)]
        await trio.sleep(0.5)
        gc.collect()
        rss0 = proc_sample_self()
        before = tracemalloc.take_snapshot()
        conns: list[trio.SocketStream] = []
        start = time.monotonic()
        for _ in range(args.conns):
            conns.append(await open_conn(mesh.socks5, base))
        opened = time.monotonic() - start
        await trio.sleep(1.0)
        gc.collect()
        after = tracemalloc.take_snapshot()
        rss1 = proc_sample_self()
        report(before, after, args, rss1 - rss0, opened)
        for s in conns + warm:
            await s.aclose()


def proc_sample_self() -> int:
    import os

    return proc_sample(os.getpid()).rss_kib


def report(
    before: tracemalloc.Snapshot,
    after: tracemalloc.Snapshot,
    args: argparse.Namespace,
    rss_kib: int,
    opened: float,
) -> None:
    here = tracemalloc.Filter(False, __file__)
    # the client side (socks5_connect and its streams), wherever in the chain
    trio_client = tracemalloc.Filter(False, "*/ztunnel/testing/loopback.py", all_frames=True)
    key = "traceback" if args.traceback else "lineno"
    after = after.filter_traces([here, trio_client])
    before = before.filter_traces([here, trio_client])
    stats = after.compare_to(before, key)
    total = sum(s.size_diff for s in stats)
    n = args.conns
    print(f"{n} connections opened in {opened:.1f} s")
    print(f"agents' Python memory per open connection (A + B): {total / n / 1024:.2f} KiB")
    print(f"process RSS per open connection (A + B + client): {rss_kib / n:.2f} KiB")
    print("by the innermost ztunnel line on the allocating call chain (bytes per connection):")
    owners_before = by_owner(before, n)
    owners = {k: v - owners_before.get(k, 0.0) for k, v in by_owner(after, n).items()}
    for owner, size in sorted(owners.items(), key=lambda kv: -kv[1])[: args.top]:
        print(f"{size:8.0f} B  {owner}")
    print(f"top {args.top} allocation sites, bytes per connection:")
    for s in stats[: args.top]:
        if s.size_diff <= 0:
            continue
        frames = s.traceback.format(limit=6) if args.traceback else [str(s.traceback)]
        lead = f"{s.size_diff / n:8.0f} B  {s.count_diff / n:5.1f} blocks  "
        print(lead + frames[-1].strip() if not args.traceback else lead)
        if args.traceback:
            for line in frames:
                print("      " + line.strip())


def by_owner(snapshot: tracemalloc.Snapshot, n: int) -> dict[str, float]:
    """Bytes per connection by the innermost ztunnel frame of each allocation."""
    out: dict[str, float] = {}
    for trace in snapshot.traces:
        owner = "(no ztunnel frame)"
        for frame in reversed(trace.traceback):  # innermost first
            if "/ztunnel/" in frame.filename:
                owner = f"{frame.filename.split('/ztunnel/', 1)[1]}:{frame.lineno}"
                break
        out[owner] = out.get(owner, 0.0) + trace.size / n
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--conns", type=int, default=1000)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--traceback", action="store_true", help="group by call chain")
    p.add_argument("--depth", type=int, default=16, help="frames kept per allocation")
    args = p.parse_args()
    configure_logging("warn", "json")  # no access log line per connection
    base = random_base()
    app = subprocess.Popen(
        [sys.executable, str(ROOT / "bench" / "common.py"), "serve", f"{base}.2", str(APP_PORT)],
        stdout=subprocess.PIPE,
    )
    try:
        assert app.stdout is not None
        app.stdout.readline()
        tracemalloc.start(args.depth)
        trio.run(run, args, base)
    finally:
        app.terminate()
        app.wait()


if __name__ == "__main__":
    main()
