"""Reliability interface: which segments a sender retransmits, how the
receiver treats out-of-order segments, and the retransmission timer's
parameters.

The engine owns the buffers and the packet-number-based loss detection
(RFC 9002 style thresholds); a reliability TF is the policy on top."""

from __future__ import annotations

from typing import ClassVar

from vtl.tfs.base import Param, TransportFunction

RTO_PARAMS = {
    "min_rto": Param(float, 0.2, "lower bound of the retransmission timeout (s)", 0.001, 60.0),
    "max_rto": Param(float, 60.0, "upper bound of the retransmission timeout (s)", 0.01, 600.0),
    "rto_backoff": Param(float, 2.0, "RTO multiplier per consecutive timeout", 1.0, 4.0),
    "max_retransmissions": Param(
        int, 12, "times one segment may be resent before the connection fails", 0, 1000
    ),
}


class Reliability(TransportFunction):
    """Base class.  ``reliable`` senders retransmit; unreliable ones abandon
    lost segments (the receiver learns it from the sender's UNA)."""

    ROLE: ClassVar[str] = "reliability"
    reliable: ClassVar[bool] = True
    #: receiver keeps segments that arrive above a gap (else it drops them)
    buffers_out_of_order: ClassVar[bool] = True
    #: receiver reports selective-ack ranges
    sack: ClassVar[bool] = True
    #: the sender may give up on data and tell the receiver (partial reliability)
    abandons: ClassVar[bool] = False

    @classmethod
    def live_switch_refusal(cls, old: type) -> str | None:
        # any two reliable (or two unreliable) policies interoperate: the
        # receiver dedups by sequence number and the sender's loss detection
        # works on packet numbers whether or not the receiver buffers/SACKs
        if getattr(old, "reliable", True) != cls.reliable:
            return (
                f"reliability {old.NAME!r} -> {cls.NAME!r}: switching between reliable "
                "and unreliable delivery on a running connection is not supported"
            )
        return None

    @property
    def window(self) -> int:
        """Most segments the sender may have outstanding (unacked)."""
        return int(self.params.get("window", 1 << 30))

    def on_lost(self, lost: list[int], outstanding: list[int]) -> list[int]:
        """Given the sequence numbers just declared lost and every
        outstanding (unacked) one, sorted, return those to resend."""
        return lost

    def on_timeout(self, outstanding: list[int]) -> list[int]:
        """The RTO fired; return the segments to resend."""
        return outstanding
