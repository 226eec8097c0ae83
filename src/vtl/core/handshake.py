"""Handshake and negotiation: OFFER / ACCEPT / REFUSE.

The initiator offers compositions (preferred first) and its TF inventory;
the responder takes the first offer it can instantiate and finds
acceptable, or counter-offers one of its own that the initiator's
inventory can run, or refuses with a reason.  The outcome instantiates
the connection's TFs.

A mixin of :class:`vtl.core.connection.Connection`: it works on the
connection's state, declared in ``Connection.__init__``."""

from __future__ import annotations

from vtl.core import negotiation, wire
from vtl.core.composition import Composition
from vtl.core.errors import CompositionError, ConnectionStateError, ErrorCode, WireError
from vtl.core.events import HandshakeCompleted, HandshakeFailed
from vtl.core.records import U32, State
from vtl.core.wire import DataFlags, HsField, PacketType


class HandshakeMixin:
    """Negotiates the composition and instantiates its TFs."""

    def accept_offer(self, packet: wire.Packet, now: float) -> None:
        """Responder: process the OFFER that created this connection and
        prepare an ACCEPT (possibly a counter-offer) or a REFUSE."""
        if self.is_client or self.state is not State.IDLE:
            raise ConnectionStateError("accept_offer() is for a new responding connection")
        if packet.options:
            self._check_coverage(packet)  # an OFFER is always fully covered
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
        self.peer_inventory = inventory  # for live reconfiguration
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
            comp, why = negotiation.pin_versions(comp, self.registry, inventory)
            if comp is not None:
                why = self._sec.cannot_take(comp, fields)
            if comp is None or why is not None:
                reasons.append(f"offer {i}: {why}")
                continue
            chosen, index = comp, i
            break
        if chosen is None:
            for comp in self.config.counter_offers:
                if not comp.satisfiable_by(inventory) and not self._sec.cannot_take(comp, fields):
                    chosen = negotiation.pin_versions(comp, self.registry, inventory)[0]
                    if chosen is not None:
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
        self._accept_fields = self._sec.finish_accept(
            chosen, packet, wire.encode_fields(fields_out)
        )
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
        if not counter and (
            index >= len(self.offers) or not negotiation.matches_offer(comp, self.offers[index])
        ):
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
        failure = self._sec.verify_accept(comp, p, fields)
        if failure is not None:
            self._reset_out = failure
            self._handshake_failed(*failure)
            return
        peer_isn = wire.field_int(fields, HsField.INITIAL_SEQ, 4)
        peer_mds = self._peer_max_datagram(fields)
        window = wire.field_int(fields, HsField.WINDOW, 4)
        try:  # informational here: only live reconfiguration uses it (and checks it)
            self.peer_inventory = wire.field_json(fields, HsField.INVENTORY, default={})
        except WireError:
            self.peer_inventory = {}
        self._largest_pn_rx = self._largest_pn_seen = self._expand_pn_rx(p.pn)
        self._largest_pn_rx_time = now
        # With the OFFER resent the sample is ambiguous: time it from the last
        # OFFER (only OFFERs leave before this point), which can only
        # underestimate; the first data ACKs correct it.  No sample at all
        # would leave the initial 100 ms guess, and on a path with a longer
        # RTT every data flight would then time out spuriously.
        self.rtt.on_sample(now - (self._hs_started if self._hs_sends == 1 else self._last_tx))
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
        security = tfs.get("security")
        if security is not None:
            self._max_payload -= security.overhead  # the AEAD tag
        self._setup_integrity(tfs.get("integrity"))
        self._fec_adopt(tfs.get("fec"))
        self._reframe_unsent(old_max_payload)
        self._pr_setup()

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
