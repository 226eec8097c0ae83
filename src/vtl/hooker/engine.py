"""The Hooker's flow engine: hooked TCP connections in, carrier streams out,
and back again on the peer host -- everything that does not touch BPF.

Outbound: an accepted application socket whose original destination is known
is carried to the Hooker on the destination host (same IP, the carrier's
port).  The first flow to an unknown peer probes it with a short timeout and
every other flow to it waits for that answer (:class:`PeerCache`); a peer
without a carrier gets plain TCP from this Hooker instead (fallback), so the
application never notices.  The peer's reply to the flow header says whether
the real server accepted; if not, the application gets a reset, as it would
have from a refused connect.

Inbound: a carrier stream starts with a :class:`FlowHeader`; the engine
connects to the original server locally (from the server's own address, so
the source port is known before connecting: :meth:`FlowEngine.before_connect`
is where the daemon fills its getpeername map), replies with the status,
then splices.  Nothing a single flow does can stop the engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import inspect
import itertools
import logging
import socket
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from vtl.hooker.carriers.base import (
    Address,
    Carrier,
    CarrierError,
    CarrierReset,
    CarrierStream,
    CarrierUnavailable,
)
from vtl.hooker.flowheader import (
    HEADER_PREFIX_LEN,
    REPLY_LEN,
    FlowHeader,
    FlowHeaderError,
    FlowStatus,
    decode_reply,
    encode_reply,
)
from vtl.hooker.peers import PeerCache, PeerState
from vtl.hooker.splice import (
    DEFAULT_CHUNK,
    EOF_BOTH,
    RESET_BY_APP,
    RESET_BY_CARRIER,
    SocketStream,
    SpliceResult,
    arm_abortive_close,
    reset_socket,
    splice,
)

log = logging.getLogger(__name__)


class _Prefixed(CarrierStream):
    """A carrier stream with bytes already read from it put back in front
    (what followed a flow header or reply in the same chunk)."""

    def __init__(self, inner: CarrierStream) -> None:
        super().__init__()
        self.inner = inner
        self.carrier_name = inner.carrier_name
        self._buf = bytearray()

    async def read_exactly(self, n: int) -> bytes:
        while len(self._buf) < n:
            data = await self.inner.read(max(n - len(self._buf), 4096))
            if not data:
                raise FlowHeaderError(f"stream ended after {len(self._buf)} of {n} header bytes")
            self._buf += data
        out = bytes(self._buf[:n])
        del self._buf[:n]
        return out

    @property
    def peer_address(self) -> Address | None:
        return self.inner.peer_address

    @property
    def buffered_bytes(self) -> int:
        return len(self._buf) + self.inner.buffered_bytes

    async def read(self, max_bytes: int) -> bytes:
        if self._buf:
            out = bytes(self._buf[:max_bytes])
            del self._buf[:max_bytes]
            self.bytes_received += len(out)
            return out
        data = await self.inner.read(max_bytes)
        self.bytes_received += len(data)
        return data

    async def write(self, data: bytes | bytearray | memoryview) -> None:
        await self.inner.write(data)
        self.bytes_sent += len(data)

    def write_eof(self) -> None:
        self.inner.write_eof()

    def abort(self, reason: str = "aborted") -> None:
        self.inner.abort(reason)

    async def aclose(self, timeout: float | None = None) -> None:
        await self.inner.aclose(timeout)

    def stats(self) -> dict[str, Any]:
        return self.inner.stats()


@dataclass
class Flow:
    """One hooked connection, for ``vtl hooker status``."""

    id: int
    direction: str  # "out" (from a local client) or "in" (to a local server)
    client: Address
    server: Address
    carrier: str  # carrier name, or "tcp" for the fallback
    state: str = "connecting"
    splice: SpliceResult = field(default_factory=SpliceResult)
    started: float = field(default_factory=time.monotonic)
    stream: CarrierStream | None = None

    def to_dict(self) -> dict[str, Any]:
        out = {
            "id": self.id,
            "direction": self.direction,
            "client": list(self.client[:2]),
            "server": list(self.server[:2]),
            "carrier": self.carrier,
            "state": self.state,
            "bytes_to_peer": self.splice.to_stream,
            "bytes_to_app": self.splice.to_socket,
            "age": round(time.monotonic() - self.started, 3),
        }
        if self.stream is not None:
            out["buffered_bytes"] = self.stream.buffered_bytes
        return out


class FlowEngine:
    """Carries hooked TCP flows over a :class:`Carrier` (BPF-free)."""

    def __init__(
        self,
        carrier: Carrier,
        peers: PeerCache | None = None,
        *,
        carrier_port: int,
        probe_timeout: float = 1.0,
        connect_timeout: float = 5.0,
        server_timeout: float = 5.0,
        header_timeout: float = 10.0,
        chunk: int = DEFAULT_CHUNK,
    ) -> None:
        self.carrier = carrier
        self.peers = peers if peers is not None else PeerCache()
        self.carrier_port = carrier_port
        self.probe_timeout = probe_timeout
        self.connect_timeout = connect_timeout
        self.server_timeout = server_timeout
        self.header_timeout = header_timeout
        self.chunk = chunk
        self.counters: Counter[str] = Counter()
        self._flows: dict[int, Flow] = {}
        self._ids = itertools.count(1)

    # ------------------------------------------------------------ status

    def flows(self) -> list[dict[str, Any]]:
        return [f.to_dict() for f in self._flows.values()]

    def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(self.counters)
        out["flows_active"] = len(self._flows)
        out["peers"] = self.peers.snapshot()
        return out

    def _open(self, direction: str, client: Address, server: Address, carrier: str) -> Flow:
        flow = Flow(next(self._ids), direction, tuple(client), tuple(server), carrier)
        self._flows[flow.id] = flow
        self.counters["flows_total"] += 1
        self.counters[f"flows_{direction}"] += 1
        return flow

    def _close(self, flow: Flow, state: str) -> None:
        flow.state = state
        self._flows.pop(flow.id, None)
        sp = flow.splice
        via = "fallback" if flow.carrier == "tcp" else "carrier"
        self.counters[f"bytes_to_peer_{via}"] += sp.to_stream
        self.counters[f"bytes_to_app_{via}"] += sp.to_socket
        if sp.outcome == RESET_BY_APP:
            self.counters["resets_by_app"] += 1
        elif sp.outcome == RESET_BY_CARRIER:
            self.counters["resets_by_carrier"] += 1
        elif sp.outcome == EOF_BOTH:
            self.counters["flows_clean"] += 1
        self.counters[f"ended_{state}"] += 1

    # ---------------------------------------------------------- outbound

    async def handle_outbound(
        self,
        sock: socket.socket,
        orig_src: Address,
        orig_dst: Address,
        composition: Any = None,
    ) -> Flow:
        """Carry an accepted application socket to ``orig_dst`` (owns ``sock``)."""
        flow = self._open("out", orig_src, orig_dst, self.carrier.name)
        try:
            sock.setblocking(False)
            arm_abortive_close(sock)
            stream = await self._carrier_stream(orig_dst, composition)
            if stream is None:
                await self._fallback(flow, sock)
                return flow
            flow.stream = stream
            status = await self._open_remote(flow, stream)
            if status is not FlowStatus.OK:
                self.counters[f"refused_{status.name.lower()}"] += 1
                reset_socket(sock)
                self._close(flow, f"refused_{status.name.lower()}")
                return flow
            flow.state = "spliced"
            await splice(sock, flow.stream, chunk=self.chunk, result=flow.splice)
            self._close(flow, flow.splice.outcome or "done")
        except asyncio.CancelledError:
            self._abort(flow, sock)
            raise
        except Exception as exc:
            if isinstance(exc, (CarrierError, FlowHeaderError, OSError, TimeoutError)):
                log.info("outbound flow %s failed: %r", flow.id, exc)
            else:
                log.exception("outbound flow %s failed", flow.id)
            self.counters["flow_errors"] += 1
            self._abort(flow, sock)
            self._close(flow, "error")
        return flow

    def _abort(self, flow: Flow, sock: socket.socket) -> None:
        reset_socket(sock)
        if flow.stream is not None:
            flow.stream.abort("flow failed")

    async def _carrier_stream(self, orig_dst: Address, composition: Any) -> CarrierStream | None:
        """A carrier stream to the peer Hooker, or None: use plain TCP."""
        host = orig_dst[0]
        peer = (host, self.carrier_port)
        st = await self.peers.classify(host)
        if st is PeerState.INCAPABLE:
            return None
        timeout = self.probe_timeout if st is PeerState.UNKNOWN else self.connect_timeout
        try:
            stream = await self.carrier.connect(peer, composition=composition, timeout=timeout)
        except CarrierUnavailable as exc:
            self.peers.record(host, False, str(exc))
            return None
        except BaseException:
            if st is PeerState.UNKNOWN:
                self.peers.abandon(host)
            raise
        if st is PeerState.UNKNOWN:
            self.peers.record(host, True)
        return stream

    async def _open_remote(self, flow: Flow, stream: CarrierStream) -> FlowStatus:
        """Send the flow header, wait for the peer's status."""
        wrapped = _Prefixed(stream)
        flow.stream = wrapped
        await stream.write(FlowHeader(flow.client[:2], flow.server[:2]).encode())
        async with asyncio.timeout(self.server_timeout + self.header_timeout):
            reply = await wrapped.read_exactly(REPLY_LEN)
        return decode_reply(reply)

    async def _fallback(self, flow: Flow, sock: socket.socket) -> None:
        """Plain TCP from this Hooker to the original server."""
        flow.carrier = "tcp"
        self.counters["fallbacks"] += 1
        server = _tcp_socket(flow.server)
        try:
            async with asyncio.timeout(self.server_timeout):
                await asyncio.get_running_loop().sock_connect(server, flow.server[:2])
        except (OSError, TimeoutError) as exc:
            self.counters["fallback_connect_failed"] += 1
            reset_socket(server)
            reset_socket(sock)
            log.debug("fallback connect to %s failed: %s", flow.server, exc)
            self._close(flow, "fallback_refused")
            return
        flow.stream = SocketStream(server)
        flow.state = "spliced"
        await splice(sock, flow.stream, chunk=self.chunk, result=flow.splice)
        self._close(flow, flow.splice.outcome or "done")

    # ----------------------------------------------------------- inbound

    async def handle_inbound(self, stream: CarrierStream, peer_addr: Address) -> Flow | None:
        """Serve one stream a peer Hooker opened (a carrier's listen handler)."""
        wrapped = _Prefixed(stream)
        try:
            async with asyncio.timeout(self.header_timeout):
                prefix = await wrapped.read_exactly(HEADER_PREFIX_LEN)
                need = FlowHeader.total_length(prefix)
                header = FlowHeader.decode(prefix + await wrapped.read_exactly(need - len(prefix)))
        except (FlowHeaderError, TimeoutError, CarrierReset) as exc:
            self.counters["header_errors"] += 1
            log.debug("bad flow header from %s: %s", peer_addr, exc)
            stream.abort("bad flow header")
            return None
        except Exception:
            self.counters["header_errors"] += 1
            log.exception("reading a flow header from %s failed", peer_addr)
            stream.abort("bad flow header")
            return None
        flow = self._open("in", header.client, header.server, stream.carrier_name)
        flow.stream = wrapped
        sock: socket.socket | None = None
        try:
            sock, status = await self._connect_server(header)
            await wrapped.write(encode_reply(status))
            if sock is None:
                self.counters[f"refused_{status.name.lower()}"] += 1
                wrapped.write_eof()
                await wrapped.aclose(self.header_timeout)
                self._close(flow, f"refused_{status.name.lower()}")
                return flow
            flow.state = "spliced"
            await splice(sock, wrapped, chunk=self.chunk, result=flow.splice)
            self._close(flow, flow.splice.outcome or "done")
        except asyncio.CancelledError:
            if sock is not None:
                reset_socket(sock)
            stream.abort("flow cancelled")
            raise
        except Exception as exc:
            if isinstance(exc, (CarrierError, OSError, TimeoutError)):
                log.info("inbound flow %s failed: %r", flow.id, exc)
            else:
                log.exception("inbound flow %s failed", flow.id)
            self.counters["flow_errors"] += 1
            if sock is not None:
                reset_socket(sock)
            stream.abort("flow failed")
            self._close(flow, "error")
        return flow

    async def _connect_server(self, header: FlowHeader) -> tuple[socket.socket | None, FlowStatus]:
        """Connect to the original server from its own address."""
        sock = _tcp_socket(header.server)
        try:
            arm_abortive_close(sock)
            try:
                sock.bind((header.server[0], 0))
            except OSError as exc:  # not an address of this host: not ours to reach
                log.debug("refusing flow to %s: %s", header.server, exc)
                reset_socket(sock)
                return None, FlowStatus.POLICY
            if not await self._allowed(sock, header):
                reset_socket(sock)
                return None, FlowStatus.POLICY
            async with asyncio.timeout(self.server_timeout):
                await asyncio.get_running_loop().sock_connect(sock, header.server[:2])
        except TimeoutError:
            reset_socket(sock)
            return None, FlowStatus.TIMEOUT
        except OSError as exc:
            reset_socket(sock)
            if exc.errno in (errno.ETIMEDOUT,):
                return None, FlowStatus.TIMEOUT
            return None, FlowStatus.REFUSED
        except BaseException:
            reset_socket(sock)
            raise
        return sock, FlowStatus.OK

    async def _allowed(self, sock: socket.socket, header: FlowHeader) -> bool:
        result = self.before_connect(sock, header)
        if inspect.isawaitable(result):
            result = await result
        return result is not False

    def before_connect(self, sock: socket.socket, header: FlowHeader) -> Any:
        """Called with the bound, not yet connected server socket (its source
        port is known).  Override to record the flow (the daemon fills its
        getpeername map here); return False (or an awaitable of False) to
        refuse the flow with POLICY.  May be a coroutine."""
        return None


def _tcp_socket(addr: Address) -> socket.socket:
    fam = socket.AF_INET6 if ":" in str(addr[0]) else socket.AF_INET
    sock = socket.socket(fam, socket.SOCK_STREAM)
    sock.setblocking(False)
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


__all__ = ["Flow", "FlowEngine"]
