"""Reed-Solomon erasure code (zfec): k DATA + m repair packets per block."""

from __future__ import annotations

from functools import lru_cache
from typing import ClassVar

import zfec

from vtl.tfs.base import Param
from vtl.tfs.fec.base import ADAPTIVE_PARAMS, MAX_BLOCK, Fec, needed_repairs, scaled


@lru_cache(maxsize=256)
def _encoder(n: int, total: int) -> zfec.Encoder:
    return zfec.Encoder(n, total)


@lru_cache(maxsize=256)
def _decoder(n: int, total: int) -> zfec.Decoder:
    return zfec.Decoder(n, total)


class ReedSolomonFec(Fec):
    """Reed-Solomon (zfec): m repairs per k DATA packets rebuild any m losses.

    An MDS code: any k of the k+m packets of a block rebuild the block,
    so it repairs up to m losses per block, bursts included.  Uses zfec (a
    maintained Reed-Solomon library over GF(2^8), systematic, so DATA packets
    travel unchanged).  Adaptive mode picks m in [min_m, max_m] from the loss
    rate the receiver reports, so that a block fails with probability under
    ``target``."""

    NAME: ClassVar[str] = "reed-solomon"
    VERSION: ClassVar[str] = "1.0"
    SCHEME: ClassVar[int] = 2
    PARAMS: ClassVar[dict[str, Param]] = {
        "k": Param(int, 8, "DATA packets per block", 1, 128),
        "m": Param(int, 2, "repair packets per full block (adaptive: the start)", 1, 128),
        "min_m": Param(int, 1, "adaptive: fewest repairs per block", 0, MAX_BLOCK),
        "max_m": Param(int, 8, "adaptive: most repairs per block", 1, 128),
        **ADAPTIVE_PARAMS,
    }

    @property
    def block_size(self) -> int:
        return self.params["k"]

    def repairs(self, n: int, loss: float | None) -> int:
        k, m = self.params["k"], self.params["m"]
        if self.params["adaptive"] and loss is not None:
            lo = min(self.params["min_m"], self.params["max_m"])
            m = needed_repairs(
                k, round(loss * 1000), self.params["target"], lo, self.params["max_m"]
            )
            if m == 0:
                return 0
        return scaled(m, n, k) if n < k else m

    def encode(self, symbols: list[bytes], m: int) -> list[bytes]:
        n = len(symbols)
        return _encoder(n, n + m).encode(tuple(symbols), tuple(range(n, n + m)))

    def decode(
        self, n: int, m: int, have: dict[int, bytes], repairs: dict[int, bytes]
    ) -> dict[int, bytes] | None:
        if len(have) + len(repairs) < n:
            return None
        blocks: list[bytes] = []
        nums: list[int] = []
        for i, sym in have.items():
            blocks.append(sym)
            nums.append(i)
        for j, sym in repairs.items():
            if len(nums) == n:
                break
            blocks.append(sym)
            nums.append(n + j)
        out = _decoder(n, n + m).decode(tuple(blocks[:n]), tuple(nums[:n]))
        return {i: bytes(out[i]) for i in range(n) if i not in have}
