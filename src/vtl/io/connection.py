"""The asyncio face of one VTL connection.

A :class:`VtlConnection` wraps a core :class:`~vtl.core.connection.Connection`
owned by a :class:`~vtl.io.endpoint.UdpEndpoint`.  Nothing is queued here on
the application's behalf: data events stay in the core until the application
reads them, because taking a data event is what reopens the receive window
(a slow reader therefore slows the sender down instead of growing a buffer).
The only thing kept here is the rest of one chunk after ``receive(max_bytes)``.
Sending waits while the core holds more than ``high_water`` unacknowledged
bytes.  Blocked calls park a future; the endpoint re-checks parked
connections after every batch of datagrams, timer or flush.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from typing import TYPE_CHECKING, Any

from vtl.core.composition import Composition
from vtl.core.connection import Connection
from vtl.core.errors import ConnectionStateError, ErrorCode
from vtl.core.events import (
    ConnectionTerminated,
    DataAbandoned,
    DataReceived,
    Event,
    HandshakeCompleted,
    HandshakeFailed,
    MessageReceived,
    PeerClosed,
)
from vtl.io.errors import HandshakeError, HandshakeTimeoutError, termination_error

if TYPE_CHECKING:
    from vtl.io.endpoint import UdpEndpoint

DEFAULT_HIGH_WATER = 4 << 20  # bytes accepted by send() but not yet acknowledged
_SEND_PIECE = 1 << 20  # stream data enters the core in pieces of at most this

# what a parked future waits for
_RECV, _SEND, _CLOSED = 0, 1, 2
_RECONF_POLL = 0.001  # s between looks for a reconfiguration's outcome


class VtlConnection:
    """One established connection: ``send``/``receive`` with backpressure."""

    def __init__(
        self,
        endpoint: UdpEndpoint,
        conn: Connection,
        peer_address: Any,
        *,
        high_water: int = DEFAULT_HIGH_WATER,
    ) -> None:
        self._endpoint = endpoint
        self._conn = conn
        self._peer_address = peer_address
        self.high_water = high_water
        self._waiters: list[tuple[int, int, asyncio.Future[None]]] = []
        self._backlog: deque[Event] = deque()  # events taken from the core, not yet handed out
        self._rbuf = b""  # rest of a data chunk after a short receive()
        self._rpos = 0
        self._eof = False
        self._term: tuple[int, str, bool] | None = None
        self._error: Exception | None = None  # raised again by every later receive()
        self.abandoned_segments = 0
        self._bytes_taken = 0  # data bytes taken out of the core

    def __repr__(self) -> str:
        return (
            f"<VtlConnection {self._peer_address!r} cid={self._conn.local_cid:#x}"
            f" {self._conn.state.value}>"
        )

    # ------------------------------------------------------- properties

    @property
    def core(self) -> Connection:
        """The sans-I/O connection (for diagnostics and tests)."""
        return self._conn

    @property
    def composition(self) -> Composition | None:
        return self._conn.composition

    @property
    def counter_offer(self) -> bool:
        """True when the responder chose a composition the initiator did not offer."""
        return self._conn.counter_offer

    @property
    def peer_address(self) -> Any:
        addr = self._endpoint.core.address_of(self._conn)
        if addr is not None:
            self._peer_address = addr
        return self._peer_address

    @property
    def is_established(self) -> bool:
        return self._conn.is_established

    @property
    def is_closed(self) -> bool:
        """The connection is over (cleanly or not)."""
        return self._conn.is_terminated

    @property
    def error_code(self) -> int | None:
        """Termination code once the connection is over (0: clean close)."""
        t = self._termination()
        return None if t is None else t[0]

    @property
    def reason(self) -> str | None:
        t = self._termination()
        return None if t is None else t[1]

    @property
    def send_buffer_bytes(self) -> int:
        return self._conn.send_buffer_bytes

    def stats(self) -> dict[str, Any]:
        """Counters and state of the connection (the core's snapshot)."""
        out = self._conn.snapshot()
        out["peer_address"] = self.peer_address
        out["pending_events"] = self._conn.pending_events() + len(self._backlog)
        # received in order but not yet read by the application (bounded by the window)
        out["receive_pending_bytes"] = (
            self._conn.stats["app_bytes_delivered"]
            - self._bytes_taken
            + len(self._rbuf)
            - self._rpos
        )
        return out

    # ------------------------------------------------------------ sending

    async def send(
        self, data: bytes | bytearray | memoryview, *, lifetime: float | None = None
    ) -> None:
        """Queue stream bytes, or one whole message with message framing.
        Waits while more than ``high_water`` bytes are unacknowledged.
        ``lifetime`` (s from now): a partially reliable composition abandons
        the data once it has passed."""
        conn = self._conn
        life = {}
        if lifetime is not None:
            life = {"lifetime": lifetime, "now": self._endpoint._loop.time()}
        flush = self._endpoint._schedule_flush
        if isinstance(data, memoryview):
            data = data.cast("B")
        framing = conn.framing
        step = max(1, min(_SEND_PIECE, self.high_water // 2))
        if (framing is not None and framing.messages) or len(data) <= step:
            await self._wait_room(len(data))
            conn.send(data, **life)
            flush()
            return
        view = memoryview(data)  # big writes enter the core piece by piece
        for pos in range(0, len(view), step):
            piece = view[pos : pos + step]
            await self._wait_room(len(piece))
            conn.send(piece, **life)
            flush()

    async def _wait_room(self, need: int) -> None:
        """Wait until ``need`` more bytes keep the core under ``high_water``
        (or, for a bigger message, until its send buffer is empty)."""
        conn = self._conn
        limit = max(self.high_water - need, 0)
        while True:
            self._raise_if_unusable()
            if conn.send_buffer_bytes <= limit:
                return
            await self._park(_SEND, limit)

    async def drain(self) -> None:
        """Wait until everything sent so far has been acknowledged."""
        while self._conn.send_buffer_bytes:
            self._raise_if_unusable()
            await self._park(_SEND, 0)

    def _raise_if_unusable(self) -> None:
        conn = self._conn
        if conn.is_terminated:
            t = self._termination()
            if t is not None and t[0] != ErrorCode.NO_ERROR:
                raise termination_error(*t)
            raise ConnectionStateError("connection is closed")

    def close(self) -> None:
        """Graceful half-close: queued data is still delivered, and the peer's
        data can still be received until it closes too."""
        self._conn.close()
        self._endpoint._schedule_flush()

    def abort(self, reason: str = "aborted", error_code: int = ErrorCode.APPLICATION) -> None:
        """Abortive close: the peer gets a RESET with ``error_code``/``reason``."""
        self._conn.abort(error_code, reason)
        self._endpoint._schedule_flush()

    async def reconfigure(
        self, composition: Composition | dict | str, timeout: float | None = None
    ) -> Event:
        """Switch this running connection to ``composition`` (whole, or only
        the roles to change) with the peer's agreement, without pausing the
        data (docs/reconfiguration.md).  Returns the ReconfigureDone (with
        the delivery pause measured here) or the ReconfigureRefused; the
        connection runs on unchanged after a refusal."""
        conn = self._conn
        loop = self._endpoint._loop
        rid = conn.reconfigure(composition, loop.time())
        self._endpoint._schedule_flush()
        deadline = None if timeout is None else loop.time() + timeout
        while (outcome := conn.reconfigure_outcome(rid)) is None:
            self._raise_if_unusable()
            if deadline is not None and loop.time() >= deadline:
                raise TimeoutError(f"reconfiguration {rid} not finished within {timeout} s")
            # the outcome is a core event among data events the application
            # may not be reading: look for it instead of waiting for events
            await asyncio.sleep(_RECONF_POLL)
        return outcome

    async def wait_closed(self) -> None:
        """Wait until the connection is over (see :attr:`error_code`)."""
        while not self._conn.is_terminated:
            await self._park(_CLOSED, 0)

    # ---------------------------------------------------------- receiving

    async def receive(self, max_bytes: int | None = None) -> bytes:
        """Next bytes in order (a whole message with message framing);
        ``b""`` at end of stream.  Raises :class:`ConnectionClosedError` if
        the connection ended abnormally (again on every later call)."""
        while True:
            if self._rbuf:
                return self._take_rbuf(max_bytes)
            if self._eof:
                if self._error is not None:
                    raise self._error
                return b""
            event = await self._next_event()
            if isinstance(event, (DataReceived, MessageReceived)):
                if not event.data:
                    continue  # an empty message would read as end of stream
                if max_bytes is None or len(event.data) <= max_bytes:
                    return event.data
                self._rbuf, self._rpos = event.data, 0
                return self._take_rbuf(max_bytes)
            self._on_control_event(event)

    def _take_rbuf(self, max_bytes: int | None) -> bytes:
        buf, pos = self._rbuf, self._rpos
        end = len(buf) if max_bytes is None else min(len(buf), pos + max_bytes)
        chunk = buf[pos:end]
        if end >= len(buf):
            self._rbuf, self._rpos = b"", 0
        else:
            self._rpos = end
        return chunk

    async def receive_message(self) -> bytes | None:
        """Next whole message (message framing; with stream framing, the next
        chunk of bytes); ``None`` at end of stream."""
        if self._rbuf:
            return self._take_rbuf(None)
        while not self._eof:
            event = await self._next_event()
            if isinstance(event, (DataReceived, MessageReceived)):
                return event.data
            self._on_control_event(event)
        if self._error is not None:
            raise self._error
        return None

    def __aiter__(self) -> VtlConnection:
        return self

    async def __anext__(self) -> bytes:
        framing = self._conn.framing
        if framing is not None and framing.messages:
            msg = await self.receive_message()
            if msg is None:
                raise StopAsyncIteration
            return msg
        data = await self.receive()
        if not data:
            raise StopAsyncIteration
        return data

    async def next_event(self) -> Event | None:
        """Next raw core event (data events included); ``None`` once the
        connection is over and every event was handed out."""
        if self._eof and not self._backlog:
            return None
        event = await self._next_event()
        if isinstance(event, ConnectionTerminated):
            self._eof = True
        return event

    async def _next_event(self) -> Event:
        """The next event, waiting for one.  A connection that is over and has
        none left yields a synthetic ConnectionTerminated."""
        while True:
            if self._backlog:
                event = self._backlog.popleft()
            else:
                event = self._conn.next_event()
                if event is None:
                    if self._conn.is_terminated:
                        code, reason, by_peer = self._termination()
                        if self._backlog:
                            continue
                        return ConnectionTerminated(code, reason, by_peer)
                    await self._park(_RECV, 0)
                    continue
                self._endpoint._schedule_flush()  # taking data may owe the peer a window update
                if isinstance(event, (ConnectionTerminated, HandshakeFailed)):
                    self._term = (event.error_code, event.reason, event.by_peer)
            if isinstance(event, (DataReceived, MessageReceived)):
                self._bytes_taken += len(event.data)
            return event

    def _on_control_event(self, event: Event) -> None:
        """Non-data event met by receive(): end of stream or termination."""
        if isinstance(event, PeerClosed):
            self._eof = True
        elif isinstance(event, ConnectionTerminated):
            self._eof = True
            if event.error_code != ErrorCode.NO_ERROR:
                self._error = termination_error(event.error_code, event.reason, event.by_peer)
                raise self._error
        elif isinstance(event, DataAbandoned):
            self.abandoned_segments += event.segments
        elif isinstance(event, HandshakeFailed):  # cannot happen once established
            self._eof = True
            self._error = termination_error(event.error_code, event.reason, event.by_peer)
            raise self._error
        # HandshakeCompleted: nothing to do

    def _termination(self) -> tuple[int, str, bool] | None:
        """(code, reason, by_peer) once terminated.  The events still in the
        core are moved to the backlog to find it: no new ones can come, so
        this does not grow memory."""
        if self._term is not None or not self._conn.is_terminated:
            return self._term
        conn = self._conn
        while (event := conn.next_event()) is not None:
            self._backlog.append(event)
        for event in self._backlog:
            if isinstance(event, (ConnectionTerminated, HandshakeFailed)):
                self._term = (event.error_code, event.reason, event.by_peer)
                break
        if self._term is None:  # terminated without telling why (should not happen)
            self._term = (ErrorCode.ENDPOINT_CLOSING, "connection terminated", False)
        return self._term

    # ---------------------------------------------------------- handshake

    async def _handshake(self) -> None:
        """Initiator: wait for HandshakeCompleted (raise on HandshakeFailed)."""
        while True:
            event = self._conn.next_event()
            if event is None:
                if self._conn.is_terminated:
                    code, reason, by_peer = self._termination()
                    raise _handshake_error(code, reason, by_peer)
                await self._park(_RECV, 0)
                continue
            if isinstance(event, HandshakeCompleted):
                return
            if isinstance(event, HandshakeFailed):
                self._term = (event.error_code, event.reason, event.by_peer)
                raise _handshake_error(event.error_code, event.reason, event.by_peer)
            self._backlog.append(event)

    def _skip_handshake_event(self) -> None:
        """Responder: drop the leading HandshakeCompleted (accept() implies it)."""
        event = self._conn.next_event()
        if event is not None and not isinstance(event, HandshakeCompleted):
            self._backlog.append(event)

    # ------------------------------------------------------------ waking

    async def _park(self, kind: int, arg: int) -> None:
        fut = self._endpoint._loop.create_future()
        waiter = (kind, arg, fut)
        self._waiters.append(waiter)
        self._endpoint._parked.add(self)
        try:
            await fut
        finally:
            with contextlib.suppress(ValueError):
                self._waiters.remove(waiter)

    def _poll(self) -> bool:
        """Wake the futures whose condition holds; True if some still wait."""
        conn = self._conn
        done = conn.is_terminated
        waiting = False
        for kind, arg, fut in self._waiters:
            if fut.done():
                continue
            if (
                done
                or (kind == _RECV and (conn.pending_events() or self._backlog))
                or (kind == _SEND and conn.send_buffer_bytes <= arg)
            ):
                fut.set_result(None)
            else:
                waiting = True
        return waiting


def _handshake_error(code: int, reason: str, by_peer: bool) -> HandshakeError:
    if code == ErrorCode.HANDSHAKE_TIMEOUT:
        return HandshakeTimeoutError(code, reason, by_peer)
    return HandshakeError(code, reason, by_peer)
