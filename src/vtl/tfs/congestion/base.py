"""Congestion control interface (modelled on aioquic's ``congestion/base.py``).

A controller expresses *both* a congestion window (bytes allowed in flight)
and an optional pacing rate (bytes/s), so window-based (NewReno, CUBIC) and
model-based, rate-based (BBR, fixed rate) controllers fit the same hooks.
The engine calls the hooks with keyword arguments; controllers never see
sockets or clocks, only the ``now`` they are given.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

from vtl.core.rtt import RttEstimator
from vtl.tfs.base import Param, TransportFunction

INFINITE_WINDOW = 1 << 62


def window_params(initial: int, floor: int | None = 2) -> dict[str, Param]:
    """The window-size parameters window-based controllers share (initial
    window and, unless ``floor`` is None, its floor), in datagrams."""
    out = {
        "initial_window_packets": Param(
            int, initial, "initial congestion window in maximum-size datagrams", min=1
        )
    }
    if floor is not None:
        out["min_window_packets"] = Param(
            int, floor, "floor of the congestion window in maximum-size datagrams", min=1
        )
    return out


class SentPacketInfo(Protocol):
    """What a controller may read about a sent packet."""

    pn: int
    size: int  # bytes on the wire (whole datagram)
    sent_time: float
    in_flight: bool  # counts towards bytes in flight
    delivered: int  # connection's delivered bytes when this packet was sent
    delivered_time: float  # time ``delivered`` was last updated before sending
    first_sent_time: float  # send time of the first packet of that delivery interval
    is_app_limited: bool


@dataclass(slots=True)
class RateSample:
    """Delivery-rate sample (draft-cheng-iccrg-delivery-rate-estimation),
    computed by the engine on each ACK for model-based controllers."""

    delivery_rate: float  # bytes/s, 0 if no valid sample
    delivered: int  # bytes delivered in the sampled interval
    interval: float  # seconds
    rtt: float  # RTT of the most recent packet acked
    is_app_limited: bool
    prior_delivered: int


class CongestionControl(TransportFunction):
    """Base class: subclasses update ``congestion_window`` and
    ``pacing_rate`` from the hooks below."""

    ROLE: ClassVar[str] = "congestion"

    def __init__(self, params: dict | None = None, *, max_datagram_size: int = 1452) -> None:
        super().__init__(params)
        self.max_datagram_size = max_datagram_size
        self.congestion_window: int = INFINITE_WINDOW
        self.ssthresh: int | None = None
        # bytes/s; None lets the engine pace at 1.25 x cwnd / srtt (2x in slow start)
        self.pacing_rate: float | None = None

    @property
    def in_slow_start(self) -> bool:
        return self.ssthresh is None or self.congestion_window < self.ssthresh

    def on_packet_sent(self, *, packet: SentPacketInfo, now: float, bytes_in_flight: int) -> None:
        """A packet counting towards bytes in flight left."""

    def on_packets_acked(
        self,
        *,
        packets: list[SentPacketInfo],
        now: float,
        rtt: RttEstimator,
        bytes_in_flight: int,
        rate: RateSample | None = None,
    ) -> None:
        """Packets were acknowledged (``bytes_in_flight`` is after removal)."""

    def on_packets_lost(
        self, *, packets: list[SentPacketInfo], now: float, bytes_in_flight: int
    ) -> None:
        """Packets were declared lost by packet or time threshold."""

    def on_retransmission_timeout(self, *, now: float, bytes_in_flight: int) -> None:
        """The RTO fired: nothing was acknowledged for a whole RTO."""

    def on_rtt_measurement(self, *, rtt: RttEstimator, now: float) -> None:
        """A new RTT sample was taken."""

    def inherit(self, old: TransportFunction, **context: Any) -> None:
        """Live reconfiguration: a window-based controller starts from the
        window (and ssthresh) of the one it replaces, or from the old pacing
        rate x smoothed RTT, so the switch neither bursts nor restarts slow
        start; RTT estimates live in the engine and carry over by
        themselves.  A controller without a window keeps its own rate."""
        if self.congestion_window >= INFINITE_WINDOW:
            return
        cwnd = getattr(old, "congestion_window", INFINITE_WINDOW)
        ssthresh = getattr(old, "ssthresh", None)
        rate = getattr(old, "pacing_rate", None)
        rtt = context.get("rtt")
        if cwnd >= INFINITE_WINDOW:
            if not rate or rtt is None:
                return
            cwnd = ssthresh = int(rate * rtt.smoothed)
        self.congestion_window = max(int(cwnd), 2 * self.max_datagram_size)
        self.ssthresh = ssthresh

    def state(self) -> dict:
        """Small dict for stats / qlog-like traces."""
        return {
            "cwnd": self.congestion_window,
            "ssthresh": self.ssthresh,
            "pacing_rate": self.pacing_rate,
        }
