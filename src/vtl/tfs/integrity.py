"""Integrity TFs: how much of each DATA packet the CRC32C protects."""

from __future__ import annotations

from typing import ClassVar

from vtl.tfs.base import Param, TransportFunction


class Integrity(TransportFunction):
    """Base class.  ``coverage`` is the number of payload bytes the checksum
    covers in DATA packets, None for all of them."""

    ROLE: ClassVar[str] = "integrity"
    #: coverage changes the DATA payload size and the checksum rule of packets
    #: already in flight: negotiated at the handshake only
    LIVE_SWITCH: ClassVar[bool | None] = False

    @property
    def coverage(self) -> int | None:
        return None


class FullChecksum(Integrity):
    """CRC32C over the whole packet: any damage drops it (the default).

    Every packet type other than DATA always gets it, whatever the TF."""

    NAME = "crc32c"


class PartialChecksum(Integrity):
    """UDP-Lite semantics: damage past the first ``coverage`` bytes is delivered.

    DATA packets carry a CHECKSUM_COVERAGE option and the CRC32C covers the
    header, the DATA prefix and only the first ``coverage`` payload bytes.
    Damage past them is delivered to the
    application instead of dropping (and resending) the whole packet: for
    codecs that conceal bit errors better than they bear loss or delay.
    Incompatible with AEAD encryption (the ``security`` role), which
    authenticates every byte."""

    NAME = "partial"
    PARAMS = {
        "coverage": Param(
            int,
            0,
            "payload bytes covered by the checksum (0: header and DATA prefix only)",
            0,
            65_000,
        ),
    }
    SERVICE_TRAITS: ClassVar[dict] = {"partial_checksum": True}

    @property
    def coverage(self) -> int | None:
        return int(self.params["coverage"])


BUILTIN = [FullChecksum, PartialChecksum]
