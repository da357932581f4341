"""Tiny pod programs, run inside a pod netns: ``python -m ztunnel.cluster.apps <name> ...``.

- ``echo --port P``: TCP echo for many clients; echoes until EOF, then half-closes.
- ``send --to ip:port --bytes N``: sends N random bytes, half-closes, reads the echo back,
  checks length + sha256, prints one JSON line {ok, bytes, sha256, local_addr, peer_addr, error}.
- ``whoami --port P``: writes the client's address as the server sees it, one line, closes.
- ``read --to ip:port``: reads one line (e.g. from whoami) and prints
  {ok, line, local_addr, peer_addr, error}.

Also the helpers that start programs in a pod's netns from the test/demo process.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import trio

from ztunnel.cluster.net import ClusterNet
from ztunnel.sources.clusterfile.layout import PodNet

CHUNK = 64 * 1024
_PROJECT_ROOT = str(Path(__file__).resolve().parents[2])


def _addr(sockaddr: Any) -> str:
    host, port = sockaddr[0], sockaddr[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _split_hostport(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    return host.strip("[]"), int(port)


# -- servers -------------------------------------------------------------------------------


async def _echo_handler(stream: trio.SocketStream) -> None:
    try:
        while data := await stream.receive_some(CHUNK):
            await stream.send_all(data)
        await stream.send_eof()
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    finally:
        await trio.aclose_forcefully(stream)


async def _whoami_handler(stream: trio.SocketStream) -> None:
    try:
        await stream.send_all((_addr(stream.socket.getpeername()) + "\n").encode())
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    finally:
        await trio.aclose_forcefully(stream)


async def serve(kind: str, port: int, host: str = "0.0.0.0") -> None:
    handler = _echo_handler if kind == "echo" else _whoami_handler
    async with trio.open_nursery() as nursery:
        await nursery.start(functools.partial(trio.serve_tcp, handler, port, host=host))
        # One line on stdout so a supervisor can tell the program is listening.
        print(json.dumps({"listening": port, "app": kind}), flush=True)


# -- clients -------------------------------------------------------------------------------


def _network_error(exc: BaseException, limit: float) -> str:
    """One line for a failed exchange; anything that is not a network failure re-raises."""
    if isinstance(exc, trio.TooSlowError):
        return f"timeout after {limit}s"
    if isinstance(exc, ExceptionGroup):
        # The sender and receiver run in a nursery: a reset reaches us grouped.
        network, other = exc.split((OSError, trio.BrokenResourceError))
        if other is not None or network is None:
            raise exc
        exc = network.exceptions[0]
    return f"{type(exc).__name__}: {exc}"


async def send(to: str, nbytes: int, limit: float = 30.0) -> dict[str, Any]:
    result: dict[str, Any] = {
        "ok": False,
        "bytes": 0,
        "sha256": "",
        "local_addr": "",
        "peer_addr": "",
        "error": None,
    }
    sent_hash, recv_hash = hashlib.sha256(), hashlib.sha256()
    try:
        with trio.fail_after(limit):
            host, port = _split_hostport(to)
            stream = await trio.open_tcp_stream(host, port)
            async with stream:
                result["local_addr"] = _addr(stream.socket.getsockname())
                result["peer_addr"] = _addr(stream.socket.getpeername())

                async def sender() -> None:
                    left = nbytes
                    while left:
                        chunk = os.urandom(min(CHUNK, left))
                        sent_hash.update(chunk)
                        await stream.send_all(chunk)
                        left -= len(chunk)
                    await stream.send_eof()

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(sender)
                    while data := await stream.receive_some(CHUNK):
                        recv_hash.update(data)
                        result["bytes"] += len(data)
        result["sha256"] = recv_hash.hexdigest()
        if result["bytes"] != nbytes:
            result["error"] = f"echoed {result['bytes']} of {nbytes} bytes"
        elif recv_hash.digest() != sent_hash.digest():
            result["error"] = "checksum mismatch"
        else:
            result["ok"] = True
    except (trio.TooSlowError, OSError, trio.BrokenResourceError, ExceptionGroup) as exc:
        result["error"] = _network_error(exc, limit)
    return result


async def read_line(to: str, limit: float = 10.0) -> dict[str, Any]:
    result: dict[str, Any] = {"ok": False, "line": "", "local_addr": "", "peer_addr": ""}
    result["error"] = None
    try:
        with trio.fail_after(limit):
            host, port = _split_hostport(to)
            stream = await trio.open_tcp_stream(host, port)
            async with stream:
                result["local_addr"] = _addr(stream.socket.getsockname())
                result["peer_addr"] = _addr(stream.socket.getpeername())
                buf = b""
                while b"\n" not in buf and (data := await stream.receive_some(CHUNK)):
                    buf += data
        result["line"] = buf.decode(errors="replace").strip()
        result["ok"] = bool(result["line"])
        if not result["ok"]:
            result["error"] = "connection closed without a line"
    except (trio.TooSlowError, OSError, trio.BrokenResourceError, ExceptionGroup) as exc:
        result["error"] = _network_error(exc, limit)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ztunnel.cluster.apps")
    sub = parser.add_subparsers(dest="app", required=True)
    for name in ("echo", "whoami"):
        sp = sub.add_parser(name)
        sp.add_argument("--port", type=int, required=True)
        sp.add_argument("--host", default="0.0.0.0")
    sp = sub.add_parser("send")
    sp.add_argument("--to", required=True)
    sp.add_argument("--bytes", type=int, default=1024)
    sp.add_argument("--timeout", type=float, default=30.0)
    sp = sub.add_parser("read")
    sp.add_argument("--to", required=True)
    sp.add_argument("--timeout", type=float, default=10.0)
    args = parser.parse_args(argv)
    if args.app in ("echo", "whoami"):
        with contextlib.suppress(KeyboardInterrupt):
            trio.run(serve, args.app, args.port, args.host)
        return 0
    if args.app == "send":
        out = trio.run(send, args.to, args.bytes, args.timeout)
    else:
        out = trio.run(read_line, args.to, args.timeout)
    print(json.dumps(out), flush=True)
    return 0 if out["ok"] else 1


# -- running programs in pods (used by tests, demo, benchmarks) -----------------------------


def _resolve(cluster: ClusterNet, pod: PodNet | str) -> PodNet:
    return pod if isinstance(pod, PodNet) else cluster.pod(pod)


def pod_command(cluster: ClusterNet, pod: PodNet | str, argv: Sequence[str]) -> list[str]:
    """argv wrapped to run in the pod's netns; ``python`` means this interpreter."""
    p = _resolve(cluster, pod)
    args = list(argv)
    if args and args[0] == "python":
        args[0] = sys.executable
    return ["nsenter", f"--net={p.netns_path}", "--", *args]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    # The package may not be installed; make ``-m ztunnel...`` work from the checkout.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [_PROJECT_ROOT, env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    return env


def start_program(
    cluster: ClusterNet,
    pod: PodNet | str,
    argv: Sequence[str],
    *,
    launcher: Sequence[str] = (),
    **popen: Any,
) -> subprocess.Popen[bytes]:
    """Start argv in the pod's netns; output goes to <cluster.log_dir>/<pod>.log by default.
    ``launcher`` runs first and execs the rest (``kubelet.py``: join the pod's cgroup)."""
    p = _resolve(cluster, pod)
    log = None
    if "stdout" not in popen:
        log = open(cluster.log_dir / f"{p.namespace}-{p.name}.log", "ab")  # noqa: SIM115
        popen["stdout"] = log
        popen.setdefault("stderr", subprocess.STDOUT)
    popen.setdefault("stdin", subprocess.DEVNULL)
    popen.setdefault("env", _env())
    try:
        return subprocess.Popen([*launcher, *pod_command(cluster, p, argv)], **popen)
    finally:
        if log is not None:
            log.close()  # the child holds its own copy


def run_in_pod(
    cluster: ClusterNet, pod: PodNet | str, argv: Sequence[str], timeout: float = 30.0
) -> subprocess.CompletedProcess[str]:
    """Run argv to completion in the pod's netns, capturing text output."""
    return subprocess.run(
        pod_command(cluster, pod, argv),
        capture_output=True,
        text=True,
        timeout=timeout,
        env=_env(),
        check=False,
    )


def start_pod_programs(cluster: ClusterNet) -> dict[str, subprocess.Popen[bytes]]:
    """Start every pod's ``program`` from the cluster file; keyed by ``ns/name``."""
    return {
        spec.key: start_program(cluster, spec.key, spec.program)
        for spec in cluster.spec.pods
        if spec.program
    }


def wait_listening(
    cluster: ClusterNet, pod: PodNet | str, port: int, timeout: float = 10.0
) -> None:
    """Block until something accepts on 127.0.0.1:port inside the pod (TimeoutError if not)."""
    p = _resolve(cluster, pod)
    deadline = time.monotonic() + timeout
    with cluster.open_netns(p) as ns:
        while True:
            with ns.socket() as sock:
                sock.settimeout(max(0.05, deadline - time.monotonic()))
                try:
                    sock.connect(("127.0.0.1", port))
                    return
                except OSError:
                    pass
            if time.monotonic() >= deadline:
                raise TimeoutError(f"nothing listening on {p.key} port {port} after {timeout}s")
            time.sleep(0.05)


def stop_programs(procs: dict[str, subprocess.Popen[bytes]], timeout: float = 5.0) -> None:
    for proc in procs.values():
        if proc.poll() is None:
            proc.terminate()
    for proc in procs.values():
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


if __name__ == "__main__":
    sys.exit(main())
