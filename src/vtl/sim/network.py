"""Deterministic discrete-event network simulator for sans-I/O endpoints.

The protocol core has no sockets and no clock, so tests drive it: this module
owns a simulated clock and a heap of events (datagram deliveries and node
timers) and feeds them to attached nodes in time order. After every event that
touches a node, the node is polled with ``datagrams_to_send(now)`` and its
``next_timer()`` is re-read, so nothing is ever missed and no busy loop is
needed.

Every random decision comes from a ``random.Random`` seeded from the network
seed and the direction (src, dst), so the same seed gives the same run bit for
bit, and changing the conditions of one direction does not perturb another.

Per datagram, a direction applies in this order:
MTU check -> bottleneck queue (drop-tail) and serialisation -> random loss
(Gilbert-Elliott, then independent) -> duplication -> per copy: corruption,
propagation delay + jitter, reordering hold-back.
"""

from __future__ import annotations

import heapq
import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol, TypeAlias

Address: TypeAlias = tuple[Any, ...]
"""Node address, e.g. ``("10.0.0.1", 4433)``; any hashable tuple works."""

TIMER_EPSILON = 1e-6
"""How far the clock is pushed when a timer that just fired is still due."""


class Node(Protocol):
    """What the simulator drives (``vtl.core.endpoint.EndpointCore`` matches it)."""

    def receive(self, datagram: bytes, addr: Address, now: float) -> None: ...

    def datagrams_to_send(self, now: float) -> list[tuple[bytes, Address]]: ...

    def next_timer(self) -> float | None: ...

    def handle_timer(self, now: float) -> None: ...


class SimError(RuntimeError):
    """Base class for simulator errors that reveal a bug in a driven node."""


class TimerStallError(SimError):
    """A node kept reporting a due timer after it fired, without sending anything."""


class LivelockError(SimError):
    """Too many events at one instant: the simulated clock can no longer advance."""


def _check_probability(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a probability in [0, 1], got {value!r}")


@dataclass(frozen=True)
class GilbertElliott:
    """Two-state Markov loss model, stepped once per datagram, for bursty loss.

    Mean burst (bad-state) length is ``1 / p_bad_to_good`` datagrams.
    """

    p_good_to_bad: float
    p_bad_to_good: float
    loss_in_bad: float = 1.0
    loss_in_good: float = 0.0

    def __post_init__(self) -> None:
        for name in ("p_good_to_bad", "p_bad_to_good", "loss_in_bad", "loss_in_good"):
            _check_probability(name, getattr(self, name))


@dataclass(frozen=True)
class LinkConditions:
    """Impairments of one direction of a link. The default is an ideal link.

    ``jitter`` is uniform in ``[-jitter, +jitter]`` around ``delay`` (arrival is
    never before departure) and never reorders on its own: ordinary datagrams
    keep FIFO order. Reordering comes only from ``reorder``: such a datagram is
    held back by an extra ``reorder_delay`` and left out of the FIFO chain, so
    later datagrams may overtake it. With ``rate_bps`` set, datagrams are
    serialised at that rate behind a drop-tail queue of ``queue_bytes`` (the
    datagram being serialised counts toward the queue).
    """

    delay: float = 0.0
    jitter: float = 0.0
    loss: float = 0.0
    burst_loss: GilbertElliott | None = None
    duplicate: float = 0.0
    corrupt: float = 0.0
    #: bytes of each datagram corruption may hit, as a slice ``(start, stop)``
    #: (negative: from the end; None: anywhere); too short a datagram is spared
    corrupt_range: tuple[int | None, int | None] | None = None
    reorder: float = 0.0
    reorder_delay: float = 0.01
    rate_bps: float | None = None
    queue_bytes: int = 64 * 1024
    mtu: int | None = None

    def __post_init__(self) -> None:
        for name in ("delay", "jitter", "reorder_delay"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        for name in ("loss", "duplicate", "corrupt", "reorder"):
            _check_probability(name, getattr(self, name))
        if self.rate_bps is not None and self.rate_bps <= 0:
            raise ValueError(f"rate_bps must be > 0 or None, got {self.rate_bps!r}")
        if self.queue_bytes <= 0:
            raise ValueError(f"queue_bytes must be > 0, got {self.queue_bytes!r}")
        if self.mtu is not None and self.mtu <= 0:
            raise ValueError(f"mtu must be > 0 or None, got {self.mtu!r}")


@dataclass
class LinkStats:
    """Counters for one direction. Once the network is drained,
    ``delivered == sent - dropped_* + duplicated``."""

    sent: int = 0
    delivered: int = 0
    dropped_loss: int = 0
    dropped_queue: int = 0
    dropped_mtu: int = 0
    dropped_no_route: int = 0
    duplicated: int = 0
    corrupted: int = 0
    reordered: int = 0
    bytes_sent: int = 0
    bytes_delivered: int = 0

    @property
    def dropped(self) -> int:
        """All drops, whatever the cause."""
        return self.dropped_loss + self.dropped_queue + self.dropped_mtu + self.dropped_no_route


class TraceEntry(NamedTuple):
    """One datagram's fate, for debugging and determinism checks.

    ``fate`` is ``"lost"``, ``"queue-drop"``, ``"mtu-drop"``, ``"no-route"``
    (recorded at send time), or ``"delivered"`` with optional ``+dup``,
    ``+corrupt``, ``+reorder`` suffixes (recorded at arrival time).
    """

    time: float
    src: Address
    dst: Address
    size: int
    fate: str


@dataclass
class _Direction:
    """Mutable state of one direction: conditions, RNG, queue, stats."""

    conditions: LinkConditions
    rng: random.Random
    stats: LinkStats = field(default_factory=LinkStats)
    ge_bad: bool = False
    busy_until: float = 0.0
    queue: deque[tuple[float, int]] = field(default_factory=deque)
    queued_bytes: int = 0
    fifo_floor: float = 0.0


@dataclass
class _NodeState:
    node: Node
    timer_gen: int = 0
    stall: int = 0


_DELIVER = 0
_TIMER = 1


class SimNetwork:
    """Simulated clock + network connecting sans-I/O nodes by address."""

    def __init__(
        self,
        seed: int,
        *,
        default: LinkConditions | None = None,
        trace: bool = False,
        timer_stall_limit: int = 10_000,
        max_events_per_instant: int = 1_000_000,
    ) -> None:
        """``default`` applies to directions never given to :meth:`link`.
        ``timer_stall_limit`` and ``max_events_per_instant`` turn node bugs
        that would spin forever into :class:`SimError`."""
        self.seed = seed
        self.default = default if default is not None else LinkConditions()
        self.trace: list[TraceEntry] | None = [] if trace else None
        self.timer_stall_limit = timer_stall_limit
        self.max_events_per_instant = max_events_per_instant
        self.timer_clamps = 0
        """Times a just-fired timer was still due and was pushed by 1 µs."""
        self.events_processed = 0
        self._now = 0.0
        self._nodes: dict[Address, _NodeState] = {}
        self._dirs: dict[tuple[Address, Address], _Direction] = {}
        self._heap: list[tuple[float, int, int, Any]] = []
        self._seq = 0
        self._instant = -1.0
        self._instant_events = 0

    # -- topology ---------------------------------------------------------

    @property
    def now(self) -> float:
        """Simulated time in seconds; starts at 0.0 and only moves forward."""
        return self._now

    def attach(self, addr: Address, node: Node) -> None:
        """Make ``node`` reachable at ``addr``; it is first polled by the next run/poke."""
        if addr in self._nodes:
            raise ValueError(f"address {addr!r} already attached")
        self._nodes[addr] = _NodeState(node)

    def link(
        self,
        addr_a: Address,
        addr_b: Address,
        forward: LinkConditions,
        backward: LinkConditions | None = None,
    ) -> None:
        """Set conditions a->b (``forward``) and b->a (``backward``, default symmetric).

        May be called mid-run: queue state, loss-model state and stats are kept.
        """
        self._direction(addr_a, addr_b).conditions = forward
        self._direction(addr_b, addr_a).conditions = backward if backward is not None else forward

    def stats(self, src: Address, dst: Address) -> LinkStats:
        """Counters for datagrams sent from ``src`` to ``dst``."""
        return self._direction(src, dst).stats

    def all_stats(self) -> dict[tuple[Address, Address], LinkStats]:
        """Counters of every direction used or configured so far."""
        return {key: d.stats for key, d in self._dirs.items()}

    @property
    def pending_events(self) -> int:
        """Queued events (including stale timer entries)."""
        return len(self._heap)

    # -- driving ----------------------------------------------------------

    def poke(self, addr: Address | None = None) -> None:
        """Poll one node (or all, in attach order) for datagrams and its timer.

        Call after the application acted on a node outside the event loop;
        ``run`` and ``run_until`` do this for all nodes when they start.
        """
        addrs = [addr] if addr is not None else list(self._nodes)
        for a in addrs:
            self._poll(a, fired=False)

    def run(self, until: float) -> None:
        """Process all events up to absolute time ``until``, then set the clock to it."""
        if until < self._now:
            raise ValueError(f"cannot run backwards: until={until} < now={self._now}")
        self.poke()
        while self._heap and self._heap[0][0] <= until:
            self._step()
        self._now = until

    def run_until(self, predicate: Callable[[], bool], timeout: float) -> bool:
        """Process events until ``predicate()`` holds (checked after every event)
        or ``timeout`` simulated seconds pass; returns whether it held.
        On timeout the clock is left at the deadline."""
        deadline = self._now + timeout
        self.poke()
        if predicate():
            return True
        while self._heap and self._heap[0][0] <= deadline:
            self._step()
            if predicate():
                return True
        self._now = deadline
        return predicate()

    # -- internals --------------------------------------------------------

    def _push(self, time: float, kind: int, payload: Any) -> None:
        # The sequence number breaks ties: equal-time events run in the order
        # they were scheduled, which makes runs deterministic.
        heapq.heappush(self._heap, (time, self._seq, kind, payload))
        self._seq += 1

    def _direction(self, src: Address, dst: Address) -> _Direction:
        key = (src, dst)
        d = self._dirs.get(key)
        if d is None:
            # String seeds are hashed with SHA-512: stable across processes.
            rng = random.Random(f"{self.seed}|{src!r}|{dst!r}")
            d = self._dirs[key] = _Direction(self.default, rng)
        return d

    def _step(self) -> None:
        time, _, kind, payload = heapq.heappop(self._heap)
        if time == self._instant:
            self._instant_events += 1
            if self._instant_events > self.max_events_per_instant:
                raise LivelockError(f"more than {self.max_events_per_instant} events at t={time}")
        else:
            self._instant = time
            self._instant_events = 1
        self._now = time
        self.events_processed += 1
        if kind == _DELIVER:
            self._deliver(*payload)
        else:
            self._fire_timer(*payload)

    def _deliver(self, src: Address, dst: Address, data: bytes, fate: str) -> None:
        d = self._dirs[(src, dst)]
        d.stats.delivered += 1
        d.stats.bytes_delivered += len(data)
        self._record(src, dst, len(data), fate)
        self._nodes[dst].node.receive(data, src, self._now)
        self._poll(dst, fired=False)

    def _fire_timer(self, addr: Address, gen: int) -> None:
        state = self._nodes[addr]
        if gen != state.timer_gen:
            return  # superseded by a later poll
        when = state.node.next_timer()
        if when is None or when > self._now:
            # The node changed its timer outside the loop without a poke.
            self._schedule_timer(addr, fired=False, produced=False)
            return
        state.node.handle_timer(self._now)
        self._poll(addr, fired=True)

    def _poll(self, addr: Address, *, fired: bool) -> None:
        state = self._nodes[addr]
        out = state.node.datagrams_to_send(self._now)
        for data, dst in out:
            self._transmit(addr, dst, bytes(data))
        self._schedule_timer(addr, fired=fired, produced=bool(out))

    def _schedule_timer(self, addr: Address, *, fired: bool, produced: bool) -> None:
        state = self._nodes[addr]
        state.timer_gen += 1
        when = state.node.next_timer()
        if when is None or when > self._now or produced:
            state.stall = 0
        if when is None:
            return
        if when <= self._now:
            if fired:
                # Handled but still due: push the clock a hair so time can move,
                # and fail loudly if the node never makes progress.
                self.timer_clamps += 1
                if not produced:
                    state.stall += 1
                    if state.stall >= self.timer_stall_limit:
                        raise TimerStallError(
                            f"node {addr!r} reported a due timer ({when}) {state.stall} "
                            f"times in a row at t={self._now} without sending anything"
                        )
                when = self._now + TIMER_EPSILON
            else:
                when = self._now
        self._push(when, _TIMER, (addr, state.timer_gen))

    def _record(self, src: Address, dst: Address, size: int, fate: str) -> None:
        if self.trace is not None:
            self.trace.append(TraceEntry(self._now, src, dst, size, fate))

    def _transmit(self, src: Address, dst: Address, data: bytes) -> None:
        d = self._direction(src, dst)
        c = d.conditions
        st = d.stats
        size = len(data)
        st.sent += 1
        st.bytes_sent += size
        now = self._now

        if dst not in self._nodes:
            st.dropped_no_route += 1
            self._record(src, dst, size, "no-route")
            return
        if c.mtu is not None and size > c.mtu:
            st.dropped_mtu += 1
            self._record(src, dst, size, "mtu-drop")
            return

        departure = now
        if c.rate_bps is not None:
            while d.queue and d.queue[0][0] <= now:
                d.queued_bytes -= d.queue.popleft()[1]
            if d.queued_bytes + size > c.queue_bytes:
                st.dropped_queue += 1
                self._record(src, dst, size, "queue-drop")
                return
            d.busy_until = max(now, d.busy_until) + size * 8 / c.rate_bps
            departure = d.busy_until
            d.queue.append((departure, size))
            d.queued_bytes += size

        rng = d.rng
        lost = False
        ge = c.burst_loss
        if ge is not None:
            p = ge.loss_in_bad if d.ge_bad else ge.loss_in_good
            lost = p > 0 and rng.random() < p
            flip = ge.p_bad_to_good if d.ge_bad else ge.p_good_to_bad
            if rng.random() < flip:
                d.ge_bad = not d.ge_bad
        if not lost and c.loss > 0:
            lost = rng.random() < c.loss
        if lost:
            st.dropped_loss += 1
            self._record(src, dst, size, "lost")
            return

        copies = 1
        if c.duplicate > 0 and rng.random() < c.duplicate:
            st.duplicated += 1
            copies = 2
        for i in range(copies):
            fate = "delivered+dup" if i else "delivered"
            payload = data
            if c.corrupt > 0 and size > 0 and rng.random() < c.corrupt:
                flipped = _flip_bits(data, rng, c.corrupt_range)
                if flipped != data:
                    payload = flipped
                    st.corrupted += 1
                    fate += "+corrupt"
            arrival = departure + c.delay
            if c.jitter > 0:
                arrival = max(departure, arrival + rng.uniform(-c.jitter, c.jitter))
            if c.reorder > 0 and rng.random() < c.reorder:
                arrival += c.reorder_delay
                st.reordered += 1
                fate += "+reorder"
            else:
                arrival = max(arrival, d.fifo_floor)
                d.fifo_floor = arrival
            self._push(arrival, _DELIVER, (src, dst, payload, fate))


def _flip_bits(
    data: bytes, rng: random.Random, where: tuple[int | None, int | None] | None = None
) -> bytes:
    """Flip 1-3 distinct random bits (inside the byte slice ``where``), so the
    result always differs from ``data`` unless the slice is empty."""
    first = 0
    stop = len(data)
    if where is not None:
        span = range(len(data))[slice(*where)]
        if not span:
            return data
        first, stop = span.start, span.stop
    nbits = (stop - first) * 8
    buf = bytearray(data)
    for bit in rng.sample(range(nbits), min(rng.randint(1, 3), nbits)):
        buf[first + (bit >> 3)] ^= 1 << (bit & 7)
    return bytes(buf)
