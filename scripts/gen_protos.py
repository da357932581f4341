#!/usr/bin/env python3
"""Regenerate ztunnel/proto/*_pb2.py and *_pb2.pyi from the .proto files beside them.

The generated modules are committed (a fresh clone needs no protoc); run this after
editing a .proto, with the test extras installed (grpcio-tools brings protoc):

    .venv/bin/python scripts/gen_protos.py [--out DIR]

tests/test_grpc_protos.py checks that the committed modules describe the same
messages as the .proto files.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "ztunnel" / "proto"


def generate(out: Path) -> list[Path]:
    """Compile every .proto under ztunnel/proto into ``out`` (which mirrors the repo root)."""
    import grpc_tools  # test extra: only needed to regenerate
    from grpc_tools import protoc

    includes = Path(grpc_tools.__file__).parent / "_proto"
    protos = sorted(p.relative_to(ROOT).as_posix() for p in PROTO_DIR.glob("*.proto"))
    args = [
        "protoc",
        f"-I{ROOT}",
        f"-I{includes}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        *protos,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    return [out / p for p in protos]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT, help="output root (default: repo)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for proto in generate(args.out):
        print(f"generated from {proto.name}", file=sys.stderr)


if __name__ == "__main__":
    main()
