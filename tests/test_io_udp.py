"""The asyncio datapath over real UDP sockets on loopback (IPv4 and IPv6)."""

from __future__ import annotations

import asyncio
import errno
import hashlib
import random
import socket
import time
from collections.abc import AsyncIterator

import pytest

from vtl.core.composition import Composition
from vtl.core.config import ConnectionConfig
from vtl.core.errors import ConnectionStateError, ErrorCode, VtlError
from vtl.core.events import ConnectionTerminated, DataReceived, PeerClosed
from vtl.io import (
    ConnectionClosedError,
    HandshakeError,
    HandshakeTimeoutError,
    PeerResetError,
    UdpEndpoint,
    VtlConnection,
)
from vtl.io.udp import UdpSocket, open_udp_socket

STREAM = Composition.parse("reliability=selective-repeat congestion=newreno framing=stream")
MESSAGES = Composition.parse("reliability=selective-repeat congestion=newreno framing=message")

HOSTS = [
    pytest.param("127.0.0.1", id="ipv4"),
    pytest.param("::1", id="ipv6"),
]


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


def _skip_if_no_v6(host: str) -> None:
    if ":" in host and not _has_ipv6_loopback():
        pytest.skip("no IPv6 loopback")


def payload(n: int, seed: int = 0) -> bytes:
    """Random bytes with plenty of NULs (and a run of them)."""
    data = bytearray(random.Random(seed).randbytes(n))
    data[n // 3 : n // 3 + 4096] = bytes(min(4096, n - n // 3))
    return bytes(data)


async def read_all(conn: VtlConnection) -> bytes:
    parts = []
    async for chunk in conn:
        parts.append(chunk)
    return b"".join(parts)


class Pair:
    """A listening server endpoint and a client endpoint."""

    def __init__(self, server: UdpEndpoint, client: UdpEndpoint) -> None:
        self.server = server
        self.client = client

    @property
    def server_addr(self) -> tuple:
        return self.server.local_address[:2]

    async def connect(
        self, comp: Composition = STREAM, **kw
    ) -> tuple[VtlConnection, VtlConnection]:
        c = await self.client.connect(self.server_addr, [comp], timeout=5, **kw)
        s = await asyncio.wait_for(self.server.accept(), 5)
        return c, s


@pytest.fixture(params=HOSTS)
async def pair(request: pytest.FixtureRequest) -> AsyncIterator[Pair]:
    host = request.param
    _skip_if_no_v6(host)
    server = await UdpEndpoint.create((host, 0), listen=True)
    client = await UdpEndpoint.create((host, 0))
    try:
        yield Pair(server, client)
    finally:
        await client.close()
        await server.close()


# ----------------------------------------------------------------- transfer


async def test_bidirectional_transfer_byte_exact(pair: Pair) -> None:
    c, s = await pair.connect()
    assert c.composition == STREAM and s.composition == STREAM
    assert not c.counter_offer
    assert s.peer_address[1] == pair.client.local_address[1]
    up, down = payload(3 << 20, 1), payload(2 << 20 | 12345, 2)

    async def side(conn: VtlConnection, out: bytes) -> bytes:
        async def writer() -> None:
            await conn.send(out)
            conn.close()

        _, got = await asyncio.gather(writer(), read_all(conn))
        return got

    async with asyncio.timeout(60):
        got_c, got_s = await asyncio.gather(side(c, up), side(s, down))
        await asyncio.gather(c.wait_closed(), s.wait_closed())
    assert hashlib.sha256(got_s).digest() == hashlib.sha256(up).digest() and got_s == up
    assert got_c == down
    assert c.error_code == 0 and s.error_code == 0
    st = pair.client.stats()
    assert st["datagrams_out"] > len(up) // 1452 and st["bytes_out"] > len(up)
    assert st["send_errors"] == 0
    if st["gso"]:
        assert st["gso_batches"] > 0
    assert pair.server.stats()["drops"] == {}


async def test_receive_max_bytes_and_next_event(pair: Pair) -> None:
    c, s = await pair.connect()
    data = payload(100_000, 3)
    await c.send(data)
    c.close()
    async with asyncio.timeout(20):
        first = await s.receive(10)
        assert first == data[:10]
        rest = bytearray()
        while chunk := await s.receive(7000):
            assert len(chunk) <= 7000
            rest += chunk
        assert bytes(rest) == data[10:]
        assert await s.receive() == b""  # stays at end of stream
        s.close()
        ev = await c.next_event()
        assert isinstance(ev, (PeerClosed, ConnectionTerminated))
        while ev is not None:
            ev = await c.next_event()
        await c.wait_closed()


async def test_message_framing(pair: Pair) -> None:
    c, s = await pair.connect(MESSAGES)
    sizes = [1, 0, 1000, 1412, 1413, 5000, 100_000, 3, 300_000]
    msgs = [payload(n, i) for i, n in enumerate(sizes)]
    async with asyncio.timeout(30):
        for m in msgs:
            await c.send(m)
        c.close()
        got = []
        while (m := await s.receive_message()) is not None:
            got.append(m)
        assert got == msgs
        assert await s.receive_message() is None
        # and the other way, with the async iterator
        for m in msgs[:4]:
            await s.send(m)
        s.close()
        back = [m async for m in c]
        assert back == msgs[:4]
        await asyncio.gather(c.wait_closed(), s.wait_closed())


async def test_many_concurrent_connections(pair: Pair) -> None:
    n = 50

    async def echo_server() -> None:
        async def echo(conn: VtlConnection) -> None:
            async for chunk in conn:
                await conn.send(chunk)
            conn.close()

        tasks = []
        for _ in range(n):
            tasks.append(asyncio.create_task(echo(await pair.server.accept())))
        await asyncio.gather(*tasks)

    async def client(i: int) -> None:
        conn = await pair.client.connect(pair.server_addr, [STREAM], timeout=10)
        data = payload(40_000 + 1000 * i, 100 + i)
        await conn.send(data)
        conn.close()
        assert await read_all(conn) == data
        await conn.wait_closed()

    async with asyncio.timeout(60):
        server = asyncio.create_task(echo_server())
        await asyncio.gather(*(client(i) for i in range(n)))
        await server
    assert pair.server.stats()["drops"] == {}


async def test_half_close(pair: Pair) -> None:
    c, s = await pair.connect()
    async with asyncio.timeout(20):
        await c.send(b"request\x00")
        c.close()
        with pytest.raises(ConnectionStateError):
            await c.send(b"more")
        assert await read_all(s) == b"request\x00"
        # the server can still answer after the client closed its direction
        reply = payload(200_000, 9)
        await s.send(reply)
        s.close()
        assert await read_all(c) == reply
        await asyncio.gather(c.wait_closed(), s.wait_closed())
    assert c.error_code == 0 and s.error_code == 0


async def test_abort_reaches_peer_as_reset(pair: Pair) -> None:
    c, s = await pair.connect()
    async with asyncio.timeout(10):
        await c.send(b"x" * 1000)
        assert await s.receive() == b"x" * 1000
        c.abort("client gave up", error_code=ErrorCode.APPLICATION)
        with pytest.raises(PeerResetError) as info:
            await s.receive()
        assert info.value.error_code == ErrorCode.APPLICATION
        assert info.value.reason == "client gave up"
        assert info.value.by_peer
        with pytest.raises(PeerResetError):  # and again on every later read
            await s.receive()
        with pytest.raises(ConnectionClosedError):
            await s.send(b"too late")
        await s.wait_closed()
        assert s.error_code == ErrorCode.APPLICATION
        with pytest.raises(ConnectionClosedError) as local:
            await c.receive()
        assert not local.value.by_peer


async def test_abort_wakes_a_blocked_sender(pair: Pair) -> None:
    c, s = await pair.connect()
    c.high_water = 64 * 1024
    async with asyncio.timeout(10):
        # more than the reader's window plus our high-water mark; the reader never reads
        sender = asyncio.create_task(c.send(bytes(16 << 20)))
        await asyncio.sleep(0.3)
        assert not sender.done()
        s.abort("no thanks", error_code=77)
        with pytest.raises(PeerResetError) as info:
            await sender
        assert info.value.error_code == 77


# ---------------------------------------------------------------- handshake


@pytest.mark.parametrize("host", HOSTS)
async def test_connect_to_not_listening_endpoint_fails_fast(host: str) -> None:
    _skip_if_no_v6(host)
    async with (
        await UdpEndpoint.create((host, 0), listen=False) as quiet,
        await UdpEndpoint.create((host, 0)) as client,
    ):
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        with pytest.raises(HandshakeError) as info:
            await client.connect(quiet.local_address[:2], [STREAM], timeout=5)
        assert loop.time() - t0 < 1.0
        assert info.value.error_code == ErrorCode.NOT_LISTENING
        assert info.value.by_peer
        assert "not listening" in str(info.value)
        assert quiet.stats()["drops"]["not_listening"] >= 1


@pytest.mark.parametrize("host", HOSTS)
async def test_connect_to_dead_port_times_out(host: str) -> None:
    _skip_if_no_v6(host)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        probe.bind((host, 0))
        dead = probe.getsockname()[:2]  # nothing listens once it is closed
    cfg = ConnectionConfig(handshake_timeout=0.5)
    async with await UdpEndpoint.create((host, 0), config=cfg) as client:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        with pytest.raises(HandshakeTimeoutError) as info:
            await client.connect(dead, [STREAM])  # ICMP port unreachable is ignored
        assert 0.4 < loop.time() - t0 < 3.0
        assert info.value.error_code == ErrorCode.HANDSHAKE_TIMEOUT
        assert isinstance(info.value, TimeoutError)
        # an explicit timeout works too, and the endpoint stays usable
        with pytest.raises(HandshakeTimeoutError):
            await client.connect(dead, [STREAM], timeout=0.2)
        assert not client.is_closed


async def test_refused_composition() -> None:
    cfg = ConnectionConfig(acceptable=lambda comp: comp["framing"].name == "message")
    async with (
        await UdpEndpoint.create(("127.0.0.1", 0), listen=True, config=cfg) as server,
        await UdpEndpoint.create(("127.0.0.1", 0)) as client,
    ):
        with pytest.raises(HandshakeError) as info:
            await client.connect(server.local_address, [STREAM], timeout=5)
        assert info.value.error_code == ErrorCode.NO_COMMON_COMPOSITION
        assert isinstance(info.value, VtlError)


async def test_counter_offer() -> None:
    cfg = ConnectionConfig(
        acceptable=lambda comp: comp["framing"].name == "message", counter_offers=[MESSAGES]
    )
    async with (
        await UdpEndpoint.create(("127.0.0.1", 0), listen=True, config=cfg) as server,
        await UdpEndpoint.create(("127.0.0.1", 0)) as client,
    ):
        conn = await client.connect(server.local_address, [STREAM], timeout=5)
        peer = await server.accept()
        assert conn.counter_offer and conn.composition == MESSAGES
        await conn.send(b"one message")
        assert await peer.receive_message() == b"one message"
        picky = ConnectionConfig(accept_counter_offer=lambda comp: False)
        with pytest.raises(HandshakeError) as info:
            await client.connect(server.local_address, [STREAM], config=picky, timeout=5)
        assert info.value.error_code == ErrorCode.COUNTER_OFFER_REJECTED


async def test_ipv6_endpoint_talks_to_ipv4_peer() -> None:
    if not _has_ipv6_loopback():
        pytest.skip("no IPv6")
    async with (
        await UdpEndpoint.create(("127.0.0.1", 0), listen=True) as server,
        await UdpEndpoint.create(("::", 0)) as client,  # dual-stack
    ):
        assert client.local_address[0] == "::"
        conn = await client.connect(("127.0.0.1", server.local_address[1]), [STREAM], timeout=5)
        peer = await server.accept()
        data = b"hello\x00v4" + payload(1 << 20, 21)  # big enough for GSO batches
        await conn.send(data)
        conn.close()
        assert await read_all(peer) == data
        assert conn.peer_address[0] == "::ffff:127.0.0.1"
        assert client.stats()["send_errors"] == 0


# ------------------------------------------------------------- robustness


async def test_slow_reader_stays_bounded(pair: Pair) -> None:
    c, s = await pair.connect()
    c.high_water = 1 << 20
    data = payload(16 << 20, 5)
    worst_send = worst_pending = 0

    async def writer() -> None:
        await c.send(data)
        c.close()

    async def slow_reader() -> bytes:
        nonlocal worst_pending
        parts = []
        while chunk := await s.receive(64 * 1024):
            parts.append(chunk)
            worst_pending = max(worst_pending, s.stats()["receive_pending_bytes"])
            await asyncio.sleep(0.001)
        return b"".join(parts)

    async def watch() -> None:
        nonlocal worst_send
        while True:
            worst_send = max(worst_send, c.send_buffer_bytes)
            await asyncio.sleep(0.005)

    async with asyncio.timeout(120):
        watcher = asyncio.create_task(watch())
        _, got = await asyncio.gather(writer(), slow_reader())
        watcher.cancel()
    assert got == data
    window = s.core.flow.window * s.core.config.max_datagram_size
    assert worst_send <= c.high_water + 2 * 1452  # the core counts whole segments
    # the core's window, plus at most one chunk already taken out of it by a short read
    assert 0 < worst_pending <= 2 * window
    assert worst_pending < len(data)


async def test_garbage_datagrams_are_counted_and_ignored(pair: Pair) -> None:
    c, s = await pair.connect()
    data = payload(4 << 20, 11)
    family = socket.AF_INET6 if ":" in pair.server_addr[0] else socket.AF_INET
    rng = random.Random(7)
    garbage = socket.socket(family, socket.SOCK_DGRAM)
    garbage.setblocking(False)

    async def spray() -> int:
        sent = 0
        for i in range(400):
            n = rng.choice([0, 1, 27, 28, 32, 100, 1452, 3000])
            blob = bytearray(rng.randbytes(n))
            if i % 3 == 0 and n >= 12:
                blob[0] = 1  # right version: fails later (length, type or checksum)
            with_cid = i % 5 == 0 and n >= 32
            if with_cid:  # aimed at the live connection's ID: checksum must catch it
                blob[4:12] = s.core.local_cid.to_bytes(8, "big")
            garbage.sendto(bytes(blob), pair.server_addr)
            sent += 1
            if i % 20 == 0:
                await asyncio.sleep(0.001)
        return sent

    async def writer() -> None:
        await c.send(data)
        c.close()

    try:
        async with asyncio.timeout(60):
            _, got, sent = await asyncio.gather(writer(), read_all(s), spray())
    finally:
        garbage.close()
    assert got == data
    await asyncio.sleep(0.05)
    drops = pair.server.stats()["drops"]
    assert sum(drops.values()) >= sent * 0.9, drops  # loopback does not lose them
    assert s.error_code is None or s.error_code == 0


async def test_send_retry_on_eagain_keeps_everything(pair: Pair) -> None:
    """EAGAIN from the socket: the rest waits for writability, nothing is lost."""
    usock = pair.client._sock
    real_send = usock.send
    calls = 0

    def flaky(items, start=0):
        nonlocal calls
        calls += 1
        if calls % 3 == 0:  # the socket buffer fills up halfway through the batch
            # UdpSocket.send's contract: what is before the returned index went
            # out.  So really send the first half: reporting it sent without
            # sending it would be packet loss, not EAGAIN (and a periodic one:
            # it can drop the same retransmission 13 times in a row).
            mid = start + (len(items) - start) // 2
            sent = real_send(items[:mid], start)
            if sent == mid:
                usock.retry_errno = errno.EAGAIN
                usock.counters["send_retries"] += 1
            return sent
        return real_send(items, start)

    usock.send = flaky  # type: ignore[method-assign]
    c, s = await pair.connect()
    data = payload(3 << 20, 12)
    async with asyncio.timeout(30):
        await c.send(data)
        c.close()
        assert await read_all(s) == data
    assert pair.client.stats()["send_retries"] > 0


async def test_endpoint_close_aborts_connections(pair: Pair) -> None:
    c, s = await pair.connect()
    async with asyncio.timeout(10):
        reader = asyncio.create_task(s.receive())
        await asyncio.sleep(0.05)
        pair.client.close()  # abortive: done at once, awaiting is optional
        assert pair.client.is_closed and pair.client.stats()["datagrams_out"] > 0
        with pytest.raises(PeerResetError) as info:
            await reader
        assert info.value.error_code == ErrorCode.ENDPOINT_CLOSING
        with pytest.raises(ConnectionClosedError):
            await c.send(b"x")
        with pytest.raises(ConnectionStateError):
            await pair.client.connect(pair.server_addr, [STREAM])


async def test_graceful_endpoint_close_delivers_data(pair: Pair) -> None:
    c, s = await pair.connect()
    data = payload(1 << 20, 13)
    async with asyncio.timeout(20):
        await c.send(data)
        reader = asyncio.create_task(read_all(s))
        closing = pair.client.close(graceful=True, timeout=10)
        with pytest.raises(ConnectionStateError):  # no new connections while closing
            await pair.client.connect(pair.server_addr, [STREAM])
        assert await reader == data
        s.close()
        await closing
        await pair.client.wait_closed()
    assert c.error_code == 0


async def test_idle_timeout_surfaces_as_error() -> None:
    quick = ConnectionConfig(idle_timeout=0.3)
    async with (
        await UdpEndpoint.create(("127.0.0.1", 0), listen=True, config=quick) as server,
        await UdpEndpoint.create(("127.0.0.1", 0)) as client,
    ):
        conn = await client.connect(server.local_address, [STREAM], timeout=5)
        peer = await server.accept()
        async with asyncio.timeout(5):
            with pytest.raises(ConnectionClosedError) as local:
                await peer.receive()
            assert local.value.error_code == ErrorCode.IDLE_TIMEOUT and not local.value.by_peer
            with pytest.raises(PeerResetError) as remote:  # it told the client
                await conn.receive()
            assert remote.value.error_code == ErrorCode.IDLE_TIMEOUT


async def test_accept_requires_listen() -> None:
    async with await UdpEndpoint.create(("127.0.0.1", 0)) as ep:
        with pytest.raises(ConnectionStateError):
            await ep.accept()


async def test_events_api(pair: Pair) -> None:
    c, s = await pair.connect()
    await c.send(b"abc\x00")
    c.close()
    async with asyncio.timeout(10):
        events = []
        while (ev := await s.next_event()) is not None:
            events.append(ev)
            if isinstance(ev, PeerClosed):
                s.close()
        assert b"".join(e.data for e in events if isinstance(e, DataReceived)) == b"abc\x00"
        assert isinstance(events[-1], ConnectionTerminated) and events[-1].error_code == 0


# ------------------------------------------------------------ batched I/O


@pytest.mark.parametrize("host", HOSTS)
@pytest.mark.parametrize("gso", [True, False], ids=["gso", "no-gso"])
def test_udp_socket_batches_split_exactly(host: str, gso: bool) -> None:
    """GSO batches with a shorter last datagram arrive split at the same
    boundaries (GRO), as do single datagrams."""
    _skip_if_no_v6(host)
    rx = UdpSocket(open_udp_socket((host, 0)))
    tx = UdpSocket(open_udp_socket((host, 0)), gso=gso)
    try:
        dst = rx.local_address
        rng = random.Random(3)
        sizes = [1200] * 10 + [700] + [1200] * 3 + [5] + [1400] * 70 + [1, 0, 9000]
        items = [(rng.randbytes(n), dst) for n in sizes]
        assert tx.send(items) == len(items)
        got: list[tuple[bytes, tuple]] = []
        for _ in range(100):
            rx.receive(1000, got)
            if len(got) >= len(items):
                break
            time.sleep(0.01)
        assert [d for d, _ in got] == [d for d, _ in items]
        assert all(a[1] == tx.local_address[1] for _, a in got)
        if gso and tx.gso:
            assert tx.counters["gso_batches"] >= 2
            assert tx.counters["send_calls"] < len(items)
        assert tx.counters["datagrams_out"] == len(items)
        assert rx.counters["datagrams_in"] == len(items)
    finally:
        rx.close()
        tx.close()


class _FakeSock:
    """A socket whose send calls fail on cue."""

    family = socket.AF_INET

    def __init__(self, errors: dict[int, int]) -> None:
        self.errors = errors  # call number -> errno
        self.calls = 0
        self.sent: list[bytes] = []

    def setsockopt(self, *a) -> None:
        pass

    def getsockopt(self, *a) -> int:
        return 0

    def fileno(self) -> int:
        return -1

    def _maybe_fail(self) -> None:
        self.calls += 1
        code = self.errors.get(self.calls)
        if code is not None:
            raise OSError(code, "injected")

    def sendmsg(self, bufs, anc, flags, addr) -> int:
        self._maybe_fail()
        self.sent.extend(bytes(b) for b in bufs)
        return sum(len(b) for b in bufs)

    def sendto(self, data, addr) -> int:
        self._maybe_fail()
        self.sent.append(bytes(data))
        return len(data)


def test_udp_send_error_handling() -> None:
    addr = ("192.0.2.1", 9)
    items = [(bytes([i]) * 100, addr) for i in range(10)]
    # EAGAIN on the first call: nothing sent, caller keeps everything
    fake = _FakeSock({1: errno.EAGAIN})
    us = UdpSocket(fake)  # type: ignore[arg-type]
    assert us.send(items) == 0 and us.retry_errno == errno.EAGAIN
    assert us.counters["send_retries"] == 1
    assert us.send(items) == 10 and fake.sent == [d for d, _ in items]
    # EIO from GSO: GSO is turned off and the batch goes out one by one
    fake = _FakeSock({1: errno.EIO})
    us = UdpSocket(fake)  # type: ignore[arg-type]
    assert us.gso
    assert us.send(items) == 10
    assert not us.gso and us.counters["gso_disabled"] == 1
    assert fake.sent == [d for d, _ in items]
    # a hard error drops (and counts) only what it concerns
    fake = _FakeSock({2: errno.EMSGSIZE})
    us = UdpSocket(fake, gso=False)  # type: ignore[arg-type]
    assert us.send(items) == 10
    assert us.counters["send_errors"] == 1 and us.counters["send_error_EMSGSIZE"] == 1
    assert len(fake.sent) == 9
