"""Pump bytes between an application's TCP socket and a carrier stream with
exact TCP semantics.

Neither application may be able to tell that a Hooker sits in the middle, so
the splice keeps what TCP promises end to end:

* EOF is forwarded only after every byte before it: the carrier's EOF becomes
  ``shutdown(SHUT_WR)`` once the last chunk was handed to the kernel socket
  (which delivers it before the FIN); the socket's EOF becomes
  ``write_eof()`` after the last chunk was accepted by the carrier.
* Each direction half-closes on its own (``shutdown(SHUT_WR)`` then read the
  reply works).
* A reset stays a reset: an application RST aborts the carrier stream, a
  carrier reset closes the socket abortively (``SO_LINGER {1, 0}``) so the
  application gets ``ECONNRESET``.  Hooker sockets start armed that way
  (:func:`arm_abortive_close`), so a killed Hooker process resets them too;
  only a clean, fully finished splice disarms it before closing.
* Memory is bounded: each direction reads its next chunk (at most
  :data:`MAX_CHUNK`) only when the previous one was written to the other side.

:class:`SocketStream` wraps a second TCP socket as a carrier stream, so the
plain-TCP fallback uses the same code.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import socket
import struct
import time
from dataclasses import dataclass, field
from typing import Any

from vtl.hooker.carriers.base import Address, CarrierReset, CarrierStream

MAX_CHUNK = 256 << 10
DEFAULT_CHUNK = 64 << 10
_LINGER_RESET = struct.pack("ii", 1, 0)
_LINGER_OFF = struct.pack("ii", 0, 0)
_TCP_CLOSE = 7  # tcp_info.tcpi_state after a RST was received
_RESET_POLL = 0.2  # s between looks for a RST on a socket we no longer read

#: how a splice ended
EOF_BOTH = "eof"  # both directions finished cleanly
RESET_BY_APP = "app_reset"  # the application reset (or its socket failed)
RESET_BY_CARRIER = "carrier_reset"  # the carrier stream was reset or lost
CANCELLED = "cancelled"

_APP_ERRORS = (ConnectionError, OSError)


def arm_abortive_close(sock: socket.socket) -> None:
    """SO_LINGER {1, 0}: closing (or the process dying) sends RST, not FIN."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)


def disarm_abortive_close(sock: socket.socket) -> None:
    """Back to an orderly close (queued data is still sent, then FIN)."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_OFF)


def reset_socket(sock: socket.socket) -> None:
    """Close abortively: the peer application sees ECONNRESET."""
    if sock.fileno() < 0:
        return
    with contextlib.suppress(OSError):
        arm_abortive_close(sock)
    sock.close()


def _peer_reset(sock: socket.socket) -> bool:
    """The TCP peer reset the connection (seen without reading)."""
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)
    except OSError:
        return True
    if not info or info[0] != _TCP_CLOSE:
        return False
    # CLOSE is also where an orderly close ends: only a RST leaves an error
    err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    return err in (errno.ECONNRESET, errno.EPIPE)


@dataclass
class SpliceResult:
    """Live counters of a splice and, once it is over, how it ended."""

    to_stream: int = 0  # bytes read from the socket and written to the stream
    to_socket: int = 0  # bytes read from the stream and written to the socket
    outcome: str | None = None  # EOF_BOTH / RESET_BY_APP / RESET_BY_CARRIER / CANCELLED
    reason: str = ""
    socket_eof: bool = False  # the application half-closed
    stream_eof: bool = False  # the peer half-closed
    started: float = field(default_factory=time.monotonic)
    ended: float | None = None

    @property
    def clean(self) -> bool:
        return self.outcome == EOF_BOTH

    def to_dict(self) -> dict[str, Any]:
        return {
            "to_stream": self.to_stream,
            "to_socket": self.to_socket,
            "outcome": self.outcome,
            "reason": self.reason,
            "socket_eof": self.socket_eof,
            "stream_eof": self.stream_eof,
            "duration": (self.ended or time.monotonic()) - self.started,
        }


class _Ended(Exception):
    def __init__(self, outcome: str, reason: str) -> None:
        super().__init__(reason)
        self.outcome = outcome
        self.reason = reason


async def splice(
    sock: socket.socket,
    stream: CarrierStream,
    *,
    chunk: int = DEFAULT_CHUNK,
    result: SpliceResult | None = None,
    close_stream_timeout: float | None = None,
) -> SpliceResult:
    """Pump ``sock`` (connected, non-blocking TCP) <-> ``stream`` both ways
    until both ended or one side reset.  Always closes ``sock`` (orderly only
    after a clean finish) and leaves ``stream`` closed or aborted.

    ``result`` may be passed in to watch the byte counters while it runs.
    After a clean finish it waits until the carrier delivered everything
    (``close_stream_timeout``: at most that long), so the flow is listed
    until its last byte was acknowledged."""
    loop = asyncio.get_running_loop()
    res = result if result is not None else SpliceResult()
    chunk = max(1, min(chunk, MAX_CHUNK))
    sock.setblocking(False)

    async def up() -> None:  # socket -> stream
        while True:
            try:
                data = await loop.sock_recv(sock, chunk)
            except _APP_ERRORS as exc:
                raise _Ended(RESET_BY_APP, f"socket: {exc}") from None
            if not data:
                res.socket_eof = True
                stream.write_eof()
                return
            try:
                await stream.write(data)
            except CarrierReset as exc:
                raise _Ended(RESET_BY_CARRIER, str(exc)) from None
            res.to_stream += len(data)

    async def watch_reset() -> None:
        # the socket is no longer read: a RST from the application would go
        # unseen until we write to it, so look for it while down() runs
        while True:
            await asyncio.sleep(_RESET_POLL)
            if _peer_reset(sock):
                raise _Ended(RESET_BY_APP, "socket reset after its EOF")

    async def down() -> None:  # stream -> socket
        while True:
            try:
                data = await stream.read(chunk)
            except CarrierReset as exc:
                raise _Ended(RESET_BY_CARRIER, str(exc)) from None
            if not data:
                res.stream_eof = True
                try:  # sock_sendall returned: every byte is in the socket, FIN follows it
                    sock.shutdown(socket.SHUT_WR)
                except _APP_ERRORS as exc:
                    raise _Ended(RESET_BY_APP, f"socket: {exc}") from None
                return
            try:
                await loop.sock_sendall(sock, data)
            except _APP_ERRORS as exc:
                raise _Ended(RESET_BY_APP, f"socket: {exc}") from None
            res.to_socket += len(data)

    t_up = loop.create_task(up())
    t_down = loop.create_task(down())
    tasks = {t_up, t_down}
    try:
        pending = set(tasks)
        while not (t_up.done() and t_down.done()):
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                if task in (t_up, t_down) and task.exception() is not None:
                    raise task.exception()  # type: ignore[misc]
            if t_up.done() and t_down.done():
                break  # both finished: a watcher's late finding does not matter
            for task in done:
                if task.exception() is not None:
                    raise task.exception()  # type: ignore[misc]
            if t_up in done and not t_down.done():
                watcher = loop.create_task(watch_reset())
                tasks.add(watcher)
                pending.add(watcher)
        res.outcome = EOF_BOTH
    except _Ended as exc:
        res.outcome, res.reason = exc.outcome, exc.reason
    except asyncio.CancelledError:
        res.outcome, res.reason = CANCELLED, "splice cancelled"
        raise
    except Exception as exc:  # a bug or an unexpected error: never leave things half open
        res.outcome, res.reason = RESET_BY_APP, f"splice error: {exc!r}"
    finally:
        if res.outcome is None:
            res.outcome, res.reason = CANCELLED, "splice interrupted"
        for task in tasks:
            if not task.done():
                task.cancel()
        for task in tasks:
            with contextlib.suppress(BaseException):
                await task
        res.ended = time.monotonic()
        await _finish(sock, stream, res, close_stream_timeout)
    return res


async def _finish(
    sock: socket.socket, stream: CarrierStream, res: SpliceResult, timeout: float | None
) -> None:
    if res.outcome == EOF_BOTH:
        with contextlib.suppress(OSError):
            disarm_abortive_close(sock)
        sock.close()
        with contextlib.suppress(Exception):
            await stream.aclose(timeout)
    elif res.outcome == RESET_BY_CARRIER:
        reset_socket(sock)
        stream.abort(res.reason or "carrier reset")
    else:  # the application reset, or we were cancelled: reset both sides
        stream.abort(res.reason or "application reset")
        reset_socket(sock)


class SocketStream(CarrierStream):
    """A plain TCP socket seen as a carrier stream (the fallback path)."""

    carrier_name = "tcp"

    def __init__(self, sock: socket.socket) -> None:
        super().__init__()
        sock.setblocking(False)
        self.sock = sock
        self._loop = asyncio.get_running_loop()
        try:
            self._peer: Address | None = sock.getpeername()
        except OSError:
            self._peer = None

    @property
    def peer_address(self) -> Address | None:
        return self._peer

    async def read(self, max_bytes: int) -> bytes:
        try:
            data = await self._loop.sock_recv(self.sock, max_bytes)
        except OSError as exc:
            raise CarrierReset(f"tcp: {exc}") from exc
        self.bytes_received += len(data)
        return data

    async def write(self, data: bytes | bytearray | memoryview) -> None:
        try:
            await self._loop.sock_sendall(self.sock, data)
        except OSError as exc:
            raise CarrierReset(f"tcp: {exc}") from exc
        self.bytes_sent += len(data)

    def write_eof(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_WR)

    def abort(self, reason: str = "aborted") -> None:
        reset_socket(self.sock)

    async def aclose(self, timeout: float | None = None) -> None:
        if self.sock.fileno() >= 0:
            with contextlib.suppress(OSError):
                disarm_abortive_close(self.sock)
            self.sock.close()


def is_reset_error(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in (errno.ECONNRESET, errno.EPIPE)


__all__ = [
    "CANCELLED",
    "DEFAULT_CHUNK",
    "EOF_BOTH",
    "MAX_CHUNK",
    "RESET_BY_APP",
    "RESET_BY_CARRIER",
    "SocketStream",
    "SpliceResult",
    "arm_abortive_close",
    "disarm_abortive_close",
    "reset_socket",
    "splice",
]
