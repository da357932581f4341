"""The maps shared with ``ebpf/redirect.c``, described, packed and unpacked on the Python side.

The C side is ``ebpf/ztunnel_redirect.h``. ``CONFIG_FIELDS`` and ``STATS`` mirror it field by
field and name by name; tests/test_ebpf_layout.py parses the header and fails when they drift.
The header keeps ``struct zt_config`` free of implicit padding, so native byte order with no
alignment (``=``) is the exact layout clang produces.
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Sequence
from dataclasses import dataclass

# (field, C type, array length or 0) in declaration order.
CONFIG_FIELDS: tuple[tuple[str, str, int], ...] = (
    ("agent_mark", "__u32", 0),
    ("mark_mask", "__u32", 0),
    ("loop_mark", "__u32", 0),
    ("lo_ifindex", "__u32", 0),
    ("outbound_port", "__u16", 0),
    ("inbound_plaintext_port", "__u16", 0),
    ("inbound_port", "__u16", 0),
    ("flags", "__u16", 0),
    ("probe_v4", "__u8", 4),
    ("probe_v6", "__u8", 16),
)

# The C header's ZT_F_* flags.
FLAG_CAPTURE_OUTBOUND = 0x1
FLAG_CAPTURE_INBOUND = 0x2
FLAG_IPV6 = 0x4

# ``enum zt_stat`` in order: index in the per-CPU counter array -> name.
STATS: tuple[str, ...] = (
    "inbound_captured",
    "outbound_captured",
    "looped",
    "no_listener",
    "assign_failed",
    "handoff",
    "opaque_dropped",
)

_SCALAR = {"__u8": "B", "__u16": "H", "__u32": "I", "__u64": "Q"}


def struct_format(fields: Sequence[tuple[str, str, int]]) -> str:
    """``struct`` format for a padding-free C struct: byte arrays as ``Ns``, scalars native."""
    parts = []
    for _, ctype, length in fields:
        if length:
            if ctype != "__u8":
                raise ValueError(f"only byte arrays are supported, not {ctype}[{length}]")
            parts.append(f"{length}s")
        else:
            parts.append(_SCALAR[ctype])
    return "=" + "".join(parts)


CONFIG_STRUCT = struct.Struct(struct_format(CONFIG_FIELDS))
STAT_VALUE_SIZE = 8  # u64 per CPU


@dataclass(frozen=True, slots=True)
class MapConfig:
    """The single ``zt_config`` entry (key 0); ports in host order, addresses as text."""

    agent_mark: int = 0x539
    mark_mask: int = 0xFFF
    loop_mark: int = 0x111
    lo_ifindex: int = 1
    outbound_port: int = 15001
    inbound_plaintext_port: int = 15006
    inbound_port: int = 15008
    flags: int = FLAG_CAPTURE_OUTBOUND | FLAG_CAPTURE_INBOUND
    probe_v4: str = "169.254.7.127"
    probe_v6: str = "fd16:9254:7127:1337:ffff:ffff:ffff:ffff"

    def pack(self) -> bytes:
        return CONFIG_STRUCT.pack(
            self.agent_mark,
            self.mark_mask,
            self.loop_mark,
            self.lo_ifindex,
            self.outbound_port,
            self.inbound_plaintext_port,
            self.inbound_port,
            self.flags,
            ipaddress.IPv4Address(self.probe_v4).packed,
            ipaddress.IPv6Address(self.probe_v6).packed,
        )

    @classmethod
    def unpack(cls, raw: bytes) -> MapConfig:
        (
            agent_mark,
            mark_mask,
            loop_mark,
            lo_ifindex,
            outbound_port,
            inbound_plaintext_port,
            inbound_port,
            flags,
            probe_v4,
            probe_v6,
        ) = CONFIG_STRUCT.unpack(raw)
        return cls(
            agent_mark=agent_mark,
            mark_mask=mark_mask,
            loop_mark=loop_mark,
            lo_ifindex=lo_ifindex,
            outbound_port=outbound_port,
            inbound_plaintext_port=inbound_plaintext_port,
            inbound_port=inbound_port,
            flags=flags,
            probe_v4=str(ipaddress.IPv4Address(probe_v4)),
            probe_v6=str(ipaddress.IPv6Address(probe_v6)),
        )


def stat_key(index: int) -> bytes:
    """Array maps are keyed by a native u32 index."""
    return struct.pack("=I", index)


def sum_percpu(raw: bytes, ncpus: int) -> int:
    """A per-CPU u64 value as the bpf syscall returns it: one 8-byte slot per possible CPU."""
    if len(raw) < ncpus * STAT_VALUE_SIZE:
        raise ValueError(f"per-CPU value of {len(raw)} bytes for {ncpus} CPUs")
    return sum(struct.unpack_from(f"={ncpus}Q", raw))
