"""Reliability TFs: none, stop-and-wait, go-back-N, selective repeat, partial."""

from vtl.tfs.reliability.base import Reliability
from vtl.tfs.reliability.go_back_n import GoBackN
from vtl.tfs.reliability.none import NoReliability
from vtl.tfs.reliability.partial import PartialReliability
from vtl.tfs.reliability.selective_repeat import SelectiveRepeat
from vtl.tfs.reliability.stop_and_wait import StopAndWait

BUILTIN = [NoReliability, StopAndWait, GoBackN, SelectiveRepeat, PartialReliability]

__all__ = [
    "BUILTIN",
    "GoBackN",
    "NoReliability",
    "PartialReliability",
    "Reliability",
    "SelectiveRepeat",
    "StopAndWait",
]
