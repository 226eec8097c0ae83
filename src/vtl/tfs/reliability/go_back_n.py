"""Go-back-N ARQ."""

from __future__ import annotations

from vtl.tfs.base import Param
from vtl.tfs.reliability.base import RTO_PARAMS, Reliability


class GoBackN(Reliability):
    """Up to ``window`` segments in flight; the receiver only accepts the
    next in-order segment, so a loss makes the sender resend everything from
    the lost segment on.  Cheap receiver, wasteful under loss."""

    NAME = "go-back-n"
    VERSION = "1.0"
    PARAMS = {
        "window": Param(int, 16, "most segments outstanding", 1, 1 << 20),
        **RTO_PARAMS,
    }
    buffers_out_of_order = False
    sack = False

    def on_lost(self, lost: list[int], outstanding: list[int]) -> list[int]:
        first = min(lost)
        return [s for s in outstanding if s >= first]
