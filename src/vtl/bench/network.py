"""Where the runs of one matrix cell happen: an emulated two-host topology.

A *cell* is (profile, loss, bursty). The runner brings up one topology per
cell with :meth:`vtl.testbed.Topology.pair` and reuses it for every
transport, workload and repeat of that cell, then tears it down: a fresh
topology per loss level keeps the emulator's state (queues, loss-model
state, counters) from one cell out of the next, and costs a second or two.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Cell:
    profile: str
    loss: float
    bursty: bool = False

    @property
    def label(self) -> str:
        return f"{self.profile} {self.loss:g}%{' bursty' if self.bursty else ''}"


@dataclass(frozen=True)
class ProfileInfo:
    name: str
    rate_mbps: float | None  # bottleneck rate (None: no emulated rate, e.g. clean)
    rtt_ms: float | None  # base round-trip time (None: not emulated)
    description: str = ""


def profile_info(name: str) -> ProfileInfo:
    """Rate (of the a->b direction, which carries the bulk data; a trace's mean
    rate) and base RTT of a named profile (``vtl.testbed.profiles``)."""
    from vtl.testbed import profiles

    if name not in profiles.PROFILES:
        known = ", ".join(profiles.PROFILES)
        raise KeyError(f"unknown profile {name!r} (known: {known})")
    prof = profiles.PROFILES[name]
    ab, ba = profiles.get(name, 0.0)
    rtt = ab.delay_ms + ba.delay_ms
    return ProfileInfo(
        name=name,
        rate_mbps=profiles.physical_limit_mbps(name, 0.0),
        rtt_ms=rtt if prof.emulated else None,
        description=prof.description,
    )


def profile_names() -> list[str]:
    from vtl.testbed import profiles

    return list(profiles.PROFILES)


@contextlib.contextmanager
def open_cell(cell: Cell) -> Iterator[Any]:
    """Bring the cell's topology up; yields the running topology (``.hosts``)."""
    from vtl.testbed.topology import Topology

    topo = Topology.pair(profile=cell.profile, loss=cell.loss, bursty=cell.bursty)
    with topo.up() as net:
        yield net
