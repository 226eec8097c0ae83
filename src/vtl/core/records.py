"""Records the connection's parts share: states, segments, sent packets."""

from __future__ import annotations

import random
import secrets
from dataclasses import dataclass
from enum import Enum

from vtl.core.wire import PacketType

PACKET_THRESHOLD = 3  # RFC 9002 kPacketThreshold
#: packets whose number is further ahead of the largest one received are
#: dropped: far beyond what a sender can lose in a row (its window is at
#: most 2**20 segments), so it only rejects forged or garbled numbers
MAX_PN_GAP = 1 << 24
#: a cleanly closed connection lingers this many RTOs after the peer's last
#: packet, to repeat its final ACK should the peer have missed it; enough to
#: hear at least three of the peer's (backed-off) retransmissions
DRAIN_RTOS = 8
MAX_TAIL_LOSS_PROBES = 2  # consecutive probes before leaving it to the RTO
TIME_THRESHOLD = 9 / 8  # RFC 9002 kTimeThreshold
U32 = 1 << 32


_ESTABLISHED_TYPES = frozenset(
    (
        PacketType.DATA,
        PacketType.ACK,
        PacketType.CLOSE,
        PacketType.PROBE,
        PacketType.REPAIR,
        PacketType.RECONFIGURE,
        PacketType.FORWARD,
    )
)


class State(Enum):
    IDLE = "idle"
    OFFERING = "offering"  # initiator sent OFFER
    ACCEPTING = "accepting"  # responder sent ACCEPT, waits for confirmation
    ESTABLISHED = "established"
    TERMINATED = "terminated"


@dataclass(slots=True)
class Segment:
    """One unit of the sequence space, kept until acked or abandoned."""

    seq: int
    payload: bytes
    flags: int
    pn: int = -1  # packet number of its latest transmission
    sends: int = 0


@dataclass(slots=True)
class SentPacket:
    """Bookkeeping of an ack-eliciting packet (fields read by congestion
    control, see ``tfs/congestion/base.py``)."""

    pn: int
    size: int
    sent_time: float
    seq: int  # -1 for non-data packets
    in_flight: bool
    delivered: int = 0
    delivered_time: float = 0.0
    first_sent_time: float = 0.0
    is_app_limited: bool = False


class _Chunks:
    """Stream bytes waiting in the event queue, merged into one event."""

    __slots__ = ("parts", "segments")

    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.segments = 0


def _new_cid(rng: random.Random | None) -> int:
    while True:
        cid = rng.getrandbits(64) if rng else secrets.randbits(64)
        if cid:
            return cid
