"""eBPF mode without root: the map layouts shared with the C programs, the environment checks,
the bcc import shim, and parsing what tc prints."""

from __future__ import annotations

import os
import re
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from ztunnel.errors import ConfigError
from ztunnel.redirect.ebpf import build, environment, layout, tc
from ztunnel.redirect.ebpf.bpfsys import parse_cpu_list
from ztunnel.redirect.ebpf.environment import EbpfUnavailable, Facts, problems
from ztunnel.redirect.ebpf.layout import CONFIG_FIELDS, CONFIG_STRUCT, STATS, MapConfig
from ztunnel.redirect.ebpf.redirector import parse_pod_dir_name, pin_name, pod_dir_name

HEADER = Path(__file__).resolve().parents[1] / "ebpf" / "ztunnel_redirect.h"
SOURCE = HEADER.with_name("redirect.c")
_SIZES = {"__u8": 1, "__u16": 2, "__u32": 4, "__u64": 8}


def _c_struct(name: str) -> list[tuple[str, str, int]]:
    """(field, type, array length) of ``struct <name>`` in the header, in order."""
    text = re.sub(r"/\*.*?\*/", "", HEADER.read_text(), flags=re.S)
    body = re.search(rf"struct {name} \{{(.*?)\}};", text, re.S)
    assert body is not None, f"struct {name} not in {HEADER}"
    fields = []
    for decl in body.group(1).split(";"):
        decl = decl.strip()
        if not decl:
            continue
        m = re.fullmatch(r"(__u\d+)\s+(\w+)(?:\[(\d+)\])?", decl)
        assert m is not None, f"unsupported declaration {decl!r}"
        fields.append((m.group(2), m.group(1), int(m.group(3) or 0)))
    return fields


def _c_offsets(fields: list[tuple[str, str, int]]) -> dict[str, int]:
    """Offsets by C's natural-alignment rules; asserts the struct has no implicit padding."""
    offsets, at = {}, 0
    for name, ctype, length in fields:
        size = _SIZES[ctype]
        assert at % size == 0, f"{name} would be padded: keep the header padding-free"
        offsets[name] = at
        at += size * max(length, 1)
    return offsets


def _c_defines() -> dict[str, int]:
    text = HEADER.read_text()
    return {m[0]: int(m[1], 0) for m in re.findall(r"#define (ZT_F_\w+) (0x[0-9a-f]+|\d+)", text)}


def _c_enum(name: str) -> list[str]:
    text = re.sub(r"/\*.*?\*/", "", HEADER.read_text(), flags=re.S)
    body = re.search(rf"enum {name} \{{(.*?)\}};", text, re.S)
    assert body is not None
    names = [item.split("=")[0].strip() for item in body.group(1).split(",")]
    return [n for n in names if n]


def test_config_fields_match_the_c_struct() -> None:
    assert _c_struct("zt_config") == list(CONFIG_FIELDS)


def test_config_struct_size_and_offsets_match_c_layout() -> None:
    fields = _c_struct("zt_config")
    offsets = _c_offsets(fields)
    assert CONFIG_STRUCT.size == 44
    last_name, last_type, last_len = fields[-1]
    assert offsets[last_name] + _SIZES[last_type] * last_len == CONFIG_STRUCT.size
    # Each scalar sits where C puts it: pack a config with distinct values and read them back
    # at the C offsets.
    cfg = MapConfig(
        agent_mark=0x11223344,
        mark_mask=0x0FFF,
        loop_mark=0x111,
        lo_ifindex=7,
        outbound_port=15001,
        inbound_plaintext_port=15006,
        inbound_port=15008,
        flags=0x5,
    )
    raw = cfg.pack()
    for name, ctype, length in fields:
        if length:
            continue
        fmt = "=" + layout._SCALAR[ctype]
        assert struct.unpack_from(fmt, raw, offsets[name])[0] == getattr(cfg, name), name
    assert raw[offsets["probe_v4"] : offsets["probe_v4"] + 4] == bytes([169, 254, 7, 127])
    assert raw[offsets["probe_v6"] : offsets["probe_v6"] + 2] == bytes([0xFD, 0x16])


def test_config_bytes_written_by_c_unpack_in_python() -> None:
    # Bytes laid out field by field at the C offsets, as the kernel returns the map value.
    fields = _c_struct("zt_config")
    offsets = _c_offsets(fields)
    raw = bytearray(CONFIG_STRUCT.size)
    values = {"agent_mark": 0x77, "mark_mask": 0xFF, "loop_mark": 0x42, "lo_ifindex": 1}
    values |= {"outbound_port": 25001, "inbound_plaintext_port": 25006, "inbound_port": 25008}
    values |= {"flags": layout.FLAG_CAPTURE_INBOUND}
    for name, ctype, length in fields:
        if not length:
            struct.pack_into("=" + layout._SCALAR[ctype], raw, offsets[name], values[name])
    raw[offsets["probe_v4"] : offsets["probe_v4"] + 4] = bytes([10, 0, 0, 9])
    raw[offsets["probe_v6"] : offsets["probe_v6"] + 16] = bytes(15) + b"\x01"
    cfg = MapConfig.unpack(bytes(raw))
    assert cfg == MapConfig(**values, probe_v4="10.0.0.9", probe_v6="::1")
    assert MapConfig.unpack(cfg.pack()) == cfg


def test_flags_and_stats_match_the_c_header() -> None:
    assert _c_defines() == {
        "ZT_F_CAPTURE_OUTBOUND": layout.FLAG_CAPTURE_OUTBOUND,
        "ZT_F_CAPTURE_INBOUND": layout.FLAG_CAPTURE_INBOUND,
        "ZT_F_IPV6": layout.FLAG_IPV6,
    }
    enum = _c_enum("zt_stat")
    assert enum[-1] == "ZT_STAT_MAX"
    assert [n.removeprefix("ZT_STAT_").lower() for n in enum[:-1]] == list(STATS)


def test_c_source_uses_the_map_and_program_names_python_pins() -> None:
    text = SOURCE.read_text()
    contexts = {build.PROG_TYPE_SCHED_CLS: "struct __sk_buff \\*skb"}
    contexts[build.PROG_TYPE_SK_LOOKUP] = "struct bpf_sk_lookup \\*ctx"
    for name, (ptype, _) in build.PROGRAM_TYPES.items():
        assert re.search(rf"^int {name}\({contexts[ptype]}\)$", text, re.M), name
    assert "BPF_ARRAY(zt_config, struct zt_config, 1);" in text
    assert "BPF_PERCPU_ARRAY(zt_stats, u64, ZT_STAT_MAX);" in text
    assert 'BPF_TABLE("sockhash", struct zt_handoff_key, int, zt_handoff, 1024);' in text
    assert set(build.MAPS) == {"zt_config", "zt_stats", "zt_handoff"}
    # Kernel names are cut at 15 characters; pins and tc output use them.
    assert all(len(n) <= 15 for n in (*build.PROGRAMS, *build.MAPS))


def test_percpu_values_are_summed_over_possible_cpus() -> None:
    raw = struct.pack("=3Q", 1, 20, 300)
    assert layout.sum_percpu(raw, 3) == 321
    with pytest.raises(ValueError):
        layout.sum_percpu(raw, 4)
    assert parse_cpu_list("0-3\n") == 4
    assert parse_cpu_list("0,2-3") == 3
    assert parse_cpu_list("0") == 1


def test_build_id_follows_sources_and_bcc_version(tmp_path: Path) -> None:
    (tmp_path / "redirect.c").write_text("int x;\n")
    (tmp_path / "notes.txt").write_text("ignored")
    first = build.build_id(tmp_path, "0.26.0")
    assert build.build_id(tmp_path, "0.26.0") == first
    assert build.build_id(tmp_path, "0.29.1") != first
    (tmp_path / "notes.txt").write_text("still ignored")
    assert build.build_id(tmp_path, "0.26.0") == first
    (tmp_path / "ztunnel_redirect.h").write_text("#define X 1\n")
    assert build.build_id(tmp_path, "0.26.0") != first


def test_drop_other_builds_keeps_the_current_one_and_live_compiles(tmp_path: Path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    keep, old = "a" * 12, "b" * 12
    names = [
        f"build-{keep}",
        f"build-{old}",
        f"build-{keep}-tmp-{dead.pid}",  # a compile that crashed
        f"build-{keep}-tmp-{os.getpid()}",  # a compile running right now
        "pods",
    ]
    for name in names:
        (tmp_path / name).mkdir()
        (tmp_path / name / "zt_config").write_text("")
    dropped = build.drop_other_builds(tmp_path, keep=keep)
    assert sorted(dropped) == sorted([f"build-{old}", f"build-{keep}-tmp-{dead.pid}"])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [f"build-{keep}", f"build-{keep}-tmp-{os.getpid()}", "pods"]
    )


# --- environment checks ------------------------------------------------------------------

ALL_CAPS = (1 << 12) | (1 << 21) | (1 << 39)


def _facts(**changes: object) -> Facts:
    base: dict[str, object] = {
        "kernel_release": "6.18.44-fc",
        "cap_eff": ALL_CAPS,
        "bpffs_mounted": True,
        "pin_root": "/sys/fs/bpf/ztunnel",
        "headers_dir": "/lib/modules/6.18.44-fc/build",
        "headers_present": True,
        "sources_present": True,
        "source_dir": "/src/ebpf",
        "bcc_error": None,
        "missing_tools": (),
    }
    base.update(changes)
    return Facts(**base)  # type: ignore[arg-type]


def test_complete_environment_has_no_problems() -> None:
    assert problems(_facts()) == []


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"bcc_error": "No module named 'bcc'"}, "apt-get install python3-bpfcc"),
        ({"headers_present": False}, "linux-headers-amd64 and link it as build and source"),
        ({"bpffs_mounted": False}, "mount -t bpf bpf /sys/fs/bpf"),
        ({"cap_eff": 0}, "missing capabilities CAP_NET_ADMIN, CAP_SYS_ADMIN, CAP_BPF"),
        ({"cap_eff": 1 << 21}, "missing capabilities CAP_NET_ADMIN"),
        ({"kernel_release": "6.1.0-56-amd64"}, "needs Linux >= 6.5"),
        ({"sources_present": False}, "set ZTUNNEL_EBPF_DIR"),
        ({"missing_tools": ("tc",)}, "missing commands tc"),
    ],
)
def test_each_missing_piece_is_named_with_its_fix(
    changes: dict[str, object], expected: str
) -> None:
    found = problems(_facts(**changes))
    assert len(found) == 1
    assert expected in found[0]
    assert "\n" not in found[0]


def test_unavailable_is_a_one_line_config_error() -> None:
    err = EbpfUnavailable("bcc is not usable")
    assert isinstance(err, ConfigError)
    assert str(err) == "REDIRECT_MODE=ebpf: bcc is not usable"


def test_kernel_version_parsing() -> None:
    assert environment.kernel_version("6.18.44-fc-v595") == (6, 18)
    assert environment.kernel_version("6.5.0") == (6, 5)
    assert environment.kernel_version("5.15.0-rc1") == (5, 15)
    assert environment.kernel_version("weird") == (0, 0)


def test_a_merged_header_tree_named_by_bcc_kernel_source_counts_as_headers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The container image ships one merged tree and sets BCC_KERNEL_SOURCE (bcc's own
    variable): the check looks where bcc will look, and says so when it is not there."""
    monkeypatch.setenv(environment.HEADERS_ENV, str(tmp_path))
    assert environment.headers_dir("6.18.44-fc") == tmp_path
    assert not environment.headers_present("6.18.44-fc")
    (tmp_path / "include" / "linux").mkdir(parents=True)
    (tmp_path / "include" / "linux" / "kconfig.h").write_text("")
    assert environment.headers_present("6.18.44-fc")
    monkeypatch.delenv(environment.HEADERS_ENV)
    assert environment.headers_dir("6.18.44-fc") == Path("/lib/modules/6.18.44-fc/build")


def test_bpffs_detection_uses_the_longest_matching_mount(tmp_path: Path) -> None:
    mounts = tmp_path / "mounts"
    mounts.write_text(
        "sysfs /sys sysfs rw 0 0\n"
        "bpf /sys/fs/bpf bpf rw,relatime 0 0\n"
        "tmpfs /sys/fs/bpf/tmp tmpfs rw 0 0\n"
    )
    assert environment.bpffs_mounted("/sys/fs/bpf/ztunnel", str(mounts))
    assert environment.bpffs_mounted("/sys/fs/bpf", str(mounts))
    assert not environment.bpffs_mounted("/sys/fs/bpf/tmp/x", str(mounts))
    assert not environment.bpffs_mounted("/sys/fs/bpfx", str(mounts))
    mounts.write_text("sysfs /sys sysfs rw 0 0\n")
    assert not environment.bpffs_mounted("/sys/fs/bpf/ztunnel", str(mounts))


@pytest.fixture
def no_bcc(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No ``bcc`` imported nor importable from sys.path; the real one (if any) comes back."""
    saved = {k: m for k, m in sys.modules.items() if k == "bcc" or k.startswith("bcc.")}
    for name in saved:
        del sys.modules[name]
    monkeypatch.setattr(environment.importlib.util, "find_spec", lambda name: None)
    try:
        yield
    finally:
        for name in [k for k in sys.modules if k == "bcc" or k.startswith("bcc.")]:
            del sys.modules[name]
        sys.modules.update(saved)


@pytest.mark.usefixtures("no_bcc")
def test_bcc_shim_imports_only_the_bcc_package_from_a_dist_dir(tmp_path: Path) -> None:
    pkg = tmp_path / "bcc"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("from .table import TABLE\n__version__ = 'fake'\n")
    (pkg / "table.py").write_text("TABLE = 'ok'\n")
    (tmp_path / "yaml.py").write_text("raise RuntimeError('must not be importable')\n")
    module = environment.import_bcc([str(tmp_path / "missing"), str(tmp_path)])
    assert module.__version__ == "fake"
    assert module.TABLE == "ok"
    assert str(tmp_path) not in sys.path  # only bcc came in, not the whole directory
    del sys.modules["bcc"]
    with pytest.raises(ImportError, match="no bcc package"):
        environment.import_bcc([str(tmp_path / "missing")])


@pytest.mark.usefixtures("no_bcc")
def test_bcc_shim_leaves_no_half_imported_module(tmp_path: Path) -> None:
    pkg = tmp_path / "bcc"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("raise OSError('libbcc.so.0: cannot open shared object')\n")
    with pytest.raises(OSError, match="libbcc"):
        environment.import_bcc([str(tmp_path)])
    assert "bcc" not in sys.modules


# --- tc output, pin names -----------------------------------------------------------------

TC_JSON = (
    '[{"protocol":"all","pref":1,"kind":"bpf","chain":0},'
    '{"protocol":"all","pref":1,"kind":"bpf","chain":0,"options":{"handle":"0x2d7",'
    '"bpf_name":"zt_egress:[*fsobj]","direct-action":true,"not_in_hw":true,'
    '"prog":{"id":110,"name":"zt_egress","tag":"20699104520d55d1","jited":1}}},'
    '{"protocol":"all","pref":1,"kind":"bpf","chain":0,"options":{"handle":"0x1",'
    '"bpf_name":"user.o:[tc]","direct-action":true,"prog":{"id":7,"name":"user","tag":"ab"}}},'
    '{"protocol":"ip","pref":49152,"kind":"u32","chain":0,"options":{"fh":"800:"}}]'
)


def test_parse_tc_filters_tells_ours_from_foreign() -> None:
    found = tc.parse_filters(TC_JSON, "eth0", "egress")
    assert [(f.prog_id, f.handle, f.ours) for f in found] == [(110, 0x2D7, True), (7, 1, False)]
    assert found[0].prog_name == "zt_egress" and found[0].prog_tag == "20699104520d55d1"
    assert tc.parse_filters("", "eth0", "egress") == []


def test_parse_tc_filters_rejects_garbage() -> None:
    with pytest.raises(tc.EbpfError):
        tc.parse_filters("not json", "eth0", "ingress")


def test_pod_dir_names_round_trip_and_pin_names_avoid_dots() -> None:
    assert parse_pod_dir_name(pod_dir_name(4026532245)) == 4026532245
    assert parse_pod_dir_name("build-abc") is None
    assert parse_pod_dir_name("netns-x") is None
    assert pin_name(tc.Hook("eth0.100", "ingress", "zt_ingress")) == "eth0~100-ingress"
