"""The service API over real UDP on 127.0.0.1 (asyncio and blocking)."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import ClassVar

import pytest

from vtl.core.composition import Composition
from vtl.core.config import ConnectionConfig
from vtl.core.errors import ConnectionStateError, ErrorCode, SelectionError
from vtl.core.registry import Registry
from vtl.service import (
    Closed,
    EstablishmentError,
    MessageProperties,
    MessagePropertyError,
    Preconnection,
    Ready,
    Received,
    ReceivedPartial,
    Sent,
    TransportProperties,
)
from vtl.service import events as ev
from vtl.service.blocking import connect, listen
from vtl.tfs import register_builtins
from vtl.tfs.framing import Framing

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parents[1]
LOOPBACK = ("127.0.0.1", 0)


async def start_listener(properties: TransportProperties | None = None):
    return await Preconnection(local=LOOPBACK, properties=properties).listen()


async def echo_once(listener) -> None:
    """Accept one connection and echo it (messages or bytes) until EOF."""
    conn = await listener.accept()
    try:
        if conn.messages:
            while (msg := await conn.receive_message()) is not None:
                await conn.send(msg)
        else:
            while data := await conn.receive():
                await conn.send(data)
        conn.close()
        await conn.wait_closed()
    except Exception:
        conn.abort("test server failed")
        raise


# ------------------------------------------------------------- asyncio API


async def test_reliable_stream_echo():
    listener = await start_listener()
    server = asyncio.create_task(echo_once(listener))
    try:
        conn = await Preconnection(remote=listener.local_address).initiate(timeout=5)
        assert conn.composition["reliability"].name == "selective-repeat"
        assert conn.composition["framing"].name == "stream"
        payload = os.urandom(300_000)
        await conn.send(payload)
        conn.close()
        echoed = bytearray()
        while chunk := await conn.receive():
            echoed += chunk
        await conn.wait_closed()
        await asyncio.wait_for(server, 10)
        assert echoed == payload
        assert conn.selection.negotiated is not None
        assert "the peer took our first choice" in conn.selection.explain()
        honoured = conn.properties_honoured()
        assert honoured["reliability"].honoured is True
        assert honoured["preserve_order"].honoured is True
        assert honoured["msg_lifetime"].honoured is False
    finally:
        server.cancel()
        await listener.close()


async def test_message_boundaries_preserved_when_asked():
    props = TransportProperties.reliable_messages()
    listener = await start_listener(props)
    server = asyncio.create_task(echo_once(listener))
    try:
        conn = await Preconnection(remote=listener.local_address, properties=props).initiate(
            timeout=5
        )
        assert conn.composition["framing"].name == "message"
        messages = [b"a", b"bc" * 3, os.urandom(5000), os.urandom(70_000), b"z"]
        for m in messages:
            await conn.send(m)
        got = [await conn.receive_message() for _ in messages]
        assert got == messages  # each arrives whole, never merged or split
        conn.close()
        assert await conn.receive_message() is None
        await conn.wait_closed()
        await asyncio.wait_for(server, 10)
    finally:
        server.cancel()
        await listener.close()


async def test_unreliable_datagram_service_picks_reliability_none():
    props = TransportProperties.unreliable_datagram()
    listener = await start_listener(props)
    try:
        conn = await Preconnection(remote=listener.local_address, properties=props).initiate(
            timeout=5
        )
        peer = await asyncio.wait_for(listener.accept(), 5)
        for c in (conn, peer):
            assert c.composition["reliability"].name == "none"
            assert c.composition["framing"].name == "message"
            assert c.properties_honoured()["reliability"].honoured is True  # Prohibit honoured
        report = await conn.send(b"ping", MessageProperties(reliable=False, lifetime=0.2))
        assert report.honoured == {"reliable": True, "lifetime": False}
        assert await asyncio.wait_for(peer.receive_message(), 5) == b"ping"
        with pytest.raises(MessagePropertyError, match="msg_reliable"):
            await conn.send(b"must arrive", MessageProperties(reliable=True))
        conn.abort("done")
    finally:
        await listener.close()


async def test_listener_requiring_reliability_refuses_prohibiting_initiator():
    listener = await start_listener(TransportProperties())  # Requires reliability
    try:
        pre = Preconnection(
            remote=listener.local_address,
            properties=TransportProperties.unreliable_datagram(),  # Prohibits it
        )
        with pytest.raises(EstablishmentError) as info:
            await pre.initiate(timeout=5)
        err = info.value
        assert err.error_code in (
            ErrorCode.COUNTER_OFFER_REJECTED,
            ErrorCode.NO_COMMON_COMPOSITION,
        )
        text = str(err)
        assert "reliability=Prohibit" in text
        assert "counter-offered" in text and "selective-repeat" in text
        assert err.offers and all(c["reliability"].name == "none" for c in err.offers)
        # nothing was established on the listener's side
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(listener.accept(), 0.3)
    finally:
        await listener.close()


async def test_counter_offer_is_checked_against_the_initiators_properties():
    # the listener proposes only message framing; this initiator prohibits it
    cfg = ConnectionConfig(counter_offers=[Composition.from_dict({"framing": "message"})])
    listener = await Preconnection(
        local=LOOPBACK, properties=TransportProperties.reliable_messages(), config=cfg
    ).listen()
    try:
        pre = Preconnection(
            remote=listener.local_address,
            properties=TransportProperties(preserve_msg_boundaries="prohibit"),
        )
        with pytest.raises(EstablishmentError, match="preserve_msg_boundaries=Prohibit") as info:
            await pre.initiate(timeout=5)
        assert info.value.error_code == ErrorCode.COUNTER_OFFER_REJECTED
    finally:
        await listener.close()


class Sealed(Framing):
    """Encrypted messages (a stand-in for a third-party TF)."""

    NAME = "sealed-message"
    messages = True
    SERVICE_TRAITS: ClassVar[dict] = {"encrypted": True, "messages": True}


async def test_listener_refuses_when_it_has_nothing_the_initiator_can_run():
    # the listener has a third-party encrypting TF and Requires security; the
    # initiator lacks that TF, so there is no offer to take and no counter-offer
    registry = Registry()
    register_builtins(registry)
    registry.unregister("security", "aead")  # only the third-party TF encrypts here
    registry.register(Sealed)
    listener = await Preconnection(
        local=LOOPBACK,
        properties=TransportProperties(security="require"),
        config=ConnectionConfig(registry=registry),
    ).listen()
    try:
        assert listener.selection.top.composition["framing"].name == "sealed-message"
        with pytest.raises(EstablishmentError, match="refused all") as info:
            await Preconnection(remote=listener.local_address).initiate(timeout=5)
        assert info.value.error_code == ErrorCode.NO_COMMON_COMPOSITION
        assert info.value.by_peer
        assert "not acceptable" in str(info.value)
    finally:
        await listener.close()


async def test_initiator_falls_back_to_a_lower_ranked_offer():
    listener = await start_listener(TransportProperties())  # Requires reliability
    try:
        pre = Preconnection(
            remote=listener.local_address,
            properties=TransportProperties(reliability="avoid"),  # prefers none, accepts more
        )
        assert pre.select().top.composition["reliability"].name == "none"
        conn = await pre.initiate(timeout=5)
        assert conn.composition["reliability"].name != "none"
        neg = conn.selection.negotiated
        assert neg is not None and not neg.counter_offer and neg.offered_index > 0
        assert "took our offer #" in conn.selection.explain()
        assert conn.properties_honoured()["reliability"].honoured is False  # Avoid not met
        conn.abort("done")
    finally:
        await listener.close()


async def test_events_use_taps_names():
    props = TransportProperties.reliable_messages()
    listener = await start_listener(props)
    server = asyncio.create_task(echo_once(listener))
    try:
        conn = await Preconnection(remote=listener.local_address, properties=props).initiate(
            timeout=5
        )
        seen: list[ev.ServiceEvent] = []

        async def collect():
            async for event in conn.events():
                seen.append(event)
                if isinstance(event, Received) and event.data == b"two":
                    conn.close()

        collector = asyncio.create_task(collect())
        await asyncio.sleep(0)  # the collector is active: Sent events are generated
        await conn.send(b"one")
        await conn.send(b"two", MessageProperties(priority=5))
        await asyncio.wait_for(collector, 10)
        names = [e.name for e in seen]
        assert names[0] == "Ready" and isinstance(seen[0], Ready)
        assert names[-1] == "Closed" and isinstance(seen[-1], Closed)
        assert [e.data for e in seen if isinstance(e, Received) and not e.final] == [b"one", b"two"]
        assert any(isinstance(e, Received) and e.final for e in seen)  # peer finished
        sent = [e for e in seen if isinstance(e, Sent)]
        assert len(sent) == 2 and sent[1].report.honoured == {"priority": False}
        await asyncio.wait_for(server, 10)
    finally:
        server.cancel()
        await listener.close()


async def test_stream_events_are_received_partial_and_final_message_closes():
    listener = await start_listener()
    try:
        conn = await Preconnection(remote=listener.local_address).initiate(timeout=5)
        peer = await asyncio.wait_for(listener.accept(), 5)
        await conn.send(b"last words", MessageProperties(final=True))  # half-closes
        data = bytearray()
        final = False
        async for event in peer.events():
            if isinstance(event, ReceivedPartial):
                data += event.data
                if event.final:
                    final = True
                    peer.close()
            if isinstance(event, Closed | ev.ConnectionError):
                break
        assert data == b"last words" and final
        await asyncio.wait_for(conn.wait_closed(), 5)
    finally:
        await listener.close()


async def test_selection_error_is_raised_before_any_traffic():
    registry = Registry()
    register_builtins(registry)
    registry.unregister("security", "aead")
    pre = Preconnection(
        remote=("127.0.0.1", 9),
        properties=TransportProperties(security="require"),
        config=ConnectionConfig(registry=registry),
    )
    with pytest.raises(SelectionError, match="security"):
        await pre.initiate(timeout=1)
    # with the TF installed but no key to check the listener with: also before traffic
    pre = Preconnection(remote=("127.0.0.1", 9), properties=TransportProperties(security="require"))
    with pytest.raises(ConnectionStateError, match="trusted_keys"):
        await pre.initiate(timeout=1)


async def test_no_answer_is_an_establishment_error():
    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    silent.bind(LOOPBACK)
    try:
        pre = Preconnection(remote=silent.getsockname())
        t0 = time.monotonic()
        with pytest.raises(EstablishmentError, match="no answer") as info:
            await pre.initiate(timeout=0.5)
        assert info.value.error_code == ErrorCode.HANDSHAKE_TIMEOUT
        assert time.monotonic() - t0 < 3
    finally:
        silent.close()


# ------------------------------------------------------------ blocking API


def test_blocking_round_trip_and_clean_shutdown():
    before = set(threading.enumerate())
    props = TransportProperties.reliable_messages()
    errors: list[BaseException] = []
    t0 = time.monotonic()
    with listen(LOOPBACK, props) as listener:

        def serve():
            try:
                with listener.accept(timeout=5) as conn:
                    while (m := conn.recv_message()) is not None:
                        conn.send_message(m[::-1])
            except BaseException as exc:  # surfaced below
                errors.append(exc)

        server = threading.Thread(target=serve)
        server.start()
        with connect(listener.address, props, timeout=5) as conn:
            assert conn.composition["framing"].name == "message"
            for m in (b"abc", b"x" * 10_000, b""):
                conn.send_message(m)
                assert conn.recv_message() == m[::-1]
            conn.settimeout(0.2)
            with pytest.raises(TimeoutError):
                conn.recv_message()  # nothing comes: times out, connection still usable
            conn.settimeout(5)
            conn.sendall(b"still works")
            assert conn.recv(100) == b"skrow llits"
        server.join(5)
        assert not server.is_alive()
    assert not errors
    assert time.monotonic() - t0 < 10
    time.sleep(0.1)
    leftover = [t for t in set(threading.enumerate()) - before if t.name == "vtl-service-loop"]
    assert not leftover
    # closing twice is harmless, using a closed connection is an error
    conn.close()
    with pytest.raises(Exception, match="closed"):
        conn.sendall(b"x")


def test_blocking_close_does_not_hang_when_the_peer_never_closes():
    with listen(LOOPBACK) as listener:
        conn = connect(listener.address, timeout=5, linger=0.5)
        peer = listener.accept(timeout=5)  # accepted, never closed by its owner
        conn.sendall(b"hello")
        assert peer.recv(5) == b"hello"
        t0 = time.monotonic()
        conn.close()
        assert time.monotonic() - t0 < 3
        peer.abort()


def test_blocking_refusal_raises_establishment_error():
    with (
        listen(LOOPBACK, TransportProperties()) as listener,
        pytest.raises(EstablishmentError, match="reliability=Prohibit"),
    ):
        connect(listener.address, TransportProperties.unreliable_datagram(), timeout=5)


# ---------------------------------------------------------------- examples


@pytest.mark.parametrize(
    "script", ["reliable_echo.py", "blocking_client.py", "choose_composition.py"]
)
def test_example_runs(script):
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / script)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip()


async def test_message_lifetime_honoured_with_partial_reliability():
    """per_msg_reliability=Prefer selects reliability=partial; msgLifetime is
    then honoured and the messages arrive (nothing is lost on loopback)."""
    props = TransportProperties.reliable_messages().with_(per_msg_reliability="prefer")
    listener = await start_listener(props)
    server = asyncio.create_task(echo_once(listener))
    try:
        conn = await Preconnection(remote=listener.local_address, properties=props).initiate(
            timeout=5
        )
        assert conn.composition["reliability"].name == "partial"
        report = await conn.send(b"fresh", MessageProperties(lifetime=5.0))
        assert report.honoured == {"lifetime": True}
        assert await conn.receive_message() == b"fresh"
        assert conn.properties_honoured()["msg_lifetime"].honoured is True
        assert conn.properties_honoured()["per_msg_reliability"].honoured is True
        conn.close()
        assert await conn.receive_message() is None
        await conn.wait_closed()
        await asyncio.wait_for(server, 10)
    finally:
        server.cancel()
        await listener.close()
