"""Sending side, transmission: segmenting queued data into DATA packets
within the reliability window, the peer's flow-control window, the
congestion window and the pacer.

A mixin of :class:`vtl.core.connection.Connection`: it works on the
connection's state, declared in ``Connection.__init__``."""

from __future__ import annotations

import heapq

from vtl.core import wire
from vtl.core.coverage import encode_data_covered
from vtl.core.errors import ErrorCode
from vtl.core.records import Segment, SentPacket


class SenderMixin:
    """Sends queued data within the windows and the pacer."""

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
                if self._pr.active and self._pr_should_abandon(seg, now):
                    self._pr_abandon(seq)
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
                if self._pr.active and self._pr_skip_unsent(now):
                    continue
                seg = None
                retransmit = False
            else:
                if self._unsent and self._snd_nxt >= self._peer_window_limit:
                    if self._persist_deadline is None and not self._outstanding:
                        self._persist_deadline = now + self.rtt.rto()
                elif not self._unsent:
                    # +1: with nothing in flight the next packet is app-limited
                    # too (the draft's "C.app_limited = delivered + inflight ?: 1")
                    self._app_limited_until = self._delivered + self._bytes_in_flight + 1
                break
            size_est = (
                len(seg.payload) if seg is not None else len(self._unsent[0][0])
            ) + wire.DATA_OVERHEAD
            probe = self._tlp_pending
            if (
                not probe
                and self._bytes_in_flight
                and self._bytes_in_flight + size_est > cc.congestion_window
            ):
                if retransmit:
                    heapq.heappush(self._retx_heap, seq)
                    self._retx_set.add(seq)
                break
            if paced and not probe and self._pace_tokens < size_est:
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
                if self._pr.active:
                    self._pr_take(seg.seq, payload, flags)
                self._outstanding[seg.seq] = seg
                self._snd_nxt += 1
            else:
                old = self._sent.pop(seg.pn, None)
                if old is not None and old.in_flight:
                    self._bytes_in_flight -= old.size
                self.stats["retransmissions"] += 1
            out.append(self._emit_segment(seg, now))
            if self.fec_tx is not None:
                self._fec_on_emit(seg, retransmit, out, now)
            self._tlp_pending = False
            if paced:
                self._pace_tokens -= size_est
            budget -= 1
        self._tlp_pending = False  # a probe is one packet, sent now or not at all
        if budget == 0 and self._pace_deadline is None and self._has_sendable():
            # stopped by max_burst_packets, not by cwnd/pacing: ask to be called again now
            self._pace_deadline = now

    def _emit_segment(self, seg: Segment, now: float) -> bytes:
        pn = self._next_pn
        self._next_pn += 1
        seg.pn = pn
        seg.sends += 1
        if self._coverage is None:
            datagram = wire.encode_data(
                self.peer_cid, self.local_cid, pn, seg.seq, self._snd_una, seg.payload, seg.flags
            )
        else:  # partial checksum coverage (core/coverage.py)
            datagram = encode_data_covered(
                self.peer_cid,
                self.local_cid,
                pn,
                seg.seq,
                self._snd_una,
                seg.payload,
                seg.flags,
                self._coverage,
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
        self._last_data_sent = now
        self._arm_tail_loss_probe()
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
