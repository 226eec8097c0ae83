"""Partial reliability: selective repeat that may give up (RFC 3758)."""

from __future__ import annotations

from typing import ClassVar

from vtl.tfs.base import Param
from vtl.tfs.reliability.base import RTO_PARAMS
from vtl.tfs.reliability.selective_repeat import SelectiveRepeat


class PartialReliability(SelectiveRepeat):
    """Selective repeat that may give up on data (partial reliability).

    The sender abandons data instead of resending it forever: after
    ``abandon_after`` retransmissions, or once its lifetime
    (``lifetime_ms``, or the message's own, ``send(..., lifetime=)``) has
    passed.  For media, telemetry and games, where late data is useless and
    waiting for it delays everything behind.  Whole messages are abandoned
    with message framing, single segments with stream framing; the receiver
    is told by FORWARD packets and skips the gap (``core/partial.py``).
    Data with no limit that is never acknowledged still fails the connection
    after ``max_retransmissions``."""

    NAME = "partial"
    VERSION = "1.0"
    PARAMS = {
        "window": Param(int, 4096, "most segments outstanding", 1, 1 << 20),
        "abandon_after": Param(
            int, -1, "retransmissions after which a segment is abandoned (-1: never)", -1, 1000
        ),
        "lifetime_ms": Param(
            float,
            0.0,
            "abandon data not acknowledged this long after send() (0: no limit)",
            0.0,
            3_600_000.0,
        ),
        **RTO_PARAMS,
    }
    #: the sender may abandon data; the receiver accepts FORWARD
    abandons: ClassVar[bool] = True
    SERVICE_TRAITS: ClassVar[dict] = {
        "partial_reliability": True,
        "per_message_reliability": True,
    }
