"""The Hooker's flow engine end to end with real TCP sockets, for both
carriers: what an unmodified client and server see must be exactly TCP
(byte-exact data with NULs, EOF after the last byte, half-close, resets both
ways), memory stays bounded with a slow reader, a peer without a carrier
costs one probe and falls back to plain TCP, bad flow headers are counted
drops, and many flows run at once.  On loopback (two Hookers in one loop);
tests/test_hooker_carriers.py adds the namespaces and the lossy link."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import random
import socket
import time
from typing import Any

import pytest

from hooker_helpers import Rig, payload, recv_all, rst_close, run, tcp_connect, unused_udp_port
from vtl.hooker import (
    CarrierReset,
    FlowHeader,
    FlowHeaderError,
    FlowStatus,
    PeerCache,
    PeerState,
    get_carrier,
)
from vtl.hooker.flowheader import HEADER_PREFIX_LEN, REPLY_LEN, decode_reply, encode_reply

CARRIERS = ["vtl", "quic"]


async def echo(conn: socket.socket) -> None:
    loop = asyncio.get_running_loop()
    while data := await loop.sock_recv(conn, 1 << 16):
        await loop.sock_sendall(conn, data)
    conn.shutdown(socket.SHUT_WR)


@pytest.mark.parametrize("carrier", CARRIERS)
def test_byte_exact_both_directions_with_nul_bytes(carrier: str) -> None:
    up = payload(3 << 20, 1)
    extra = payload(1 << 20, 2)

    async def server(conn: socket.socket) -> None:
        # full duplex: its own data goes out while the client's comes in
        loop = asyncio.get_running_loop()
        send = asyncio.ensure_future(loop.sock_sendall(conn, extra))
        got = await recv_all(conn)
        await send
        await loop.sock_sendall(conn, hashlib.sha256(got).digest())
        conn.shutdown(socket.SHUT_WR)

    async def main() -> None:
        async with Rig(carrier, server) as rig:
            loop = asyncio.get_running_loop()
            sock = await rig.connect()
            reader = asyncio.ensure_future(recv_all(sock))
            await loop.sock_sendall(sock, up)
            sock.shutdown(socket.SHUT_WR)
            got = await reader
            sock.close()
            assert got[: len(extra)] == extra
            assert got[len(extra) :] == hashlib.sha256(up).digest()
            await rig.idle()
            assert rig.server_errors == []
            sa, sb = rig.engine_a.stats(), rig.engine_b.stats()
            assert sa["flows_clean"] == sb["flows_clean"] == 1
            assert sa["bytes_to_peer_carrier"] == sb["bytes_to_app_carrier"] == len(up)
            assert sb["bytes_to_peer_carrier"] == sa["bytes_to_app_carrier"] == len(got)
            assert "fallbacks" not in sa

    run(main())


@pytest.mark.parametrize("carrier", CARRIERS)
def test_send_then_close_immediately_delivers_every_byte(carrier: str) -> None:
    """Both ways: the sender closes right after its last send(); the other
    side must read every byte before EOF."""
    down = payload(2 << 20, 3)
    up = payload(2 << 20, 4)
    received: list[bytes] = []

    async def server(conn: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        first = await loop.sock_recv(conn, 1)
        if first == b"S":  # "send to me": the server sends and closes at once
            await loop.sock_sendall(conn, down)
            conn.close()
        else:
            received.append(first + await recv_all(conn))

    async def main() -> None:
        async with Rig(carrier, server) as rig:
            loop = asyncio.get_running_loop()
            sock = await rig.connect()
            await loop.sock_sendall(sock, b"S")
            assert await recv_all(sock) == down
            sock.close()
            sock = await rig.connect()
            await loop.sock_sendall(sock, up)
            sock.close()
            for _ in range(200):
                if received:
                    break
                await asyncio.sleep(0.05)
            assert received == [up]

    run(main())


@pytest.mark.parametrize("carrier", CARRIERS)
def test_half_close_then_read_the_reply(carrier: str) -> None:
    request = payload(100_000, 5)

    async def server(conn: socket.socket) -> None:
        got = await recv_all(conn)  # EOF only after the last request byte
        loop = asyncio.get_running_loop()
        await asyncio.sleep(0.3)  # the reply comes well after the client's FIN
        await loop.sock_sendall(conn, b"reply:" + hashlib.sha256(got).digest())
        conn.shutdown(socket.SHUT_WR)

    async def main() -> None:
        async with Rig(carrier, server) as rig:
            loop = asyncio.get_running_loop()
            sock = await rig.connect()
            await loop.sock_sendall(sock, request)
            sock.shutdown(socket.SHUT_WR)
            assert await recv_all(sock) == b"reply:" + hashlib.sha256(request).digest()
            sock.close()

    run(main())


@pytest.mark.parametrize("carrier", CARRIERS)
@pytest.mark.parametrize("who", ["client", "server"])
def test_reset_reaches_the_other_side_as_a_reset(carrier: str, who: str) -> None:
    outcome: list[str] = []

    async def server(conn: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        assert await loop.sock_recv(conn, 5) == b"hello"
        if who == "server":
            await loop.sock_sendall(conn, b"bye")
            await asyncio.sleep(0.2)
            rst_close(conn)
            return
        try:
            while await loop.sock_recv(conn, 1 << 16):
                pass
            outcome.append("eof")
        except ConnectionResetError:
            outcome.append("reset")

    async def main() -> None:
        async with Rig(carrier, server) as rig:
            loop = asyncio.get_running_loop()
            sock = await rig.connect()
            await loop.sock_sendall(sock, b"hello")
            if who == "client":
                await asyncio.sleep(0.3)
                rst_close(sock)
                for _ in range(100):
                    if outcome:
                        break
                    await asyncio.sleep(0.05)
                assert outcome == ["reset"]
            else:
                got = bytearray()
                with pytest.raises(ConnectionResetError):
                    while data := await loop.sock_recv(sock, 1 << 16):
                        got += data
                    raise AssertionError(f"clean EOF after {bytes(got)!r}, expected a reset")
                sock.close()
            await rig.idle()
            resets = sum(
                e.stats().get(k, 0)
                for e in (rig.engine_a, rig.engine_b)
                for k in ("resets_by_app", "resets_by_carrier")
            )
            assert resets == 2  # one Hooker saw it from its app, the other from the carrier

    run(main())


@pytest.mark.parametrize("carrier", CARRIERS)
def test_refused_server_is_a_reset_for_the_client(carrier: str) -> None:
    async def main() -> None:
        async with Rig(carrier, None) as rig:
            await rig.stop_server()
            loop = asyncio.get_running_loop()
            sock = await rig.connect()
            with pytest.raises(ConnectionResetError):
                if not await loop.sock_recv(sock, 10):
                    raise AssertionError("clean EOF instead of a reset")
            sock.close()
            assert rig.engine_b.stats()["refused_refused"] == 1

    run(main())


@pytest.mark.parametrize("carrier", CARRIERS)
def test_slow_reader_slows_the_sender_and_memory_stays_bounded(carrier: str) -> None:
    """The server does not read until the client's send() has stalled; the
    Hookers' carrier buffers stay under their bounds meanwhile and every
    byte arrives once the server reads."""
    total = 48 << 20
    data = payload(total, 6)
    gate = asyncio.Event
    got: list[bytes] = []

    async def main() -> None:
        go = gate()

        async def server(conn: socket.socket) -> None:
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 10)
            await go.wait()
            got.append(await recv_all(conn))

        opts = {"high_water": 1 << 20}
        if carrier == "quic":
            opts["window"] = 1 << 20
        async with Rig(carrier, server, carrier_options=opts) as rig:
            loop = asyncio.get_running_loop()
            sock = await rig.connect()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 << 10)
            sent = 0

            async def sender() -> None:
                nonlocal sent
                view = memoryview(data)
                for pos in range(0, total, 64 << 10):
                    await loop.sock_sendall(sock, view[pos : pos + (64 << 10)])
                    sent = pos + len(view[pos : pos + (64 << 10)])
                sock.shutdown(socket.SHUT_WR)

            task = asyncio.ensure_future(sender())
            peak = 0
            last, still_since = -1, time.monotonic()
            while time.monotonic() - still_since < 1.5:  # until the sender stalls
                await asyncio.sleep(0.05)
                peak = max(peak, rig.buffered())
                if sent != last:
                    last, still_since = sent, time.monotonic()
                assert not task.done(), "the sender was never slowed down"
            stalled_at = sent
            go.set()
            await task
            for _ in range(1200):
                if got:
                    break
                peak = max(peak, rig.buffered())
                await asyncio.sleep(0.05)
            sock.close()
            print(f"{carrier}: sender stalled at {stalled_at >> 10} KiB, "
                  f"peak Hooker buffers {peak >> 10} KiB")  # fmt: skip
            assert got and got[0] == data
            # every byte sent during the stall sits in socket buffers or carriers
            assert stalled_at < 24 << 20
            # per Hooker: send buffer (high water) + receive window (VTL: 2048
            # segments of at most 1452 bytes; QUIC: 1 MiB) + a chunk in flight
            bound = 2 * ((1 << 20) + 2048 * 1452 + (256 << 10))
            assert peak < bound

    run(main(), timeout=150)


def test_peer_without_a_carrier_falls_back_once_per_peer() -> None:
    """ICMP port unreachable: the first flow learns it at once; plain TCP
    carries the data; later flows do not try the carrier again."""
    data = payload(500_000, 7)

    async def main() -> None:
        async with Rig("vtl", echo, peer_port=unused_udp_port(), probe_timeout=1.0) as rig:
            loop = asyncio.get_running_loop()
            for i in range(3):
                t0 = time.monotonic()
                sock = await rig.connect()
                reader = asyncio.ensure_future(recv_all(sock))
                await loop.sock_sendall(sock, data)
                sock.shutdown(socket.SHUT_WR)
                assert await reader == data
                sock.close()
                took = time.monotonic() - t0
                assert took < 0.8, f"flow {i} took {took:.2f} s"
            await rig.idle()
            st = rig.engine_a.stats()
            assert st["fallbacks"] == 3
            assert st["bytes_to_peer_fallback"] == 3 * len(data)
            assert rig.carrier_a.stats()["connects"] == 1
            assert rig.carrier_a.stats()["icmp_refused"] == 1
            assert st["peers"]["127.0.0.1"]["state"] == "incapable"

    run(main())


@pytest.mark.parametrize("carrier", CARRIERS)
def test_silent_peer_costs_one_timeout_for_concurrent_flows(carrier: str) -> None:
    """A peer that swallows datagrams: the probe times out once, the flows
    started meanwhile wait for it, and all go plain TCP."""
    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    silent.bind(("127.0.0.1", 0))  # bound, never read: no ICMP, no answer
    data = payload(50_000, 8)

    async def main() -> None:
        async with Rig(carrier, echo, peer_port=silent.getsockname()[1], probe_timeout=0.5) as rig:
            loop = asyncio.get_running_loop()

            async def flow() -> bytes:
                sock = await rig.connect()
                reader = asyncio.ensure_future(recv_all(sock))
                await loop.sock_sendall(sock, data)
                sock.shutdown(socket.SHUT_WR)
                try:
                    return await reader
                finally:
                    sock.close()

            t0 = time.monotonic()
            results = await asyncio.gather(*[flow() for _ in range(8)])
            took = time.monotonic() - t0
            assert results == [data] * 8
            assert 0.4 < took < 1.5, took  # one probe timeout, not eight
            assert rig.carrier_a.stats()["connects"] == 1
            t0 = time.monotonic()
            assert await flow() == data
            assert time.monotonic() - t0 < 0.3  # known incapable: no wait at all
            await rig.idle()
            assert rig.engine_a.stats()["fallbacks"] == 9

    try:
        run(main())
    finally:
        silent.close()


@pytest.mark.parametrize("carrier", CARRIERS)
def test_malformed_flow_header_is_a_counted_drop(carrier: str) -> None:
    async def main() -> None:
        async with Rig(carrier, echo) as rig:
            port = rig.carrier_b.local_address[1]
            probe = get_carrier(carrier)
            try:
                for junk in (b"GET / HTTP/1.1\r\n\r\n", b"VTLH\x01\x05" + bytes(30)):
                    stream = await probe.connect(("127.0.0.1", port), timeout=3.0)
                    await stream.write(junk)
                    with pytest.raises(CarrierReset):
                        while await stream.read(100):
                            pass
                # a header to a server address that is not local: refused by policy
                stream = await probe.connect(("127.0.0.1", port), timeout=3.0)
                await stream.write(FlowHeader(("10.9.9.9", 1234), ("192.0.2.1", 80)).encode())
                assert await stream.read(100) == b"VTLR\x01\x03"
            finally:
                await probe.close()
            st = rig.engine_b.stats()
            assert st["header_errors"] == 2
            assert st["refused_policy"] == 1
            # the engine keeps serving
            sock = await rig.connect()
            loop = asyncio.get_running_loop()
            await loop.sock_sendall(sock, b"still alive\0")
            sock.shutdown(socket.SHUT_WR)
            assert await recv_all(sock) == b"still alive\0"
            sock.close()

    run(main())


@pytest.mark.parametrize(("carrier", "flows"), [("vtl", 200), ("quic", 40)])
def test_many_concurrent_flows_byte_exact(carrier: str, flows: int) -> None:
    async def main() -> None:
        async with Rig(carrier, echo, connect_timeout=20.0, probe_timeout=5.0) as rig:
            loop = asyncio.get_running_loop()

            async def flow(i: int) -> bool:
                data = payload(64 << 10, 100 + i)
                sock = await tcp_connect(rig.hook_addr)
                reader = asyncio.ensure_future(recv_all(sock))
                await loop.sock_sendall(sock, data)
                sock.shutdown(socket.SHUT_WR)
                ok = await reader == data
                sock.close()
                return ok

            t0 = time.monotonic()
            # open them all at once
            results = await asyncio.gather(*[flow(i) for i in range(flows)])
            print(f"{carrier}: {flows} flows in {time.monotonic() - t0:.1f} s")
            assert all(results)
            await rig.idle()
            st = rig.engine_a.stats()
            assert st["flows_clean"] == flows, (st, rig.engine_b.stats())
            assert "fallbacks" not in st
            assert rig.engine_b.stats()["flows_in"] == flows
            # the carriers forget finished flows (nothing kept per flow forever)
            key = "streams" if carrier == "vtl" else "connections"
            for _ in range(100):
                if rig.carrier_a.stats()[key] == rig.carrier_b.stats()[key] == 0:
                    break
                await asyncio.sleep(0.05)
            assert rig.carrier_a.stats()[key] == rig.carrier_b.stats()[key] == 0

    run(main(), timeout=90)


# ------------------------------------------------------------ flow header


@pytest.mark.parametrize(
    ("client", "server"),
    [(("10.0.0.1", 40000), ("10.0.0.2", 80)), (("fd00::1", 1), ("fd00::2", 65535))],
)
def test_flow_header_round_trip(client: tuple[str, int], server: tuple[str, int]) -> None:
    wire = FlowHeader(client, server).encode()
    assert FlowHeader.total_length(wire[:HEADER_PREFIX_LEN]) == len(wire)
    assert FlowHeader.decode(wire) == FlowHeader(client, server)
    for status in FlowStatus:
        assert decode_reply(encode_reply(status)) is status


@pytest.mark.parametrize(
    ("client", "server"),
    [
        (("10.0.0.1", 1), ("fd00::2", 80)),  # mixed families
        (("10.0.0.1", 0), ("10.0.0.2", 80)),  # port 0
        (("10.0.0.1", 1), ("10.0.0.2", 70000)),
        (("not-an-ip", 1), ("10.0.0.2", 80)),
        (("10.0.0.1", 1), ("10.0.0.2", "80")),
    ],
)
def test_flow_header_refuses_bad_addresses(client: Any, server: Any) -> None:
    with pytest.raises(FlowHeaderError):
        FlowHeader(client, server).encode()


def test_flow_header_decoding_is_strict_and_never_crashes() -> None:
    good = FlowHeader(("10.0.0.1", 1234), ("10.0.0.2", 80)).encode()
    bad = [
        b"",
        good[:-1],
        good + b"x",
        b"XXXX" + good[4:],
        good[:4] + b"\x02" + good[5:],  # version
        good[:5] + b"\x05" + good[6:],  # family
        good[:6] + b"\x00\x01" + good[8:],  # flags
        good[:8] + b"\x00\x00" + good[10:],  # client port 0
        good[:-4] + bytes(4),  # server 0.0.0.0
    ]
    for data in bad:
        with pytest.raises(FlowHeaderError):
            FlowHeader.decode(data)
    rng = random.Random(9)
    for _ in range(3000):  # random input: FlowHeaderError or a valid header, nothing else
        data = rng.randbytes(rng.randrange(0, 50))
        if rng.random() < 0.5:
            data = good[: rng.randrange(len(good))] + data
        with contextlib.suppress(FlowHeaderError):
            FlowHeader.decode(data)
        with contextlib.suppress(FlowHeaderError):
            decode_reply(data[:REPLY_LEN])
    for data in (b"VTLR\x01\x09", b"VTLR\x02\x00", b"VTLX\x01\x00", b"VTLR\x01"):
        with pytest.raises(FlowHeaderError):
            decode_reply(data)


# -------------------------------------------------------------- peer cache


def test_peer_cache_ttl_and_callbacks() -> None:
    now = [100.0]
    cache = PeerCache(incapable_ttl=60.0, clock=lambda: now[0])
    changes: list[tuple[Any, str, str]] = []
    cache.on_change(lambda p, old, new: changes.append((p, old.value, new.value)))

    async def main() -> None:
        assert await cache.classify("10.0.0.2") is PeerState.UNKNOWN  # we probe
        cache.record("10.0.0.2", False, "icmp")
        assert await cache.classify("10.0.0.2") is PeerState.INCAPABLE
        now[0] += 59
        assert cache.state("10.0.0.2") is PeerState.INCAPABLE
        now[0] += 2  # the TTL is over: probe again
        assert await cache.classify("10.0.0.2") is PeerState.UNKNOWN
        cache.record("10.0.0.2", True)
        now[0] += 1e6
        assert cache.state("10.0.0.2") is PeerState.CAPABLE  # no TTL by default

    run(main())
    assert changes == [
        ("10.0.0.2", "unknown", "incapable"),
        ("10.0.0.2", "incapable", "unknown"),
        ("10.0.0.2", "unknown", "capable"),
    ]


def test_peer_cache_runs_one_probe_per_peer() -> None:
    cache = PeerCache()

    async def main() -> None:
        assert await cache.classify("p") is PeerState.UNKNOWN
        waiters = [asyncio.ensure_future(cache.classify("p")) for _ in range(5)]
        other = await cache.classify("q")  # another peer is not held up
        assert other is PeerState.UNKNOWN
        await asyncio.sleep(0.01)
        assert not any(w.done() for w in waiters)
        cache.record("p", False)
        assert await asyncio.gather(*waiters) == [PeerState.INCAPABLE] * 5
        # an abandoned probe hands the job to exactly one waiter
        first = asyncio.ensure_future(cache.classify("q"))
        second = asyncio.ensure_future(cache.classify("q"))
        await asyncio.sleep(0.01)
        cache.abandon("q")
        results = await asyncio.gather(first, second, return_exceptions=True)
        assert results.count(PeerState.UNKNOWN) == 1
        assert cache.counters["probes"] == 3

    async def bounded() -> None:
        async with asyncio.timeout(1):
            pending = asyncio.ensure_future(main())
            await asyncio.sleep(0.05)
            if not pending.done():  # the second "q" waiter now owns the probe
                cache.record("q", True)
            await pending

    run(bounded())
