"""The asyncio endpoint: one UDP socket driving one sans-I/O EndpointCore.

The event loop calls us once per readiness event, not once per datagram: the
reader drains the socket (up to ``recv_budget`` datagrams, GRO batches kept
whole) and feeds everything to the core.  The core ACKs at most once per
connection per flush, so a batch is flushed a few times: every ``ack_every``
datagrams in a small batch (a lone lost ACK must not cost an RTO), about four
times in a big one (ACK traffic stays small).  A flush sends what the core
wants with GSO, then re-checks parked application calls and re-arms the
single loop timer.  Application calls (send, close, reads that reopen the
window) schedule at most one flush per loop iteration.

The core's clock is ``loop.time()``.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import socket
from collections import deque
from typing import Any

from vtl.core.composition import Composition
from vtl.core.config import ConnectionConfig
from vtl.core.connection import Connection
from vtl.core.endpoint import EndpointCore
from vtl.core.errors import ConnectionStateError, ErrorCode
from vtl.io.connection import DEFAULT_HIGH_WATER, VtlConnection
from vtl.io.errors import HandshakeError, HandshakeTimeoutError
from vtl.io.udp import Address, UdpSocket, family_of, open_udp_socket

DEFAULT_RECV_BUDGET = 256  # datagrams per readiness event before we flush and yield
DEFAULT_ACK_INTERVAL = 64  # within a batch, flush (ACK) at least this often; 0: once per batch


def _is_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    return True


class UdpEndpoint:
    """Many VTL connections behind one non-blocking UDP socket."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        usock: UdpSocket,
        core: EndpointCore,
        *,
        recv_budget: int = DEFAULT_RECV_BUDGET,
        high_water: int = DEFAULT_HIGH_WATER,
        ack_interval: int = DEFAULT_ACK_INTERVAL,
    ) -> None:
        self._loop = loop
        self._sock = usock
        self._fd = usock.fileno()
        self._core = core
        self.recv_budget = recv_budget
        self.ack_interval = max(0, ack_interval)
        self.high_water = high_water
        self._rx: list[tuple[bytes, Address]] = []
        self._pending: list[tuple[bytes, Address]] | None = None  # unsent after EAGAIN
        self._pending_pos = 0
        self._retry_handle: asyncio.Handle | None = None
        self._writer = False
        self._timer: asyncio.TimerHandle | None = None
        self._timer_floor = float("-inf")  # the `now` of the last timer run
        self._flush_scheduled = False
        self._parked: set[VtlConnection] = set()
        self._accept_waiters: deque[asyncio.Future[Connection]] = deque()
        self._accept_ready: deque[Connection] = deque()
        self._closed = False
        self._closing: asyncio.Future[None] | None = None
        self.counters = usock.counters
        self._udp_checksum_off = False  # set once a connection uses partial coverage
        self._local_address = usock.local_address
        self._deployer: Any = None  # vtl.deploy.Deployer once enable_deployment() ran
        loop.add_reader(self._fd, self._on_readable)

    @classmethod
    async def create(
        cls,
        local_addr: Address = ("0.0.0.0", 0),
        *,
        config: ConnectionConfig | None = None,
        listen: bool = False,
        family: int | None = None,
        recv_budget: int = DEFAULT_RECV_BUDGET,
        high_water: int = DEFAULT_HIGH_WATER,
        ack_interval: int = DEFAULT_ACK_INTERVAL,
        gso: bool = True,
        gro: bool = True,
    ) -> UdpEndpoint:
        """Bind a UDP socket (IPv6 if ``local_addr`` is an IPv6 literal such as
        ``"::"``; IPv6 sockets are dual-stack) and serve it on the running loop.

        ``config`` is the default for connections (``connect`` can override
        it); ``listen`` lets peers open connections (see :meth:`accept`);
        ``high_water`` bounds unacknowledged bytes per connection before
        ``send`` waits; ``gso``/``gro`` can turn the kernel batching off."""
        loop = asyncio.get_running_loop()
        host = local_addr[0] or ""
        if host and not _is_literal(host):
            infos = await loop.getaddrinfo(
                host, local_addr[1], family=family or 0, type=socket.SOCK_DGRAM,
                flags=socket.AI_PASSIVE,
            )  # fmt: skip
            family, local_addr = infos[0][0], infos[0][4]
        elif family is None:
            family = family_of(host)
        sock = open_udp_socket(local_addr, family)
        usock = UdpSocket(sock, gso=gso, gro=gro)
        core = EndpointCore(config, listen=listen)
        return cls(
            loop, usock, core,
            recv_budget=recv_budget, high_water=high_water, ack_interval=ack_interval,
        )  # fmt: skip

    # ------------------------------------------------------------ public

    @property
    def local_address(self) -> Address:
        return self._local_address

    @property
    def core(self) -> EndpointCore:
        """The sans-I/O endpoint (for diagnostics and tests)."""
        return self._core

    @property
    def is_closed(self) -> bool:
        """close() was called (a graceful close may still be finishing)."""
        return self._closing is not None

    async def connect(
        self,
        addr: Address,
        offers: list[Composition],
        *,
        config: ConnectionConfig | None = None,
        timeout: float | None = None,
        high_water: int | None = None,
    ) -> VtlConnection:
        """Open a connection and wait for the handshake.  Raises
        :class:`HandshakeError` (refused, reset; :class:`HandshakeTimeoutError`
        after ``timeout`` or the configured ``handshake_timeout``)."""
        self._check_open()
        addr = await self._resolve(addr)
        conn = self._core.connect(addr, offers, self._loop.time(), config)
        vc = VtlConnection(self, conn, addr, high_water=high_water or self.high_water)
        self._flush()
        try:
            if timeout is None:
                await vc._handshake()
            else:
                async with asyncio.timeout(timeout):
                    await vc._handshake()
        except HandshakeError:
            raise
        except TimeoutError:
            conn.abort(ErrorCode.HANDSHAKE_TIMEOUT, "handshake timed out")
            self._schedule_flush()
            raise HandshakeTimeoutError(
                ErrorCode.HANDSHAKE_TIMEOUT, f"no handshake with {addr} within {timeout} s"
            ) from None
        except BaseException:
            conn.abort(ErrorCode.APPLICATION, "connect cancelled")
            self._schedule_flush()
            raise
        return vc

    async def accept(self) -> VtlConnection:
        """Next connection a peer opened (``listen=True`` endpoints)."""
        if not self._core.listening:
            raise ConnectionStateError("accept() needs an endpoint created with listen=True")
        while True:
            self._check_open()
            conn = self._accept_ready.popleft() if self._accept_ready else self._core.accept()
            if conn is None:
                fut: asyncio.Future[Connection] = self._loop.create_future()
                self._accept_waiters.append(fut)
                try:
                    conn = await fut
                except asyncio.CancelledError:
                    if fut.done() and not fut.cancelled() and fut.exception() is None:
                        self._accept_ready.appendleft(fut.result())  # not lost
                    raise
            vc = VtlConnection(self, conn, self._core.address_of(conn), high_water=self.high_water)
            vc._skip_handshake_event()
            return vc

    def close(self, *, graceful: bool = False, timeout: float = 5.0) -> asyncio.Future[None]:
        """Close every connection -- by RESET, or gracefully (queued data is
        delivered; after ``timeout`` the rest is reset) -- then the socket.

        The abortive close is done when this returns; either way the result
        can be awaited (``await ep.close(graceful=True)``)."""
        if self._closing is not None:
            return self._closing
        if graceful:
            for conn in list(self._core.connections.values()):
                conn.close()
            self._flush()
            self._closing = self._loop.create_task(self._close_when_done(timeout))
        else:
            self._shutdown()
            self._closing = self._loop.create_future()
            self._closing.set_result(None)
        return self._closing

    async def wait_closed(self) -> None:
        """Wait until :meth:`close` has finished."""
        if self._closing is not None:
            await self._closing

    async def _close_when_done(self, timeout: float) -> None:
        conns = self._core.connections.values()
        deadline = self._loop.time() + timeout
        # wait for draining connections too: closing the socket under them would
        # leave a peer that missed our final ACK retrying until its idle timeout
        while (
            any(not c.is_terminated or c.is_draining for c in conns)
            and self._loop.time() < deadline
        ):
            await asyncio.sleep(0.01)
        self._shutdown()

    def _shutdown(self) -> None:
        """Reset what is still open, then release the socket and every waiter."""
        if self._closed:
            return
        for conn in list(self._core.connections.values()):
            if not conn.is_terminated:
                conn.abort(ErrorCode.ENDPOINT_CLOSING, "endpoint closing")
        self._flush()  # the RESETs (best effort)
        if self._pending is not None:  # still blocked: what is left goes nowhere
            self.counters["dropped_at_close"] += len(self._pending) - self._pending_pos
            self._pending = None
        self._closed = True
        self._loop.remove_reader(self._fd)
        if self._writer:
            self._loop.remove_writer(self._fd)
        for handle in (self._timer, self._retry_handle):
            if handle is not None:
                handle.cancel()
        self._sock.close()
        self._wake()
        while self._accept_waiters:
            fut = self._accept_waiters.popleft()
            if not fut.done():
                fut.set_exception(ConnectionStateError("endpoint closed"))

    async def __aenter__(self) -> UdpEndpoint:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    def stats(self) -> dict[str, Any]:
        """Datagram/byte counters, GSO/GRO batching, retries and the core's drops."""
        out: dict[str, Any] = {
            key: 0
            for key in (
                "datagrams_in", "bytes_in", "datagrams_out", "bytes_out", "recv_calls",
                "send_calls", "gso_batches", "gso_segments", "gro_batches", "gro_segments",
                "send_retries", "send_errors", "recv_errors", "truncated", "gso_disabled",
            )
        }  # fmt: skip
        out.update(self._sock.counters)
        out["gso"] = self._sock.gso
        out["gro"] = self._sock.gro
        out.update(self._core.stats())
        return out

    # ------------------------------------------------- TF deployment

    def enable_deployment(self, trust: Any) -> Any:
        """Let TF packages trusted by ``trust`` (a :class:`vtl.deploy.TrustPolicy`)
        be deployed into this running endpoint; returns its
        :class:`vtl.deploy.Deployer` (deploy / upgrade / remove / list)."""
        from vtl.deploy import Deployer

        if self._deployer is None:
            self._deployer = Deployer.for_endpoint(self._core, trust, self._schedule_flush)
        else:
            self._deployer.trust = trust
        return self._deployer

    @property
    def deployer(self) -> Any:
        """The endpoint's :class:`vtl.deploy.Deployer` (None until enabled)."""
        return self._deployer

    async def serve_control(self, path: str, trust: Any = None) -> Any:
        """Serve the local control socket (docs/deployment.md) at ``path``;
        returns the started :class:`vtl.deploy.control.ControlServer`."""
        from vtl.deploy.control import ControlServer
        from vtl.deploy.trust import TrustPolicy

        if trust is not None or self._deployer is None:
            self.enable_deployment(trust if trust is not None else TrustPolicy())
        return await ControlServer(path, self._deployer, self.stats).start()

    # -------------------------------------------------------- addresses

    async def _resolve(self, addr: Address) -> Address:
        """The socket-family form of ``addr`` (IPv4 peers of an IPv6 socket as
        ``::ffff:a.b.c.d``), equal to what recvmsg reports for that peer."""
        host, port = addr[0], addr[1]
        fam = self._sock.family
        flags = socket.AI_V4MAPPED if fam == socket.AF_INET6 else 0
        if _is_literal(host):
            flags |= socket.AI_NUMERICHOST
            infos = socket.getaddrinfo(host, port, fam, socket.SOCK_DGRAM, 0, flags)
        else:
            infos = await self._loop.getaddrinfo(
                host, port, family=fam, type=socket.SOCK_DGRAM, flags=flags
            )
        sockaddr = infos[0][4]
        if fam == socket.AF_INET6 and len(addr) == 4 and addr[3]:
            sockaddr = (sockaddr[0], sockaddr[1], addr[2], addr[3])  # keep a scope id
        return sockaddr

    def _check_open(self) -> None:
        if self._closing is not None:
            raise ConnectionStateError("endpoint is closed")

    # --------------------------------------------------------- datapath

    def _on_readable(self) -> None:
        rx = self._rx
        try:
            self._sock.receive(self.recv_budget, rx)
            if not rx:
                return
            now = self._loop.time()
            receive = self._core.receive
            # The core sends at most one ACK per connection per flush, so a batch
            # gets a few flushes: small flights still get ACKed every ack_every
            # datagrams (one lost ACK must not cost an RTO), big batches every
            # ack_interval datagrams (at most ~4 flushes per batch).
            n = len(rx)
            step = n
            if self.ack_interval:  # 0: one flush per batch
                step = min(self.ack_interval, max(self._core.config.ack_every, n // 4))
            for start in range(0, n, step):
                if start:
                    self._transmit(now)
                for data, addr in rx[start : start + step]:
                    try:
                        receive(data, addr, now)
                    except Exception as exc:  # a bug in the core or a TF: report, keep serving
                        self._internal_error("receive", exc)
        finally:
            rx.clear()
        self._flush(now)

    def _internal_error(self, where: str, exc: Exception) -> None:
        """Count an exception escaping the core and report the first few."""
        self.counters["internal_errors"] += 1
        if self.counters["internal_errors"] <= 10:
            self._loop.call_exception_handler(
                {"message": f"VTL core raised in {where}()", "exception": exc, "endpoint": self}
            )

    def _schedule_flush(self) -> None:
        """Coalesce application-triggered flushes: one per loop iteration."""
        if not self._flush_scheduled and not self._closed:
            self._flush_scheduled = True
            self._loop.call_soon(self._scheduled_flush)

    def _scheduled_flush(self) -> None:
        self._flush_scheduled = False
        self._flush()

    def _flush(self, now: float | None = None) -> None:
        """Send what the core wants now, wake parked calls, re-arm the timer."""
        if self._closed:
            return
        self._transmit(self._loop.time() if now is None else now)
        self._wake()
        self._arm_timer()

    def _transmit(self, now: float) -> None:
        """Hand the core's datagrams to the socket (unless blocked on EAGAIN)."""
        if self._pending is not None:
            return
        try:
            out = self._core.datagrams_to_send(now)
        except Exception as exc:
            self._internal_error("datagrams_to_send", exc)
            return
        if not self._udp_checksum_off and any(
            c._coverage is not None for c in self._core.connections.values()
        ):
            # partial checksum coverage: the UDP checksum would drop what VTL
            # means to deliver (VTL's own CRC32C still guards the rest)
            self._udp_checksum_off = True
            self._sock.disable_udp_checksum()
        if out:
            sent = self._sock.send(out)
            if sent < len(out):
                self._pending, self._pending_pos = out, sent
                self._wait_writable()
            elif len(out) >= self._core.config.max_burst_packets:
                self._schedule_flush()  # a connection may have hit its burst cap

    def _wait_writable(self) -> None:
        """Retry later: when the socket is writable (EAGAIN), or soon (ENOBUFS,
        where poll() would report writable at once)."""
        if self._sock.retry_errno in (errno.EAGAIN, errno.EWOULDBLOCK):
            if not self._writer:
                self._writer = True
                self._loop.add_writer(self._fd, self._on_writable)
        elif self._retry_handle is None:
            self._retry_handle = self._loop.call_later(0.001, self._on_writable)

    def _on_writable(self) -> None:
        self._retry_handle = None
        if self._writer:
            self._writer = False
            self._loop.remove_writer(self._fd)
        pending = self._pending
        if pending is None or self._closed:
            return
        sent = self._sock.send(pending, self._pending_pos)
        if sent < len(pending):
            self._pending_pos = sent
            self._wait_writable()
            return
        self._pending = None
        self._flush()

    def _wake(self) -> None:
        if self._parked:
            for vc in list(self._parked):
                if not vc._poll():
                    self._parked.discard(vc)
        if self._accept_waiters:
            self._dispatch_accepts()

    def _dispatch_accepts(self) -> None:
        waiters = self._accept_waiters
        while waiters:
            fut = waiters[0]
            if fut.done():
                waiters.popleft()
                continue
            conn = self._core.accept()
            if conn is None:
                return
            waiters.popleft()
            fut.set_result(conn)

    # ------------------------------------------------------------ timer

    def _arm_timer(self) -> None:
        """One loop timer for the core's earliest deadline.  A timer that is
        already due earlier is kept (firing early is harmless)."""
        when = self._core.next_timer()
        handle = self._timer
        if when is None:
            if handle is not None:
                handle.cancel()
                self._timer = None
            return
        if when <= self._timer_floor:  # due at a time already handled: would spin
            if self._pending is None:  # (while blocked on EAGAIN this is expected)
                self.counters["timer_stalls"] += 1
            when = self._timer_floor + 0.001
        if handle is not None:
            if handle.when() <= when:
                return
            handle.cancel()
        self._timer = self._loop.call_at(when, self._on_timer)

    def _on_timer(self) -> None:
        handle, self._timer = self._timer, None
        if self._closed:
            return
        now = self._loop.time()
        if handle is not None and handle.when() > now:
            now = handle.when()  # the loop may run a timer a hair early
        self._timer_floor = now
        try:
            self._core.handle_timer(now)
        except Exception as exc:
            self._internal_error("handle_timer", exc)
        self._flush(now)
