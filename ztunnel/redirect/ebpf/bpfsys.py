"""The few bpf(2) commands the agent needs beyond compiling: pin, open pinned, info, map access.

Called directly through the syscall because bcc's Python API has no pinning, no
BPF_OBJ_GET and no program/map info, and the libbpf symbols libbcc re-exports differ
between builds; the syscall's ``union bpf_attr`` layout is kernel ABI and never changes.
Every failure becomes ``BpfError`` carrying the errno.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import struct
from dataclasses import dataclass
from pathlib import Path

from ztunnel.errors import ZtunnelError

_NR_BPF = {"x86_64": 321, "aarch64": 280}

BPF_MAP_LOOKUP_ELEM = 1
BPF_MAP_UPDATE_ELEM = 2
BPF_OBJ_PIN = 6
BPF_OBJ_GET = 7
BPF_PROG_GET_FD_BY_ID = 13
BPF_OBJ_GET_INFO_BY_FD = 15
BPF_LINK_CREATE = 28
BPF_LINK_UPDATE = 29
BPF_LINK_DETACH = 34

ATTACH_SK_LOOKUP = 36
LINK_TYPE_NETNS = 5

_ATTR_SIZE = 128  # larger than every command's part of union bpf_attr that we fill
_INFO_SIZE = 256  # larger than bpf_prog_info / bpf_map_info; the kernel fills what it knows

# bpf_prog_info / bpf_map_info / bpf_link_info field offsets (include/uapi/linux/bpf.h)
_PROG_TYPE, _PROG_ID, _PROG_TAG, _PROG_NAME = 0, 4, 8, 64
_MAP_TYPE, _MAP_ID, _MAP_KEY, _MAP_VALUE, _MAP_MAX, _MAP_NAME = 0, 4, 8, 12, 16, 24
_NAME_LEN = 16
_LINK_TYPE, _LINK_ID, _LINK_PROG, _LINK_NETNS_INO, _LINK_NETNS_ATTACH = 0, 4, 8, 16, 20

PROG_TYPES = {3: "sched_cls"}
MAP_TYPES = {1: "hash", 2: "array", 6: "percpu_array", 18: "sockhash"}

_libc = ctypes.CDLL(None, use_errno=True)


class BpfError(ZtunnelError):
    """A bpf(2) call failed; ``errno`` tells why (EPERM, ENOENT, ...)."""

    def __init__(self, what: str, err: int) -> None:
        self.errno = err
        super().__init__(f"{what}: {os.strerror(err)}")


@dataclass(frozen=True, slots=True)
class ProgInfo:
    id: int
    type: str
    name: str
    tag: str


@dataclass(frozen=True, slots=True)
class MapInfo:
    id: int
    type: str
    name: str
    key_size: int
    value_size: int
    max_entries: int


@dataclass(frozen=True, slots=True)
class LinkInfo:
    id: int
    type: int
    prog_id: int
    netns_ino: int  # 0 once the netns is gone (the link is then detached)
    attach_type: int


def _bpf(cmd: int, attr: ctypes.Array[ctypes.c_char], what: str) -> int:
    nr = _NR_BPF.get(platform.machine())
    if nr is None:
        raise BpfError(f"{what}: bpf(2) on {platform.machine()}", errno.ENOSYS)
    ret = int(
        _libc.syscall(
            ctypes.c_long(nr), ctypes.c_int(cmd), ctypes.byref(attr), ctypes.c_uint(len(attr))
        )
    )
    if ret < 0:
        raise BpfError(what, ctypes.get_errno())
    return ret


def _attr() -> ctypes.Array[ctypes.c_char]:
    return ctypes.create_string_buffer(_ATTR_SIZE)


def obj_pin(fd: int, path: Path) -> None:
    name = ctypes.create_string_buffer(os.fsencode(path))
    attr = _attr()
    struct.pack_into("=QI", attr, 0, ctypes.addressof(name), fd)
    _bpf(BPF_OBJ_PIN, attr, f"pin {path}")


def obj_get(path: Path) -> int:
    """An fd (close-on-exec) for the program or map pinned at ``path``."""
    name = ctypes.create_string_buffer(os.fsencode(path))
    attr = _attr()
    struct.pack_into("=QI", attr, 0, ctypes.addressof(name), 0)
    return _bpf(BPF_OBJ_GET, attr, f"open pinned {path}")


def prog_fd_by_id(prog_id: int) -> int:
    attr = _attr()
    struct.pack_into("=I", attr, 0, prog_id)
    return _bpf(BPF_PROG_GET_FD_BY_ID, attr, f"open program id {prog_id}")


def _info(fd: int) -> bytes:
    info = ctypes.create_string_buffer(_INFO_SIZE)
    attr = _attr()
    struct.pack_into("=IIQ", attr, 0, fd, _INFO_SIZE, ctypes.addressof(info))
    _bpf(BPF_OBJ_GET_INFO_BY_FD, attr, f"info of bpf fd {fd}")
    return info.raw


def _name(raw: bytes, offset: int) -> str:
    return raw[offset : offset + _NAME_LEN].split(b"\0", 1)[0].decode(errors="replace")


def prog_info(fd: int) -> ProgInfo:
    raw = _info(fd)
    ptype, pid = struct.unpack_from("=II", raw, _PROG_TYPE)
    return ProgInfo(
        id=pid,
        type=PROG_TYPES.get(ptype, str(ptype)),
        name=_name(raw, _PROG_NAME),
        tag=raw[_PROG_TAG : _PROG_TAG + 8].hex(),
    )


def map_info(fd: int) -> MapInfo:
    raw = _info(fd)
    mtype, mid, key, value, max_entries = struct.unpack_from("=IIIII", raw, _MAP_TYPE)
    return MapInfo(
        id=mid,
        type=MAP_TYPES.get(mtype, str(mtype)),
        name=_name(raw, _MAP_NAME),
        key_size=key,
        value_size=value,
        max_entries=max_entries,
    )


def link_info(fd: int) -> LinkInfo:
    raw = _info(fd)
    ltype, lid, prog_id = struct.unpack_from("=III", raw, _LINK_TYPE)
    ino, attach = struct.unpack_from("=II", raw, _LINK_NETNS_INO)
    return LinkInfo(id=lid, type=ltype, prog_id=prog_id, netns_ino=ino, attach_type=attach)


def link_create(prog_fd: int, target_fd: int, attach_type: int) -> int:
    """A link fd attaching ``prog_fd`` to ``target_fd`` (for sk_lookup: a netns fd)."""
    attr = _attr()
    struct.pack_into("=IIII", attr, 0, prog_fd, target_fd, attach_type, 0)
    return _bpf(BPF_LINK_CREATE, attr, f"link program fd {prog_fd} to fd {target_fd}")


def link_update(link_fd: int, prog_fd: int) -> None:
    """Swap the program of a link atomically."""
    attr = _attr()
    struct.pack_into("=IIII", attr, 0, link_fd, prog_fd, 0, 0)
    _bpf(BPF_LINK_UPDATE, attr, f"update link fd {link_fd}")


def link_detach(link_fd: int) -> None:
    """Detach now, whoever else still holds the link."""
    attr = _attr()
    struct.pack_into("=I", attr, 0, link_fd)
    _bpf(BPF_LINK_DETACH, attr, f"detach link fd {link_fd}")


def map_lookup(fd: int, key: bytes, value_size: int) -> bytes | None:
    """The value stored under ``key`` (``value_size`` bytes), None when there is none."""
    k = ctypes.create_string_buffer(key, len(key))
    v = ctypes.create_string_buffer(value_size)
    attr = _attr()
    struct.pack_into("=IIQQ", attr, 0, fd, 0, ctypes.addressof(k), ctypes.addressof(v))
    try:
        _bpf(BPF_MAP_LOOKUP_ELEM, attr, f"lookup in map fd {fd}")
    except BpfError as exc:
        if exc.errno == errno.ENOENT:
            return None
        raise
    return v.raw


def map_update(fd: int, key: bytes, value: bytes) -> None:
    k = ctypes.create_string_buffer(key, len(key))
    v = ctypes.create_string_buffer(value, len(value))
    attr = _attr()
    struct.pack_into(
        "=IIQQQ",
        attr,
        0,
        fd,
        0,
        ctypes.addressof(k),
        ctypes.addressof(v),
        0,  # BPF_ANY
    )
    _bpf(BPF_MAP_UPDATE_ELEM, attr, f"update map fd {fd}")


def possible_cpus(path: str = "/sys/devices/system/cpu/possible") -> int:
    """How many per-CPU slots a per-CPU map value has (as libbpf counts them)."""
    return parse_cpu_list(Path(path).read_text())


def parse_cpu_list(text: str) -> int:
    """Number of CPUs in a kernel CPU list such as ``0-3,6``."""
    count = 0
    for part in text.strip().split(","):
        if not part:
            continue
        first, _, last = part.partition("-")
        count += int(last or first) - int(first) + 1
    if count <= 0:
        raise ValueError(f"empty CPU list {text!r}")
    return count
