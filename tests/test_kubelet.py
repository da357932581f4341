"""The simulated cluster's pods as the kubelet runs them (cluster/kubelet.py): a pause
process and the programs in cgroup v2 directories named by the pod's UID, found by the
Kubernetes source's /proc scan, and always removed (teardown, cleanup_stale)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from kube_mesh import require_cgroup_v2

from ztunnel.cluster import cgroups
from ztunnel.cluster.kubelet import pod_slice, pod_uid, running_pods
from ztunnel.cluster.net import LOCK_DIR, cleanup_stale, new_prefix, running_cluster
from ztunnel.redirect.netns import NetNamespace, list_named
from ztunnel.sources.clusterfile.spec import loads_spec
from ztunnel.sources.kubernetes.procfs import ProcNetnsFinder, normalize_uid, pod_uid_from_cgroup

pytestmark = pytest.mark.root

SMALL = textwrap.dedent(
    """\
    namespaces: {a: {labels: {}}}
    nodes: [n1]
    pods:
      - {name: p, namespace: a, node: n1, program: [sleep, "60"]}
      - {name: q, namespace: a, node: n1}
    """
)


@pytest.fixture(autouse=True)
def _cgroup_v2() -> None:
    require_cgroup_v2()


def _alive(pid: str) -> bool:
    """Running (a killed orphan may stay a zombie until init reaps it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2] != "Z"


def _cgroup_line(pid: int) -> str:
    (line,) = [ln for ln in Path(f"/proc/{pid}/cgroup").read_text().splitlines() if ln[:3] == "0::"]
    return line


def test_pods_run_in_cgroups_named_by_their_uid_and_are_found_through_proc() -> None:
    with running_cluster(loads_spec(SMALL)) as net, running_pods(net) as kubelet:
        uid = kubelet.uids["a/p"]
        assert uid == pod_uid(net.prefix, "a/p") != pod_uid(new_prefix(), "a/p")  # stable
        sandbox = kubelet.sandboxes["a/p"].pid
        program = kubelet.programs["a/p"].pid
        assert set(kubelet.pids("a/p")) == {sandbox, program}
        line = _cgroup_line(sandbox)
        assert line.startswith(
            f"0::/{net.prefix}/kubepods.slice/kubepods-besteffort.slice/"
            f"kubepods-besteffort-pod{uid.replace('-', '_')}.slice/cri-containerd-"
        )
        assert line.endswith(".scope")
        assert _cgroup_line(program) != line  # another container of the same pod
        assert pod_uid_from_cgroup(line) == normalize_uid(uid)
        # The agent's way: the oldest process of the pod, in a netns holding the pod's IP.
        found = ProcNetnsFinder("/proc").find({uid: [net.pod("a/p").ip]})[uid]
        assert found.pid == sandbox
        with NetNamespace.named(net.pod("a/p").netns) as ns:
            assert found.ident == ns.ident
        assert kubelet.pids("a/q") == [kubelet.sandboxes["a/q"].pid]  # no program: pause only
        root = kubelet.root
    assert not root.exists()


def test_cleanup_stale_removes_the_pod_cgroups_of_a_crashed_run() -> None:
    crash = textwrap.dedent(
        f"""
        import os
        from ztunnel.cluster.kubelet import Kubelet
        from ztunnel.cluster.cgroups import cluster_root
        from ztunnel.cluster.net import build
        from ztunnel.sources.clusterfile.spec import loads_spec
        net = build(loads_spec({SMALL!r}))
        kubelet = Kubelet(net, cluster_root(net.prefix))
        kubelet.start_sandboxes()
        print(net.prefix, flush=True)
        os._exit(0)  # crash: no teardown
        """
    )
    root = str(Path(__file__).resolve().parents[1])
    out = subprocess.run(
        [sys.executable, "-c", crash],
        capture_output=True,
        text=True,
        timeout=30,
        env={"PYTHONPATH": root, "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
        check=True,
    )
    leaked = out.stdout.strip()
    tree = cgroups.cluster_root(leaked)
    assert tree is not None
    try:
        pids = [p for procs in tree.rglob("cgroup.procs") for p in procs.read_text().split()]
        assert len(pids) == 2  # the two pause processes, orphaned
        removed = cleanup_stale(prefix_glob=leaked)
        assert str(tree) in removed and not tree.exists()
        assert not [n for n in list_named() if n.startswith(leaked)]
        assert not [p for p in pids if _alive(p)]
    finally:
        cgroups.remove_tree(tree)
        cleanup_stale(prefix_glob=leaked, min_age=0)


def test_cgroups_left_after_their_netns_went_are_removed_when_the_lock_is_stale() -> None:
    prefix = new_prefix()
    tree = cgroups.cluster_root(prefix)
    assert tree is not None
    leaf = pod_slice(tree, pod_uid(prefix, "a/p")) / "cri-containerd-0.scope"
    leaf.mkdir(parents=True)
    LOCK_DIR.mkdir(parents=True, exist_ok=True)
    (LOCK_DIR / f"{prefix}.lock").write_text("1\n")  # its owner is gone: nobody holds it
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        (leaf / "cgroup.procs").write_text(str(sleeper.pid))
        assert str(tree) in cleanup_stale(prefix_glob=prefix)
        assert not tree.exists() and sleeper.wait(5) != 0
    finally:
        sleeper.kill()
        sleeper.wait()
        cgroups.remove_tree(tree)
        (LOCK_DIR / f"{prefix}.lock").unlink(missing_ok=True)
