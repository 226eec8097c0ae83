"""BBR-style model-based congestion control (BBRv1 state machine).

Why: loss-based controllers (NewReno, CUBIC) read every loss as a sign of
congestion and halve (or cut by 30 %) their rate, so on a path with a few
percent of *random* loss they collapse to a fraction of the link.  BBR
instead builds a model of the path from what it measures:

* ``btl_bw``: a windowed maximum (``bw_window_rounds`` round trips) of the
  delivery-rate samples the engine computes on each ACK
  (:class:`~vtl.tfs.congestion.base.RateSample`); application-limited samples
  only count when they raise the estimate;
* ``min_rtt``: the minimum RTT seen within ``min_rtt_window`` seconds;

and sends at ``pacing_rate = pacing_gain x btl_bw`` with at most
``cwnd = cwnd_gain x btl_bw x min_rtt`` (the BDP) in flight.  The states are
BBRv1's: *Startup* (gain 2.885 until the bandwidth stops growing by 25 % for
three rounds), *Drain* (inverse gain until the flight is down to one BDP),
*ProbeBW* (an eight-phase gain cycle 1.25, 0.75, 1, 1, 1, 1, 1, 1 that probes
for more bandwidth and drains the queue it made), and *ProbeRTT* (four
datagrams in flight for ``probe_rtt_duration`` when ``min_rtt`` has not been
refreshed for ``min_rtt_window``, to let the queue empty and re-measure it).

Loss does not enter the model, so random loss does not cut the rate.  Two
loss-related refinements:

* ``compensate_loss``: losses happen after the bottleneck as often as
  before it, and the delivery rate only counts what arrived, so pacing at
  ``btl_bw`` alone would leave a fraction *p* of the bottleneck unused
  under a random loss rate *p*.  The controller keeps a per-round loss
  rate (smoothed) and divides the pacing rate and the BDP by ``1 - p``
  (``p`` capped at ``loss_threshold``): it offers the bottleneck what it can
  carry, and what survives fills the receiver;
* ``loss_threshold`` (BBRv2-like): a round whose loss rate exceeds it is
  taken as *congestive* loss (a shallow buffer overflowing), and the flight
  is capped at ``beta x`` what was in flight (``inflight_hi``), a cap that
  is raised again by one quarter each round without such loss; in Startup
  such a round also ends Startup (as in BBRv2).  The default, 0.2, is far
  above random loss rates (2-5 %), so those never trigger it; 0 turns it
  off (pure BBRv1).

On a retransmission timeout the window drops to four datagrams and grows
by the bytes acknowledged (BBRv1's packet conservation) until a packet sent
after the timeout is acknowledged; then the window from before the timeout
is restored (the model itself is kept throughout), and rounds limited by
this recovery do not count towards the end of Startup.
"""

from __future__ import annotations

from enum import Enum
from typing import ClassVar

from vtl.core.rtt import RttEstimator
from vtl.tfs.base import Param
from vtl.tfs.congestion.base import CongestionControl, RateSample, SentPacketInfo, window_params

HIGH_GAIN = 2 / 0.693147  # 2 / ln 2: doubles the sending rate each round
PROBE_BW_GAINS = (1.25, 0.75, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0)
FULL_BW_GROWTH = 1.25
FULL_BW_ROUNDS = 3
MIN_CWND_PACKETS = 4
MIN_LOSS_SAMPLE_PACKETS = 20  # a round's loss rate is judged on at least this many packets


class Mode(Enum):
    STARTUP = "startup"
    DRAIN = "drain"
    PROBE_BW = "probe_bw"
    PROBE_RTT = "probe_rtt"


class MaxFilter:
    """Windowed maximum over round numbers (Kathleen Nichols' algorithm,
    simplified to a monotonic deque: exact, and tiny for short windows)."""

    def __init__(self, window: int) -> None:
        self.window = window
        self._items: list[tuple[int, float]] = []  # (round, value), values decreasing

    def update(self, value: float, round_no: int) -> None:
        items = self._items
        while items and items[-1][1] <= value:
            items.pop()
        items.append((round_no, value))
        self.expire(round_no)

    def expire(self, round_no: int) -> None:
        items = self._items
        while items and items[0][0] <= round_no - self.window:
            items.pop(0)

    @property
    def best(self) -> float:
        return self._items[0][1] if self._items else 0.0


class Bbr(CongestionControl):
    """BBR (v1 state machine): paces at the measured bottleneck bandwidth, cwnd = gain x BDP;
    random loss does not cut the rate."""

    NAME: ClassVar[str] = "bbr"
    VERSION: ClassVar[str] = "1.0"
    PARAMS: ClassVar[dict[str, Param]] = {
        "bw_window_rounds": Param(
            int, 10, "round trips the bottleneck-bandwidth max filter spans", min=2, max=100
        ),
        "min_rtt_window": Param(
            float, 10.0, "seconds a min-RTT sample stays valid before ProbeRTT", min=0.5, max=300
        ),
        "probe_rtt_duration": Param(
            float, 0.2, "seconds ProbeRTT holds the flight at four datagrams", min=0.01, max=5
        ),
        "cwnd_gain": Param(float, 2.0, "cwnd as a multiple of the BDP in ProbeBW", min=1.0, max=8),
        "startup_gain": Param(
            float, HIGH_GAIN, "pacing and cwnd gain in Startup", min=1.25, max=4.0
        ),
        "loss_threshold": Param(
            float,
            0.2,
            "per-round loss rate taken as congestion (caps the flight); 0 = never",
            min=0.0,
            max=1.0,
        ),
        "beta": Param(
            float,
            0.7,
            "flight cap, as a fraction of the flight, after congestive loss",
            min=0.3,
            max=0.95,
        ),
        "compensate_loss": Param(
            bool, True, "scale the rate by 1 / (1 - loss rate) so random loss leaves no gap"
        ),
        **window_params(10, floor=None),
    }

    def __init__(self, params: dict | None = None, *, max_datagram_size: int = 1452) -> None:
        super().__init__(params, max_datagram_size=max_datagram_size)
        p = self.params
        mss = max_datagram_size
        self.min_cwnd = MIN_CWND_PACKETS * mss
        self.initial_window = p["initial_window_packets"] * mss
        self.congestion_window = max(self.initial_window, self.min_cwnd)
        self.ssthresh = None
        self.mode = Mode.STARTUP
        self.pacing_gain: float = p["startup_gain"]
        self.cwnd_gain: float = p["startup_gain"]
        self.bw_filter = MaxFilter(p["bw_window_rounds"])
        self.min_rtt = float("inf")
        self.min_rtt_stamp = 0.0
        self.round_count = 0
        self._next_round_delivered = 0
        self._round_start = False
        self.filled_pipe = False
        self._full_bw = 0.0
        self._full_bw_count = 0
        self._cycle_index = 0
        self._cycle_stamp = 0.0
        self._probe_rtt_done: float | None = None
        self._probe_rtt_round_done = False
        self._prior_cwnd = 0
        self._min_rtt_expired = False
        self._srtt = 0.0
        # loss accounting per round
        self._round_lost = 0
        self._round_acked = 0
        self.loss_rate = 0.0  # smoothed per-round loss rate
        self.inflight_hi: float = float("inf")
        self._rto_recovery = False
        self._rto_time = 0.0
        self._last_flight = 0
        self.pacing_rate = None

    # -- the model ----------------------------------------------------------

    @property
    def btl_bw(self) -> float:
        return self.bw_filter.best

    @property
    def in_slow_start(self) -> bool:
        return self.mode is Mode.STARTUP

    def _loss_factor(self) -> float:
        if not self.params["compensate_loss"]:
            return 1.0
        cap = self.params["loss_threshold"] or 0.25
        return 1.0 / (1.0 - min(self.loss_rate, cap))

    def bdp(self, gain: float) -> float:
        if self.btl_bw <= 0 or self.min_rtt == float("inf"):
            return float(self.initial_window)
        return gain * self.btl_bw * self.min_rtt * self._loss_factor()

    def _target_cwnd(self) -> int:
        target = self.bdp(self.cwnd_gain) + 3 * self.max_datagram_size  # room for ACK aggregation
        target = min(target, self.inflight_hi)
        return int(max(target, self.min_cwnd))

    def _set_pacing_rate(self) -> None:
        bw = self.btl_bw
        if self.pacing_rate is None:
            # before the model exists: startup gain x initial window / RTT (Linux BBR)
            rtt = self.min_rtt if self.min_rtt != float("inf") else self._srtt
            if rtt > 0:
                self.pacing_rate = self.params["startup_gain"] * self.initial_window / rtt
        if bw <= 0:
            return
        rate = self.pacing_gain * bw * self._loss_factor()
        if self.filled_pipe or self.pacing_rate is None or rate > self.pacing_rate:
            self.pacing_rate = rate

    # -- state machine ------------------------------------------------------

    def _update_round(self, rate: RateSample | None, packets: list[SentPacketInfo]) -> None:
        self._round_start = False
        if rate is not None and rate.prior_delivered >= self._next_round_delivered:
            delivered = rate.prior_delivered + rate.delivered
            self._next_round_delivered = delivered
            self.round_count += 1
            self._round_start = True

    def _update_bw(self, rate: RateSample | None) -> None:
        if rate is None or rate.delivery_rate <= 0:
            return
        if self.min_rtt != float("inf") and rate.interval < self.min_rtt:
            return  # too short to be a rate sample (ACK compression)
        if not rate.is_app_limited or rate.delivery_rate >= self.btl_bw:
            self.bw_filter.update(rate.delivery_rate, self.round_count)
        else:
            self.bw_filter.expire(self.round_count)

    def _check_full_pipe(self, rate: RateSample | None) -> None:
        if self.filled_pipe or not self._round_start or rate is None or rate.is_app_limited:
            return
        if self._rto_recovery:
            return  # limited by the post-timeout window, not by the path
        if self.btl_bw >= self._full_bw * FULL_BW_GROWTH:
            self._full_bw = self.btl_bw
            self._full_bw_count = 0
            return
        self._full_bw_count += 1
        if self._full_bw_count >= FULL_BW_ROUNDS:
            self.filled_pipe = True

    def _enter_probe_bw(self, now: float) -> None:
        self.mode = Mode.PROBE_BW
        self.pacing_gain = 1.0
        self.cwnd_gain = self.params["cwnd_gain"]
        # start anywhere but the 0.75 phase, deterministically per round count
        self._cycle_index = (2 + self.round_count) % len(PROBE_BW_GAINS)
        if self._cycle_index == 1:
            self._cycle_index = 2
        self._cycle_stamp = now
        self._advance_cycle(now)

    def _advance_cycle(self, now: float) -> None:
        self._cycle_index = (self._cycle_index + 1) % len(PROBE_BW_GAINS)
        self._cycle_stamp = now
        self.pacing_gain = PROBE_BW_GAINS[self._cycle_index]

    def _check_cycle(self, now: float, bytes_in_flight: int, lost: bool) -> None:
        if self.mode is not Mode.PROBE_BW:
            return
        elapsed = now - self._cycle_stamp > self.min_rtt
        gain = self.pacing_gain
        if gain > 1.0:
            done = elapsed and (lost or bytes_in_flight >= self.bdp(gain))
        elif gain < 1.0:
            done = elapsed or bytes_in_flight <= self.bdp(1.0)
        else:
            done = elapsed
        if done:
            self._advance_cycle(now)

    def _check_drain(self, now: float, bytes_in_flight: int) -> None:
        if self.mode is Mode.STARTUP and self.filled_pipe:
            self.mode = Mode.DRAIN
            self.pacing_gain = 1.0 / self.params["startup_gain"]
            self.cwnd_gain = self.params["startup_gain"]
        if self.mode is Mode.DRAIN and bytes_in_flight <= self.bdp(1.0):
            self._enter_probe_bw(now)

    def _check_probe_rtt(self, now: float, bytes_in_flight: int) -> None:
        if self.mode is not Mode.PROBE_RTT and self._min_rtt_expired:
            self._min_rtt_expired = False
            self.mode = Mode.PROBE_RTT
            self.pacing_gain = 1.0
            self._prior_cwnd = max(self._prior_cwnd, self.congestion_window)
            self._probe_rtt_done = None
        if self.mode is Mode.PROBE_RTT:
            if self._probe_rtt_done is None and bytes_in_flight <= self.min_cwnd:
                self._probe_rtt_done = now + self.params["probe_rtt_duration"]
                self._probe_rtt_round_done = False
            elif self._probe_rtt_done is not None:
                if self._round_start:
                    self._probe_rtt_round_done = True
                if self._probe_rtt_round_done and now >= self._probe_rtt_done:
                    self.min_rtt_stamp = now
                    self.congestion_window = max(self.congestion_window, self._prior_cwnd)
                    self._prior_cwnd = 0
                    if self.filled_pipe:
                        self._enter_probe_bw(now)
                    else:
                        self.mode = Mode.STARTUP
                        self.pacing_gain = self.cwnd_gain = self.params["startup_gain"]

    def _update_loss(self, lost_bytes: int, acked_bytes: int) -> None:
        self._round_lost += lost_bytes
        self._round_acked += acked_bytes

    def _end_loss_round(self, bytes_in_flight: int) -> None:
        """At a round start, fold the finished round's loss rate into the
        smoothed one and apply the congestive-loss cap."""
        total = self._round_lost + self._round_acked
        if total <= 0:
            return
        frac = self._round_lost / total
        enough = total >= MIN_LOSS_SAMPLE_PACKETS * self.max_datagram_size
        threshold = self.params["loss_threshold"]
        if threshold > 0 and enough and frac > threshold:
            flight = max(self._last_flight, bytes_in_flight)
            self.inflight_hi = max(flight * self.params["beta"], float(self.min_cwnd))
            self.filled_pipe = True  # Startup overshot the queue: leave it (BBRv2)
        elif self.inflight_hi != float("inf"):
            self.inflight_hi *= 1.25
            if self.inflight_hi > 4 * max(self.bdp(self.cwnd_gain), self.min_cwnd):
                self.inflight_hi = float("inf")
        # weight a round by its size: small rounds say little about the rate
        weight = min(1.0, total / (MIN_LOSS_SAMPLE_PACKETS * self.max_datagram_size)) / 4
        self.loss_rate += weight * (frac - self.loss_rate)
        self._round_lost = self._round_acked = 0

    # -- hooks -------------------------------------------------------------

    def on_packet_sent(self, *, packet: SentPacketInfo, now: float, bytes_in_flight: int) -> None:
        self._last_flight = max(self._last_flight, bytes_in_flight)
        if self._srtt == 0.0 and self.pacing_rate is None:
            self._set_pacing_rate()

    def on_rtt_measurement(self, *, rtt: RttEstimator, now: float) -> None:
        self._srtt = rtt.smoothed
        sample = rtt.latest
        expired = now - self.min_rtt_stamp > self.params["min_rtt_window"]
        if expired and self.min_rtt != float("inf") and self.mode is not Mode.PROBE_RTT:
            self._min_rtt_expired = True  # ProbeRTT re-measures it (entered on the ACK)
        if sample <= self.min_rtt or (expired and self.mode is Mode.PROBE_RTT):
            self.min_rtt = sample
            self.min_rtt_stamp = now
        if self.pacing_rate is None:
            self._set_pacing_rate()

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
        acked = sum(p.size for p in packets if p.in_flight)
        if self._rto_recovery and any(p.sent_time > self._rto_time for p in packets):
            # a packet sent after the timeout arrived: recovery is over, the
            # model (and the window before the timeout) still hold, as in
            # Linux BBR's restore of prior_cwnd
            self._rto_recovery = False
            self.congestion_window = max(self.congestion_window, self._prior_cwnd)
            self._prior_cwnd = 0
        self._update_round(rate, packets)
        if self._round_start:
            self._end_loss_round(bytes_in_flight)
            self._last_flight = bytes_in_flight
        self._update_loss(0, acked)
        self._update_bw(rate)
        self._check_full_pipe(rate)
        self._check_cycle(now, bytes_in_flight + acked, lost=False)
        self._check_drain(now, bytes_in_flight)
        self._check_probe_rtt(now, bytes_in_flight)
        self._set_pacing_rate()
        self._set_cwnd(acked)

    def _set_cwnd(self, acked: int) -> None:
        if self.mode is Mode.PROBE_RTT:
            self.congestion_window = self.min_cwnd
            return
        target = self._target_cwnd()
        cwnd = self.congestion_window
        if self._rto_recovery:
            cwnd += acked  # packet conservation after a timeout: regrow by what left
        elif self.filled_pipe:
            cwnd = min(cwnd + acked, target)
        elif cwnd < target or self.btl_bw <= 0:
            cwnd += acked
        # in Startup a window above the target is kept, not cut (Linux BBR)
        self.congestion_window = int(max(cwnd, self.min_cwnd))

    def on_packets_lost(
        self, *, packets: list[SentPacketInfo], now: float, bytes_in_flight: int
    ) -> None:
        lost = sum(p.size for p in packets if p.in_flight)
        self._update_loss(lost, 0)
        if self.mode is Mode.PROBE_BW and self.pacing_gain > 1.0:
            self._check_cycle(now, bytes_in_flight, lost=True)

    def on_retransmission_timeout(self, *, now: float, bytes_in_flight: int) -> None:
        self._prior_cwnd = max(self._prior_cwnd, self.congestion_window)
        self.congestion_window = self.min_cwnd
        self._rto_recovery = True
        self._rto_time = now

    def state(self) -> dict:
        return {
            **super().state(),
            "mode": self.mode.value,
            "btl_bw": self.btl_bw,
            "min_rtt": self.min_rtt,
            "pacing_gain": self.pacing_gain,
            "cwnd_gain": self.cwnd_gain,
            "filled_pipe": self.filled_pipe,
            "loss_rate": self.loss_rate,
            "inflight_hi": self.inflight_hi,
            "round": self.round_count,
        }
