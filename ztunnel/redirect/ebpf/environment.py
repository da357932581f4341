"""What eBPF mode needs from the machine, checked before anything is loaded or pinned.

``check_environment`` raises ``EbpfUnavailable`` (a ``ConfigError``: the CLI prints it on one
line and exits 2) naming the first thing that is missing and how to provide it. The decision
is a pure function of gathered ``Facts`` so every message is tested without root.

bcc's Python bindings come from Debian's ``python3-bpfcc`` in /usr/lib/python3/dist-packages,
outside the project's venv. ``import_bcc`` loads only the ``bcc`` package from there (a spec
for that one directory): adding the whole dist-packages to ``sys.path`` (a .pth) would put
every Debian Python package, built for Debian's interpreter, in front of the venv's.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import platform
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from ztunnel.errors import ConfigError

BCC_DIRS: tuple[str, ...] = ("/usr/lib/python3/dist-packages",)
MIN_KERNEL = (6, 5)  # bpf_sk_assign accepts SO_REUSEPORT listeners (the agent's) from 6.5 on
CAP_NET_ADMIN = 12
CAP_SYS_ADMIN = 21
CAP_BPF = 39
TOOLS = ("tc", "ip", "nsenter", "sysctl")
# bcc's own variable: one directory holding a merged (source + build) header tree. Any
# recent headers serve: the programs use only stable uapi structs (docs/ebpf.md).
HEADERS_ENV = "BCC_KERNEL_SOURCE"
INSTALL_HINT = "scripts/install.sh installs and links it"


class EbpfUnavailable(ConfigError):
    """eBPF redirection cannot run on this machine; the message says what is missing."""

    def __init__(self, problem: str) -> None:
        super().__init__("REDIRECT_MODE=ebpf", "", problem)


@dataclass(frozen=True, slots=True)
class Facts:
    """What the checks look at; gathered from the running system by ``gather_facts``."""

    kernel_release: str
    cap_eff: int
    bpffs_mounted: bool
    pin_root: str
    headers_dir: str
    headers_present: bool
    sources_present: bool
    source_dir: str
    bcc_error: str | None
    missing_tools: tuple[str, ...] = ()


def kernel_version(release: str) -> tuple[int, int]:
    """(major, minor) of a release such as ``6.18.44-fc-v595``; (0, 0) when unparsable."""
    parts = release.split(".")
    try:
        return int(parts[0]), int("".join(ch for ch in parts[1] if ch.isdigit()) or 0)
    except (IndexError, ValueError):
        return (0, 0)


def problems(f: Facts) -> list[str]:
    """Everything missing, most fundamental first; empty when eBPF mode can start."""
    out: list[str] = []
    version = kernel_version(f.kernel_release)
    if version < MIN_KERNEL:
        out.append(
            f"kernel {f.kernel_release} is too old: eBPF redirection needs Linux "
            f">= {MIN_KERNEL[0]}.{MIN_KERNEL[1]} (bpf_sk_assign to SO_REUSEPORT listeners); "
            "use REDIRECT_MODE=iptables"
        )
    caps = {CAP_NET_ADMIN: "CAP_NET_ADMIN", CAP_SYS_ADMIN: "CAP_SYS_ADMIN"}
    if not f.cap_eff & (1 << CAP_SYS_ADMIN):
        caps[CAP_BPF] = "CAP_BPF"
    lacking = [name for bit, name in caps.items() if not f.cap_eff & (1 << bit)]
    if lacking:
        out.append(
            f"missing capabilities {', '.join(lacking)}: run the agent as root "
            "(or grant them to its container)"
        )
    if not f.bpffs_mounted:
        out.append(
            f"no bpf filesystem at {f.pin_root}: mount it with "
            "'mount -t bpf bpf /sys/fs/bpf' (scripts/install.sh does)"
        )
    if not f.sources_present:
        out.append(
            f"BPF sources not found in {f.source_dir}: set ZTUNNEL_EBPF_DIR to the ebpf/ "
            "folder of the ztunnel-py checkout"
        )
    if not f.headers_present:
        out.append(
            f"kernel headers for {f.kernel_release} not found at {f.headers_dir}: install "
            f"linux-headers-amd64 and link it as build and source ({INSTALL_HINT}), "
            f"or point {HEADERS_ENV} at a merged header tree"
        )
    if f.bcc_error is not None:
        out.append(
            f"bcc is not usable ({f.bcc_error}): apt-get install python3-bpfcc "
            "(scripts/install.sh does)"
        )
    if f.missing_tools:
        out.append(
            f"missing commands {', '.join(f.missing_tools)}: apt-get install iproute2 "
            "util-linux procps"
        )
    return out


def _cap_eff(status: str = "/proc/self/status") -> int:
    for line in Path(status).read_text().splitlines():
        if line.startswith("CapEff:"):
            return int(line.split()[1], 16)
    return 0


def bpffs_mounted(path: str, mounts: str = "/proc/self/mounts") -> bool:
    """Whether ``path`` lies on a mounted bpf filesystem (the longest matching mount wins)."""
    best, fstype = "", ""
    target = os.path.normpath(path)
    for line in Path(mounts).read_text().splitlines():
        fields = line.split()
        if len(fields) < 3:
            continue
        point = fields[1].replace("\\040", " ")
        inside = target == point or target.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):
            best, fstype = point, fields[2]
    return fstype == "bpf"


def headers_dir(release: str) -> Path:
    """Where bcc looks for kernel headers: ``$BCC_KERNEL_SOURCE`` (one merged tree, what the
    container image ships), else /lib/modules/<release>/build."""
    override = os.environ.get(HEADERS_ENV)
    return Path(override) if override else Path("/lib/modules") / release / "build"


def headers_present(release: str) -> bool:
    """bcc compiles against the headers dir, or the kernel's own kheaders."""
    if os.environ.get(HEADERS_ENV):
        return (headers_dir(release) / "include" / "linux" / "kconfig.h").is_file()
    return (headers_dir(release) / "include").is_dir() or Path(
        "/sys/kernel/kheaders.tar.xz"
    ).exists()


def import_bcc(dirs: Sequence[str] | None = None) -> ModuleType:
    """The ``bcc`` module: from the venv if it has one, else Debian's python3-bpfcc package.

    Raises ImportError (or OSError when libbcc.so is missing) like a plain import would.
    """
    dirs = BCC_DIRS if dirs is None else dirs  # read at call time: tests point it elsewhere
    loaded = sys.modules.get("bcc")
    if loaded is not None:
        return loaded
    if importlib.util.find_spec("bcc") is not None:
        return importlib.import_module("bcc")
    for d in dirs:
        init = Path(d) / "bcc" / "__init__.py"
        if not init.is_file():
            continue
        spec = importlib.util.spec_from_file_location(
            "bcc", init, submodule_search_locations=[str(init.parent)]
        )
        if spec is None or spec.loader is None:
            continue
        module = importlib.util.module_from_spec(spec)
        sys.modules["bcc"] = module  # its submodules import "bcc.<x>" while it loads
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules["bcc"]
            raise
        return module
    raise ImportError(f"no bcc package in the venv or in {', '.join(dirs)}")


def _bcc_error() -> str | None:
    try:
        import_bcc()
    except (ImportError, OSError) as exc:
        return str(exc) or type(exc).__name__
    return None


def gather_facts(pin_root: Path, source_dir: Path) -> Facts:
    release = platform.release()
    return Facts(
        kernel_release=release,
        cap_eff=_cap_eff(),
        bpffs_mounted=bpffs_mounted(str(pin_root)),
        pin_root=str(pin_root),
        headers_dir=str(headers_dir(release)),
        headers_present=headers_present(release),
        sources_present=(source_dir / "redirect.c").is_file(),
        source_dir=str(source_dir),
        bcc_error=_bcc_error(),
        missing_tools=tuple(t for t in TOOLS if shutil.which(t) is None),
    )


def check_environment(pin_root: Path, source_dir: Path) -> None:
    """Raise ``EbpfUnavailable`` with the first problem; return when eBPF mode can start."""
    found = problems(gather_facts(pin_root, source_dir))
    if found:
        raise EbpfUnavailable(found[0])
