"""Round-trip time estimation and retransmission timeout (RFC 6298).

Samples come from packet numbers that are never reused, so every sample is
unambiguous (no Karn's algorithm needed)."""

from __future__ import annotations


class RttEstimator:
    """Smoothed RTT, RTT variance, min RTT and the RTO with backoff."""

    K = 4
    ALPHA = 1 / 8
    BETA = 1 / 4

    def __init__(
        self,
        *,
        initial_rtt: float = 0.1,
        min_rto: float = 0.2,
        max_rto: float = 60.0,
        granularity: float = 0.001,
        backoff: float = 2.0,
    ) -> None:
        self.initial_rtt = initial_rtt
        self.min_rto = min_rto
        self.max_rto = max_rto
        self.granularity = granularity
        self.backoff = backoff
        self.srtt: float | None = None
        self.rttvar = initial_rtt / 2
        self.latest = initial_rtt
        self.min_rtt = float("inf")
        self.backoff_count = 0
        self.samples = 0

    @property
    def smoothed(self) -> float:
        """srtt, or the initial RTT before the first sample."""
        return self.initial_rtt if self.srtt is None else self.srtt

    def on_sample(self, rtt: float, ack_delay: float = 0.0) -> None:
        """Feed one RTT sample (seconds); ``ack_delay`` is what the peer held
        the ACK back, subtracted when that keeps the sample >= min RTT."""
        if rtt <= 0:
            rtt = self.granularity
        self.samples += 1
        self.latest = rtt
        self.min_rtt = min(self.min_rtt, rtt)
        if rtt - ack_delay >= self.min_rtt:
            rtt -= ack_delay
        if self.srtt is None:
            self.srtt = rtt
            self.rttvar = rtt / 2
        else:
            self.rttvar = (1 - self.BETA) * self.rttvar + self.BETA * abs(self.srtt - rtt)
            self.srtt = (1 - self.ALPHA) * self.srtt + self.ALPHA * rtt
        self.backoff_count = 0  # a fresh sample means the path delivers again

    def base_rto(self) -> float:
        rto = self.smoothed + max(self.granularity, self.K * self.rttvar)
        return min(max(rto, self.min_rto), self.max_rto)

    def rto(self) -> float:
        """Current retransmission timeout, including exponential backoff."""
        return min(self.base_rto() * (self.backoff**self.backoff_count), self.max_rto)

    def on_timeout(self) -> None:
        """The RTO fired: back off (RFC 6298 section 5.5)."""
        self.backoff_count += 1
