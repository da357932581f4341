"""Network namespaces: hold one fd per netns, enter it on the calling thread, make sockets in it.

Python 3.11 has no ``os.setns``, so ``setns(2)`` is called through ctypes. setns only
switches the *calling thread*, and a socket stays in the netns it was created in, so the
pattern is always: setns(target) → socket() → setns(back), synchronously, no await between.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import re
import socket as _socket
import subprocess
from collections.abc import Iterator, Sequence
from pathlib import Path

from ztunnel.errors import ZtunnelError
from ztunnel.model import pod

CLONE_NEWNET = 0x40000000
NETNS_RUN_DIR = Path(pod.NETNS_RUN_DIR)
_THREAD_NETNS = "/proc/thread-self/ns/net"
# Names go into paths and argv; keep them boring so they can never escape /var/run/netns.
_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,200}$")

_libc = ctypes.CDLL(None, use_errno=True)
_libc.setns.argtypes = [ctypes.c_int, ctypes.c_int]
_libc.setns.restype = ctypes.c_int


class NetnsError(ZtunnelError):
    """A netns could not be opened, entered or commanded."""


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns(CLONE_NEWNET): {os.strerror(err)}")


class NetNamespace:
    """One open fd of a network namespace; the handle everything netns-related goes through."""

    def __init__(self, fd: int, path: str) -> None:
        self._fd = fd
        self.path = path

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> NetNamespace:
        """Open ``/var/run/netns/<name>``, ``/proc/<pid>/ns/net`` or any nsfs path."""
        p = os.fspath(path)
        try:
            fd = os.open(p, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise NetnsError(f"cannot open netns {p}: {exc.strerror}") from exc
        return cls(fd, p)

    @classmethod
    def current(cls) -> NetNamespace:
        """The calling thread's netns."""
        return cls.open(_THREAD_NETNS)

    @classmethod
    def named(cls, name: str) -> NetNamespace:
        return cls.open(NETNS_RUN_DIR / _checked_name(name))

    @property
    def fd(self) -> int:
        if self._fd < 0:
            raise NetnsError(f"netns {self.path} is closed")
        return self._fd

    @property
    def closed(self) -> bool:
        return self._fd < 0

    @property
    def ident(self) -> tuple[int, int]:
        """(st_dev, st_ino): equal idents mean the same netns, so a recreated sandbox shows."""
        st = os.fstat(self.fd)
        return (st.st_dev, st.st_ino)

    @property
    def proc_path(self) -> str:
        """A path naming this netns that other processes (nsenter, ip) can open."""
        return f"/proc/{os.getpid()}/fd/{self.fd}"

    def close(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)

    def __enter__(self) -> NetNamespace:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"NetNamespace({self.path!r}, fd={self._fd})"

    @contextlib.contextmanager
    def entered(self) -> Iterator[None]:
        """Switch the calling thread into this netns; always switch back, even on error."""
        original = os.open(_THREAD_NETNS, os.O_RDONLY | os.O_CLOEXEC)
        try:
            _setns(self.fd)
            try:
                yield
            finally:
                # Failing to restore would leave the thread in a pod's netns: never ignore it.
                _setns(original)
        finally:
            os.close(original)

    def socket(
        self,
        family: int = _socket.AF_INET,
        type: int = _socket.SOCK_STREAM,
        proto: int = 0,
    ) -> _socket.socket:
        """A socket living in this netns (bind/listen/connect may then happen anywhere)."""
        with self.entered():
            return _socket.socket(family, type, proto)

    def run(
        self,
        argv: Sequence[str],
        *,
        input: str | None = None,
        check: bool = True,
        timeout: float = 30.0,
    ) -> subprocess.CompletedProcess[str]:
        """Run a command inside this netns (nsenter), capturing text output."""
        cmd = ["nsenter", f"--net={self.proc_path}", "--", *argv]
        try:
            proc = subprocess.run(
                cmd, input=input, capture_output=True, text=True, timeout=timeout, check=False
            )
        except subprocess.TimeoutExpired as exc:
            raise NetnsError(f"{' '.join(argv)} in netns {self.path} timed out") from exc
        except OSError as exc:  # nsenter missing or not executable
            raise NetnsError(f"cannot run {cmd[0]} for netns {self.path}: {exc}") from exc
        if check and proc.returncode != 0:
            raise NetnsError(
                f"{' '.join(argv)} in netns {self.path} failed ({proc.returncode}): "
                f"{proc.stderr.strip()}"
            )
        return proc


def _checked_name(name: str) -> str:
    if not _NAME_RE.match(name) or name in (".", ".."):
        raise NetnsError(f"invalid netns name {name!r}")
    return name


def create_named(name: str) -> NetNamespace:
    """``ip netns add <name>`` and open it; lo is brought up because nothing works without it."""
    proc = subprocess.run(
        ["ip", "netns", "add", _checked_name(name)], capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        raise NetnsError(f"ip netns add {name} failed: {proc.stderr.strip()}")
    ns = NetNamespace.named(name)
    ns.run(["ip", "link", "set", "lo", "up"])
    return ns


def delete_named(name: str) -> bool:
    """``ip netns del <name>``; True if it existed. Idempotent."""
    if not (NETNS_RUN_DIR / _checked_name(name)).exists():
        return False
    proc = subprocess.run(["ip", "netns", "del", name], capture_output=True, text=True, check=False)
    if proc.returncode != 0 and (NETNS_RUN_DIR / name).exists():
        raise NetnsError(f"ip netns del {name} failed: {proc.stderr.strip()}")
    return True


def list_named() -> list[str]:
    """Names under /var/run/netns (what ``ip netns list`` shows)."""
    try:
        return sorted(os.listdir(NETNS_RUN_DIR))
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            return []
        raise
