"""The sans-I/O connection state machine.

A :class:`Connection` has no socket, no clock and no event loop.  It is
driven by its owner:

* ``receive(datagram, now)`` feeds one datagram addressed to it;
* ``datagrams_to_send(now)`` returns the datagrams it wants sent now;
* ``next_timer()`` / ``handle_timer(now)`` run its timers;
* ``send()`` / ``close()`` / ``abort()`` are the application's calls;
* ``next_event()`` hands out :mod:`vtl.core.events`.

The protocol's mechanisms come from the negotiated composition's TFs:
reliability policy, congestion control, ordering, flow control and framing.
The engine keeps the buffers, packet-number based loss detection (RFC 9002
thresholds, since packet numbers are never reused), the RFC 6298 timer, the
pacer and the handshake / close state machine.
"""

from __future__ import annotations

import heapq
import random
import secrets
from collections import OrderedDict, deque
from dataclasses import dataclass
from enum import Enum
from typing import Any

from vtl.core import wire
from vtl.core.composition import Composition
from vtl.core.config import ConnectionConfig
from vtl.core.errors import (
    CompositionError,
    ConnectionStateError,
    ErrorCode,
    VtlError,
    WireError,
)
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
from vtl.core.ranges import RangeSet
from vtl.core.registry import Registry, default_registry
from vtl.core.rtt import RttEstimator
from vtl.core.wire import AckFlags, DataFlags, HsField, PacketType
from vtl.tfs.congestion.base import CongestionControl, RateSample

PACKET_THRESHOLD = 3  # RFC 9002 kPacketThreshold
#: packets whose number is further ahead of the largest one received are
#: dropped: far beyond what a sender can lose in a row (its window is at
#: most 2**20 segments), so it only rejects forged or garbled numbers
MAX_PN_GAP = 1 << 24
#: a cleanly closed connection lingers this many RTOs after the peer's last
#: packet, to repeat its final ACK should the peer have missed it; enough to
#: hear at least three of the peer's (backed-off) retransmissions
DRAIN_RTOS = 8
TIME_THRESHOLD = 9 / 8  # RFC 9002 kTimeThreshold
U32 = 1 << 32


_ESTABLISHED_TYPES = frozenset(
    (PacketType.DATA, PacketType.ACK, PacketType.CLOSE, PacketType.PROBE)
)


class State(Enum):
    IDLE = "idle"
    OFFERING = "offering"  # initiator sent OFFER
    ACCEPTING = "accepting"  # responder sent ACCEPT, waits for confirmation
    ESTABLISHED = "established"
    TERMINATED = "terminated"


@dataclass(slots=True)
class Segment:
    """One unit of the sequence space, kept until acked or abandoned."""

    seq: int
    payload: bytes
    flags: int
    pn: int = -1  # packet number of its latest transmission
    sends: int = 0


@dataclass(slots=True)
class SentPacket:
    """Bookkeeping of an ack-eliciting packet (fields read by congestion
    control, see ``tfs/congestion/base.py``)."""

    pn: int
    size: int
    sent_time: float
    seq: int  # -1 for non-data packets
    in_flight: bool
    delivered: int = 0
    delivered_time: float = 0.0
    first_sent_time: float = 0.0
    is_app_limited: bool = False


class _Chunks:
    """Stream bytes waiting in the event queue, merged into one event."""

    __slots__ = ("parts", "segments")

    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.segments = 0


def _new_cid(rng: random.Random | None) -> int:
    while True:
        cid = rng.getrandbits(64) if rng else secrets.randbits(64)
        if cid:
            return cid


class Connection:
    """One VTL connection (either end), driven without I/O."""

    def __init__(
        self,
        *,
        is_client: bool,
        config: ConnectionConfig | None = None,
        offers: list[Composition] | None = None,
        local_cid: int | None = None,
    ) -> None:
        self.config = cfg = config or ConnectionConfig()
        self.is_client = is_client
        self.registry: Registry = cfg.registry or default_registry()
        self.offers = list(offers or [])
        if is_client and not self.offers:
            raise ConnectionStateError("an initiating connection needs at least one composition")
        rng = cfg.rng
        self.local_cid = local_cid or _new_cid(rng)
        self.peer_cid = 0
        self.state = State.IDLE
        self.composition: Composition | None = None
        self.counter_offer = False
        self.offered_index: int | None = None
        self.stats: dict[str, int] = {
            "packets_sent": 0,
            "packets_received": 0,
            "bytes_sent": 0,
            "bytes_received": 0,
            "data_packets_sent": 0,
            "retransmissions": 0,
            "packets_lost": 0,
            "rto_count": 0,
            "acks_sent": 0,
            "acks_received": 0,
            "duplicate_segments": 0,
            "out_of_window_drops": 0,
            "dropped_invalid": 0,
            "invalid_ack_echo": 0,
            "segments_abandoned": 0,
            "app_bytes_sent": 0,
            "app_bytes_delivered": 0,
        }
        self._events: deque[Any] = deque()
        self._max_payload = cfg.max_datagram_size - wire.DATA_OVERHEAD
        if self._max_payload < 16:
            raise ConnectionStateError("max_datagram_size too small for a DATA packet")
        self.rtt = RttEstimator(initial_rtt=cfg.initial_rtt)
        # TFs are instantiated once the composition is negotiated
        self.reliability: Any = None
        self.cc: CongestionControl | None = None
        self.ordering: Any = None
        self.flow: Any = None
        self.framing: Any = None
        # ---- sender
        isn = cfg.initial_seq
        if isn is None:
            isn = rng.getrandbits(32) if rng else secrets.randbits(32)
        self._isn = isn
        self._snd_una = isn
        self._snd_nxt = isn
        self._unsent: deque[list] = deque()  # [payload(bytearray|bytes), flags]
        self._unsent_bytes = 0
        self._outstanding: dict[int, Segment] = {}
        self._retx_heap: list[int] = []
        self._retx_set: set[int] = set()
        self._sent: OrderedDict[int, SentPacket] = OrderedDict()
        self._bytes_in_flight = 0
        self._next_pn = 0
        self._largest_acked_pn = -1
        self._peer_window_limit = isn  # until the peer tells us its window
        self._sacked = RangeSet()
        self._rto_deadline: float | None = None
        self._loss_deadline: float | None = None
        self._persist_deadline: float | None = None
        self._pace_tokens = 0.0
        self._pace_time: float | None = None
        self._pace_deadline: float | None = None
        self._delivered = 0
        self._delivered_time = 0.0
        self._first_sent_time = 0.0
        self._app_limited_until = 0  # delivered-bytes mark (rate sampling)
        # ---- receiver
        self._rcv_next = 0
        self._rcv_buf: dict[int, tuple[bytes, int]] = {}
        self._rcv_ranges = RangeSet()
        self._msg_parts: list[bytes] = []
        self._msg_broken = False
        self._unconsumed = 0
        self._window_limit = 0
        self._window_sent_free = 0
        self._largest_pn_rx = -1  # echoed in our ACKs
        self._largest_pn_seen = -1  # of any valid packet: base for expanding numbers
        self._largest_pn_rx_time = 0.0
        self._ack_pending = 0
        self._ack_now = False
        self._ack_deadline: float | None = None
        self._peer_final: int | None = None
        self._eof_delivered = False
        # ---- lifecycle
        self._last_rx = 0.0
        self._last_tx = 0.0
        self._hs_started = 0.0
        self._hs_deadline: float | None = None
        self._hs_sends = 0
        self._hs_pending = False  # an OFFER/ACCEPT is due now
        self._offer_fields: bytes = b""
        self._accept_fields: bytes = b""
        self._accept_flags = 0
        self._confirm_pending = False  # initiator owes an ACK with HANDSHAKE_DONE
        self._close_requested = False
        self._close_final: int | None = None
        self._close_sent_time: float | None = None
        self._close_deadline: float | None = None
        self._close_acked = False
        self._close_due = False
        self._reset_out: tuple[int, str] | None = None
        self._refuse_out: tuple[int, str] | None = None
        self._drain_deadline: float | None = None
        self._keepalive_deadline: float | None = None
        self._probe_due = False
        self._terminated_event_sent = False

    # ================================================================ API

    def connect(self, now: float) -> None:
        """Start the handshake (initiator)."""
        if not self.is_client or self.state is not State.IDLE:
            raise ConnectionStateError("connect() is for a new initiating connection")
        fields = {
            HsField.COMPOSITIONS: wire.to_json([c.to_dict() for c in self.offers]),
            HsField.INVENTORY: wire.to_json(self.registry.inventory()),
            HsField.INITIAL_SEQ: (self._isn % U32).to_bytes(4, "big"),
            HsField.MAX_DATAGRAM: self.config.max_datagram_size.to_bytes(2, "big"),
            HsField.IDLE_TIMEOUT_MS: int(self.config.idle_timeout * 1000).to_bytes(4, "big"),
        }
        self._offer_fields = wire.encode_fields(fields)
        if len(self._offer_fields) + wire.OVERHEAD > self.config.max_datagram_size * 8:
            raise ConnectionStateError("offer too large")
        self.state = State.OFFERING
        self._hs_started = now
        self._last_rx = now
        self._hs_pending = True

    @property
    def is_established(self) -> bool:
        return self.state is State.ESTABLISHED

    @property
    def is_terminated(self) -> bool:
        return self.state is State.TERMINATED

    @property
    def send_buffer_bytes(self) -> int:
        """Bytes accepted by send() and not yet acknowledged (for backpressure)."""
        return self._unsent_bytes + len(self._outstanding) * self._max_payload

    @property
    def max_message_size(self) -> int:
        if self.framing is not None and self.framing.messages:
            return self.framing.params["max_message_size"]
        return 1 << 30

    def send(self, data: bytes) -> None:
        """Queue application data: stream bytes, or one whole message with
        message framing.  Allowed before the handshake completes."""
        if self._close_requested:
            raise ConnectionStateError("cannot send after close()")
        if self.state is State.TERMINATED:
            raise ConnectionStateError("connection is terminated")
        data = bytes(data)
        messages = self.framing.messages if self.framing is not None else self._offers_messages()
        if messages and len(data) > self.max_message_size:
            raise ConnectionStateError(
                f"message of {len(data)} bytes exceeds max_message_size {self.max_message_size}"
            )
        self._enqueue(data, messages)
        self.stats["app_bytes_sent"] += len(data)

    def _enqueue(self, data: bytes, messages: bool) -> None:
        """Segment ``data`` (one message, or stream bytes) into the send queue."""
        if messages:
            mp = self._max_payload
            n = max(1, -(-len(data) // mp))
            for i in range(n):
                flags = (DataFlags.MSG_START if i == 0 else 0) | (
                    DataFlags.MSG_END if i == n - 1 else 0
                )
                self._unsent.append([data[i * mp : (i + 1) * mp], flags])
        else:
            if not data:
                return
            mp = self._max_payload
            pos = 0
            if self._unsent and isinstance(self._unsent[-1][0], bytearray):
                tail = self._unsent[-1][0]
                room = mp - len(tail)
                if room > 0:
                    tail += data[:room]
                    pos = room
            while pos < len(data):
                self._unsent.append([bytearray(data[pos : pos + mp]), 0])
                pos += mp
        self._unsent_bytes += len(data)

    def close(self) -> None:
        """Graceful close of our sending direction: everything queued is
        still delivered; the connection ends once both directions are done."""
        if self.state is State.TERMINATED or self._close_requested:
            return
        self._close_requested = True

    def abort(self, error_code: int = ErrorCode.APPLICATION, reason: str = "aborted") -> None:
        """Abortive close: send RESET and terminate now, dropping queued data."""
        if self.state is State.TERMINATED:
            return
        if self.state is not State.IDLE:
            self._reset_out = (int(error_code), reason)
        self._terminate(int(error_code), reason, by_peer=False)

    def next_event(self) -> Event | None:
        """Pop the next event; taking data events frees receive window."""
        if not self._events:
            return None
        item = self._events.popleft()
        if isinstance(item, _Chunks):
            self._consumed(item.segments)
            return DataReceived(b"".join(item.parts))
        if isinstance(item, tuple):  # (event, segments)
            event, segments = item
            self._consumed(segments)
            return event
        return item

    def pending_events(self) -> int:
        return len(self._events)

    # ============================================================ timers

    def next_timer(self) -> float | None:
        """Absolute time of the earliest timer, or None."""
        if self.state is State.TERMINATED:
            return self._drain_deadline
        cands = [
            self._hs_deadline,
            self._rto_deadline,
            self._loss_deadline,
            self._ack_deadline if self._ack_pending else None,
            self._persist_deadline,
            self._close_deadline,
            self._keepalive_deadline,
        ]
        if self._pace_deadline is not None and self._has_sendable():
            cands.append(self._pace_deadline)
        if self.state is not State.IDLE:
            cands.append(self._last_rx + self._idle_timeout())
        times = [t for t in cands if t is not None]
        return min(times) if times else None

    def handle_timer(self, now: float) -> None:
        """Run every timer that is due at ``now``."""
        if self.state is State.TERMINATED:
            if self._drain_deadline is not None and now >= self._drain_deadline:
                self._drain_deadline = None
            return
        if self.state is not State.IDLE and now >= self._last_rx + self._idle_timeout():
            if (
                self.state in (State.OFFERING, State.ACCEPTING)
                or now >= self._hs_started + (self.config.handshake_timeout)
                and self.state is not State.ESTABLISHED
            ):
                self._handshake_failed(ErrorCode.HANDSHAKE_TIMEOUT, "handshake timed out")
            else:
                self._reset_out = (ErrorCode.IDLE_TIMEOUT, "idle timeout")
                self._terminate(ErrorCode.IDLE_TIMEOUT, "idle timeout", by_peer=False)
            return
        if self._hs_deadline is not None and now >= self._hs_deadline:
            if now >= self._hs_started + self.config.handshake_timeout:
                self._handshake_failed(ErrorCode.HANDSHAKE_TIMEOUT, "handshake timed out")
                return
            self._hs_pending = True
            self._hs_deadline = None
        if self._loss_deadline is not None and now >= self._loss_deadline:
            self._loss_deadline = None
            self._detect_losses(now)
        if self._rto_deadline is not None and now >= self._rto_deadline:
            self._on_rto(now)
        if self._ack_pending and self._ack_deadline is not None and now >= self._ack_deadline:
            self._ack_now = True
        if self._persist_deadline is not None and now >= self._persist_deadline:
            self._persist_deadline = None
            self._probe_due = True
        if self._close_deadline is not None and now >= self._close_deadline:
            self._close_deadline = None
            self._close_due = True
        if self._keepalive_deadline is not None and now >= self._keepalive_deadline:
            self._keepalive_deadline = None
            self._probe_due = True
        if self._pace_deadline is not None and now >= self._pace_deadline:
            self._pace_deadline = None

    def _idle_timeout(self) -> float:
        if self.state in (State.OFFERING, State.ACCEPTING):
            return self.config.handshake_timeout
        return self.config.idle_timeout

    # =========================================================== receive

    def receive(self, datagram: bytes, now: float) -> None:
        """Process one datagram addressed to this connection.  Invalid input
        is counted in ``stats['dropped_invalid']``, never raised."""
        try:
            packet = wire.decode(datagram)
        except WireError:
            self.stats["dropped_invalid"] += 1
            return
        self.receive_packet(packet, len(datagram), now)

    def receive_packet(self, packet: wire.Packet, size: int, now: float) -> None:
        """Process an already decoded packet (the endpoint decodes once)."""
        try:
            self._receive(packet, size, now)
        except WireError:
            self.stats["dropped_invalid"] += 1
        except CompositionError as exc:  # a bad offer or accept
            self.stats["dropped_invalid"] += 1
            if self.state is State.OFFERING:
                self._reset_out = (ErrorCode.PROTOCOL_VIOLATION, str(exc))
                self._handshake_failed(ErrorCode.PROTOCOL_VIOLATION, str(exc))

    def _receive(self, p: wire.Packet, size: int, now: float) -> None:
        state = self.state
        if state is State.TERMINATED:
            self._receive_while_draining(p, now)
            return
        t = p.type
        if t is PacketType.RESET:
            if p.scid != self.peer_cid and self.peer_cid:
                raise WireError("RESET from a different connection")
            code, reason = wire.decode_error(p.body)
            if state in (State.OFFERING, State.ACCEPTING, State.IDLE):
                self._handshake_failed(code, reason, by_peer=True)
            elif code == ErrorCode.UNKNOWN_CONNECTION and self._only_close_unconfirmed():
                # The peer finished and forgot the connection; only its ACK of
                # our CLOSE was lost (it got all our data and we got its end).
                self._terminate(ErrorCode.NO_ERROR, "closed (peer already gone)", by_peer=True)
            else:
                self._terminate(code, reason, by_peer=True)
            return
        if state is State.OFFERING:
            self._receive_handshake_reply(p, now)
            return
        if t is PacketType.OFFER:
            # our ACCEPT was lost: say it again (once established, the peer
            # has had it; a late duplicate OFFER must not rearm the handshake)
            if state is State.ACCEPTING and p.scid == self.peer_cid:
                self._hs_pending = True
                self._last_rx = now
            return
        if p.scid != self.peer_cid:
            raise WireError("packet from an unexpected source connection ID")
        if t is PacketType.ACCEPT:  # duplicate ACCEPT: confirm again
            if self.is_client:
                self._confirm_pending = True
            return
        if t not in _ESTABLISHED_TYPES:  # RECONFIGURE and handshake types
            raise WireError(f"unexpected {t.name} on an established connection")
        pn = self._expand_pn_rx(p.pn)
        if pn > self._largest_pn_seen + MAX_PN_GAP:
            raise WireError("packet number implausibly far ahead")
        if state is State.ACCEPTING:
            self._established(now)
        self.stats["packets_received"] += 1
        self.stats["bytes_received"] += size
        self._last_rx = now
        self._arm_keepalive(now)
        if t is PacketType.DATA:
            fresh = self._on_data(p, now)
            self._note_ack_eliciting(pn, now, fresh)
        elif t is PacketType.ACK:
            self._on_ack(p, now)
        elif t is PacketType.CLOSE:
            fresh = self._on_close(p)
            self._note_ack_eliciting(pn, now, fresh)
        else:  # PROBE
            self._note_ack_eliciting(pn, now, True)
            self._ack_now = True
        # only a packet that passed every check moves the expansion base
        self._largest_pn_seen = max(self._largest_pn_seen, pn)

    @property
    def largest_pn_received(self) -> int:
        """Largest packet number received from the peer in a valid packet
        (the endpoint follows a peer to a new address only on a new one)."""
        return self._largest_pn_seen

    def _expand_pn_rx(self, truncated: int) -> int:
        return wire.expand(truncated, self._largest_pn_seen + 1)

    def _note_ack_eliciting(self, pn: int, now: float, fresh: bool) -> None:
        """Schedule an ACK.  Only ``fresh`` packets (new data, a first CLOSE,
        a PROBE) move the largest packet number our ACKs echo: a duplicate
        with a forged packet number must not make the sender reject them."""
        if fresh and pn > self._largest_pn_rx:
            self._largest_pn_rx = pn
            self._largest_pn_rx_time = now
        self._ack_pending += 1
        if self._ack_pending == 1:
            self._ack_deadline = now + self.config.max_ack_delay
        if self._ack_pending >= self.config.ack_every:
            self._ack_now = True

    # ------------------------------------------------------- handshake

    def accept_offer(self, packet: wire.Packet, now: float) -> None:
        """Responder: process the OFFER that created this connection and
        prepare an ACCEPT (possibly a counter-offer) or a REFUSE."""
        if self.is_client or self.state is not State.IDLE:
            raise ConnectionStateError("accept_offer() is for a new responding connection")
        self.peer_cid = packet.scid
        self._hs_started = now
        self._last_rx = now
        self._largest_pn_rx = self._largest_pn_seen = self._expand_pn_rx(packet.pn)
        fields = wire.decode_fields(packet.body)
        offers_raw = wire.field_json(fields, HsField.COMPOSITIONS)
        inventory = wire.field_json(fields, HsField.INVENTORY, default={})
        if (
            not isinstance(offers_raw, list)
            or not isinstance(inventory, dict)
            or not all(
                isinstance(names, dict) and all(isinstance(v, list) for v in names.values())
                for names in inventory.values()
            )
        ):
            raise WireError("malformed OFFER")
        peer_isn = wire.field_int(fields, HsField.INITIAL_SEQ, 4)
        peer_mds = self._peer_max_datagram(fields)
        chosen, index, reasons = None, None, []
        for i, raw in enumerate(offers_raw[:16]):
            try:
                comp = Composition.from_dict(raw).validate(self.registry)
            except CompositionError as exc:
                reasons.append(f"offer {i}: {exc}")
                continue
            if self.config.acceptable is not None and not self.config.acceptable(comp):
                reasons.append(f"offer {i}: not acceptable to this responder")
                continue
            chosen, index = comp, i
            break
        if chosen is None:
            for comp in self.config.counter_offers:
                if not comp.satisfiable_by(inventory):
                    chosen = comp
                    break
        self.state = State.ACCEPTING
        if chosen is None:
            reason = "; ".join(reasons) or "no offer"
            self._refuse_out = (ErrorCode.NO_COMMON_COMPOSITION, reason)
            self._terminate(ErrorCode.NO_COMMON_COMPOSITION, reason, by_peer=False, silent=True)
            return
        self._adopt(chosen, peer_isn, peer_mds)
        self.counter_offer = index is None
        self.offered_index = index
        fields_out = {
            HsField.COMPOSITIONS: wire.to_json([chosen.to_dict()]),
            HsField.INVENTORY: wire.to_json(self.registry.inventory()),
            HsField.INITIAL_SEQ: (self._isn % U32).to_bytes(4, "big"),
            HsField.WINDOW: self._advertise_window().to_bytes(4, "big"),
            HsField.MAX_DATAGRAM: self.config.max_datagram_size.to_bytes(2, "big"),
            HsField.CHOSEN: (255 if index is None else index).to_bytes(1, "big"),
        }
        self._accept_fields = wire.encode_fields(fields_out)
        self._accept_flags = wire.HsFlags.COUNTER_OFFER if index is None else 0
        self._hs_pending = True

    def _receive_handshake_reply(self, p: wire.Packet, now: float) -> None:
        if p.type is PacketType.REFUSE:
            code, reason = wire.decode_error(p.body)
            self._handshake_failed(code, reason, by_peer=True)
            return
        if p.type is not PacketType.ACCEPT:
            raise WireError(f"unexpected {p.type.name} during the handshake")
        fields = wire.decode_fields(p.body)
        comps = wire.field_json(fields, HsField.COMPOSITIONS)
        if not isinstance(comps, list) or len(comps) != 1:
            raise WireError("ACCEPT must carry exactly one composition")
        comp = Composition.from_dict(comps[0]).validate(self.registry)
        index = wire.field_int(fields, HsField.CHOSEN, 1)
        counter = index == 255
        if not counter and (index >= len(self.offers) or comp != self.offers[index]):
            raise WireError("ACCEPT names a composition that was not offered")
        if counter:
            check = self.config.accept_counter_offer
            if check is not None and not check(comp):
                self.peer_cid = p.scid
                reason = f"counter-offer rejected: {comp}"
                self._reset_out = (ErrorCode.COUNTER_OFFER_REJECTED, reason)
                self._handshake_failed(ErrorCode.COUNTER_OFFER_REJECTED, reason)
                return
        self.peer_cid = p.scid
        peer_isn = wire.field_int(fields, HsField.INITIAL_SEQ, 4)
        peer_mds = self._peer_max_datagram(fields)
        window = wire.field_int(fields, HsField.WINDOW, 4)
        self._largest_pn_rx = self._largest_pn_seen = self._expand_pn_rx(p.pn)
        self._largest_pn_rx_time = now
        if self._hs_sends == 1:
            self.rtt.on_sample(now - self._hs_started)
        self._adopt(comp, peer_isn, peer_mds)
        # the composition fixes the window: a larger advertisement is not believed
        self._peer_window_limit = self._snd_una + min(window, self.flow.window)
        self.counter_offer = counter
        self.offered_index = None if counter else index
        self._confirm_pending = True
        self._last_rx = now
        self._established(now)

    def _peer_max_datagram(self, fields: dict[int, bytes]) -> int:
        peer_mds = wire.field_int(fields, HsField.MAX_DATAGRAM, 2, default=1200)
        if peer_mds - wire.DATA_OVERHEAD < 16:
            raise WireError(f"peer max datagram size {peer_mds} too small for a DATA packet")
        return peer_mds

    def _adopt(self, comp: Composition, peer_isn: int, peer_mds: int) -> None:
        """Instantiate the negotiated composition's TFs."""
        tfs = comp.instantiate(
            self.registry, congestion={"max_datagram_size": self.config.max_datagram_size}
        )
        self.composition = comp
        self.reliability = tfs["reliability"]
        self.cc = tfs["congestion"]
        self.ordering = tfs["ordering"]
        self.flow = tfs["flow"]
        self.framing = tfs["framing"]
        p = self.reliability.params
        self.rtt.min_rto = p.get("min_rto", self.rtt.min_rto)
        self.rtt.max_rto = p.get("max_rto", self.rtt.max_rto)
        self.rtt.backoff = p.get("rto_backoff", self.rtt.backoff)
        self._rcv_next = peer_isn
        self._window_limit = peer_isn + self.flow.window  # what the handshake advertises
        # the peer's receive buffer starts empty with the same window (the
        # initiator's is confirmed by the ACCEPT, the responder's by the first ACK)
        self._peer_window_limit = self._snd_una + self.flow.window
        old_max_payload = self._max_payload
        self._max_payload = min(self.config.max_datagram_size, peer_mds) - wire.DATA_OVERHEAD
        self._reframe_unsent(old_max_payload)

    def _offers_messages(self) -> bool:
        """Before negotiation: does our first offer use message framing?"""
        if not self.offers:
            return False
        return self.offers[0]["framing"].name == "message"

    def _reframe_unsent(self, old_max_payload: int) -> None:
        """Data queued before negotiation was framed per our first offer and
        our own datagram size; a counter-offer may have changed the framing
        and the peer may take smaller datagrams: segment it again (message
        boundaries are kept; stream bytes queued for a message composition
        become messages of at most ``max_message_size``)."""
        if not self._unsent:
            return
        want_messages = self.framing.messages
        have_messages = self._offers_messages() if self.is_client else False
        if want_messages == have_messages and old_max_payload == self._max_payload:
            return
        units: list[bytes] = []
        if have_messages:
            parts: list[bytes] = []
            for payload, flags in self._unsent:
                if flags & DataFlags.MSG_START:
                    parts = []
                parts.append(bytes(payload))
                if flags & DataFlags.MSG_END:
                    units.append(b"".join(parts))
        else:
            units.append(b"".join(bytes(payload) for payload, _ in self._unsent))
        self._unsent.clear()
        self._unsent_bytes = 0
        if want_messages and not have_messages:
            data, size = units[0], self.max_message_size
            units = [data[i : i + size] for i in range(0, len(data), size)]
        elif not want_messages:
            units = [b"".join(units)]
        for unit in units:
            self._enqueue(unit, want_messages)

    def _established(self, now: float) -> None:
        self.state = State.ESTABLISHED
        self._hs_deadline = None
        self._arm_keepalive(now)
        self._events.append(
            HandshakeCompleted(self.composition, self.counter_offer, self.offered_index)
        )

    def _handshake_failed(self, code: int, reason: str, by_peer: bool = False) -> None:
        self._events.append(HandshakeFailed(int(code), reason, by_peer))
        self._terminate(int(code), reason, by_peer, silent=True)

    # ------------------------------------------------------------ data in

    def _on_data(self, p: wire.Packet, now: float) -> bool:
        """Process a DATA packet; return whether it was new (not a duplicate
        and inside the window)."""
        tseq, tuna, payload = wire.decode_data(p.body)
        rcv_next = self._rcv_next
        seq = wire.expand(tseq, rcv_next)
        una = wire.expand(tuna, rcv_next)
        if len(payload) > self._max_payload:
            raise WireError("segment larger than negotiated")
        if una > rcv_next:
            self._check_una(una)
            self._skip_to(una)
            rcv_next = self._rcv_next
        if seq < rcv_next or seq in self._rcv_ranges:
            self.stats["duplicate_segments"] += 1
            self._ack_now = True
            return False
        if seq >= self._window_limit or (self._peer_final is not None and seq >= self._peer_final):
            self.stats["out_of_window_drops"] += 1
            self._ack_now = True
            return False
        flags = p.flags
        if seq == rcv_next:
            self._rcv_next = seq + 1
            if self.framing.messages and not self.ordering.ordered:
                self._rcv_buf[seq] = (payload, flags)
                self._try_message(seq)
            else:
                self._deliver_in_order(payload, flags)
            self._pull_contiguous()
            if self._rcv_ranges:
                self._ack_now = True  # filled a hole: tell the sender at once
        else:
            if not self.reliability.buffers_out_of_order:
                self.stats["out_of_window_drops"] += 1
                self._ack_now = True
                return True  # its packet number still tells the sender what was lost
            self._rcv_ranges.add(seq, seq + 1)
            self._ack_now = True
            if self.ordering.ordered:
                self._rcv_buf[seq] = (payload, flags)
            elif self.framing.messages:
                self._rcv_buf[seq] = (payload, flags)
                self._try_message(seq)
            else:
                self._queue_data(payload, 1)
        self._check_eof()
        return True

    def _check_una(self, una: int) -> None:
        """The sender says it abandoned everything below ``una`` (> rcv_next)."""
        if self.reliability.reliable:
            # a reliable sender's UNA never passes what we acknowledged
            raise WireError("reliable sender's UNA skips data we never received")
        if una > self._window_limit or (self._peer_final is not None and una > self._peer_final):
            raise WireError("sender UNA beyond our advertised window")

    def _pull_contiguous(self) -> None:
        """Advance rcv_next over segments already received above it."""
        first = self._rcv_ranges.first()
        if first is None or first[0] != self._rcv_next:
            return
        start, end = first
        self._rcv_ranges.remove_below(end)
        if self.ordering.ordered:
            buf = self._rcv_buf
            for seq in range(start, end):
                payload, flags = buf.pop(seq)
                self._deliver_in_order(payload, flags)
        self._rcv_next = end

    def _deliver_in_order(self, payload: bytes, flags: int) -> None:
        if not self.framing.messages:
            self._queue_data(payload, 1)
            return
        if flags & DataFlags.MSG_START:
            self._msg_parts = []
            self._msg_broken = False
        elif self._msg_broken:
            return
        self._msg_parts.append(payload)
        if flags & DataFlags.MSG_END:
            parts, self._msg_parts = self._msg_parts, []
            self._queue_message(b"".join(parts), len(parts))

    def _try_message(self, seq: int) -> None:
        """Unordered messages: deliver the message holding ``seq`` if whole."""
        buf = self._rcv_buf
        start = seq
        while not buf[start][1] & DataFlags.MSG_START:
            start -= 1
            if start not in buf:
                # below rcv_next a missing piece will never come (abandoned,
                # or dropped with its broken message): drop this message too
                if start < self._rcv_next:
                    self._drop_broken_messages(seq + 1, seq + 1)
                return
        end = seq
        while not buf[end][1] & DataFlags.MSG_END:
            end += 1
            if end not in buf:
                if end < self._rcv_next:
                    self._drop_broken_messages(seq + 1, seq + 1)
                return
        parts = [buf.pop(s)[0] for s in range(start, end + 1)]
        self._queue_message(b"".join(parts), len(parts))

    def _skip_to(self, una: int) -> None:
        """The sender abandoned every segment we lack below ``una``."""
        missing = 0
        cur = self._rcv_next
        unordered_msgs = self.framing.messages and not self.ordering.ordered
        for start, end in self._rcv_ranges.ranges() + [(una, una)]:
            if start >= una:
                start = una
            gap_end = min(start, una)
            if gap_end > cur:
                missing += gap_end - cur
                if unordered_msgs:
                    self._drop_broken_messages(cur, gap_end)
                elif self.framing.messages:
                    self._msg_parts = []
                    self._msg_broken = True
            if start >= una:
                break
            # received range [start, min(end, una)) is delivered in order now
            stop = min(end, una)
            if self.ordering.ordered:
                for seq in range(start, stop):
                    payload, flags = self._rcv_buf.pop(seq)
                    self._deliver_in_order(payload, flags)
            cur = stop
        self._rcv_ranges.remove_below(una)
        self._rcv_next = una
        self._pull_contiguous()
        if missing:
            self.stats["segments_abandoned"] += missing
            self._events.append(DataAbandoned(missing))

    def _drop_broken_messages(self, gap_start: int, gap_end: int) -> None:
        """Unordered messages: drop the pieces of messages that lost a part."""
        buf = self._rcv_buf
        s = gap_start - 1
        while s in buf:
            flags = buf.pop(s)[1]
            if flags & DataFlags.MSG_START:
                break
            s -= 1
        s = gap_end
        while s in buf and not buf[s][1] & DataFlags.MSG_START:
            flags = buf.pop(s)[1]
            if flags & DataFlags.MSG_END:
                break
            s += 1

    def _queue_data(self, payload: bytes, segments: int) -> None:
        self._unconsumed += segments
        self.stats["app_bytes_delivered"] += len(payload)
        tail = self._events[-1] if self._events else None
        if not isinstance(tail, _Chunks):
            tail = _Chunks()
            self._events.append(tail)
        tail.parts.append(payload)
        tail.segments += segments

    def _queue_message(self, data: bytes, segments: int) -> None:
        self._unconsumed += segments
        self.stats["app_bytes_delivered"] += len(data)
        self._events.append((MessageReceived(data), segments))

    def _consumed(self, segments: int) -> None:
        self._unconsumed -= segments
        if self.flow is None or self.state is not State.ESTABLISHED:
            return
        free = self.flow.window - self._unconsumed
        if free - self._window_sent_free >= self.flow.window * self.flow.params["update_fraction"]:
            self._ack_now = True  # window update

    def _advertise_window(self) -> int:
        return self.flow.window if self.flow is not None else 0

    def _check_eof(self) -> None:
        if (
            self._peer_final is not None
            and not self._eof_delivered
            and self._rcv_next >= self._peer_final
        ):
            self._eof_delivered = True
            self._events.append(PeerClosed())
            self._ack_now = True
            self._maybe_finished()

    def _on_close(self, p: wire.Packet) -> bool:
        """Process a CLOSE; return whether it was the first one."""
        tfinal, tuna = wire.decode_close(p.body)
        rcv_next = self._rcv_next
        final = wire.expand(tfinal, rcv_next)
        una = wire.expand(tuna, rcv_next)
        last = self._rcv_ranges.last()
        received_end = last[1] if last else rcv_next  # above every segment we hold
        if final < received_end or final > self._window_limit:
            raise WireError("CLOSE final sequence outside the window")
        if self._peer_final is not None and final != self._peer_final:
            raise WireError("CLOSE contradicts the final sequence announced before")
        if una > final:
            raise WireError("CLOSE with UNA beyond its final sequence")
        if una > rcv_next:
            self._check_una(una)
            self._skip_to(una)
        fresh = self._peer_final is None
        self._peer_final = final
        self._ack_now = True
        self._check_eof()
        return fresh

    # ------------------------------------------------------------ acks in

    def _on_ack(self, p: wire.Packet, now: float) -> None:
        frame = wire.decode_ack(p.body)
        una = self._snd_una
        cum = wire.expand(frame.cum, una)
        largest_pn = wire.expand(frame.largest_pn, self._next_pn - 1)
        if cum > self._snd_nxt:
            raise WireError("ACK for data never sent")
        limit = wire.expand(frame.window_limit, una)
        if not cum <= limit <= cum + self.flow.window:
            raise WireError("ACK window outside the negotiated receive window")
        sack: list[tuple[int, int]] = []
        floor = cum
        for tstart, tend in frame.ranges:  # ascending, disjoint, above cum, all sent
            start, end = wire.expand(tstart, una), wire.expand(tend, una)
            if start < floor or end <= start or end > self._snd_nxt:
                raise WireError("malformed or impossible SACK range")
            sack.append((start, end))
            floor = end
        self.stats["acks_received"] += 1
        if largest_pn >= self._next_pn:
            # The peer echoes a packet number we never sent: it took a forged
            # (or garbled yet CRC-valid) packet for ours.  Numbers are not
            # authenticated, so it cannot tell; rejecting its ACKs would kill
            # the connection.  Ignore the echo (no RTT sample, no threshold
            # loss detection); the data acknowledged was checked on its own.
            self.stats["invalid_ack_echo"] += 1
            largest_pn = -1
        if limit > self._peer_window_limit:
            self._peer_window_limit = limit
            self._persist_deadline = None
        closing = self._close_final is not None
        if p.flags & AckFlags.CLOSE_ACKED and closing and cum >= self._close_final:
            self._close_acked = True
            self._close_deadline = None
        acked: list[SentPacket] = []
        outstanding = self._outstanding
        n_outstanding = len(outstanding)
        if cum > una:
            for seq in range(una, cum):
                seg = outstanding.pop(seq, None)
                if seg is not None:
                    self._segment_acked(seg, acked)
            self._sacked.remove_below(cum)
        for start, end in sack:
            for a, b in self._sacked.add(max(start, una), end):
                for seq in range(a, b):
                    seg = outstanding.pop(seq, None)
                    if seg is not None:
                        self._segment_acked(seg, acked)
        self._advance_una()
        if len(outstanding) < n_outstanding:
            # new data acknowledged: the path delivers again, whether or not
            # this ACK gives an RTT sample (RFC 9002 resets the PTO backoff
            # alike; packet numbers are never reused, so nothing is ambiguous)
            self.rtt.backoff_count = 0
        if largest_pn > self._largest_acked_pn:
            self._largest_acked_pn = largest_pn
            sp = self._sent.get(largest_pn)
            if sp is None:
                for a in acked:
                    if a.pn == largest_pn:
                        sp = a
                        break
            if sp is not None:
                self.rtt.on_sample(now - sp.sent_time, frame.ack_delay_us / 1e6)
                self.cc.on_rtt_measurement(rtt=self.rtt, now=now)
        if acked:
            rate = self._rate_sample(acked, now)
            self.cc.on_packets_acked(
                packets=acked,
                now=now,
                rtt=self.rtt,
                bytes_in_flight=self._bytes_in_flight,
                rate=rate,
            )
        self._detect_losses(now)
        if acked:
            self._rto_deadline = now + self.rtt.rto() if self._bytes_in_flight else None
        if not self._outstanding and not self._bytes_in_flight:
            self._rto_deadline = None
        self._maybe_finished()

    def _segment_acked(self, seg: Segment, acked: list[SentPacket]) -> None:
        sp = self._sent.pop(seg.pn, None)
        if sp is not None:
            if sp.in_flight:
                self._bytes_in_flight -= sp.size
            acked.append(sp)
        self._retx_set.discard(seg.seq)

    def _advance_una(self) -> None:
        una, nxt, out = self._snd_una, self._snd_nxt, self._outstanding
        while una < nxt and una not in out:
            una += 1
        self._snd_una = una

    def _rate_sample(self, acked: list[SentPacket], now: float) -> RateSample | None:
        newest = None
        for sp in acked:
            self._delivered += sp.size
            if newest is None or sp.sent_time > newest.sent_time:
                newest = sp
        self._delivered_time = now
        if newest is None or newest.delivered_time == 0.0 and newest.first_sent_time == 0.0:
            return None
        self._first_sent_time = newest.sent_time
        interval = max(newest.sent_time - newest.first_sent_time, now - newest.delivered_time)
        delivered = self._delivered - newest.delivered
        rate = delivered / interval if interval > 0 else 0.0
        return RateSample(
            delivery_rate=rate,
            delivered=delivered,
            interval=interval,
            rtt=now - newest.sent_time,
            is_app_limited=newest.is_app_limited,
            prior_delivered=newest.delivered,
        )

    # ------------------------------------------------------ loss recovery

    def _detect_losses(self, now: float) -> None:
        """Declare lost the in-flight packets sent long enough before a
        packet the peer has received (RFC 9002 section 6.1)."""
        largest = self._largest_acked_pn
        sent = self._sent
        if not sent or largest < 0:
            self._loss_deadline = None
            return
        delay = max(TIME_THRESHOLD * max(self.rtt.smoothed, self.rtt.latest), 0.001)
        lost_packets: list[SentPacket] = []
        lost_seqs: list[int] = []
        self._loss_deadline = None
        while sent:
            pn = next(iter(sent))
            if pn >= largest:
                break
            sp = sent[pn]
            if pn <= largest - PACKET_THRESHOLD or sp.sent_time + delay <= now:
                del sent[pn]
                if sp.seq < 0:
                    continue
                if sp.in_flight:
                    self._bytes_in_flight -= sp.size
                    lost_packets.append(sp)
                seg = self._outstanding.get(sp.seq)
                if seg is not None and seg.pn == pn:
                    lost_seqs.append(sp.seq)
            else:
                self._loss_deadline = sp.sent_time + delay
                break
        if lost_packets:
            self.stats["packets_lost"] += len(lost_packets)
            self.cc.on_packets_lost(
                packets=lost_packets, now=now, bytes_in_flight=self._bytes_in_flight
            )
        if lost_seqs:
            self._handle_lost_segments(lost_seqs, self.reliability.on_lost)

    def _handle_lost_segments(self, lost: list[int], policy) -> None:
        resend = policy(lost, self._outstanding.keys())
        if not self.reliability.reliable:
            for seq in lost:
                seg = self._outstanding.pop(seq, None)
                if seg is not None:
                    self._sent.pop(seg.pn, None)
            self._advance_una()
            return
        for seq in resend:
            if seq in self._outstanding and seq not in self._retx_set:
                self._retx_set.add(seq)
                heapq.heappush(self._retx_heap, seq)

    def _on_rto(self, now: float) -> None:
        self.stats["rto_count"] += 1
        self.rtt.on_timeout()
        self.cc.on_retransmission_timeout(now=now, bytes_in_flight=self._bytes_in_flight)
        lost = [sp.seq for sp in self._sent.values() if sp.seq >= 0]
        self.stats["packets_lost"] += sum(1 for sp in self._sent.values() if sp.in_flight)
        self._sent.clear()
        self._bytes_in_flight = 0
        self._loss_deadline = None
        outstanding = list(self._outstanding)
        if self.reliability.reliable:
            self._handle_lost_segments(
                outstanding, lambda lost, out: self.reliability.on_timeout(list(out))
            )
        else:
            self._handle_lost_segments(lost or outstanding, self.reliability.on_lost)
            for seq in outstanding:
                self._outstanding.pop(seq, None)
            self._advance_una()
        self._rto_deadline = now + self.rtt.rto() if self._outstanding else None

    # ============================================================ sending

    def datagrams_to_send(self, now: float) -> list[bytes]:
        """Everything this connection wants on the wire now."""
        out: list[bytes] = []
        state = self.state
        if state is State.TERMINATED:
            self._flush_terminal(out)
            return out
        if self._hs_pending:
            self._hs_pending = False
            self._send_handshake(out, now)
        if state is State.OFFERING or state is State.IDLE:
            return out
        if state is State.ACCEPTING:
            return out
        if (
            self._confirm_pending
            or self._ack_now
            or (self._ack_pending and self._ack_deadline is not None and now >= self._ack_deadline)
        ):
            self._send_ack(out, now)
        self._send_data(out, now)
        if self._close_requested and not self._unsent and self._close_final is None:
            self._close_final = self._snd_nxt
            self._close_due = True
        if self._close_due and not self._close_acked and self._close_final is not None:
            self._send_close(out, now)
        if self._probe_due:
            self._probe_due = False
            self._send_probe(out, now)
        return out

    def _has_sendable(self) -> bool:
        return bool(self._retx_heap) or (bool(self._unsent) and self._snd_nxt < self._send_limit())

    def _send_limit(self) -> int:
        return min(self._snd_una + self.reliability.window, self._peer_window_limit)

    def _pacing_rate(self) -> float:
        cc = self.cc
        if cc.pacing_rate is not None:
            return cc.pacing_rate
        cwnd = cc.congestion_window
        if cwnd >= 1 << 60:
            return float("inf")
        factor = 2.0 if cc.in_slow_start else 1.25
        return factor * cwnd / max(self.rtt.smoothed, 1e-4)

    def _send_data(self, out: list[bytes], now: float) -> None:
        cc = self.cc
        rate = self._pacing_rate()
        paced = rate != float("inf")
        if paced:
            burst = max(4 * self.config.max_datagram_size, rate * 0.002)
            if self._pace_time is None:
                self._pace_tokens = burst
            else:
                self._pace_tokens = min(burst, self._pace_tokens + (now - self._pace_time) * rate)
            self._pace_time = now
        self._pace_deadline = None
        budget = self.config.max_burst_packets
        max_rtx = self.reliability.params.get("max_retransmissions", 0)
        limit = self._send_limit()
        while budget > 0:
            if self._retx_heap:
                seq = heapq.heappop(self._retx_heap)
                self._retx_set.discard(seq)
                seg = self._outstanding.get(seq)
                if seg is None:
                    continue
                if seg.sends > max_rtx:
                    self._reset_out = (ErrorCode.RETRANSMISSION_LIMIT, "retransmission limit")
                    self._terminate(
                        ErrorCode.RETRANSMISSION_LIMIT,
                        f"segment {seq} resent {seg.sends - 1} times without acknowledgement",
                        by_peer=False,
                    )
                    self._flush_terminal(out)
                    return
                retransmit = True
            elif self._unsent and self._snd_nxt < limit:
                seg = None
                retransmit = False
            else:
                if self._unsent and self._snd_nxt >= self._peer_window_limit:
                    if self._persist_deadline is None and not self._outstanding:
                        self._persist_deadline = now + self.rtt.rto()
                elif not self._unsent:
                    self._app_limited_until = self._delivered + self._bytes_in_flight
                break
            size_est = (
                len(seg.payload) if seg is not None else len(self._unsent[0][0])
            ) + wire.DATA_OVERHEAD
            if self._bytes_in_flight and self._bytes_in_flight + size_est > cc.congestion_window:
                if retransmit:
                    heapq.heappush(self._retx_heap, seq)
                    self._retx_set.add(seq)
                break
            if paced and self._pace_tokens < size_est:
                if retransmit:
                    heapq.heappush(self._retx_heap, seq)
                    self._retx_set.add(seq)
                self._pace_deadline = now + (size_est - self._pace_tokens) / rate
                break
            if seg is None:
                payload, flags = self._unsent.popleft()
                payload = bytes(payload)
                self._unsent_bytes -= len(payload)
                seg = Segment(self._snd_nxt, payload, flags)
                self._outstanding[seg.seq] = seg
                self._snd_nxt += 1
            else:
                old = self._sent.pop(seg.pn, None)
                if old is not None and old.in_flight:
                    self._bytes_in_flight -= old.size
                self.stats["retransmissions"] += 1
            out.append(self._emit_segment(seg, now))
            if paced:
                self._pace_tokens -= size_est
            budget -= 1
        if budget == 0 and self._pace_deadline is None and self._has_sendable():
            # stopped by max_burst_packets, not by cwnd/pacing: ask to be called again now
            self._pace_deadline = now

    def _emit_segment(self, seg: Segment, now: float) -> bytes:
        pn = self._next_pn
        self._next_pn += 1
        seg.pn = pn
        seg.sends += 1
        datagram = wire.encode_data(
            self.peer_cid, self.local_cid, pn, seg.seq, self._snd_una, seg.payload, seg.flags
        )
        size = len(datagram)
        if not self._bytes_in_flight:
            self._first_sent_time = now
            self._delivered_time = now
        sp = SentPacket(
            pn,
            size,
            now,
            seg.seq,
            True,
            self._delivered,
            self._delivered_time,
            self._first_sent_time,
            self._delivered < self._app_limited_until,
        )
        self._sent[pn] = sp
        self._bytes_in_flight += size
        self.cc.on_packet_sent(packet=sp, now=now, bytes_in_flight=self._bytes_in_flight)
        if self._rto_deadline is None:
            self._rto_deadline = now + self.rtt.rto()
        self._count_sent(size, now)
        self.stats["data_packets_sent"] += 1
        return datagram

    def _count_sent(self, size: int, now: float) -> None:
        self.stats["packets_sent"] += 1
        self.stats["bytes_sent"] += size
        self._last_tx = now

    def _track_control(self, pn: int, size: int, now: float) -> None:
        """Remember an ack-eliciting control packet for RTT sampling."""
        self._sent[pn] = SentPacket(pn, size, now, -1, False)

    def _send_ack(self, out: list[bytes], now: float) -> None:
        flags = 0
        if self._confirm_pending:
            flags |= AckFlags.HANDSHAKE_DONE
            self._confirm_pending = False
        if self._eof_delivered:
            flags |= AckFlags.CLOSE_ACKED
        free = max(0, self.flow.window - self._unconsumed)
        self._window_limit = max(self._window_limit, self._rcv_next + free)
        self._window_sent_free = free
        delay_us = 0
        if self._largest_pn_rx_time:
            delay_us = int(max(0.0, now - self._largest_pn_rx_time) * 1e6)
        ranges = self._rcv_ranges.ranges(wire.ACK_MAX_RANGES) if self.reliability.sack else []
        frame = wire.AckFrame(
            self._rcv_next, self._window_limit, max(self._largest_pn_rx, 0), delay_us, ranges
        )
        pn = self._next_pn
        self._next_pn += 1
        datagram = wire.encode(
            PacketType.ACK, self.peer_cid, self.local_cid, pn, wire.encode_ack(frame), flags
        )
        out.append(datagram)
        self._count_sent(len(datagram), now)
        self.stats["acks_sent"] += 1
        self._ack_pending = 0
        self._ack_now = False
        self._ack_deadline = None

    def _send_close(self, out: list[bytes], now: float) -> None:
        self._close_due = False
        pn = self._next_pn
        self._next_pn += 1
        body = wire.encode_close(self._close_final, self._snd_una)
        datagram = wire.encode(PacketType.CLOSE, self.peer_cid, self.local_cid, pn, body)
        self._track_control(pn, len(datagram), now)
        out.append(datagram)
        self._count_sent(len(datagram), now)
        self._close_sent_time = now
        self._close_deadline = now + self.rtt.rto()

    def _send_probe(self, out: list[bytes], now: float) -> None:
        pn = self._next_pn
        self._next_pn += 1
        datagram = wire.encode(PacketType.PROBE, self.peer_cid, self.local_cid, pn)
        self._track_control(pn, len(datagram), now)
        out.append(datagram)
        self._count_sent(len(datagram), now)
        if self._unsent and self._snd_nxt >= self._peer_window_limit:
            self.rtt.on_timeout()  # back the persist timer off
            self._persist_deadline = now + self.rtt.rto()
        self._arm_keepalive(now)

    def _send_handshake(self, out: list[bytes], now: float) -> None:
        pn = self._next_pn
        self._next_pn += 1
        if self.is_client:
            datagram = wire.encode(PacketType.OFFER, 0, self.local_cid, pn, self._offer_fields)
        else:
            datagram = wire.encode(
                PacketType.ACCEPT,
                self.peer_cid,
                self.local_cid,
                pn,
                self._accept_fields,
                self._accept_flags,
            )
            self._track_control(pn, len(datagram), now)
        out.append(datagram)
        self._count_sent(len(datagram), now)
        self._hs_sends += 1
        timeout = max(self.rtt.base_rto(), 0.2) * (2 ** min(self._hs_sends - 1, 6))
        self._hs_deadline = now + timeout

    def _arm_keepalive(self, now: float) -> None:
        if self.config.keepalive_interval:
            self._keepalive_deadline = now + self.config.keepalive_interval

    # ========================================================= lifecycle

    def _only_close_unconfirmed(self) -> bool:
        """We delivered the peer's end of stream and it acknowledged all our
        data up to our CLOSE: all that is missing is its ACK of the CLOSE."""
        return (
            self._eof_delivered
            and self._close_final is not None
            and not self._outstanding
            and self._snd_una >= self._close_final
        )

    def _maybe_finished(self) -> None:
        if (
            self._close_acked
            and self._eof_delivered
            and not self._outstanding
            and self.state is State.ESTABLISHED
        ):
            self._terminate(ErrorCode.NO_ERROR, "closed", by_peer=False)

    def _terminate(self, code: int, reason: str, by_peer: bool, silent: bool = False) -> None:
        if self.state is State.TERMINATED:
            return
        self.state = State.TERMINATED
        if not silent and not self._terminated_event_sent:
            self._events.append(ConnectionTerminated(int(code), reason, by_peer))
        self._terminated_event_sent = True
        self._unsent.clear()
        self._retx_heap.clear()
        self._sent.clear()
        # linger to answer a peer that missed our last ACK
        self._drain_deadline = None
        for attr in (
            "_hs_deadline",
            "_rto_deadline",
            "_loss_deadline",
            "_ack_deadline",
            "_persist_deadline",
            "_close_deadline",
            "_keepalive_deadline",
            "_pace_deadline",
        ):
            setattr(self, attr, None)
        if code == 0:
            self._drain_deadline = (
                max(self._last_rx, self._last_tx) + DRAIN_RTOS * self.rtt.base_rto()
            )

    def _receive_while_draining(self, p: wire.Packet, now: float) -> None:
        if (
            p.type in (PacketType.CLOSE, PacketType.DATA, PacketType.PROBE)
            and p.scid == self.peer_cid
            and self._eof_delivered
            and self._drain_deadline is not None
        ):
            self._ack_now = True  # peer missed our final ACK (CLOSE_ACKED)
            # it is still waiting for it: linger on (TCP restarts TIME-WAIT alike)
            self._drain_deadline = now + DRAIN_RTOS * self.rtt.base_rto()
        elif p.type is PacketType.OFFER and self._refuse_out_sent is not None:
            self._refuse_out = self._refuse_out_sent

    _refuse_out_sent: tuple[int, str] | None = None

    def _flush_terminal(self, out: list[bytes]) -> None:
        pn = self._next_pn
        if self._refuse_out is not None:
            code, reason = self._refuse_out
            self._refuse_out_sent = self._refuse_out
            self._refuse_out = None
            out.append(
                wire.encode(
                    PacketType.REFUSE,
                    self.peer_cid,
                    self.local_cid,
                    pn,
                    wire.encode_error(code, reason),
                )
            )
            self._next_pn += 1
        elif self._reset_out is not None:
            code, reason = self._reset_out
            self._reset_out = None
            if self.peer_cid or self.is_client:
                out.append(
                    wire.encode(
                        PacketType.RESET,
                        self.peer_cid,
                        self.local_cid,
                        pn,
                        wire.encode_error(code, reason),
                    )
                )
                self._next_pn += 1
        elif self._ack_now and self._drain_deadline is not None and self.flow is not None:
            self._ack_now = False
            frame = wire.AckFrame(
                self._rcv_next, self._window_limit, max(self._largest_pn_rx, 0), 0, []
            )
            out.append(
                wire.encode(
                    PacketType.ACK,
                    self.peer_cid,
                    self.local_cid,
                    pn,
                    wire.encode_ack(frame),
                    AckFlags.CLOSE_ACKED,
                )
            )
            self._next_pn += 1

    # ============================================================ stats

    def snapshot(self) -> dict[str, Any]:
        """Counters and state for diagnostics (``vtl`` CLI, metrics)."""
        out: dict[str, Any] = dict(self.stats)
        out.update(
            state=self.state.value,
            composition=str(self.composition) if self.composition else None,
            srtt=self.rtt.srtt,
            min_rtt=None if self.rtt.min_rtt == float("inf") else self.rtt.min_rtt,
            rto=self.rtt.rto(),
            bytes_in_flight=self._bytes_in_flight,
            outstanding_segments=len(self._outstanding),
            unsent_bytes=self._unsent_bytes,
        )
        if self.cc is not None:
            out["cc"] = self.cc.state()
        return out


__all__ = ["Connection", "ConnectionConfig", "State", "VtlError"]
