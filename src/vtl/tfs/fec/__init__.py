"""FEC TFs (role ``fec``): none, XOR parity, Reed-Solomon (zfec)."""

from vtl.tfs.fec.base import Fec
from vtl.tfs.fec.none import NoFec
from vtl.tfs.fec.reed_solomon import ReedSolomonFec
from vtl.tfs.fec.xor import XorFec

BUILTIN = [NoFec, XorFec, ReedSolomonFec]

__all__ = ["BUILTIN", "Fec", "NoFec", "ReedSolomonFec", "XorFec"]
