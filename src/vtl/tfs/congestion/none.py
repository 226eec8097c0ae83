"""No congestion control: an unbounded window and no pacing.

Only flow control (the receiver's window) limits the sender.  Meant for
lab links that are known to be uncongested, for measuring the other TFs in
isolation, and as a baseline in benchmarks; never for shared networks.
"""

from __future__ import annotations

from typing import ClassVar

from vtl.tfs.base import Param
from vtl.tfs.congestion.base import INFINITE_WINDOW, CongestionControl


class NoCongestionControl(CongestionControl):
    """No congestion control: infinite window, no pacing (flow control still applies)."""

    NAME: ClassVar[str] = "none"
    VERSION: ClassVar[str] = "1.0"
    PARAMS: ClassVar[dict[str, Param]] = {}

    def __init__(self, params: dict | None = None, *, max_datagram_size: int = 1452) -> None:
        super().__init__(params, max_datagram_size=max_datagram_size)
        self.congestion_window = INFINITE_WINDOW
        # ``inf`` means "do not pace" (``None`` would make the engine derive a
        # rate from cwnd / srtt, which is meaningless with an infinite window).
        self.pacing_rate = float("inf")
