"""Receiving side: DATA in, reassembly, ordering, message framing,
abandoned gaps (the sender's UNA), flow-control window, EOF, and the ACKs
that report all of it.

A mixin of :class:`vtl.core.connection.Connection`: it works on the
connection's state, declared in ``Connection.__init__``."""

from __future__ import annotations

from vtl.core import wire
from vtl.core.errors import WireError
from vtl.core.events import DataAbandoned, MessageReceived, PeerClosed
from vtl.core.records import State, _Chunks
from vtl.core.wire import AckFlags, DataFlags, PacketType


class ReceiverMixin:
    """Turns DATA and CLOSE into application events and ACKs."""

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

    def _on_data(self, p: wire.Packet, now: float) -> bool:
        """Process a DATA packet; return whether it was new (not a duplicate
        and inside the window)."""
        tseq, tuna, payload = wire.decode_data(p.body)
        rcv_next = self._rcv_next
        seq = wire.expand(tseq, rcv_next)
        una = wire.expand(tuna, rcv_next)
        if len(payload) > self._max_payload + self._rx_payload_slack:
            raise WireError("segment larger than negotiated")
        if una > rcv_next and self._check_una(una):
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
        if self.fec_rx is not None:
            self._fec_note(seq, flags, payload)
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

    def _check_una(self, una: int) -> bool:
        """The sender says it abandoned everything below ``una`` (> rcv_next):
        return whether to skip there (partial reliability skips on FORWARD)."""
        if getattr(self.reliability, "abandons", False):
            return False  # FORWARD, which also says what was abandoned, skips
        if self.reliability.reliable:
            # a reliable sender's UNA never passes what we acknowledged
            raise WireError("reliable sender's UNA skips data we never received")
        if una > self._window_limit or (self._peer_final is not None and una > self._peer_final):
            raise WireError("sender UNA beyond our advertised window")
        return True

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

    def _skip_to(self, una: int, report: bool = True) -> int:
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
            if report:
                self._events.append(DataAbandoned(missing))
        return missing

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
        if una > rcv_next and self._check_una(una):
            self._skip_to(una)
        fresh = self._peer_final is None
        self._peer_final = final
        self._ack_now = True
        self._check_eof()
        return fresh

    def _sack_ranges(self) -> list[tuple[int, int]]:
        """The SACK ranges of one ACK.  With more ranges than fit, report the
        lowest few (the oldest holes) and the highest ones, like TCP's
        most-recent-first SACK blocks: the sender keeps what it learnt
        before, and if only the lowest ranges were sent, it would not hear
        of the newest deliveries until the holes below were filled (its
        flight, and its delivery-rate samples, then jump all at once)."""
        limit = wire.ACK_MAX_RANGES
        ranges = self._rcv_ranges.ranges()
        if len(ranges) <= limit:
            return ranges
        low = limit // 4
        return ranges[:low] + ranges[len(ranges) - (limit - low) :]

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
        ranges = self._sack_ranges() if self.reliability.sack else []
        frame = wire.AckFrame(
            self._rcv_next, self._window_limit, max(self._largest_pn_rx, 0), delay_us, ranges
        )
        pn = self._next_pn
        self._next_pn += 1
        datagram = wire.encode(
            PacketType.ACK,
            self.peer_cid,
            self.local_cid,
            pn,
            wire.encode_ack(frame),
            flags,
            self._fec_ack_options() if self.fec is not None else None,
        )
        out.append(datagram)
        self._count_sent(len(datagram), now)
        self.stats["acks_sent"] += 1
        self._ack_pending = 0
        self._ack_now = False
        self._ack_deadline = None
