"""XOR parity: one repair packet per block of k DATA packets."""

from __future__ import annotations

from typing import ClassVar

from vtl.tfs.base import Param
from vtl.tfs.fec.base import ADAPTIVE_PARAMS, MAX_BLOCK, Fec, block_failure


def xor_symbols(symbols: list[bytes]) -> bytes:
    """XOR of equal-length byte strings (as big integers: one C loop each)."""
    size = len(symbols[0])
    acc = 0
    for sym in symbols:
        acc ^= int.from_bytes(sym, "big")
    return acc.to_bytes(size, "big")


class XorFec(Fec):
    """XOR parity: one repair per k DATA packets rebuilds one loss per block.

    The XOR of k DATA packets rebuilds any single one of them.  Cheap (no
    library, one XOR per byte) and enough against sparse random loss;
    adaptive mode shrinks k as the reported loss grows, since one parity
    repairs only one loss per block."""

    NAME: ClassVar[str] = "xor"
    VERSION: ClassVar[str] = "1.0"
    SCHEME: ClassVar[int] = 1
    PARAMS: ClassVar[dict[str, Param]] = {
        "k": Param(int, 8, "DATA packets per block (the most, adaptive)", 1, MAX_BLOCK),
        "min_k": Param(int, 2, "adaptive: smallest block", 1, MAX_BLOCK),
        **ADAPTIVE_PARAMS,
    }

    @property
    def block_size(self) -> int:
        return self.params["k"]

    def repairs(self, n: int, loss: float | None) -> int:
        return 1

    def block_for(self, loss: float | None) -> int:
        """Adaptive: the largest k whose block failure stays under target."""
        k = self.params["k"]
        if not self.params["adaptive"] or loss is None:
            return k
        lo = min(self.params["min_k"], k)
        while k > lo and block_failure(k, 1, loss) > self.params["target"]:
            k -= 1
        return k

    def encode(self, symbols: list[bytes], m: int) -> list[bytes]:
        return [xor_symbols(symbols)]

    def decode(
        self, n: int, m: int, have: dict[int, bytes], repairs: dict[int, bytes]
    ) -> dict[int, bytes] | None:
        missing = [i for i in range(n) if i not in have]
        if len(missing) != 1 or 0 not in repairs:
            return None
        return {missing[0]: xor_symbols([repairs[0], *have.values()])}
