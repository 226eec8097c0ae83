"""No reliability: datagram semantics."""

from __future__ import annotations

from vtl.tfs.base import Param
from vtl.tfs.reliability.base import RTO_PARAMS, Reliability


class NoReliability(Reliability):
    """Send each segment once; lost segments are abandoned, never resent.

    ACKs still flow so congestion and flow control keep working, and the
    receiver skips gaps when the sender's UNA moves past them."""

    NAME = "none"
    VERSION = "1.0"
    PARAMS = {
        "window": Param(int, 1 << 20, "most segments outstanding", 1, 1 << 30),
        **{k: v for k, v in RTO_PARAMS.items() if k != "max_retransmissions"},
    }
    reliable = False

    def on_lost(self, lost: list[int], outstanding: list[int]) -> list[int]:
        return []

    def on_timeout(self, outstanding: list[int]) -> list[int]:
        return []
