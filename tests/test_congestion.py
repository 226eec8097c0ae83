"""Unit tests of the built-in congestion controllers (sans-I/O, fake packets)."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import pytest

from vtl.core.errors import CompositionError
from vtl.core.registry import Registry
from vtl.core.rtt import RttEstimator
from vtl.tfs.congestion import BUILTIN, FixedRate, NewReno, NoCongestionControl
from vtl.tfs.congestion.base import INFINITE_WINDOW, CongestionControl, RateSample

MDS = 1000  # round numbers: every window below is an exact multiple of this
_pn = itertools.count()


@dataclass
class FakePacket:
    """Matches the SentPacketInfo protocol."""

    sent_time: float
    size: int = MDS
    in_flight: bool = True
    pn: int = 0
    delivered: int = 0
    delivered_time: float = 0.0
    first_sent_time: float = 0.0
    is_app_limited: bool = False

    def __post_init__(self) -> None:
        self.pn = next(_pn)


def pkts(n: int, sent_time: float, size: int = MDS) -> list[FakePacket]:
    return [FakePacket(sent_time=sent_time, size=size) for _ in range(n)]


def ack(
    cc: CongestionControl,
    packets: list[FakePacket],
    now: float,
    flight: int = 0,
    limited: bool = True,
) -> None:
    """Acknowledge ``packets``; by default the sender was window-limited
    just before (a packet left with the flight at the full window)."""
    if limited:
        cwnd = min(cc.congestion_window, INFINITE_WINDOW)
        cc.on_packet_sent(packet=FakePacket(sent_time=now), now=now, bytes_in_flight=cwnd)
    cc.on_packets_acked(packets=packets, now=now, rtt=RttEstimator(), bytes_in_flight=flight)


def ack_one_by_one(cc: CongestionControl, packets: list[FakePacket], now: float) -> None:
    for p in packets:
        ack(cc, [p], now)


def lose(cc: CongestionControl, packets: list[FakePacket], now: float, flight: int = 0) -> None:
    cc.on_packets_lost(packets=packets, now=now, bytes_in_flight=flight)


def newreno(**params) -> NewReno:
    return NewReno(params, max_datagram_size=MDS)


# -- registry / description ------------------------------------------------


def test_builtin_list_registers_and_describes():
    reg = Registry()
    for cls in BUILTIN:
        reg.register(cls)
    assert reg.inventory()["congestion"] == {
        "bbr": ["1.0"],
        "cubic": ["1.0"],
        "fixed-rate": ["1.0"],
        "ledbat": ["1.0"],
        "newreno": ["1.0"],
        "none": ["1.0"],
    }
    d = NewReno.describe()
    assert d["role"] == "congestion" and d["name"] == "newreno" and d["version"] == "1.0"
    assert d["params"]["beta"] == {
        "type": "float",
        "default": 0.5,
        "min": 0.1,
        "max": 0.9,
        "doc": "multiplicative window reduction factor on loss",
    }
    assert set(FixedRate.describe()["params"]) == {"rate_mbps", "burst_packets"}
    assert NoCongestionControl.describe()["params"] == {}


# -- NewReno -------------------------------------------------------------


def test_newreno_initial_state():
    cc = newreno()
    assert cc.congestion_window == 10 * MDS
    assert cc.ssthresh is None
    assert cc.in_slow_start
    assert cc.pacing_rate is None
    assert NewReno().congestion_window == 10 * 1452  # default max_datagram_size
    assert newreno(initial_window_packets=4).congestion_window == 4000


def test_slow_start_doubles_per_rtt_of_acks():
    cc = newreno()
    now = 0.0
    for expected in (20_000, 40_000, 80_000, 160_000):
        flight = pkts(cc.congestion_window // MDS, sent_time=now)
        now += 0.1
        ack_one_by_one(cc, flight, now)
        assert cc.congestion_window == expected
    assert cc.in_slow_start
    assert cc.ssthresh is None


def test_slow_start_counts_bytes_not_acks():
    cc = newreno()
    ack(cc, pkts(3, 0.0, size=500), 0.1)  # small packets grow by their size
    assert cc.congestion_window == 11_500


def test_packets_not_in_flight_are_ignored():
    cc = newreno()
    ack(cc, [FakePacket(sent_time=0.0, in_flight=False)], 0.1)
    assert cc.congestion_window == 10_000
    lose(cc, [FakePacket(sent_time=0.0, in_flight=False)], 0.2)
    assert cc.congestion_window == 10_000
    assert cc.ssthresh is None
    assert cc.recovery_start_time is None


def test_loss_reduces_once_per_recovery_period():
    cc = newreno()
    lose(cc, pkts(1, sent_time=0.5), now=1.0)
    assert cc.congestion_window == 5_000
    assert cc.ssthresh == 5_000
    assert cc.recovery_start_time == 1.0
    assert not cc.in_slow_start
    # more losses of packets sent before the recovery started: same event
    lose(cc, pkts(2, sent_time=0.9), now=1.05)
    lose(cc, pkts(1, sent_time=1.0), now=1.1)  # sent at the very start: same event
    assert cc.congestion_window == 5_000
    assert cc.ssthresh == 5_000
    assert cc.recovery_start_time == 1.0
    # a packet sent after the recovery start is lost: new congestion event
    lose(cc, pkts(1, sent_time=1.2), now=1.4)
    assert cc.congestion_window == 2_500
    assert cc.ssthresh == 2_500
    assert cc.recovery_start_time == 1.4


def test_loss_batch_uses_latest_sent_time():
    cc = newreno()
    lose(cc, pkts(1, sent_time=0.5), now=1.0)
    # one report mixing old and new packets starts a new event
    lose(cc, pkts(1, sent_time=0.5) + pkts(1, sent_time=1.5), now=2.0)
    assert cc.congestion_window == 2_500
    assert cc.recovery_start_time == 2.0


def test_beta_parameter():
    cc = newreno(beta=0.7)
    lose(cc, pkts(1, 0.0), now=0.1)
    assert cc.congestion_window == 7_000
    assert cc.ssthresh == 7_000


def test_no_increase_for_packets_sent_before_recovery_start():
    cc = newreno()
    lose(cc, pkts(1, sent_time=0.5), now=1.0)
    ack_one_by_one(cc, pkts(20, sent_time=0.9), now=1.1)
    ack_one_by_one(cc, pkts(20, sent_time=1.0), now=1.1)
    assert cc.congestion_window == 5_000
    # the first packet sent after the start grows the window again (in CA:
    # bytes are counted, one MSS after a window's worth)
    ack_one_by_one(cc, pkts(5, sent_time=1.01), now=1.2)
    assert cc.congestion_window == 6_000


def test_congestion_avoidance_one_mss_per_window_acked():
    cc = newreno()
    lose(cc, pkts(1, sent_time=0.0), now=0.0)
    assert cc.congestion_window == 5_000
    now = 0.0
    for expected in (6_000, 7_000, 8_000, 9_000):
        window = pkts(cc.congestion_window // MDS, sent_time=now + 0.01)
        ack_one_by_one(cc, window[:-1], now + 0.1)
        assert cc.congestion_window == expected - MDS  # not yet a full window
        ack(cc, window[-1:], now + 0.1)
        assert cc.congestion_window == expected
        now += 0.1
    assert not cc.in_slow_start


def test_congestion_avoidance_carries_excess_bytes():
    cc = newreno()
    lose(cc, pkts(1, 0.0), now=0.0)  # cwnd 5000
    ack(cc, pkts(12, sent_time=0.1), now=0.2)  # 12000 acked in one report
    # 5000 acked -> 6000, 6000 more -> 7000, the last 1000 is carried over
    assert cc.congestion_window == 7_000
    ack(cc, pkts(6, sent_time=0.1), now=0.2)  # 1000 + 6000 >= 7000
    assert cc.congestion_window == 8_000


def test_slow_start_to_congestion_avoidance_after_rto():
    cc = newreno()
    cc.on_retransmission_timeout(now=1.0, bytes_in_flight=20_000)
    assert cc.ssthresh == 10_000
    assert cc.congestion_window == 2_000
    ack_one_by_one(cc, pkts(8, sent_time=1.1), now=1.2)  # slow start 2000 -> 10000
    assert cc.congestion_window == 10_000
    assert not cc.in_slow_start
    ack_one_by_one(cc, pkts(9, sent_time=1.2), now=1.3)  # 9000 < 10000 acked
    assert cc.congestion_window == 10_000
    ack(cc, pkts(1, sent_time=1.2), now=1.3)
    assert cc.congestion_window == 11_000


def test_rto_collapses_window_and_halves_flight():
    cc = newreno()
    ack_one_by_one(cc, pkts(10, 0.0), 0.1)  # cwnd 20000
    cc.on_retransmission_timeout(now=2.0, bytes_in_flight=17_000)
    assert cc.congestion_window == 2_000  # min window, not cwnd-based
    assert cc.ssthresh == 8_500  # half the flight, not half the cwnd
    assert cc.recovery_start_time == 2.0
    # the packets outstanding at the RTO, declared lost afterwards, belong
    # to the same congestion event
    lose(cc, pkts(17, sent_time=1.0), now=2.0)
    assert cc.congestion_window == 2_000
    assert cc.ssthresh == 8_500
    # late ACKs of packets sent before the RTO do not grow the window
    ack(cc, pkts(3, sent_time=1.5), now=2.1)
    assert cc.congestion_window == 2_000


def test_rto_ssthresh_bounded_by_min_window():
    cc = newreno()
    cc.on_retransmission_timeout(now=1.0, bytes_in_flight=3_000)
    assert cc.ssthresh == 2_000
    assert cc.congestion_window == 2_000


def test_repeated_rto_holds_ssthresh_until_an_ack():
    cc = newreno()
    cc.on_retransmission_timeout(now=1.0, bytes_in_flight=30_000)
    assert cc.ssthresh == 15_000
    cc.on_retransmission_timeout(now=2.0, bytes_in_flight=1_000)  # backed-off RTO
    assert cc.ssthresh == 15_000
    assert cc.congestion_window == 2_000
    ack(cc, pkts(1, sent_time=2.0), now=2.5)  # retransmission acked
    cc.on_retransmission_timeout(now=5.0, bytes_in_flight=6_000)
    assert cc.ssthresh == 3_000


def test_rto_reported_after_its_losses_uses_flight_before_them():
    cc = newreno()
    lose(cc, pkts(12, sent_time=0.5), now=1.0, flight=0)  # engine declared all lost first
    cc.on_retransmission_timeout(now=1.0, bytes_in_flight=0)
    assert cc.ssthresh == 6_000
    assert cc.congestion_window == 2_000


def test_min_window_floor():
    cc = newreno(beta=0.1)
    lose(cc, pkts(1, 0.0), now=0.1)
    assert cc.congestion_window == 2_000  # 10000 * 0.1 = 1000 < 2 * MDS
    assert cc.ssthresh == 2_000
    for i in range(5):
        t = 0.2 + i * 0.1
        lose(cc, pkts(1, sent_time=t), now=t + 0.05)
        assert cc.congestion_window == 2_000
    cc4 = newreno(min_window_packets=4)
    for i in range(5):
        lose(cc4, pkts(1, sent_time=float(i)), now=i + 0.5)
    assert cc4.congestion_window == 4_000
    cc4.on_retransmission_timeout(now=10.0, bytes_in_flight=0)
    assert cc4.congestion_window == 4_000
    assert cc4.ssthresh == 4_000


def test_rate_sample_and_rtt_hooks_do_not_change_newreno():
    cc = newreno()
    rtt = RttEstimator()
    rtt.on_sample(0.05)
    cc.on_rtt_measurement(rtt=rtt, now=0.05)
    cc.on_packet_sent(packet=FakePacket(sent_time=0.05), now=0.05, bytes_in_flight=10 * MDS)
    sample = RateSample(1e6, MDS, 0.05, 0.05, False, 0)
    cc.on_packets_acked(packets=pkts(1, 0.05), now=0.1, rtt=rtt, bytes_in_flight=0, rate=sample)
    assert cc.congestion_window == 11_000
    assert cc.state() == {
        "cwnd": 11_000,
        "ssthresh": None,
        "pacing_rate": None,
        "recovery_start_time": None,
        "in_slow_start": True,
    }


@pytest.mark.parametrize(
    "params, fragment",
    [
        ({"beta": 0.95}, "<= 0.9"),
        ({"beta": 0.05}, ">= 0.1"),
        ({"beta": "abc"}, "must be float"),
        ({"initial_window_packets": 0}, ">= 1"),
        ({"initial_window_packets": 2.5}, "must be int"),
    ],
)
def test_newreno_parameter_validation(params, fragment):
    with pytest.raises(CompositionError) as exc:
        NewReno(params)
    msg = str(exc.value)
    assert "newreno" in msg
    assert repr(next(iter(params))) in msg
    assert fragment in msg


def test_newreno_bad_beta_names_tf_and_param():
    with pytest.raises(CompositionError, match=r"newreno.*beta"):
        NewReno({"beta": 1.5})


def test_newreno_min_window_and_unknown_param_validation():
    with pytest.raises(CompositionError, match="min_window_packets"):
        NewReno({"min_window_packets": 0})
    with pytest.raises(CompositionError, match=r"unknown parameter.*'gamma'"):
        NewReno({"gamma": 1})


def test_newreno_params_from_strings():
    cc = NewReno({"beta": "0.7", "initial_window_packets": "4"}, max_datagram_size=MDS)
    assert cc.beta == 0.7
    assert cc.congestion_window == 4_000


# -- none --------------------------------------------------------------


def test_none_is_unbounded_and_unpaced():
    cc = NoCongestionControl(max_datagram_size=MDS)
    assert cc.congestion_window == INFINITE_WINDOW
    assert cc.pacing_rate == math.inf
    lose(cc, pkts(100, 0.0), now=0.1)
    cc.on_retransmission_timeout(now=1.0, bytes_in_flight=10**6)
    ack(cc, pkts(100, 1.0), now=1.1)
    assert cc.congestion_window == INFINITE_WINDOW
    assert cc.pacing_rate == math.inf
    with pytest.raises(CompositionError, match=r"'none'.*unknown"):
        NoCongestionControl({"rate": 1})


# -- fixed-rate --------------------------------------------------------


def test_fixed_rate_default_pacing_rate():
    cc = FixedRate(max_datagram_size=MDS)
    assert cc.pacing_rate == 1_250_000.0  # 10 Mbit/s in bytes/s
    assert cc.congestion_window == INFINITE_WINDOW
    assert cc.pacing_burst == 4_000


def test_fixed_rate_parameters():
    cc = FixedRate({"rate_mbps": 2.4, "burst_packets": 2}, max_datagram_size=1200)
    assert cc.pacing_rate == pytest.approx(300_000.0)
    assert cc.pacing_burst == 2_400
    assert FixedRate({"rate_mbps": 100000}).pacing_rate == 12.5e9


def test_fixed_rate_ignores_loss_and_timeouts():
    cc = FixedRate({"rate_mbps": 8}, max_datagram_size=MDS)
    assert cc.pacing_rate == 1_000_000.0
    lose(cc, pkts(50, 0.0), now=0.1)
    cc.on_retransmission_timeout(now=1.0, bytes_in_flight=50_000)
    ack(cc, pkts(10, 1.0), now=1.1)
    assert cc.pacing_rate == 1_000_000.0
    assert cc.congestion_window == INFINITE_WINDOW
    assert cc.ssthresh is None


@pytest.mark.parametrize(
    "params, name",
    [
        ({"rate_mbps": 0.0}, "rate_mbps"),
        ({"rate_mbps": 200000}, "rate_mbps"),
        ({"burst_packets": 0}, "burst_packets"),
    ],
)
def test_fixed_rate_parameter_validation(params, name):
    with pytest.raises(CompositionError, match=rf"fixed-rate.*{name}"):
        FixedRate(params)


def test_new_congestion_event_resets_avoidance_byte_counter():
    cc = newreno()
    lose(cc, pkts(1, 0.0), now=0.0)  # cwnd 5000
    ack_one_by_one(cc, pkts(4, sent_time=0.1), now=0.2)  # 4000 counted, no increase yet
    assert cc.congestion_window == 5_000
    lose(cc, pkts(1, sent_time=0.1), now=0.2)  # cwnd 2500, counter restarts
    ack_one_by_one(cc, pkts(2, sent_time=0.3), now=0.4)
    assert cc.congestion_window == 2_500
    ack(cc, pkts(1, sent_time=0.3), now=0.4)
    assert cc.congestion_window == 3_500


def test_newreno_does_not_grow_an_unused_window():
    """Congestion window validation: an application-limited sender (flight
    far below the window) must not inflate cwnd, in slow start or after."""
    cc = newreno()
    start = cc.congestion_window
    for i in range(50):
        now = 0.01 * i
        cc.on_packet_sent(packet=FakePacket(sent_time=now), now=now, bytes_in_flight=MDS)
        ack(cc, pkts(1, now), now + 0.001, limited=False)
    assert cc.congestion_window == start
    # the same ACKs grow it when the window was in use within the last RTT
    ack(cc, pkts(4, 1.0), 1.001)
    assert cc.congestion_window == start + 4 * MDS
    # ... but not once the last window-limited send is more than an RTT old
    ack(cc, pkts(4, 1.0), 1.0 + RttEstimator().smoothed + 0.01, limited=False)
    assert cc.congestion_window == start + 4 * MDS
