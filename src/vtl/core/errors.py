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
    PEER_NOT_TRUSTED = 16  # the peer's identity key is not among the trusted keys
    AUTHENTICATION_FAILED = 17  # bad transcript signature or malformed security fields
    SECURITY_UNAVAILABLE = 18  # security was negotiated but this side cannot provide it
