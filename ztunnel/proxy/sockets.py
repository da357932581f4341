"""Socket creation for the proxies: "make this socket in that network namespace".

Every socket the agent makes goes through a ``SocketFactory``. In dedicated mode
it is a plain socket in the agent's own netns; in in-pod mode the factory enters
the pod's netns to create it (see ``ztunnel.redirect.netns``). Either way every
socket carries SO_MARK (0x539 by default) so the pod's redirection rules skip
the agent's own traffic, and TCP_NODELAY (Nagle costs p99 latency, ztunnel #109).
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import socket
import struct
from typing import TYPE_CHECKING, Protocol

import trio

from ztunnel.config import DEFAULT_LISTEN_BACKLOG, Address
from ztunnel.model.address import IPAddress, SocketAddr

if TYPE_CHECKING:
    from ztunnel.redirect.netns import NetNamespace

SO_MARK = 36
SO_ORIGINAL_DST = 80
IP6T_SO_ORIGINAL_DST = 80
IP_TRANSPARENT = 19
IP_FREEBIND = 15
IPV6_TRANSPARENT = 75
IPV6_FREEBIND = 78
SOL_IPV6 = 41
CONNECT_TIMEOUT = 10.0


class SocketFactory(Protocol):
    """Creates sockets where the proxy lives (the agent's netns or a pod's)."""

    def new_socket(self, family: int, kind: int) -> socket.socket: ...


class LocalSocketFactory:
    """Sockets in the agent's own network namespace (dedicated mode, tests)."""

    def __init__(self, mark: int | None = None) -> None:
        self.mark = mark

    def new_socket(self, family: int, kind: int) -> socket.socket:
        sock = socket.socket(family, kind)
        apply_mark(sock, self.mark)
        return sock


def apply_mark(sock: socket.socket, mark: int | None) -> None:
    """Set SO_MARK; without CAP_NET_ADMIN (non-root dedicated mode) there is nothing to skip."""
    if not mark:
        return
    with contextlib.suppress(PermissionError):
        sock.setsockopt(socket.SOL_SOCKET, SO_MARK, mark)


def family_of(ip: IPAddress) -> int:
    return socket.AF_INET6 if ip.version == 6 else socket.AF_INET


def sockname(sock: socket.socket | trio.socket.SocketType, peer: bool = False) -> SocketAddr:
    """The socket's local (or peer) address, canonical (a dual-stack socket's
    ``::ffff:10.0.0.1`` is 10.0.0.1)."""
    return SocketAddr.from_sockaddr(sock.getpeername() if peer else sock.getsockname())


def try_transparent(sock: socket.socket) -> bool:
    """Best-effort IP_TRANSPARENT (needs CAP_NET_ADMIN); tells whether it took."""
    level, opt = (
        (SOL_IPV6, IPV6_TRANSPARENT)
        if sock.family == socket.AF_INET6
        else (socket.SOL_IP, IP_TRANSPARENT)
    )
    try:
        sock.setsockopt(level, opt, 1)
    except OSError:
        return False
    return True


def make_listener(
    factory: SocketFactory,
    addr: Address,
    *,
    transparent: bool = False,
    backlog: int = DEFAULT_LISTEN_BACKLOG,
) -> tuple[socket.socket, bool]:
    """Bind and listen (non-blocking); returns the socket and whether IP_TRANSPARENT is on.

    ``::`` listens dual-stack; where the netns has no IPv6 it falls back to 0.0.0.0.
    ``backlog`` bounds the kernel's queue of connections not yet accepted (the kernel
    caps it at net.core.somaxconn); a burst of half-open handshakes overflowed 128.
    """
    host, port = addr
    try:
        sock = _bound(factory, host, port)
    except OSError as exc:
        if host != "::" or exc.errno not in (errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL):
            raise
        sock = _bound(factory, "0.0.0.0", port)
    is_transparent = try_transparent(sock) if transparent else False
    sock.listen(backlog)
    sock.setblocking(False)
    return sock, is_transparent


def is_local_address(factory: SocketFactory, ip: IPAddress) -> bool:
    """Whether ``ip`` is an address of the netns ``factory`` makes sockets in, i.e. a
    connection to it would stay on this host (loopback, unspecified, the pod or node IPs).

    The kernel answers: only a local address can be bound (without IP_FREEBIND or the
    ``ip_nonlocal_bind`` sysctl, which would make every address look local here).
    """
    if ip.is_loopback or ip.is_unspecified:
        return True
    sock = factory.new_socket(family_of(ip), socket.SOCK_STREAM)
    try:
        sock.bind((str(ip), 0))
    except OSError:
        return False
    finally:
        sock.close()
    return True


def abort_socket(sock: socket.socket) -> None:
    """Close with RST (SO_LINGER 0): the peer must not take this for a clean end."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


async def accept(listener: socket.socket) -> tuple[socket.socket, SocketAddr]:
    """Accept one connection (non-blocking, TCP_NODELAY) on a non-blocking listener."""
    while True:
        await trio.lowlevel.wait_readable(listener)
        try:
            conn, _ = listener.accept()
        except BlockingIOError:
            continue
        accepted = _prepare(conn)
        if accepted is not None:
            return accepted


def _prepare(conn: socket.socket) -> tuple[socket.socket, SocketAddr] | None:
    """Non-blocking, TCP_NODELAY, with its peer; None (closed) if the peer already reset it."""
    try:
        conn.setblocking(False)
        set_nodelay(conn)
        return conn, sockname(conn, peer=True)
    except OSError:  # ENOTCONN, EINVAL: reset between the kernel's accept and ours
        conn.close()
        return None


def accept_nowait(listener: socket.socket) -> tuple[socket.socket, SocketAddr] | None:
    """One connection the kernel already accepted, or None (none queued, or closed)."""
    while True:
        try:
            conn, _ = listener.accept()
        except OSError:  # BlockingIOError: queue empty; EBADF/EINVAL: closed
            return None
        accepted = _prepare(conn)
        if accepted is not None:
            return accepted


def _bound(factory: SocketFactory, host: str, port: int) -> socket.socket:
    family = family_of(ipaddress.ip_address(host))
    sock = factory.new_socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # SO_REUSEPORT lets a new agent take over a pod's ports before the old one drains.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind((host, port))
    except BaseException:
        sock.close()
        raise
    return sock


def original_dst(sock: socket.socket | trio.socket.SocketType) -> SocketAddr:
    """The pre-REDIRECT destination (SO_ORIGINAL_DST, v4 then v6), else the local address."""
    try:
        raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
        port = struct.unpack_from("!H", raw, 2)[0]
        return SocketAddr(ipaddress.IPv4Address(raw[4:8]), port)
    except OSError:
        pass
    try:
        raw = sock.getsockopt(SOL_IPV6, IP6T_SO_ORIGINAL_DST, 28)
        port = struct.unpack_from("!H", raw, 2)[0]
        return SocketAddr(ipaddress.IPv6Address(raw[8:24]), port)
    except OSError:
        return sockname(sock)


def set_nodelay(sock: socket.socket | trio.socket.SocketType) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


async def connect_socket(
    factory: SocketFactory,
    dst: SocketAddr,
    *,
    src_ip: IPAddress | None = None,
    transparent: bool = False,
    connect_timeout: float | None = CONNECT_TIMEOUT,
) -> socket.socket:
    """Connect a non-blocking stdlib socket (created by ``factory``) to ``dst``.

    ``src_ip`` binds the source address first; with ``transparent`` the socket may
    use a non-local source (the original client's IP), as ztunnel's freebind_connect.
    Raises OSError (TimeoutError after ``connect_timeout`` seconds; None: the caller
    applies its own deadline).
    """
    sock = factory.new_socket(family_of(dst.ip), socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        set_nodelay(sock)
        if src_ip is not None and family_of(src_ip) == sock.family:
            _bind_source(sock, src_ip, transparent)
        if connect_timeout is None:  # the caller's scope bounds it: no second scope
            await _connect(sock, dst)
        else:
            with trio.move_on_after(connect_timeout) as scope:
                await _connect(sock, dst)
            if scope.cancelled_caught:
                raise TimeoutError(errno.ETIMEDOUT, f"connect to {dst} timed out")
    except BaseException:
        sock.close()
        raise
    return sock


def _bind_source(sock: socket.socket, src_ip: IPAddress, transparent: bool) -> None:
    if transparent:
        try_transparent(sock)
        level, opt = (
            (SOL_IPV6, IPV6_FREEBIND)
            if sock.family == socket.AF_INET6
            else (socket.SOL_IP, IP_FREEBIND)
        )
        with contextlib.suppress(OSError):
            sock.setsockopt(level, opt, 1)
    try:
        sock.bind((str(src_ip), 0))
    except OSError as exc:
        # A source we cannot use (not local, no transparency) is not fatal: the
        # connection still works, only source-IP preservation is lost.
        if exc.errno not in (errno.EADDRNOTAVAIL, errno.EINVAL, errno.EPERM):
            raise


async def _connect(sock: socket.socket, dst: SocketAddr) -> None:
    err = sock.connect_ex(dst.sockaddr())
    if err == 0:
        return
    if err not in (errno.EINPROGRESS, errno.EAGAIN):
        raise OSError(err, f"connect to {dst}: {errno.errorcode.get(err, err)}")
    await trio.lowlevel.wait_writable(sock)
    err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    if err:
        raise OSError(err, f"connect to {dst}: {errno.errorcode.get(err, err)}")


def socket_stream(sock: socket.socket) -> trio.SocketStream:
    """Hand a connected stdlib socket to trio as a half-closeable stream."""
    return trio.SocketStream(trio.socket.from_stdlib_socket(sock))


class NetnsSocketFactory:
    """Sockets created inside a pod's network namespace (in-pod mode), marked 0x539."""

    def __init__(self, netns: NetNamespace, mark: int | None) -> None:
        self.netns = netns
        self.mark = mark

    def new_socket(self, family: int, kind: int) -> socket.socket:
        sock = self.netns.socket(family, kind)
        apply_mark(sock, self.mark)
        return sock
