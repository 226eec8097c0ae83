"""Exceptions, each naming who did what wrong (h11 style)."""

from __future__ import annotations

from enum import IntEnum


class VtlError(Exception):
    """Base class of every error VTL raises on purpose."""


class WireError(VtlError):
    """A datagram is not a valid VTL packet (the codec's only exception).

    ``reason`` is a short counter name (``malformed``, ``version``,
    ``checksum``, ...) so endpoints can count drops per cause."""

    def __init__(self, message: str, reason: str = "malformed") -> None:
        super().__init__(message)
        self.reason = reason


class CompositionError(VtlError):
    """A composition names an unknown TF or gives it a bad parameter."""


class SelectionError(VtlError):
    """No installed composition satisfies the required service properties."""


class ConnectionStateError(VtlError):
    """The application used a connection in a way its state does not allow
    (sending after close, reading before ready, ...)."""


class ErrorCode(IntEnum):
    """Codes carried by REFUSE and RESET packets and by termination events."""

    NO_ERROR = 0
    APPLICATION = 1  # the application aborted
    NO_COMMON_COMPOSITION = 2  # negotiation failed
    COUNTER_OFFER_REJECTED = 3
    IDLE_TIMEOUT = 4
    RETRANSMISSION_LIMIT = 5
    PROTOCOL_VIOLATION = 6
    HANDSHAKE_TIMEOUT = 7
    TF_FAILURE = 8  # a transport function raised inside the datapath
    ENDPOINT_CLOSING = 9
    UNKNOWN_CONNECTION = 10
    NOT_LISTENING = 11
    RECONFIG_UNSUPPORTED = 12  # a TF of the new composition is missing or invalid
    RECONFIG_NOT_LIVE = 13  # a role change that cannot be done on a running connection
    RECONFIG_BUSY = 14  # another reconfiguration is in progress (or collided)
    RECONFIG_CLOSING = 15  # the connection is closing
    TF_REMOVED = 20  # an operator force-removed a deployed TF this connection used
    PEER_NOT_TRUSTED = 16  # the peer's identity key is not among the trusted keys
    AUTHENTICATION_FAILED = 17  # bad transcript signature or malformed security fields
    SECURITY_UNAVAILABLE = 18  # security was negotiated but this side cannot provide it
