"""Roles for tests/test_hooker_carriers.py, each run in a test-bed namespace.

    python hooker_netns_peer.py hooker --carrier vtl --bind 10.77.1.1 --port 4790 \\
        --forward-to 10.77.1.2:8080
    # prints "READY <tcp port>": connections to 127.0.0.1:<tcp port> are handled
    # as hooked flows to --forward-to (what cgroup/connect4 would redirect);
    # carrier streams from peers are served too.  On stdin EOF: one JSON line
    # with the engine's and the carrier's counters.
    python hooker_netns_peer.py server --bind 10.77.1.2
    # prints "PORT <n>"; per connection: reads the request to EOF, answers
    # sha256(request) + the requested number of seeded bytes, closes at once
    python hooker_netns_peer.py client --to 127.0.0.1:<port> --flows 4 --up N --down M
    # one JSON line: every flow checked byte for byte both ways
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import random
import socket
import struct
import sys
import time
from typing import Any

REQ = struct.Struct("!QQ")  # reply size, seed


def blob(size: int, seed: int) -> bytes:
    rng = random.Random(seed)
    out = bytearray(rng.randbytes(size))
    for _ in range(max(1, size // 4096)):  # runs of NUL bytes
        pos = rng.randrange(max(1, size))
        out[pos : pos + rng.randrange(1, 300)] = bytes(min(300, size - pos))
    return bytes(out[:size])


async def hooker(args: argparse.Namespace) -> None:
    from vtl.hooker import FlowEngine, get_carrier

    loop = asyncio.get_running_loop()
    carrier = get_carrier(args.carrier)
    engine = FlowEngine(carrier, carrier_port=args.port, probe_timeout=args.probe_timeout)
    await carrier.listen(args.bind, args.port, engine.handle_inbound)
    host, port = args.forward_to.rsplit(":", 1)
    dst = (host, int(port))
    lst = socket.socket()
    lst.bind(("127.0.0.1", 0))
    lst.listen(256)
    lst.setblocking(False)
    tasks: set[asyncio.Task[Any]] = set()

    async def accept() -> None:
        while True:
            conn, peer = await loop.sock_accept(lst)
            task = loop.create_task(
                engine.handle_outbound(conn, peer, dst, composition=args.composition)
            )
            tasks.add(task)
            task.add_done_callback(tasks.discard)

    acceptor = loop.create_task(accept())
    print(f"READY {lst.getsockname()[1]}", flush=True)
    await loop.run_in_executor(None, sys.stdin.read)  # until the test closes stdin
    acceptor.cancel()
    for _ in range(100):  # let finished flows be counted
        if not engine.flows():
            break
        await asyncio.sleep(0.05)
    cstats = carrier.stats()
    ep = cstats.pop("endpoint", None)
    out = {"engine": engine.stats(), "carrier": cstats, "flows_left": engine.flows()}
    if ep is not None:
        out["endpoint"] = {k: ep.get(k) for k in ("datagrams_in", "datagrams_out", "drops")}
        out["retransmissions"] = sum(
            c.stats.get("retransmissions", 0)
            for c in carrier.endpoint.core.connections.values()  # type: ignore[attr-defined]
        )
    await carrier.close()
    print(json.dumps(out, default=str), flush=True)


async def server(args: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    srv = socket.socket()
    srv.bind((args.bind, 0))
    srv.listen(256)
    srv.setblocking(False)
    print(f"PORT {srv.getsockname()[1]}", flush=True)

    async def one(conn: socket.socket) -> None:
        buf = bytearray()
        while data := await loop.sock_recv(conn, 1 << 16):
            buf += data
        size, seed = REQ.unpack_from(buf)
        await loop.sock_sendall(conn, hashlib.sha256(buf).digest() + blob(size, seed))
        conn.close()  # right after the last send

    while True:
        conn, _ = await loop.sock_accept(srv)
        loop.create_task(one(conn))


async def client(args: argparse.Namespace) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    host, port = args.to.rsplit(":", 1)

    requests = [REQ.pack(args.down, 1000 + i) + blob(args.up, i) for i in range(args.flows)]

    async def flow(i: int) -> str:
        sock = socket.socket()
        sock.setblocking(False)
        await loop.sock_connect(sock, (host, int(port)))
        request = requests[i]
        reader = loop.create_task(_read_all(loop, sock))
        await loop.sock_sendall(sock, request)
        sock.shutdown(socket.SHUT_WR)
        reply = await reader
        sock.close()
        if reply[:32] != hashlib.sha256(request).digest():
            return "request corrupted"
        if reply[32:] != blob(args.down, 1000 + i):
            return f"reply corrupted ({len(reply) - 32} of {args.down} bytes)"
        return "ok"

    t0 = time.monotonic()  # the payloads are ready: time the transfer only
    async with asyncio.timeout(args.timeout):
        results = await asyncio.gather(*[flow(i) for i in range(args.flows)])
    return {"results": results, "seconds": round(time.monotonic() - t0, 3)}


async def _read_all(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> bytes:
    buf = bytearray()
    while data := await loop.sock_recv(sock, 1 << 16):
        buf += data
    return bytes(buf)


def main() -> int:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="role", required=True)
    h = sub.add_parser("hooker")
    h.add_argument("--carrier", default="vtl")
    h.add_argument("--bind", required=True)
    h.add_argument("--port", type=int, required=True)
    h.add_argument("--forward-to", required=True)
    h.add_argument("--probe-timeout", type=float, default=1.0)
    h.add_argument("--composition", default=None, help="VTL composition of outbound flows")
    s = sub.add_parser("server")
    s.add_argument("--bind", required=True)
    c = sub.add_parser("client")
    c.add_argument("--to", required=True)
    c.add_argument("--flows", type=int, default=1)
    c.add_argument("--up", type=int, default=1 << 20)
    c.add_argument("--down", type=int, default=1 << 20)
    c.add_argument("--timeout", type=float, default=60.0)
    args = p.parse_args()
    if args.role == "hooker":
        asyncio.run(hooker(args))
    elif args.role == "server":
        asyncio.run(server(args))
    else:
        print(json.dumps(asyncio.run(client(args))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
