"""Partial checksum coverage (UDP-Lite semantics) for DATA packets.

With the ``integrity`` TF ``partial`` a sender adds the CHECKSUM_COVERAGE
option to its DATA packets: the CRC32C covers the header, the option, the
8-byte DATA prefix (sequence number and UNA) and the first ``coverage``
payload bytes.  The receiver accepts damage past that and delivers it;
damage inside it fails the CRC and is a counted drop (then resent).
Every other packet type is always fully covered, and a receiver drops a
partially covered packet unless it is DATA on a connection that negotiated
partial coverage and covers at least what was negotiated (the
``UDPLITE_RECV_CSCOV`` rule).

A mixin of :class:`vtl.core.connection.Connection`.
"""

from __future__ import annotations

from vtl.core import wire
from vtl.core.errors import WireError
from vtl.core.wire import OptionType, PacketType

#: bytes the CHECKSUM_COVERAGE option adds to a DATA packet (type, length, u16)
OPTION_SIZE = 4


def encode_data_covered(
    dcid: int, scid: int, pn: int, seq: int, una: int, payload: bytes, flags: int, coverage: int
) -> bytes:
    """A DATA packet whose CRC covers only the first ``coverage`` payload bytes."""
    body = wire.DATA_PREFIX.pack(seq % wire.U32, una % wire.U32) + payload
    cov = wire.DATA_PREFIX.size + coverage
    opts = {OptionType.CHECKSUM_COVERAGE: cov.to_bytes(2, "big")}
    return wire.encode(PacketType.DATA, dcid, scid, pn, body, flags, opts)


class CoverageMixin:
    """Sets up, sends and checks partial checksum coverage."""

    _coverage: int | None = None  # payload bytes covered, None: all

    def _setup_integrity(self, tf) -> None:
        """Called once the composition is known, before data is framed."""
        cov = None if tf is None else tf.coverage
        self._coverage = cov
        if cov is not None:
            self._max_payload -= OPTION_SIZE  # the option must fit the datagram

    def _check_coverage(self, p: wire.Packet) -> None:
        """Refuse a partially covered packet we did not agree to."""
        raw = p.options.get(OptionType.CHECKSUM_COVERAGE)
        if raw is None:
            return
        cov = self._coverage
        if p.type is not PacketType.DATA or cov is None:
            raise WireError("partial checksum coverage not negotiated")
        if int.from_bytes(raw, "big") < wire.DATA_PREFIX.size + cov:
            raise WireError("checksum coverage below the negotiated minimum")
