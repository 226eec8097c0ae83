"""CUBIC, BBR and LEDBAT: unit tests with fake packets, and behaviour on the
simulated network (deterministic: seeded loss, simulated clock)."""

from __future__ import annotations

import itertools
import math
import statistics
from dataclasses import dataclass

import pytest

from vtl.core.composition import Composition
from vtl.core.config import ConnectionConfig
from vtl.core.endpoint import EndpointCore
from vtl.core.errors import CompositionError
from vtl.core.registry import default_registry
from vtl.core.rtt import RttEstimator
from vtl.core.wire import DATA_OVERHEAD
from vtl.service import TransportProperties
from vtl.service.selection import select
from vtl.sim.harness import ADDR_A, ADDR_B, run_transfer
from vtl.sim.network import LinkConditions, SimNetwork
from vtl.tfs.congestion import Bbr, Cubic, Ledbat
from vtl.tfs.congestion.base import RateSample

MSS = 1000
_pn = itertools.count()


@dataclass
class Pkt:
    sent_time: float
    size: int = MSS
    in_flight: bool = True
    pn: int = 0
    delivered: int = 0
    delivered_time: float = 0.0
    first_sent_time: float = 0.0
    is_app_limited: bool = False

    def __post_init__(self) -> None:
        self.pn = next(_pn)


def rtt_of(seconds: float) -> RttEstimator:
    rtt = RttEstimator(initial_rtt=seconds)
    rtt.on_sample(seconds)
    return rtt


# ===================================================================== CUBIC


def cubic_in_ca(cwnd_packets: int, **params) -> Cubic:
    cc = Cubic({"hystart": False, **params}, max_datagram_size=MSS)
    cc.congestion_window = cc._cwnd = cwnd_packets * MSS
    cc.ssthresh = cwnd_packets * MSS  # congestion avoidance
    return cc


def run_rounds(cc: Cubic, start: float, end: float, rtt: RttEstimator) -> list[tuple[float, float]]:
    """A window-limited sender: each RTT one window of packets is acked,
    one by one; returns (time, cwnd in packets) at each round's end."""
    curve = []
    now = start
    while now < end:
        sent = now
        now += rtt.smoothed
        for _ in range(max(1, cc.congestion_window // MSS)):
            cc.on_packet_sent(packet=Pkt(now), now=now, bytes_in_flight=cc.congestion_window)
            cc.on_packets_acked(
                packets=[Pkt(sent_time=sent + 1e-6)], now=now, rtt=rtt, bytes_in_flight=0
            )
        curve.append((now, cc.congestion_window / MSS))
    return curve


def test_cubic_loss_reduction_and_k() -> None:
    cc = cubic_in_ca(100)
    cc.on_packets_lost(packets=[Pkt(sent_time=0.5)], now=1.0, bytes_in_flight=0)
    assert cc.congestion_window == 70 * MSS and cc.ssthresh == 70 * MSS
    assert cc.w_max == 100 * MSS
    # a second loss of the same flight is the same congestion event
    cc.on_packets_lost(packets=[Pkt(sent_time=0.9)], now=1.01, bytes_in_flight=0)
    assert cc.congestion_window == 70 * MSS


def test_cubic_window_follows_the_rfc_curve_after_a_loss() -> None:
    """W(t) = C (t - K)^3 + W_max with K = cbrt(W_max (1 - beta) / C)
    (RFC 9438 eq. 1-2), W_max = 100, beta 0.7, C 0.4 -> K = 4.217 s."""
    cc = cubic_in_ca(100, reno_friendly=False)
    rtt = rtt_of(0.1)
    cc.on_packets_lost(packets=[Pkt(sent_time=0.5)], now=1.0, bytes_in_flight=0)
    curve = run_rounds(cc, 1.0, 9.0, rtt)
    epoch = cc.epoch_start
    k = (100 * 0.3 / 0.4) ** (1 / 3)
    assert cc.k == pytest.approx(k, rel=1e-9)
    assert epoch == pytest.approx(1.1)  # the first ACK in congestion avoidance
    for now, cwnd in curve[5:]:
        t = now - epoch
        expected = 0.4 * (t - k) ** 3 + 100
        # the window tracks W_cubic(t + RTT) one RTT late: within 2 % (+1 datagram)
        assert abs(cwnd - expected) <= 0.02 * expected + 1.5, (t, cwnd, expected)
    # concave below W_max, a plateau around it, convex beyond
    at = dict((round(now - epoch, 1), w) for now, w in curve)
    assert at[2.0] - at[1.0] > at[4.0] - at[3.0]
    assert abs(at[4.2] - 100) < 2
    assert at[7.0] - at[6.0] > at[5.0] - at[4.2]


def test_cubic_fast_convergence_lowers_w_max() -> None:
    cc = cubic_in_ca(100)
    cc.w_max = 120 * MSS  # a previous loss happened at a larger window
    cc.on_packets_lost(packets=[Pkt(sent_time=0.5)], now=1.0, bytes_in_flight=0)
    assert cc.w_max == pytest.approx(100 * MSS * 1.7 / 2)
    off = cubic_in_ca(100, fast_convergence=False)
    off.w_max = 120 * MSS
    off.on_packets_lost(packets=[Pkt(sent_time=0.5)], now=1.0, bytes_in_flight=0)
    assert off.w_max == 100 * MSS


def test_cubic_reno_friendly_region_dominates_on_short_rtts() -> None:
    """With a small W_max and a short RTT the cubic curve is slower than AIMD:
    the window then follows W_est (alpha = 3 (1-beta)/(1+beta) per RTT)."""
    rtt = rtt_of(0.01)
    friendly = cubic_in_ca(20)
    plain = cubic_in_ca(20, reno_friendly=False)
    for cc in (friendly, plain):
        cc.on_packets_lost(packets=[Pkt(sent_time=0.5)], now=1.0, bytes_in_flight=0)
        run_rounds(cc, 1.0, 2.0, rtt)  # 100 rounds
    assert plain.congestion_window / MSS < 20  # W_cubic(1 s) = 18.8
    alpha = 3 * 0.3 / 1.7
    assert friendly.congestion_window / MSS == pytest.approx(14 + 100 * alpha, rel=0.05)


def test_cubic_paces() -> None:
    cc = cubic_in_ca(100)
    rtt = rtt_of(0.05)
    run_rounds(cc, 0.0, 0.2, rtt)
    assert cc.pacing_rate == pytest.approx(1.2 * cc._cwnd / 0.05)


def test_hystart_enters_css_on_rtt_increase_then_congestion_avoidance() -> None:
    cc = Cubic(max_datagram_size=MSS)
    rtt = RttEstimator(initial_rtt=0.1)
    now = 0.0

    def round_(delay: float) -> None:
        nonlocal now
        sent = [Pkt(sent_time=now) for _ in range(cc.congestion_window // MSS)]
        for p in sent:
            cc.on_packet_sent(packet=p, now=now, bytes_in_flight=cc.congestion_window)
        now += delay
        cc.on_packet_sent(packet=Pkt(now), now=now, bytes_in_flight=cc.congestion_window)
        for p in sent:
            rtt.on_sample(delay)
            cc.on_rtt_measurement(rtt=rtt, now=now)
            cc.on_packets_acked(packets=[p], now=now, rtt=rtt, bytes_in_flight=0)

    round_(0.1)
    round_(0.1)
    assert cc.in_slow_start and not cc.in_css
    before = cc.congestion_window
    round_(0.1)
    assert cc.congestion_window == 2 * before  # plain slow start doubles
    round_(0.13)  # + 30 ms > clamp(100 ms / 8, 4, 16) = 12.5 ms
    assert cc.in_css
    grown = cc.congestion_window
    for _ in range(CSS := 5):
        round_(0.13)
    assert not cc.in_slow_start and cc.ssthresh is not None
    assert cc.congestion_window < grown * 2 ** (CSS / 4 + 0.5)  # grew ~4x slower


# ======================================================================= BBR


def test_bbr_max_filter_and_states() -> None:
    cc = Bbr(max_datagram_size=MSS)
    rtt = rtt_of(0.05)
    cc.on_rtt_measurement(rtt=rtt, now=0.05)
    assert cc.mode.value == "startup" and cc.pacing_rate > 0
    delivered = 0
    now = 0.05
    # the bandwidth plateaus at 1 MB/s: three rounds without 25 % growth end Startup
    for _ in range(12):
        now += 0.05
        sample = RateSample(1e6, 50_000, 0.05, 0.05, False, delivered)
        delivered += 50_000
        cc.on_packets_acked(
            packets=[Pkt(sent_time=now - 0.05, size=50_000)],
            now=now,
            rtt=rtt,
            bytes_in_flight=10_000,
            rate=sample,
        )
    assert cc.filled_pipe
    assert cc.mode.value == "probe_bw"
    assert cc.btl_bw == pytest.approx(1e6)
    assert cc.congestion_window == pytest.approx(2 * 1e6 * 0.05 + 3 * MSS, rel=0.01)
    assert cc.pacing_rate == pytest.approx(cc.pacing_gain * 1e6)
    # an app-limited sample below the estimate does not lower it
    cc.on_packets_acked(
        packets=[Pkt(sent_time=now)],
        now=now + 0.05,
        rtt=rtt,
        bytes_in_flight=0,
        rate=RateSample(1e5, 5000, 0.05, 0.05, True, delivered),
    )
    assert cc.btl_bw == pytest.approx(1e6)


def test_bbr_random_loss_does_not_cut_rate_but_heavy_loss_caps_flight() -> None:
    cc = Bbr(max_datagram_size=MSS)
    rtt = rtt_of(0.05)
    cc.on_rtt_measurement(rtt=rtt, now=0.05)
    delivered, now = 0, 0.05
    for _ in range(40):
        now += 0.05
        sample = RateSample(1e6, 50_000, 0.05, 0.05, False, delivered)
        delivered += 50_000
        cc.on_packets_acked(
            packets=[Pkt(sent_time=now - 0.05, size=47_500)],
            now=now,
            rtt=rtt,
            bytes_in_flight=100_000,
            rate=sample,
        )
        cc.on_packets_lost(
            packets=[Pkt(sent_time=now - 0.06, size=2500)], now=now, bytes_in_flight=100_000
        )  # 5 % loss every round
    assert cc.inflight_hi == float("inf")
    assert 0.03 < cc.loss_rate < 0.07
    assert cc.pacing_rate >= cc.pacing_gain * 1e6  # not cut; compensated for the loss
    # 40 % loss per round is congestion: the flight gets capped
    for _ in range(2):
        now += 0.05
        sample = RateSample(1e6, 50_000, 0.05, 0.05, False, delivered)
        delivered += 50_000
        cc.on_packets_lost(
            packets=[Pkt(sent_time=now - 0.06, size=40_000)], now=now, bytes_in_flight=100_000
        )
        cc.on_packets_acked(
            packets=[Pkt(sent_time=now - 0.05, size=60_000)],
            now=now,
            rtt=rtt,
            bytes_in_flight=100_000,
            rate=sample,
        )
    assert cc.inflight_hi < 100_000
    assert cc.congestion_window <= cc.inflight_hi


SIM_RATE = 10e6
SIM_DELAY = 0.025  # 50 ms RTT


def sim_goodput(cc: str, loss: float, size: int = 6_000_000, seed: int = 1) -> float:
    """Goodput (bit/s of application bytes) of one bulk transfer over a
    10 Mbit/s, 50 ms RTT bottleneck with random loss both ways."""
    data = bytes(range(256)) * (size // 256)
    result = run_transfer(
        f"reliability=selective-repeat congestion={cc}",
        forward=LinkConditions(delay=SIM_DELAY, loss=loss, rate_bps=SIM_RATE),
        backward=LinkConditions(delay=SIM_DELAY, loss=loss),
        data_ab=data,
        seed=seed,
        timeout=400,
    )
    assert result.b.data == data
    return len(data) * 8 / result.b.last_data_at


def test_bbr_reaches_90_percent_of_the_lossy_link_newreno_does_not() -> None:
    """The physical limit is rate x (1 - loss) x payload efficiency; the
    goodput counts the handshake and Startup too."""
    efficiency = (1452 - DATA_OVERHEAD) / 1452
    for loss in (0.02, 0.05):
        limit = SIM_RATE * (1 - loss)
        bbr = sim_goodput("bbr", loss)
        assert bbr >= 0.9 * limit, (loss, bbr / limit)
        assert bbr <= limit * efficiency * 1.001
    reno = sim_goodput("newreno", 0.05, size=1_000_000)
    assert reno < 0.3 * SIM_RATE * 0.95


def test_bbr_without_loss_keeps_the_queue_short() -> None:
    queues = []

    def check(t) -> None:
        conn = t.conn_a
        if conn is not None and conn.rtt.srtt is not None and t.net.now > 2.0:
            queues.append(conn.rtt.latest - conn.rtt.min_rtt)

    data = bytes(4_000_000)
    result = run_transfer(
        "reliability=selective-repeat congestion=bbr",
        forward=LinkConditions(delay=SIM_DELAY, rate_bps=SIM_RATE, queue_bytes=1 << 20),
        backward=LinkConditions(delay=SIM_DELAY),
        data_ab=data,
        check=check,
    )
    assert result.b.data == data
    # NewReno would fill the 1 MB queue (800 ms); BBR keeps it near one BDP or less
    assert statistics.median(queues) < 0.06


# ==================================================================== LEDBAT


def test_ledbat_window_update_tracks_target() -> None:
    cc = Ledbat({"target_ms": 50}, max_datagram_size=MSS)
    cc._slow_start = False  # congestion avoidance
    cc._set_cwnd(10 * MSS)
    rtt = RttEstimator()
    for delay in (0.1, 0.1):
        rtt.on_sample(delay)
        cc.on_rtt_measurement(rtt=rtt, now=1.0)
    assert cc.base_delay == 0.1 and cc.queuing_delay == 0.0
    gain = 1 / math.ceil(2 * 0.05 / 0.1)
    cc.on_packet_sent(packet=Pkt(1.0), now=1.0, bytes_in_flight=10 * MSS)
    cc.on_packets_acked(packets=[Pkt(sent_time=1.0)], now=1.1, rtt=rtt, bytes_in_flight=0)
    assert cc._cwnd == pytest.approx(10 * MSS + gain * MSS * MSS / (10 * MSS))
    for _ in range(4):  # queuing delay 100 ms = 2 x target: shrink
        rtt.on_sample(0.2)
        cc.on_rtt_measurement(rtt=rtt, now=1.2)
    assert cc.queuing_delay == pytest.approx(0.1)
    before = cc._cwnd
    cc.on_packets_acked(packets=[Pkt(sent_time=1.15)], now=1.2, rtt=rtt, bytes_in_flight=0)
    w = before / MSS
    per_rtt = max(gain - 1.0 * w * (0.1 / 0.05 - 1), -w / 2)  # LEDBAT++ decrease
    assert cc._cwnd == pytest.approx(before + per_rtt * MSS * MSS / before)
    assert cc._cwnd < before - MSS / 3
    assert cc.pacing_rate == pytest.approx(1.2 * cc._cwnd / rtt.smoothed)


def queuing_delays(cc: str, target_ms: float | None = None) -> list[float]:
    delays: list[float] = []

    def check(t) -> None:
        conn = t.conn_a
        if conn is not None and conn.rtt.srtt is not None and t.net.now > 3.0:
            delays.append(conn.rtt.latest - conn.rtt.min_rtt)

    comp = f"reliability=selective-repeat congestion={cc}"
    if target_ms is not None:
        comp += f"(target_ms={target_ms})"
    data = bytes(8_000_000)
    result = run_transfer(
        comp,
        forward=LinkConditions(delay=SIM_DELAY, rate_bps=SIM_RATE, queue_bytes=512 * 1024),
        backward=LinkConditions(delay=SIM_DELAY),
        data_ab=data,
        check=check,
    )
    assert result.b.data == data
    return delays


def test_ledbat_keeps_queuing_delay_near_target() -> None:
    led = statistics.median(queuing_delays("ledbat"))
    led30 = statistics.median(queuing_delays("ledbat", 30))
    reno = statistics.median(queuing_delays("newreno"))
    # LEDBAT settles below the target and creeps up to it (0.1 datagram per
    # RTT at 10 Mbit/s, 50 ms): 40 ms and 22 ms measured; a loss-based flow
    # fills the 420 ms queue
    assert 0.03 < led < 0.075, led  # target 60 ms
    assert 0.012 < led30 < 0.04, led30
    assert led30 < led
    assert reno > 0.15, reno
    assert reno > 0.15  # a loss-based flow fills the 420 ms queue


def test_ledbat_yields_to_a_loss_based_flow() -> None:
    """A LEDBAT and a NewReno flow share a 10 Mbit/s bottleneck (big queue):
    NewReno's queue pushes LEDBAT down to a small share."""
    net = SimNetwork(seed=2)
    a = EndpointCore(ConnectionConfig())
    b = EndpointCore(ConnectionConfig(), listen=True)
    net.attach(ADDR_A, a)
    net.attach(ADDR_B, b)
    net.link(
        ADDR_A,
        ADDR_B,
        LinkConditions(delay=SIM_DELAY, rate_bps=SIM_RATE, queue_bytes=384 * 1024),
        LinkConditions(delay=SIM_DELAY),
    )
    got: dict[str, int] = {}
    servers = []
    for name in ("ledbat", "newreno"):
        conn = a.connect(ADDR_B, [Composition.parse(f"congestion={name}")], net.now)
        conn.send(bytes(20_000_000))

    def pump() -> bool:
        acted = False
        while (conn := b.accept()) is not None:
            servers.append(conn)
        for conn in servers:
            name = conn.composition["congestion"].name
            while (event := conn.next_event()) is not None:
                got[name] = got.get(name, 0) + len(getattr(event, "data", b""))
                acted = True
        if acted:
            net.poke(ADDR_B)
        return False

    net.run_until(pump, 4.0)
    mid = dict(got)
    net.run_until(pump, 8.0)
    share = {k: got.get(k, 0) - mid.get(k, 0) for k in ("ledbat", "newreno")}
    total = sum(share.values())
    assert total * 8 / 8.0 > 0.8 * SIM_RATE * 0.97  # the link stays full
    assert share["ledbat"] < 0.2 * total, share


def test_scavenger_profile_selects_ledbat() -> None:
    sel = select(TransportProperties.background())
    assert sel.top.composition["congestion"].name == "ledbat"


# ============================================================== parameters


@pytest.mark.parametrize(
    ("cls", "params", "message"),
    [
        (Cubic, {"beta": 1.5}, "'beta' must be <= 0.95"),
        (Cubic, {"c": 0}, "'c' must be >= 0.01"),
        (Cubic, {"hystart": "maybe"}, "'hystart' must be bool"),
        (Bbr, {"loss_threshold": -0.1}, "'loss_threshold' must be >= 0.0"),
        (Bbr, {"bw_window_rounds": 1}, "'bw_window_rounds' must be >= 2"),
        (Bbr, {"cwnd_gain": "x"}, "'cwnd_gain' must be float"),
        (Ledbat, {"target_ms": 0}, "'target_ms' must be >= 1.0"),
        (Ledbat, {"target": 60}, "unknown parameter"),
    ],
)
def test_parameter_validation(cls, params, message) -> None:
    with pytest.raises(CompositionError, match=message):
        cls(params)


def test_registered_and_described() -> None:
    reg = default_registry()
    for name in ("cubic", "bbr", "ledbat"):
        cls = reg.get("congestion", name)
        assert cls.describe()["params"]
        assert Composition.parse(f"congestion={name}")["congestion"].name == name


# ============================================== engine fixes found on the way


def test_long_rtt_path_has_no_spurious_timeout_storm() -> None:
    """600 ms RTT: longer than the RTO derived from the initial 100 ms guess.
    The OFFER is resent before the ACCEPT arrives; the handshake still
    gives an RTT sample, and packets dropped by an RTO keep their send times
    for late ACKs, so the RTO adapts (it used to fire every round trip,
    1886 times for 8 MB)."""
    data = bytes(2_000_000)
    for cc in ("newreno", "bbr"):
        result = run_transfer(
            f"reliability=selective-repeat congestion={cc}",
            forward=LinkConditions(delay=0.3, rate_bps=SIM_RATE, queue_bytes=750_000),
            backward=LinkConditions(delay=0.3),
            data_ab=data,
            timeout=120,
        )
        assert result.b.data == data
        assert result.a.stats["rto_count"] <= 1, (cc, result.a.stats["rto_count"])
        assert result.b.last_data_at < 8.0, (cc, result.b.last_data_at)  # 1.6 s at line rate


def test_sack_ranges_keep_the_newest_when_they_do_not_fit() -> None:
    from vtl.core.connection import Connection
    from vtl.core.wire import ACK_MAX_RANGES

    conn = Connection(is_client=False)
    for k in range(100):  # 100 ranges: every other segment missing
        conn._rcv_ranges.add(2 * k + 1, 2 * k + 2)
    ranges = conn._sack_ranges()
    assert len(ranges) == ACK_MAX_RANGES
    assert ranges == sorted(ranges)
    assert ranges[0] == (1, 2)  # the oldest hole is still reported
    assert ranges[-1] == (199, 200)  # and so is the newest delivery
