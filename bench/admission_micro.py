"""What counting the per-peer limits in one place would cost, per connection, with workers.

Run: ``.venv/bin/python bench/admission_micro.py [--conns 20000]`` (a few seconds).

With worker processes each worker admits its share of every limit (``PeerLimits.share``).
The alternative, one count for the whole agent in the control process, needs the worker
to ask before it admits: one inbound HBONE connection with one CONNECT stream asks for
the handshake (source IP), the connection (identity), the stream (identity) and the
pod's inbound slot, and gives each back later. This prints the CPU per connection of:

* ``share``: the worker's own ``PeerAdmission`` and ``PodConnections`` (today);
* ``ask``: the same checks answered by another process over a unix socketpair with the
  workers' framing (``workers/protocol.py``: pickled messages), 4 round trips for the
  admissions and 4 one-way releases, blocking sockets (no event loop, so a lower bound
  of what the trio channel would cost); worker side and control side separately, and
  the wall time of one round trip.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time
from collections.abc import Callable
from ipaddress import ip_address
from pathlib import Path
from typing import NamedTuple

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ztunnel.model.identity import Identity
from ztunnel.proxy.admission import PeerAdmission, PeerLimits, PodConnections
from ztunnel.workers.protocol import FrameDecoder, encode

IP = ip_address("10.0.0.1")
PEER = Identity("cluster.local", "default", "client")


class Ask(NamedTuple):
    kind: str  # handshake, connection, stream, pod
    key: object


class Give(NamedTuple):
    kind: str
    key: object


def share(n: int) -> float:
    """CPU seconds for n connections admitted and released in the worker itself."""
    peers, pod = PeerAdmission(PeerLimits()), PodConnections(PeerLimits())
    start = time.process_time()
    for _ in range(n):
        assert peers.begin_handshake(IP) is None
        peers.end_handshake(IP)
        assert peers.admit_connection(PEER) is None
        assert pod.acquire("inbound") is None
        assert peers.admit_stream(PEER) is None
        peers.release_stream(PEER)
        pod.release("inbound")
        peers.release_connection(PEER)
    return time.process_time() - start


def _control(sock: socket.socket, n: int) -> None:
    """The control process's side: answer every Ask from one count, apply every Give."""
    peers, pod = PeerAdmission(PeerLimits()), PodConnections(PeerLimits())
    admit: dict[str, Callable[[object], object]] = {
        "handshake": peers.begin_handshake,
        "connection": peers.admit_connection,
        "stream": peers.admit_stream,
        "pod": lambda _key: pod.acquire("inbound"),
    }
    release: dict[str, Callable[[object], object]] = {
        "handshake": peers.end_handshake,
        "connection": peers.release_connection,
        "stream": peers.release_stream,
        "pod": lambda _key: pod.release("inbound"),
    }
    decoder = FrameDecoder()
    start = time.process_time()
    gives = 0
    while gives < 4 * n:
        data = sock.recv(65536)
        if not data:
            break
        decoder.feed(data)
        for message, _fds in decoder.frames():
            if isinstance(message, Ask):
                sock.sendall(encode(admit[message.kind](message.key)))
            else:
                release[message.kind](message.key)
                gives += 1
    os.write(1, f"{time.process_time() - start}\n".encode())


def ask(n: int) -> tuple[float, float, float]:
    """(worker CPU s, control CPU s, wall s) for n connections admitted by the other
    process."""
    ours, theirs = socket.socketpair()
    read_cpu, write_cpu = os.pipe()
    pid = os.fork()
    if pid == 0:  # the "control process"
        ours.close()
        os.dup2(write_cpu, 1)
        _control(theirs, n)
        os._exit(0)
    theirs.close()
    os.close(write_cpu)
    decoder = FrameDecoder()

    def round_trip(message: Ask) -> object:
        ours.sendall(encode(message))
        while True:
            replies = decoder.frames()
            if replies:
                return replies[0][0]
            decoder.feed(ours.recv(65536))

    wall, start = time.perf_counter(), time.process_time()
    for _ in range(n):
        assert round_trip(Ask("handshake", IP)) is None
        ours.sendall(encode(Give("handshake", IP)))
        assert round_trip(Ask("connection", PEER)) is None
        assert round_trip(Ask("pod", None)) is None
        assert round_trip(Ask("stream", PEER)) is None
        for kind, key in (("stream", PEER), ("pod", None), ("connection", PEER)):
            ours.sendall(encode(Give(kind, key)))
    worker = time.process_time() - start
    wall = time.perf_counter() - wall
    ours.close()
    os.waitpid(pid, 0)
    with os.fdopen(read_cpu) as f:
        control = float(f.read().strip())
    return worker, control, wall


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--conns", type=int, default=20_000)
    args = parser.parse_args()
    n = args.conns
    us = 1e6 / n
    print(f"load average {os.getloadavg()[0]:.1f}, {n} connections (1 stream each)")
    print(f"share (in the worker)          {share(n) * us:7.1f} µs CPU per connection")
    worker, control, wall = ask(n)
    print(f"ask the control process: worker {worker * us:7.1f} µs CPU per connection")
    print(f"                        control {control * us:7.1f} µs CPU per connection")
    print(
        f"                        wall    {wall * us / 4:7.1f} µs a round trip (4 per connection)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
