"""Agent start-up: time to ready and idle RSS of a dedicated-mode ``ztunnel run``.

Run: ``.venv/bin/python bench/startup.py [--runs 5] [--workers 1]`` (a few seconds per run).

Starts the loopback benchmark's agent A (``bench/loopback.py``: dedicated mode, a CA
made by ``ztunnel ca init``, the local config from ``ztunnel.testing.loopback``, JSON
logs, access logs off, ``ZTUNNEL_WORKER_THREADS=--workers``) ``--runs`` times, one after
the other, and prints per run: the wall time from ``Popen`` to the "agent ready" log
line, the agent's RSS (``VmRSS`` of the control process) and CPU time one second after
ready, and the memory of every process of the agent (control, zygote, workers) from
``/proc/PID/smaps_rollup``: RSS, PSS (shared pages divided among the processes that map
them: the sum over processes is what the agent really costs) and USS (private pages:
what killing that process alone would free); at the end the median of each. Then, in a child
interpreter that imports the agent module and builds the same configuration, which of
the heavy optional packages (Kubernetes client, gRPC/protobuf, bcc, the admin UI) got
imported, and the import time of ``ztunnel.agent`` alone.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import proc_sample, process_tree, tree_cpu_parts

from ztunnel.testing.loopback import agent_env, mesh_yaml, random_base

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
OPTIONAL = (
    "lightkube",
    "httpx2",
    "grpc",
    "google.protobuf",
    "bcc",
    "ztunnel.sources.kubernetes.client",
    "ztunnel.identity.istio_ca",
    "ztunnel.sources.xds",
    "ztunnel.sources.zds",
    "ztunnel.admin.ui",
)
PROBE = """
import json, os, sys, time
t0 = time.perf_counter()
import ztunnel.cli  # noqa: F401  (what `ztunnel run` imports first)
from ztunnel.agent import Agent
from ztunnel.config import Config
t1 = time.perf_counter()
config = Config.from_sources(os.environ)
agent = Agent.from_config(config, env=os.environ)
print(json.dumps({"import_s": t1 - t0, "modules": sorted(
    m for m in json.loads(sys.argv[1]) if m in sys.modules)}))
"""


def rollup_kib(pid: int) -> dict[str, int]:
    """RSS, PSS and USS (Private_Clean + Private_Dirty) of one process, in KiB."""
    fields: dict[str, int] = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            name, _, rest = line.partition(":")
            parts = rest.split()
            if len(parts) == 2 and parts[1] == "kB":
                fields[name] = int(parts[0])
    return {
        "rss": fields["Rss"],
        "pss": fields["Pss"],
        "uss": fields["Private_Clean"] + fields["Private_Dirty"],
    }


def tree_memory(pid: int) -> list[tuple[int, dict[str, int]]]:
    """(pid, rollup) of the agent and each of its descendants, the agent first."""
    out = []
    for member in process_tree(pid):
        with contextlib.suppress(OSError):
            out.append((member, rollup_kib(member)))
    return out


def one_run(env: dict[str, str], log: Path) -> dict[str, float]:
    start = time.perf_counter()
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [PY, "-m", "ztunnel.cli", "run"], env=env, stdout=out, stderr=subprocess.STDOUT
        )
    try:
        while True:
            text = log.read_text(errors="replace")
            if '"agent ready"' in text:
                ready = time.perf_counter() - start
                break
            if proc.poll() is not None or time.perf_counter() - start > 60:
                raise RuntimeError(f"agent did not become ready:\n{text[-2000:]}")
            time.sleep(0.005)
        time.sleep(1.0)
        sample = proc_sample(proc.pid)
        tree = tree_memory(proc.pid)
        total = {k: sum(m[k] for _, m in tree) / 1024 for k in ("rss", "pss", "uss")}
        return {
            "ready_s": ready,
            "rss_mib": sample.rss_kib / 1024,
            "cpu_s": sample.cpu_s,
            "tree_cpu_s": sum(tree_cpu_parts(proc.pid)),
            "procs": len(tree),
            "total_rss_mib": total["rss"],
            "total_pss_mib": total["pss"],
            "total_uss_mib": total["uss"],
            "control_pss_mib": tree[0][1]["pss"] / 1024,
            "control_uss_mib": tree[0][1]["uss"] / 1024,
            "other_pss_mib": statistics.mean(m["pss"] for _, m in tree[1:]) / 1024
            if len(tree) > 1
            else 0.0,
            "other_uss_mib": statistics.mean(m["uss"] for _, m in tree[1:]) / 1024
            if len(tree) > 1
            else 0.0,
        }
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--workers", default="1", help="ZTUNNEL_WORKER_THREADS of the agent (default 1)")
    args = p.parse_args()
    base = random_base()
    with tempfile.TemporaryDirectory(prefix="zt-startup-") as tmp:
        work = Path(tmp)
        subprocess.run(
            [PY, "-m", "ztunnel.cli", "ca", "init", str(work / "ca")],
            check=True,
            capture_output=True,
        )
        (work / "mesh.yaml").write_text(mesh_yaml(base))
        env = dict(os.environ)
        env.update(
            agent_env(
                f"{base}.1",
                "default/client/client",
                extra={
                    "LOCAL_XDS_PATH": str(work / "mesh.yaml"),
                    "CA_DIR": str(work / "ca"),
                    "LOG_FORMAT": "json",
                    "RUST_LOG": "ztunnel.agent=info,warn",
                    "ZTUNNEL_WORKER_THREADS": args.workers,
                },
            )
        )
        runs = []
        for i in range(args.runs):
            r = one_run(env, work / f"agent-{i}.log")
            runs.append(r)
            print(
                f"run {i + 1}: ready {r['ready_s'] * 1000:7.0f} ms   "
                f"RSS {r['rss_mib']:5.1f} MiB   CPU {r['cpu_s'] * 1000:5.0f} ms   "
                f"{r['procs']:.0f} procs: RSS {r['total_rss_mib']:5.1f} "
                f"PSS {r['total_pss_mib']:5.1f} USS {r['total_uss_mib']:5.1f} MiB "
                f"(control PSS {r['control_pss_mib']:.1f} USS {r['control_uss_mib']:.1f}; "
                f"each other PSS {r['other_pss_mib']:.1f} USS {r['other_uss_mib']:.1f}), "
                f"CPU all {r['tree_cpu_s'] * 1000:.0f} ms"
            )
        probe = subprocess.run(
            [PY, "-c", PROBE, json.dumps(OPTIONAL)],
            env=env,
            check=True,
            capture_output=True,
            text=True,
        )
    found = json.loads(probe.stdout)
    med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    print(
        f"median of {len(runs)}: ready {med['ready_s'] * 1000:.0f} ms, "
        f"idle RSS {med['rss_mib']:.1f} MiB, CPU to ready+1 s {med['cpu_s'] * 1000:.0f} ms"
    )
    print(
        f"all {med['procs']:.0f} processes (workers={args.workers}): "
        f"RSS {med['total_rss_mib']:.1f}, PSS {med['total_pss_mib']:.1f}, "
        f"USS {med['total_uss_mib']:.1f} MiB; control PSS {med['control_pss_mib']:.1f} "
        f"USS {med['control_uss_mib']:.1f}; each other process PSS "
        f"{med['other_pss_mib']:.1f} USS {med['other_uss_mib']:.1f} MiB; "
        f"CPU of all to ready+1 s {med['tree_cpu_s'] * 1000:.0f} ms"
    )
    print(f"import ztunnel.cli + ztunnel.agent: {found['import_s'] * 1000:.0f} ms")
    print(f"optional modules loaded: {', '.join(found['modules']) or 'none'}")
    print(f"load average: {', '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
