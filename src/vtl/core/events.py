"""Events a connection hands to the application (small dataclasses)."""

from __future__ import annotations

from dataclasses import dataclass

from vtl.core.composition import Composition


class Event:
    """Base class of connection events."""


@dataclass
class HandshakeCompleted(Event):
    """The connection is ready; both ends run ``composition``."""

    composition: Composition
    counter_offer: bool  # the responder proposed a composition we did not offer
    offered_index: int | None  # which of our offers was taken (initiator side)


@dataclass
class HandshakeFailed(Event):
    """Negotiation failed or timed out; the connection never became ready."""

    error_code: int
    reason: str
    by_peer: bool


@dataclass
class DataReceived(Event):
    """Stream bytes, in order (or as they came, for unordered compositions)."""

    data: bytes


@dataclass
class MessageReceived(Event):
    """One whole message (message framing)."""

    data: bytes


@dataclass
class DataAbandoned(Event):
    """Segments the sender gave up on (unreliable or partially reliable
    compositions): the application knows there is a gap instead of waiting
    for it.  With partial reliability the sender also says what it was:
    ``bytes`` abandoned, the ``messages`` (their numbers: the n-th message
    the peer sent, from 0) or the stream byte ``ranges`` (offset, length)."""

    segments: int
    bytes: int = 0
    messages: tuple[int, ...] = ()
    ranges: tuple[tuple[int, int], ...] = ()


@dataclass
class PeerClosed(Event):
    """The peer finished sending: end of stream, after the last byte."""


@dataclass
class ConnectionTerminated(Event):
    """The connection is over: closed cleanly (``error_code`` 0) or not."""

    error_code: int
    reason: str
    by_peer: bool


@dataclass
class ReconfigureDone(Event):
    """A live reconfiguration is complete at this end: it sends under
    ``composition`` from ``switch_seq`` on and has delivered everything the
    peer sent before ``peer_switch_seq``.  ``pause`` is the longest gap in
    delivery to the application between the start of the exchange and the
    first delivery after the switch (None: no data flowed in that time);
    ``elapsed`` runs from the request to that point."""

    reconfig_id: int
    composition: Composition
    by_peer: bool  # the peer asked for it
    switch_seq: int
    peer_switch_seq: int
    elapsed: float
    pause: float | None


@dataclass
class ReconfigureRefused(Event):
    """A reconfiguration we asked for did not happen (the connection runs
    on unchanged): refused by the peer or by local checks."""

    reconfig_id: int
    error_code: int
    reason: str
    by_peer: bool
