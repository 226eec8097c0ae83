"""LEDBAT: a delay-based scavenger (RFC 6817, with LEDBAT++ refinements).

Why: background transfers (backups, updates, prefetching) should use the
capacity nobody else wants and get out of the way as soon as others need it.
Loss-based controllers only back off once a queue overflows; LEDBAT watches
the *queuing delay* it causes and keeps it near a small ``target``: any
loss-based flow sharing the bottleneck fills the queue beyond the target and
LEDBAT shrinks towards its minimum window, leaving the link to it.  The
service API's capacity profile ``scavenger`` selects this controller.

The queuing delay is estimated as ``current_delay - base_delay``.  RFC 6817
uses one-way delays from receiver timestamps; VTL has none, so both come
from RTT samples: ``base_delay`` is the minimum RTT over the last
``base_history`` one-minute buckets (so a route change is forgotten after a
few minutes), ``current_delay`` the minimum of the last ``current_filter``
samples (filters out ACK-delay noise).  Reverse-path queuing therefore
counts too, which only makes the scavenger more polite.

Window updates on each ACK (RFC 6817 section 2.4.2, with the LEDBAT++ gain
``1 / min(16, ceil(2 x target / base_delay))`` so that long base delays do
not make it more aggressive)::

    off_target = (target - queuing_delay) / target
    cwnd += gain x off_target x bytes_acked x MSS / cwnd      (below the target)

Above the target the RFC's linear decrease (at most ``gain`` datagrams per
RTT) needs many seconds to drain an overshoot, so the window shrinks
multiplicatively as in LEDBAT++: by ``gain - decrease_constant x W x
(queuing_delay / target - 1)`` datagrams per RTT, at most half the window.

The window never grows beyond the flight plus ``allowed_increase``
datagrams (no growth while application-limited).  Slow start (LEDBAT++
style) grows by ``gain x bytes acked`` and ends when the queuing delay
reaches three quarters of the target.  A loss halves the window, once per
round trip (recovery period as in NewReno): random loss does cut LEDBAT's
rate, which is acceptable for a scavenger.  Pacing: ``1.2 x cwnd / srtt``
(``2 x`` in slow start).
"""

from __future__ import annotations

import math
from collections import deque
from typing import ClassVar

from vtl.core.rtt import RttEstimator
from vtl.tfs.base import Param
from vtl.tfs.congestion.base import CongestionControl, RateSample, SentPacketInfo, window_params

BASE_BUCKET = 60.0  # seconds per base-delay history bucket (RFC 6817)


class Ledbat(CongestionControl):
    """LEDBAT scavenger (RFC 6817 / LEDBAT++): keeps the queuing delay near a target and
    yields to loss-based flows."""

    NAME: ClassVar[str] = "ledbat"
    VERSION: ClassVar[str] = "1.0"
    SERVICE_TRAITS: ClassVar[dict] = {"congestion_controlled": True, "scavenger": True}
    PARAMS: ClassVar[dict[str, Param]] = {
        "target_ms": Param(float, 60.0, "queuing delay to aim for (ms)", min=1.0, max=1000.0),
        "gain": Param(
            float, 1.0, "growth factor before the LEDBAT++ base-delay scaling", min=0.05, max=4.0
        ),
        "base_history": Param(int, 10, "one-minute buckets of minimum RTT kept", min=1, max=60),
        "current_filter": Param(int, 4, "RTT samples the current delay is the minimum of", min=1),
        "decrease_constant": Param(
            float,
            1.0,
            "LEDBAT++ multiplicative decrease above the target (0: RFC 6817 linear)",
            min=0.0,
            max=4.0,
        ),
        "allowed_increase": Param(
            int, 2, "datagrams the window may exceed the flight by", min=1, max=64
        ),
        **window_params(4),
    }

    def __init__(self, params: dict | None = None, *, max_datagram_size: int = 1452) -> None:
        super().__init__(params, max_datagram_size=max_datagram_size)
        p = self.params
        self.target = p["target_ms"] / 1000.0
        self.min_window = p["min_window_packets"] * max_datagram_size
        self._cwnd = float(max(p["initial_window_packets"] * max_datagram_size, self.min_window))
        self.congestion_window = int(self._cwnd)
        self.ssthresh = None
        self._base: deque[tuple[int, float]] = deque()  # (bucket number, min RTT)
        self._current: deque[float] = deque(maxlen=p["current_filter"])
        self._srtt = 0.0
        self.recovery_start_time: float | None = None
        self._flight_max = 0  # largest flight since the last ACK (for the growth cap)
        # slow start is a phase, not "cwnd < ssthresh": a delay-based decrease
        # below ssthresh must not restart it
        self._slow_start = True

    @property
    def in_slow_start(self) -> bool:
        return self._slow_start

    # -- delay estimation ---------------------------------------------------

    @property
    def base_delay(self) -> float:
        return min((d for _, d in self._base), default=float("inf"))

    @property
    def queuing_delay(self) -> float:
        if not self._current or not self._base:
            return 0.0
        return max(0.0, min(self._current) - self.base_delay)

    def _gain(self) -> float:
        base = self.base_delay
        if base == float("inf") or base <= 0:
            return self.params["gain"]
        return self.params["gain"] / min(16, math.ceil(2 * self.target / base))

    def _set_cwnd(self, value: float) -> None:
        self._cwnd = max(value, float(self.min_window))
        self.congestion_window = int(self._cwnd)

    def _update_pacing(self) -> None:
        if self._srtt > 0:
            factor = 2.0 if self.in_slow_start else 1.2
            self.pacing_rate = factor * self._cwnd / self._srtt

    # -- hooks -------------------------------------------------------------

    def on_rtt_measurement(self, *, rtt: RttEstimator, now: float) -> None:
        sample = rtt.latest
        self._srtt = rtt.smoothed
        self._current.append(sample)
        bucket = int(now // BASE_BUCKET)
        if self._base and self._base[-1][0] == bucket:
            if sample < self._base[-1][1]:
                self._base[-1] = (bucket, sample)
        else:
            self._base.append((bucket, sample))
            while self._base and self._base[0][0] <= bucket - self.params["base_history"]:
                self._base.popleft()
        self._update_pacing()

    def on_packet_sent(self, *, packet: SentPacketInfo, now: float, bytes_in_flight: int) -> None:
        self._flight_max = max(self._flight_max, bytes_in_flight)

    def on_packets_acked(
        self,
        *,
        packets: list[SentPacketInfo],
        now: float,
        rtt: RttEstimator,
        bytes_in_flight: int,
        rate: RateSample | None = None,
    ) -> None:
        self._srtt = rtt.smoothed
        rs = self.recovery_start_time
        acked = sum(p.size for p in packets if p.in_flight and (rs is None or p.sent_time > rs))
        flight = self._flight_max
        self._flight_max = bytes_in_flight
        if not acked:
            return
        mss = self.max_datagram_size
        qdelay = self.queuing_delay
        gain = self._gain()
        cwnd = self._cwnd
        if self._slow_start:
            if qdelay > 0.75 * self.target or (self.ssthresh and cwnd >= self.ssthresh):
                self._slow_start = False  # the queue is building (or back at ssthresh)
                self.ssthresh = int(cwnd)
            else:
                cwnd += gain * acked
        if not self.in_slow_start:
            if qdelay <= self.target:
                off_target = (self.target - qdelay) / self.target
                cwnd += gain * off_target * acked * mss / cwnd
            else:
                # LEDBAT++ multiplicative decrease: per RTT, gain - constant x
                # W x (qdelay / target - 1) datagrams, at most half the window
                w = cwnd / mss
                per_rtt = gain - self.params["decrease_constant"] * w * (qdelay / self.target - 1)
                per_rtt = max(per_rtt, -w / 2)
                cwnd += per_rtt * mss * acked / cwnd
        cap = flight + self.params["allowed_increase"] * mss
        if cwnd > self._cwnd:
            cwnd = min(cwnd, max(cap, self._cwnd))
        self._set_cwnd(cwnd)
        self._update_pacing()

    def on_packets_lost(
        self, *, packets: list[SentPacketInfo], now: float, bytes_in_flight: int
    ) -> None:
        sent = [p.sent_time for p in packets if p.in_flight]
        if not sent:
            return
        rs = self.recovery_start_time
        if rs is not None and max(sent) <= rs:
            return  # same loss event
        self.recovery_start_time = now
        self._set_cwnd(self._cwnd / 2)
        self.ssthresh = self.congestion_window
        self._slow_start = False
        self._update_pacing()

    def on_retransmission_timeout(self, *, now: float, bytes_in_flight: int) -> None:
        self.ssthresh = max(int(self._cwnd / 2), self.min_window)
        self._set_cwnd(self.min_window)
        self.recovery_start_time = now
        self._slow_start = True  # back up to ssthresh, as after any timeout
        self._update_pacing()

    def state(self) -> dict:
        return {
            **super().state(),
            "base_delay": self.base_delay,
            "queuing_delay": self.queuing_delay,
        }
