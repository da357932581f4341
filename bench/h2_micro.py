"""Micro-benchmark of the HBONE engine's DATA path, in memory (no sockets, no TLS).

Moves bulk data through a client and a server ``HboneEngine`` in 256 KiB writes,
acknowledging as a relay would, both directions, and prints MB/s with h2's eager
``repr(frame)`` of DATA frames (stock hyperframe) and with our cheap repr
(what ``ztunnel.hbone.engine`` installs). Run: ``.venv/bin/python bench/h2_micro.py [MiB]``.

``--calls [N]``: Python function calls (cProfile, exact and load-independent) per 1 KiB
request/response through the two engines as the agents drive them: client send_data,
server receive_data + acknowledge, server send_data, client receive_data + acknowledge,
output collected once per side and step.
"""

from __future__ import annotations

import cProfile
import pstats
import sys
import time

from hyperframe.frame import DataFrame

from ztunnel.hbone import engine as engine_mod
from ztunnel.hbone.engine import HboneEngine
from ztunnel.hbone.events import Data

CHUNK = 256 * 1024


def _open() -> tuple[HboneEngine, HboneEngine, int]:
    client, server = HboneEngine(client=True), HboneEngine(client=False)
    server.receive_data(client.data_to_send())
    client.receive_data(server.data_to_send())
    server.receive_data(client.data_to_send())
    sid = client.send_connect("10.0.0.1:80")
    server.receive_data(client.data_to_send())
    server.respond(sid, 200)
    client.receive_data(server.data_to_send())
    return client, server, sid


def _transfer(sender: HboneEngine, receiver: HboneEngine, sid: int, total: int) -> float:
    payload = b"\xab" * CHUNK
    moved = 0
    start = time.perf_counter()
    while moved < total:
        moved += sender.send_data(sid, payload)
        for event in receiver.receive_data(sender.data_to_send()):
            if isinstance(event, Data):
                receiver.acknowledge(sid, len(event.data))
        sender.receive_data(receiver.data_to_send())
    return moved / (time.perf_counter() - start) / 1e6


def run(mib: int) -> dict[str, float]:
    client, server, sid = _open()
    total = mib * 1024 * 1024
    return {
        "client->server": _transfer(client, server, sid, total),
        "server->client": _transfer(server, client, sid, total),
    }


def _exchange(sender: HboneEngine, receiver: HboneEngine, sid: int, payload: bytes) -> None:
    sender.send_data(sid, payload)
    for event in receiver.receive_data(sender.data_to_send()):
        if isinstance(event, Data):
            receiver.acknowledge(event.stream_id, len(event.data))
    _ = receiver.pending_output  # the driver's backlog check
    sender.receive_data(receiver.data_to_send())  # window updates, if any


def calls_per_request(n: int) -> float:
    client, server, sid = _open()
    payload = b"q" * 1024
    for _ in range(100):  # warm up: lazily made objects, window updates settle
        _exchange(client, server, sid, payload)
        _exchange(server, client, sid, payload)
    profile = cProfile.Profile()
    profile.enable()
    for _ in range(n):
        _exchange(client, server, sid, payload)
        _exchange(server, client, sid, payload)
    profile.disable()
    stats = pstats.Stats(profile)
    total: int = stats.total_calls  # type: ignore[attr-defined]
    return total / n


def main() -> None:
    if sys.argv[1:2] == ["--calls"]:
        n = int(sys.argv[2]) if len(sys.argv) > 2 else 10_000
        print(f"engine calls per 1 KiB request/response (both engines): {calls_per_request(n):.1f}")
        return
    mib = int(sys.argv[1]) if len(sys.argv) > 1 else 256
    cheap = DataFrame.__dict__["_body_repr"]
    delattr(DataFrame, "_body_repr")  # stock: Frame._body_repr hexlifies the payload
    before = run(mib)
    setattr(DataFrame, "_body_repr", cheap)  # noqa: B010
    assert engine_mod._cheap_data_body_repr is cheap
    after = run(mib)
    for direction in before:
        print(
            f"{direction}: stock repr {before[direction]:8.1f} MB/s   "
            f"cheap repr {after[direction]:8.1f} MB/s   "
            f"x{after[direction] / before[direction]:.1f}"
        )


if __name__ == "__main__":
    main()
