"""What redirection alone costs, kernel side: iptables REDIRECT vs the eBPF programs vs none.

Run as root: ``.venv/bin/python bench/ebpf_redirect.py`` (about 15 s on the 2-core VM).

One pod netns (veth to a peer netns), a listener standing in for the agent's outbound
listener (inside the pod, SO_MARK 0x539, IP_TRANSPARENT), and an app in the same netns that
connects to a remote address, so every connection is captured. No proxy runs: the figures
are the redirection's own cost, the floor under ``bench/cluster.py``'s end-to-end numbers.

* ``loopback``: the app dials the listener itself (127.0.0.1:15001), nothing captured;
* ``iptables``: istio-cni's rules (nat REDIRECT + conntrack);
* ``ebpf``: the tc programs (loop to lo + ``bpf_sk_assign``, no conntrack).

Measured per mode: connection setup (connect until the listener accepted, median and p99),
1 KiB request/response round trips on one connection, and one-way throughput app → agent.
The modes run interleaved, ``ROUNDS`` times, in fresh namespaces; the summary gives the
median over rounds (the machine is shared: single runs are noisy).
"""

from __future__ import annotations

import secrets
import socket
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ztunnel.model.pod import Pod
from ztunnel.proxy import sockets
from ztunnel.redirect import iptables
from ztunnel.redirect.ebpf import EbpfRedirector
from ztunnel.redirect.ebpf.build import remove_tree
from ztunnel.redirect.netns import NetNamespace, create_named, delete_named

ROUNDS = 5
CONNECTIONS = 2000
ROUND_TRIPS = 5000
VOLUME = 512 * 1024 * 1024
CHUNK = 256 * 1024
REMOTE = ("10.77.0.5", 80)


@contextmanager
def pod_netns() -> Iterator[NetNamespace]:
    tag = secrets.token_hex(3)
    pod_name, peer_name = f"zt{tag}-bpod", f"zt{tag}-bpeer"
    pod, peer = create_named(pod_name), create_named(peer_name)
    try:
        pod.run(
            [
                "ip",
                "link",
                "add",
                "eth0",
                "type",
                "veth",
                "peer",
                "name",
                "eth1",
                "netns",
                peer_name,
            ]
        )
        pod.run(["ip", "addr", "add", "10.200.0.2/24", "dev", "eth0"])
        pod.run(["ip", "link", "set", "eth0", "up"])
        pod.run(["ip", "route", "add", "default", "via", "10.200.0.1"])
        peer.run(["ip", "addr", "add", "10.200.0.1/24", "dev", "eth1"])
        peer.run(["ip", "link", "set", "eth1", "up"])
        yield pod
    finally:
        pod.close()
        peer.close()
        delete_named(pod_name)
        delete_named(peer_name)


def agent_listener(ns: NetNamespace) -> socket.socket:
    sock, _ = sockets.make_listener(
        sockets.NetnsSocketFactory(ns, 0x539), ("::", 15001), transparent=True
    )
    sock.setblocking(True)
    return sock


def setup_latency(ns: NetNamespace, listener: socket.socket, dst: tuple[str, int]) -> list[float]:
    samples = []
    for _ in range(CONNECTIONS):
        client = ns.socket()
        start = time.perf_counter()
        client.connect(dst)
        conn, _ = listener.accept()
        samples.append(time.perf_counter() - start)
        conn.close()
        client.close()
    return samples


def round_trips(ns: NetNamespace, listener: socket.socket, dst: tuple[str, int]) -> list[float]:
    client = ns.socket()
    client.connect(dst)
    client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    conn, _ = listener.accept()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    request = b"x" * 1024

    def echo() -> None:
        while data := conn.recv(65536):
            conn.sendall(data)

    server = threading.Thread(target=echo, daemon=True)
    server.start()
    samples = []
    for _ in range(ROUND_TRIPS):
        start = time.perf_counter()
        client.sendall(request)
        got = 0
        while got < len(request):
            got += len(client.recv(65536))
        samples.append(time.perf_counter() - start)
    client.close()
    server.join()
    conn.close()
    return samples


def throughput(ns: NetNamespace, listener: socket.socket, dst: tuple[str, int]) -> float:
    client = ns.socket()
    client.connect(dst)
    conn, _ = listener.accept()
    received = 0

    def sink() -> None:
        nonlocal received
        while data := conn.recv(CHUNK):
            received += len(data)

    reader = threading.Thread(target=sink, daemon=True)
    reader.start()
    chunk = b"\0" * CHUNK
    start = time.perf_counter()
    for _ in range(VOLUME // CHUNK):
        client.sendall(chunk)
    client.shutdown(socket.SHUT_WR)
    reader.join()
    elapsed = time.perf_counter() - start
    client.close()
    conn.close()
    assert received == VOLUME
    return VOLUME / elapsed / 1e6


def run(name: str, ns: NetNamespace, dst: tuple[str, int]) -> tuple[float, float, float, float]:
    """One round: (setup p50 us, setup p99 us, 1 KiB rtt p50 us, MB/s); printed as it goes."""
    with agent_listener(ns) as listener:
        setup = sorted(setup_latency(ns, listener, dst))
        rtt = sorted(round_trips(ns, listener, dst))
        mbps = throughput(ns, listener, dst)
    figures = (
        setup[len(setup) // 2] * 1e6,
        setup[int(len(setup) * 0.99)] * 1e6,
        rtt[len(rtt) // 2] * 1e6,
        mbps,
    )
    print(
        f"  {name:9} setup p50 {figures[0]:6.1f} us  p99 {figures[1]:7.1f} us"
        f"  | 1 KiB rtt p50 {figures[2]:5.1f} us  | {mbps:6,.0f} MB/s"
    )
    return figures


def main() -> None:
    pin_root = Path(f"/sys/fs/bpf/ztunnel-bench-{secrets.token_hex(3)}")
    pod = Pod(uid="bench", name="bench", namespace="bench")
    print(
        f"{ROUNDS} rounds of {CONNECTIONS} connections, {ROUND_TRIPS} round trips,"
        f" {VOLUME >> 20} MiB one way"
    )
    results: dict[str, list[tuple[float, float, float, float]]] = {}
    try:
        ebpf = EbpfRedirector(pin_root=pin_root)
        modes: list[tuple[str, Callable[[NetNamespace], object], tuple[str, int]]] = [
            ("loopback", lambda ns: None, ("127.0.0.1", 15001)),
            ("iptables", lambda ns: iptables.install(ns, iptables.InpodConfig()), REMOTE),
            ("ebpf", lambda ns: ebpf.install(ns, pod), REMOTE),
        ]
        for round_ in range(ROUNDS):
            print(f"round {round_ + 1}")
            for name, install, dst in modes:
                with pod_netns() as ns:
                    install(ns)
                    results.setdefault(name, []).append(run(name, ns, dst))
    finally:
        remove_tree(pin_root)
    print("median over rounds")
    for name, rows in results.items():
        p50, p99, rtt, mbps = (statistics.median(col) for col in zip(*rows, strict=True))
        print(
            f"  {name:9} setup p50 {p50:6.1f} us  p99 {p99:7.1f} us"
            f"  | 1 KiB rtt p50 {rtt:5.1f} us  | {mbps:6,.0f} MB/s"
        )


if __name__ == "__main__":
    main()
