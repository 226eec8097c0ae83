"""Shared set-up for the Hooker engine/carrier tests: two Hookers, a real TCP
server and an application-side listener standing in for the BPF redirect,
all on loopback in one event loop.

``Rig`` wires: client app -> hook listener (Hooker A: the accepted socket is
an outbound hooked flow to the server) -> carrier -> Hooker B (inbound) ->
the real server.  Tests talk plain TCP to ``rig.hook_addr`` and write the
server as a coroutine ``server(reader_sock)``.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import struct
from collections.abc import Awaitable, Callable
from typing import Any

from vtl.hooker import FlowEngine, PeerCache, get_carrier

LOOP = "127.0.0.1"
ServerFn = Callable[[socket.socket], Awaitable[None]]


def payload(size: int, seed: int) -> bytes:
    """Random bytes with long runs of NULs (the prototype cut data at a NUL)."""
    rng = random.Random(seed)
    out = bytearray(rng.randbytes(size))
    for _ in range(max(1, size // 4096)):
        pos = rng.randrange(max(1, size))
        out[pos : pos + rng.randrange(1, 300)] = bytes(min(300, size - pos))
    return bytes(out[:size])


def rst_close(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


async def recv_all(sock: socket.socket, limit: int = 1 << 30) -> bytes:
    loop = asyncio.get_running_loop()
    buf = bytearray()
    while data := await loop.sock_recv(sock, 1 << 16):
        buf += data
        if len(buf) > limit:
            raise AssertionError("more data than expected")
    return bytes(buf)


async def tcp_connect(addr: tuple[str, int]) -> socket.socket:
    sock = socket.socket()
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, addr)
    return sock


class Rig:
    """Hooker A (client side) and Hooker B (server side) with one carrier kind."""

    def __init__(
        self,
        carrier: str,
        server: ServerFn | None = None,
        *,
        carrier_options: dict[str, Any] | None = None,
        peer_port: int | None = None,
        **engine_options: Any,
    ) -> None:
        self.carrier_name = carrier
        self.server_fn = server
        self.carrier_options = carrier_options or {}
        self.peer_port = peer_port  # None: Hooker B's port; else a port without a carrier
        self.engine_options = engine_options
        self.tasks: set[asyncio.Task[Any]] = set()
        self.server_errors: list[BaseException] = []

    async def __aenter__(self) -> Rig:
        self.srv = socket.socket()
        self.srv.bind((LOOP, 0))
        self.srv.listen(512)
        self.srv.setblocking(False)
        self.server_addr = self.srv.getsockname()
        self._server_task = self._spawn(self._serve())
        self.carrier_b = get_carrier(self.carrier_name, **self.carrier_options)
        self.engine_b = FlowEngine(self.carrier_b, carrier_port=0)
        bound = await self.carrier_b.listen(LOOP, 0, self.engine_b.handle_inbound)
        port = bound[1] if self.peer_port is None else self.peer_port
        self.carrier_a = get_carrier(self.carrier_name, **self.carrier_options)
        self.peers = PeerCache()
        self.engine_a = FlowEngine(
            self.carrier_a, self.peers, carrier_port=port, **self.engine_options
        )
        self.hook = socket.socket()
        self.hook.bind((LOOP, 0))
        self.hook.listen(512)
        self.hook.setblocking(False)
        self.hook_addr = self.hook.getsockname()
        self._spawn(self._hook())
        return self

    async def __aexit__(self, *exc: Any) -> None:
        for task in list(self.tasks):
            task.cancel()
        for task in list(self.tasks):
            with contextlib.suppress(BaseException):
                await task
        await self.carrier_a.close()
        await self.carrier_b.close()
        self.srv.close()
        self.hook.close()

    async def stop_server(self) -> None:
        """Nobody listens on the original destination any more."""
        self._server_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._server_task
        self.srv.close()

    def _spawn(self, coro: Awaitable[Any]) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            conn, _ = await loop.sock_accept(self.srv)
            conn.setblocking(False)
            self._spawn(self._serve_one(conn))

    async def _serve_one(self, conn: socket.socket) -> None:
        try:
            assert self.server_fn is not None
            await self.server_fn(conn)
        except Exception as exc:
            self.server_errors.append(exc)
        finally:
            if conn.fileno() >= 0:
                conn.close()

    async def _hook(self) -> None:
        """Stands in for cgroup/connect4: every connection here is hooked."""
        loop = asyncio.get_running_loop()
        while True:
            conn, peer = await loop.sock_accept(self.hook)
            self._spawn(self.engine_a.handle_outbound(conn, peer, self.server_addr))

    async def connect(self) -> socket.socket:
        return await tcp_connect(self.hook_addr)

    async def idle(self, timeout: float = 10.0) -> None:
        """Wait until both Hookers finished every flow (counters are final)."""
        async with asyncio.timeout(timeout):
            while self.engine_a.flows() or self.engine_b.flows():
                await asyncio.sleep(0.02)

    def buffered(self) -> int:
        """Bytes both Hookers hold for their flows (carrier send + receive buffers)."""
        return sum(
            f.get("buffered_bytes", 0) for e in (self.engine_a, self.engine_b) for f in e.flows()
        )


def run(coro: Awaitable[Any], timeout: float = 60.0) -> Any:
    async def bounded() -> Any:
        async with asyncio.timeout(timeout):
            return await coro

    return asyncio.run(bounded())


def unused_udp_port() -> int:
    """A UDP port nobody listens on (the kernel answers ICMP port unreachable)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((LOOP, 0))
    port = s.getsockname()[1]
    s.close()
    return port


__all__ = [
    "LOOP",
    "Rig",
    "payload",
    "recv_all",
    "rst_close",
    "run",
    "tcp_connect",
    "unused_udp_port",
]
