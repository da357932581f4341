"""Compile the BPF programs once per agent build, pin them, and reuse what is pinned.

Layout under the agent's bpffs directory (default /sys/fs/bpf/ztunnel):

    build-<id>/zt_ingress zt_egress zt_loopback zt_sk_lookup   the programs, shared by all pods
    build-<id>/zt_config zt_stats zt_handoff                  their maps

``<id>`` hashes the C sources and the bcc version, so an agent restarted with the same code
opens the pinned programs (no compiler run, nothing re-attached) and an upgraded agent gets
a new build next to the old one; tc then swaps each pod's programs atomically and the old
build's pins are dropped (attached programs live on until replaced).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ztunnel.redirect.ebpf.bpfsys as bpfsys
from ztunnel.redirect.ebpf.environment import EbpfUnavailable, import_bcc
from ztunnel.redirect.ebpf.layout import (
    CONFIG_STRUCT,
    STAT_VALUE_SIZE,
    STATS,
    MapConfig,
    stat_key,
    sum_percpu,
)

# name -> (BPF program type, expected attach type or -1)
PROG_TYPE_SCHED_CLS, PROG_TYPE_SK_LOOKUP, ATTACH_SK_LOOKUP = 3, 30, 36
PROGRAM_TYPES = {
    "zt_ingress": (PROG_TYPE_SCHED_CLS, -1),
    "zt_egress": (PROG_TYPE_SCHED_CLS, -1),
    "zt_loopback": (PROG_TYPE_SCHED_CLS, -1),
    "zt_sk_lookup": (PROG_TYPE_SK_LOOKUP, ATTACH_SK_LOOKUP),
}
PROGRAMS = tuple(PROGRAM_TYPES)
MAPS = ("zt_config", "zt_stats", "zt_handoff")
SOURCE = "redirect.c"
BUILD_PREFIX = "build-"
_BUILD_RE = re.compile(r"^build-([0-9a-f]{12})(?:-tmp-(\d+))?$")


SOURCE_DIR_ENV = "ZTUNNEL_EBPF_DIR"  # the container image sets it (Dockerfile)


def default_source_dir() -> Path:
    """``$ZTUNNEL_EBPF_DIR``, else the ``ebpf/`` folder of the checkout this package runs from."""
    env = os.environ.get(SOURCE_DIR_ENV)
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[3] / "ebpf"


def build_id(source_dir: Path, bcc_version: str) -> str:
    digest = hashlib.sha256(bcc_version.encode())
    for path in sorted(source_dir.glob("*.[ch]")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:12]


@dataclass(frozen=True, slots=True)
class Build:
    """One pinned set of programs and maps; ``prog_ids`` tells attachments of it apart."""

    id: str
    dir: Path
    prog_ids: dict[str, int]
    reused: bool

    def path(self, name: str) -> Path:
        return self.dir / name

    def read_config(self) -> MapConfig:
        fd = bpfsys.obj_get(self.path("zt_config"))
        try:
            raw = bpfsys.map_lookup(fd, stat_key(0), CONFIG_STRUCT.size)
        finally:
            os.close(fd)
        if raw is None:
            raise bpfsys.BpfError("zt_config has no entry 0", 2)
        return MapConfig.unpack(raw)

    def write_config(self, config: MapConfig) -> None:
        fd = bpfsys.obj_get(self.path("zt_config"))
        try:
            bpfsys.map_update(fd, stat_key(0), config.pack())
        finally:
            os.close(fd)

    def counters(self) -> dict[str, int]:
        ncpus = bpfsys.possible_cpus()
        fd = bpfsys.obj_get(self.path("zt_stats"))
        try:
            out = {}
            for index, name in enumerate(STATS):
                raw = bpfsys.map_lookup(fd, stat_key(index), STAT_VALUE_SIZE * ncpus)
                out[name] = sum_percpu(raw, ncpus) if raw is not None else 0
            return out
        finally:
            os.close(fd)

    def maps(self) -> list[bpfsys.MapInfo]:
        infos = []
        for name in MAPS:
            fd = bpfsys.obj_get(self.path(name))
            try:
                infos.append(bpfsys.map_info(fd))
            finally:
                os.close(fd)
        return infos


def _prog_ids(directory: Path) -> dict[str, int]:
    ids = {}
    for name in PROGRAMS:
        fd = bpfsys.obj_get(directory / name)
        try:
            ids[name] = bpfsys.prog_info(fd).id
        finally:
            os.close(fd)
    return ids


def _complete(directory: Path) -> bool:
    return all((directory / name).exists() for name in (*PROGRAMS, *MAPS))


def remove_tree(directory: Path) -> None:
    """Unpin everything under a directory of ours (bpffs has no recursive rmdir)."""
    if not directory.exists():
        return
    for child in directory.iterdir():
        if child.is_dir():
            remove_tree(child)
        else:
            child.unlink(missing_ok=True)
    with contextlib.suppress(FileNotFoundError):
        directory.rmdir()


def _compile_and_pin(source_dir: Path, target: Path, bcc: Any) -> None:
    """Compile with bcc, load, and pin into ``target`` through a temporary directory, so a
    crash leaves either a complete build or none."""
    tmp = target.with_name(f"{target.name}-tmp-{os.getpid()}")  # bpffs refuses dots in names
    remove_tree(tmp)
    tmp.mkdir(parents=True)
    try:
        try:
            module = bcc.BPF(
                src_file=str(source_dir / SOURCE).encode(),
                cflags=[f"-I{source_dir}", "-Wno-unused-function"],
            )
            fns = [
                module.load_func(name.encode(), ptype, attach_type=attach)
                for name, (ptype, attach) in PROGRAM_TYPES.items()
            ]
        except Exception as exc:  # bcc raises bare Exception for compile and verifier errors
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise EbpfUnavailable(f"cannot compile or load {SOURCE}: {first}") from exc
        try:
            for name, fn in zip(PROGRAMS, fns, strict=True):
                bpfsys.obj_pin(fn.fd, tmp / name)
            for name in MAPS:
                # By fd: bcc's table wrappers do not know every map type (sockhash).
                fd = bcc.libbcc.lib.bpf_table_fd(module.module, name.encode())
                bpfsys.obj_pin(fd, tmp / name)
        finally:
            module.cleanup()  # closes the fds; the pins keep programs and maps alive
        if target.exists() and not _complete(target):
            remove_tree(target)  # a damaged build (pins deleted by hand)
        try:
            tmp.rename(target)
        except OSError as exc:
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
            remove_tree(tmp)  # another agent on this pin root pinned the same build first
    except BaseException:
        remove_tree(tmp)
        raise


def load(pin_root: Path, source_dir: Path, config: MapConfig) -> Build:
    """The current build: reused when pinned, else compiled and pinned; config written."""
    bcc = import_bcc()
    bid = build_id(source_dir, str(getattr(bcc, "__version__", "")))
    target = pin_root / f"{BUILD_PREFIX}{bid}"
    reused = _complete(target)
    if not reused:
        pin_root.mkdir(parents=True, exist_ok=True)
        _compile_and_pin(source_dir, target, bcc)
    build = Build(id=bid, dir=target, prog_ids=_prog_ids(target), reused=reused)
    if not reused or build.read_config() != config:
        build.write_config(config)
    drop_other_builds(pin_root, keep=bid)
    return build


def drop_other_builds(pin_root: Path, keep: str | None) -> list[str]:
    """Unpin builds other than ``keep``, and the temporary directories of dead compiles;
    programs still attached somewhere stay loaded."""
    dropped: list[str] = []
    if not pin_root.is_dir():
        return dropped
    for child in pin_root.iterdir():
        m = _BUILD_RE.match(child.name)
        if m is None:
            continue
        pid = m.group(2)
        if (pid is not None and not _alive(int(pid))) or (pid is None and m.group(1) != keep):
            remove_tree(child)
            dropped.append(child.name)
    return dropped


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
