"""CUBIC congestion control (RFC 9438) with HyStart++ (RFC 9406).

Why: NewReno grows its window by one datagram per RTT after a loss, so on a
long or fast path it needs minutes to get back to the bandwidth-delay
product.  CUBIC grows the window as a cubic function of the *time* since the
last congestion event, independent of the RTT::

    W_cubic(t) = C * (t - K)^3 + W_max        K = cbrt((W_max - cwnd_epoch) / C)

(windows in maximum-size datagrams, ``t`` in seconds), concave up to the
window of the last loss (``W_max``), flat around it, convex beyond it.  A
loss multiplies the window by ``beta`` (0.7); with fast convergence a flow
whose window is still below its previous ``W_max`` releases bandwidth for
newer flows by remembering only ``W_max * (1 + beta) / 2``.  In the
Reno-friendly region (RFC 9438 section 4.3) the window follows the larger of
``W_cubic`` and ``W_est``, the window an AIMD flow with the same average
rate (increase ``alpha = 3 (1 - beta) / (1 + beta)``) would have.

Slow start is standard, optionally with HyStart++ (RFC 9406): when the
minimum RTT of a round grows by more than ``clamp(min_rtt / 8, 4 ms,
16 ms)`` over the previous round, the window grows four times slower
(Conservative Slow Start) for up to five rounds before congestion avoidance,
which avoids the large overshoot and burst of losses at the end of slow
start.

Recovery periods, the RTO response and congestion window validation are
NewReno's (RFC 9002; the window only grows while it is used).  CUBIC paces
at ``2 x cwnd / srtt`` in slow start and ``1.2 x cwnd / srtt`` afterwards
(the factors Linux uses).

Under random, non-congestive loss CUBIC still treats every loss as
congestion (cut to 0.7 x cwnd, once per RTT at most): it keeps more of its
window than NewReno (0.5) and regrows faster, but its rate still falls with
the loss rate.  Use ``bbr`` on lossy paths.
"""

from __future__ import annotations

from typing import ClassVar

from vtl.core.rtt import RttEstimator
from vtl.tfs.base import Param
from vtl.tfs.congestion.base import RateSample, SentPacketInfo, window_params
from vtl.tfs.congestion.newreno import NewReno

# HyStart++ constants (RFC 9406 section 4.3)
MIN_RTT_THRESH = 0.004
MAX_RTT_THRESH = 0.016
MIN_RTT_DIVISOR = 8
N_RTT_SAMPLE = 8
CSS_GROWTH_DIVISOR = 4
CSS_ROUNDS = 5


class Cubic(NewReno):
    """CUBIC (RFC 9438): cubic window growth in time since the last loss, beta 0.7,
    HyStart++ slow start."""

    NAME: ClassVar[str] = "cubic"
    VERSION: ClassVar[str] = "1.0"
    PARAMS: ClassVar[dict[str, Param]] = {
        "beta": Param(
            float, 0.7, "multiplicative window reduction on loss (beta_cubic)", min=0.1, max=0.95
        ),
        "c": Param(float, 0.4, "cubic scaling constant C (datagrams / s^3)", min=0.01, max=10.0),
        "fast_convergence": Param(
            bool, True, "release bandwidth to new flows when losses come below W_max"
        ),
        "reno_friendly": Param(bool, True, "never grow slower than an equivalent AIMD (Reno) flow"),
        "hystart": Param(bool, True, "HyStart++ (RFC 9406) delay-based slow-start exit"),
        **window_params(10),
    }

    def __init__(self, params: dict | None = None, *, max_datagram_size: int = 1452) -> None:
        super().__init__(params, max_datagram_size=max_datagram_size)
        p = self.params
        self.c: float = p["c"]
        self.fast_convergence: bool = p["fast_convergence"]
        self.reno_friendly: bool = p["reno_friendly"]
        self.alpha = 3 * (1 - self.beta) / (1 + self.beta)
        self._cwnd = float(self.congestion_window)  # bytes, fractional growth kept here
        self.w_max = 0.0  # bytes: window before the last reduction
        self.k = 0.0  # seconds: time to get back to w_max
        self.epoch_start: float | None = None  # start of the congestion-avoidance epoch
        self.cwnd_epoch = 0.0  # bytes: window at the epoch start
        self.w_est = 0.0  # bytes: Reno-friendly estimate
        self._srtt = 0.0
        # HyStart++ state
        self.hystart: bool = p["hystart"]
        self.in_css = False
        self._css_baseline = float("inf")
        self._css_rounds = 0
        self._round_end = -1  # packet number that ends the current round
        self._largest_sent = -1
        self._last_round_min = float("inf")
        self._round_min = float("inf")
        self._round_samples = 0

    # -- CUBIC arithmetic (RFC 9438 section 4) ---------------------------

    def w_cubic(self, t: float) -> float:
        """W_cubic(t) in bytes, ``t`` seconds after the epoch start."""
        mss = self.max_datagram_size
        return (self.c * (t - self.k) ** 3) * mss + self.w_max

    def _start_epoch(self, now: float) -> None:
        mss = self.max_datagram_size
        self.epoch_start = now
        self.cwnd_epoch = self._cwnd
        self.w_est = self._cwnd
        if self.w_max < self._cwnd:
            # exited slow start without loss (or grew past the old maximum):
            # the plateau is where we are now
            self.w_max = self._cwnd
        self.k = ((self.w_max - self.cwnd_epoch) / mss / self.c) ** (1 / 3)

    def _set_cwnd(self, value: float) -> None:
        self._cwnd = max(value, float(self.min_window))
        self.congestion_window = int(self._cwnd)

    def _update_pacing(self) -> None:
        if self._srtt > 0:
            factor = 2.0 if self.in_slow_start else 1.2
            self.pacing_rate = factor * self._cwnd / self._srtt

    # -- hooks -------------------------------------------------------------

    def on_packet_sent(self, *, packet: SentPacketInfo, now: float, bytes_in_flight: int) -> None:
        super().on_packet_sent(packet=packet, now=now, bytes_in_flight=bytes_in_flight)
        if packet.pn > self._largest_sent:
            self._largest_sent = packet.pn

    def on_rtt_measurement(self, *, rtt: RttEstimator, now: float) -> None:
        self._srtt = rtt.smoothed
        if self.hystart and self.in_slow_start:
            self._round_min = min(self._round_min, rtt.latest)
            self._round_samples += 1
        self._update_pacing()

    def _hystart_round(self, packets: list[SentPacketInfo]) -> None:
        """Per RFC 9406 section 4.2: check for an RTT increase each ACK, and
        roll the per-round minima when a round ends."""
        if not self.in_slow_start:
            return
        if self._round_samples >= N_RTT_SAMPLE and self._last_round_min != float("inf"):
            if not self.in_css:
                thresh = min(
                    max(self._last_round_min / MIN_RTT_DIVISOR, MIN_RTT_THRESH), MAX_RTT_THRESH
                )
                if self._round_min >= self._last_round_min + thresh:
                    self.in_css = True
                    self._css_baseline = self._round_min
                    self._css_rounds = 0
            elif self._round_min < self._css_baseline:
                self.in_css = False  # the RTT rise was spurious: back to slow start
        if any(p.pn > self._round_end for p in packets):
            self._round_end = self._largest_sent
            self._last_round_min = self._round_min
            self._round_min = float("inf")
            self._round_samples = 0
            if self.in_css:
                self._css_rounds += 1
                if self._css_rounds >= CSS_ROUNDS:
                    self.in_css = False
                    self.ssthresh = self.congestion_window  # enter congestion avoidance

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
        limited = self._cwnd_limited(now, rtt)
        acked = 0
        for packet in packets:
            if not packet.in_flight:
                continue
            self._rto_backoff = False
            if self.in_recovery(packet.sent_time):
                continue
            acked += packet.size
        if self.hystart:
            self._hystart_round(packets)
        if acked and limited:
            mss = self.max_datagram_size
            if self.in_slow_start:
                grow = acked / CSS_GROWTH_DIVISOR if self.in_css else acked
                self._set_cwnd(self._cwnd + grow)
            else:
                if self.epoch_start is None:
                    self._start_epoch(now)
                t = now - self.epoch_start + rtt.smoothed
                target = self.w_cubic(t)
                target = min(max(target, self._cwnd), 1.5 * self._cwnd)
                cwnd = self._cwnd + (target - self._cwnd) / self._cwnd * acked
                if self.reno_friendly:
                    self.w_est += self.alpha * acked / self._cwnd * mss
                    cwnd = max(cwnd, self.w_est)
                self._set_cwnd(cwnd)
        self._update_pacing()

    def on_packets_lost(
        self, *, packets: list[SentPacketInfo], now: float, bytes_in_flight: int
    ) -> None:
        before = self.recovery_start_time
        cwnd = self._cwnd
        super().on_packets_lost(packets=packets, now=now, bytes_in_flight=bytes_in_flight)
        if self.recovery_start_time == before:
            return  # same congestion event: no new reduction
        self._reduce(cwnd)

    def _reduce(self, cwnd: float) -> None:
        """A new congestion event at window ``cwnd`` (RFC 9438 section 4.6, 4.7)."""
        if self.fast_convergence and cwnd < self.w_max:
            self.w_max = cwnd * (1 + self.beta) / 2
        else:
            self.w_max = cwnd
        self._set_cwnd(cwnd * self.beta)
        self.ssthresh = self.congestion_window
        self.epoch_start = None
        self.in_css = False
        self._update_pacing()

    def on_retransmission_timeout(self, *, now: float, bytes_in_flight: int) -> None:
        cwnd = self._cwnd
        backoff = self._rto_backoff
        super().on_retransmission_timeout(now=now, bytes_in_flight=bytes_in_flight)
        if not backoff:
            self.w_max = cwnd  # RFC 9438 4.8: remember where the timeout hit
        self._cwnd = float(self.congestion_window)
        self.epoch_start = None
        self.in_css = False
        self._update_pacing()

    def state(self) -> dict:
        return {
            **super().state(),
            "w_max": self.w_max,
            "k": self.k,
            "epoch_start": self.epoch_start,
            "in_css": self.in_css,
        }
