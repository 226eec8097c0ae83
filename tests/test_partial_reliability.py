"""Partial reliability (reliability TF ``partial``, FORWARD) over the
simulated network: lifetimes and retransmission limits abandon exactly the
data they should, the receiver skips it and says so, everything else
arrives byte-exact and in order, and the connection still closes."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from vtl.core import wire
from vtl.core.composition import Composition
from vtl.core.config import ConnectionConfig
from vtl.core.errors import ConnectionStateError, WireError
from vtl.core.events import DataAbandoned
from vtl.core.wire import DATA_OVERHEAD, DataFlags, PacketType
from vtl.sim import LinkConditions
from vtl.sim.harness import TransferResult, run_transfer

MSS = 1452 - DATA_OVERHEAD


def message(i: int, segments: int = 3) -> bytes:
    """Message ``i``: every segment of it starts with ``i`` (MSS is a multiple of 4)."""
    return i.to_bytes(4, "big") * (segments * MSS // 4 - 100)


class DropOut:
    """Node wrapper dropping the outgoing DATA packets ``drop(packet, now)``
    picks, and counting transmissions per message number."""

    def __init__(self, inner, drop: Callable[[wire.Packet, float], bool]) -> None:
        self.inner = inner
        self.drop = drop
        self.sends: dict[int, int] = {}

    def receive(self, datagram: bytes, addr, now: float) -> None:
        self.inner.receive(datagram, addr, now)

    def datagrams_to_send(self, now: float):
        out = []
        for datagram, addr in self.inner.datagrams_to_send(now):
            p = wire.decode(datagram)
            if p.type is PacketType.DATA:
                payload = wire.decode_data(p.body)[2]
                if p.flags & DataFlags.MSG_START and len(payload) >= 4:
                    n = int.from_bytes(payload[:4], "big")
                    self.sends[n] = self.sends.get(n, 0) + 1
                if self.drop(p, now):
                    continue
            out.append((datagram, addr))
        return out

    def next_timer(self):
        return self.inner.next_timer()

    def handle_timer(self, now: float) -> None:
        self.inner.handle_timer(now)


def msg_of(p: wire.Packet) -> int:
    return int.from_bytes(wire.decode_data(p.body)[2][:4], "big")


def abandons(side) -> list[DataAbandoned]:
    return [e for _, e in side.events if isinstance(e, DataAbandoned)]


def run(comp: str, data, drop, **kw) -> tuple[TransferResult, DropOut]:
    taps: list[DropOut] = []

    def wrap(ep):
        taps.append(DropOut(ep, drop))
        return taps[0]

    kw.setdefault("forward", LinkConditions(delay=0.01))
    kw.setdefault("timeout", 60.0)
    result = run_transfer(Composition.parse(comp), data_ab=data, wrap_a=wrap, **kw)
    return result, taps[0]


@pytest.mark.parametrize("ordering", ["ordered", "unordered"])
def test_lifetime_abandons_exactly_the_expired_messages(ordering: str) -> None:
    """Every message has a lifetime: 0.5 s for some, 30 s for the others.
    Messages whose middle segment is lost until their lifetime has passed
    are abandoned whole (among them some with 0.5 s that are delivered in
    time, and the last one: the close must not hang); every other message
    arrives, in order, byte-exact, despite random loss both ways."""
    msgs = [message(i) for i in range(40)]
    doomed = {5, 17, 18, 39}
    short = doomed | {0, 1, 6}
    lifetimes: list[float | None] = [0.5 if i in short else 30.0 for i in range(40)]

    def drop(p: wire.Packet, now: float) -> bool:
        return msg_of(p) in doomed and not p.flags & DataFlags.MSG_START

    result, _ = run(
        f"reliability=partial framing=message ordering={ordering}",
        msgs,
        drop,
        lifetime_ab=lifetimes,
        forward=LinkConditions(delay=0.01, loss=0.03),
        backward=LinkConditions(delay=0.01, loss=0.05),
        seed=3,
    )
    assert result.completed and result.clean
    b = result.b
    reported = sorted(m for e in abandons(b) for m in e.messages)
    assert reported == sorted(doomed)
    expected = [m for i, m in enumerate(msgs) if i not in doomed]
    if ordering == "ordered":
        assert b.messages == expected
    else:
        assert sorted(b.messages) == sorted(expected)
    assert sum(e.bytes for e in abandons(b)) == sum(len(msgs[i]) for i in doomed)
    assert result.a.stats["messages_abandoned"] >= len(doomed)
    assert result.a.stats["forwards_sent"] >= 1
    assert b.stats["messages_abandoned_rx"] == len(doomed)
    assert b.held_at_end == 0


def test_abandon_after_n_retransmissions() -> None:
    """abandon_after=2: a message that never gets through is sent 3 times
    (first + 2 retransmissions), then abandoned; the rest is delivered."""
    msgs = [message(i, 1) for i in range(30)]
    doomed = {3, 29}
    result, tap = run(
        "reliability=partial(abandon_after=2) framing=message",
        msgs,
        lambda p, now: msg_of(p) in doomed,
    )
    assert result.completed and result.clean
    assert result.b.messages == [m for i, m in enumerate(msgs) if i not in doomed]
    assert sorted(m for e in abandons(result.b) for m in e.messages) == sorted(doomed)
    for i in doomed:
        assert tap.sends[i] == 3
    assert result.a.stats["messages_abandoned"] == len(doomed)
    assert result.a.stats["bytes_abandoned"] == sum(len(msgs[i]) for i in doomed)


def test_without_limits_partial_is_fully_reliable() -> None:
    """No lifetime and no retransmission limit: nothing is abandoned."""
    msgs = [message(i, 2) for i in range(30)]
    result = run_transfer(
        "reliability=partial framing=message",
        data_ab=msgs,
        forward=LinkConditions(delay=0.01, loss=0.1),
        seed=5,
    )
    assert result.clean and result.b.messages == msgs
    assert result.a.stats["messages_abandoned"] == 0 and not abandons(result.b)


def test_max_retransmissions_still_fails_unlimited_data() -> None:
    """Data with no limit that never gets through fails the connection as
    with selective repeat."""
    msgs = [message(i, 1) for i in range(5)]
    result, _ = run(
        "reliability=partial(max_retransmissions=3,min_rto=0.05) framing=message",
        msgs,
        lambda p, now: msg_of(p) == 2,
    )
    assert result.a.terminated is not None
    assert result.a.terminated.error_code == 5  # RETRANSMISSION_LIMIT


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_stream_byte_ranges_abandoned_and_rest_byte_exact(seed: int) -> None:
    """Stream framing abandons single segments; the receiver's ranges say
    exactly which stream bytes are missing."""
    data = bytes(range(256)) * 1500
    result = run_transfer(
        "reliability=partial(abandon_after=0)",
        data_ab=data,
        forward=LinkConditions(delay=0.01, loss=0.05),
        seed=seed,
        timeout=60.0,
    )
    assert result.completed and result.clean
    ranges = sorted(r for e in abandons(result.b) for r in e.ranges)
    assert ranges, "5 % loss with abandon_after=0 must abandon something"
    rebuilt = bytearray()
    pos = 0
    for off, size in ranges:
        assert off >= pos
        rebuilt += data[pos:off]
        pos = off + size
    rebuilt += data[pos:]
    assert result.b.data == bytes(rebuilt)
    reported = sum(e.bytes for e in abandons(result.b))
    assert reported == sum(size for _, size in ranges)
    assert result.a.stats["bytes_abandoned"] >= reported
    assert result.b.stats["segments_abandoned"] == len(ranges)


def test_connection_lifetime_parameter() -> None:
    """lifetime_ms on the TF applies to every send() without its own lifetime."""
    msgs = [message(i, 2) for i in range(20)]
    result, _ = run(
        "reliability=partial(lifetime_ms=300) framing=message",
        msgs,
        lambda p, now: msg_of(p) == 7 and now < 1.5,
    )
    assert result.clean
    assert [m for e in abandons(result.b) for m in e.messages] == [7]
    assert result.b.messages == msgs[:7] + msgs[8:]


def test_lifetime_expires_in_the_send_queue() -> None:
    """Behind a slow bottleneck, messages whose lifetime passes before their
    turn are abandoned unsent; the receiver gets the rest in order and is
    told of the others."""
    msgs = [i.to_bytes(4, "big") * 250 for i in range(300)]
    result = run_transfer(
        "reliability=partial framing=message",
        data_ab=msgs,
        forward=LinkConditions(delay=0.01, rate_bps=1e6, queue_bytes=30_000),
        lifetime_ab=0.6,
        timeout=60.0,
    )
    assert result.completed and result.clean
    got = [int.from_bytes(m[:4], "big") for m in result.b.messages]
    lost = [m for e in abandons(result.b) for m in e.messages]
    assert got == sorted(got) and lost
    assert sorted(got + lost) == list(range(300))
    assert all(m == msgs[i] for i, m in zip(got, result.b.messages, strict=True))
    # 300 kB at 1 Mbit/s takes 2.4 s: only about 0.6 s worth can make it
    assert len(got) < 150


def test_per_message_lifetime_validation() -> None:
    from vtl.core.connection import Connection

    conn = Connection(is_client=True, offers=[Composition.parse("reliability=partial")])
    with pytest.raises(ConnectionStateError):
        conn.send(b"x", lifetime=0)


def test_forward_codec_and_malformed() -> None:
    body = wire.encode_forward(1000, [(10, 13, 4, 3000), (20, 21, 9, 12)])
    cum, recs = wire.decode_forward(body)
    assert cum == 1000 and recs == [(10, 13, 4, 3000), (20, 21, 9, 12)]
    with pytest.raises(WireError):
        wire.decode_forward(body[:-1])
    with pytest.raises(WireError):
        wire.decode_forward(b"\x00")


def test_forward_refused_without_partial_reliability() -> None:
    """A FORWARD on a selective-repeat connection is a counted drop and
    skips nothing."""
    from vtl.sim.harness import Transfer

    msgs = [message(i, 1) for i in range(10)]
    t = Transfer(
        [Composition.parse("reliability=selective-repeat framing=message")],
        data_ab=msgs,
        forward=LinkConditions(delay=0.01),
        config_a=ConnectionConfig(initial_seq=100),
    )
    injected = []

    def inject(tr: Transfer) -> None:
        conn = tr.conn_a
        pn = conn._next_pn
        conn._next_pn += 1
        body = wire.encode_forward(conn._snd_nxt + 5, [])
        dg = wire.encode(PacketType.FORWARD, conn.peer_cid, conn.local_cid, pn, body)
        tr.conn_b.receive(dg, tr.net.now)
        injected.append(tr.conn_b.stats["dropped_invalid"])

    t.schedule = [(0.05, inject)]
    result = t.run()
    assert injected == [1]
    assert result.clean and result.b.messages == msgs and not abandons(result.b)


def _stream_messages(comp: str, loss: float, n: int = 400, lifetime: float = 0.15):
    """Messages of 1000 bytes at 100/s over a 40 ms RTT path: (latencies of
    the delivered ones by message number, reported-abandoned numbers, result)."""
    import struct

    from vtl.core.events import ConnectionTerminated, MessageReceived, PeerClosed
    from vtl.sim.harness import Transfer

    t = Transfer(
        [Composition.parse(comp)],
        forward=LinkConditions(delay=0.02, loss=loss),
        close_a=None,
        seed=1,
        timeout=120.0,
    )

    def sender(i: int):
        def act(tr: Transfer) -> None:
            now = tr.net.now
            tr.conn_a.send(struct.pack("!dI", now, i) + bytes(988), lifetime=lifetime, now=now)

        return act

    t.schedule = [(0.2 + i / 100, sender(i)) for i in range(n)]
    t.schedule.append((0.2 + n / 100, lambda tr: tr.conn_a.close()))
    app = t.app_b
    latency: dict[int, float] = {}
    lost: list[int] = []

    def read(now: float, budget) -> bool:
        took = False
        while app.conn is not None and (event := app.conn.next_event()) is not None:
            took = True
            if isinstance(event, MessageReceived):
                sent, i = struct.unpack("!dI", event.data[:12])
                latency[i] = now - sent
            else:
                if isinstance(event, DataAbandoned):
                    lost.extend(event.messages)
                elif isinstance(event, ConnectionTerminated):
                    app.result.terminated = event
                elif isinstance(event, PeerClosed):
                    app.result.peer_closed_at = now
                app.result.events.append((now, event))
        return took

    app.read = read  # type: ignore[method-assign]
    return latency, lost, t.run()


def test_lifetime_bounds_delivery_delay_under_heavy_loss() -> None:
    """10 % loss each way, more than NewReno sustains for this rate: with
    partial reliability nothing is delivered much later than its lifetime
    (plus the one-way delay of the FORWARD), everything else is reported,
    and the close completes; selective repeat falls seconds behind."""
    latency, lost, result = _stream_messages("reliability=partial framing=message", 0.10)
    assert result.completed and result.clean
    assert sorted(list(latency) + lost) == list(range(400))
    assert max(latency.values()) <= 0.15 + 2 * 0.02 + 0.001
    assert result.a.stats["messages_abandoned"] >= len(lost) > 0
    sr_latency, sr_lost, _ = _stream_messages("reliability=selective-repeat framing=message", 0.10)
    assert not sr_lost and len(sr_latency) == 400
    assert max(sr_latency.values()) > 1.0


def test_malformed_forward_is_dropped_and_changes_nothing() -> None:
    """Bad FORWARDs on a partial connection are counted drops; the transfer
    stays byte-exact."""
    from vtl.sim.harness import Transfer

    msgs = [message(i, 2) for i in range(30)]
    t = Transfer(
        [Composition.parse("reliability=partial framing=message")],
        data_ab=msgs,
        forward=LinkConditions(delay=0.01),
    )
    drops: list[int] = []

    def inject(tr: Transfer) -> None:
        a, b = tr.conn_a, tr.conn_b
        base = b._rcv_next
        bodies = [
            b"\x00\x01",  # truncated
            wire.encode_forward(base + 2, [(base, base + 3, 0, 10)]),  # record past new_cum
            wire.encode_forward(base + 2, [(base + 1, base + 1, 0, 10)]),  # empty record
            wire.encode_forward(base + 4, [(base + 2, base + 3, 1, 5), (base, base + 1, 0, 5)]),
            wire.encode_forward(base + (1 << 24), []),  # beyond the window
            wire.encode_forward(base + 2, [])[:-1] + b"\x00\x00\x00",  # length mismatch
        ]
        for body in bodies:
            pn = a._next_pn
            a._next_pn += 1
            dg = wire.encode(PacketType.FORWARD, a.peer_cid, a.local_cid, pn, body, 0x01)
            before = b.stats["dropped_invalid"]
            b.receive(dg, tr.net.now)
            drops.append(b.stats["dropped_invalid"] - before)
        assert b._rcv_next == base

    t.schedule = [(0.05, inject)]
    result = t.run()
    assert drops == [1] * 6
    assert result.clean and result.b.messages == msgs and not abandons(result.b)
