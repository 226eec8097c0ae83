"""Which peer hosts run a carrier: capable, incapable or not known yet.

A hooked connection to a host without a Hooker must fall back to plain TCP
and may cost the application at most one short probe timeout per peer, not
one per connection.  So the answer is remembered (incapable peers are
probed again after ``incapable_ttl``, as they may start a Hooker), and while
one probe to a new peer is running every other flow to that peer waits for
its outcome instead of probing too.  Change callbacks let the daemon mirror
the table into a BPF map.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

Peer = Hashable  # usually the peer host's IP address as a string


class PeerState(enum.Enum):
    UNKNOWN = "unknown"
    CAPABLE = "capable"
    INCAPABLE = "incapable"


ChangeCallback = Callable[[Any, PeerState, PeerState], None]


@dataclass
class _Entry:
    state: PeerState
    expires: float | None  # clock time; None: until told otherwise
    reason: str = ""
    since: float = 0.0


class PeerCache:
    """Per-peer carrier capability with TTLs and a single probe in flight."""

    def __init__(
        self,
        *,
        incapable_ttl: float = 60.0,
        capable_ttl: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.incapable_ttl = incapable_ttl
        self.capable_ttl = capable_ttl
        self._clock = clock
        self._entries: dict[Peer, _Entry] = {}
        self._probes: dict[Peer, asyncio.Future[None]] = {}
        self._callbacks: list[ChangeCallback] = []
        self.counters = {"probes": 0, "probe_waits": 0, "capable": 0, "incapable": 0}

    # ---------------------------------------------------------- queries

    def state(self, peer: Peer) -> PeerState:
        entry = self._entries.get(peer)
        if entry is None:
            return PeerState.UNKNOWN
        if entry.expires is not None and self._clock() >= entry.expires:
            del self._entries[peer]
            self._notify(peer, entry.state, PeerState.UNKNOWN)
            return PeerState.UNKNOWN
        return entry.state

    def probing(self, peer: Peer) -> bool:
        return peer in self._probes

    def snapshot(self) -> dict[str, dict[str, Any]]:
        """Every known peer: state, reason, seconds left before a re-probe."""
        now = self._clock()
        out = {}
        for peer in list(self._entries):
            if self.state(peer) is PeerState.UNKNOWN:
                continue
            e = self._entries[peer]
            out[str(peer)] = {
                "state": e.state.value,
                "reason": e.reason,
                "expires_in": None if e.expires is None else round(e.expires - now, 3),
            }
        for peer in self._probes:
            out.setdefault(str(peer), {"state": PeerState.UNKNOWN.value, "reason": "probing"})
        return out

    def expire(self) -> None:
        """Drop expired entries now (callbacks fire) instead of lazily."""
        for peer in list(self._entries):
            self.state(peer)

    # ----------------------------------------------------------- probing

    async def classify(self, peer: Peer) -> PeerState:
        """CAPABLE or INCAPABLE when known.  UNKNOWN means the caller now owns
        the probe for ``peer`` and must end it with :meth:`record` or
        :meth:`abandon`; other callers wait for that outcome meanwhile."""
        while True:
            st = self.state(peer)
            if st is not PeerState.UNKNOWN:
                return st
            fut = self._probes.get(peer)
            if fut is None:
                self._probes[peer] = asyncio.get_running_loop().create_future()
                self.counters["probes"] += 1
                return PeerState.UNKNOWN
            self.counters["probe_waits"] += 1
            await asyncio.shield(fut)

    def record(self, peer: Peer, capable: bool, reason: str = "") -> None:
        """What a probe (or a flow) found out about ``peer``."""
        new = PeerState.CAPABLE if capable else PeerState.INCAPABLE
        ttl = self.capable_ttl if capable else self.incapable_ttl
        now = self._clock()
        old = self.state(peer)
        self._entries[peer] = _Entry(new, None if ttl is None else now + ttl, reason, now)
        self.counters[new.value] += 1
        self._release(peer)
        if old is not new:
            self._notify(peer, old, new)

    def abandon(self, peer: Peer) -> None:
        """The probe ended without an answer: let a waiter probe instead."""
        self._release(peer)

    def forget(self, peer: Peer) -> None:
        entry = self._entries.pop(peer, None)
        if entry is not None:
            self._notify(peer, entry.state, PeerState.UNKNOWN)

    def _release(self, peer: Peer) -> None:
        fut = self._probes.pop(peer, None)
        if fut is not None and not fut.done():
            fut.set_result(None)

    # --------------------------------------------------------- callbacks

    def on_change(self, callback: ChangeCallback) -> None:
        """``callback(peer, old_state, new_state)`` on every change."""
        self._callbacks.append(callback)

    def _notify(self, peer: Peer, old: PeerState, new: PeerState) -> None:
        for cb in list(self._callbacks):
            try:
                cb(peer, old, new)
            except Exception:  # a mirror that fails must not break the flows
                log.exception("peer cache: change callback failed")


__all__ = ["PeerCache", "PeerState"]
