"""FEC interface: an erasure code over the DATA packets of a block.

A block is a run of consecutive sequence numbers sent for the first time
(``n`` source packets, at most ``k``).  Each source packet becomes a
*source symbol* ``u16 payload length | u8 DATA flags | payload``, zero-padded
to the longest symbol of the block, so a rebuilt symbol gives back the
exact packet.  The code turns the ``n`` source symbols into ``m`` repair
symbols; the receiver rebuilds missing source packets from the ones it has
plus the repair symbols, without waiting a round trip.

A TF here is only the code and its redundancy policy (pure functions of
bytes); the per-connection block state lives in :mod:`vtl.core.fec`, which
creates it from the TF at a block boundary, so a reconfiguration can drop
or replace it between blocks.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import ClassVar

from vtl.tfs.base import Param, TransportFunction

SYMBOL_PREFIX = 3  # u16 length + u8 flags in front of each source symbol
MAX_BLOCK = 255  # source or repair packets per block (u8 on the wire)

ADAPTIVE_PARAMS = {
    "adaptive": Param(bool, False, "adapt the redundancy to the loss rate the receiver reports"),
    "target": Param(
        float, 1e-3, "adaptive: wanted probability that a full block is unrecoverable", 1e-9, 0.5
    ),
    "flush_delay": Param(
        float,
        0.0,
        "seconds a partial block waits for more data once the sender has none (0: "
        "protect it at the end of the burst)",
        0.0,
        1.0,
    ),
}


class Fec(TransportFunction):
    """Base class of the fec role: an erasure code and its redundancy."""

    ROLE: ClassVar[str] = "fec"
    #: scheme byte of REPAIR packets (0: no FEC)
    SCHEME: ClassVar[int] = 0

    @property
    def enabled(self) -> bool:
        return self.SCHEME != 0

    @property
    def block_size(self) -> int:
        """Most source packets in a block."""
        return int(self.params.get("k", 1))

    def block_for(self, loss: float | None) -> int:
        """Source packets of the next block, given the reported loss rate."""
        return self.block_size

    def repairs(self, n: int, loss: float | None) -> int:
        """Repair symbols for a block of ``n`` source packets, given the
        loss rate the peer reports (None: not known yet)."""
        raise NotImplementedError

    def encode(self, symbols: list[bytes], m: int) -> list[bytes]:
        """``m`` repair symbols of equal-length source ``symbols``."""
        raise NotImplementedError

    def decode(
        self, n: int, m: int, have: dict[int, bytes], repairs: dict[int, bytes]
    ) -> dict[int, bytes] | None:
        """Rebuild the missing source symbols (index -> symbol) from the
        source symbols ``have`` and the ``repairs`` (repair index -> symbol),
        or None when there is not enough yet."""
        raise NotImplementedError


def block_failure(n: int, m: int, p: float) -> float:
    """Probability that more than ``m`` of ``n + m`` packets are lost at
    independent loss rate ``p`` (an MDS block cannot be rebuilt)."""
    total = n + m
    return sum(math.comb(total, j) * p**j * (1 - p) ** (total - j) for j in range(m + 1, total + 1))


@lru_cache(maxsize=4096)
def needed_repairs(n: int, p_milli: int, target: float, lo: int, hi: int) -> int:
    """Fewest repairs in [lo, hi] that bring the block failure under
    ``target`` at loss ``p_milli``/1000 (``hi`` if none does)."""
    p = p_milli / 1000
    for m in range(lo, hi + 1):
        if block_failure(n, m, p) <= target:
            return m
    return hi


def scaled(m: int, n: int, k: int) -> int:
    """Repairs of a partial block: the full block's share, at least one."""
    return max(1, math.ceil(m * n / k))
