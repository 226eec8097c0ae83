"""VTL's service-oriented API: ask for services, VTL chooses the protocol.

In the spirit of IETF TAPS (RFC 9622): an application states transport
properties with preference levels (:class:`TransportProperties`), VTL ranks
the compositions of installed transport functions that satisfy them
(:func:`select`, with an explanation) and negotiates one with the peer
(:class:`Preconnection` -> :class:`Connection`).  :mod:`vtl.service.blocking`
wraps it for plain, socket-like scripts.
"""

from vtl.core.errors import SelectionError
from vtl.service import events
from vtl.service.api import (
    Connection,
    Listener,
    Preconnection,
    PropertyStatus,
    check_message_properties,
)
from vtl.service.events import (
    Closed,
    EstablishmentError,
    Ready,
    Received,
    ReceivedPartial,
    ReceiveError,
    Sent,
    ServiceEvent,
)
from vtl.service.properties import (
    CapacityProfile,
    MessageProperties,
    MessagePropertyError,
    PathMeasurements,
    Preference,
    SendReport,
    TransportProperties,
)
from vtl.service.security import KeyFileError, SecurityParameters
from vtl.service.selection import (
    Candidate,
    CompositionTraits,
    Reason,
    Selection,
    Selector,
    Violation,
    select,
    tf_traits,
)

# events.ConnectionError is deliberately not re-exported by name: it would
# shadow the Python built-in in ``from vtl.service import *``.

__all__ = [
    "Candidate",
    "CapacityProfile",
    "Closed",
    "CompositionTraits",
    "Connection",
    "EstablishmentError",
    "Listener",
    "MessageProperties",
    "MessagePropertyError",
    "PathMeasurements",
    "Preconnection",
    "Preference",
    "PropertyStatus",
    "KeyFileError",
    "Reason",
    "ReceiveError",
    "Ready",
    "Received",
    "ReceivedPartial",
    "SelectionError",
    "Selection",
    "SecurityParameters",
    "Selector",
    "SendReport",
    "Sent",
    "ServiceEvent",
    "TransportProperties",
    "Violation",
    "check_message_properties",
    "events",
    "select",
    "tf_traits",
]
