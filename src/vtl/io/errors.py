"""Exceptions of the asyncio datapath, each carrying the protocol's error code.

They subclass :class:`vtl.core.errors.VtlError` so one ``except VtlError``
catches everything VTL raises on purpose; the timeout variant also subclasses
:class:`TimeoutError` so ``asyncio``-style code keeps working."""

from __future__ import annotations

from vtl.core.errors import ErrorCode, VtlError


def _code_name(code: int) -> str:
    try:
        return ErrorCode(code).name
    except ValueError:
        return str(code)


class HandshakeError(VtlError):
    """The connection never became ready: refused, reset or timed out."""

    def __init__(self, error_code: int, reason: str, by_peer: bool = False) -> None:
        who = "peer" if by_peer else "local"
        super().__init__(f"handshake failed ({who}, {_code_name(error_code)}): {reason}")
        self.error_code = int(error_code)
        self.reason = reason
        self.by_peer = by_peer


class HandshakeTimeoutError(HandshakeError, TimeoutError):
    """No answer from the peer within the handshake timeout."""


class ConnectionClosedError(VtlError):
    """The connection ended abnormally (or is gone) while it was in use."""

    def __init__(self, error_code: int, reason: str, by_peer: bool = False) -> None:
        who = "by peer" if by_peer else "locally"
        super().__init__(f"connection terminated {who} ({_code_name(error_code)}): {reason}")
        self.error_code = int(error_code)
        self.reason = reason
        self.by_peer = by_peer


class PeerResetError(ConnectionClosedError):
    """The peer aborted the connection (it sent RESET)."""


def termination_error(error_code: int, reason: str, by_peer: bool) -> ConnectionClosedError:
    """The exception that reports an abnormal termination."""
    cls = PeerResetError if by_peer else ConnectionClosedError
    return cls(error_code, reason, by_peer)


__all__ = [
    "ConnectionClosedError",
    "HandshakeError",
    "HandshakeTimeoutError",
    "PeerResetError",
    "termination_error",
]
