"""Run a transfer between two :class:`~vtl.core.endpoint.EndpointCore` over a
:class:`~vtl.sim.network.SimNetwork` (for tests and benchmarks).

``A`` initiates, ``B`` listens.  Each side has an application that writes
its data (stream bytes, or a list of messages) respecting an optional send
buffer limit, reads events as fast as they come or through a token bucket
(a slow reader), and closes according to a policy:

* ``"after_send"``: close as soon as all its data is queued;
* ``"after_peer"``: close once all its data is queued *and* the peer closed
  (half-close: the other side keeps sending until then);
* ``None``: never close (the test drives the end itself).

While it runs, the harness records after every simulator event how many
segments each sender has outstanding and how many each receiver holds
(buffered out of order, delivered but unread, message pieces), so tests can
assert that memory stays within the negotiated windows.

Example::

    result = run_transfer([Composition.parse("reliability=go-back-n")],
                          forward=LinkConditions(delay=0.01, loss=0.05),
                          data_ab=b"x" * 100_000)
    assert result.b.data == b"x" * 100_000 and result.clean
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from vtl.core.composition import Composition
from vtl.core.config import ConnectionConfig
from vtl.core.connection import Connection
from vtl.core.endpoint import EndpointCore
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
from vtl.sim.network import Address, LinkConditions, SimNetwork

ADDR_A: Address = ("10.0.0.1", 40000)
ADDR_B: Address = ("10.0.0.2", 4433)

Payload = bytes | list[bytes]


@dataclass
class SideResult:
    """What one application saw."""

    data: bytes = b""  # stream bytes received, concatenated
    chunks: list[bytes] = field(default_factory=list)  # DataReceived payloads, in order
    messages: list[bytes] = field(default_factory=list)  # MessageReceived payloads, in order
    events: list[tuple[float, Event]] = field(default_factory=list)  # every non-data event
    handshake: HandshakeCompleted | HandshakeFailed | None = None
    terminated: ConnectionTerminated | None = None
    peer_closed_at: float | None = None
    first_data_at: float | None = None  # when the application took its first data
    last_data_at: float | None = None  # ... and its last
    abandoned: int = 0  # sum of DataAbandoned.segments
    max_outstanding: int = 0  # most segments this side had unacked
    max_held: int = 0  # most segments this side held as a receiver
    held_at_end: int = 0  # segments still held when the run ended (should be 0)
    stats: dict[str, Any] = field(default_factory=dict)  # connection snapshot at the end
    endpoint: dict[str, Any] = field(default_factory=dict)  # endpoint stats at the end


@dataclass
class TransferResult:
    a: SideResult
    b: SideResult
    sim_time: float
    completed: bool  # the stop condition held before the timeout
    net: SimNetwork

    @property
    def clean(self) -> bool:
        """Both ends terminated with NO_ERROR."""
        return all(
            s.terminated is not None and s.terminated.error_code == 0 for s in (self.a, self.b)
        )


class _App:
    """One side's application."""

    def __init__(self, name: str, data: Payload, close: str | None, rate: float | None) -> None:
        self.name = name
        self.conn: Connection | None = None
        self.result = SideResult()
        self.messages = isinstance(data, list)
        self.to_send: list[bytes] = list(data) if self.messages else [bytes(data)] if data else []
        self.sent_all = False
        self.close_policy = close
        self.closed = False
        self.rate = rate  # bytes/s, None: read everything at once
        self.tokens = 0.0
        self.data = bytearray()
        #: passed to send() (partial reliability): one for all, or one per message
        self.lifetime: float | list[float | None] | None = None
        self.sends = 0
        self.now = 0.0  # simulated time of the current turn

    def write(self, send_buffer: int | None, chunk: int) -> bool:
        conn = self.conn
        if conn is None or self.sent_all or conn.is_terminated:
            return False
        wrote = False
        while self.to_send:
            if send_buffer is not None and conn.send_buffer_bytes >= send_buffer:
                return wrote
            lifetime = self.lifetime
            if isinstance(lifetime, list):
                lifetime = lifetime[self.sends] if self.sends < len(lifetime) else None
            self.sends += 1
            life = {"lifetime": lifetime, "now": self.now} if lifetime else {}
            if self.messages:
                conn.send(self.to_send.pop(0), **life)
            else:
                head = self.to_send[0]
                conn.send(head[:chunk], **life)
                if len(head) > chunk:
                    self.to_send[0] = head[chunk:]
                else:
                    self.to_send.pop(0)
            wrote = True
        self.sent_all = True
        return True

    def maybe_close(self) -> bool:
        conn = self.conn
        if conn is None or self.closed or not self.sent_all or conn.is_terminated:
            return False
        if self.close_policy == "after_send" or (
            self.close_policy == "after_peer" and self.result.peer_closed_at is not None
        ):
            conn.close()
            self.closed = True
            return True
        return False

    def read(self, now: float, budget: float | None) -> bool:
        """Take events: all of them, or while the token budget (bytes) is
        positive; the last event may overdraw it (paid back later)."""
        conn = self.conn
        if conn is None:
            return False
        res = self.result
        took = False
        while budget is None or budget > 0:
            event = conn.next_event()
            if event is None:
                break
            took = True
            if isinstance(event, DataReceived | MessageReceived):
                if res.first_data_at is None:
                    res.first_data_at = now
                res.last_data_at = now
            if isinstance(event, DataReceived):
                self.data += event.data
                res.chunks.append(event.data)
                size = len(event.data)
            elif isinstance(event, MessageReceived):
                res.messages.append(event.data)
                size = len(event.data)
            else:
                size = 0
                res.events.append((now, event))
                if isinstance(event, HandshakeCompleted | HandshakeFailed):
                    res.handshake = event
                elif isinstance(event, ConnectionTerminated):
                    res.terminated = event
                elif isinstance(event, PeerClosed):
                    res.peer_closed_at = now
                elif isinstance(event, DataAbandoned):
                    res.abandoned += event.segments
            if budget is not None:
                budget -= max(size, 1)
        if budget is not None:
            self.tokens = budget
        return took

    def observe(self) -> None:
        conn = self.conn
        if conn is None:
            return
        res = self.result
        res.max_outstanding = max(res.max_outstanding, len(conn._outstanding))
        held = conn._unconsumed + len(conn._rcv_buf) + len(conn._msg_parts)
        res.max_held = max(res.max_held, held)

    @property
    def finished(self) -> bool:
        conn = self.conn
        return conn is not None and conn.is_terminated and conn.pending_events() == 0


class Transfer:
    """A configured transfer; :meth:`run` drives it and returns the result.

    ``offers`` are A's compositions (preferred first).  ``forward`` are the
    conditions A->B, ``backward`` B->A (default: same as forward).
    ``reader_rate_a/b`` make that side's application read at most that many
    bytes per simulated second (checked every ``step`` seconds).
    ``schedule`` is a list of ``(time, callable(transfer))`` actions run at
    those simulated times (change links, move an address, abort...).
    ``stop`` overrides the stop condition (default: both applications saw
    their connection terminate).  ``check(transfer)`` runs after every
    simulator event (assert invariants there).  ``wrap_a/b(endpoint)``
    return the node attached in the endpoint's place (to filter or
    rewrite datagrams).
    """

    def __init__(
        self,
        offers: list[Composition],
        *,
        forward: LinkConditions | None = None,
        backward: LinkConditions | None = None,
        data_ab: Payload = b"",
        data_ba: Payload = b"",
        reader_rate_a: float | None = None,
        reader_rate_b: float | None = None,
        close_a: str | None = "after_send",
        close_b: str | None = "after_peer",
        config_a: ConnectionConfig | None = None,
        config_b: ConnectionConfig | None = None,
        seed: int = 0,
        timeout: float = 300.0,
        step: float = 0.005,
        send_buffer: int | None = None,
        write_chunk: int = 65536,
        schedule: list[tuple[float, Callable[[Transfer], Any]]] | None = None,
        stop: Callable[[Transfer], bool] | None = None,
        check: Callable[[Transfer], Any] | None = None,
        wrap_a: Callable[[EndpointCore], Any] | None = None,
        wrap_b: Callable[[EndpointCore], Any] | None = None,
        lifetime_ab: float | list[float | None] | None = None,
    ) -> None:
        self.net = SimNetwork(seed=seed)
        self.ep_a = EndpointCore(config_a or ConnectionConfig())
        self.ep_b = EndpointCore(config_b or ConnectionConfig(), listen=True)
        self.addr_a, self.addr_b = ADDR_A, ADDR_B
        self.net.attach(ADDR_A, wrap_a(self.ep_a) if wrap_a else self.ep_a)
        self.net.attach(ADDR_B, wrap_b(self.ep_b) if wrap_b else self.ep_b)
        fwd = forward or LinkConditions()
        self.net.link(ADDR_A, ADDR_B, fwd, backward or fwd)
        self.offers = offers
        self.app_a = _App("a", data_ab, close_a, reader_rate_a)
        self.app_b = _App("b", data_ba, close_b, reader_rate_b)
        self.app_a.lifetime = lifetime_ab
        self.timeout = timeout
        self.step = step
        self.send_buffer = send_buffer
        self.write_chunk = write_chunk
        self.schedule = sorted(schedule or [], key=lambda item: item[0])
        self.stop = stop
        self.check = check

    @property
    def conn_a(self) -> Connection | None:
        return self.app_a.conn

    @property
    def conn_b(self) -> Connection | None:
        return self.app_b.conn

    def _app_turn(self, app: _App, fast_only: bool) -> None:
        app.now = self.net.now
        acted = app.write(self.send_buffer, self.write_chunk)
        if app.rate is None:
            acted |= app.read(self.net.now, None)
        elif not fast_only:
            burst = app.rate * self.step
            app.tokens = min(app.tokens + burst, burst)
            acted |= app.read(self.net.now, app.tokens)
        acted |= app.maybe_close()
        if acted:
            self.net.poke()  # the application did something outside the loop

    def _pump(self, fast_only: bool = True) -> bool:
        if self.app_b.conn is None:
            self.app_b.conn = self.ep_b.accept()
        self._app_turn(self.app_a, fast_only)
        self._app_turn(self.app_b, fast_only)
        self.app_a.observe()
        self.app_b.observe()
        if self.check is not None:
            self.check(self)
        if self.stop is not None:
            return self.stop(self)
        if self.app_b.conn is None:  # B never accepted: done once A gave up and B forgot it
            return self.app_a.finished and not self.ep_b.connections
        return self.app_a.finished and self.app_b.finished

    def run(self) -> TransferResult:
        net = self.net
        self.app_a.conn = self.ep_a.connect(self.addr_b, self.offers, net.now)
        deadline = net.now + self.timeout
        completed = False
        slow = self.app_a.rate is not None or self.app_b.rate is not None
        while net.now < deadline:
            horizon = deadline
            if slow:
                horizon = min(horizon, net.now + self.step)
            if self.schedule:
                horizon = min(horizon, self.schedule[0][0])
            if net.run_until(self._pump, max(0.0, horizon - net.now)):
                completed = True
                break
            while self.schedule and self.schedule[0][0] <= net.now:
                self.schedule.pop(0)[1](self)
                net.poke()
            if slow and self._pump(fast_only=False):
                completed = True
                break
        for app, ep in ((self.app_a, self.ep_a), (self.app_b, self.ep_b)):
            app.read(net.now, None)
            app.result.data = bytes(app.data)
            if app.conn is not None:
                app.result.stats = app.conn.snapshot()
                app.result.held_at_end = len(app.conn._rcv_buf) + len(app.conn._msg_parts)
            app.result.endpoint = ep.stats()
        return TransferResult(self.app_a.result, self.app_b.result, net.now, completed, net)


def run_transfer(offers: list[Composition] | Composition | str, **kwargs: Any) -> TransferResult:
    """Build a :class:`Transfer` (see its parameters) and run it."""
    if isinstance(offers, str):
        offers = [Composition.parse(offers)]
    elif isinstance(offers, Composition):
        offers = [offers]
    return Transfer(offers, **kwargs).run()


__all__ = ["ADDR_A", "ADDR_B", "SideResult", "Transfer", "TransferResult", "run_transfer"]
