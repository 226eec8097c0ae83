"""Random and mutated datagrams thrown at both EndpointCores during a live
simulated transfer: they must never raise, never corrupt the transfer, and
every one that cannot be valid must show up in a drop counter.

Mutations start from real packets captured on delivery.  Most are
re-checksummed after the change so that they pass the CRC and reach the
semantic checks behind it (absurd sequence numbers, ACK ranges, windows,
packet numbers, CLOSE positions, lengths, types, options).

Fuzzing starts once both ends are established and stops when either
terminates: without authentication a handshake can be disturbed by a
CRC-valid forgery of the peer's OFFER, and a peer that already forgot a
closed connection legitimately answers with a stateless RESET.
"""

from __future__ import annotations

import random
import struct
from collections import Counter

import pytest
from crc32c import crc32c

from vtl.core import wire
from vtl.core.composition import Composition
from vtl.core.config import ConnectionConfig
from vtl.core.connection import State
from vtl.core.endpoint import EndpointCore
from vtl.core.errors import WireError
from vtl.core.wire import U32, AckFrame, PacketType
from vtl.sim import LinkConditions
from vtl.sim.harness import ADDR_A, ADDR_B, Transfer

ELSEWHERE = ("192.0.2.99", 6666)  # an address that is not attached: answers vanish
DECODE_REASONS = ("checksum", "version", "type", "malformed", "option")


def counted(ep: EndpointCore) -> int:
    """Everything an endpoint and its connections count as refused."""
    total = sum(ep.drops.values())
    for conn in ep.connections.values():
        s = conn.stats
        total += s["dropped_invalid"] + s["duplicate_segments"] + s["out_of_window_drops"]
        total += s["invalid_ack_echo"]
    return total


def recrc(datagram: bytes | bytearray) -> bytes:
    buf = bytearray(datagram)
    buf[-4:] = struct.pack("!I", crc32c(bytes(buf[:-4])))
    return bytes(buf)


def far(value: int, rng: random.Random) -> int:
    """A 32-bit value at least 2**29 away from ``value`` (either way)."""
    return (value + rng.choice([1, -1]) * rng.randrange(1 << 29, 1 << 31)) % U32


class Fuzzer:
    """Wraps an endpoint: delivers each real datagram, captures it, and now
    and then follows it with mutations."""

    def __init__(self, ep: EndpointCore, peer: tuple, rng: random.Random, rate: float) -> None:
        self.ep, self.peer, self.rng, self.rate = ep, peer, rng, rate
        self.pool: list[bytes] = []
        self.active = False
        self.injected: Counter[str] = Counter()
        self.missed: list[tuple[str, bytes]] = []  # must-count mutations nobody counted

    # ------------------------------------------------------------ node
    def receive(self, datagram: bytes, addr, now: float) -> None:
        self.ep.receive(datagram, addr, now)
        try:
            wire.decode(datagram)
        except WireError:
            pass
        else:
            if len(self.pool) < 3000:
                self.pool.append(datagram)
            else:
                self.pool[self.rng.randrange(len(self.pool))] = datagram
        if self.active and self.pool and self.rng.random() < self.rate:
            for _ in range(self.rng.randint(1, 3)):
                self.inject(now)

    def datagrams_to_send(self, now: float):
        return self.ep.datagrams_to_send(now)

    def next_timer(self):
        return self.ep.next_timer()

    def handle_timer(self, now: float) -> None:
        self.ep.handle_timer(now)

    # -------------------------------------------------------- mutations
    def inject(self, now: float) -> None:
        rng = self.rng
        original = rng.choice(self.pool)
        name, datagram, must_count, src = self.mutate(original)
        conn = self.ep.connections.get(wire.peek_dcid(datagram)) if len(datagram) >= 32 else None
        if must_count == "conn" and (conn is None or conn.state is not State.ESTABLISHED):
            must_count = ""  # a connection that is closing ignores strays silently
        before = counted(self.ep)
        self.ep.receive(datagram, src, now)
        self.injected[name] += 1
        if must_count and counted(self.ep) == before:
            self.missed.append((name, datagram))

    def mutate(self, datagram: bytes) -> tuple[str, bytes, str, tuple]:
        """Return (name, datagram, must_count, source).  ``must_count`` is
        "" (may be valid), "ep" (the codec must refuse it) or "conn" (the
        connection must refuse it, if it is established)."""
        rng = self.rng
        p = wire.decode(datagram)
        choice = rng.randrange(20)
        peer = self.peer
        if choice == 0:  # bit flips, CRC left alone
            buf = bytearray(datagram)
            for bit in rng.sample(range(len(buf) * 8), rng.randint(1, 3)):
                buf[bit >> 3] ^= 1 << (bit & 7)
            return "bitflip", bytes(buf), "ep", rng.choice([peer, ELSEWHERE])
        if choice == 1:  # truncated or extended, optionally re-checksummed
            cut = rng.randrange(len(datagram))
            buf = (
                datagram[:cut]
                if rng.random() < 0.5
                else datagram + rng.randbytes(rng.randint(1, 50))
            )
            return "resize", recrc(buf) if len(buf) >= 4 else buf, "ep", peer
        if choice == 2:  # huge / wrong length fields, re-checksummed
            buf = bytearray(datagram)
            off = rng.choice([24, 26])
            buf[off : off + 2] = struct.pack("!H", rng.choice([0xFFFF, rng.randrange(0x10000)]))
            if bytes(buf) == datagram:
                buf[off + 1] ^= 1
            return "length", recrc(buf), "ep", peer
        if choice == 3:  # random garbage
            junk = rng.randbytes(rng.randint(0, 1500))
            return "garbage", junk, "ep", rng.choice([peer, ELSEWHERE])
        if choice == 4:  # unknown connection IDs
            dcid = rng.getrandbits(64) | 1
            return (
                "dcid",
                wire.encode(p.type, dcid, p.scid, p.pn, p.body, p.flags, p.options),
                "ep",
                peer,
            )
        if choice == 5:  # right destination, wrong source connection ID
            scid = p.scid ^ (rng.getrandbits(63) | 1)
            must = "conn" if p.type in (PacketType.DATA, PacketType.ACK, PacketType.CLOSE) else ""
            return (
                "scid",
                wire.encode(p.type, p.dcid, scid, p.pn, p.body, p.flags, p.options),
                must,
                peer,
            )
        if choice == 6:  # unknown critical option
            opts = dict(p.options)
            opts[rng.randrange(0x82, 0x100)] = rng.randbytes(rng.randint(0, 8))
            return (
                "critical-option",
                wire.encode(p.type, p.dcid, p.scid, p.pn, p.body, p.flags, opts),
                "ep",
                peer,
            )
        if choice == 7:  # exact replay, maybe with an unknown non-critical option
            if rng.random() < 0.5:
                return "replay", datagram, "", peer
            opts = dict(p.options)
            opts[rng.randrange(0x03, 0x80)] = rng.randbytes(4)
            return (
                "replay+option",
                wire.encode(p.type, p.dcid, p.scid, p.pn, p.body, p.flags, opts),
                "",
                peer,
            )
        if choice == 8:  # packet number absurdly far ahead
            pn = (p.pn + rng.randrange(1 << 29, 1 << 31)) % U32
            must = "conn" if p.type in (PacketType.DATA, PacketType.ACK, PacketType.CLOSE) else ""
            return (
                "pn-far",
                wire.encode(p.type, p.dcid, p.scid, pn, p.body, p.flags, p.options),
                must,
                peer,
            )
        if choice == 9:  # packet number nudged (a plausible forgery of an old packet)
            pn = (p.pn + rng.randint(-1000, 1 << 20)) % U32
            return (
                "pn-near",
                wire.encode(p.type, p.dcid, p.scid, pn, p.body, p.flags, p.options),
                "",
                peer,
            )
        if choice == 10:  # another packet type, re-checksummed
            types = [t for t in PacketType if t is not p.type and t is not PacketType.RESET]
            ptype = rng.choice(types)
            return (
                "type",
                wire.encode(ptype, p.dcid, p.scid, p.pn, p.body, p.flags, p.options),
                "",
                peer,
            )
        if choice == 11:  # flags changed: mostly a counted duplicate, but go-back-N may
            # not have kept the original, and then it is a plausible forgery
            flags = p.flags ^ (rng.randrange(1, 256))
            must = ""
            return (
                "flags",
                wire.encode(p.type, p.dcid, p.scid, p.pn, p.body, flags, p.options),
                must,
                peer,
            )
        if choice == 12:  # no destination connection ID, not an OFFER
            if p.type is PacketType.OFFER:
                return "replay", datagram, "", peer
            return (
                "dcid0",
                wire.encode(p.type, 0, p.scid, p.pn, p.body, p.flags, p.options),
                "ep",
                peer,
            )
        # ---- body fields (re-encoded, so the CRC is right)
        if p.type is PacketType.DATA:
            seq, una, payload = wire.decode_data(p.body)
            kind = rng.choice(["seq", "una", "oversize", "seq+una"])
            if kind == "seq":
                seq = far(seq, rng)
            elif kind == "una":  # a stale UNA is normal: jump far ahead, beyond any window
                una = (una + rng.randrange(1 << 29, 1 << 31)) % U32
            elif kind == "seq+una":
                seq, una = far(seq, rng), (una + rng.randrange(1 << 29, 1 << 31)) % U32
            else:
                payload = payload + rng.randbytes(rng.randint(1, 1500))
            body = wire.DATA_PREFIX.pack(seq, una) + payload
            return (
                f"data-{kind}",
                wire.encode(p.type, p.dcid, p.scid, p.pn, body, p.flags),
                "conn",
                peer,
            )
        if p.type is PacketType.ACK:
            frame = wire.decode_ack(p.body)
            kind = rng.choice(["cum", "window", "largest", "range-far", "range-inverted", "count"])
            if kind == "cum":
                frame.cum = far(frame.cum, rng)
            elif kind == "window":
                frame.window_limit = rng.choice(
                    [
                        far(frame.window_limit, rng),
                        (frame.cum - 1) % U32,
                        (frame.cum + (1 << 21)) % U32,
                    ]
                )
            elif kind == "largest":
                frame.largest_pn = (frame.largest_pn + rng.randrange(1 << 29, 1 << 31)) % U32
            elif kind == "range-far":
                start = far(frame.cum, rng)
                frame.ranges = [
                    *frame.ranges[: wire.ACK_MAX_RANGES - 1],
                    (start, (start + rng.randint(1, 50)) % U32),
                ]
            elif kind == "range-inverted":
                a = (frame.cum + rng.randint(1, 5)) % U32
                frame.ranges = [(a + 3, a)]
            else:  # range count does not match the length
                body = bytearray(wire.encode_ack(frame))
                body[16] = (body[16] + rng.randint(1, 200)) % 256
                return (
                    "ack-count",
                    wire.encode(p.type, p.dcid, p.scid, p.pn, bytes(body), p.flags),
                    "conn",
                    peer,
                )
            body = wire.encode_ack(frame)
            return (
                f"ack-{kind}",
                wire.encode(p.type, p.dcid, p.scid, p.pn, body, p.flags),
                "conn",
                peer,
            )
        if p.type is PacketType.CLOSE:
            final, una = wire.decode_close(p.body)
            kind = rng.choice(["final", "una", "short", "long"])
            if kind == "final":
                body = wire.encode_close(far(final, rng), una)
            elif kind == "una":
                body = wire.encode_close(final, (final + rng.randint(1, 1 << 30)) % U32)
            elif kind == "short":
                body = p.body[:4]
            else:
                body = p.body + rng.randbytes(rng.randint(1, 20))
            return (
                f"close-{kind}",
                wire.encode(p.type, p.dcid, p.scid, p.pn, body, p.flags),
                "conn",
                peer,
            )
        # handshake packets and probes: garble their body
        body = rng.randbytes(len(p.body))
        return "body", wire.encode(p.type, p.dcid, p.scid, p.pn, body, p.flags, p.options), "", peer


def fuzzed_transfer(comp: str, seed: int, rate: float, data_ab, data_ba, conditions) -> tuple:
    rng = random.Random(seed)
    fuzzers: dict[str, Fuzzer] = {}

    def wrap(name: str, peer: tuple):
        def make(ep: EndpointCore) -> Fuzzer:
            fuzzers[name] = Fuzzer(ep, peer, random.Random(rng.random()), rate)
            return fuzzers[name]

        return make

    def gate(t: Transfer) -> None:
        a, b = t.conn_a, t.conn_b
        live = a is not None and b is not None and a.is_established and b.is_established
        for f in fuzzers.values():
            f.active = live

    t = Transfer(
        [Composition.parse(comp)],
        forward=conditions,
        data_ab=data_ab,
        data_ba=data_ba,
        config_a=ConnectionConfig(rng=random.Random(seed + 1)),
        config_b=ConnectionConfig(rng=random.Random(seed + 2)),
        wrap_a=wrap("a", ADDR_B),
        wrap_b=wrap("b", ADDR_A),
        check=gate,
        seed=seed,
        timeout=600,
    )
    return t.run(), t, fuzzers


@pytest.mark.parametrize(
    "comp",
    [
        "reliability=selective-repeat",
        "reliability=selective-repeat ordering=unordered framing=message congestion=none",
        "reliability=go-back-n congestion=fixed-rate(rate_mbps=20)",
        "reliability=stop-and-wait framing=message",
    ],
)
@pytest.mark.parametrize("seed", [1, 2])
def test_fuzzed_transfer_stays_exact(comp: str, seed: int) -> None:
    saw = "stop-and-wait" in comp
    rnd = random.Random(seed)
    size = 40_000 if saw else 400_000
    if "framing=message" in comp:
        data_ab = [rnd.randbytes(rnd.choice([0, 1, 700, 1412, 5000])) for _ in range(size // 1500)]
        data_ba = [rnd.randbytes(rnd.choice([3, 2000])) for _ in range(size // 3000)]
    else:
        data_ab, data_ba = rnd.randbytes(size), rnd.randbytes(size // 2)
    result, t, fuzzers = fuzzed_transfer(
        comp,
        seed,
        rate=1.0,
        data_ab=data_ab,
        data_ba=data_ba,
        conditions=LinkConditions(delay=0.01, loss=0.03, reorder=0.05),
    )
    injected = fuzzers["a"].injected + fuzzers["b"].injected
    # the transfer is untouched ...
    assert result.completed
    for side in (result.a, result.b):
        assert side.terminated is not None and side.terminated.error_code == 0, side.terminated
    if isinstance(data_ab, list):
        got_b, got_a = result.b.messages, result.a.messages
        if "unordered" in comp:
            got_b, got_a, data_ab, data_ba = (
                sorted(got_b),
                sorted(got_a),
                sorted(data_ab),
                sorted(data_ba),
            )
        assert got_b == data_ab and got_a == data_ba
    else:
        assert result.b.data == data_ab and result.a.data == data_ba
    # ... the fuzzers did their job ...
    assert sum(injected.values()) >= (150 if saw else 1000)
    expected = {
        "bitflip",
        "resize",
        "length",
        "garbage",
        "dcid",
        "scid",
        "critical-option",
        "pn-far",
        "pn-near",
        "type",
        "flags",
        "replay",
        "data-seq",
        "data-una",
        "data-oversize",
        "ack-cum",
        "ack-window",
        "ack-largest",
        "ack-range-far",
    }
    assert expected <= set(injected), expected - set(injected)
    # ... and every mutation that cannot be valid was counted as refused
    for f in fuzzers.values():
        assert f.missed == [], [
            (name, wire.decode(d) if len(d) > 31 else d) for name, d in f.missed[:5]
        ]
    for ep in (t.ep_a, t.ep_b):
        drops = ep.drops
        assert drops["checksum"] > 0 and drops["malformed"] > 0 and drops["option"] > 0
        assert drops["unknown_connection"] > 0 and drops["invalid_for_connection"] > 0


def test_fuzzed_unreliable_transfer_keeps_its_promises() -> None:
    """reliability=none under fuzzing: what arrives is intact, in order and
    never duplicated, and the connection closes cleanly."""
    n = 400
    units = [i.to_bytes(4, "big") + random.Random(i).randbytes(1408) for i in range(n)]
    result, t, fuzzers = fuzzed_transfer(
        "reliability=none framing=message",
        seed=5,
        rate=1.0,
        data_ab=units,
        data_ba=[],
        conditions=LinkConditions(delay=0.01, loss=0.05),
    )
    assert result.completed
    assert result.a.terminated.error_code == 0 and result.b.terminated.error_code == 0
    got = result.b.messages
    indices = [int.from_bytes(m[:4], "big") for m in got]
    assert indices == sorted(set(indices))
    assert all(m == units[i] for i, m in zip(indices, got, strict=True))
    assert len(got) > n * 0.8
    assert all(f.missed == [] for f in fuzzers.values())


def test_pure_noise_at_an_idle_endpoint() -> None:
    """Random datagrams (and OFFER-looking ones) at a listening endpoint
    never raise, are all counted, and leave no connection behind."""
    rng = random.Random(9)
    ep = EndpointCore(ConnectionConfig(rng=random.Random(1)), listen=True)
    good_offer = None
    client = EndpointCore(ConnectionConfig(rng=random.Random(2)))
    conn = client.connect(ADDR_B, [Composition.parse("reliability=selective-repeat")], 0.0)
    good_offer = conn.datagrams_to_send(0.0)[0]
    p = wire.decode(good_offer)
    fields = wire.decode_fields(p.body)
    for i in range(3000):
        kind = i % 4
        if kind == 0:
            datagram = rng.randbytes(rng.randint(0, 200))
        elif kind == 1:  # OFFER with garbled fields, valid CRC
            f = dict(fields)
            victim = rng.choice(list(f))
            f[victim] = rng.choice(
                [
                    rng.randbytes(rng.randint(0, 40)),
                    b"[" * 5000,
                    b'{"reliability": 5}',
                    b"NaN",
                    b"[]",
                ]
            )
            datagram = wire.encode(
                PacketType.OFFER, 0, rng.getrandbits(64), 0, wire.encode_fields(f)
            )
        elif kind == 2:  # OFFER whose body is random TLVs
            datagram = wire.encode(
                PacketType.OFFER, 0, rng.getrandbits(64), 0, rng.randbytes(rng.randint(0, 300))
            )
        else:
            datagram = recrc(bytearray(rng.randbytes(rng.randint(32, 200))))
        before, conns = counted(ep), len(ep.connections)
        ep.receive(datagram, ("198.51.100.1", i), float(i) / 100)
        # refused and counted, or a well-formed OFFER that opened a (half-open) connection
        assert counted(ep) > before or len(ep.connections) == conns + 1
        ep.datagrams_to_send(float(i) / 100)
    # offers that were well formed created (unaccepted) connections: time them out
    now = 100.0
    for _ in range(200):
        t = ep.next_timer()
        if t is None:
            break
        now = max(now, t)
        ep.handle_timer(now)
        ep.datagrams_to_send(now)
    assert not ep.connections and ep.accept() is None
    assert sum(ep.drops[r] for r in DECODE_REASONS) > 0


# ==================================================== semantic checks, one by one


def pair(comp: str = "reliability=selective-repeat congestion=none", **kw) -> tuple:
    """Two established Connections wired back to back in memory."""
    from vtl.core.connection import Connection

    a = Connection(
        is_client=True,
        config=ConnectionConfig(rng=random.Random(1), **kw),
        offers=[Composition.parse(comp)],
    )
    b = Connection(is_client=False, config=ConnectionConfig(rng=random.Random(2), **kw))
    a.connect(0.0)
    b.accept_offer(wire.decode(a.datagrams_to_send(0.0)[0]), 0.0)
    shuttle(a, b, 0.01)
    assert a.is_established and b.is_established
    return a, b


def shuttle(a, b, now: float, rounds: int = 50, drop=lambda d: False) -> None:
    for _ in range(rounds):
        moved = False
        for src, dst in ((a, b), (b, a)):
            for d in src.datagrams_to_send(now):
                moved = True
                if not drop(d):
                    dst.receive(d, now)
        if not moved:
            return


def frozen(conn) -> tuple:
    return (
        conn._snd_una,
        conn._snd_nxt,
        len(conn._outstanding),
        conn._peer_window_limit,
        conn._rcv_next,
        conn._peer_final,
        conn._largest_pn_rx,
        conn._largest_pn_seen,
        conn.state,
        len(conn._events),
    )


def refused(conn, datagram: bytes, now: float = 0.5) -> bool:
    before, state = conn.stats["dropped_invalid"], frozen(conn)
    conn.receive(datagram, now)
    return conn.stats["dropped_invalid"] == before + 1 and frozen(conn) == state


def ack(conn_to, conn_from, cum, limit, largest, ranges=(), flags=0) -> bytes:
    """An ACK from ``conn_from`` to ``conn_to`` with the given (full) numbers."""
    frame = AckFrame(cum, limit, largest, 0, list(ranges))
    conn_from._next_pn += 1
    return wire.encode(
        PacketType.ACK,
        conn_to.local_cid,
        conn_from.local_cid,
        conn_from._next_pn,
        wire.encode_ack(frame),
        flags,
    )


def with_data_in_flight():
    """a sent 10 segments; b got segments 0-3 and 6 (4, 5 lost), acks held back."""
    a, b = pair()
    a.send(bytes(10 * 1412))
    sent = a.datagrams_to_send(0.1)
    assert len(sent) == 10
    for i, d in enumerate(sent):
        if i not in (4, 5, 7, 8, 9):
            b.receive(d, 0.11)
    b._ack_now = False
    b._ack_pending = 0
    b._ack_deadline = None
    return a, b


def test_acks_for_what_was_never_sent_are_refused() -> None:
    a, b = with_data_in_flight()
    una, nxt, w = a._snd_una, a._snd_nxt, a.flow.window
    assert refused(a, ack(a, b, nxt + 1, nxt + 1 + w, b._largest_pn_rx))  # cum beyond snd_nxt
    assert refused(a, ack(a, b, una + 4, una + 4 + w + 1, 0))  # window beyond the negotiated one
    assert refused(a, ack(a, b, una + 4, una + 3, 0))  # window below cum
    assert refused(a, ack(a, b, una, una + w, 0, [(nxt, nxt + 3)]))  # SACK of unsent data
    assert refused(a, ack(a, b, una, una + w, 0, [(una + 7, una + 6)]))  # inverted range
    assert refused(a, ack(a, b, una + 5, una + 5 + w, 0, [(una + 2, una + 3)]))  # below cum
    assert refused(a, ack(a, b, una, una + w, 0, [(una + 6, una + 8), (una + 7, una + 9)]))
    assert a.stats["acks_received"] == 0
    # a genuine ACK still works afterwards
    b._ack_now = True
    shuttle(a, b, 0.2)
    assert a._sacked or a._snd_una > una


def test_ack_echoing_a_packet_never_sent_keeps_its_data_acks() -> None:
    a, b = with_data_in_flight()
    una = a._snd_una
    before_rtt = a.rtt.samples
    a.receive(ack(a, b, una + 4, una + 4 + a.flow.window, a._next_pn + 1000), 0.5)
    assert a.stats["invalid_ack_echo"] == 1
    assert a._snd_una == una + 4  # the (valid) cumulative ack was used
    assert a._largest_acked_pn < a._next_pn and a.rtt.samples == before_rtt


def test_reliable_receiver_refuses_an_una_that_skips_data() -> None:
    a, b = with_data_in_flight()
    lost = wire.decode(a._emit_segment(a._outstanding[a._snd_una + 4], 0.3))
    seq, una, payload = wire.decode_data(lost.body)
    forged = wire.encode(
        PacketType.DATA,
        b.local_cid,
        a.local_cid,
        lost.pn,
        wire.DATA_PREFIX.pack(seq, (una + 6) % U32) + payload,
    )
    assert refused(b, forged)
    assert not any(type(e).__name__ == "DataAbandoned" for e in b._events)


def test_oversized_segment_refused() -> None:
    a, b = with_data_in_flight()
    seg = a._outstanding[a._snd_una + 4]
    body = wire.DATA_PREFIX.pack(seg.seq % U32, a._snd_una % U32) + bytes(b._max_payload + 1)
    assert refused(b, wire.encode(PacketType.DATA, b.local_cid, a.local_cid, a._next_pn + 1, body))


def close_packet(to, frm, final: int, una: int, body: bytes | None = None) -> bytes:
    frm._next_pn += 1
    return wire.encode(
        PacketType.CLOSE,
        to.local_cid,
        frm.local_cid,
        frm._next_pn,
        body if body is not None else wire.encode_close(final, una),
    )


def test_implausible_close_refused() -> None:
    a, b = with_data_in_flight()
    r = b._rcv_next
    assert refused(b, close_packet(b, a, b._window_limit + 1, r))  # beyond the window
    assert refused(b, close_packet(b, a, r + 1, r))  # below a segment we hold (6)
    assert refused(b, close_packet(b, a, r - 1, r - 1))  # below what we delivered
    assert refused(b, close_packet(b, a, r + 8, r + 9))  # UNA beyond final
    assert refused(b, close_packet(b, a, r + 8, r + 2))  # reliable UNA skipping 4, 5
    assert refused(b, close_packet(b, a, 0, 0, body=wire.encode_close(r + 8, r)[:4]))  # short
    assert refused(b, close_packet(b, a, 0, 0, body=wire.encode_close(r + 8, r) + b"\0"))
    b.receive(close_packet(b, a, r + 6, r), 0.5)  # plausible: accepted
    assert b._peer_final == r + 6
    assert refused(b, close_packet(b, a, r + 7, r))  # contradicts the first CLOSE


def test_packet_number_far_ahead_refused_and_echo_not_poisoned() -> None:
    a, b = with_data_in_flight()
    seg = a._outstanding[a._snd_una]  # b has it: a duplicate
    body = wire.DATA_PREFIX.pack(seg.seq % U32, a._snd_una % U32) + seg.payload
    far_pn = b._largest_pn_seen + (1 << 25)
    assert refused(b, wire.encode(PacketType.DATA, b.local_cid, a.local_cid, far_pn, body))
    # a nudged number on a duplicate is accepted as a duplicate but echoes nothing
    echo = b._largest_pn_rx
    b.receive(wire.encode(PacketType.DATA, b.local_cid, a.local_cid, echo + 5000, body), 0.5)
    assert b.stats["duplicate_segments"] == 1 and b._largest_pn_rx == echo
    shuttle(a, b, 0.6)
    assert a.stats["invalid_ack_echo"] == 0 and a.stats["dropped_invalid"] == 0


def test_rto_backoff_resets_when_new_data_is_acked_without_rtt_sample() -> None:
    a, b = with_data_in_flight()
    a.rtt.backoff_count = 5
    una = a._snd_una
    # an ACK echoing an old packet number (no RTT sample) that acks new data
    a.receive(ack(a, b, una + 4, una + 4 + a.flow.window, 0), 0.5)
    assert a._snd_una == una + 4 and a.rtt.backoff_count == 0


def test_unknown_connection_reset_after_everything_but_the_close_ack() -> None:
    """Our final CLOSE was never confirmed but the peer took all our data and
    we got its end of stream: its stateless RESET means it already finished."""
    a, b = pair()
    a.send(b"x" * 5000)
    shuttle(a, b, 0.05)  # data delivered and acknowledged
    a.close()
    b.close()
    shuttle(
        a,
        b,
        0.1,
        drop=lambda d: (
            wire.decode(d).flags & wire.AckFlags.CLOSE_ACKED and wire.decode(d).dcid == a.local_cid
        ),
    )
    assert b.is_terminated and not a.is_terminated and a._only_close_unconfirmed()
    reset = wire.encode(
        PacketType.RESET, a.local_cid, a.peer_cid, 0, wire.encode_error(10, "unknown connection")
    )
    a.receive(reset, 2.0)
    events = [e for e in iter(a.next_event, None) if isinstance(e, F_ConnectionTerminated)]
    assert events[-1].error_code == 0
    # but with data unacknowledged, the same RESET is an error
    c, d = pair()
    c.send(b"y" * 5000)
    c.datagrams_to_send(0.1)  # lost
    c.receive(
        wire.encode(
            PacketType.RESET,
            c.local_cid,
            c.peer_cid,
            0,
            wire.encode_error(10, "unknown connection"),
        ),
        0.2,
    )
    events = [e for e in iter(c.next_event, None) if isinstance(e, F_ConnectionTerminated)]
    assert events[-1].error_code == 10


from vtl.core.events import ConnectionTerminated as F_ConnectionTerminated  # noqa: E402


def test_malformed_inventory_with_counter_offers_configured() -> None:
    ep = EndpointCore(
        ConnectionConfig(
            rng=random.Random(1),
            acceptable=lambda c: False,
            counter_offers=[Composition.parse("reliability=go-back-n@1.0")],
        ),
        listen=True,
    )
    comps = wire.to_json([Composition.parse("reliability=selective-repeat").to_dict()])
    for i, inventory in enumerate(
        [b'{"reliability": 5}', b'{"reliability": {"go-back-n": 3}}', b"[1]", b'"x"', b"{}"]
    ):
        fields = {
            wire.HsField.COMPOSITIONS: comps,
            wire.HsField.INVENTORY: inventory,
            wire.HsField.INITIAL_SEQ: bytes(4),
        }
        offer = wire.encode(PacketType.OFFER, 0, 1000 + i, 0, wire.encode_fields(fields))
        ep.receive(offer, ("198.51.100.2", i), 0.0)  # must not raise
        ep.datagrams_to_send(0.0)
    assert ep.drops["malformed_offer"] == 4  # "{}" is a valid (empty) inventory: refused


def test_non_data_packet_types_do_not_establish_a_responder() -> None:
    from vtl.core.connection import Connection

    a = Connection(
        is_client=True,
        config=ConnectionConfig(rng=random.Random(1)),
        offers=[Composition.parse("reliability=selective-repeat")],
    )
    b = Connection(is_client=False, config=ConnectionConfig(rng=random.Random(2)))
    a.connect(0.0)
    b.accept_offer(wire.decode(a.datagrams_to_send(0.0)[0]), 0.0)
    b.datagrams_to_send(0.0)  # the ACCEPT, lost
    for ptype in (PacketType.REFUSE, PacketType.RECONFIGURE):
        b.receive(wire.encode(ptype, b.local_cid, a.local_cid, 1, b""), 0.01)
        assert b.state is State.ACCEPTING
    assert b.stats["dropped_invalid"] == 2 and b.next_event() is None


def test_accept_cannot_advertise_more_than_the_negotiated_window() -> None:
    from vtl.core.connection import Connection

    a = Connection(
        is_client=True,
        config=ConnectionConfig(rng=random.Random(1)),
        offers=[Composition.parse("flow=window(window=64)")],
    )
    b = Connection(is_client=False, config=ConnectionConfig(rng=random.Random(2)))
    a.connect(0.0)
    b.accept_offer(wire.decode(a.datagrams_to_send(0.0)[0]), 0.0)
    p = wire.decode(b.datagrams_to_send(0.0)[0])
    fields = wire.decode_fields(p.body)
    fields[wire.HsField.WINDOW] = (1 << 31).to_bytes(4, "big")
    a.receive(wire.encode(p.type, p.dcid, p.scid, p.pn, wire.encode_fields(fields), p.flags), 0.01)
    assert a.is_established
    assert a._peer_window_limit == a._snd_una + 64
    assert b._peer_window_limit == b._snd_una + 64  # the responder knows it from the composition


def test_draining_connection_lingers_while_its_peer_retransmits() -> None:
    from vtl.core.records import DRAIN_RTOS

    a, b = pair()
    a.close()
    b.close()
    shuttle(a, b, 0.1)
    assert a.is_terminated and b.is_terminated
    close = wire.encode(
        PacketType.CLOSE,
        a.local_cid,
        b.local_cid,
        b._next_pn + 1,
        wire.encode_close(b._close_final, b._close_final),
    )
    a.receive(close, 0.5)
    assert a._drain_deadline == 0.5 + DRAIN_RTOS * a.rtt.base_rto()
    (reply,) = a.datagrams_to_send(0.5)  # the final ACK, repeated
    p = wire.decode(reply)
    assert p.type is PacketType.ACK and p.flags & wire.AckFlags.CLOSE_ACKED
    forged = wire.encode(PacketType.CLOSE, a.local_cid, 12345, 0, wire.encode_close(0, 0))
    a.receive(forged, 0.6)  # from another connection ID: ignored
    assert a._drain_deadline == 0.5 + DRAIN_RTOS * a.rtt.base_rto() and not a.datagrams_to_send(0.6)
