"""Connection lifecycle over the simulated network: negotiation, handshake
loss and timeout, graceful / half / abortive close, idle timeout and
keepalive, a vanished peer, many connections, address change, stateless
RESET and API misuse."""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest

from vtl.core import wire
from vtl.core.composition import Composition
from vtl.core.config import ConnectionConfig
from vtl.core.connection import Connection, State
from vtl.core.endpoint import EndpointCore
from vtl.core.errors import ConnectionStateError, ErrorCode, WireError
from vtl.core.events import (
    ConnectionTerminated,
    DataReceived,
    HandshakeCompleted,
    HandshakeFailed,
    MessageReceived,
    PeerClosed,
)
from vtl.core.registry import Registry
from vtl.core.wire import AckFlags, PacketType
from vtl.sim import LinkConditions, SimNetwork
from vtl.sim.harness import ADDR_A, ADDR_B, Transfer, TransferResult
from vtl.tfs import register_builtins
from vtl.tfs.reliability import SelectiveRepeat

SR = Composition.parse("reliability=selective-repeat")
#: a 10 Mbit/s path, so transfers last long enough for mid-transfer actions
SLOW = LinkConditions(delay=0.01, rate_bps=10e6, queue_bytes=100_000)
GBN = Composition.parse("reliability=go-back-n")
FANCY = Composition.parse("reliability=fancy")  # installed only on the initiator


class Fancy(SelectiveRepeat):
    """A reliability TF only the initiator has."""

    NAME = "fancy"


def registry_with_fancy() -> Registry:
    reg = Registry()
    register_builtins(reg)
    reg.register(Fancy)
    return reg


def cfg(seed: int, **kw) -> ConnectionConfig:
    return ConnectionConfig(rng=random.Random(seed), **kw)


def transfer(offers: list[Composition], **kw) -> Transfer:
    kw.setdefault("config_a", cfg(1))
    kw.setdefault("config_b", cfg(2))
    kw.setdefault("forward", LinkConditions(delay=0.01))
    return Transfer(offers, **kw)


def kinds(events) -> list[type]:
    return [type(e) for _, e in events]


class Filter:
    """Node wrapper that drops incoming datagrams chosen by ``drop(packet)``."""

    def __init__(self, inner: EndpointCore, drop: Callable[[wire.Packet], bool]) -> None:
        self.inner = inner
        self.drop = drop
        self.dropped: list[PacketType] = []

    def receive(self, datagram: bytes, addr, now: float) -> None:
        try:
            packet = wire.decode(datagram)
        except WireError:
            packet = None
        if packet is not None and self.drop(packet):
            self.dropped.append(packet.type)
            return
        self.inner.receive(datagram, addr, now)

    def datagrams_to_send(self, now: float):
        return self.inner.datagrams_to_send(now)

    def next_timer(self):
        return self.inner.next_timer()

    def handle_timer(self, now: float) -> None:
        self.inner.handle_timer(now)


def drop_first(n: int, match: Callable[[wire.Packet], bool]) -> Callable[[wire.Packet], bool]:
    left = [n]

    def drop(packet: wire.Packet) -> bool:
        if left[0] > 0 and match(packet):
            left[0] -= 1
            return True
        return False

    return drop


def is_type(ptype: PacketType) -> Callable[[wire.Packet], bool]:
    return lambda p: p.type is ptype


def is_confirm(p: wire.Packet) -> bool:
    return p.type is PacketType.ACK and bool(p.flags & AckFlags.HANDSHAKE_DONE)


def assert_clean(result: TransferResult) -> None:
    assert result.completed
    for side in (result.a, result.b):
        assert side.terminated == ConnectionTerminated(0, "closed", False) or (
            side.terminated is not None and side.terminated.error_code == 0
        ), side.terminated


# =========================================================== negotiation


def test_responder_takes_first_installed_offer() -> None:
    t = transfer(
        [FANCY, Composition.parse("reliability=selective-repeat(window=0)"), GBN, SR],
        config_a=cfg(1, registry=registry_with_fancy()),
        data_ab=b"x" * 5000,
    )
    result = t.run()
    assert_clean(result)
    for side in (result.a, result.b):
        assert isinstance(side.handshake, HandshakeCompleted)
        assert side.handshake.composition == GBN
        assert not side.handshake.counter_offer
    assert result.a.handshake.offered_index == 2
    assert result.b.data == b"x" * 5000


@pytest.mark.parametrize(
    "bad",
    [
        "reliability=selective-repeat(window=0)",  # below the minimum
        "reliability=selective-repeat(windw=4)",  # unknown parameter
        "reliability=selective-repeat(min_rto=nan)",  # NaN passes naive range checks
        "reliability=selective-repeat(window=abc)",  # wrong type
        "reliability=selective-repeat@9.9",  # version not installed
        "framing=fancy",  # unknown TF in another role
    ],
)
def test_offers_with_bad_parameters_are_skipped(bad: str) -> None:
    t = transfer([Composition.parse(bad), SR], data_ab=b"y" * 3000)
    result = t.run()
    assert_clean(result)
    assert result.a.handshake.offered_index == 1
    assert result.b.handshake.composition == SR
    assert t.conn_b.rtt.min_rto == 0.2


def test_acceptable_predicate_filters_offers() -> None:
    t = transfer(
        [SR, GBN],
        config_b=cfg(2, acceptable=lambda c: c["reliability"].name == "go-back-n"),
        data_ab=b"z" * 3000,
    )
    result = t.run()
    assert_clean(result)
    assert result.a.handshake.composition == GBN
    assert result.a.handshake.offered_index == 1


def test_counter_offer_accepted_and_queued_data_reframed() -> None:
    """The initiator queued stream data and even closed before the
    handshake; the responder counter-offers message framing: the queued
    bytes are re-framed (not lost, no exception) and arrive intact."""
    counter = Composition.parse("reliability=selective-repeat framing=message")
    seen: list[Composition] = []
    data = random.Random(3).randbytes(50_000)
    t = transfer(
        [FANCY],
        config_a=cfg(
            1,
            registry=registry_with_fancy(),
            accept_counter_offer=lambda c: seen.append(c) or True,
        ),
        config_b=cfg(2, counter_offers=[counter]),
        data_ab=data,
    )
    result = t.run()
    assert_clean(result)
    assert seen == [counter]
    for side in (result.a, result.b):
        assert side.handshake.counter_offer
        assert side.handshake.composition == counter
        assert side.handshake.offered_index is None
    assert b"".join(result.b.messages) == data


def test_counter_offer_skips_ones_the_initiator_cannot_run() -> None:
    unusable = Composition.parse("reliability=go-back-n framing=message")
    usable = Composition.parse("reliability=stop-and-wait")
    reg = Registry()
    register_builtins(reg)
    reg.register(Fancy)
    reg.unregister("framing", "message")  # the initiator lacks message framing
    t = transfer(
        [FANCY],
        config_a=cfg(1, registry=reg),
        config_b=cfg(2, counter_offers=[unusable, usable]),
        data_ab=b"q" * 2000,
    )
    result = t.run()
    assert_clean(result)
    assert result.a.handshake.composition == usable
    assert result.b.data == b"q" * 2000


def test_counter_offer_rejected() -> None:
    counter = Composition.parse("reliability=go-back-n")
    responders: list[Connection] = []

    def watch(t: Transfer) -> None:
        for conn in t.ep_b.connections.values():
            if conn not in responders:
                responders.append(conn)

    t = transfer(
        [FANCY],
        config_a=cfg(1, registry=registry_with_fancy(), accept_counter_offer=lambda c: False),
        config_b=cfg(2, counter_offers=[counter]),
        data_ab=b"never",
        check=watch,
    )
    result = t.run()
    assert result.completed
    failed = result.a.handshake
    assert isinstance(failed, HandshakeFailed)
    assert failed.error_code == ErrorCode.COUNTER_OFFER_REJECTED and not failed.by_peer
    assert kinds(result.a.events) == [HandshakeFailed]
    # the responder's half-open connection went away and was never accepted
    assert len(responders) == 1 and responders[0].is_terminated
    event = responders[0].next_event()
    assert isinstance(event, HandshakeFailed) and event.by_peer
    assert event.error_code == ErrorCode.COUNTER_OFFER_REJECTED
    assert not t.ep_b.connections and t.ep_b.accept() is None
    assert result.b.data == b""


def test_refuse_names_the_missing_tf() -> None:
    t = transfer([FANCY], config_a=cfg(1, registry=registry_with_fancy()), data_ab=b"x")
    result = t.run()
    assert result.completed
    failed = result.a.handshake
    assert isinstance(failed, HandshakeFailed) and failed.by_peer
    assert failed.error_code == ErrorCode.NO_COMMON_COMPOSITION
    assert "fancy" in failed.reason and "not installed" in failed.reason
    assert result.sim_time < 1.0  # refused at once, not timed out
    assert not t.ep_b.connections


def test_max_datagram_size_negotiated_down_for_data_queued_early() -> None:
    """Data queued before the handshake was segmented for our 1452-byte
    datagrams; the peer takes 1200: it is re-segmented, not dropped."""
    data = random.Random(4).randbytes(30_000)
    messages = [data[:2000], b"", data[2000:2001], data[2001:]]
    for comp, payload in ((SR, data), (Composition.parse("framing=message"), messages)):
        t = transfer(
            [comp],
            config_b=cfg(2, max_datagram_size=1200),
            data_ab=payload,
            forward=LinkConditions(delay=0.01, mtu=1200),
        )
        result = t.run()
        assert_clean(result)
        if isinstance(payload, bytes):
            assert result.b.data == payload
        else:
            assert result.b.messages == payload
        assert t.conn_a._max_payload == 1200 - wire.DATA_OVERHEAD


# ============================================================= handshake


@pytest.mark.parametrize(
    "victim,rule",
    [
        ("b", drop_first(1, is_type(PacketType.OFFER))),
        ("b", drop_first(3, is_type(PacketType.OFFER))),
        ("a", drop_first(1, is_type(PacketType.ACCEPT))),
        ("a", drop_first(2, is_type(PacketType.ACCEPT))),
        ("b", drop_first(1, is_confirm)),
        ("b", drop_first(3, is_confirm)),
    ],
    ids=["offer", "offer-x3", "accept", "accept-x2", "confirm", "confirm-x3"],
)
def test_handshake_survives_lost_packets(victim: str, rule) -> None:
    filters: list[Filter] = []

    def wrap(ep: EndpointCore) -> Filter:
        filters.append(Filter(ep, rule))
        return filters[-1]

    data = random.Random(5).randbytes(20_000)
    t = transfer(
        [SR],
        data_ab=data,
        data_ba=data[:5000],
        **{f"wrap_{victim}": wrap},
    )
    result = t.run()
    assert_clean(result)
    assert filters[0].dropped  # the rule did bite
    assert result.b.data == data and result.a.data == data[:5000]
    assert kinds(result.a.events)[0] is HandshakeCompleted
    assert kinds(result.b.events)[0] is HandshakeCompleted


def test_handshake_under_random_loss() -> None:
    for seed in range(8):
        t = transfer(
            [SR],
            forward=LinkConditions(delay=0.01, loss=0.3),
            data_ab=b"h" * 4000,
            seed=seed,
            config_a=cfg(seed, idle_timeout=300),
            config_b=cfg(seed + 100, idle_timeout=300),
            timeout=600,
        )
        result = t.run()
        assert result.completed
        if isinstance(result.a.handshake, HandshakeFailed):  # ~7 losses in a row: rare
            assert result.a.handshake.error_code == ErrorCode.HANDSHAKE_TIMEOUT
            continue
        assert_clean(result)
        assert result.b.data == b"h" * 4000


def drive(net: SimNetwork, predicate: Callable[[], bool], timeout: float) -> bool:
    return net.run_until(predicate, timeout)


def test_handshake_timeout_when_peer_absent() -> None:
    net = SimNetwork(seed=1)
    ep = EndpointCore(cfg(1, handshake_timeout=5.0))
    net.attach(ADDR_A, ep)
    conn = ep.connect(("192.0.2.1", 9), [SR], net.now)
    conn.send(b"nobody there")
    events = []

    def done() -> bool:
        while (e := conn.next_event()) is not None:
            events.append((net.now, e))
        return conn.is_terminated

    assert drive(net, done, 60.0)
    assert len(events) == 1
    when, event = events[0]
    assert event == HandshakeFailed(ErrorCode.HANDSHAKE_TIMEOUT, "handshake timed out", False)
    assert 5.0 <= when < 5.5
    assert conn.stats["packets_sent"] >= 4  # the OFFER was retried with backoff
    net.run(net.now + 1)
    assert not ep.connections


def test_connect_to_endpoint_not_listening_fails_fast() -> None:
    net = SimNetwork(seed=1)
    a, b = EndpointCore(cfg(1)), EndpointCore(cfg(2))  # b does not listen
    net.attach(ADDR_A, a)
    net.attach(ADDR_B, b)
    net.link(ADDR_A, ADDR_B, LinkConditions(delay=0.01))
    conn = a.connect(ADDR_B, [SR], 0.0)
    assert drive(net, lambda: conn.is_terminated, 10.0)
    event = conn.next_event()
    assert isinstance(event, HandshakeFailed) and event.by_peer
    assert event.error_code == ErrorCode.NOT_LISTENING
    assert net.now < 0.1
    assert b.drops["not_listening"] == 1


# ================================================================= close


def test_graceful_close_everything_acked_both_ways() -> None:
    ab, ba = random.Random(6).randbytes(200_000), random.Random(7).randbytes(150_000)
    t = transfer([SR], forward=LinkConditions(delay=0.01, loss=0.05), data_ab=ab, data_ba=ba)
    result = t.run()
    assert_clean(result)
    assert result.b.data == ab and result.a.data == ba
    for side, conn in ((result.a, t.conn_a), (result.b, t.conn_b)):
        assert kinds(side.events) == [HandshakeCompleted, PeerClosed, ConnectionTerminated]
        assert conn._snd_una == conn._snd_nxt and not conn._outstanding
        assert conn._eof_delivered and conn._close_acked
    # every byte was acknowledged before the connection counted as closed
    assert result.a.stats["app_bytes_sent"] == len(ab) == result.b.stats["app_bytes_delivered"]


@pytest.mark.parametrize("first", ["a", "b"])
def test_half_close(first: str) -> None:
    """One side sends a little and closes; the other keeps sending for a
    long while after seeing its end of stream, then closes."""
    small, big = b"s" * 3000, random.Random(8).randbytes(400_000)
    if first == "a":
        kw = dict(data_ab=small, data_ba=big, close_a="after_send", close_b="after_peer")
    else:
        kw = dict(data_ab=big, data_ba=small, close_a="after_peer", close_b="after_send")
    t = transfer(
        [SR], forward=LinkConditions(delay=0.01, loss=0.02, rate_bps=5e6, queue_bytes=50_000), **kw
    )
    errors: list[Exception] = []

    def closer_keeps_receiving(t: Transfer) -> None:
        closer = t.conn_a if first == "a" else t.conn_b
        if closer is not None and closer._close_requested and not errors:
            try:
                closer.send(b"late")
            except ConnectionStateError as exc:
                errors.append(exc)

    t.check = closer_keeps_receiving
    result = t.run()
    assert_clean(result)
    closer, other = (result.a, result.b) if first == "a" else (result.b, result.a)
    assert other.data == small and closer.data == big
    # the closing side went on receiving long after the peer saw its end
    assert closer.last_data_at > other.peer_closed_at + 0.3
    assert errors and "after close" in str(errors[0])


def test_close_with_data_in_flight_under_loss() -> None:
    data = random.Random(9).randbytes(300_000)
    state_at_close = {}

    def record(t: Transfer) -> None:
        a = t.conn_a
        if a is not None and a._close_requested and not state_at_close:
            state_at_close.update(unsent=a._unsent_bytes, outstanding=len(a._outstanding))

    t = transfer([SR], forward=LinkConditions(delay=0.02, loss=0.1), data_ab=data, check=record)
    result = t.run()
    assert_clean(result)
    assert result.b.data == data
    assert state_at_close["unsent"] > 0  # close() came with nearly everything still queued
    assert result.a.stats["retransmissions"] > 0


@pytest.mark.parametrize("aborter", ["a", "b"])
def test_abort_reaches_the_peer_with_its_code(aborter: str) -> None:
    def abort(t: Transfer) -> None:
        (t.conn_a if aborter == "a" else t.conn_b).abort(42, "application gave up")

    data = random.Random(10).randbytes(2_000_000)
    t = transfer([SR], data_ab=data, data_ba=data, forward=SLOW, schedule=[(0.5, abort)])
    result = t.run()
    assert result.completed
    me, peer = (result.a, result.b) if aborter == "a" else (result.b, result.a)
    assert me.terminated == ConnectionTerminated(42, "application gave up", False)
    assert peer.terminated == ConnectionTerminated(42, "application gave up", True)
    assert result.sim_time < 0.6
    assert 0 < len(peer.data) < len(data)
    with pytest.raises(ConnectionStateError):
        (t.conn_a if aborter == "a" else t.conn_b).send(b"more")


def test_abort_whose_reset_is_lost_still_ends_the_peer() -> None:
    """The RESET is lost; the peer's next packet hits an unknown connection
    and draws a stateless RESET."""
    f: list[Filter] = []

    def wrap(ep):
        f.append(Filter(ep, drop_first(1, is_type(PacketType.RESET))))
        return f[0]

    data = random.Random(11).randbytes(1_000_000)
    t = transfer(
        [SR],
        data_ba=data,
        wrap_b=wrap,
        forward=SLOW,
        schedule=[(0.3, lambda t: t.conn_a.abort(7, "bye"))],
    )
    result = t.run()
    assert result.completed
    assert f[0].dropped == [PacketType.RESET]
    assert result.a.terminated == ConnectionTerminated(7, "bye", False)
    assert result.b.terminated.error_code == ErrorCode.UNKNOWN_CONNECTION
    assert result.b.terminated.by_peer
    assert result.sim_time < 1.0


# ======================================================== idle, keepalive


def test_idle_timeout() -> None:
    t = transfer(
        [SR],
        data_ab=b"hello",
        close_a=None,
        close_b=None,
        config_a=cfg(1, idle_timeout=2.0),
        config_b=cfg(2, idle_timeout=2.0),
    )
    result = t.run()
    assert result.completed
    for side in (result.a, result.b):
        assert side.terminated.error_code == ErrorCode.IDLE_TIMEOUT
    assert result.b.data == b"hello"
    assert not result.a.terminated.by_peer or not result.b.terminated.by_peer
    assert 2.0 <= result.sim_time < 2.5


@pytest.mark.parametrize("side", ["a", "b"])
def test_keepalive_on_one_side_keeps_both_alive(side: str) -> None:
    keep = {"keepalive_interval": 0.5, "idle_timeout": 2.0}
    t = transfer(
        [SR],
        data_ab=b"ping",
        close_a=None,
        close_b=None,
        config_a=cfg(1, **(keep if side == "a" else {"idle_timeout": 2.0})),
        config_b=cfg(2, **(keep if side == "b" else {"idle_timeout": 2.0})),
        forward=LinkConditions(delay=0.01, loss=0.05),
        stop=lambda t: t.net.now >= 30.0,
        step=0.5,
    )
    result = t.run()
    assert result.sim_time >= 30.0
    assert t.conn_a.is_established and t.conn_b.is_established
    prober = t.conn_a if side == "a" else t.conn_b
    assert prober.stats["packets_sent"] > 30  # ~ one PROBE per 0.5 s
    assert result.b.data == b"ping"
    # and it is still a working connection
    t.conn_a.send(b"still here")
    t.stop = None
    t.app_a.close_policy = t.app_b.close_policy = "after_send"
    t.app_a.sent_all = t.app_b.sent_all = True
    assert t.net.run_until(t._pump, 10.0)
    t.app_b.read(t.net.now, None)
    assert bytes(t.app_b.data) == b"pingstill here"


# ===================================================== a peer that vanishes


@pytest.mark.parametrize(
    "config,expected",
    [
        ({}, {ErrorCode.IDLE_TIMEOUT, ErrorCode.RETRANSMISSION_LIMIT}),
        (
            {"reliability": "reliability=selective-repeat(max_retransmissions=3,min_rto=0.05)"},
            {ErrorCode.RETRANSMISSION_LIMIT},
        ),
    ],
)
def test_sender_fails_when_the_link_goes_down(config: dict, expected: set) -> None:
    comp = Composition.parse(config.get("reliability", "reliability=selective-repeat"))

    def cut(t: Transfer) -> None:
        t.net.link(ADDR_A, ADDR_B, LinkConditions(loss=1.0))

    data = random.Random(12).randbytes(3_000_000)
    t = transfer([comp], data_ab=data, forward=SLOW, schedule=[(1.0, cut)], timeout=200)
    result = t.run()
    assert result.completed, "a sender whose peer vanished must not hang"
    assert result.a.terminated.error_code in expected
    assert result.b.terminated.error_code == ErrorCode.IDLE_TIMEOUT
    assert 0 < len(result.b.data) < len(data)
    assert result.b.data == data[: len(result.b.data)]
    assert result.sim_time < 1.0 + 30.0 + 2.0


# ==================================================== many connections


def test_hundred_connections_between_two_endpoints() -> None:
    net = SimNetwork(seed=3)
    a = EndpointCore(cfg(1))
    b = EndpointCore(cfg(2), listen=True)
    net.attach(ADDR_A, a)
    net.attach(ADDR_B, b)
    net.link(ADDR_A, ADDR_B, LinkConditions(delay=0.01, loss=0.02, rate_bps=50e6))
    comps = [SR, GBN, Composition.parse("framing=message ordering=unordered")]
    payloads = {}
    clients = []
    for i in range(100):
        comp = comps[i % 3]
        data = i.to_bytes(2, "big") + random.Random(i).randbytes(5000 + 97 * i)
        conn = a.connect(ADDR_B, [comp], net.now)
        conn.send(data)
        conn.close()
        clients.append(conn)
        payloads[i] = data
    servers: list[Connection] = []
    received: dict[int, bytearray] = {}
    closed = set()

    def pump() -> bool:
        acted = False
        while (conn := b.accept()) is not None:
            servers.append(conn)
            received[id(conn)] = bytearray()
        for conn in servers:
            while (e := conn.next_event()) is not None:
                if isinstance(e, DataReceived | MessageReceived):
                    received[id(conn)] += e.data
                elif isinstance(e, PeerClosed):
                    conn.close()
                    acted = True
                elif isinstance(e, ConnectionTerminated):
                    closed.add(id(conn))
        for conn in clients:
            while conn.next_event() is not None:
                pass
        if acted:
            net.poke()
        return len(closed) == 100 and all(c.is_terminated for c in clients)

    assert net.run_until(pump, 120.0)
    assert len(servers) == 100
    assert len({c.local_cid for c in servers}) == 100  # demultiplexed by connection ID
    got = {int.from_bytes(bytes(d[:2]), "big"): bytes(d) for d in received.values()}
    assert got == payloads
    assert all(c.snapshot()["state"] == "terminated" for c in clients)
    assert not a.drops and set(b.drops) <= {"unknown_connection"}


# ====================================================== address change


class Mobile:
    """One facade of an endpoint that moves from one address to another at
    ``when``: the facade at the old address goes deaf and mute, the one at
    the new address takes over."""

    def __init__(self, ep: EndpointCore, active: Callable[[float], bool], clock) -> None:
        self.ep, self.active, self.clock = ep, active, clock

    def receive(self, datagram, addr, now):
        if self.active(now):
            self.ep.receive(datagram, addr, now)

    def datagrams_to_send(self, now):
        return self.ep.datagrams_to_send(now) if self.active(now) else []

    def next_timer(self):
        return self.ep.next_timer() if self.active(self.clock()) else None

    def handle_timer(self, now):
        if self.active(now):
            self.ep.handle_timer(now)


@pytest.mark.parametrize("reliability", ["selective-repeat", "go-back-n", "none"])
def test_peer_changes_address_mid_connection(reliability: str) -> None:
    moved_at, new_addr = 0.5, ("10.9.9.9", 5555)
    holder: dict = {}
    clock = lambda: holder["t"].net.now  # noqa: E731

    def wrap_a(ep):
        return Mobile(ep, lambda now: now < moved_at, clock)

    def move(t: Transfer) -> None:
        t.net.attach(new_addr, Mobile(t.ep_a, lambda now: now >= moved_at, clock))
        t.net.link(new_addr, ADDR_B, LinkConditions(delay=0.015))
        # the old address is gone: nothing sent there arrives any more
        t.net.link(ADDR_A, ADDR_B, LinkConditions(loss=1.0))

    seen = {}

    def check_address(t: Transfer) -> None:
        seen["b_sends_to"] = t.ep_b.address_of(t.conn_b)

    ab, ba = random.Random(13).randbytes(600_000), random.Random(14).randbytes(600_000)
    t = transfer(
        [Composition.parse(f"reliability={reliability} congestion=fixed-rate(rate_mbps=5)")],
        data_ab=ab,
        data_ba=ba,
        wrap_a=wrap_a,
        schedule=[(moved_at, move), (moved_at + 0.3, check_address)],
    )
    holder["t"] = t
    result = t.run()
    assert_clean(result)
    assert seen["b_sends_to"] == new_addr
    assert result.b.first_data_at < moved_at < result.b.last_data_at
    assert result.a.last_data_at > moved_at + 0.3
    if reliability == "none":
        assert len(result.b.data) > len(ab) * 0.9 and len(result.a.data) > len(ba) * 0.9
    else:
        assert result.b.data == ab and result.a.data == ba
    assert not t.ep_b.drops.get("invalid_for_connection")


def test_replayed_old_packet_from_elsewhere_does_not_redirect() -> None:
    """Only a packet with a new largest packet number moves the peer's address."""
    captured: list[bytes] = []

    class Tap(Filter):
        def receive(self, datagram, addr, now):
            captured.append(datagram)
            super().receive(datagram, addr, now)

    seen = []

    def replay(t: Transfer) -> None:
        for datagram in captured[-50:]:  # recent DATA and ACKs: valid duplicates
            t.ep_b.receive(datagram, ("203.0.113.66", 1), t.net.now)
            seen.append(t.ep_b.address_of(t.conn_b))

    t = transfer(
        [SR],
        data_ab=random.Random(15).randbytes(1_000_000),
        data_ba=random.Random(16).randbytes(1_000_000),
        forward=SLOW,
        wrap_b=lambda ep: Tap(ep, lambda p: False),
        schedule=[(0.3, replay)],
    )
    result = t.run()
    assert_clean(result)
    assert len(seen) == 50 and set(seen) == {ADDR_A}
    assert t.conn_b.stats["duplicate_segments"] > 0  # the replays were processed, not refused


# ===================================================== stateless RESET


def test_stateless_reset_for_unknown_connection_ids() -> None:
    ep = EndpointCore(cfg(1), listen=True)
    src = ("198.51.100.7", 1234)
    probe = wire.encode_data(dcid=0xDEAD, scid=0xBEEF, pn=5, seq=1, una=1, payload=b"x")
    ep.receive(probe, src, 1.0)
    out = ep.datagrams_to_send(1.0)
    assert len(out) == 1
    datagram, to = out[0]
    assert to == src
    reset = wire.decode(datagram)
    assert reset.type is PacketType.RESET and reset.dcid == 0xBEEF and reset.scid == 0xDEAD
    assert wire.decode_error(reset.body)[0] == ErrorCode.UNKNOWN_CONNECTION
    assert ep.drops["unknown_connection"] == 1
    # a RESET is never answered with a RESET (no ping-pong)
    ep.receive(wire.encode(PacketType.RESET, 0xDEAD, 0xBEEF, 0, b"\0\1\0\0"), src, 1.0)
    assert ep.datagrams_to_send(1.0) == []
    # rate-limited: a flood draws at most RESET_RATE answers per second
    for i in range(500):
        ep.receive(wire.encode_data(0xD000 + i, 0xB000 + i, 0, 0, 0, b""), src, 2.0)
    assert len(ep.datagrams_to_send(2.0)) <= EndpointCore.RESET_RATE
    assert ep.drops["reset_rate_limited"] >= 500 - EndpointCore.RESET_RATE
    assert not ep.connections


def test_stateless_reset_ends_a_connection_its_peer_forgot() -> None:
    t = transfer([SR], close_a=None, close_b=None, data_ab=b"a", stop=lambda t: t.conn_b)
    t.run()
    # the responder's endpoint loses all state (e.g. it restarted)
    t.ep_b.connections.clear()
    t.ep_b.addresses.clear()
    t.stop = None
    t.conn_a.send(b"are you there?")
    assert t.net.run_until(lambda: t.conn_a.is_terminated, 5.0)
    events = [e for e in iter(t.conn_a.next_event, None) if isinstance(e, ConnectionTerminated)]
    assert events == [
        ConnectionTerminated(ErrorCode.UNKNOWN_CONNECTION, "unknown connection", True)
    ]


# ============================================================ API misuse


def test_api_misuse_raises_connection_state_error() -> None:
    with pytest.raises(ConnectionStateError):
        Connection(is_client=True, offers=[])
    with pytest.raises(ConnectionStateError):
        Connection(is_client=True, offers=[SR], config=ConnectionConfig(max_datagram_size=50))
    server = Connection(is_client=False)
    with pytest.raises(ConnectionStateError):
        server.connect(0.0)
    client = Connection(is_client=True, offers=[SR])
    client.connect(0.0)
    with pytest.raises(ConnectionStateError):
        client.connect(0.0)  # twice
    packet = wire.decode(client.datagrams_to_send(0.0)[0])
    with pytest.raises(ConnectionStateError):
        client.accept_offer(packet, 0.0)
    client.send(b"fine before the handshake")
    client.close()
    client.close()  # idempotent
    with pytest.raises(ConnectionStateError, match="after close"):
        client.send(b"x")
    client.abort()
    assert client.state is State.TERMINATED
    client.abort()  # no-op once terminated
    fresh = Connection(is_client=True, offers=[SR])
    fresh.abort()
    with pytest.raises(ConnectionStateError, match="terminated"):
        fresh.send(b"x")


def test_late_duplicate_offer_does_not_disturb_an_established_connection() -> None:
    """A retransmitted OFFER delayed past the handshake (or duplicated by the
    network) once rearmed the responder's handshake timer, which then failed
    the live connection with HANDSHAKE_TIMEOUT."""
    offers: list[bytes] = []

    class Tap(Filter):
        def receive(self, datagram, addr, now):
            if wire.decode(datagram).type is PacketType.OFFER:
                offers.append(datagram)
            super().receive(datagram, addr, now)

    def replay(t: Transfer) -> None:
        t.ep_b.receive(offers[0], ADDR_A, t.net.now)

    data = random.Random(16).randbytes(1_500_000)
    t = transfer(
        [SR],
        data_ab=data,
        forward=LinkConditions(delay=0.01, rate_bps=1e6),
        wrap_b=lambda ep: Tap(ep, lambda p: False),
        schedule=[(1.0, replay), (5.0, replay)],
    )
    result = t.run()
    assert result.sim_time > 11.0  # outlived the 10 s handshake timeout
    assert_clean(result)
    assert result.b.data == data
    assert kinds(result.b.events) == [HandshakeCompleted, PeerClosed, ConnectionTerminated]


def test_responder_may_send_at_once_when_the_confirmation_is_lost() -> None:
    """The responder knows the initiator's window from the composition, so a
    lost confirmation does not hold its data back until a persist probe."""
    f: list[Filter] = []

    def wrap(ep):
        f.append(Filter(ep, drop_first(1, is_confirm)))
        return f[0]

    t = transfer([SR], data_ab=b"a" * 100, data_ba=b"b" * 50_000, wrap_b=wrap)
    result = t.run()
    assert_clean(result)
    assert f[0].dropped == [PacketType.ACK]
    assert result.a.data == b"b" * 50_000
    assert result.a.first_data_at < 0.1  # a few RTTs (20 ms), not a 200 ms+ persist timer


def test_close_under_heavy_loss_both_ways_is_clean() -> None:
    """The side that finishes first lingers (restarting on every packet of
    its peer) to repeat its final ACK: closes stay clean at 30 % loss."""
    for seed in range(25):
        t = transfer(
            [SR],
            forward=LinkConditions(delay=0.01, loss=0.3),
            data_ab=b"x" * 20_000,
            data_ba=b"y" * 20_000,
            seed=seed,
            config_a=cfg(seed, idle_timeout=300),
            config_b=cfg(seed + 1000, idle_timeout=300),
            timeout=600,
        )
        result = t.run()
        assert result.completed
        if isinstance(result.a.handshake, HandshakeFailed):
            continue  # ~7 handshake packets lost in a row
        assert_clean(result)
        assert result.b.data == b"x" * 20_000 and result.a.data == b"y" * 20_000


# ========================================================= endpoint limits


def test_abort_before_accept_reaches_the_responder() -> None:
    """An initiator that aborts before it knows the responder's connection ID
    sends a RESET with destination ID 0; the responder's half-open connection
    must go away at once, not linger until its handshake timeout."""
    net = SimNetwork(seed=3)
    a, b = EndpointCore(cfg(1)), EndpointCore(cfg(2), listen=True)
    net.attach(ADDR_A, a)
    net.attach(ADDR_B, b)
    net.link(ADDR_A, ADDR_B, LinkConditions(delay=0.05))
    conn = a.connect(ADDR_B, [SR], 0.0)
    net.poke()
    net.run(0.06)  # the OFFER arrived, the ACCEPT is on its way back
    assert b.pending_handshakes() == 1
    conn.abort(reason="changed my mind")
    net.poke()
    net.run(0.115)  # the RESET arrived; a stateless reply to our ACCEPT could not have yet
    assert b.pending_handshakes() == 0
    assert b.drops["no_destination_cid"] == 0
    net.run(0.3)
    assert not b.connections
    assert b.accept() is None


def test_backlog_bounds_half_open_connections() -> None:
    """OFFERs beyond the backlog are refused (and counted), so a flood of
    OFFERs cannot grow the responder's state without bound."""
    net = SimNetwork(seed=4)
    b = EndpointCore(cfg(2), listen=True, backlog=5)
    net.attach(ADDR_B, b)
    initiators = []
    for i in range(8):
        addr = ("a", i)
        ep = EndpointCore(cfg(10 + i))
        net.attach(addr, ep)
        net.link(addr, ADDR_B, LinkConditions(delay=0.01))
        initiators.append(ep.connect(ADDR_B, [SR], 0.0))
    net.poke()
    net.run(0.5)
    assert b.drops["backlog_full"] == 3
    ready = [c for c in initiators if c.is_established]
    refused = [c for c in initiators if c.is_terminated]
    assert len(ready) == 5 and len(refused) == 3
    # once the application accepts, there is room again
    while b.accept() is not None:
        pass
    assert b.pending_handshakes() == 0


def test_burst_cap_asks_to_be_called_again_now() -> None:
    """When datagrams_to_send stops at max_burst_packets with more it could
    send, next_timer() must say 'now' (the sans-I/O contract)."""
    net = SimNetwork(seed=5)
    a = EndpointCore(cfg(1, max_burst_packets=8))
    b = EndpointCore(cfg(2), listen=True)
    net.attach(ADDR_A, a)
    net.attach(ADDR_B, b)
    conn = a.connect(
        ADDR_B, [Composition.parse("reliability=selective-repeat congestion=none")], 0.0
    )
    net.poke()
    assert net.run_until(lambda: conn.is_established, 1.0)
    conn.send(bytes(200_000))
    now = net.now
    first = conn.datagrams_to_send(now)
    assert len(first) == 8
    assert conn.next_timer() == now
    conn.handle_timer(now)
    assert len(conn.datagrams_to_send(now)) == 8


# ======================================================== tail loss probe


@pytest.mark.parametrize("spec", ["reliability=selective-repeat", "reliability=go-back-n"])
def test_tail_loss_probe_recovers_a_lone_lost_message_within_rtts(spec: str) -> None:
    """A request that is the only packet in flight and gets lost must not
    wait for the RTO (>= 200 ms): a probe two RTTs after it resends it."""
    net = SimNetwork(seed=6)
    a, b = EndpointCore(cfg(1)), EndpointCore(cfg(2), listen=True)
    first_data = drop_first(1, is_type(PacketType.DATA))
    victim = Filter(b, first_data)
    net.attach(ADDR_A, a)
    net.attach(ADDR_B, victim)
    net.link(ADDR_A, ADDR_B, LinkConditions(delay=0.01))  # 20 ms RTT
    conn = a.connect(ADDR_B, [Composition.parse(spec)], 0.0)
    net.poke()
    assert net.run_until(lambda: conn.is_established and b.accept() is not None, 1.0)
    server = next(iter(c for c in b.connections.values()))
    sent_at = net.now
    conn.send(b"request")
    net.poke()
    got: list[float] = []

    def arrived() -> bool:
        while (e := server.next_event()) is not None:
            if isinstance(e, DataReceived):
                got.append(net.now)
        return bool(got)

    assert net.run_until(arrived, 2.0)
    assert victim.dropped == [PacketType.DATA]
    latency = got[0] - sent_at
    assert latency < 0.1, latency  # ~2 RTT + ack delay + one-way delay, not an RTO
    assert conn.stats["tail_loss_probes"] == 1
    assert conn.stats["rto_count"] == 0
