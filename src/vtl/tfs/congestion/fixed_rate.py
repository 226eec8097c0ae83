"""Fixed-rate sending: a paced constant bit rate that ignores loss.

For constant-rate streaming (media, telemetry, traffic generators) and for
benchmarks that need a known offered load.  It is *not* congestion
responsive: losses and retransmission timeouts change neither the rate nor
the window, so on a shared bottleneck it will keep sending at ``rate_mbps``
whatever happens.  Flow control still applies.
"""

from __future__ import annotations

from typing import ClassVar

from vtl.tfs.base import Param
from vtl.tfs.congestion.base import INFINITE_WINDOW, CongestionControl


class FixedRate(CongestionControl):
    """Paced constant bit rate, not congestion-responsive (for constant-rate streaming)."""

    NAME: ClassVar[str] = "fixed-rate"
    VERSION: ClassVar[str] = "1.0"
    PARAMS: ClassVar[dict[str, Param]] = {
        "rate_mbps": Param(
            float,
            10.0,
            "sending rate in megabits (10^6 bits) per second of VTL datagram bytes",
            min=0.001,
            max=100000,
        ),
        "burst_packets": Param(
            int, 4, "datagrams the pacer may send back to back after an idle period", min=1
        ),
    }

    def __init__(self, params: dict | None = None, *, max_datagram_size: int = 1452) -> None:
        super().__init__(params, max_datagram_size=max_datagram_size)
        self.congestion_window = INFINITE_WINDOW
        self.pacing_rate = self.params["rate_mbps"] * 1e6 / 8  # bytes/s
        # Pacer bucket depth in bytes.  Not (yet) part of the base interface:
        # an engine that knows the attribute uses it, others use their default.
        self.pacing_burst = self.params["burst_packets"] * max_datagram_size

    # Loss, timeouts and ACKs deliberately leave rate and window alone: the
    # base class hooks are no-ops, which is exactly the behaviour wanted.

    def state(self) -> dict:
        return {**super().state(), "pacing_burst": self.pacing_burst}
