"""Sans-I/O endpoint: many connections behind one address.

The endpoint decodes each datagram once, demultiplexes it by destination
connection ID (never by the 4-tuple, so a peer may change address), creates
responder connections for OFFERs when listening, and counts every datagram it
drops by reason.  The asyncio datapath (``vtl.io``) and the simulated network
(``vtl.sim``) both drive it through the same four calls."""

from __future__ import annotations

from collections import Counter, deque
from typing import Any

from vtl.core import isolation, wire
from vtl.core.composition import Composition
from vtl.core.config import ConnectionConfig
from vtl.core.connection import Connection, State
from vtl.core.errors import ConnectionStateError, ErrorCode, WireError
from vtl.core.wire import PacketType

Address = tuple[Any, ...]


class EndpointCore:
    """Connections of one local address, with drop counters."""

    #: most stateless RESETs sent per second (answers to unknown connection IDs)
    RESET_RATE = 50.0

    def __init__(
        self, config: ConnectionConfig | None = None, *, listen: bool = False, backlog: int = 1024
    ) -> None:
        self.config = config or ConnectionConfig()
        self.listening = listen
        #: most responder connections half-open or waiting for accept(); more OFFERs are refused
        self.backlog = backlog
        self.connections: dict[int, Connection] = {}
        self.addresses: dict[int, Address] = {}
        self._handshakes: dict[tuple[Address, int], Connection] = {}
        self._accepted: deque[Connection] = deque()
        self._announced: set[int] = set()
        self._stateless: deque[tuple[bytes, Address]] = deque()
        self._reset_tokens = self.RESET_RATE
        self._reset_time = 0.0
        self.drops: Counter[str] = Counter()
        self.received = 0
        #: connections failed because a TF raised (see core/isolation.py)
        self.tf_failures = 0
        #: told when a local connection ID starts (``added(cid)``, before any
        #: datagram of it is sent) or stops (``removed(cid)``) being served,
        #: e.g. by the Hooker's XDP filter; its exceptions are counted, not raised
        self.cid_observer: Any = None
        self.cid_observer_errors = 0

    # ----------------------------------------------------------- app side

    def connect(
        self,
        addr: Address,
        offers: list[Composition],
        now: float,
        config: ConnectionConfig | None = None,
    ) -> Connection:
        """Open a connection to ``addr`` offering ``offers`` (preferred first)."""
        conn = Connection(is_client=True, config=config or self.config, offers=offers)
        while conn.local_cid in self.connections:
            conn = Connection(is_client=True, config=config or self.config, offers=offers)
        self.connections[conn.local_cid] = conn
        self.addresses[conn.local_cid] = addr
        self._observe(True, conn.local_cid)
        conn.connect(now)
        return conn

    def accept(self) -> Connection | None:
        """Next responder connection whose handshake completed, if any."""
        return self._accepted.popleft() if self._accepted else None

    def address_of(self, conn: Connection) -> Address | None:
        return self.addresses.get(conn.local_cid)

    # ------------------------------------------------------- network side

    def receive(self, datagram: bytes, addr: Address, now: float) -> None:
        """Feed one datagram from ``addr``.  Never raises on bad input."""
        self.received += 1
        try:
            packet = wire.decode(datagram)
        except WireError as exc:
            self.drops[exc.reason] += 1
            return
        if packet.dcid == 0:
            self._receive_offer(packet, datagram, addr, now)
            return
        conn = self.connections.get(packet.dcid)
        if conn is None:
            self.drops["unknown_connection"] += 1
            if packet.type is not PacketType.RESET:
                self._stateless_reset(packet, addr, now)
            return
        before = conn.stats["dropped_invalid"]
        largest = conn.largest_pn_received
        conn.receive_packet(packet, len(datagram), now, datagram)
        if conn.stats["dropped_invalid"] != before:
            self.drops["invalid_for_connection"] += 1
        elif conn.largest_pn_received > largest:
            # follow a peer that moved, on its newest packets only: a replayed
            # old packet from elsewhere must not redirect the connection
            self.addresses[conn.local_cid] = addr
        self._announce(conn)

    def _receive_offer(self, packet: wire.Packet, datagram: bytes, addr: Address, now: float):
        key = (addr, packet.scid)
        conn = self._handshakes.get(key)
        if packet.type is PacketType.RESET and conn is not None and conn.state is State.ACCEPTING:
            # the initiator aborted before it learned our connection ID
            conn.receive_packet(packet, len(datagram), now)
            return
        if packet.type is not PacketType.OFFER:
            self.drops["no_destination_cid"] += 1
            return
        if conn is not None:
            conn.receive_packet(packet, len(datagram), now)
            return
        if not self.listening:
            self.drops["not_listening"] += 1
            self._stateless_reset(packet, addr, now, ErrorCode.NOT_LISTENING, "not listening")
            return
        if self.pending_handshakes() >= self.backlog:
            self.drops["backlog_full"] += 1
            self._stateless_reset(packet, addr, now, ErrorCode.ENDPOINT_CLOSING, "backlog full")
            return
        conn = Connection(is_client=False, config=self.config)
        while conn.local_cid in self.connections:
            conn = Connection(is_client=False, config=self.config)
        try:
            conn.accept_offer(packet, now)
        except (WireError, ConnectionStateError) as exc:
            self.drops["malformed_offer"] += 1
            self._stateless_reset(packet, addr, now, ErrorCode.PROTOCOL_VIOLATION, str(exc))
            return
        except Exception as exc:  # a TF raised while being set up: refuse this one only
            found = isolation.culprit(exc)
            if found is None:
                raise
            self.tf_failures += 1
            reason = isolation.describe(exc, *found, "handshake")
            self._stateless_reset(packet, addr, now, ErrorCode.TF_FAILURE, reason)
            return
        self.connections[conn.local_cid] = conn
        self.addresses[conn.local_cid] = addr
        self._handshakes[key] = conn
        self._observe(True, conn.local_cid)

    def pending_handshakes(self) -> int:
        """Responder connections not yet taken by the application: half-open
        ones plus completed ones waiting in the accept queue."""
        half_open = sum(1 for c in self._handshakes.values() if c.state is State.ACCEPTING)
        return half_open + len(self._accepted)

    def _announce(self, conn: Connection) -> None:
        if (
            not conn.is_client
            and conn.local_cid not in self._announced
            and conn.state is State.ESTABLISHED
        ):
            self._announced.add(conn.local_cid)
            self._accepted.append(conn)

    def _stateless_reset(
        self,
        packet: wire.Packet,
        addr: Address,
        now: float,
        code: int = ErrorCode.UNKNOWN_CONNECTION,
        reason: str = "unknown connection",
    ) -> None:
        """Tell a peer that this connection does not exist here (rate-limited)."""
        self._reset_tokens = min(
            self.RESET_RATE, self._reset_tokens + (now - self._reset_time) * self.RESET_RATE
        )
        self._reset_time = now
        if self._reset_tokens < 1 or not packet.scid:
            self.drops["reset_rate_limited"] += 1
            return
        self._reset_tokens -= 1
        body = wire.encode_error(int(code), reason)
        self._stateless.append(
            (wire.encode(PacketType.RESET, packet.scid, packet.dcid, 0, body), addr)
        )

    def datagrams_to_send(self, now: float) -> list[tuple[bytes, Address]]:
        """Datagrams of every connection, with their destinations."""
        out: list[tuple[bytes, Address]] = []
        while self._stateless:
            out.append(self._stateless.popleft())
        dead = []
        for cid, conn in self.connections.items():
            addr = self.addresses[cid]
            for datagram in conn.datagrams_to_send(now):
                out.append((datagram, addr))
            if conn.state is State.TERMINATED and conn.next_timer() is None:
                dead.append(cid)
        for cid in dead:
            self._forget(cid)
        return out

    def _forget(self, cid: int) -> None:
        conn = self.connections.pop(cid)
        self.tf_failures += conn.stats.get("tf_failures", 0)
        addr = self.addresses.pop(cid)
        self._handshakes.pop((addr, conn.peer_cid), None)
        for key, c in list(self._handshakes.items()):
            if c is conn:
                del self._handshakes[key]
        self._announced.discard(cid)
        self._observe(False, cid)

    def _observe(self, added: bool, cid: int) -> None:
        if self.cid_observer is None:
            return
        try:
            (self.cid_observer.added if added else self.cid_observer.removed)(cid)
        except Exception:  # an observer must never break the endpoint
            self.cid_observer_errors += 1

    def next_timer(self) -> float | None:
        times = [t for c in self.connections.values() if (t := c.next_timer()) is not None]
        return min(times) if times else None

    def handle_timer(self, now: float) -> None:
        for conn in list(self.connections.values()):
            t = conn.next_timer()
            if t is not None and t <= now:
                conn.handle_timer(now)
            self._announce(conn)

    def stats(self) -> dict[str, Any]:
        return {
            "connections": len(self.connections),
            "datagrams_received": self.received,
            "drops": dict(self.drops),
            "tf_failures": self.tf_failures
            + sum(c.stats.get("tf_failures", 0) for c in self.connections.values()),
        }
