"""End-to-end transfers between two EndpointCores over the simulated network.

Every reliable composition (3 reliabilities x 3 congestion controllers x
ordered/unordered x stream/message = 36) must deliver byte-exact and close
cleanly under loss, reordering, duplication, corruption, jitter and a
bottleneck; plus bidirectional transfer, sequence- and packet-number
wrap-around, a slow reader with bounded memory, unreliable semantics and
message boundaries.
"""

from __future__ import annotations

import itertools
import random

import pytest

from vtl.core.composition import Composition
from vtl.core.config import ConnectionConfig
from vtl.core.connection import Connection
from vtl.core.events import DataAbandoned
from vtl.core.wire import DATA_OVERHEAD
from vtl.sim import LinkConditions
from vtl.sim.harness import ADDR_A, ADDR_B, Transfer, TransferResult, run_transfer

MSS = 1452 - DATA_OVERHEAD  # payload of a full segment with the default datagram size

RELIABLE = ("stop-and-wait", "go-back-n", "selective-repeat")
CONGESTION = ("newreno", "none", "fixed-rate")
ORDERING = ("ordered", "unordered")
FRAMING = ("stream", "message")
#: segments sent per reliability (stop-and-wait does one per RTT)
SEGMENTS = {"stop-and-wait": 20, "go-back-n": 60, "selective-repeat": 120}

ALL_RELIABLE = [
    f"reliability={r} congestion={c} ordering={o} framing={f}"
    for r, c, o, f in itertools.product(RELIABLE, CONGESTION, ORDERING, FRAMING)
]

CONDITIONS = {
    "clean": LinkConditions(delay=0.005),
    "loss2": LinkConditions(delay=0.005, loss=0.02),
    "loss10": LinkConditions(delay=0.005, loss=0.10),
    "loss30": LinkConditions(delay=0.005, loss=0.30),
    "reorder": LinkConditions(delay=0.005, reorder=0.25, reorder_delay=0.015),
    "duplicate": LinkConditions(delay=0.005, duplicate=0.2),
    "corrupt": LinkConditions(delay=0.005, corrupt=0.1),
    "jitter": LinkConditions(delay=0.02, jitter=0.015),
    "bottleneck": LinkConditions(delay=0.01, rate_bps=2e6, queue_bytes=20_000),
}

DECODE_REASONS = ("checksum", "version", "type", "malformed", "option")


def stable_seed(*parts: str) -> int:
    """A seed derived from test parameters (``hash()`` of str is salted)."""
    return sum(ord(ch) * (i + 1) for i, ch in enumerate("|".join(parts))) % 1000


def configs(seed: int, **kw) -> dict:
    return {
        "config_a": ConnectionConfig(rng=random.Random(seed), **kw),
        "config_b": ConnectionConfig(rng=random.Random(seed + 7919), **kw),
    }


def payload_for(comp: str, segments: int, seed: int) -> bytes | list[bytes]:
    """Stream data of whole segments, or messages of varied sizes (0 included)."""
    rng = random.Random(seed)
    if "framing=message" in comp:
        sizes = [0, 1, MSS - 1, MSS, MSS + 1, 3 * MSS + 5]
        out = []
        total = 0
        while total < segments * MSS:
            size = rng.choice(sizes) if rng.random() < 0.5 else rng.randrange(2, 4 * MSS)
            out.append(rng.randbytes(size))
            total += size
        return out
    return rng.randbytes(segments * MSS)


def segments_of(data: bytes) -> list[bytes]:
    return [data[i : i + MSS] for i in range(0, len(data), MSS)]


def assert_delivered(comp: str, sent: bytes | list[bytes], got_data: bytes, got_msgs: list[bytes]):
    """Byte-exact delivery; unordered compositions may permute whole units."""
    ordered = "ordering=unordered" not in comp
    if isinstance(sent, list):
        assert got_data == b""
        if ordered:
            assert got_msgs == sent
        else:
            assert sorted(got_msgs) == sorted(sent)
    else:
        assert got_msgs == []
        if ordered:
            assert got_data == sent
        else:
            assert len(got_data) == len(sent)
            assert sorted(segments_of(got_data)) == sorted(segments_of(sent))


def assert_clean(result: TransferResult) -> None:
    assert result.completed, f"not finished after {result.sim_time} s"
    for side in (result.a, result.b):
        assert side.terminated is not None
        assert side.terminated.error_code == 0, side.terminated
        assert side.stats["outstanding_segments"] == 0
        assert side.stats["unsent_bytes"] == 0


# ------------------------------------------------------------ the matrix


@pytest.mark.parametrize("condition", list(CONDITIONS))
@pytest.mark.parametrize("comp", ALL_RELIABLE)
def test_reliable_composition_delivers_exactly(comp: str, condition: str) -> None:
    rel = comp.split()[0].split("=")[1]
    segments = SEGMENTS[rel] // (2 if condition == "loss30" else 1)
    seed = stable_seed(comp, condition)
    data = payload_for(comp, segments, seed)
    # at 30 % loss each way a round trip fails half the time: a run of them
    # backs the RTO off (up to max_rto = 60 s) past the default 30 s idle
    # timeout now and then; give it room for several 60 s retries
    idle = 300.0 if condition == "loss30" else 30.0
    result = run_transfer(
        comp,
        forward=CONDITIONS[condition],
        data_ab=data,
        seed=seed,
        timeout=600,
        **configs(seed, idle_timeout=idle),
    )
    assert_clean(result)
    assert_delivered(comp, data, result.b.data, result.b.messages)
    assert result.a.data == b"" and result.a.messages == []
    assert result.b.abandoned == 0 and result.a.abandoned == 0
    link = result.net.stats(ADDR_A, ADDR_B)
    back = result.net.stats(ADDR_B, ADDR_A)
    if condition == "corrupt":
        # every corrupted datagram was caught by the codec, none reached a connection
        assert link.corrupted > 0
        for ep_stats, stats in ((result.b.endpoint, link), (result.a.endpoint, back)):
            caught = sum(ep_stats["drops"].get(r, 0) for r in DECODE_REASONS)
            assert caught == stats.corrupted
        assert result.a.stats["dropped_invalid"] == result.b.stats["dropped_invalid"] == 0
    if condition == "duplicate":
        assert link.duplicated > 0
        assert result.b.stats["duplicate_segments"] > 0
    if condition == "loss30":
        assert link.dropped_loss > 0 and back.dropped_loss > 0


@pytest.mark.parametrize("comp", ALL_RELIABLE)
def test_bidirectional_transfer(comp: str) -> None:
    rel = comp.split()[0].split("=")[1]
    seed = stable_seed(comp, "bidi")
    ab = payload_for(comp, SEGMENTS[rel], seed)
    ba = payload_for(comp, SEGMENTS[rel] // 2, seed + 1)
    result = run_transfer(
        comp,
        forward=LinkConditions(delay=0.01, loss=0.05, reorder=0.05),
        backward=LinkConditions(delay=0.005, loss=0.03, duplicate=0.05),
        data_ab=ab,
        data_ba=ba,
        seed=seed,
        timeout=600,
        **configs(seed),
    )
    assert_clean(result)
    assert_delivered(comp, ab, result.b.data, result.b.messages)
    assert_delivered(comp, ba, result.a.data, result.a.messages)


# ------------------------------------------------------- wrap-around


@pytest.fixture
def packet_numbers_near_wrap(monkeypatch: pytest.MonkeyPatch) -> int:
    """Every new Connection starts its packet numbers just below 2**32."""
    start = 2**32 - 25
    original = Connection.__init__

    def init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        self._next_pn = start

    monkeypatch.setattr(Connection, "__init__", init)
    return start


@pytest.mark.parametrize(
    "comp",
    [
        "reliability=selective-repeat",
        "reliability=go-back-n",
        "reliability=stop-and-wait",
        "reliability=selective-repeat ordering=unordered framing=message",
        "reliability=none congestion=fixed-rate",
    ],
)
def test_sequence_and_packet_numbers_wrap(comp: str, packet_numbers_near_wrap: int) -> None:
    isn_a, isn_b = 2**32 - 17, 2**32 - 9
    ab = payload_for(comp, 50, 1)
    ba = payload_for(comp, 40, 2)
    t = Transfer(
        [Composition.parse(comp)],
        forward=LinkConditions(delay=0.005, loss=0.05, reorder=0.1),
        data_ab=ab,
        data_ba=ba,
        config_a=ConnectionConfig(rng=random.Random(1), initial_seq=isn_a),
        config_b=ConnectionConfig(rng=random.Random(2), initial_seq=isn_b),
        timeout=300,
    )
    result = t.run()
    assert_clean(result)
    # both sequence spaces and both packet-number spaces crossed 2**32
    assert t.conn_a._isn == isn_a and t.conn_b._isn == isn_b
    assert t.conn_a._snd_nxt > 2**32 and t.conn_b._snd_nxt > 2**32
    assert t.conn_a._next_pn > 2**32 and t.conn_b._next_pn > 2**32
    assert t.conn_a._largest_pn_seen > 2**32 and t.conn_b._largest_pn_seen > 2**32
    if "reliability=none" in comp:
        # unreliable: a subset, in order; with 5 % loss most of it arrives
        assert result.a.abandoned + result.b.abandoned > 0
        assert len(result.b.data) > len(ab) // 2
    else:
        assert_delivered(comp, ab, result.b.data, result.b.messages)
        assert_delivered(comp, ba, result.a.data, result.a.messages)


# ------------------------------------------------------------ slow reader


@pytest.mark.parametrize(
    "comp",
    [
        "reliability=selective-repeat flow=window(window=32)",
        "reliability=selective-repeat congestion=none flow=window(window=24)",
        "reliability=go-back-n(window=64) congestion=none flow=window(window=16)",
        "reliability=selective-repeat ordering=unordered congestion=fixed-rate"
        " flow=window(window=32)",
        "reliability=stop-and-wait flow=window(window=2)",
    ],
)
def test_slow_reader_bounds_memory(comp: str) -> None:
    """The sender is ~50x faster than the reader; the receiver's buffered +
    unread segments and the sender's unacked segments stay within the flow
    window at every simulator event, the app-side send buffer is honoured,
    and everything arrives."""
    window = int(comp.split("flow=window(window=")[1].split(")")[0])
    n_segments = 400 if "stop-and-wait" not in comp else 40
    data = random.Random(5).randbytes(n_segments * MSS)
    send_buffer = 16 * MSS
    peaks = {"held": 0, "outstanding": 0, "unsent": 0}

    def check(t: Transfer) -> None:
        a, b = t.conn_a, t.conn_b
        outstanding = len(a._outstanding)
        assert outstanding <= window
        assert a._snd_nxt - a._snd_una <= window
        peaks["outstanding"] = max(peaks["outstanding"], outstanding)
        peaks["unsent"] = max(peaks["unsent"], a._unsent_bytes)
        if b is not None:
            held = b._unconsumed + len(b._rcv_buf) + len(b._msg_parts)
            assert held <= window, f"receiver holds {held} segments > window {window}"
            peaks["held"] = max(peaks["held"], held)

    result = run_transfer(
        comp,
        forward=LinkConditions(delay=0.005, rate_bps=20e6, loss=0.02, reorder=0.05),
        data_ab=data,
        reader_rate_b=50_000.0,  # bytes/s, the link carries 2.5 MB/s
        send_buffer=send_buffer,
        write_chunk=MSS,
        check=check,
        timeout=600,
        **configs(3),
    )
    assert_clean(result)
    assert_delivered(comp, data, result.b.data, result.b.messages)
    # the reader, not the link, set the pace
    assert result.sim_time >= len(data) / 50_000.0 * 0.9
    assert peaks["held"] >= window // 2  # the window did fill up
    assert peaks["unsent"] <= send_buffer + MSS


# ------------------------------------------------------ unreliable


@pytest.mark.parametrize("ordering", ORDERING)
@pytest.mark.parametrize("framing", FRAMING)
@pytest.mark.parametrize("congestion", CONGESTION)
def test_unreliable_delivers_intact_subset(ordering: str, framing: str, congestion: str) -> None:
    """reliability=none: whatever arrives is intact and never duplicated,
    ordered mode never reorders, DataAbandoned accounts for every missing
    segment, and the connection still closes cleanly."""
    comp = f"reliability=none congestion={congestion} ordering={ordering} framing={framing}"
    n = 300
    # unit i (one segment, or a message of 1-3 segments) starts with its index
    rng = random.Random(11)
    if framing == "message":
        units = [
            i.to_bytes(4, "big") + rng.randbytes(rng.choice([0, MSS - 4, 2 * MSS, 3 * MSS - 4]))
            for i in range(n)
        ]
        sent: bytes | list[bytes] = units
        seg_count = [max(1, -(-len(u) // MSS)) for u in units]
    else:
        units = [i.to_bytes(4, "big") + rng.randbytes(MSS - 4) for i in range(n)]
        sent = b"".join(units)
        seg_count = [1] * n
    result = run_transfer(
        comp,
        forward=LinkConditions(delay=0.01, loss=0.1, reorder=0.1, duplicate=0.05),
        data_ab=sent,
        seed=4,
        timeout=300,
        **configs(4),
    )
    assert_clean(result)
    got = result.b.messages if framing == "message" else segments_of(result.b.data)
    indices = [int.from_bytes(u[:4], "big") for u in got]
    for idx, unit in zip(indices, got, strict=True):
        assert unit == units[idx]  # intact
    assert len(set(indices)) == len(indices)  # never duplicated
    assert 0 < len(indices) < n  # a real subset under 10 % loss
    if ordering == "ordered":
        assert indices == sorted(indices)
    abandoned = sum(e.segments for _, e in result.b.events if isinstance(e, DataAbandoned))
    assert abandoned == result.b.abandoned == result.b.stats["segments_abandoned"]
    delivered_segments = sum(seg_count[i] for i in indices)
    total_segments = sum(seg_count)
    if all(c == 1 for c in seg_count):
        # every segment was either delivered or reported abandoned, exactly once
        assert delivered_segments + abandoned == total_segments
    else:
        # a message that lost a piece is dropped whole: its other pieces are
        # neither delivered nor abandoned
        missing = total_segments - delivered_segments
        assert 0 < abandoned <= missing
        assert missing - abandoned <= sum(seg_count[i] - 1 for i in range(n) if i not in indices)
    assert result.b.stats["state"] == "terminated"
    assert result.b.held_at_end == 0  # no piece of a broken message left behind


def test_unreliable_ordered_skips_a_gap_instead_of_waiting() -> None:
    """An ordered unreliable receiver delivers what follows a lost segment
    about one RTT later, not after the end of the transfer."""
    data = b"".join(i.to_bytes(4, "big") + bytes(MSS - 4) for i in range(200))
    t = Transfer(
        [Composition.parse("reliability=none congestion=fixed-rate(rate_mbps=2)")],
        forward=LinkConditions(delay=0.01, loss=0.05),
        data_ab=data,
        **configs(8),
    )
    result = t.run()
    assert_clean(result)
    times = [when for when, e in result.b.events if isinstance(e, DataAbandoned)]
    assert times and times[0] < result.b.peer_closed_at - 0.3


# ------------------------------------------------------- ordering


@pytest.mark.parametrize("framing", FRAMING)
@pytest.mark.parametrize("reliability", ("selective-repeat", "none"))
def test_unordered_delivers_out_of_order_under_reordering(framing: str, reliability: str) -> None:
    n = 200
    units = [i.to_bytes(4, "big") + random.Random(i).randbytes(MSS - 4) for i in range(n)]
    sent: bytes | list[bytes] = units if framing == "message" else b"".join(units)
    reorder = LinkConditions(delay=0.005, reorder=0.3, reorder_delay=0.02)
    orders = {}
    for ordering in ORDERING:
        comp = f"reliability={reliability} ordering={ordering} framing={framing}"
        result = run_transfer(comp, forward=reorder, data_ab=sent, seed=2, **configs(2))
        assert_clean(result)
        assert result.b.held_at_end == 0
        got = result.b.messages if framing == "message" else segments_of(result.b.data)
        orders[ordering] = [int.from_bytes(u[:4], "big") for u in got]
        if reliability != "none":
            assert sorted(orders[ordering]) == list(range(n))
    assert orders["ordered"] == sorted(orders["ordered"])
    assert orders["unordered"] != sorted(orders["unordered"])


# ------------------------------------------------------- message framing


@pytest.mark.parametrize("ordering", ORDERING)
@pytest.mark.parametrize("reliability", RELIABLE)
def test_message_boundaries_preserved(reliability: str, ordering: str) -> None:
    sizes = [0, 1, MSS - 1, MSS, MSS + 1, 100_000, 0, 2 * MSS, 2 * MSS + 1, 7]
    rng = random.Random(21)
    messages = [rng.randbytes(s) for s in sizes]
    comp = f"reliability={reliability} ordering={ordering} framing=message"
    result = run_transfer(
        comp,
        forward=LinkConditions(delay=0.005, loss=0.05, reorder=0.1),
        data_ab=messages,
        data_ba=list(reversed(messages)),
        seed=9,
        timeout=600,
        **configs(9),
    )
    assert_clean(result)
    assert_delivered(comp, messages, result.b.data, result.b.messages)
    assert_delivered(comp, list(reversed(messages)), result.a.data, result.a.messages)
    assert [len(m) for m in result.b.messages if len(m) == 0] == [0, 0]


def test_message_larger_than_max_message_size_is_refused() -> None:
    from vtl.core.errors import ConnectionStateError

    t = Transfer(
        [Composition.parse("framing=message(max_message_size=1000)")],
        data_ab=[b"a" * 1000],
        close_a=None,
        close_b=None,
        stop=lambda t: t.conn_b is not None and t.conn_a.is_established,
        **configs(1),
    )
    t.run()
    with pytest.raises(ConnectionStateError):
        t.conn_a.send(b"a" * 1001)


def test_stream_writes_are_coalesced_into_full_segments() -> None:
    writes = [bytes([i]) * 100 for i in range(100)]  # 10 000 bytes in 100 writes
    t = Transfer(
        [Composition.parse("reliability=selective-repeat")],
        forward=LinkConditions(delay=0.005),
        data_ab=b"".join(writes),
        write_chunk=100,
        **configs(1),
    )
    result = t.run()
    assert_clean(result)
    assert result.b.data == b"".join(writes)
    assert result.a.stats["data_packets_sent"] == -(-10_000 // MSS)
