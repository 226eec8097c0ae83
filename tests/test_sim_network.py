"""Tests for the deterministic simulated network (vtl.sim)."""

from __future__ import annotations

import math
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vtl.sim import (
    GilbertElliott,
    LinkConditions,
    LivelockError,
    SimNetwork,
    TimerStallError,
)

A = ("10.0.0.1", 1000)
B = ("10.0.0.2", 2000)


# -- fake nodes ---------------------------------------------------------------


class Sink:
    """Records every datagram it receives; never sends, no timers."""

    def __init__(self) -> None:
        self.received: list[tuple[float, bytes, tuple]] = []

    def receive(self, datagram: bytes, addr: tuple, now: float) -> None:
        self.received.append((now, datagram, addr))

    def datagrams_to_send(self, now: float) -> list[tuple[bytes, tuple]]:
        return []

    def next_timer(self) -> float | None:
        return None

    def handle_timer(self, now: float) -> None:
        pass

    def seqs(self) -> list[int]:
        return [struct.unpack_from("!I", d)[0] for _, d, _ in self.received]


class Counter(Sink):
    """Sends ``count`` numbered datagrams of ``size`` bytes to ``peer`` on first poll."""

    def __init__(self, peer: tuple, count: int, size: int = 100) -> None:
        super().__init__()
        self.peer = peer
        self.count = count
        self.size = size
        self.done = False
        self.sent: list[bytes] = []

    def datagrams_to_send(self, now: float) -> list[tuple[bytes, tuple]]:
        if self.done:
            return []
        self.done = True
        self.sent = [_numbered(i, self.size) for i in range(self.count)]
        return [(d, self.peer) for d in self.sent]


class Paced(Sink):
    """Sends one numbered datagram every ``interval`` seconds, driven by its timer."""

    def __init__(self, peer: tuple, count: int, interval: float, size: int = 100) -> None:
        super().__init__()
        self.peer = peer
        self.count = count
        self.interval = interval
        self.size = size
        self.next_seq = 0
        self.due: float | None = 0.0
        self.outbox: list[tuple[bytes, tuple]] = []

    def next_timer(self) -> float | None:
        return self.due

    def handle_timer(self, now: float) -> None:
        self.outbox.append((_numbered(self.next_seq, self.size), self.peer))
        self.next_seq += 1
        self.due = now + self.interval if self.next_seq < self.count else None

    def datagrams_to_send(self, now: float) -> list[tuple[bytes, tuple]]:
        out, self.outbox = self.outbox, []
        return out


class Echo(Sink):
    """Sends every received datagram back to its sender (and ``initial`` first)."""

    def __init__(self, initial: tuple[bytes, tuple] | None = None) -> None:
        super().__init__()
        self.outbox: list[tuple[bytes, tuple]] = [initial] if initial else []

    def receive(self, datagram: bytes, addr: tuple, now: float) -> None:
        super().receive(datagram, addr, now)
        self.outbox.append((datagram, addr))

    def datagrams_to_send(self, now: float) -> list[tuple[bytes, tuple]]:
        out, self.outbox = self.outbox, []
        return out


class Timers(Sink):
    """Fires at the given absolute times and records when it was called."""

    def __init__(self, times: list[float]) -> None:
        super().__init__()
        self.pending = sorted(times)
        self.fired: list[float] = []

    def next_timer(self) -> float | None:
        return self.pending[0] if self.pending else None

    def handle_timer(self, now: float) -> None:
        self.fired.append(now)
        while self.pending and self.pending[0] <= now:
            self.pending.pop(0)


class StuckTimer(Sink):
    """Buggy node: reports a timer in the past for ``stuck_for`` firings (forever if None)."""

    def __init__(self, stuck_for: int | None = None) -> None:
        super().__init__()
        self.stuck_for = stuck_for
        self.calls = 0

    def next_timer(self) -> float | None:
        if self.stuck_for is not None and self.calls >= self.stuck_for:
            return None
        return 0.0

    def handle_timer(self, now: float) -> None:
        self.calls += 1


class Outbox(Sink):
    """Application-driven node: ``send`` queues outside the event loop."""

    def __init__(self) -> None:
        super().__init__()
        self.outbox: list[tuple[bytes, tuple]] = []

    def send(self, data: bytes, addr: tuple) -> None:
        self.outbox.append((data, addr))

    def datagrams_to_send(self, now: float) -> list[tuple[bytes, tuple]]:
        out, self.outbox = self.outbox, []
        return out


def _numbered(seq: int, size: int) -> bytes:
    """``size`` bytes (a multiple of 4) repeating ``seq``, so corruption is detectable."""
    return struct.pack("!I", seq) * (size // 4)


def _pair(
    cond: LinkConditions, count: int, size: int = 100, seed: int = 1, trace: bool = False
) -> tuple[SimNetwork, Counter, Sink]:
    net = SimNetwork(seed, trace=trace)
    sender, sink = Counter(B, count, size), Sink()
    net.attach(A, sender)
    net.attach(B, sink)
    net.link(A, B, cond)
    return net, sender, sink


def _within_3_sigma(observed: int, n: int, p: float) -> bool:
    return abs(observed - n * p) <= 3 * math.sqrt(n * p * (1 - p))


# -- delay and timers ------------------------------------------------------------


def test_delivery_delay_equals_configured_delay() -> None:
    net, _, sink = _pair(LinkConditions(delay=0.05), count=3)
    net.run(1.0)
    assert [t for t, _, _ in sink.received] == [0.05, 0.05, 0.05]
    assert all(addr == A for _, _, addr in sink.received)
    assert net.now == 1.0


def test_asymmetric_echo_round_trip() -> None:
    net = SimNetwork(0)
    sender, echo = Counter(B, 1), Echo()
    net.attach(A, sender)
    net.attach(B, echo)
    net.link(A, B, LinkConditions(delay=0.03), LinkConditions(delay=0.07))
    assert net.run_until(lambda: bool(sender.received), timeout=1.0)
    assert net.now == pytest.approx(0.1)
    assert sender.received[0][1] == sender.sent[0]
    assert echo.received[0][0] == pytest.approx(0.03)


def test_default_link_used_for_unconfigured_pairs() -> None:
    net = SimNetwork(0, default=LinkConditions(delay=0.2))
    sender, sink = Counter(B, 1), Sink()
    net.attach(A, sender)
    net.attach(B, sink)
    net.run(1.0)
    assert sink.received[0][0] == pytest.approx(0.2)


def test_timers_fire_at_the_right_time() -> None:
    net = SimNetwork(0)
    node = Timers([0.25, 1.0, 1.5])
    net.attach(A, node)
    net.run(1.2)
    assert node.fired == [0.25, 1.0]
    assert net.now == 1.2
    net.run(5.0)
    assert node.fired == [0.25, 1.0, 1.5]
    assert net.timer_clamps == 0


def test_paced_sender_timer_driven() -> None:
    net = SimNetwork(0)
    sender, sink = Paced(B, count=5, interval=0.1), Sink()
    net.attach(A, sender)
    net.attach(B, sink)
    net.link(A, B, LinkConditions(delay=0.01))
    net.run(10.0)
    assert [t for t, _, _ in sink.received] == pytest.approx([0.01, 0.11, 0.21, 0.31, 0.41])


def test_run_until_true_and_timeout() -> None:
    net, _, sink = _pair(LinkConditions(delay=0.5), count=1)
    assert not net.run_until(lambda: bool(sink.received), timeout=0.3)
    assert net.now == pytest.approx(0.3)
    assert net.run_until(lambda: bool(sink.received), timeout=1.0)
    assert net.now == pytest.approx(0.5)


def test_poke_sends_application_data_queued_outside_the_loop() -> None:
    net = SimNetwork(0)
    app, sink = Outbox(), Sink()
    net.attach(A, app)
    net.attach(B, sink)
    net.link(A, B, LinkConditions(delay=0.01))
    net.run(1.0)
    app.send(b"hello", B)
    net.poke(A)  # sent at t=1.0 without waiting for another run
    net.run(2.0)
    assert sink.received == [(1.01, b"hello", A)]


def test_run_backwards_rejected() -> None:
    net = SimNetwork(0)
    net.run(1.0)
    with pytest.raises(ValueError):
        net.run(0.5)


# -- engine-bug guards -----------------------------------------------------------


def test_timer_in_the_past_forever_raises() -> None:
    net = SimNetwork(0)
    node = StuckTimer()
    net.attach(A, node)
    with pytest.raises(TimerStallError):
        net.run(10.0)
    assert node.calls == net.timer_stall_limit


def test_transient_past_timer_is_clamped_not_fatal() -> None:
    net = SimNetwork(0)
    node = StuckTimer(stuck_for=50)
    net.attach(A, node)
    net.run(1.0)
    assert node.calls == 50
    assert net.timer_clamps == 49  # the first firing is legitimately due
    assert net.now == 1.0


def test_zero_delay_ping_pong_raises_livelock() -> None:
    net = SimNetwork(0, max_events_per_instant=1000)
    net.attach(A, Echo(initial=(b"ping", B)))
    net.attach(B, Echo())
    with pytest.raises(LivelockError):
        net.run(1.0)


# -- impairments ----------------------------------------------------------------


def test_loss_rate_within_3_sigma() -> None:
    n, p = 20_000, 0.1
    net, _, sink = _pair(LinkConditions(delay=0.01, loss=p), count=n)
    net.run(1.0)
    s = net.stats(A, B)
    assert s.sent == n
    assert _within_3_sigma(s.dropped_loss, n, p)
    assert s.delivered == len(sink.received) == n - s.dropped_loss
    assert s.dropped_queue == s.duplicated == s.corrupted == 0


def test_duplicates_counted_and_delivered() -> None:
    n, p = 20_000, 0.05
    net, _, sink = _pair(LinkConditions(delay=0.01, duplicate=p), count=n)
    net.run(1.0)
    s = net.stats(A, B)
    assert _within_3_sigma(s.duplicated, n, p)
    assert len(sink.received) == s.delivered == n + s.duplicated
    assert len(set(sink.seqs())) == n


def test_corruption_flips_one_to_three_bits() -> None:
    n, p = 20_000, 0.05
    net, sender, sink = _pair(LinkConditions(corrupt=p), count=n, size=64)
    net.run(1.0)
    s = net.stats(A, B)
    assert _within_3_sigma(s.corrupted, n, p)
    # Zero delay, no reordering: datagrams arrive in send order.
    flipped = [
        sum(bin(x ^ y).count("1") for x, y in zip(orig, got, strict=True))
        for orig, (_, got, _) in zip(sender.sent, sink.received, strict=True)
    ]
    damaged = [f for f in flipped if f]
    assert len(damaged) == s.corrupted
    assert all(1 <= f <= 3 for f in damaged)
    assert {1, 2, 3} <= set(damaged)


def test_mtu_drops_counted() -> None:
    net = SimNetwork(0)
    app, sink = Outbox(), Sink()
    net.attach(A, app)
    net.attach(B, sink)
    net.link(A, B, LinkConditions(mtu=1200))
    app.send(bytes(1200), B)
    app.send(bytes(1201), B)
    net.run(1.0)
    s = net.stats(A, B)
    assert (s.sent, s.delivered, s.dropped_mtu) == (2, 1, 1)
    assert s.dropped_loss == 0


def test_unknown_destination_counted_as_no_route() -> None:
    net = SimNetwork(0)
    app = Outbox()
    net.attach(A, app)
    app.send(b"x", B)
    net.run(1.0)
    assert net.stats(A, B).dropped_no_route == 1


def test_fifo_preserved_with_jitter_when_reorder_is_zero() -> None:
    net = SimNetwork(7)
    sender, sink = Paced(B, count=2000, interval=0.001), Sink()
    net.attach(A, sender)
    net.attach(B, sink)
    net.link(A, B, LinkConditions(delay=0.05, jitter=0.02))
    net.run(10.0)
    assert sink.seqs() == list(range(2000))
    # Jitter really is applied: one-way delays vary.
    delays = [t - seq * 0.001 for (t, _, _), seq in zip(sink.received, sink.seqs(), strict=True)]
    assert max(delays) - min(delays) > 0.02
    assert min(delays) >= 0.03 - 1e-9
    assert net.stats(A, B).reordered == 0


def test_reordering_happens_when_reorder_positive() -> None:
    n, p = 2000, 0.1
    net = SimNetwork(7)
    sender, sink = Paced(B, count=n, interval=0.001), Sink()
    net.attach(A, sender)
    net.attach(B, sink)
    net.link(A, B, LinkConditions(delay=0.05, jitter=0.002, reorder=p, reorder_delay=0.01))
    net.run(10.0)
    seqs = sink.seqs()
    assert sorted(seqs) == list(range(n))
    assert seqs != list(range(n))
    s = net.stats(A, B)
    assert _within_3_sigma(s.reordered, n, p)
    # Every datagram that arrives after a higher sequence number was held back.
    late = sum(1 for i, q in enumerate(seqs) if q < max(seqs[: i + 1]))
    assert 0 < late <= s.reordered


def test_rate_limit_serialisation() -> None:
    net, _, sink = _pair(
        LinkConditions(delay=0.01, rate_bps=8e6, queue_bytes=10**7), count=1000, size=1000
    )
    net.run(5.0)
    times = [t for t, _, _ in sink.received]
    assert len(times) == 1000
    assert times[0] == pytest.approx(0.001 + 0.01)
    assert times[-1] == pytest.approx(1.0 + 0.01)
    assert net.stats(A, B).dropped_queue == 0


def test_rate_limit_queue_overflow_drops() -> None:
    # Default queue is 64 KiB: 65 datagrams of 1000 bytes fit, the rest are tail-dropped.
    net, _, sink = _pair(LinkConditions(rate_bps=8e6), count=1000, size=1000)
    net.run(5.0)
    s = net.stats(A, B)
    assert s.delivered == len(sink.received) == 65
    assert s.dropped_queue == 935
    assert s.dropped_loss == 0
    assert sink.seqs() == list(range(65))


def test_queue_drains_over_time() -> None:
    # Paced at exactly the bottleneck rate, nothing queues up: no drops.
    net = SimNetwork(0)
    sender, sink = Paced(B, count=500, interval=0.001, size=1000), Sink()
    net.attach(A, sender)
    net.attach(B, sink)
    net.link(A, B, LinkConditions(rate_bps=8e6, queue_bytes=2000))
    net.run(5.0)
    assert net.stats(A, B).dropped_queue == 0
    assert len(sink.received) == 500


def _loss_bursts(received: list[int], n: int) -> list[int]:
    got = set(received)
    bursts, run = [], 0
    for i in range(n):
        if i in got:
            if run:
                bursts.append(run)
            run = 0
        else:
            run += 1
    if run:
        bursts.append(run)
    return bursts


def test_gilbert_elliott_produces_bursts() -> None:
    n = 20_000
    ge = GilbertElliott(p_good_to_bad=0.02, p_bad_to_good=0.25, loss_in_bad=1.0)
    net, _, sink = _pair(LinkConditions(burst_loss=ge), count=n)
    net.run(1.0)
    bursts = _loss_bursts(sink.seqs(), n)
    mean_burst = sum(bursts) / len(bursts)
    assert mean_burst > 2.5  # expected 1 / p_bad_to_good = 4
    lost = net.stats(A, B).dropped_loss
    assert lost == sum(bursts)
    # Stationary loss rate 0.02 / (0.02 + 0.25) ~ 7.4 %.
    assert 0.05 < lost / n < 0.10

    # Independent loss at the same rate gives bursts of ~1.
    net2, _, sink2 = _pair(LinkConditions(loss=lost / n), count=n)
    net2.run(1.0)
    iid = _loss_bursts(sink2.seqs(), n)
    assert sum(iid) / len(iid) < 1.2


# -- determinism ---------------------------------------------------------------


def _impaired_run(seed: int) -> tuple[list, list[bytes], list[bytes]]:
    cond = LinkConditions(
        delay=0.02,
        jitter=0.01,
        loss=0.05,
        burst_loss=GilbertElliott(0.01, 0.3),
        duplicate=0.05,
        corrupt=0.05,
        reorder=0.05,
        rate_bps=1e6,  # the sender offers 1.2 Mbit/s: the queue overflows
        queue_bytes=20_000,
    )
    net = SimNetwork(seed, trace=True)
    sender, echo = Paced(B, count=500, interval=0.002, size=300), Echo()
    net.attach(A, sender)
    net.attach(B, echo)
    net.link(A, B, cond)
    net.run(5.0)
    assert net.trace is not None
    return (
        net.trace,
        [d for _, d, _ in echo.received],
        [d for _, d, _ in sender.received],
    )


def test_same_seed_identical_run() -> None:
    first = _impaired_run(42)
    second = _impaired_run(42)
    assert first == second
    trace = first[0]
    fates = {e.fate.split("+")[0] for e in trace}
    assert {"delivered", "lost", "queue-drop"} <= fates
    assert any("+corrupt" in e.fate for e in trace)
    assert any("+dup" in e.fate for e in trace)


def test_different_seed_different_run() -> None:
    assert _impaired_run(1)[0] != _impaired_run(2)[0]


def test_trace_records_fates() -> None:
    net, _, _ = _pair(LinkConditions(delay=0.1, mtu=50), count=1, size=40, trace=True)
    net.run(1.0)
    assert net.trace == [(0.1, A, B, 40, "delivered")]


def test_invalid_conditions_rejected() -> None:
    with pytest.raises(ValueError):
        LinkConditions(loss=1.5)
    with pytest.raises(ValueError):
        LinkConditions(delay=-1)
    with pytest.raises(ValueError):
        LinkConditions(rate_bps=0)
    with pytest.raises(ValueError):
        GilbertElliott(p_good_to_bad=-0.1, p_bad_to_good=0.5)


# -- property: conservation and FIFO ---------------------------------------------


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**32),
    loss=st.floats(0, 0.5),
    dup=st.floats(0, 0.5),
    corrupt=st.floats(0, 0.5),
    jitter=st.floats(0, 0.05),
    rate=st.one_of(st.none(), st.floats(1e5, 1e8)),
    queue=st.integers(1500, 100_000),
)
def test_conservation_and_fifo(
    seed: int,
    loss: float,
    dup: float,
    corrupt: float,
    jitter: float,
    rate: float | None,
    queue: int,
) -> None:
    cond = LinkConditions(
        delay=0.01,
        jitter=jitter,
        loss=loss,
        duplicate=dup,
        corrupt=corrupt,
        rate_bps=rate,
        queue_bytes=queue,
    )
    net = SimNetwork(seed)
    sender, sink = Paced(B, count=300, interval=0.0005, size=1000), Sink()
    net.attach(A, sender)
    net.attach(B, sink)
    net.link(A, B, cond)
    net.run(1000.0)
    s = net.stats(A, B)
    assert s.sent == 300
    assert s.delivered == len(sink.received) == s.sent - s.dropped + s.duplicated
    times = [t for t, _, _ in sink.received]
    assert times == sorted(times)
    # reorder=0: sequence numbers never go backwards (only intact datagrams carry one).
    seqs = [struct.unpack_from("!I", d)[0] for _, d, _ in sink.received]
    intact = [
        q for q, (_, d, _) in zip(seqs, sink.received, strict=True) if d == _numbered(q, 1000)
    ]
    assert len(intact) == s.delivered - s.corrupted
    assert all(a <= b for a, b in zip(intact, intact[1:], strict=False))
