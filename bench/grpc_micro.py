"""gRPC layer micro-benchmark: our trio client vs grpcio's own client, same grpcio server.

    .venv/bin/python bench/grpc_micro.py [--calls 2000]

Prints ms per unary call (1 KiB request and response, one connection, sequential),
for plaintext and TLS, plus the cost of a CA-style call that opens its own TLS
connection. The server is grpcio in a thread of this process, so the figures are for
comparison on one machine, not absolute. Needs the test extras (grpcio).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import grpc
import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.grpc_peers import grpcio_channel, grpcio_server, make_tls, unary
from ztunnel.grpc.client import Target, connect
from ztunnel.grpc.tls import client_context

PATH = "/bench.Echo/Unary"
PAYLOAD = b"x" * 1024


def _echo(request: bytes, context: grpc.ServicerContext) -> bytes:
    return request


async def ours(port: int, calls: int, tls: bool, tls_material: object) -> float:
    target = Target.parse(f"{'https' if tls else 'http'}://127.0.0.1:{port}")
    ctx = client_context(tls_material.root_pem) if tls else None  # type: ignore[attr-defined]
    async with connect(target, ssl_context=ctx) as conn:
        await conn.unary(PATH, PAYLOAD, time_limit=10)
        start = time.perf_counter()
        for _ in range(calls):
            await conn.unary(PATH, PAYLOAD, time_limit=10)
        return (time.perf_counter() - start) / calls * 1000


async def ours_new_connection(port: int, calls: int, tls_material: object) -> float:
    target = Target.parse(f"https://127.0.0.1:{port}")
    ctx = client_context(tls_material.root_pem)  # type: ignore[attr-defined]
    start = time.perf_counter()
    for _ in range(calls):
        async with connect(target, ssl_context=ctx) as conn:
            await conn.unary(PATH, PAYLOAD, time_limit=10)
    return (time.perf_counter() - start) / calls * 1000


def theirs(port: int, calls: int, tls: bool, tls_material: object) -> float:
    with grpcio_channel(port, tls_material if tls else None, name="localhost") as ch:  # type: ignore[arg-type]
        stub = ch.unary_unary(PATH)
        stub(PAYLOAD, timeout=10)
        start = time.perf_counter()
        for _ in range(calls):
            stub(PAYLOAD, timeout=10)
        return (time.perf_counter() - start) / calls * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000)
    args = parser.parse_args()
    material = make_tls()
    print(f"unary 1 KiB echo, {args.calls} sequential calls, one connection (ms/call)")
    for tls in (False, True):
        with grpcio_server({PATH: unary(_echo)}, material if tls else None) as port:
            ms_ours = trio.run(ours, port, args.calls, tls, material)
            ms_theirs = theirs(port, args.calls, tls, material)
            label = "tls " if tls else "h2c "
            print(f"  {label} ztunnel.grpc (trio): {ms_ours:.3f}   grpcio client: {ms_theirs:.3f}")
        if tls:
            with grpcio_server({PATH: unary(_echo)}, material) as port:
                n = max(args.calls // 10, 20)
                ms = trio.run(ours_new_connection, port, n, material)
                print(f"  tls  ztunnel.grpc, new connection per call (CA client): {ms:.3f}")


if __name__ == "__main__":
    main()
