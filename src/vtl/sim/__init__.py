"""Deterministic simulated network for driving sans-I/O VTL endpoints in tests."""

from vtl.sim.network import (
    Address,
    GilbertElliott,
    LinkConditions,
    LinkStats,
    LivelockError,
    Node,
    SimError,
    SimNetwork,
    TimerStallError,
    TraceEntry,
)

__all__ = [
    "Address",
    "GilbertElliott",
    "LinkConditions",
    "LinkStats",
    "LivelockError",
    "Node",
    "SimError",
    "SimNetwork",
    "TimerStallError",
    "TraceEntry",
]
