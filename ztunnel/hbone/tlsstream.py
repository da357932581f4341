"""trio driver of a non-blocking ``ssl.SSLSocket`` (no MemoryBIO).

Theory of operation: ``trio.SSLStream`` pushes every byte through two MemoryBIO
copies plus a lock per call; perf-anchors §3.3 measured 2.4x more throughput by
letting OpenSSL read and write the socket itself. We call ``recv_into``/``send``
on the non-blocking SSLSocket and only on ``SSLWantReadError`` /
``SSLWantWriteError`` wait for the fd with ``trio.lowlevel.wait_readable`` /
``wait_writable``.

Rules this relies on:

* One reader task and one writer task at most (BusyResourceError otherwise);
  both run on the trio thread, so OpenSSL never sees truly concurrent calls.
* OpenSSL requires a WANT_WRITE to be retried with the same bytes; Python sets
  SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER, so a fresh slice of the same data is fine.
  A send cancelled while OpenSSL holds a half-written record leaves the stream
  unusable, so any interrupted ``send_all`` marks it broken (as SSLStream does).
* In the rare case a read needs a write (TLS 1.3 KeyUpdate) while the writer is
  already waiting on the fd, the reader polls instead of waiting (trio allows
  one waiter per fd and direction).
"""

from __future__ import annotations

import errno
import operator
import socket
import ssl
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress

import trio

from ztunnel.hbone.errors import TLSHandshakeError, TLSHandshakeTimeout

DEFAULT_RECEIVE_SIZE = 64 * 1024
_SEND_CHUNK = 256 * 1024  # bounds one SSL_write; records are 16 KiB anyway
_CROSS_WAIT_POLL = 0.001
_STREAMING = 16 * 1024  # a read of a full TLS record or more: see receive_some
_scratch = threading.local()


def _receive_buffer(size: int) -> bytearray:
    """The thread's scratch buffer for ``recv_into``: one per thread, not one per
    connection (a 256 KiB buffer per connection was 128 MiB for 500 idle connections).
    Safe because every read is copied out before the reader next awaits."""
    buf: bytearray | None = getattr(_scratch, "buf", None)
    if buf is None or len(buf) < size:
        buf = _scratch.buf = bytearray(size)
    return buf


async def tls_handshake(
    sock: socket.socket,
    ctx: ssl.SSLContext,
    *,
    server_side: bool,
    timeout: float = 10.0,  # noqa: ASYNC109 - a timeout here becomes TLSHandshakeError
) -> TLSStream:
    """TLS handshake on a connected stdlib socket; the socket is consumed.

    Raises TLSHandshakeError on failure, TLSHandshakeTimeout (a subclass) on timeout;
    the socket is closed then.
    Cancellation closes the socket and propagates.
    """
    sock.setblocking(False)
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    ssl_sock = ctx.wrap_socket(
        sock, server_side=server_side, do_handshake_on_connect=False, server_hostname=None
    )
    try:
        with trio.fail_after(timeout):
            await _drive_handshake(ssl_sock)
    except trio.TooSlowError as exc:
        ssl_sock.close()
        raise TLSHandshakeTimeout(f"TLS handshake timed out after {timeout}s") from exc
    except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
        ssl_sock.close()
        raise TLSHandshakeError(f"TLS handshake failed: {exc}") from exc
    except BaseException:
        ssl_sock.close()
        raise
    return TLSStream(ssl_sock)


async def _drive_handshake(ssl_sock: ssl.SSLSocket) -> None:
    while True:
        try:
            ssl_sock.do_handshake()
            return
        except ssl.SSLWantReadError:
            await trio.lowlevel.wait_readable(ssl_sock)
        except ssl.SSLWantWriteError:
            await trio.lowlevel.wait_writable(ssl_sock)


class TLSStream(trio.abc.Stream):
    """A trio Stream over an established non-blocking SSLSocket."""

    def __init__(self, ssl_sock: ssl.SSLSocket) -> None:
        self._sock = ssl_sock
        self._receiving = False
        self._sending = False
        self._waiting_writable = False
        # The last read ended in SSLWantReadError with less than a record's worth: the
        # socket is drained and the sender not streaming, so the next read waits for
        # readiness first instead of failing once more (one SSL_read and one exception
        # per wake-up saved on request/response traffic).
        self._drained = False
        self._closed = False
        self._broken = False
        # What send_nowait could not write: sent first by the next send_all, since
        # OpenSSL wants a WANT_WRITE retried with the same bytes before anything new.
        self._unsent: list[memoryview] = []

    # -- introspection ------------------------------------------------------------

    @property
    def socket(self) -> ssl.SSLSocket:
        """The underlying SSLSocket (addresses, socket options)."""
        return self._sock

    @property
    def selected_alpn(self) -> str | None:
        return self._sock.selected_alpn_protocol()

    def peer_certificate_der(self) -> bytes | None:
        """The peer's leaf certificate (DER), or None if it sent none."""
        return self._sock.getpeercert(binary_form=True)

    # -- receive ------------------------------------------------------------------

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        """Up to ``max_bytes`` (default 64 KiB) of plaintext; b"" at EOF."""
        size = DEFAULT_RECEIVE_SIZE if max_bytes is None else operator.index(max_bytes)
        if size < 1:
            raise ValueError("max_bytes must be >= 1")
        # The busy flag and error translation inline, not as context managers: this runs
        # once per wake-up of every connection's reader.
        if self._receiving:
            raise trio.BusyResourceError("another task is already in receive_some")
        self._receiving = True
        try:
            self._check_open()
            waited = self._drained
            try:
                if waited:
                    await trio.lowlevel.wait_readable(self._sock)
                else:
                    await trio.lowlevel.checkpoint_if_cancelled()
                while True:
                    buf = _receive_buffer(size)  # after an await another stream may have grown it
                    try:
                        n = self._sock.recv_into(buf, size)
                    except ssl.SSLWantReadError:
                        await trio.lowlevel.wait_readable(self._sock)
                    except ssl.SSLWantWriteError:
                        await self._wait_writable_from_reader()
                    except ssl.SSLZeroReturnError:
                        n = 0  # close_notify
                    else:
                        break
                    waited = True
                self._drained = False
                if n:
                    n += self._read_more(buf, n, size)
                    if n >= _STREAMING:
                        # A bulk sender: more is likely to arrive while this is handled,
                        # and an immediate read is cheaper than a wait that finds it.
                        self._drained = False
            except trio.ClosedResourceError:
                raise  # notify_closing from aclose() in another task
            except OSError as exc:  # includes ssl.SSLError
                raise self._translated(exc) from exc
            data = bytes(memoryview(buf)[:n])  # copied before any await: buf is shared
            if not waited:
                await trio.lowlevel.cancel_shielded_checkpoint()
            return data
        finally:
            self._receiving = False

    def _read_more(self, buf: bytearray, have: int, size: int) -> int:
        # SSL_read returns one 16 KiB record per call; take what is already there
        # without waiting, so callers (h2's frame buffer) see fewer, larger chunks.
        extra = 0
        with memoryview(buf) as view:
            while have + extra < size:
                try:
                    got = self._sock.recv_into(view[have + extra :], size - have - extra)
                except ssl.SSLWantReadError:
                    self._drained = True
                    break
                except (ssl.SSLWantWriteError, ssl.SSLZeroReturnError):
                    break
                if not got:
                    break
                extra += got
        return extra

    async def _wait_writable_from_reader(self) -> None:
        if self._waiting_writable:
            await trio.sleep(_CROSS_WAIT_POLL)
        else:
            await trio.lowlevel.wait_writable(self._sock)

    # -- send ---------------------------------------------------------------------

    @property
    def can_send_nowait(self) -> bool:
        """True if ``send_nowait`` may be called: no send in progress or left over."""
        return not (self._sending or self._unsent or self._closed or self._broken)

    def send_nowait(self, data: bytes | bytearray | memoryview) -> bool:
        """Write ``data`` without waiting (no checkpoint); True if all of it went out.

        Saves a task switch to a writer task on the common path. What the socket
        does not take now is kept and written first by the next ``send_all``,
        which the caller must then make (with new data or b"").
        Requires ``can_send_nowait``; raises BrokenResourceError on socket errors.
        """
        if not self.can_send_nowait:
            raise trio.BusyResourceError("send in progress or unsent data left")
        view = memoryview(data).cast("B")
        try:
            for start in range(0, len(view), _SEND_CHUNK):
                chunk = view[start : start + _SEND_CHUNK]
                try:
                    sent = self._sock.send(chunk)
                except (ssl.SSLWantWriteError, ssl.SSLWantReadError):
                    sent = 0
                if sent < len(chunk):
                    rest = range(start + _SEND_CHUNK, len(view), _SEND_CHUNK)
                    self._unsent = [chunk[sent:], *(view[i : i + _SEND_CHUNK] for i in rest)]
                    return False
        except trio.ClosedResourceError:
            raise
        except OSError as exc:
            raise self._translated(exc) from exc
        return True

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        """Send all of ``data`` (after anything ``send_nowait`` left). If cancelled or
        failed part-way, the stream is broken."""
        with self._guard("_sending", "send_all"):
            self._check_open()
            await trio.lowlevel.checkpoint_if_cancelled()
            view = memoryview(data)
            waited = False
            try:
                with self._translate_errors():
                    while self._unsent:
                        waited |= await self._send_chunk(self._unsent[0])
                        self._unsent.pop(0)
                    for start in range(0, len(view), _SEND_CHUNK):
                        waited |= await self._send_chunk(view[start : start + _SEND_CHUNK])
            except BaseException:
                self._broken = True
                raise
            if not waited:
                await trio.lowlevel.cancel_shielded_checkpoint()

    async def _send_chunk(self, chunk: memoryview) -> bool:
        """Write one chunk completely (no partial-write mode); True if we had to wait."""
        waited = False
        while True:
            try:
                sent = self._sock.send(chunk)
            except ssl.SSLWantWriteError:
                await self._wait_writable()
            except ssl.SSLWantReadError:
                await trio.lowlevel.wait_readable(self._sock)
            else:
                if sent == len(chunk):
                    return waited
                chunk = chunk[sent:]  # defensive: partial write mode is not set
            waited = True

    async def _wait_writable(self) -> None:
        self._waiting_writable = True
        try:
            await trio.lowlevel.wait_writable(self._sock)
        finally:
            self._waiting_writable = False

    async def wait_send_all_might_not_block(self) -> None:
        with self._guard("_sending", "wait_send_all_might_not_block"):
            self._check_open()
            await trio.lowlevel.wait_writable(self._sock)

    # -- close --------------------------------------------------------------------

    async def aclose(self) -> None:
        """Best-effort close_notify (never waits for the peer), then close the fd."""
        if self._closed:
            await trio.lowlevel.checkpoint()
            return
        self._closed = True
        if not self._broken and not self._sending:
            self._try_close_notify()
        trio.lowlevel.notify_closing(self._sock)
        self._sock.close()
        await trio.lowlevel.checkpoint()

    def _try_close_notify(self) -> None:
        # unwrap() writes close_notify, then reports WANT_READ for the peer's reply;
        # we do not wait for it (the peer may be gone).
        with suppress(OSError, ValueError):
            self._sock.unwrap()

    # -- helpers ------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("TLS stream was closed")
        if self._broken:
            raise trio.BrokenResourceError("TLS stream is broken")

    @contextmanager
    def _guard(self, flag: str, what: str) -> Iterator[None]:
        if getattr(self, flag):
            raise trio.BusyResourceError(f"another task is already in {what}")
        setattr(self, flag, True)
        try:
            yield
        finally:
            setattr(self, flag, False)

    @contextmanager
    def _translate_errors(self) -> Iterator[None]:
        try:
            yield
        except trio.ClosedResourceError:
            raise  # notify_closing from aclose() in another task
        except OSError as exc:  # includes ssl.SSLError
            raise self._translated(exc) from exc

    def _translated(self, exc: OSError) -> trio.ClosedResourceError | trio.BrokenResourceError:
        """The one translation of a socket or TLS error: closed by us, else broken."""
        if self._closed or exc.errno == errno.EBADF:
            return trio.ClosedResourceError("TLS stream was closed")
        self._broken = True
        return trio.BrokenResourceError(f"TLS stream broken: {exc}")
