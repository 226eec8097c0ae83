"""The QUIC carrier (aioquic): one QUIC connection with one bidirectional
stream per hooked TCP flow.

It exists to prove that the carrier interface is not VTL-shaped.  Mapping:
stream FIN = ``write_eof``; ``abort`` closes the connection with an
application error, which the peer reads as :class:`CarrierReset` (as it reads
RESET_STREAM, idle timeout or any other loss of the connection).

Bounded memory both ways:

* sending waits while the stream holds more than ``high_water`` bytes that
  the peer has not acknowledged;
* aioquic grows a stream's receive window as data *arrives* (it doubles it
  whenever half is used), so a slow reader would make it buffer without
  bound.  :class:`_ReaderPacedQuic` overrides that one method so that the
  window only advances as the application *reads*: the peer may have at most
  ``window`` bytes outstanding beyond what was read.

The client uses a connected UDP socket per flow, so an ICMP port unreachable
from a host without a Hooker fails the connect at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import socket
import ssl
from typing import Any

from aioquic.asyncio import QuicConnectionProtocol, serve
from aioquic.asyncio.server import QuicServer
from aioquic.quic import events
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import MAX_STREAM_DATA_FRAME_CAPACITY, QuicConnection
from aioquic.quic.packet import QuicFrameType

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

log = logging.getLogger(__name__)

ALPN = "vtl-hooker"
DEFAULT_WINDOW = 1 << 20  # receive window per flow (bytes beyond what was read)
DEFAULT_HIGH_WATER = 2 << 20  # unacknowledged bytes per flow before write() waits
DEFAULT_IDLE_TIMEOUT = 60.0  # s; keepalive PINGs keep an idle TCP flow alive
ABORT_CODE = 0x1  # application error code of an abort (the TCP flow was reset)
MAX_DATAGRAM = 1452  # like VTL's default, so both fill the same IP packets
CLOSE_GRACE = 2.0  # s the connecting side waits for the peer to close first
SOCKET_BUFFER = 4 << 20  # UDP SO_RCVBUF/SO_SNDBUF: one server socket serves every flow


def _big_buffers(sock: Any) -> None:
    """Bursts of many flows must not overflow the default UDP buffers."""
    if sock is None:
        return
    for force, opt in ((33, socket.SO_RCVBUF), (32, socket.SO_SNDBUF)):  # SO_*BUFFORCE
        try:
            sock.setsockopt(socket.SOL_SOCKET, force, SOCKET_BUFFER)
        except OSError:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, opt, SOCKET_BUFFER)


class _ReaderPacedQuic(QuicConnection):
    """QuicConnection whose stream windows follow what the application read."""

    _vtl_window: int = DEFAULT_WINDOW
    _vtl_consumed: dict[int, int]

    def _write_stream_limits(self, builder: Any, space: Any, stream: Any) -> None:
        consumed = self._vtl_consumed.get(stream.stream_id, 0)
        target = consumed + self._vtl_window
        if stream.max_stream_data_local and target >= stream.max_stream_data_local + (
            self._vtl_window >> 2
        ):
            stream.max_stream_data_local = target
        if stream.max_stream_data_local_sent != stream.max_stream_data_local:
            buf = builder.start_frame(
                QuicFrameType.MAX_STREAM_DATA,
                capacity=MAX_STREAM_DATA_FRAME_CAPACITY,
                handler=self._on_max_stream_data_delivery,
                handler_args=(stream,),
            )
            buf.push_uint_var(stream.stream_id)
            buf.push_uint_var(stream.max_stream_data_local)
            stream.max_stream_data_local_sent = stream.max_stream_data_local


class _Protocol(QuicConnectionProtocol):
    """One QUIC connection carrying one hooked flow."""

    def __init__(
        self,
        quic: QuicConnection,
        stream_handler: Any = None,
        *,
        carrier: QuicCarrier,
        inbound: bool,
    ) -> None:
        super().__init__(quic)
        quic.__class__ = _ReaderPacedQuic
        quic._vtl_window = carrier.window  # type: ignore[attr-defined]
        quic._vtl_consumed = {}  # type: ignore[attr-defined]
        self.carrier = carrier
        self.inbound = inbound
        self.stream: QuicStream | None = None
        self.ready: asyncio.Future[None] = self._loop.create_future()
        # a late failure after connect() gave up must not be reported as unretrieved
        self.ready.add_done_callback(lambda f: f.cancelled() or f.exception())
        self.terminated: events.ConnectionTerminated | None = None
        self._keepalive: asyncio.TimerHandle | None = None
        self.ignored_streams = 0

    @property
    def peer(self) -> Address | None:
        with contextlib.suppress(AttributeError, IndexError):
            return self._quic._network_paths[0].addr
        return None

    def error_received(self, exc: Exception) -> None:
        """ICMP errors on the client's connected socket."""
        if not self.ready.done():
            self.ready.set_exception(CarrierUnavailable(f"no QUIC carrier at {self.peer}: {exc}"))

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.ready.done():
            self.ready.set_exception(CarrierUnavailable(f"socket closed: {exc}"))

    def datagram_received(self, data: bytes | str, addr: Any) -> None:
        super().datagram_received(data, addr)
        self._wake()

    def _handle_timer(self) -> None:
        super()._handle_timer()
        self._wake()

    def _wake(self) -> None:
        if self.stream is not None:
            self.stream._wake()

    def quic_event_received(self, event: events.QuicEvent) -> None:
        if isinstance(event, events.HandshakeCompleted):
            if not self.ready.done():
                self.ready.set_result(None)
            self._arm_keepalive()
        elif isinstance(event, events.StreamDataReceived):
            stream = self.stream
            if stream is None and self.inbound and event.stream_id % 4 == 0:
                stream = self.stream = QuicStream(self, event.stream_id)
                self.carrier._spawn(stream)
            if stream is None or event.stream_id != stream.stream_id:
                self.ignored_streams += 1  # one flow per connection
                with contextlib.suppress(Exception):
                    self._quic.stop_stream(event.stream_id, ABORT_CODE)
                return
            stream._feed(event.data, event.end_stream)
        elif isinstance(event, events.StreamReset):
            if self.stream is not None and event.stream_id == self.stream.stream_id:
                self.stream._fail(f"stream reset by peer (code {event.error_code})")
        elif isinstance(event, events.ConnectionTerminated):
            self.terminated = event
            if self._keepalive is not None:
                self._keepalive.cancel()
            if not self.ready.done():
                self.ready.set_exception(
                    CarrierUnavailable(f"QUIC handshake failed: {event.reason_phrase or event}")
                )
            if self.stream is not None:
                self.stream._on_terminated(event)
            else:  # a connection that never carried a flow: nothing will release it
                self.carrier._release(self)

    def _arm_keepalive(self) -> None:
        interval = self.carrier.idle_timeout / 3
        if interval > 0:
            self._keepalive = self._loop.call_later(interval, self._ping)

    def _ping(self) -> None:
        if self.terminated is None:
            self._quic.send_ping(0)
            self.transmit()
            self._arm_keepalive()


class QuicStream(CarrierStream):
    """The one bidirectional stream of a flow's QUIC connection."""

    carrier_name = "quic"

    def __init__(self, proto: _Protocol, stream_id: int) -> None:
        super().__init__()
        self.proto = proto
        self.stream_id = stream_id
        self._buf = bytearray()
        self._fin = False
        self._error: str | None = None
        self._eof_sent = False
        self._waiters: set[asyncio.Future[None]] = set()  # a reader and a writer
        self._granted = 0  # consumed bytes when we last asked for a window update

    # --------------------------------------------------------- plumbing

    @property
    def _quic(self) -> QuicConnection:
        return self.proto._quic

    @property
    def peer_address(self) -> Address | None:
        return self.proto.peer

    def _unacked(self) -> int:
        s = self._quic._streams.get(self.stream_id)
        return 0 if s is None else len(s.sender._buffer)

    def _send_done(self) -> bool:
        s = self._quic._streams.get(self.stream_id)
        return s is None or s.sender.is_finished

    @property
    def buffered_bytes(self) -> int:
        return self._unacked() + len(self._buf)

    def _feed(self, data: bytes, fin: bool) -> None:
        self._buf += data
        self._fin = self._fin or fin
        self._wake()

    def _fail(self, reason: str) -> None:
        if self._error is None:
            self._error = reason
        self._wake()

    def _on_terminated(self, event: events.ConnectionTerminated) -> None:
        if event.error_code or not self._fin:
            reason = event.reason_phrase or f"connection closed (code {event.error_code})"
            self._fail(reason)
        self._wake()

    def _wake(self) -> None:
        for fut in self._waiters:
            if not fut.done():
                fut.set_result(None)

    async def _wait(self) -> None:
        fut = self.proto._loop.create_future()
        self._waiters.add(fut)
        try:
            await fut
        finally:
            self._waiters.discard(fut)

    def _check(self) -> None:
        if self._error is not None:
            raise CarrierReset(self._error)
        if self.proto.terminated is not None:
            raise CarrierReset("QUIC connection closed")

    # -------------------------------------------------------- interface

    async def read(self, max_bytes: int) -> bytes:
        while not self._buf:
            if self._error is not None:
                raise CarrierReset(self._error)
            if self._fin:
                return b""
            if self.proto.terminated is not None:
                raise CarrierReset("QUIC connection closed")
            await self._wait()
        out = bytes(self._buf[:max_bytes])
        del self._buf[: len(out)]
        self.bytes_received += len(out)
        consumed = self._quic._vtl_consumed  # type: ignore[attr-defined]
        consumed[self.stream_id] = self.bytes_received
        if self.bytes_received - self._granted >= self.proto.carrier.window >> 2:
            self._granted = self.bytes_received
            self.proto._transmit_soon()  # the window update goes out
        return out

    async def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._eof_sent:
            raise CarrierError("write after write_eof")
        high = self.proto.carrier.high_water
        view = memoryview(data).cast("B")
        step = max(1, high // 2)
        for pos in range(0, len(view), step):
            piece = bytes(view[pos : pos + step])
            while True:
                self._check()
                unacked = self._unacked()
                if unacked == 0 or unacked + len(piece) <= high:
                    break
                await self._wait()
            try:
                self._quic.send_stream_data(self.stream_id, piece)
            except Exception as exc:  # stream already reset / finished
                raise CarrierReset(f"QUIC stream unusable: {exc}") from exc
            self.bytes_sent += len(piece)
            self.proto._transmit_soon()

    def write_eof(self) -> None:
        if self._eof_sent or self.proto.terminated is not None:
            return
        self._eof_sent = True
        with contextlib.suppress(Exception):
            self._quic.send_stream_data(self.stream_id, b"", end_stream=True)
        self.proto._transmit_soon()

    def abort(self, reason: str = "aborted") -> None:
        self._fail(f"aborted locally: {reason}")
        if self.proto.terminated is None:
            self.proto.close(error_code=ABORT_CODE, reason_phrase=reason[:100])
        self.proto.carrier._release(self.proto)

    async def aclose(self, timeout: float | None = None) -> None:
        self.write_eof()
        try:
            async with asyncio.timeout(timeout):
                while not self._send_done() and self.proto.terminated is None:
                    await self._wait()
        except TimeoutError:
            self.abort("close timed out")
            return
        if not self.proto.inbound:
            # the peer closes once it has our acknowledgement of its last
            # bytes; closing first would leave it waiting for an idle timeout
            # if that acknowledgement (and our CONNECTION_CLOSE) were lost
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(CLOSE_GRACE):
                    while self.proto.terminated is None:
                        await self._wait()
        if self.proto.terminated is None:
            self.proto.close()
        self.proto.carrier._release(self.proto)

    def stats(self) -> dict[str, Any]:
        out = super().stats()
        out["stream_id"] = self.stream_id
        with contextlib.suppress(Exception):
            rtt = self._quic._loss._rtt_smoothed
            out["srtt"] = rtt
        return out


class QuicCarrier(Carrier):
    """Hooked flows over QUIC (aioquic), one connection per flow."""

    name = "quic"

    def __init__(
        self,
        *,
        window: int = DEFAULT_WINDOW,
        high_water: int = DEFAULT_HIGH_WATER,
        idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
        congestion_control: str | None = None,
    ) -> None:
        self.window = window
        self.high_water = high_water
        self.idle_timeout = idle_timeout
        self.congestion_control = congestion_control
        self._server: QuicServer | None = None
        self._handler: StreamHandler | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._protocols: set[_Protocol] = set()
        self._local: Address | None = None
        self.counters = {"connects": 0, "unavailable": 0, "accepted": 0}

    def _config(self, *, is_client: bool) -> QuicConfiguration:
        cfg = QuicConfiguration(
            is_client=is_client,
            alpn_protocols=[ALPN],
            max_datagram_size=MAX_DATAGRAM,
            max_data=1 << 30,  # one stream per connection: the stream window is the bound
            max_stream_data=self.window,
            idle_timeout=self.idle_timeout,
        )
        if self.congestion_control:
            cfg.congestion_control_algorithm = self.congestion_control
        if is_client:
            cfg.verify_mode = ssl.CERT_NONE
            cfg.server_name = ALPN
        else:
            from vtl.bench.quic_runner import self_signed

            cfg.certificate, cfg.private_key = self_signed()
        return cfg

    @property
    def local_address(self) -> Address | None:
        return self._local

    async def listen(self, host: str, port: int, handler: StreamHandler) -> Address:
        if self._server is not None:
            raise CarrierError("the QUIC carrier is already listening")
        self._handler = handler
        self._server = await serve(
            host,
            port,
            configuration=self._config(is_client=False),
            create_protocol=functools.partial(self._server_protocol),
        )
        transport = self._server._transport  # type: ignore[union-attr]
        _big_buffers(transport.get_extra_info("socket"))
        self._local = transport.get_extra_info("sockname")
        return self._local

    def _server_protocol(self, quic: QuicConnection, stream_handler: Any = None) -> _Protocol:
        proto = _Protocol(quic, carrier=self, inbound=True)
        self._protocols.add(proto)
        return proto

    def _spawn(self, stream: QuicStream) -> None:
        self.counters["accepted"] += 1
        task = asyncio.get_running_loop().create_task(self._serve(stream))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, stream: QuicStream) -> None:
        assert self._handler is not None
        try:
            await self._handler(stream, stream.peer_address)
        except Exception:
            log.exception("QUIC carrier: stream handler failed")
            stream.abort("handler failed")
        finally:
            self._release(stream.proto)

    def _release(self, proto: _Protocol) -> None:
        """Forget a flow's connection once it is closed (client: close its socket)."""
        if proto not in self._protocols:
            return
        self._protocols.discard(proto)
        if not proto.inbound:
            task = asyncio.get_running_loop().create_task(self._close_socket(proto))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _close_socket(self, proto: _Protocol) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(5.0):
                await proto.wait_closed()  # the CONNECTION_CLOSE went out
        if proto._transport is not None:
            proto._transport.close()

    async def connect(
        self,
        peer_addr: Address,
        *,
        composition: Any = None,
        timeout: float = DEFAULT_CONNECT_TIMEOUT,
    ) -> QuicStream:
        """``composition`` is accepted for the interface and ignored (QUIC has one)."""
        loop = asyncio.get_running_loop()
        self.counters["connects"] += 1
        host, port = str(peer_addr[0]), int(peer_addr[1])
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        quic = QuicConnection(configuration=self._config(is_client=True))
        transport, proto = await loop.create_datagram_endpoint(
            lambda: _Protocol(quic, carrier=self, inbound=False),
            remote_addr=(host, port),
            family=family,
        )
        assert isinstance(proto, _Protocol)
        _big_buffers(transport.get_extra_info("socket"))
        try:
            proto.connect(transport.get_extra_info("peername"))
            async with asyncio.timeout(timeout):
                await proto.ready
        except (TimeoutError, CarrierUnavailable, ConnectionError, OSError) as exc:
            self.counters["unavailable"] += 1
            transport.close()
            if isinstance(exc, CarrierUnavailable):
                raise
            raise CarrierUnavailable(f"no QUIC carrier at {host} port {port}: {exc!r}") from exc
        except BaseException:
            transport.close()
            raise
        stream = QuicStream(proto, quic.get_next_available_stream_id())
        proto.stream = stream
        self._protocols.add(proto)
        return stream

    async def close(self) -> None:
        for proto in list(self._protocols):
            if proto.stream is not None:
                proto.stream.abort("carrier closing")
            elif proto.terminated is None:
                proto.close(error_code=ABORT_CODE, reason_phrase="carrier closing")
        await asyncio.sleep(0)
        for task in list(self._tasks):
            task.cancel()
        if self._server is not None:
            self._server.close()
            self._server = None

    def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = {"carrier": self.name, "connections": len(self._protocols)}
        out.update(self.counters)
        out["local_address"] = self._local
        return out


__all__ = ["QuicCarrier", "QuicStream"]
