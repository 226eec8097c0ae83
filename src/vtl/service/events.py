"""Connection events under their TAPS names (RFC 9622 sections 7-10).

``Connection.events()`` yields these.  How the datapath's events map:

=================================  ==========================================
datapath (``vtl.core.events``)     service event
=================================  ==========================================
HandshakeCompleted                 :class:`Ready` (always the first event)
MessageReceived (message framing)  :class:`Received`
DataReceived (stream framing)      :class:`ReceivedPartial` (a stream has no
                                   message boundaries: every chunk is part of
                                   one endless message)
PeerClosed                         ``Received(b"", final=True)`` or
                                   ``ReceivedPartial(b"", True, final=True)``
DataAbandoned (unreliable)         :class:`ReceiveError`
ConnectionTerminated, code 0       :class:`Closed`
ConnectionTerminated, code != 0    :class:`ConnectionError`
HandshakeFailed                    :class:`EstablishmentError` (an exception
                                   raised by ``initiate()``)
``send()`` returned                :class:`Sent` (with the
                                   :class:`~vtl.service.properties.SendReport`)
=================================  ==========================================

``ConnectionError`` shadows the Python built-in of the same name inside this
module only; it is not part of ``vtl.service.__all__`` (use
``vtl.service.events.ConnectionError`` or match on ``event.name``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from vtl.core.composition import Composition
from vtl.core.errors import VtlError
from vtl.service.properties import SendReport

__all__ = [
    "Closed",
    "ConnectionError",
    "EstablishmentError",
    "ReceiveError",
    "Ready",
    "Received",
    "ReceivedPartial",
    "Sent",
    "ServiceEvent",
]


class ServiceEvent:
    """Base class; ``name`` is the TAPS event name."""

    name: ClassVar[str] = ""


@dataclass
class Ready(ServiceEvent):
    """The connection is established and runs ``composition``."""

    name: ClassVar[str] = "Ready"
    composition: Composition


@dataclass
class Received(ServiceEvent):
    """One whole message.  ``final``: the peer will send nothing more (then
    ``data`` is empty)."""

    name: ClassVar[str] = "Received"
    data: bytes
    final: bool = False


@dataclass
class ReceivedPartial(ServiceEvent):
    """Part of a message, or stream bytes.  ``end_of_message`` with
    ``final``: the stream ended (then ``data`` is empty)."""

    name: ClassVar[str] = "ReceivedPartial"
    data: bytes
    end_of_message: bool = False
    final: bool = False


@dataclass
class ReceiveError(ServiceEvent):
    """Data will never arrive: the sender gave up on ``segments`` segments
    (unreliable compositions), or, with partial reliability, on ``bytes``
    bytes: the ``messages`` numbered so (the n-th message the peer sent,
    from 0) or the stream byte ``ranges`` (offset, length)."""

    name: ClassVar[str] = "ReceiveError"
    reason: str
    segments: int = 0
    bytes: int = 0
    messages: tuple[int, ...] = ()
    ranges: tuple[tuple[int, int], ...] = ()


@dataclass
class Sent(ServiceEvent):
    """A ``send()`` handed its data to the transport; ``report`` says which
    message properties were honoured."""

    name: ClassVar[str] = "Sent"
    report: SendReport


@dataclass
class Closed(ServiceEvent):
    """The connection ended cleanly (both directions finished)."""

    name: ClassVar[str] = "Closed"


@dataclass
class ConnectionError(ServiceEvent):  # noqa: A001 - the TAPS name
    """The connection ended abnormally (reset, timeout, protocol error)."""

    name: ClassVar[str] = "ConnectionError"
    error_code: int
    reason: str
    by_peer: bool = False


class EstablishmentError(VtlError, ServiceEvent):
    """The connection could not be established: raised by
    ``Preconnection.initiate()`` (it is both the exception and the TAPS
    event).  ``error_code`` is a :class:`~vtl.core.errors.ErrorCode`,
    ``reason`` says what happened, ``by_peer`` whether the peer refused,
    ``offers`` what was offered."""

    name: ClassVar[str] = "EstablishmentError"

    def __init__(
        self,
        error_code: int,
        reason: str,
        *,
        by_peer: bool = False,
        offers: list[Composition] | None = None,
    ) -> None:
        super().__init__(reason)
        self.error_code = int(error_code)
        self.reason = reason
        self.by_peer = by_peer
        self.offers = list(offers or [])
