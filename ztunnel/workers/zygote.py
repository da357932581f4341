"""The zygote: a small process that forks worker processes out of already-imported code.

A worker started as ``python -m ...`` is a fresh interpreter: it imports the agent again
(~0.3-1 s of CPU) and holds its own copy of every module (~30 MiB of PSS each). Forked
instead, a worker shares the imported modules' pages copy-on-write with the process it
was forked from. The control process cannot fork a worker itself once trio runs (trio's
run state, its threads and wakeup fds would come along), so ``Zygote.fork`` forks a
zygote *before* ``trio.run``, after the imports, with ``gc.freeze()`` so that no garbage
collection in any of the processes writes to the shared objects' pages. The zygote then
waits on a unix socket: for each request (carrying the worker's end of its channel) it
forks a worker and answers with its pid.

A worker stays the control process's child, as a subprocess was: the control process is
a child subreaper (``PR_SET_CHILD_SUBREAPER``) and the zygote double-forks (the
intermediate process exits at once), so the worker is reparented to the control process,
which reaps it, gets its exit status and watches it through a pidfd as before. The
worker sets ``PR_SET_PDEATHSIG`` only once it is the control process's child (a parent
death signal would otherwise fire when the intermediate exits). The zygote dies with
the control process (``PR_SET_PDEATHSIG``) and exits when its socket closes; losing it
loses no worker: the next spawn starts a new one.

An agent embedded in another program (``Agent.run`` under a running trio loop: tests,
tools) has no zygote forked before trio: ``Zygote.exec`` starts one as a fresh
interpreter (``python -m ztunnel.workers.zygote``), whose workers share its pages with
each other.
"""

from __future__ import annotations

import array
import contextlib
import errno
import gc
import os
import signal
import socket
import struct
import subprocess
import sys
import time
import traceback
from collections.abc import Sequence

import trio

from ztunnel.workers import worker
from ztunnel.workers.process import PR_SET_CHILD_SUBREAPER, WorkerProcess, die_with_parent, prctl

SPAWN = b"spawn"
_PID = struct.Struct("!i")
_FD_SPACE = socket.CMSG_SPACE(array.array("i").itemsize)
SPAWN_TIMEOUT = 30.0  # the zygote forks in milliseconds; this only catches a stuck one
REPARENT_TIMEOUT = 10.0


class ZygoteGone(Exception):
    """The zygote exited or did not answer (a new one is started for the next spawn)."""


class Zygote:
    """The control process's handle on its zygote."""

    def __init__(self, sock: socket.socket, reap: subprocess.Popen[bytes] | int) -> None:
        self._sock = sock
        self._reap = reap
        self._lock = trio.Lock()  # one request at a time on the socket
        self.closed = False

    @classmethod
    def fork(cls) -> Zygote:
        """Fork the zygote now: call from the main thread, before ``trio.run`` and before
        any thread starts, once the modules the workers need are imported."""
        prctl(PR_SET_CHILD_SUBREAPER, 1)
        control = os.getpid()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        gc.collect()
        gc.freeze()  # what the workers inherit is never touched by a collection
        pid = os.fork()
        if pid == 0:  # the zygote
            code = 1
            try:
                ours.close()
                die_with_parent(control)
                _null_stdin()
                code = serve(theirs, control)
            finally:
                os._exit(code)
        theirs.close()
        return cls(ours, pid)

    @classmethod
    def exec(cls) -> Zygote:
        """Start a zygote as a fresh interpreter (no zygote forked before trio, or it died)."""
        prctl(PR_SET_CHILD_SUBREAPER, 1)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", __name__, str(theirs.fileno()), str(os.getpid())],
                pass_fds=(theirs.fileno(),),
                stdin=subprocess.DEVNULL,
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        return cls(ours, proc)

    @property
    def pid(self) -> int:
        return self._reap if isinstance(self._reap, int) else self._reap.pid

    async def spawn(self, channel_fd: int) -> WorkerProcess:
        """Fork a worker that serves ``channel_fd`` (the zygote's copy is closed after the
        fork: the caller closes its own). Raises ZygoteGone."""
        async with self._lock:
            if self.closed:
                raise ZygoteGone("the zygote is closed")
            answered = False
            try:
                self._sock.sendmsg(
                    [SPAWN], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, _fds(channel_fd))]
                )
                with trio.move_on_after(SPAWN_TIMEOUT):
                    await trio.lowlevel.wait_readable(self._sock)
                reply = self._sock.recv(_PID.size, socket.MSG_DONTWAIT)
                answered = True
            except OSError as exc:  # BlockingIOError: no answer in time
                raise ZygoteGone(f"zygote {self.pid}: {exc}") from exc
            finally:
                if not answered:  # a late answer would be read as the next one's
                    self.close()
        if len(reply) != _PID.size:
            raise ZygoteGone(f"zygote {self.pid} exited")
        (pid,) = _PID.unpack(reply)
        if pid <= 0:
            raise OSError(-pid, f"the zygote could not fork a worker: {os.strerror(-pid)}")
        return WorkerProcess(pid)

    def close(self) -> None:
        """Close the socket (the zygote exits on EOF) and reap it."""
        if self.closed:
            return
        self.closed = True
        self._sock.close()
        with contextlib.suppress(ChildProcessError):
            if isinstance(self._reap, int):
                _reap_within(self._reap, 5.0)
            else:
                try:
                    self._reap.wait(timeout=5.0)
                except subprocess.TimeoutExpired:
                    self._reap.kill()
                    self._reap.wait()


def _reap_within(pid: int, grace: float) -> None:
    deadline = time.monotonic() + grace
    while os.waitpid(pid, os.WNOHANG)[0] == 0:
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return
        time.sleep(0.01)


def _fds(*fds: int) -> bytes:
    return array.array("i", fds).tobytes()


def _null_stdin() -> None:
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)


# -- the zygote process ------------------------------------------------------------------


def serve(sock: socket.socket, control: int) -> int:
    """Fork a worker per request until the control process closes the socket."""
    # A terminal's Ctrl-C reaches the whole process group: stopping is the control's call.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    while True:
        try:
            data, ancdata, _, _ = sock.recvmsg(len(SPAWN), _FD_SPACE)
        except ConnectionError:
            return 0
        if not data:
            return 0  # EOF: the control process is done with us
        fds = _received_fds(ancdata)
        if data == SPAWN and len(fds) == 1:
            pid = _fork_worker(fds[0], sock, control)
        else:
            pid = -errno.EINVAL
        for fd in fds:
            os.close(fd)
        sock.send(_PID.pack(pid))


def _received_fds(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    fds = array.array("i")
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[: len(data) - len(data) % fds.itemsize])
    return list(fds)


def _fork_worker(channel_fd: int, sock: socket.socket, control: int) -> int:
    """Double fork: the worker's pid, or -errno. The intermediate process has exited (and
    the worker is the control process's child) when this returns."""
    read_end, write_end = os.pipe()
    try:
        middle = os.fork()
    except OSError as exc:
        os.close(read_end)
        os.close(write_end)
        return -(exc.errno or errno.EAGAIN)
    if middle == 0:
        try:
            os.close(read_end)
            try:
                pid = os.fork()
            except OSError as exc:
                pid = -(exc.errno or errno.EAGAIN)
            if pid == 0:
                os.close(write_end)
                _become_worker(channel_fd, sock, control, os.getppid())
            os.write(write_end, _PID.pack(pid))
        finally:
            os._exit(0)
    os.close(write_end)
    with open(read_end, "rb") as reader:
        answer = reader.read(_PID.size)
    os.waitpid(middle, 0)
    return _PID.unpack(answer)[0] if len(answer) == _PID.size else -errno.ECHILD


def _become_worker(channel_fd: int, sock: socket.socket, control: int, middle: int) -> None:
    """In the forked worker: wait to be the control process's child, then run; never
    returns (``os._exit``: no exit handler inherited from the control process runs)."""
    code = 1
    try:
        sock.close()
        deadline = time.monotonic() + REPARENT_TIMEOUT
        while os.getppid() != control:
            if os.getppid() != middle or time.monotonic() > deadline:
                os._exit(0)  # the control process is gone: nobody to work for
            time.sleep(0.001)
        worker.run(channel_fd, control)
        code = 0
    except BaseException:  # what the interpreter would print, had it been a fresh one
        traceback.print_exc()
        raise
    finally:
        with contextlib.suppress(OSError, ValueError):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


def main(argv: Sequence[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m ztunnel.workers.zygote SOCKET_FD CONTROL_PID", file=sys.stderr)
        return 2
    fd, control = int(argv[0]), int(argv[1])
    die_with_parent(control)
    gc.collect()
    gc.freeze()
    return serve(socket.socket(fileno=fd), control)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
