"""NewReno congestion control, as specified for QUIC (RFC 9002 section 7).

VTL, like QUIC, never reuses packet numbers and its ACKs carry selective
acknowledgement information, so "fast recovery" reduces to a *recovery
period*: it starts at the ``now`` a loss is detected, and a loss of a packet
sent before that instant belongs to the same congestion event and does not
reduce the window again (RFC 9002 section 7.3.2, the equivalent of RFC 6582's
"recover" variable).  Packets sent before the recovery start do not grow the
window when they are acknowledged; the first ACK of a packet sent after it
ends the period.

* slow start: the window grows by the bytes acknowledged (RFC 9002 7.3.1);
* congestion avoidance: appropriate byte counting, one maximum datagram size
  per congestion window of bytes acknowledged (RFC 3465, RFC 9002 7.3.3);
* loss: ``ssthresh = cwnd = max(cwnd * beta, min window)`` once per
  recovery period (RFC 9002 7.3.2);
* retransmission timeout: ``ssthresh = max(flight / 2, min window)`` and
  ``cwnd = min window`` (RFC 5681 section 3.1, with the QUIC minimum window
  as loss window); ssthresh is held constant on back-to-back timeouts with no
  ACK in between.  The RTO plays the role of RFC 9002's persistent
  congestion.

The window only grows while the sender actually uses it (congestion window
validation, RFC 7661 in spirit, as Linux's ``tcp_is_cwnd_limited``): an ACK
grows it only if, within the last smoothed RTT, a packet left with the
flight at the window (in slow start: at half of it).  Otherwise an
application-limited sender would inflate the window, and the pacing rate
derived from it, without bound.

The pacing rate is left to the engine (``pacing_rate = None``).
"""

from __future__ import annotations

from typing import ClassVar

from vtl.core.rtt import RttEstimator
from vtl.tfs.base import Param
from vtl.tfs.congestion.base import CongestionControl, RateSample, SentPacketInfo, window_params


class NewReno(CongestionControl):
    """NewReno (RFC 9002 section 7): slow start, byte-counting AIMD, one cut per recovery."""

    NAME: ClassVar[str] = "newreno"
    VERSION: ClassVar[str] = "1.0"
    PARAMS: ClassVar[dict[str, Param]] = {
        "beta": Param(
            float, 0.5, "multiplicative window reduction factor on loss", min=0.1, max=0.9
        ),
        **window_params(10),
    }

    def __init__(self, params: dict | None = None, *, max_datagram_size: int = 1452) -> None:
        super().__init__(params, max_datagram_size=max_datagram_size)
        self.beta: float = self.params["beta"]
        self.initial_window = self.params["initial_window_packets"] * max_datagram_size
        self.min_window = self.params["min_window_packets"] * max_datagram_size
        self.congestion_window = self.initial_window
        self.ssthresh = None
        self.pacing_rate = None
        # ``now`` at which the current (or last) recovery period started; None
        # before the first congestion event.
        self.recovery_start_time: float | None = None
        self._ca_acked = 0  # bytes acked towards the next congestion-avoidance increase
        self._rto_backoff = False  # an RTO fired and nothing was acked since
        # (now, bytes in flight before the losses) of the last loss report, so
        # an RTO reported right after its losses still sees the flight size.
        self._last_loss: tuple[float, int] | None = None
        self._last_limited: float | None = None  # last send with the window (nearly) full

    # -- helpers ---------------------------------------------------------

    def in_recovery(self, sent_time: float) -> bool:
        """Whether a packet sent at ``sent_time`` belongs to the current
        recovery period (sent at or before its start)."""
        return self.recovery_start_time is not None and sent_time <= self.recovery_start_time

    def _enter_recovery(self, now: float) -> None:
        self.recovery_start_time = now
        self._ca_acked = 0

    def _cwnd_limited(self, now: float, rtt: RttEstimator) -> bool:
        return self._last_limited is not None and now - self._last_limited <= rtt.smoothed

    # -- hooks -------------------------------------------------------------

    def on_packet_sent(self, *, packet: SentPacketInfo, now: float, bytes_in_flight: int) -> None:
        """``bytes_in_flight`` includes ``packet``."""
        cwnd = self.congestion_window
        full = cwnd // 2 if self.in_slow_start else cwnd - self.max_datagram_size
        if bytes_in_flight >= full:
            self._last_limited = now

    def on_packets_acked(
        self,
        *,
        packets: list[SentPacketInfo],
        now: float,
        rtt: RttEstimator,
        bytes_in_flight: int,
        rate: RateSample | None = None,
    ) -> None:
        limited = self._cwnd_limited(now, rtt)
        for packet in packets:
            if not packet.in_flight:
                continue
            self._rto_backoff = False
            if self.in_recovery(packet.sent_time):
                continue  # no increase during recovery (RFC 9002 7.3.2)
            if not limited:
                continue  # the window was not in use: do not grow it (RFC 7661)
            if self.in_slow_start:
                self.congestion_window += packet.size
            else:
                self._ca_acked += packet.size
                if self._ca_acked >= self.congestion_window:
                    count = self._ca_acked // self.congestion_window
                    self._ca_acked -= count * self.congestion_window
                    self.congestion_window += count * self.max_datagram_size

    def on_packets_lost(
        self, *, packets: list[SentPacketInfo], now: float, bytes_in_flight: int
    ) -> None:
        lost_bytes = 0
        largest_sent_time: float | None = None
        for packet in packets:
            if not packet.in_flight:
                continue
            lost_bytes += packet.size
            if largest_sent_time is None or packet.sent_time > largest_sent_time:
                largest_sent_time = packet.sent_time
        if largest_sent_time is None:
            return
        self._last_loss = (now, bytes_in_flight + lost_bytes)
        if self.in_recovery(largest_sent_time):
            return  # same congestion event: already reduced once
        self._enter_recovery(now)
        self.congestion_window = max(int(self.congestion_window * self.beta), self.min_window)
        self.ssthresh = self.congestion_window

    def on_retransmission_timeout(self, *, now: float, bytes_in_flight: int) -> None:
        flight = bytes_in_flight
        if self._last_loss is not None and self._last_loss[0] == now:
            flight = max(flight, self._last_loss[1])
        if not self._rto_backoff:
            self.ssthresh = max(flight // 2, self.min_window)
        # else: repeated timeout for the same data, ssthresh held (RFC 5681 3.1)
        self._rto_backoff = True
        self.congestion_window = self.min_window
        # Everything sent so far belongs to this congestion event: losses of
        # it declared later must not reduce again, late ACKs of it not grow.
        self._enter_recovery(now)

    def inherit(self, old, **context) -> None:
        """Window as the base class, at least ``min_window``; an ongoing
        recovery period carries over so the losses of one congestion event
        seen by both controllers cut the window once."""
        super().inherit(old, **context)
        self.congestion_window = max(self.congestion_window, self.min_window)
        start = getattr(old, "recovery_start_time", None)
        if isinstance(start, float | int):
            self.recovery_start_time = float(start)

    def state(self) -> dict:
        return {
            **super().state(),
            "recovery_start_time": self.recovery_start_time,
            "in_slow_start": self.in_slow_start,
        }
