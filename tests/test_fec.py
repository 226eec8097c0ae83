"""Forward error correction (fec role): codecs, REPAIR wire format, and
transfers in the simulated network (byte-exact delivery, rebuilt packets,
fewer retransmissions and a lower p99 request/response latency than
selective repeat alone), malformed REPAIRs, negotiation, replaceable state."""

from __future__ import annotations

import random

import pytest

from vtl.core import wire
from vtl.core.composition import Composition
from vtl.core.config import ConnectionConfig
from vtl.core.errors import CompositionError, WireError
from vtl.core.events import HandshakeFailed
from vtl.core.fec import BlockDecoder, BlockEncoder, LossMeter
from vtl.core.registry import Registry
from vtl.core.wire import PacketType, RepairFrame
from vtl.sim.harness import Transfer, run_transfer
from vtl.sim.network import LinkConditions
from vtl.tfs import register_builtins
from vtl.tfs.fec import ReedSolomonFec, XorFec
from vtl.tfs.fec.base import block_failure, needed_repairs

SR = "reliability=selective-repeat"
RS = SR + " fec=reed-solomon(k=8,m=2)"
XOR = SR + " fec=xor(k=4)"


def symbols(n: int, seed: int = 0) -> list[bytes]:
    rng = random.Random(seed)
    return [rng.randbytes(40) for _ in range(n)]


# ------------------------------------------------------------------ codecs


@pytest.mark.parametrize("lost", [(0,), (3,), (1, 6), (0, 7), (2, 5)])
def test_reed_solomon_rebuilds_any_m_erasures(lost: tuple[int, ...]) -> None:
    rs = ReedSolomonFec({"k": 8, "m": 2})
    src = symbols(8)
    repairs = dict(enumerate(rs.encode(src, 2)))
    have = {i: s for i, s in enumerate(src) if i not in lost}
    assert rs.decode(8, 2, have, repairs) == {i: src[i] for i in lost}


def test_reed_solomon_needs_enough_symbols() -> None:
    rs = ReedSolomonFec({"k": 4, "m": 1})
    src = symbols(4)
    repairs = dict(enumerate(rs.encode(src, 1)))
    assert rs.decode(4, 1, {0: src[0], 1: src[1]}, repairs) is None


def test_xor_rebuilds_one_loss_only() -> None:
    x = XorFec({"k": 4})
    src = symbols(4, 1)
    parity = {0: x.encode(src, 1)[0]}
    assert x.decode(4, 1, {0: src[0], 1: src[1], 3: src[3]}, parity) == {2: src[2]}
    assert x.decode(4, 1, {0: src[0], 3: src[3]}, parity) is None


def test_adaptive_redundancy_follows_loss() -> None:
    assert block_failure(8, 2, 0.02) < block_failure(8, 1, 0.02)
    low = needed_repairs(8, 10, 1e-3, 1, 8)
    high = needed_repairs(8, 100, 1e-3, 1, 8)
    assert 1 <= low < high <= 8
    rs = ReedSolomonFec({"k": 8, "m": 2, "adaptive": True, "max_m": 6})
    assert rs.repairs(8, None) == 2  # no report yet: the configured m
    assert rs.repairs(8, 0.2) == 6  # capped at max_m
    x = XorFec({"k": 16, "adaptive": True, "min_k": 2})
    assert x.block_for(None) == 16
    assert 2 <= x.block_for(0.05) < x.block_for(0.005) <= 16


def test_bad_parameters_are_clear_errors() -> None:
    with pytest.raises(CompositionError, match="'k'"):
        Composition.parse(SR + " fec=reed-solomon(k=0)").validate()
    with pytest.raises(CompositionError, match="unknown parameter"):
        Composition.parse(SR + " fec=xor(m=2)").validate()


def test_encoder_flush_and_decoder_rebuild_exact_packets() -> None:
    """Unequal lengths and DATA flags come back exactly."""
    rs = ReedSolomonFec({"k": 4, "m": 2})
    enc = BlockEncoder(rs, 1000)
    payloads = [b"a" * 10, b"bb" * 100, b"", b"c" * 7]
    frames: list[RepairFrame] = []
    for i, p in enumerate(payloads):
        frames += enc.add(100 + i, i % 3, p, 0.0)
    assert len(frames) == 2 and all(f.n == 4 and f.m == 2 for f in frames)
    dec = BlockDecoder(rs, 1000)
    dec.note(100, 0, payloads[0])
    dec.note(103, 0, payloads[3])
    rebuilt, useful = dec.on_repair(frames[0], 100, lambda s: False, 100, 10_000)
    assert rebuilt == [] and useful  # one repair, two losses: wait
    rebuilt, useful = dec.on_repair(frames[1], 100, lambda s: False, 100, 10_000)
    assert rebuilt == [(101, 1, payloads[1]), (102, 2, payloads[2])]


def test_partial_block_gets_its_share_of_repairs() -> None:
    enc = BlockEncoder(ReedSolomonFec({"k": 8, "m": 2}), 1000)
    assert enc.add(5, 0, b"x", 0.0) == []
    assert len(enc.flush()) == 1  # ceil(2 * 1 / 8)
    enc.add(6, 0, b"x", 0.0)
    for seq in range(7, 11):
        enc.add(seq, 0, b"y", 0.0)
    assert len(enc.flush()) == 2  # ceil(2 * 5 / 8)


def test_loss_meter_measures_pn_gaps() -> None:
    meter = LossMeter()
    for pn in range(2000):
        if pn % 10:
            meter.observe(pn)
    assert meter.rate == pytest.approx(0.1, abs=0.02)


# ------------------------------------------------------------------- wire


def test_repair_wire_roundtrip_and_malformed() -> None:
    frame = RepairFrame(0xFFFFFFFF, 8, 2, 1, 2, b"\x00\x05\x01hello")
    assert wire.decode_repair(wire.encode_repair(frame)) == frame
    body = wire.encode_repair(frame)
    for bad in (
        body[:10],  # too short
        body[:4] + bytes([0, 2, 1, 2]) + body[8:],  # n = 0
        body[:4] + bytes([8, 2, 2, 2]) + body[8:],  # index >= m
        body[:4] + bytes([200, 100, 0, 2]) + body[8:],  # n + m > 256
    ):
        with pytest.raises(WireError):
            wire.decode_repair(bad)


# ---------------------------------------------------------------- transfers


@pytest.mark.parametrize("comp", [RS, XOR, SR + " fec=reed-solomon(k=8,m=2,adaptive=true)"])
@pytest.mark.parametrize("loss", [0.02, 0.05, 0.10])
def test_byte_exact_with_fec_under_loss(comp: str, loss: float) -> None:
    data = random.Random(7).randbytes(300_000)
    r = run_transfer(comp, forward=LinkConditions(delay=0.02, loss=loss), data_ab=data, seed=11)
    assert r.completed and r.clean
    assert r.b.data == data
    assert r.a.stats["fec_repair_sent"] > 0
    assert r.b.stats["fec_recovered"] > 0  # lost DATA rebuilt and delivered
    assert r.b.stats["fec_repair_received"] <= r.a.stats["fec_repair_sent"]


def test_fec_cuts_retransmissions_at_2_percent() -> None:
    data = random.Random(8).randbytes(400_000)
    retx = {}
    for comp in (SR, RS):
        total = 0
        for seed in range(4):
            r = run_transfer(
                comp, forward=LinkConditions(delay=0.02, loss=0.02), data_ab=data, seed=seed
            )
            assert r.b.data == data and r.clean
            total += r.a.stats["retransmissions"]
        retx[comp] = total
    assert retx[SR] >= 8  # the loss is really there
    assert retx[RS] * 2 <= retx[SR]


def rr_latencies(comp: str, loss: float, seed: int, count: int = 300) -> tuple[list[float], int]:
    """Request/response over message framing: A sends a 200-byte request
    when the previous 1000-byte response arrived; returns the round trips
    (sorted) and the retransmissions of both ends."""
    st: dict = {"sent": 0, "answered": 0, "t0": None, "lat": []}

    def check(tr: Transfer) -> None:
        a, b = tr.conn_a, tr.conn_b
        if a is None or not a.is_established:
            return
        while b is not None and st["answered"] < len(tr.app_b.result.messages):
            b.send(bytes([st["answered"] % 256]) * 1000)
            st["answered"] += 1
            tr.net.poke()
        if st["t0"] is not None and len(tr.app_a.result.messages) == st["sent"]:
            st["lat"].append(tr.net.now - st["t0"])
            st["t0"] = None
        if st["t0"] is None and st["sent"] < count:
            a.send(bytes([st["sent"] % 256]) * 200)
            st["sent"] += 1
            st["t0"] = tr.net.now
            tr.net.poke()

    r = run_transfer(
        comp + " framing=message",
        forward=LinkConditions(delay=0.02, loss=loss),
        close_a=None,
        close_b=None,
        check=check,
        stop=lambda tr: len(st["lat"]) >= count,
        seed=seed,
        timeout=600,
    )
    assert r.completed
    for i, msg in enumerate(r.b.messages):
        assert msg == bytes([i % 256]) * 200
    for i, msg in enumerate(r.a.messages):
        assert msg == bytes([i % 256]) * 1000
    return sorted(st["lat"]), r.a.stats["retransmissions"] + r.b.stats["retransmissions"]


def p99(lat: list[float]) -> float:
    return lat[min(len(lat) - 1, int(0.99 * len(lat)))]


def test_fec_cuts_p99_request_response_latency_at_2_percent() -> None:
    sr_lat, sr_retx = [], 0
    fec_lat, fec_retx = [], 0
    for seed in (1, 2):
        lat, retx = rr_latencies(SR, 0.02, seed)
        sr_lat += lat
        sr_retx += retx
        lat, retx = rr_latencies(RS, 0.02, seed)
        fec_lat += lat
        fec_retx += retx
    sr_lat.sort()
    fec_lat.sort()
    assert p99(sr_lat) > 0.1  # SR alone pays a retransmission round trip
    assert p99(fec_lat) < 0.05  # FEC rebuilds in the same round trip
    assert fec_retx < sr_retx


def test_unrecoverable_blocks_are_counted_and_retransmitted() -> None:
    data = random.Random(9).randbytes(200_000)
    r = run_transfer(
        SR + " fec=xor(k=8)", forward=LinkConditions(delay=0.01, loss=0.2), data_ab=data, seed=3
    )
    assert r.b.data == data and r.clean
    assert r.b.stats["fec_unrecoverable_blocks"] > 0
    assert r.a.stats["retransmissions"] > 0


def test_adaptive_sender_follows_reported_loss() -> None:
    data = random.Random(10).randbytes(300_000)
    ratio = {}
    for loss in (0.01, 0.15):
        t = Transfer(
            [Composition.parse(SR + " fec=reed-solomon(k=8,m=1,adaptive=true,max_m=6)")],
            forward=LinkConditions(delay=0.01, loss=loss),
            data_ab=data,
            seed=4,
        )
        r = t.run()
        assert r.b.data == data and r.clean
        assert t.conn_a.fec_tx.loss == pytest.approx(loss, abs=0.06)
        ratio[loss] = r.a.stats["fec_repair_sent"] / r.a.stats["data_packets_sent"]
    assert ratio[0.15] > 2 * ratio[0.01]


def test_fec_state_replaceable_between_blocks() -> None:
    """What a reconfiguration does: replace the encoder/decoder (other
    parameters), then remove FEC, on a running connection under loss."""
    data = random.Random(11).randbytes(400_000)

    def swap(tf):
        def action(tr: Transfer) -> None:
            for conn in (tr.conn_a, tr.conn_b):
                out: list[bytes] = []
                conn._fec_install(tf, out, tr.net.now)
                assert out == [] or conn is tr.conn_a
                # a real switch sends these; here they are simply dropped

        return action

    r = run_transfer(
        RS,
        forward=LinkConditions(delay=0.01, loss=0.05),
        data_ab=data,
        seed=5,
        schedule=[(0.15, swap(ReedSolomonFec({"k": 4, "m": 1}))), (0.3, swap(None))],
    )
    assert r.b.data == data and r.clean
    assert r.b.stats["fec_recovered"] > 0


# ------------------------------------------------------ malformed / negotiation


def established(comp: str) -> Transfer:
    t = Transfer(
        [Composition.parse(comp)],
        close_a=None,
        close_b=None,
        stop=lambda tr: (
            tr.conn_b is not None and tr.conn_a.is_established and tr.conn_b.is_established
        ),
    )
    t.run()
    return t


def test_malformed_repairs_are_counted_drops() -> None:
    t = established(RS)
    b = t.conn_b
    una = b._rcv_next
    good_symbol = b"\x00\x03\x00abc"
    bodies = [
        b"\x00" * 5,  # too short
        wire.REPAIR_FIXED.pack(una, 0, 1, 0, 2) + good_symbol,  # n = 0
        wire.REPAIR_FIXED.pack(una, 4, 1, 0, 1) + good_symbol,  # XOR on a Reed-Solomon link
        wire.REPAIR_FIXED.pack(una, 4, 1, 0, 2) + b"\x00" * 2000,  # symbol longer than DATA
        wire.REPAIR_FIXED.pack(una + 100_000, 4, 1, 0, 2) + good_symbol,  # outside window
        wire.REPAIR_FIXED.pack(una, 4, 2, 0, 2) + good_symbol,  # opens a block ...
        wire.REPAIR_FIXED.pack(una, 5, 2, 1, 2) + good_symbol,  # ... contradicted
    ]
    before = b.stats["dropped_invalid"]
    pn = t.conn_a._next_pn
    for i, body in enumerate(bodies):
        b.receive(wire.encode(PacketType.REPAIR, b.local_cid, b.peer_cid, pn + i, body), t.net.now)
    assert b.stats["dropped_invalid"] - before == len(bodies) - 1
    assert b.stats["fec_recovered"] == 0 and not b.is_terminated
    # a REPAIR on a connection without FEC
    plain = established(SR).conn_b
    before = plain.stats["dropped_invalid"]
    body = wire.REPAIR_FIXED.pack(plain._rcv_next, 4, 1, 0, 2) + good_symbol
    plain.receive(
        wire.encode(PacketType.REPAIR, plain.local_cid, plain.peer_cid, 5, body), t.net.now
    )
    assert plain.stats["dropped_invalid"] == before + 1


def registry_without_fec() -> Registry:
    reg = Registry()
    register_builtins(reg)
    reg.unregister("fec", "reed-solomon")
    reg.unregister("fec", "xor")
    return reg


def test_peer_without_fec_refuses() -> None:
    r = run_transfer(
        RS,
        config_b=ConnectionConfig(registry=registry_without_fec()),
        data_ab=b"x" * 1000,
        timeout=30,
    )
    assert isinstance(r.a.handshake, HandshakeFailed)
    assert "reed-solomon" in r.a.handshake.reason


def test_peer_without_fec_counter_offers_plain_selective_repeat() -> None:
    plain = Composition.parse(SR)
    data = random.Random(12).randbytes(50_000)
    r = run_transfer(
        RS,
        config_b=ConnectionConfig(registry=registry_without_fec(), counter_offers=[plain]),
        forward=LinkConditions(delay=0.01, loss=0.02),
        data_ab=data,
    )
    assert r.clean and r.b.data == data
    assert r.a.handshake.counter_offer and r.a.handshake.composition == plain
    assert "fec_repair_sent" not in r.a.stats


class DropRepairs:
    """Stands in front of an endpoint and drops every REPAIR packet."""

    def __init__(self, endpoint) -> None:
        self.endpoint = endpoint
        self.dropped = 0

    def receive(self, datagram: bytes, addr, now: float) -> None:
        if datagram[1] == PacketType.REPAIR:
            self.dropped += 1
            return
        self.endpoint.receive(datagram, addr, now)

    def datagrams_to_send(self, now: float):
        return self.endpoint.datagrams_to_send(now)

    def next_timer(self):
        return self.endpoint.next_timer()

    def handle_timer(self, now: float) -> None:
        self.endpoint.handle_timer(now)


def test_lost_repairs_are_not_congestion() -> None:
    """Every REPAIR is lost on an otherwise clean path: nothing is declared
    lost, congestion control never backs off, and the flight drains."""
    wrappers: list[DropRepairs] = []

    def wrap(ep):
        wrappers.append(DropRepairs(ep))
        return wrappers[-1]

    data = random.Random(13).randbytes(300_000)
    t = Transfer(
        [Composition.parse(RS)],
        forward=LinkConditions(delay=0.01),
        data_ab=data,
        wrap_b=wrap,
        close_b=None,
        stop=lambda tr: len(tr.app_b.data) == len(data) and not tr.conn_a._outstanding,
    )
    r = t.run()
    a = t.conn_a
    assert r.completed and bytes(t.app_b.data) == data
    assert wrappers[0].dropped == a.stats["fec_repair_sent"] > 0
    assert a.stats["packets_lost"] == 0 and a.stats["retransmissions"] == 0
    assert a.cc.ssthresh is None  # no congestion event
    assert a._bytes_in_flight == 0 and a._rto_deadline is None


def test_fec_added_to_a_running_connection_protects_small_messages() -> None:
    """A connection negotiated without FEC gets an encoder/decoder later
    (as a reconfiguration would): its small messages are protected, full
    segments (no room for the symbol prefix) are sent unprotected."""
    st: dict = {}

    def check_install(tr: Transfer) -> None:
        if not st and tr.conn_b is not None and tr.conn_b.is_established:
            for conn in (tr.conn_a, tr.conn_b):
                conn._fec_install(ReedSolomonFec({"k": 8, "m": 2}))
            st["done"] = True

    data = random.Random(14).randbytes(100_000)
    t = Transfer(
        [Composition.parse(SR + " framing=message")],
        forward=LinkConditions(delay=0.01, loss=0.05),
        data_ab=[data[i : i + 500] for i in range(0, len(data), 500)],
        check=check_install,
        seed=6,
    )
    r = t.run()
    assert r.clean and b"".join(r.b.messages) == data
    assert r.a.stats["fec_repair_sent"] > 0 and r.b.stats["fec_recovered"] > 0


def test_fec_with_bbr_keeps_request_response_at_one_round_trip() -> None:
    """Request/response is app-limited: its one-packet-per-RTT delivery
    samples must not become BBR's bandwidth estimate, or the REPAIR behind
    each response is paced a whole RTT later (p50 was 64 ms on a 40 ms path
    until packets sent from an empty pipe were marked app-limited)."""
    lat, retx = rr_latencies(
        "reliability=selective-repeat congestion=bbr fec=reed-solomon(k=8,m=2)", 0.02, 1, count=200
    )
    assert p99(lat) < 0.05 and lat[len(lat) // 2] < 0.045
    assert retx == 0


def test_fec_with_bbr_bulk_keeps_its_bandwidth_estimate() -> None:
    """REPAIRs use the path: released ones count as delivered, else BBR's
    delivery-rate samples see only the data share of what it paced and its
    estimate ratchets down round after round (8 MiB stalled at 0.4 Mbit/s)."""
    data = random.Random(21).randbytes(8 << 20)
    link = LinkConditions(delay=0.01, loss=0.02, rate_bps=10e6)
    r = run_transfer(
        "reliability=selective-repeat congestion=bbr fec=reed-solomon(k=8,m=2)",
        forward=link,
        backward=link,
        data_ab=data,
        seed=1,
        timeout=60,
    )
    assert r.completed and r.b.data == data
    goodput = len(data) * 8 / r.sim_time
    assert goodput > 0.7 * 10e6 * 8 / 10  # k/(k+m) of the link, less slack
