"""Partial reliability (PR-SCTP-like, RFC 3758 semantics).

A reliability TF that ``abandons`` (``tfs/reliability/partial.py``) lets the
sender give up on data: after ``abandon_after`` retransmissions, or when its
lifetime (per connection ``lifetime_ms``, or per message, ``send(...,
lifetime=)``) has passed.  Abandoning works on whole messages with message
framing (every segment of the message goes, and what is still unsent is
dropped unsent) and on single segments (byte ranges) with stream framing.

The receiver learns it from a FORWARD packet (like FORWARD-TSN): a new
cumulative point, below which every segment is received or abandoned, and
records that name the abandoned units (message numbers, or stream byte
ranges).  FORWARD is repeated every RTO until the peer's cumulative ACK
passes the point; it is the only thing that makes a partially reliable
receiver skip (the ``una`` of DATA and CLOSE is not used for it), so each
skip comes with its description.  The application sees a
:class:`~vtl.core.events.DataAbandoned` event saying what it will never get.

A mixin of :class:`vtl.core.connection.Connection`: the engine calls the
``_pr_*`` hooks; state lives in :class:`PrSendState`.
"""

from __future__ import annotations

import heapq
from collections import deque
from dataclasses import dataclass, field

from vtl.core import wire
from vtl.core.errors import WireError
from vtl.core.events import DataAbandoned
from vtl.core.wire import DataFlags, ForwardFlags, PacketType


@dataclass(slots=True)
class _Unit:
    """One send() call: a message, or a run of stream bytes."""

    number: int  # message number (message framing) or stream byte offset
    size: int
    lifetime: float | None  # seconds from ``t0``; None: the connection's default
    t0: float
    first_seq: int | None = None
    doomed: bool = False  # abandoned while part of it was still unsent


@dataclass(slots=True)
class _SegInfo:
    deadline: float | None
    unit: _Unit | None  # message framing: the message this segment belongs to
    offset: int  # stream byte offset of the segment's first byte
    size: int


@dataclass
class PrSendState:
    """Sender-side partial-reliability state of one connection."""

    active: bool = False  # the negotiated reliability TF abandons
    decided: bool = False  # the composition is known
    messages: bool = False
    abandon_after: int = -1
    lifetime: float | None = None  # connection default (s)
    units: deque[_Unit] = field(default_factory=deque)  # not yet fully taken
    taken_bytes: int = 0  # stream bytes handed to segments so far
    next_number: int = 0  # next message number / stream offset for send()
    current: _Unit | None = None  # message whose segments are being taken
    segs: dict[int, _SegInfo] = field(default_factory=dict)
    expiry: list[tuple[float, int]] = field(default_factory=list)  # heap (deadline, seq)
    #: abandoned segments whose last transmission is still in flight: their
    #: ACK or loss still feeds congestion control
    flying: dict[int, object] = field(default_factory=dict)
    pending: list[tuple[int, int, int, int]] = field(default_factory=list)
    peer_cum: int = 0
    fwd_sent_point: int = -1
    fwd_truncated: bool = False
    fwd_pn: int = -1  # packet number of the last FORWARD
    fwd_deadline: float | None = None


class PartialMixin:
    """Sender hooks (abandon, FORWARD out) and receiver hooks (FORWARD in)."""

    # ------------------------------------------------------------ sender

    def _pr_setup(self) -> None:
        """The composition is negotiated: arm partial reliability or drop
        whatever was recorded for it."""
        pr = self._pr
        rel = self.reliability
        pr.decided = True
        pr.active = bool(getattr(rel, "abandons", False))
        pr.peer_cum = self._snd_una
        pr.messages = bool(self.framing.messages)
        if not pr.active:
            pr.units.clear()
            return
        pr.abandon_after = int(rel.params.get("abandon_after", -1))
        ms = float(rel.params.get("lifetime_ms", 0.0))
        pr.lifetime = ms / 1000.0 if ms > 0 else None

    def _pr_note_send(self, size: int, lifetime: float | None, now: float | None) -> None:
        """Record one send() call (before segmentation)."""
        pr = self._pr
        if pr.decided and not pr.active:
            return
        t0 = now if now is not None else max(self._last_rx, self._last_tx)
        framing = self.framing
        messages = framing.messages if framing is not None else self._offers_messages()
        if not messages and size == 0:
            return
        pr.units.append(_Unit(pr.next_number, size, lifetime, t0))
        pr.next_number += 1 if messages else size

    def _pr_deadline(self, unit: _Unit) -> float | None:
        life = unit.lifetime if unit.lifetime is not None else self._pr.lifetime
        return None if life is None else unit.t0 + life

    def _pr_take(self, seq: int, payload: bytes, flags: int) -> _SegInfo:
        """A segment leaves the unsent queue with sequence number ``seq``."""
        pr = self._pr
        size = len(payload)
        if pr.messages:
            if flags & DataFlags.MSG_START or pr.current is None:
                pr.current = pr.units.popleft() if pr.units else _Unit(-1, size, None, 0.0)
                pr.current.first_seq = seq
            unit = pr.current
            info = _SegInfo(self._pr_deadline(unit), unit, 0, size)
        else:
            start = pr.taken_bytes
            end = start + size
            deadline: float | None = float("-inf")
            for unit in pr.units:
                if unit.number >= end:
                    break
                d = self._pr_deadline(unit)
                deadline = None if d is None or deadline is None else max(deadline, d)
            while pr.units and pr.units[0].number + pr.units[0].size <= end:
                pr.units.popleft()
            pr.taken_bytes = end
            info = _SegInfo(None if deadline == float("-inf") else deadline, None, start, size)
        pr.segs[seq] = info
        if info.deadline is not None:
            heapq.heappush(pr.expiry, (info.deadline, seq))
        return info

    def _pr_expire(self, now: float) -> None:
        """Abandon sent data whose lifetime has passed, without waiting for
        it to be declared lost: if it still arrives before the FORWARD it is
        delivered (and not reported), else the receiver skips it."""
        heap = self._pr.expiry
        while heap and heap[0][0] <= now:
            _, seq = heapq.heappop(heap)
            if seq in self._outstanding:
                self._pr_abandon(seq)

    def _pr_skip_unsent(self, now: float) -> bool:
        """Before sending the head of the unsent queue: abandon it, unsent,
        if its lifetime has passed (or its message was abandoned).  Returns
        whether it did (the loop then looks at the next one)."""
        pr = self._pr
        entry = self._unsent[0]
        payload, flags = entry[0], entry[1]
        if pr.messages:
            if not flags & DataFlags.MSG_START and pr.current is not None and pr.current.doomed:
                self._unsent.popleft()  # rest of a message abandoned earlier (no seq)
                self._unsent_bytes -= len(payload)
                return True
            if not flags & DataFlags.MSG_START or not pr.units:
                return False
            deadline = self._pr_deadline(pr.units[0])
        else:
            deadline = None
            start, end = pr.taken_bytes, pr.taken_bytes + len(payload)
            for unit in pr.units:
                if unit.number >= end:
                    break
                d = self._pr_deadline(unit)
                if d is None:
                    return False
                deadline = d if deadline is None else max(deadline, d)
            if deadline is None or start == end:
                return False
        if deadline is None or now < deadline:
            return False
        # expired before its first transmission: it takes one sequence number
        # (so the receiver can be told) and is abandoned at once
        self._unsent.popleft()
        self._unsent_bytes -= len(payload)
        seq = self._snd_nxt
        self._snd_nxt += 1
        self._pr_take(seq, bytes(payload), flags)
        self._pr_abandon(seq, unsent=True)
        return True

    def _pr_should_abandon(self, seg, now: float) -> bool:
        """A lost segment is about to be resent: give up on it instead?"""
        pr = self._pr
        if pr.abandon_after >= 0 and seg.sends > pr.abandon_after:
            return True
        info = pr.segs.get(seg.seq)
        return info is not None and info.deadline is not None and now >= info.deadline

    def _pr_abandon(self, seq: int, unsent: bool = False) -> None:
        """Give up on ``seq`` (and, with messages, the rest of its message)."""
        pr = self._pr
        info = pr.segs.get(seq)
        if pr.messages and info is not None and info.unit is not None:
            unit = info.unit
            first = unit.first_seq if unit.first_seq is not None else seq
            if unit is pr.current and self._unsent and not self._unsent[0][1] & DataFlags.MSG_START:
                unit.doomed = True  # its unsent rest is dropped when reached
            end = first
            while end < self._snd_nxt:
                other = pr.segs.get(end)
                if other is not None and other.unit is not unit:
                    break
                end += 1
            seqs = list(range(first, end))
            record = (first, max(end, seq + 1), unit.number, unit.size)
            self.stats["messages_abandoned"] += 1
            self.stats["bytes_abandoned"] += unit.size
        else:
            seqs = [seq]
            size = info.size if info is not None else 0
            record = (seq, seq + 1, info.offset if info is not None else 0, size)
            self.stats["bytes_abandoned"] += size
        for s in seqs:
            seg = self._outstanding.pop(s, None)
            if seg is None:
                continue
            self.stats["segments_abandoned_tx"] += 1
            if seg.pn in self._sent:
                pr.flying[s] = seg  # congestion control still learns its fate
            self._retx_set.discard(s)
        if unsent:
            self.stats["segments_abandoned_tx"] += 1
        pr.pending.append(record)
        pr.pending.sort()
        self._advance_una()
        if not self._outstanding:
            self._rto_deadline = None
            self._tlp_deadline = None

    def _pr_on_ack(self, cum: int, sack: list[tuple[int, int]], acked: list) -> None:
        """The peer acknowledged everything below ``cum`` and the ``sack``
        ranges: abandoned segments among them count as delivered for
        congestion control (added to ``acked``)."""
        pr = self._pr
        if pr.flying:
            for s, seg in list(pr.flying.items()):
                if seg.pn not in self._sent:  # declared lost, or RTO
                    del pr.flying[s]
                elif s < cum or any(a <= s < b for a, b in sack):
                    del pr.flying[s]
                    self._segment_acked(seg, acked)
        if cum > pr.peer_cum:
            pr.peer_cum = cum
        if pr.pending:
            pr.pending = [r for r in pr.pending if r[1] > pr.peer_cum]
            if not pr.pending:
                pr.fwd_deadline = None
        segs = pr.segs
        una = self._snd_una
        while segs:
            s = next(iter(segs))
            if s >= una:
                break
            del segs[s]

    def _pr_forward_due(self, now: float) -> bool:
        pr = self._pr
        if not pr.pending or self._snd_una <= pr.peer_cum:
            return False
        if self._snd_una > pr.fwd_sent_point and (
            not pr.fwd_truncated or pr.peer_cum >= pr.fwd_sent_point
        ):
            return True
        if pr.fwd_pn >= 0 and pr.fwd_pn not in self._sent and pr.peer_cum < pr.fwd_sent_point:
            return True  # loss detection gave the last FORWARD up: resend it now
        return pr.fwd_deadline is not None and now >= pr.fwd_deadline

    def _send_forward(self, out: list[bytes], now: float) -> None:
        """FORWARD: new cumulative point and the abandoned units below it."""
        pr = self._pr
        room = (self._max_payload + wire.DATA_PREFIX.size - wire.FORWARD_FIXED.size) // (
            wire.FORWARD_RECORD.size
        )
        point = self._snd_una
        records = []
        for rec in pr.pending:
            if rec[1] > point:
                break
            if len(records) == room:
                point = rec[0]  # the next FORWARD carries the rest
                break
            records.append(rec)
        pn = self._next_pn
        self._next_pn += 1
        flags = ForwardFlags.MESSAGES if pr.messages else 0
        body = wire.encode_forward(point, records)
        datagram = self._pr_encode(PacketType.FORWARD, pn, body, flags)
        self._track_control(pn, len(datagram), now)
        pr.fwd_pn = pn
        out.append(datagram)
        self._count_sent(len(datagram), now)
        self.stats["forwards_sent"] += 1
        pr.fwd_sent_point = point
        pr.fwd_truncated = point < self._snd_una
        pr.fwd_deadline = now + self.rtt.rto()

    def _pr_encode(self, ptype: int, pn: int, body: bytes, flags: int) -> bytes:
        return wire.encode(ptype, self.peer_cid, self.local_cid, pn, body, flags)

    def _pr_timer(self) -> float | None:
        pr = self._pr
        due = pr.expiry[0][0] if pr.expiry else None
        if pr.pending and self._snd_una > pr.peer_cum and pr.fwd_deadline is not None:
            due = pr.fwd_deadline if due is None else min(due, pr.fwd_deadline)
        return due

    # ---------------------------------------------------------- receiver

    def _on_forward(self, p: wire.Packet) -> bool:
        """Process a FORWARD; return whether it moved anything."""
        if not getattr(self.reliability, "abandons", False):
            raise WireError("FORWARD on a connection without partial reliability")
        tcum, trecs = wire.decode_forward(p.body)
        rcv_next = self._rcv_next
        cum = wire.expand(tcum, rcv_next)
        if cum > self._window_limit or (self._peer_final is not None and cum > self._peer_final):
            raise WireError("FORWARD point beyond our advertised window")
        records = []
        floor = None
        for ts, te, ident, size in trecs:
            start, end = wire.expand(ts, rcv_next), wire.expand(te, rcv_next)
            if end <= start or end > cum or (floor is not None and start < floor):
                raise WireError("malformed FORWARD record")
            floor = end
            records.append((start, end, ident, size))
        messages = bool(p.flags & ForwardFlags.MESSAGES)
        if messages != bool(self.framing.messages):
            raise WireError("FORWARD records do not match the framing")
        self._ack_now = True
        lost_msgs: list[int] = []
        ranges: list[tuple[int, int]] = []
        nbytes = 0
        mark = self._pr_rx_mark
        for start, end, ident, size in records:
            if ident < mark:
                continue  # reported by an earlier FORWARD
            mark = ident + 1 if messages else ident + size
            lo = max(start, rcv_next)
            if lo >= end or self._rcv_ranges.covers(lo, end):
                continue  # we have all of it: it is (or will be) delivered
            nbytes += size
            if messages:
                lost_msgs.append(ident)
            else:
                ranges.append((ident, size))
        self._pr_rx_mark = mark
        missing = self._skip_to(cum, report=False) if cum > rcv_next else 0
        if missing or lost_msgs or ranges:
            self.stats["messages_abandoned_rx"] += len(lost_msgs)
            self.stats["bytes_abandoned_rx"] += nbytes
            self._events.append(DataAbandoned(missing, nbytes, tuple(lost_msgs), tuple(ranges)))
        self._check_eof()
        return cum > rcv_next

    _pr_rx_mark = 0
