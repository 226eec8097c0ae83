"""Selective repeat with SACK and fast retransmit."""

from __future__ import annotations

from vtl.tfs.base import Param
from vtl.tfs.reliability.base import RTO_PARAMS, Reliability


class SelectiveRepeat(Reliability):
    """The receiver buffers out-of-order segments and reports them in SACK
    ranges; the sender resends only segments declared lost (packet or time
    threshold, i.e. fast retransmit) or, on RTO, those not yet acked."""

    NAME = "selective-repeat"
    VERSION = "1.0"
    PARAMS = {
        "window": Param(int, 4096, "most segments outstanding", 1, 1 << 20),
        **RTO_PARAMS,
    }
