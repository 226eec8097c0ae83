"""Forward error correction in the engine: per-connection block state and
the hooks the sender, receiver and ACK processing call.

* :class:`BlockEncoder` (sender) groups the DATA packets sent for the first
  time into blocks of consecutive sequence numbers and turns each block into
  REPAIR packets with the negotiated ``fec`` TF.  A block closes when it
  holds ``k`` packets, or when the application has nothing more to send
  (after ``flush_delay``), so a small request is protected at once instead
  of waiting for k packets: FEC is there to save the round trip.
* :class:`BlockDecoder` (receiver) keeps the recent DATA symbols and the
  repair symbols of open blocks, rebuilds missing DATA packets as soon as
  enough symbols are in, and hands them to the normal receive path, so they
  are SACKed like any arrival and the sender does not resend them.
* :class:`LossMeter` (receiver) measures the peer's packet loss from gaps
  in its packet numbers; ACKs carry it (option ``FEC_LOSS``) so an adaptive
  sender sizes its redundancy to the loss the path really has, which the
  sender cannot see itself once FEC hides most of it.

REPAIR packets are tracked in flight (they use capacity, so they count
against the congestion window) but never reported to congestion control
as lost: they leave the flight once the peer acknowledges a packet sent
after them or every DATA packet of their block is acknowledged.  They are
not ack-eliciting unless they rebuilt something.

Replaceable state: the encoder and decoder are created from the TF by
:meth:`FecMixin._fec_install`, which a reconfiguration may call again at
a sequence boundary (between blocks): it flushes the open block, and the
new decoder starts empty (a block half-received under the old code is
then repaired by retransmission, nothing is lost).
"""

from __future__ import annotations

import struct
from collections import deque
from dataclasses import dataclass, field

from vtl.core import wire
from vtl.core.errors import WireError
from vtl.core.records import SentPacket
from vtl.core.wire import OptionType, PacketType, RepairFrame
from vtl.tfs.fec.base import MAX_BLOCK, SYMBOL_PREFIX, Fec

_PREFIX = struct.Struct("!HB")  # payload length, DATA flags
_LOSS = struct.Struct("!H")
MAX_OPEN_BLOCKS = 1024  # a receiver keeps at most this many incomplete blocks

FEC_STATS = (
    "fec_blocks",
    "fec_repair_sent",
    "fec_repair_received",
    "fec_recovered",
    "fec_unrecoverable_blocks",
    "fec_repair_useless",
)


def source_symbol(flags: int, payload: bytes) -> bytes:
    return _PREFIX.pack(len(payload), flags) + payload


class BlockEncoder:
    """Sender side: the open block and the redundancy to give it."""

    def __init__(self, fec: Fec, max_symbol: int) -> None:
        self.fec = fec
        self.max_symbol = max_symbol  # the longest symbol a REPAIR can carry
        self.first = 0
        self.symbols: list[bytes] = []
        self.k = fec.block_for(None)
        self.last_add = 0.0
        self.started = 0.0
        self.loss: float | None = None  # the peer's report, for adaptive codes

    def add(self, seq: int, flags: int, payload: bytes, now: float) -> list[RepairFrame]:
        """A DATA packet went out for the first time; return the REPAIR
        frames of any block this closes."""
        sym = source_symbol(flags, payload)
        out: list[RepairFrame] = []
        if self.symbols and seq != self.first + len(self.symbols):
            out = self.flush()  # not contiguous (cannot happen today): close it
        if len(sym) > self.max_symbol:
            return out + self.flush()  # queued before FEC reserved room: unprotected
        if not self.symbols:
            self.first = seq
            self.started = now
            self.k = max(1, min(self.fec.block_for(self.loss), MAX_BLOCK))
        self.symbols.append(sym)
        self.last_add = now
        if len(self.symbols) >= self.k:
            out += self.flush()
        return out

    def flush(self) -> list[RepairFrame]:
        """Close the open block and return its repair frames."""
        symbols, self.symbols = self.symbols, []
        n = len(symbols)
        if not n:
            return []
        m = min(self.fec.repairs(n, self.loss), 256 - n, MAX_BLOCK)
        if m <= 0:
            return []
        size = max(len(s) for s in symbols)
        padded = [s.ljust(size, b"\0") for s in symbols]
        scheme = self.fec.SCHEME
        return [
            RepairFrame(self.first, n, m, i, scheme, bytes(sym))
            for i, sym in enumerate(self.fec.encode(padded, m))
        ]


@dataclass(slots=True)
class _Block:
    n: int
    m: int
    size: int
    repairs: dict[int, bytes] = field(default_factory=dict)
    short: bool = False  # was once too short of symbols to rebuild


class BlockDecoder:
    """Receiver side: recent DATA symbols and the open blocks' repairs."""

    def __init__(self, fec: Fec, max_symbol: int) -> None:
        self.fec = fec
        self.max_symbol = max_symbol
        self.cache: dict[int, tuple[int, bytes]] = {}  # seq -> (flags, payload)
        self.blocks: dict[int, _Block] = {}  # first seq -> block
        self._notes = 0
        self.unrecoverable = 0

    def note(self, seq: int, flags: int, payload: bytes) -> None:
        """A DATA packet arrived (or was rebuilt)."""
        self.cache[seq] = (flags, payload)

    def prune(self, rcv_next: int) -> None:
        """Forget what no block can need any more: symbols more than a block
        below the receive point, blocks entirely below it."""
        self._notes += 1
        if self._notes < 64:
            return
        self._notes = 0
        floor = rcv_next - MAX_BLOCK
        self.cache = {s: v for s, v in self.cache.items() if s >= floor}
        for first in [f for f, b in self.blocks.items() if f + b.n <= rcv_next]:
            if self.blocks.pop(first).short:
                self.unrecoverable += 1

    def on_repair(
        self, frame: RepairFrame, first: int, received, rcv_next: int, window_limit: int
    ) -> tuple[list[tuple[int, int, bytes]], bool]:
        """Take one repair symbol; return the DATA packets it lets us
        rebuild as (seq, flags, payload), and whether it was useful at all.
        ``received(seq)`` says whether a sequence number has arrived."""
        fec = self.fec
        n, m, size = frame.n, frame.m, len(frame.symbol)
        if frame.scheme != fec.SCHEME:
            raise WireError("REPAIR of another FEC scheme than negotiated")
        if fec.SCHEME == 1 and m != 1:
            raise WireError("XOR REPAIR with more than one repair per block")
        if size > self.max_symbol:
            raise WireError("REPAIR symbol longer than a DATA packet")
        if first < rcv_next - MAX_BLOCK or first + n > window_limit:
            raise WireError("REPAIR block outside the receive window")
        if first + n <= rcv_next:
            return [], False
        block = self.blocks.get(first)
        if block is None:
            if len(self.blocks) >= MAX_OPEN_BLOCKS:
                self.blocks.pop(next(iter(self.blocks)))
            block = self.blocks[first] = _Block(n, m, size)
        elif (block.n, block.m, block.size) != (n, m, size):
            raise WireError("REPAIR contradicts its block's earlier repairs")
        block.repairs[frame.index] = frame.symbol
        cache = self.cache
        missing = 0
        for seq in range(first, first + n):
            if seq not in cache:
                if received(seq):
                    return [], False  # arrived long ago and forgotten: block done
                missing += 1
        if not missing:
            del self.blocks[first]
            return [], False
        if missing > len(block.repairs):
            block.short = True
            return [], True
        have: dict[int, bytes] = {}
        for i in range(n):
            got = cache.get(first + i)
            if got is not None:
                sym = source_symbol(*got)
                if len(sym) > size:
                    raise WireError("REPAIR shorter than a DATA packet of its block")
                have[i] = sym.ljust(size, b"\0")
        rebuilt = fec.decode(n, m, have, block.repairs)
        if rebuilt is None:
            block.short = True
            return [], True
        del self.blocks[first]
        out = []
        for i, sym in sorted(rebuilt.items()):
            length, flags = _PREFIX.unpack_from(sym, 0)
            if SYMBOL_PREFIX + length > len(sym):
                raise WireError("rebuilt DATA packet longer than its symbol")
            out.append((first + i, flags, bytes(sym[SYMBOL_PREFIX : SYMBOL_PREFIX + length])))
        return out, True


class LossMeter:
    """Receiver side: the peer's packet loss rate, from packet-number gaps
    (an EWMA over windows of 64 expected packets)."""

    WINDOW = 64

    def __init__(self) -> None:
        self.largest = -1
        self.expected = 0
        self.received = 0
        self.rate: float | None = None

    def observe(self, pn: int) -> None:
        if pn > self.largest:
            self.expected += pn - self.largest if self.largest >= 0 else 1
            self.largest = pn
        self.received += 1
        if self.expected >= self.WINDOW:
            sample = max(0.0, 1.0 - self.received / self.expected)
            self.rate = sample if self.rate is None else 0.75 * self.rate + 0.25 * sample
            self.expected = self.received = 0


class FecMixin:
    """Engine hooks of FEC (a mixin of :class:`vtl.core.connection.Connection`).
    All are no-ops while the composition's fec role is ``none``."""

    fec: Fec | None = None
    fec_tx: BlockEncoder | None = None
    fec_rx: BlockDecoder | None = None
    _fec_loss: LossMeter | None = None
    _fec_flight: deque | None = None  # (pn, end seq of its block) of REPAIRs in flight
    _fec_deadline: float | None = None
    #: seq -> (pn of its first sending, last REPAIR pn of its block or None
    #: while open, when that REPAIR left)
    _fec_cover: dict | None = None
    _fec_reserved = False  # DATA payloads leave room for the symbol prefix
    _rx_payload_slack = 0  # FEC added live: accept segments cut before the switch

    # ------------------------------------------------------------ set up

    def _fec_adopt(self, tf: Fec | None) -> None:
        """At negotiation: reserve room for the symbol prefix (a REPAIR must
        fit the same datagram as the largest DATA) and create the state."""
        if tf is None or not tf.enabled:
            return
        self._max_payload -= SYMBOL_PREFIX
        self._fec_reserved = True
        self._fec_install(tf)

    def _reconf_install_fec(self, tf: Fec | None, now: float) -> None:
        """Live reconfiguration: FEC added, changed or removed. Data queued
        from now on leaves room for the symbol prefix; segments cut before
        (full-size ones) go out unprotected."""
        if tf is not None and tf.enabled and not self._fec_reserved:
            self._max_payload -= SYMBOL_PREFIX
            self._fec_reserved = True
            # the peer's full-size segments cut before its switch still arrive
            self._rx_payload_slack = SYMBOL_PREFIX
            self._fec_recut_unsent()
        self._fec_install(tf, None, now)

    def _fec_recut_unsent(self) -> None:
        """Cut queued (not yet numbered) data again to the smaller payload so
        it can be protected. A message already partly sent keeps its queued
        rest as it is (its boundaries are in flight)."""
        unsent = self._unsent
        if not unsent or all(len(p) <= self._max_payload for p, _ in unsent):
            return
        old = list(unsent)
        keep = 0
        if self.framing.messages:
            while keep < len(old) and not old[keep][1] & wire.DataFlags.MSG_START:
                keep += 1
        unsent.clear()
        unsent.extend(old[:keep])
        self._unsent_bytes = sum(len(p) for p, _ in old[:keep])
        rest = old[keep:]
        if not self.framing.messages:
            self._enqueue(b"".join(bytes(p) for p, _ in rest), False)
            return
        parts: list[bytes] = []
        for payload, flags in rest:
            if flags & wire.DataFlags.MSG_START:
                parts = []
            parts.append(bytes(payload))
            if flags & wire.DataFlags.MSG_END:
                self._enqueue(b"".join(parts), True)

    def _fec_install(self, tf: Fec | None, out: list[bytes] | None = None, now: float = 0.0):
        """Create (or replace, or with None / ``none`` remove) the FEC state.
        The open block is flushed into ``out`` if given (else left
        unprotected); REPAIRs in flight stay tracked until released."""
        if self.fec_tx is not None and out is not None:
            self._fec_emit(self.fec_tx.flush(), out, now)
        # REPAIRs in flight stay tracked (_fec_flight) until released
        if tf is None or not tf.enabled:
            self.fec = self.fec_tx = self.fec_rx = self._fec_loss = None
            self._fec_deadline = None
            return
        for key in FEC_STATS:
            self.stats.setdefault(key, 0)
        # a REPAIR fits the datagram of a full DATA packet: the symbol of a
        # DATA payload that did not leave room for the prefix is too long
        max_symbol = self._max_payload + (SYMBOL_PREFIX if self._fec_reserved else 0)
        loss = self.fec_tx.loss if self.fec_tx is not None else None
        self.fec = tf
        self.fec_tx = BlockEncoder(tf, max_symbol)
        self.fec_tx.loss = loss
        old_rx, self.fec_rx = self.fec_rx, BlockDecoder(tf, max_symbol)
        if old_rx is not None:
            self.fec_rx.unrecoverable = old_rx.unrecoverable
        self._fec_loss = self._fec_loss or LossMeter()
        if self._fec_flight is None:
            self._fec_flight = deque()
            self._fec_cover = {}
        self._fec_deadline = None

    # ------------------------------------------------------------ sender

    def _fec_on_emit(self, seg, retransmit: bool, out: list[bytes], now: float) -> None:
        """A DATA packet was just appended to ``out``."""
        if retransmit:
            return
        self._fec_cover[seg.seq] = (seg.pn, None, now)
        self._fec_emit(self.fec_tx.add(seg.seq, seg.flags, seg.payload, now), out, now)

    def _fec_flush(self, out: list[bytes], now: float) -> None:
        """After sending: protect a partial block once the application has
        nothing more to send (at once, or after ``flush_delay``)."""
        enc = self.fec_tx
        if enc is None or not enc.symbols:
            self._fec_deadline = None
            return
        if self._unsent:  # held back by cwnd / pacer / windows: bound the block's age
            due = enc.started + self._fec_max_age()
        else:  # the application has nothing more: end of a burst
            due = enc.last_add + self.fec.params.get("flush_delay", 0.0)
        if now >= due:
            self._fec_deadline = None
            self._fec_emit(enc.flush(), out, now)
        else:
            self._fec_deadline = due

    def _fec_emit(self, frames: list[RepairFrame], out: list[bytes], now: float) -> None:
        if not frames:
            return
        self.stats["fec_blocks"] += 1
        first = frames[0].first_seq
        end = first + frames[0].n
        cover = self._fec_cover
        last_pn = self._next_pn + len(frames) - 1
        for seq in range(first, end):
            got = cover.get(seq)
            if got is not None:
                cover[seq] = (got[0], last_pn, now)
        for frame in frames:
            pn = self._next_pn
            self._next_pn += 1
            datagram = wire.encode(
                PacketType.REPAIR, self.peer_cid, self.local_cid, pn, wire.encode_repair(frame)
            )
            size = len(datagram)
            sp = SentPacket(pn, size, now, -1, True)
            self._sent[pn] = sp
            self._bytes_in_flight += size
            self._fec_flight.append((pn, end))
            self.cc.on_packet_sent(packet=sp, now=now, bytes_in_flight=self._bytes_in_flight)
            self._pace_tokens -= size
            out.append(datagram)
            self._count_sent(size, now)
            self.stats["fec_repair_sent"] += 1

    def _fec_on_ack(self, p: wire.Packet) -> None:
        """An ACK came (before loss detection): take the peer's loss report
        and release the REPAIRs that are no longer in flight."""
        raw = p.options.get(OptionType.FEC_LOSS) if p.options else None
        if raw is not None and len(raw) == _LOSS.size and self.fec_tx is not None:
            self.fec_tx.loss = _LOSS.unpack(raw)[0] / 0xFFFF
        largest, una, sent = self._largest_acked_pn, self._snd_una, self._sent
        cover = self._fec_cover
        while cover:
            seq = next(iter(cover))
            if seq >= una:
                break
            del cover[seq]
        flight = self._fec_flight
        while flight and (flight[0][0] <= largest or flight[0][1] <= una):
            sp = sent.pop(flight.popleft()[0], None)
            if sp is not None and sp.in_flight:
                self._bytes_in_flight -= sp.size
                # a released REPAIR went through the path: count it as delivered,
                # else delivery-rate samples see only the data share of what was
                # paced and a model-based controller (bbr) ratchets itself down
                self._delivered += sp.size

    def _fec_hold(self, sp: SentPacket, largest: int, now: float, delay: float) -> float | None:
        """Loss detection asks whether a DATA packet past the packet
        threshold may still be rebuilt by the peer: its first sending, in a
        block whose REPAIRs are not all behind the largest acknowledged
        packet.  Held packets wait for the time threshold (9/8 RTT), by when
        an ACK that saw the REPAIRs has come; so a loss FEC repairs is
        neither resent nor taken for congestion.  Returns until when to
        hold (None: declare it lost now)."""
        got = self._fec_cover.get(sp.seq)
        if got is None or got[0] != sp.pn:
            return None
        if got[1] is None:  # its block is still open (or was dropped unprotected)
            enc = self.fec_tx
            if not enc.symbols or not enc.first <= sp.seq < enc.first + len(enc.symbols):
                return None
            until = enc.started + self._fec_max_age() + delay
        elif got[1] > largest:
            until = got[2] + delay
        else:
            return None
        return until if until > now else None

    def _fec_max_age(self) -> float:
        """How long a block may stay open while the sender is held back by
        the congestion window or the pacer: a quarter of an RTT, so the
        repairs come before loss detection would resend."""
        return 0.25 * self.rtt.smoothed

    # ---------------------------------------------------------- receiver

    def _fec_note(self, seq: int, flags: int, payload: bytes) -> None:
        """A fresh DATA packet was taken in."""
        rx = self.fec_rx
        if rx is not None:
            rx.note(seq, flags, payload)
            rx.prune(self._rcv_next)

    def _fec_ack_options(self) -> dict[int, bytes] | None:
        meter = self._fec_loss
        if meter is None or meter.rate is None:
            return None
        return {OptionType.FEC_LOSS: _LOSS.pack(min(0xFFFF, round(meter.rate * 0xFFFF)))}

    def _on_repair(self, p: wire.Packet, pn: int, now: float) -> None:
        """Rebuild what this REPAIR allows and feed it in as DATA."""
        rx = self.fec_rx
        if rx is None:
            raise WireError("REPAIR on a connection without FEC")
        frame = wire.decode_repair(p.body)
        self.stats["fec_repair_received"] += 1
        first = wire.expand(frame.first_seq, self._rcv_next)
        rebuilt, useful = rx.on_repair(
            frame,
            first,
            lambda seq: seq < self._rcv_next or seq in self._rcv_ranges,
            self._rcv_next,
            self._window_limit,
        )
        if not useful:
            self.stats["fec_repair_useless"] += 1
        fresh = False
        prefix = wire.DATA_PREFIX
        for seq, flags, payload in rebuilt:
            body = prefix.pack(seq % wire.U32, self._rcv_next % wire.U32) + payload
            packet = wire.Packet(PacketType.DATA, p.dcid, p.scid, p.pn, flags, body)
            if self._on_data(packet, now):
                self.stats["fec_recovered"] += 1
                fresh = True
        self.stats["fec_unrecoverable_blocks"] = rx.unrecoverable
        if fresh:
            # acknowledge at once: the sender must not resend what we rebuilt
            self._note_ack_eliciting(pn, now, True)
            self._ack_now = True
