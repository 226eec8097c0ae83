"""Flow control TF: a receiver-advertised window."""

from __future__ import annotations

from vtl.tfs.base import Param, TransportFunction


class WindowFlowControl(TransportFunction):
    """The receiver advertises how many segments it can hold (buffered out
    of order or delivered but not yet read by the application); the sender
    never goes beyond it, so a slow reader bounds memory on both sides and
    nothing is dropped for lack of space."""

    ROLE = "flow"
    NAME = "window"
    # advertise the new window only once the peer has committed (it accepts
    # ACK windows up to the larger of both from its commit on)
    SWITCH_AT = "boundary"
    PARAMS = {
        "window": Param(int, 4096, "receive window in segments", 2, 1 << 20),
        "update_fraction": Param(
            float, 0.25, "send a window update when it opened by this fraction", 0.01, 1.0
        ),
    }

    @property
    def window(self) -> int:
        return self.params["window"]


BUILTIN = [WindowFlowControl]
