"""Forward a host loopback port to a TCP port inside a network namespace (the demo's UI).

An agent's admin endpoint listens on 127.0.0.1:15000 *inside its node netns*, out of a
browser's reach; production keeps it so. The demo instead forwards a port on the host's
loopback to it, like ``kubectl port-forward``: each accepted connection gets a socket
created in the node netns and the bytes are relayed both ways (half-close included).
Runs trio in a background thread so the synchronous demo can start and stop it.
"""

from __future__ import annotations

import contextlib
import socket
import threading

import trio

from ztunnel.redirect.netns import NetNamespace

_CHUNK = 64 * 1024


class PortForward:
    """``listen`` on the host -> ``target`` inside netns ``netns``; ``start()`` returns the port."""

    def __init__(
        self,
        netns: str,
        target: tuple[str, int],
        listen: tuple[str, int] = ("127.0.0.1", 0),
    ) -> None:
        self.netns, self.target, self.listen = netns, target, listen
        self.port = 0
        self._ns: NetNamespace | None = None
        self._thread: threading.Thread | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._scope: trio.CancelScope | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    def start(self, timeout: float = 10.0) -> int:
        """Bind (raises OSError if the port is taken) and serve in the background."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(self.listen)
            sock.listen(64)
        except OSError:
            sock.close()
            raise
        self.port = sock.getsockname()[1]
        self._ns = NetNamespace.named(self.netns)
        self._thread = threading.Thread(
            target=trio.run, args=(self._main, sock), name=f"forward-{self.port}", daemon=True
        )
        self._thread.start()
        if not self._ready.wait(timeout):
            raise TimeoutError(f"port forward {self.port} did not start")
        if self._error is not None:
            raise RuntimeError(f"port forward {self.port} failed: {self._error}")
        return self.port

    def stop(self) -> None:
        if self._token is not None and self._scope is not None:
            with contextlib.suppress(trio.RunFinishedError):
                trio.from_thread.run_sync(self._scope.cancel, trio_token=self._token)
        if self._thread is not None:
            self._thread.join(10)
        if self._ns is not None:
            self._ns.close()

    async def _main(self, sock: socket.socket) -> None:
        try:
            listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
            with trio.CancelScope() as scope:
                self._scope = scope
                self._token = trio.lowlevel.current_trio_token()
                async with listener, trio.open_nursery() as nursery:
                    await nursery.start(trio.serve_listeners, self._handle, [listener])
                    self._ready.set()
        except OSError as exc:
            self._error = exc
            self._ready.set()

    async def _handle(self, client: trio.SocketStream) -> None:
        assert self._ns is not None
        upstream_sock = trio.socket.from_stdlib_socket(self._ns.socket())
        try:
            await upstream_sock.connect(self.target)
        except OSError:
            upstream_sock.close()
            await trio.aclose_forcefully(client)
            return
        upstream = trio.SocketStream(upstream_sock)
        async with client, upstream, trio.open_nursery() as nursery:
            nursery.start_soon(_pump, client, upstream)
            nursery.start_soon(_pump, upstream, client)


async def _pump(src: trio.SocketStream, dst: trio.SocketStream) -> None:
    """Copy until EOF, then half-close; a reset on either side ends this direction."""
    try:
        while chunk := await src.receive_some(_CHUNK):
            await dst.send_all(chunk)
        await dst.send_eof()
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
