"""Stop-and-wait ARQ."""

from __future__ import annotations

from vtl.tfs.reliability.base import RTO_PARAMS, Reliability


class StopAndWait(Reliability):
    """One segment in flight; resend it when the RTO fires.  Simplest
    reliable TF: for tiny links and as a reference for the others."""

    NAME = "stop-and-wait"
    VERSION = "1.0"
    PARAMS = dict(RTO_PARAMS)
    buffers_out_of_order = False
    sack = False

    @property
    def window(self) -> int:
        return 1
