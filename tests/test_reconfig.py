"""Live reconfiguration (RECONFIGURE): switches mid-transfer under loss with
byte-exact delivery both ways, refusals that leave the connection as it was,
lost and duplicated exchange packets, collisions, closing, and the delivery
pause a switch causes (all on the deterministic simulated network)."""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest

from vtl.core import wire
from vtl.core.composition import Composition
from vtl.core.config import ConnectionConfig
from vtl.core.endpoint import EndpointCore
from vtl.core.errors import ConnectionStateError, ErrorCode, WireError
from vtl.core.events import ReconfigureDone, ReconfigureRefused
from vtl.core.reconfig import Op, merge_composition, switch_refusal
from vtl.core.registry import Registry
from vtl.core.wire import HsField, PacketType
from vtl.sim.harness import Transfer, TransferResult
from vtl.sim.network import LinkConditions
from vtl.tfs import register_builtins
from vtl.tfs.base import TransportFunction
from vtl.tfs.reliability.selective_repeat import SelectiveRepeat

LOSSY = LinkConditions(delay=0.01, loss=0.10, rate_bps=20e6)
CLEAN = LinkConditions(delay=0.02, rate_bps=10e6)


def _data(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


def _reconf_events(side) -> list:
    return [e for _, e in side.events if isinstance(e, ReconfigureDone | ReconfigureRefused)]


def _run(
    start: str,
    actions: list[tuple[float, Callable[[Transfer], object]]],
    *,
    forward: LinkConditions = LOSSY,
    ab: int = 1_500_000,
    ba: int = 600_000,
    seed: int = 1,
    **kwargs,
) -> tuple[TransferResult, Transfer, bytes, bytes]:
    data_ab, data_ba = _data(ab, seed), _data(ba, seed + 100)
    t = Transfer(
        [Composition.parse(start)],
        forward=forward,
        data_ab=data_ab,
        data_ba=data_ba,
        schedule=actions,
        seed=seed,
        timeout=120.0,
        **kwargs,
    )
    return t.run(), t, data_ab, data_ba


def _assert_exact(result: TransferResult, data_ab: bytes, data_ba: bytes) -> None:
    assert result.completed and result.clean
    assert result.b.data == data_ab  # byte-exact: nothing lost, duplicated or reordered
    assert result.a.data == data_ba


SWITCHES = [
    ("reliability=go-back-n(window=32)", "reliability=selective-repeat(window=256)"),
    ("reliability=selective-repeat", "reliability=go-back-n(window=64)"),
    ("congestion=newreno", "congestion=fixed-rate(rate_mbps=15)"),
    ("congestion=fixed-rate(rate_mbps=15)", "congestion=newreno"),
    ("congestion=newreno", "congestion=newreno(beta=0.7,initial_window_packets=4)"),
    ("reliability=selective-repeat(window=64)", "reliability=selective-repeat(window=512)"),
    ("flow=window(window=64)", "flow=window(window=1024)"),
    ("flow=window(window=1024)", "flow=window(window=48)"),
]


@pytest.mark.parametrize("initiator", ["a", "b"])
@pytest.mark.parametrize(("start", "change"), SWITCHES)
def test_switch_mid_transfer_under_10_percent_loss_is_byte_exact_both_ways(
    start: str, change: str, initiator: str
) -> None:
    def switch(t: Transfer) -> None:
        conn = t.conn_a if initiator == "a" else t.conn_b
        assert conn.reconfigure(change) == 1

    result, t, ab, ba = _run(start, [(0.4, switch)])
    _assert_exact(result, ab, ba)
    want = merge_composition(Composition.parse(start), change)
    for side, conn in ((result.a, t.conn_a), (result.b, t.conn_b)):
        (done,) = _reconf_events(side)
        assert isinstance(done, ReconfigureDone)
        assert done.composition == want and conn.composition == want
        assert done.by_peer == (side is (result.b if initiator == "a" else result.a))
        assert conn.stats["reconfigurations"] == 1
    # the new TFs really run at both ends
    for conn in (t.conn_a, t.conn_b):
        for spec in want.specs:
            attr = "cc" if spec.role == "congestion" else spec.role
            tf = getattr(conn, attr)
            if tf is None:  # a role whose default "none" keeps no state (fec)
                assert spec.name == "none"
                continue
            assert spec.name == tf.NAME
            assert tf.params == type(tf).validate_params(spec.params)
    # the data sent after the switch point went out: the switch happened mid-transfer
    done_a = _reconf_events(result.a)[0]
    assert done_a.switch_seq < t.conn_a._snd_nxt


def test_several_switches_in_a_row_and_back() -> None:
    steps = [
        "reliability=selective-repeat(window=128) congestion=fixed-rate(rate_mbps=12)",
        "congestion=newreno",
        "reliability=go-back-n(window=24) flow=window(window=256)",
    ]
    log: list[int] = []

    def switch(i: int) -> Callable[[Transfer], None]:
        def act(t: Transfer) -> None:
            conn = t.conn_a if i % 2 == 0 else t.conn_b
            log.append(conn.reconfigure(steps[i]))

        return act

    result, t, ab, ba = _run(
        "reliability=go-back-n(window=32)",
        [(0.3, switch(0)), (0.9, switch(1)), (1.5, switch(2))],
        ab=3_000_000,
        ba=1_500_000,
    )
    _assert_exact(result, ab, ba)
    assert [type(e) for e in _reconf_events(result.a)] == [ReconfigureDone] * 3
    assert str(t.conn_a.composition) == str(t.conn_b.composition)
    assert t.conn_a.reliability.NAME == "go-back-n" and t.conn_b.cc.NAME == "newreno"
    assert t.conn_b.flow.window == 256


def test_congestion_state_carries_over() -> None:
    seen: dict = {}

    def switch(t: Transfer) -> None:
        seen["old"] = t.conn_a.cc
        t.conn_a.reconfigure("congestion=newreno(beta=0.7,initial_window_packets=2)")

    def check(t: Transfer) -> None:
        old = seen.get("old")
        if old is not None and "new_cwnd" not in seen and t.conn_a.cc is not old:
            seen["old_cwnd"] = old.congestion_window
            seen["new_cwnd"] = t.conn_a.cc.congestion_window

    result, t, ab, ba = _run(
        "congestion=newreno", [(0.4, switch)], forward=CLEAN, ba=0, check=check
    )
    _assert_exact(result, ab, ba)
    assert t.conn_a.cc.params["beta"] == 0.7
    # the new controller started from the old window, not from its initial one
    assert seen["new_cwnd"] == seen["old_cwnd"] > t.conn_a.cc.initial_window
    assert t.conn_a.rtt.samples > 10  # the RTT estimator lived on


def test_window_from_a_rate_and_a_rate_kept() -> None:
    from vtl.core.rtt import RttEstimator
    from vtl.tfs.congestion.fixed_rate import FixedRate
    from vtl.tfs.congestion.newreno import NewReno

    rtt = RttEstimator()
    rtt.on_sample(0.05)
    fixed = FixedRate({"rate_mbps": 8.0})
    reno = NewReno()
    reno.inherit(fixed, rtt=rtt, now=1.0, bytes_in_flight=0)
    assert reno.congestion_window == int(1e6 * 0.05) == reno.ssthresh  # 8 Mbit/s x 50 ms
    fixed2 = FixedRate({"rate_mbps": 3.0})
    fixed2.inherit(reno, rtt=rtt, now=1.0, bytes_in_flight=0)
    assert fixed2.pacing_rate == 3e6 / 8  # a rate-based controller keeps its own rate
    reno.recovery_start_time = 0.9
    reno2 = NewReno({"min_window_packets": 100})
    reno2.inherit(reno, rtt=rtt, now=1.0, bytes_in_flight=0)
    assert reno2.congestion_window == reno2.min_window  # floor of the new controller
    assert reno2.recovery_start_time == 0.9  # one congestion event, one cut


def _registry_without(role: str, name: str) -> Registry:
    reg = Registry()
    register_builtins(reg)
    reg.unregister(role, name)
    return reg


def test_peer_without_the_tf_is_known_from_its_inventory() -> None:
    cfg_b = ConnectionConfig(registry=_registry_without("congestion", "fixed-rate"))
    result, t, ab, ba = _run(
        "reliability=go-back-n(window=32)",
        [(0.3, lambda t: t.conn_a.reconfigure("congestion=fixed-rate"))],
        config_b=cfg_b,
    )
    _assert_exact(result, ab, ba)
    (refused,) = _reconf_events(result.a)
    assert refused == ReconfigureRefused(
        1, ErrorCode.RECONFIG_UNSUPPORTED, "the peer lacks congestion=fixed-rate", False
    )
    assert _reconf_events(result.b) == []
    assert str(t.conn_a.composition) == str(t.conn_b.composition)
    assert t.conn_a.cc.NAME == "newreno" and t.conn_a.reliability.NAME == "go-back-n"


def test_peer_refuses_a_tf_it_no_longer_has_and_the_connection_goes_on() -> None:
    reg_b = Registry()
    register_builtins(reg_b)

    def remove_then_ask(t: Transfer) -> None:
        reg_b.unregister("reliability", "selective-repeat")  # after the handshake
        t.conn_a.reconfigure("reliability=selective-repeat")

    result, t, ab, ba = _run(
        "reliability=go-back-n(window=32)",
        [(0.3, remove_then_ask)],
        config_b=ConnectionConfig(registry=reg_b),
    )
    _assert_exact(result, ab, ba)
    (refused,) = _reconf_events(result.a)
    assert isinstance(refused, ReconfigureRefused) and refused.by_peer
    assert refused.error_code == ErrorCode.RECONFIG_UNSUPPORTED
    assert "selective-repeat" in refused.reason and "not installed" in refused.reason
    assert t.conn_a.reliability.NAME == "go-back-n" == t.conn_b.reliability.NAME
    assert t.conn_a.stats["reconfigurations"] == 0 == t.conn_b.stats["reconfigurations"]
    assert t.conn_a.peer_inventory["reliability"].get("selective-repeat") is None  # updated
    assert t.conn_a.reconfigure_outcome(1) == refused


class _Frozen(SelectiveRepeat):
    """A reliability TF that declares it cannot be switched live."""

    NAME = "frozen-sr"
    LIVE_SWITCH = False


def test_roles_that_cannot_switch_live_are_refused_with_a_reason() -> None:
    reg = Registry()
    register_builtins(reg)
    reg.register(_Frozen)
    cfg = ConnectionConfig(registry=reg)
    refusals: dict[str, ReconfigureRefused] = {}

    def ask(t: Transfer) -> None:
        for key, change in (
            ("framing", "framing=message"),
            ("reliability", "reliability=none"),
            ("frozen", "reliability=frozen-sr"),
            ("bad", "reliability=selective-repeat(window=0)"),
            ("syntax", "reliability=("),
            ("integrity", "integrity=partial(coverage=0)"),
        ):
            rid = t.conn_a.reconfigure(change)
            refusals[key] = t.conn_a.reconfigure_outcome(rid)

    result, t, ab, ba = _run(
        "reliability=go-back-n(window=32)", [(0.3, ask)], config_a=cfg, config_b=cfg
    )
    _assert_exact(result, ab, ba)
    assert all(isinstance(r, ReconfigureRefused) and not r.by_peer for r in refusals.values())
    assert refusals["framing"].error_code == ErrorCode.RECONFIG_NOT_LIVE
    assert "stream and message framing" in refusals["framing"].reason
    assert refusals["reliability"].error_code == ErrorCode.RECONFIG_NOT_LIVE
    assert "reliable and unreliable" in refusals["reliability"].reason
    assert refusals["frozen"].error_code == ErrorCode.RECONFIG_NOT_LIVE
    assert refusals["bad"].error_code == ErrorCode.RECONFIG_UNSUPPORTED
    assert "window" in refusals["bad"].reason
    assert refusals["syntax"].error_code == ErrorCode.RECONFIG_UNSUPPORTED
    # checksum coverage changes the payload size of packets in flight
    assert refusals["integrity"].error_code == ErrorCode.RECONFIG_NOT_LIVE
    assert t.conn_a.stats["reconfigurations_refused"] == 6
    assert t.conn_b.stats["reconfigurations_refused"] == 0  # nothing went on the wire


def test_security_role_is_not_live_by_default() -> None:
    class Sec(TransportFunction):
        ROLE = "security"
        NAME = "aead"

    class LiveSec(Sec):
        NAME = "rekeyable"
        LIVE_SWITCH = True

    reason = switch_refusal("security", Sec, LiveSec)
    assert reason is not None and "security 'aead' cannot be switched" in reason
    assert "handshake" in reason
    assert switch_refusal("security", LiveSec, LiveSec) is None
    assert switch_refusal("fec", None, Sec) is None  # other roles: live unless they say no


class _Mangle:
    """Node wrapper: drops the first RECONFIGURE packets of the chosen ops
    and delivers every other RECONFIGURE twice."""

    def __init__(self, inner: EndpointCore, drop: dict[int, int]) -> None:
        self.inner, self.drop = inner, dict(drop)
        self.seen: list[int] = []

    def receive(self, datagram: bytes, addr, now: float) -> None:
        try:
            p = wire.decode(datagram)
        except WireError:
            p = None
        if p is not None and p.type is PacketType.RECONFIGURE:
            op = wire.decode_fields(p.body)[HsField.RECONFIG_OP][0]
            self.seen.append(op)
            if self.drop.get(op, 0) > 0:
                self.drop[op] -= 1
                return
            self.inner.receive(datagram, addr, now)
        self.inner.receive(datagram, addr, now)

    def datagrams_to_send(self, now: float):
        return self.inner.datagrams_to_send(now)

    def next_timer(self):
        return self.inner.next_timer()

    def handle_timer(self, now: float) -> None:
        self.inner.handle_timer(now)


@pytest.mark.parametrize(
    ("drop_at_b", "drop_at_a"),
    [
        ({Op.REQUEST: 2}, {}),
        ({}, {Op.ACCEPT: 2}),
        ({Op.CONFIRM: 2}, {}),
        ({}, {Op.DONE: 2}),
        ({Op.REQUEST: 1, Op.CONFIRM: 1}, {Op.ACCEPT: 1, Op.DONE: 1}),
    ],
)
def test_lost_and_duplicated_reconfigure_packets(drop_at_b: dict, drop_at_a: dict) -> None:
    wraps: dict[str, _Mangle] = {}

    def wrap(name: str, drop: dict):
        def make(ep: EndpointCore) -> _Mangle:
            wraps[name] = _Mangle(ep, drop)
            return wraps[name]

        return make

    result, t, ab, ba = _run(
        "reliability=go-back-n(window=32)",
        [(0.3, lambda t: t.conn_a.reconfigure("reliability=selective-repeat"))],
        wrap_a=wrap("a", drop_at_a),
        wrap_b=wrap("b", drop_at_b),
    )
    _assert_exact(result, ab, ba)
    (done_a,) = _reconf_events(result.a)
    (done_b,) = _reconf_events(result.b)  # duplicates did not switch twice
    assert isinstance(done_a, ReconfigureDone) and isinstance(done_b, ReconfigureDone)
    assert done_a.switch_seq == done_b.peer_switch_seq
    assert done_b.switch_seq == done_a.peer_switch_seq
    assert t.conn_a.stats["reconfigurations"] == 1 == t.conn_b.stats["reconfigurations"]
    assert t.conn_a.reliability.NAME == "selective-repeat" == t.conn_b.reliability.NAME
    # every dropped message was sent again
    for name, drop in (("b", drop_at_b), ("a", drop_at_a)):
        for op, n in drop.items():
            assert wraps[name].seen.count(op) > n
    assert not t.conn_a.reconfiguring and not t.conn_b.reconfiguring


def test_both_ends_ask_at_once_the_initiators_request_wins() -> None:
    def both(t: Transfer) -> None:
        t.conn_a.reconfigure("reliability=selective-repeat(window=100)")
        t.conn_b.reconfigure("congestion=fixed-rate(rate_mbps=8)")

    def again(t: Transfer) -> None:  # the loser may ask again once it is over
        t.conn_b.reconfigure("congestion=fixed-rate(rate_mbps=8)")

    result, t, ab, ba = _run("reliability=go-back-n(window=32)", [(0.3, both), (1.0, again)])
    _assert_exact(result, ab, ba)
    ev_a, ev_b = _reconf_events(result.a), _reconf_events(result.b)
    assert [type(e) for e in ev_a] == [ReconfigureDone, ReconfigureDone]
    assert isinstance(ev_b[0], ReconfigureRefused)
    assert ev_b[0].error_code == ErrorCode.RECONFIG_BUSY and not ev_b[0].by_peer
    assert [type(e) for e in ev_b[1:]] == [ReconfigureDone, ReconfigureDone]
    assert ev_a[0].reconfig_id == 1 and not ev_a[0].by_peer
    assert ev_b[2].reconfig_id == 2 and not ev_b[2].by_peer
    for conn in (t.conn_a, t.conn_b):
        assert conn.reliability.params["window"] == 100
        assert conn.cc.NAME == "fixed-rate"


def test_one_reconfiguration_at_a_time() -> None:
    errors = []

    def twice(t: Transfer) -> None:
        t.conn_a.reconfigure("reliability=selective-repeat")
        try:
            t.conn_a.reconfigure("congestion=fixed-rate")
        except ConnectionStateError as exc:
            errors.append(str(exc))

    result, _, ab, ba = _run("reliability=go-back-n(window=32)", [(0.3, twice)])
    _assert_exact(result, ab, ba)
    assert errors == ["reconfiguration 1 is still in progress"]


def test_reconfigure_during_close_is_refused_cleanly() -> None:
    def b_closes_a_asks(t: Transfer) -> None:
        t.conn_b.close()  # B has nothing to send: its CLOSE leaves now
        t.conn_a.reconfigure("reliability=selective-repeat")  # crosses it

    def a_asks_again(t: Transfer) -> None:
        t.conn_a.reconfigure("reliability=selective-repeat")  # knows B closed

    result, t, ab, _ = _run(
        "reliability=go-back-n(window=32)",
        [(0.3, b_closes_a_asks), (0.6, a_asks_again)],
        ba=0,
        close_b=None,
    )
    _assert_exact(result, ab, b"")
    first, second = _reconf_events(result.a)
    assert first.error_code == ErrorCode.RECONFIG_CLOSING and first.by_peer
    assert second.error_code == ErrorCode.RECONFIG_CLOSING and not second.by_peer
    assert t.conn_a.reliability.NAME == "go-back-n" == t.conn_b.reliability.NAME


def test_reconfigure_before_the_handshake_is_an_error() -> None:
    t = Transfer([Composition.parse("reliability=go-back-n")])
    conn = t.ep_a.connect(t.addr_b, t.offers, 0.0)
    with pytest.raises(ConnectionStateError):
        conn.reconfigure("reliability=selective-repeat")


def test_malformed_reconfigure_is_dropped_and_counted() -> None:
    holder: dict[str, int] = {}

    def inject(t: Transfer) -> None:
        a, b = t.conn_a, t.conn_b
        bodies = [
            b"",
            wire.encode_fields({HsField.RECONFIG_OP: b"\x09", HsField.RECONFIG_ID: b"\0\0\0\1"}),
            wire.encode_fields(
                {
                    HsField.RECONFIG_OP: bytes([Op.REQUEST]),
                    HsField.RECONFIG_ID: b"\0\0\0\7",
                    HsField.COMPOSITIONS: b"[1,2]",
                }
            ),
        ]
        before = b.stats["dropped_invalid"]
        for i, body in enumerate(bodies):
            dg = wire.encode(PacketType.RECONFIGURE, b.local_cid, a.local_cid, a._next_pn + i, body)
            b.receive(dg, t.net.now)
        holder["dropped"] = b.stats["dropped_invalid"] - before

    result, t, ab, ba = _run("reliability=go-back-n(window=32)", [(0.3, inject)], forward=CLEAN)
    _assert_exact(result, ab, ba)
    assert holder["dropped"] == 3
    assert t.conn_b.stats["reconfigurations"] == 0


def _delivery_gaps(t: Transfer, times: list[tuple[float, int]]):
    def check(tr: Transfer) -> None:
        conn = tr.conn_b
        if conn is not None:
            d = conn.stats["app_bytes_delivered"]
            if not times or times[-1][1] != d:
                times.append((tr.net.now, d))

    return check


def _max_gap(times: list[tuple[float, int]], start: float, end: float) -> float:
    pts = [t for t, _ in times if start <= t <= end]
    return max((b - a for a, b in zip(pts, pts[1:], strict=False)), default=0.0)


@pytest.mark.parametrize(
    "change",
    [
        "reliability=selective-repeat(window=256)",
        "congestion=fixed-rate(rate_mbps=8)",
        "flow=window(window=2048)",
    ],
)
def test_switch_pause_is_well_under_one_rtt(change: str) -> None:
    """Receiver-side gap in delivery around the switch, clean 40 ms RTT path
    at 10 Mbit/s: the switch itself stops nothing."""
    times: list[tuple[float, int]] = []
    holder: dict[str, Transfer] = {}
    switch_at = 1.0

    def check(t: Transfer) -> None:
        holder["t"] = t
        _delivery_gaps(t, times)(t)

    result, t, ab, ba = _run(
        "reliability=go-back-n(window=64)",
        [(switch_at, lambda t: t.conn_a.reconfigure(change))],
        forward=CLEAN,
        ab=3_000_000,
        ba=0,
        check=check,
    )
    _assert_exact(result, ab, ba)
    rtt = 0.04
    (done_b,) = _reconf_events(result.b)
    assert done_b.pause is not None and done_b.pause < rtt / 4
    around = _max_gap(times, switch_at - rtt, switch_at + 3 * rtt)
    before = _max_gap(times, switch_at - 0.5, switch_at - rtt)
    assert around < rtt / 4 and around <= before * 2 + 0.002


def test_messages_survive_a_switch_under_loss() -> None:
    rng = random.Random(5)
    msgs_ab = [rng.randbytes(rng.randrange(1, 5000)) for _ in range(600)]
    msgs_ba = [rng.randbytes(rng.randrange(1, 3000)) for _ in range(300)]
    t = Transfer(
        [Composition.parse("framing=message reliability=go-back-n(window=32)")],
        forward=LOSSY,
        data_ab=msgs_ab,
        data_ba=msgs_ba,
        schedule=[(0.3, lambda t: t.conn_b.reconfigure("reliability=selective-repeat"))],
        seed=2,
        timeout=120.0,
    )
    result = t.run()
    assert result.completed and result.clean
    assert result.b.messages == msgs_ab and result.a.messages == msgs_ba
    assert t.conn_a.reliability.NAME == "selective-repeat" == t.conn_b.reliability.NAME


def test_ordering_switches_at_the_receiver_once_nothing_is_held_out_of_order() -> None:
    seen: dict = {}

    def check(t: Transfer) -> None:
        b = t.conn_b
        if b is not None and "switched" not in seen and b.ordering.NAME == "unordered":
            seen["switched"] = True
            seen["held"] = len(b._rcv_ranges.ranges()) + len(b._rcv_buf)

    result, t, ab, ba = _run(
        "reliability=selective-repeat",
        [(0.3, lambda t: t.conn_a.reconfigure("ordering=unordered"))],
        check=check,
    )
    assert result.completed and result.clean
    # unordered delivery: every byte exactly once, not necessarily in order
    assert sorted(result.b.data) == sorted(ab) and sorted(result.a.data) == sorted(ba)
    assert seen == {"switched": True, "held": 0}
    assert t.conn_a.ordering.NAME == "unordered"


@pytest.mark.parametrize(("start", "change"), [("ordered", "unordered"), ("unordered", "ordered")])
def test_ordering_switch_with_messages_loses_none(start: str, change: str) -> None:
    rng = random.Random(9)
    msgs = [rng.randbytes(rng.randrange(1, 6000)) for _ in range(500)]
    t = Transfer(
        [Composition.parse(f"framing=message ordering={start}")],
        forward=LOSSY,
        data_ab=msgs,
        data_ba=msgs[:100],
        schedule=[(0.3, lambda t: t.conn_a.reconfigure(f"ordering={change}"))],
        seed=4,
        timeout=120.0,
    )
    result = t.run()
    assert result.completed and result.clean
    assert sorted(result.b.messages) == sorted(msgs)  # every message once, whole
    assert sorted(result.a.messages) == sorted(msgs[:100])
    assert t.conn_b.ordering.NAME == change == t.conn_a.ordering.NAME


class _BadInherit(SelectiveRepeat):
    """Raises when asked to carry state over."""

    NAME = "bad-inherit"

    def inherit(self, old, **context) -> None:
        raise RuntimeError("boom")


def test_a_tf_whose_inherit_raises_starts_fresh() -> None:
    reg = Registry()
    register_builtins(reg)
    reg.register(_BadInherit)
    cfg = ConnectionConfig(registry=reg)
    result, t, ab, ba = _run(
        "reliability=go-back-n(window=32)",
        [(0.3, lambda t: t.conn_a.reconfigure("reliability=bad-inherit"))],
        config_a=cfg,
        config_b=ConnectionConfig(registry=reg),
    )
    _assert_exact(result, ab, ba)
    assert t.conn_a.reliability.NAME == "bad-inherit" == t.conn_b.reliability.NAME
    assert t.conn_a._reconf.inherit_failures == 1 == t.conn_b._reconf.inherit_failures


class _HoldFirstRequest:
    """Node wrapper: holds the first RECONFIGURE REQUEST it receives for
    ``hold`` seconds, then delivers it (a very late, reordered copy)."""

    def __init__(self, inner: EndpointCore, hold: float) -> None:
        self.inner, self.hold = inner, hold
        self.held: tuple[float, bytes, object] | None = None
        self.done = False
        self.now = 0.0

    def receive(self, datagram: bytes, addr, now: float) -> None:
        self.now = now
        if not self.done:
            p = wire.decode(datagram)
            if (
                p.type is PacketType.RECONFIGURE
                and wire.decode_fields(p.body)[HsField.RECONFIG_OP][0] == Op.REQUEST
            ):
                self.done = True
                self.held = (now + self.hold, datagram, addr)
                return
        self.inner.receive(datagram, addr, now)

    def datagrams_to_send(self, now: float):
        return self.inner.datagrams_to_send(now)

    def next_timer(self):
        times = [t for t in (self.inner.next_timer(), self.held and self.held[0]) if t]
        return min(times) if times else None

    def handle_timer(self, now: float) -> None:
        if self.held is not None and now >= self.held[0]:
            _, datagram, addr = self.held
            self.held = None
            self.inner.receive(datagram, addr, now)
        self.inner.handle_timer(now)


def test_a_late_copy_of_the_losing_request_is_not_accepted() -> None:
    """Both ask at once; the server's request reaches the client only after
    the client's own exchange is over.  The server dropped it on the
    collision, so the client must refuse it, not switch alone."""
    holder: dict[str, _HoldFirstRequest] = {}

    def wrap_a(ep: EndpointCore) -> _HoldFirstRequest:
        holder["a"] = _HoldFirstRequest(ep, 0.4)
        return holder["a"]

    def both(t: Transfer) -> None:
        t.conn_a.reconfigure("reliability=selective-repeat(window=100)")
        t.conn_b.reconfigure("congestion=fixed-rate(rate_mbps=8)")

    seen: dict = {}

    def check(t: Transfer) -> None:
        if t.net.now > 0.75 and "late" not in seen and t.conn_a is not None:
            seen["late"] = (t.conn_a.reconfiguring, str(t.conn_a.composition))

    result, t, ab, ba = _run(
        "reliability=go-back-n(window=32)", [(0.3, both)], wrap_a=wrap_a, check=check
    )
    _assert_exact(result, ab, ba)
    assert holder["a"].done and holder["a"].held is None  # the copy was delivered late
    ev_a, ev_b = _reconf_events(result.a), _reconf_events(result.b)
    assert [type(e) for e in ev_a] == [ReconfigureDone]
    assert [type(e) for e in ev_b] == [ReconfigureRefused, ReconfigureDone]
    for conn in (t.conn_a, t.conn_b):
        assert conn.cc.NAME == "newreno" and conn.reliability.params["window"] == 100
        assert conn.stats["reconfigurations"] == 1
    assert seen["late"][0] is False


@pytest.mark.parametrize(
    ("start", "change"),
    [
        ("reliability=selective-repeat", "fec=reed-solomon(k=8,m=2)"),  # add FEC
        ("reliability=selective-repeat fec=reed-solomon(k=8,m=2)", "fec=none"),  # remove
        ("reliability=selective-repeat fec=xor(k=4)", "fec=reed-solomon(k=8,m=3)"),  # change
    ],
)
@pytest.mark.parametrize("initiator", ["a", "b"])
def test_fec_added_removed_or_changed_live_under_loss(
    start: str, change: str, initiator: str
) -> None:
    """FEC switches at a block boundary at each end: full-size segments cut
    before the switch still arrive (the receiver accepts them), data after it
    is protected by the new code, every byte arrives exactly once in order."""
    fwd = LinkConditions(delay=0.01, loss=0.05, rate_bps=20e6)

    def switch(t: Transfer) -> None:
        conn = t.conn_a if initiator == "a" else t.conn_b
        assert conn.reconfigure(change) == 1

    result, t, ab, ba = _run(start, [(0.3, switch)], forward=fwd, backward=fwd)
    _assert_exact(result, ab, ba)
    want = merge_composition(Composition.parse(start), change)
    for side, conn in ((result.a, t.conn_a), (result.b, t.conn_b)):
        (done,) = _reconf_events(side)
        assert isinstance(done, ReconfigureDone) and conn.composition == want
        fec = want["fec"]
        if fec.name == "none":
            assert conn.fec is None and conn.fec_tx is None
        else:
            assert fec.name == conn.fec.NAME and conn.fec.params["k"] == int(fec.params["k"])
    if want["fec"].name != "none":  # the new code really repaired losses after the switch
        assert result.a.stats["fec_recovered"] + result.b.stats["fec_recovered"] > 0
