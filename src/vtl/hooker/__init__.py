"""The Hooker: unmodified TCP applications carried over VTL (or another carrier).

This package holds the user-space flow engine and its carriers; the BPF side
and the daemon build on it."""

from vtl.hooker.carriers import (
    Carrier,
    CarrierError,
    CarrierReset,
    CarrierStream,
    CarrierUnavailable,
    get_carrier,
    register_carrier,
)
from vtl.hooker.engine import Flow, FlowEngine
from vtl.hooker.flowheader import FlowHeader, FlowHeaderError, FlowStatus
from vtl.hooker.peers import PeerCache, PeerState
from vtl.hooker.splice import SpliceResult, arm_abortive_close, splice

__all__ = [
    "Carrier",
    "CarrierError",
    "CarrierReset",
    "CarrierStream",
    "CarrierUnavailable",
    "Flow",
    "FlowEngine",
    "FlowHeader",
    "FlowHeaderError",
    "FlowStatus",
    "PeerCache",
    "PeerState",
    "SpliceResult",
    "arm_abortive_close",
    "get_carrier",
    "register_carrier",
    "splice",
]
