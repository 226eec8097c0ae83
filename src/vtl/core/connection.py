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
pacer and the handshake / close state machine, split by job into mixins:
``handshake.py`` (negotiation), ``sender.py`` (transmission, windows,
pacing), ``recovery.py`` (ACKs, loss detection, RTO) and ``receiver.py``
(reassembly, ordering, flow control, ACK generation); this module holds
the state, the public API, timers, dispatch and the close/reset lifecycle.
"""

from __future__ import annotations

import secrets
from collections import OrderedDict, deque
from typing import Any

from vtl.core import isolation, wire
from vtl.core.composition import Composition
from vtl.core.config import ConnectionConfig
from vtl.core.coverage import CoverageMixin
from vtl.core.errors import (
    CompositionError,
    ConnectionStateError,
    ErrorCode,
    VtlError,
    WireError,
)
from vtl.core.events import (
    ConnectionTerminated,
    DataReceived,
    Event,
)
from vtl.core.fec import FecMixin
from vtl.core.handshake import HandshakeMixin
from vtl.core.partial import PartialMixin, PrSendState
from vtl.core.ranges import RangeSet
from vtl.core.receiver import ReceiverMixin
from vtl.core.reconfig import ReconfigMixin, ReconfigState
from vtl.core.records import (
    _ESTABLISHED_TYPES,
    DRAIN_RTOS,
    MAX_PN_GAP,
    U32,
    Segment,
    SentPacket,
    State,
    _Chunks,
    _new_cid,
)
from vtl.core.recovery import RecoveryMixin
from vtl.core.registry import Registry, default_registry
from vtl.core.rtt import RttEstimator
from vtl.core.secure_handshake import ConnectionSecurity
from vtl.core.sender import SenderMixin
from vtl.core.wire import AckFlags, DataFlags, HsField, PacketType
from vtl.tfs.congestion.base import CongestionControl


class Connection(
    HandshakeMixin,
    ReceiverMixin,
    RecoveryMixin,
    SenderMixin,
    FecMixin,
    ReconfigMixin,
    PartialMixin,
    CoverageMixin,
):
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
            "tail_loss_probes": 0,
            "acks_sent": 0,
            "acks_received": 0,
            "duplicate_segments": 0,
            "out_of_window_drops": 0,
            "dropped_invalid": 0,
            "invalid_ack_echo": 0,
            "segments_abandoned": 0,
            "segments_abandoned_tx": 0,  # partial reliability: sender gave up
            "messages_abandoned": 0,
            "bytes_abandoned": 0,
            "forwards_sent": 0,
            "messages_abandoned_rx": 0,  # ... and what the peer told us
            "bytes_abandoned_rx": 0,
            "app_bytes_sent": 0,
            "app_bytes_delivered": 0,
            "tf_failures": 0,
            "reconfigurations": 0,
            "reconfigurations_refused": 0,
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
        self._rto_sent: dict[int, float] = {}  # send times of packets dropped by the last RTO
        self._bytes_in_flight = 0
        self._next_pn = 0
        self._largest_acked_pn = -1
        self._peer_window_limit = isn  # until the peer tells us its window
        self._sacked = RangeSet()
        self._rto_deadline: float | None = None
        self._loss_deadline: float | None = None
        self._tlp_deadline: float | None = None  # tail loss probe (RFC 8985 / 9002 PTO)
        self._tlp_count = 0  # probes sent since the last ACK of new data
        self._tlp_pending = False  # the next segment may pass cwnd and pacer
        self._last_data_sent = 0.0
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
        # ---- live reconfiguration (reconfig.py)
        self._reconf = ReconfigState()
        self._reconf_deadline: float | None = None
        self._flow_window_bound = 0  # ACK windows up to this are valid too
        self.peer_inventory: dict[str, dict[str, list[str]]] = {}  # from the handshake
        self._pr = PrSendState()  # partial reliability (core/partial.py)
        self._sec = ConnectionSecurity(self)  # keys and hooks of security=aead

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
        fields.update(self._sec.offer_fields(self.offers))
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
    def is_draining(self) -> bool:
        """Closed cleanly but still answering a peer that may have missed the
        final ACK (TCP's TIME-WAIT); the socket should outlive this."""
        return self.state is State.TERMINATED and self._drain_deadline is not None

    @property
    def peer_identity(self) -> bytes | None:
        """The peer's authenticated Ed25519 public key (``security=aead``)."""
        return self._sec.peer_identity

    @property
    def send_buffer_bytes(self) -> int:
        """Bytes accepted by send() and not yet acknowledged (for backpressure)."""
        return self._unsent_bytes + len(self._outstanding) * self._max_payload

    @property
    def max_message_size(self) -> int:
        if self.framing is not None and self.framing.messages:
            return self.framing.params["max_message_size"]
        return 1 << 30

    def send(self, data: bytes, *, lifetime: float | None = None, now: float | None = None) -> None:
        """Queue application data: stream bytes, or one whole message with
        message framing.  Allowed before the handshake completes.
        ``lifetime`` (s, from ``now``) lets a partially reliable composition
        abandon the data once it has passed (other compositions ignore it)."""
        if lifetime is not None and not lifetime > 0:
            raise ConnectionStateError(f"lifetime must be > 0 seconds, got {lifetime!r}")
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
        self._pr_note_send(len(data), lifetime, now)
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
        try:
            return self._next_timer()
        except Exception as exc:  # a TF property raised: fail this connection only
            self._tf_failed(exc, "timer")
            return self._last_rx  # due now: the owner runs timers and sends the RESET

    def _next_timer(self) -> float | None:
        if self.state is State.TERMINATED:
            return self._drain_deadline
        cands = [
            self._hs_deadline,
            self._rto_deadline,
            self._loss_deadline,
            self._tlp_deadline,
            self._ack_deadline if self._ack_pending else None,
            self._persist_deadline,
            self._close_deadline,
            self._keepalive_deadline,
            self._fec_deadline,
            self._reconf_deadline,
            self._pr_timer(),
        ]
        if self._pace_deadline is not None and self._has_sendable():
            cands.append(self._pace_deadline)
        if self.state is not State.IDLE:
            cands.append(self._last_rx + self._idle_timeout())
        times = [t for t in cands if t is not None]
        return min(times) if times else None

    def handle_timer(self, now: float) -> None:
        """Run every timer that is due at ``now``."""
        try:
            self._handle_timer(now)
        except Exception as exc:  # a raising TF fails this connection only
            self._tf_failed(exc, "timer")

    def _handle_timer(self, now: float) -> None:
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
        if self._tlp_deadline is not None and now >= self._tlp_deadline:
            self._tlp_deadline = None
            self._on_tail_loss_probe(now)
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
        if self._reconf_deadline is not None and now >= self._reconf_deadline:
            self._reconf_on_timer(now)

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
        self.receive_packet(packet, len(datagram), now, datagram)

    def receive_packet(
        self, packet: wire.Packet, size: int, now: float, datagram: bytes | None = None
    ) -> None:
        """Process an already decoded packet (the endpoint decodes once;
        ``datagram``, its raw bytes, lets protection authenticate the header
        exactly as received)."""
        if self._sec.protection is not None and not self._sec.open(packet, datagram):
            return
        try:
            self._receive(packet, size, now)
        except WireError:
            self.stats["dropped_invalid"] += 1
        except CompositionError as exc:  # a bad offer or accept
            self.stats["dropped_invalid"] += 1
            if self.state is State.OFFERING:
                self._reset_out = (ErrorCode.PROTOCOL_VIOLATION, str(exc))
                self._handshake_failed(ErrorCode.PROTOCOL_VIOLATION, str(exc))
        except Exception as exc:  # a raising TF fails this connection only
            self._tf_failed(exc, "receive")

    def _receive(self, p: wire.Packet, size: int, now: float) -> None:
        if p.options:
            self._check_coverage(p)  # partial checksum coverage only where agreed
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
        if t not in _ESTABLISHED_TYPES or (
            t is PacketType.RECONFIGURE and state is State.ACCEPTING
        ):  # handshake types; a RECONFIGURE is repeated until we are established
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
        if self._fec_loss is not None:
            self._fec_loss.observe(pn)  # FEC: the peer's loss rate, for our ACKs
        if t is PacketType.DATA:
            fresh = self._on_data(p, now)
            self._note_ack_eliciting(pn, now, fresh)
        elif t is PacketType.ACK:
            self._on_ack(p, now)
        elif t is PacketType.CLOSE:
            fresh = self._on_close(p)
            self._note_ack_eliciting(pn, now, fresh)
        elif t is PacketType.REPAIR:
            self._on_repair(p, pn, now)
        elif t is PacketType.RECONFIGURE:
            self._on_reconfigure(p, now)
        elif t is PacketType.FORWARD:
            fresh = self._on_forward(p)
            self._note_ack_eliciting(pn, now, fresh)
        else:  # PROBE
            self._note_ack_eliciting(pn, now, True)
            self._ack_now = True
        self._reconf_on_packet(now, t is PacketType.DATA)
        # only a packet that passed every check moves the expansion base
        self._largest_pn_seen = max(self._largest_pn_seen, pn)

    @property
    def largest_pn_received(self) -> int:
        """Largest packet number received from the peer in a valid packet
        (the endpoint follows a peer to a new address only on a new one)."""
        return self._largest_pn_seen

    def _expand_pn_rx(self, truncated: int) -> int:
        return wire.expand(truncated, self._largest_pn_seen + 1)

    # ------------------------------------------------------- handshake

    # ------------------------------------------------------------ data in

    # ------------------------------------------------------------ acks in

    # ------------------------------------------------------ loss recovery

    # ============================================================ sending

    def datagrams_to_send(self, now: float) -> list[bytes]:
        """Everything this connection wants on the wire now (protected by
        the security TF once it has keys)."""
        try:
            out = self._datagrams_to_send(now)
        except Exception as exc:  # a raising TF fails this connection only
            self._tf_failed(exc, "send")
            out = []
            self._flush_terminal(out)  # the RESET telling the peer why
        if self._sec.protection is not None and out:
            out = self._sec.seal(out)
        return out

    def _datagrams_to_send(self, now: float) -> list[bytes]:
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
        if self._reconf.outbox:
            self._send_reconfigure(out, now)
        if self._pr.expiry:
            self._pr_expire(now)
        self._send_data(out, now)
        if self.fec_tx is not None:
            self._fec_flush(out, now)
        if self._pr.pending and self._pr_forward_due(now):
            self._send_forward(out, now)
        if self._close_requested and not self._unsent and self._close_final is None:
            self._close_final = self._snd_nxt
            self._close_due = True
        if self._close_due and not self._close_acked and self._close_final is not None:
            self._send_close(out, now)
        if self._probe_due:
            self._probe_due = False
            self._send_probe(out, now)
        return out

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

    def _arm_keepalive(self, now: float) -> None:
        if self.config.keepalive_interval:
            self._keepalive_deadline = now + self.config.keepalive_interval

    # ========================================================= lifecycle

    def _tf_failed(self, exc: Exception, where: str) -> None:
        """Isolate a TF that raised: RESET the peer with TF_FAILURE and end
        this connection.  An exception raised by no TF is an engine bug and
        propagates unchanged."""
        found = isolation.culprit(exc)
        if found is None:
            raise exc
        reason = isolation.describe(exc, *found, where)
        self.stats["tf_failures"] += 1
        self.tf_failure = reason
        if self.state is State.TERMINATED:
            return
        if self.state in (State.OFFERING, State.ACCEPTING):
            self._reset_out = (ErrorCode.TF_FAILURE, reason)
            self._handshake_failed(ErrorCode.TF_FAILURE, reason)
        else:
            self.abort(ErrorCode.TF_FAILURE, reason)

    #: why a TF failed this connection (None: it did not)
    tf_failure: str | None = None

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
            "_tlp_deadline",
            "_ack_deadline",
            "_persist_deadline",
            "_close_deadline",
            "_keepalive_deadline",
            "_pace_deadline",
            "_reconf_deadline",
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
            reconfig=list(self._reconf.history),
        )
        if self.cc is not None:
            out["cc"] = self.cc.state()
        return out


__all__ = ["Connection", "ConnectionConfig", "State", "VtlError"]
