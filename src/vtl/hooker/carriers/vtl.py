"""The VTL-native carrier: one VTL connection per hooked TCP flow.

One :class:`~vtl.io.UdpEndpoint` per Hooker (``listen=True``) serves both
directions, so a host needs a single UDP port and many flows share one socket
and one timer.  The composition is chosen per flow by the caller (policy);
the default is selective-repeat + BBR, which does not read random loss as
congestion (as in ``vtl demo``), with a smaller receive window
(:data:`DEFAULT_COMPOSITION`).

A peer host running no VTL makes the handshake time out.  To fail faster,
the first connect to a peer also sends one empty datagram from a connected
UDP socket: the kernel reports an ICMP port unreachable on a connected socket
as ``ECONNREFUSED``, which we turn into :class:`CarrierUnavailable` at once.
A VTL endpoint drops the empty datagram (counted as malformed).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from typing import Any

from vtl.core.composition import Composition
from vtl.core.config import ConnectionConfig
from vtl.core.errors import ConnectionStateError, VtlError
from vtl.hooker.carriers.base import (
    DEFAULT_CONNECT_TIMEOUT,
    Address,
    Carrier,
    CarrierError,
    CarrierReset,
    CarrierStream,
    CarrierUnavailable,
    StreamHandler,
)
from vtl.io import ConnectionClosedError, HandshakeError, UdpEndpoint, VtlConnection
from vtl.io.udp import family_of

log = logging.getLogger(__name__)

#: selective-repeat + BBR as in ``vtl demo``; the receive window is cut from
#: 4096 to 2048 segments (~2.8 MiB): a Hooker holds one per flow, and
#: hundreds of flows with a slow reader must not add up to gigabytes
DEFAULT_COMPOSITION = "reliability=selective-repeat congestion=bbr flow=window(window=2048)"
DEFAULT_HIGH_WATER = 2 << 20  # unacknowledged bytes per flow before write() waits
#: an idle TCP connection must not die of VTL's idle timeout: keepalives, like TCP
DEFAULT_KEEPALIVE = 10.0


def as_composition(value: Composition | dict | str | None) -> Composition:
    """A Composition from what a policy hands over (None: the default)."""
    if value is None:
        return Composition.parse(DEFAULT_COMPOSITION)
    if isinstance(value, Composition):
        return value
    if isinstance(value, dict):
        return Composition.from_dict(value)
    if isinstance(value, str):
        return Composition.parse(value)
    raise TypeError(f"composition must be a Composition, dict or str, not {type(value).__name__}")


async def icmp_refused(peer: Address, timeout: float) -> bool:
    """True as soon as the kernel reports ``peer`` port unreachable; False
    when nothing is heard within ``timeout`` (someone may be listening)."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(family_of(str(peer[0])), socket.SOCK_DGRAM)
    sock.setblocking(False)
    try:
        try:
            sock.connect(tuple(peer))
            sock.send(b"")
            async with asyncio.timeout(timeout):
                while True:
                    await loop.sock_recv(sock, 1)  # nobody answers an empty datagram
        except ConnectionRefusedError:
            return True
        except (TimeoutError, OSError):
            return False
    finally:
        sock.close()


class VtlStream(CarrierStream):
    """A hooked flow's VTL connection."""

    carrier_name = "vtl"

    def __init__(self, conn: VtlConnection) -> None:
        super().__init__()
        self.conn = conn
        self._eof_sent = False

    @property
    def peer_address(self) -> Address | None:
        return self.conn.peer_address

    @property
    def buffered_bytes(self) -> int:
        st = self.conn.stats()
        return int(self.conn.send_buffer_bytes) + int(st.get("receive_pending_bytes", 0))

    async def read(self, max_bytes: int) -> bytes:
        try:
            data = await self.conn.receive(max_bytes)
        except ConnectionClosedError as exc:
            raise CarrierReset(str(exc)) from exc
        except ConnectionStateError as exc:
            raise CarrierReset(str(exc)) from exc
        self.bytes_received += len(data)
        return data

    async def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._eof_sent:
            raise CarrierError("write after write_eof")
        try:
            await self.conn.send(data)
        except (ConnectionClosedError, ConnectionStateError) as exc:
            raise CarrierReset(str(exc)) from exc
        self.bytes_sent += len(data)

    def write_eof(self) -> None:
        if not self._eof_sent:
            self._eof_sent = True
            with contextlib.suppress(ConnectionStateError):
                self.conn.close()

    def abort(self, reason: str = "aborted") -> None:
        if not self.conn.is_closed:
            self.conn.abort(reason)

    async def aclose(self, timeout: float | None = None) -> None:
        self.write_eof()
        try:
            async with asyncio.timeout(timeout):
                await self.conn.wait_closed()
        except TimeoutError:
            self.abort("close timed out")

    def stats(self) -> dict[str, Any]:
        out = super().stats()
        st = self.conn.stats()
        for key in ("state", "retransmissions", "srtt", "cwnd", "composition"):
            if key in st:
                out[key] = st[key]
        return out


class VtlCarrier(Carrier):
    """Hooked flows over VTL connections behind one UDP endpoint."""

    name = "vtl"

    def __init__(
        self,
        *,
        composition: Composition | dict | str | None = None,
        high_water: int = DEFAULT_HIGH_WATER,
        config: ConnectionConfig | None = None,
        icmp_probe: bool = True,
    ) -> None:
        self.composition = as_composition(composition)
        self.high_water = high_water
        self.config = (
            config if config is not None else ConnectionConfig(keepalive_interval=DEFAULT_KEEPALIVE)
        )
        self.icmp_probe = icmp_probe
        self.endpoint: UdpEndpoint | None = None
        self._handler: StreamHandler | None = None
        self._accept_task: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._streams: set[VtlStream] = set()
        self._reached: set[Address] = set()  # peers that completed a handshake
        self._lock = asyncio.Lock()
        self.counters = {"connects": 0, "unavailable": 0, "icmp_refused": 0, "accepted": 0}

    @property
    def local_address(self) -> Address | None:
        return None if self.endpoint is None else self.endpoint.local_address

    async def _endpoint(self, host: str = "0.0.0.0", port: int = 0) -> UdpEndpoint:
        async with self._lock:
            if self.endpoint is None:
                self.endpoint = await UdpEndpoint.create(
                    (host, port), config=self.config, listen=True, high_water=self.high_water
                )
            return self.endpoint

    async def listen(self, host: str, port: int, handler: StreamHandler) -> Address:
        if self.endpoint is not None:
            raise CarrierError("the VTL carrier already has its endpoint (listen first)")
        ep = await self._endpoint(host, port)
        self._handler = handler
        self._accept_task = asyncio.get_running_loop().create_task(self._accept_loop(ep))
        return ep.local_address

    async def _accept_loop(self, ep: UdpEndpoint) -> None:
        while not ep.is_closed:
            try:
                conn = await ep.accept()
            except (ConnectionStateError, VtlError):
                return
            self.counters["accepted"] += 1
            stream = self._track(VtlStream(conn))
            task = asyncio.get_running_loop().create_task(self._serve(stream))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _serve(self, stream: VtlStream) -> None:
        assert self._handler is not None
        try:
            await self._handler(stream, stream.peer_address)
        except Exception:  # a handler bug must not stop the carrier
            log.exception("VTL carrier: stream handler failed")
            stream.abort("handler failed")

    def _track(self, stream: VtlStream) -> VtlStream:
        self._streams.add(stream)
        # forget it once the connection is over (no strong refs kept forever)
        task = asyncio.get_running_loop().create_task(stream.conn.wait_closed())
        task.add_done_callback(lambda _t: self._streams.discard(stream))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return stream

    async def connect(
        self,
        peer_addr: Address,
        *,
        composition: Composition | dict | str | None = None,
        timeout: float = DEFAULT_CONNECT_TIMEOUT,
    ) -> VtlStream:
        ep = await self._endpoint()
        comp = self.composition if composition is None else as_composition(composition)
        peer = tuple(peer_addr[:2])
        self.counters["connects"] += 1
        handshake = asyncio.ensure_future(ep.connect(peer, [comp], timeout=timeout))
        probe = None
        if self.icmp_probe and peer not in self._reached:
            probe = asyncio.ensure_future(icmp_refused(peer, timeout))
        try:
            waiting = {handshake} if probe is None else {handshake, probe}
            while not handshake.done():
                done, waiting = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
                if probe in done and probe.result():
                    self.counters["icmp_refused"] += 1
                    raise CarrierUnavailable(f"no VTL at {peer[0]} port {peer[1]} (ICMP)")
            conn = handshake.result()
        except HandshakeError as exc:
            self.counters["unavailable"] += 1
            raise CarrierUnavailable(f"VTL handshake with {peer[0]} failed: {exc}") from exc
        except CarrierUnavailable:
            self.counters["unavailable"] += 1
            raise
        finally:
            for fut in (handshake, probe):
                if fut is not None and not fut.done():
                    fut.cancel()
                    with contextlib.suppress(BaseException):
                        await fut
        self._reached.add(peer)
        return self._track(VtlStream(conn))

    async def close(self) -> None:
        if self._accept_task is not None:
            self._accept_task.cancel()
        for task in list(self._tasks):
            task.cancel()
        if self.endpoint is not None:
            await self.endpoint.close()

    def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = {"carrier": self.name, "streams": len(self._streams)}
        out.update(self.counters)
        if self.endpoint is not None:
            out["endpoint"] = self.endpoint.stats()
            out["local_address"] = self.endpoint.local_address
        return out


__all__ = ["DEFAULT_COMPOSITION", "VtlCarrier", "VtlStream", "as_composition", "icmp_refused"]
