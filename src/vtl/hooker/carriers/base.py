"""The carrier interface: how a Hooker moves one TCP byte stream to its peer.

The Hooker carries each hooked TCP connection over a substitute transport
(VTL by default, QUIC to prove the interface is not VTL-shaped).  Everything
above this module (splice, engine) talks only to :class:`Carrier` and
:class:`CarrierStream`, so adding a transport means one new module and one
:func:`register_carrier` line.

Stream semantics mirror a TCP connection: ordered bytes, half-close
(:meth:`CarrierStream.write_eof` / ``read() == b""``), abortive close
(:meth:`CarrierStream.abort`, seen by the peer as :class:`CarrierReset`), and
backpressure (``write`` waits while the carrier holds more than its
high-water mark), so memory never grows with a slow reader.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from typing import Any

Address = tuple[Any, ...]

DEFAULT_CONNECT_TIMEOUT = 1.0  # s: how long an unknown peer may stay silent


class CarrierError(Exception):
    """Something a carrier could not do."""


class CarrierUnavailable(CarrierError):
    """The peer host runs no (compatible) carrier: fall back to plain TCP."""


class CarrierReset(CarrierError):
    """The stream ended abnormally: aborted by the peer, connection lost or idle."""


class CarrierStream(ABC):
    """One bidirectional byte stream standing for one TCP connection."""

    carrier_name: str = "?"

    def __init__(self) -> None:
        self.bytes_sent = 0
        self.bytes_received = 0

    @property
    @abstractmethod
    def peer_address(self) -> Address | None:
        """The peer Hooker's address."""

    @abstractmethod
    async def read(self, max_bytes: int) -> bytes:
        """Up to ``max_bytes`` next bytes; ``b""`` at the peer's orderly end of
        stream.  Raises :class:`CarrierReset` if the stream ended abnormally."""

    @abstractmethod
    async def write(self, data: bytes | bytearray | memoryview) -> None:
        """Queue bytes; waits while the carrier buffers more than its high-water
        mark.  Raises :class:`CarrierReset` if the stream is gone."""

    @abstractmethod
    def write_eof(self) -> None:
        """Half-close: everything written is delivered, then the peer reads EOF."""

    @abstractmethod
    def abort(self, reason: str = "aborted") -> None:
        """Abortive close: the peer's read raises :class:`CarrierReset`."""

    @abstractmethod
    async def aclose(self, timeout: float | None = None) -> None:
        """Release the stream after both directions ended cleanly, letting what
        is still unacknowledged arrive first.  Waits as long as the carrier
        still makes progress (its own idle timeout ends a dead peer), or at
        most ``timeout`` seconds, then aborts."""

    @property
    def buffered_bytes(self) -> int:
        """Bytes this side holds for the stream (unacknowledged plus unread)."""
        return 0

    def stats(self) -> dict[str, Any]:
        return {
            "carrier": self.carrier_name,
            "peer": self.peer_address,
            "bytes_sent": self.bytes_sent,
            "bytes_received": self.bytes_received,
            "buffered_bytes": self.buffered_bytes,
        }


StreamHandler = Callable[[CarrierStream, Address], Awaitable[None]]


class Carrier(ABC):
    """A transport between Hookers: listens for peers' streams, opens streams."""

    name: str = "?"

    @abstractmethod
    async def listen(self, host: str, port: int, handler: StreamHandler) -> Address:
        """Accept streams on ``(host, port)``; ``handler(stream, peer_addr)`` runs
        as its own task for each.  Returns the bound address."""

    @abstractmethod
    async def connect(
        self,
        peer_addr: Address,
        *,
        composition: Any = None,
        timeout: float = DEFAULT_CONNECT_TIMEOUT,
    ) -> CarrierStream:
        """A new stream to the peer Hooker.  Raises :class:`CarrierUnavailable`
        when the peer runs no carrier: at once on ICMP port unreachable, else
        after ``timeout``."""

    @abstractmethod
    async def close(self) -> None:
        """Stop listening and abort every stream."""

    @property
    def local_address(self) -> Address | None:
        return None

    def stats(self) -> dict[str, Any]:
        return {"carrier": self.name}


# ------------------------------------------------------------------ registry

CarrierFactory = Callable[..., Carrier]
_FACTORIES: dict[str, CarrierFactory] = {}
#: built-in carriers, imported on first use (QUIC pulls in aioquic)
_BUILTIN = {
    "vtl": "vtl.hooker.carriers.vtl:VtlCarrier",
    "quic": "vtl.hooker.carriers.quic:QuicCarrier",
}


def register_carrier(name: str, factory: CarrierFactory) -> None:
    """Make ``get_carrier(name, **options)`` call ``factory(**options)``."""
    if not name or not name.replace("-", "").replace("_", "").isalnum():
        raise ValueError(f"bad carrier name {name!r}")
    _FACTORIES[name] = factory


def carrier_names() -> list[str]:
    return sorted(set(_FACTORIES) | set(_BUILTIN))


def get_carrier(name: str, **options: Any) -> Carrier:
    """A new carrier instance by name (``"vtl"``, ``"quic"``, or registered)."""
    factory = _FACTORIES.get(name)
    if factory is None and name in _BUILTIN:
        module, attr = _BUILTIN[name].split(":")
        factory = getattr(importlib.import_module(module), attr)
        _FACTORIES[name] = factory
    if factory is None:
        raise KeyError(f"unknown carrier {name!r} (known: {', '.join(carrier_names())})")
    return factory(**options)


__all__ = [
    "DEFAULT_CONNECT_TIMEOUT",
    "Carrier",
    "CarrierError",
    "CarrierReset",
    "CarrierStream",
    "CarrierUnavailable",
    "StreamHandler",
    "carrier_names",
    "get_carrier",
    "register_carrier",
]
