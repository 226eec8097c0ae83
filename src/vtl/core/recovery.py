"""Sending side, after transmission: ACK processing, delivery-rate
samples, packet- and time-threshold loss detection (RFC 9002) and the
retransmission timeout (RFC 6298), with the reliability TF deciding what
to resend.

A mixin of :class:`vtl.core.connection.Connection`: it works on the
connection's state, declared in ``Connection.__init__``."""

from __future__ import annotations

import heapq

from vtl.core import wire
from vtl.core.errors import WireError
from vtl.core.records import (
    MAX_TAIL_LOSS_PROBES,
    PACKET_THRESHOLD,
    TIME_THRESHOLD,
    Segment,
    SentPacket,
)
from vtl.core.wire import AckFlags
from vtl.tfs.congestion.base import RateSample


class RecoveryMixin:
    """Processes ACKs, detects losses and runs the RTO."""

    def _on_ack(self, p: wire.Packet, now: float) -> None:
        frame = wire.decode_ack(p.body)
        una = self._snd_una
        cum = wire.expand(frame.cum, una)
        largest_pn = wire.expand(frame.largest_pn, self._next_pn - 1)
        if cum > self._snd_nxt:
            raise WireError("ACK for data never sent")
        limit = wire.expand(frame.window_limit, una)
        if not cum <= limit <= cum + max(self.flow.window, self._flow_window_bound):
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
        self._pr_on_ack(cum, sack, acked)
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
            sent_time = sp.sent_time if sp is not None else self._rto_sent.get(largest_pn)
            if sent_time is not None:
                self.rtt.on_sample(now - sent_time, frame.ack_delay_us / 1e6)
                self.cc.on_rtt_measurement(rtt=self.rtt, now=now)
        if self._fec_flight is not None:
            self._fec_on_ack(p)  # REPAIRs leave the flight, not as losses
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
            self._tlp_count = 0
        if not self._outstanding and not self._bytes_in_flight:
            self._rto_deadline = None
        self._arm_tail_loss_probe()
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
            due = pn <= largest - PACKET_THRESHOLD or sp.sent_time + delay <= now
            # FEC: a loss the peer may still rebuild is not declared yet
            hold = self._fec_hold(sp, largest, now, delay) if due and self.fec_tx else None
            if due and hold is None:
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
                self._loss_deadline = hold if hold is not None else sp.sent_time + delay
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
        # Keep the send times: on a path whose RTT exceeds the RTO (a long
        # RTT before the first sample) the late ACK of these packets is the
        # only RTT sample there can be; without it the RTO never grows and
        # fires every round trip.  Packet numbers are never reused, so the
        # sample is unambiguous.
        self._rto_sent = {pn: sp.sent_time for pn, sp in self._sent.items()}
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
        self._tlp_deadline = None

    # ------------------------------------------------------ tail loss probe

    def _probe_timeout(self) -> float:
        """How long after the last data packet a silent path gets probed:
        two smoothed RTTs plus the peer's ACK delay (RFC 9002 PTO)."""
        return max(2 * self.rtt.smoothed, 0.002) + self.config.max_ack_delay

    def _arm_tail_loss_probe(self) -> None:
        """Without a probe, losing the last packets of a flight (or a lone
        request) waits for the RTO, 200 ms at least; a probe 2 RTTs after the
        last send makes the peer's ACK reveal the loss instead."""
        if not self._outstanding or self._tlp_count >= MAX_TAIL_LOSS_PROBES:
            self._tlp_deadline = None
            return
        if not self.reliability.reliable:
            self._tlp_deadline = None
            return
        deadline = self._last_data_sent + self._probe_timeout()
        rto = self._rto_deadline
        self._tlp_deadline = deadline if rto is None or deadline < rto else None

    def _on_tail_loss_probe(self, now: float) -> None:
        """Resend the oldest unacknowledged segment, once, past cwnd and
        pacer; nothing is declared lost and the window is left alone."""
        if not self._outstanding:
            return
        self.stats["tail_loss_probes"] += 1
        self._tlp_count += 1
        seq = next(iter(self._outstanding))
        if seq not in self._retx_set:
            self._retx_set.add(seq)
            heapq.heappush(self._retx_heap, seq)
        self._tlp_pending = True
