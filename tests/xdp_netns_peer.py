"""Processes for tests/test_hooker_xdp.py, run inside testbed namespaces.

``serve``: the XDP filter (unless ``--no-xdp``) on an interface, a listening
VTL endpoint kept in the filter's maps by a ConnectionIdObserver, a plain UDP
socket and a TCP echo server on other ports.  It prints one ``READY {json}``
line, echoes every VTL connection (reads to end of stream, sends it all back,
closes), and answers ``report`` on stdin with a JSON line; ``quit`` closes
everything (filter first) and prints a last report.

``client``: one VTL connection to a ``serve``: sends ``--bytes`` seeded random
bytes, half-closes, reads the echo to its end and checks it byte for byte.

``udp``: sends the hex datagrams given as a JSON list on stdin to HOST PORT.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import socket
import sys
import time
from typing import Any

from vtl.core.composition import Composition
from vtl.io import UdpEndpoint

COMPOSITION = "reliability=selective-repeat congestion=newreno framing=stream"


async def serve(args: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    xdp = observer = None
    if not args.no_xdp:
        from vtl.hooker.xdp import ConnectionIdObserver, XdpFilter

        xdp = XdpFilter(args.ifname, mode=args.mode, grace=args.grace)
    ep = await UdpEndpoint.create((args.bind, 0), listen=True)
    port = ep.local_address[1]
    if xdp is not None:
        observer = ConnectionIdObserver(xdp).attach(ep.core, port)
    family = socket.AF_INET6 if ":" in args.bind else socket.AF_INET
    udp = socket.socket(family, socket.SOCK_DGRAM)
    udp.bind((args.bind, 0))
    udp.setblocking(False)
    state: dict[str, Any] = {"udp_datagrams": 0, "tcp_bytes": 0, "echoed": [], "errors": []}

    def on_udp() -> None:
        while True:
            try:
                udp.recv(65535)
            except BlockingIOError:
                return
            state["udp_datagrams"] += 1

    loop.add_reader(udp.fileno(), on_udp)

    async def tcp_echo(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        while data := await r.read(65536):
            state["tcp_bytes"] += len(data)
            w.write(data)
            await w.drain()
        w.close()

    tcp = await asyncio.start_server(tcp_echo, args.bind, 0)

    async def vtl_echo() -> None:
        while True:
            conn = await ep.accept()
            try:
                chunks = []
                while data := await conn.receive():
                    chunks.append(data)
                blob = b"".join(chunks)
                await conn.send(blob)
                conn.close()
                await conn.wait_closed()
                state["echoed"].append(len(blob))
            except Exception as exc:  # reported, the test decides
                state["errors"].append(repr(exc))

    echo_task = asyncio.create_task(vtl_echo())

    def report() -> dict[str, Any]:
        out: dict[str, Any] = {
            "endpoint": ep.stats(),
            "udp_datagrams": state["udp_datagrams"],
            "tcp_bytes": state["tcp_bytes"],
            "echoed": state["echoed"],
            "errors": state["errors"],
            "core_connections": sorted(ep.core.connections),
            "observer_errors": ep.core.cid_observer_errors,
        }
        if xdp is not None and xdp.attached:
            out["xdp"] = xdp.status()
            out["xdp_conns"] = {str(k): v for k, v in xdp.conns().items()}
        return out

    ready = {
        "vtl_port": port,
        "udp_port": udp.getsockname()[1],
        "tcp_port": tcp.sockets[0].getsockname()[1],
        "prog_id": xdp.prog_id if xdp else None,
        "mode": xdp.mode if xdp else None,
        "pid": __import__("os").getpid(),
    }
    print("READY " + json.dumps(ready), flush=True)
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while line := (await reader.readline()).decode().strip():
        if line == "report":
            print(json.dumps(report()), flush=True)
        elif line == "quit":
            break
    final = report()
    echo_task.cancel()
    if observer is not None:
        observer.detach()
    if xdp is not None:
        xdp.close()
    final["closed"] = True
    tcp.close()
    await ep.close()
    print(json.dumps(final), flush=True)


async def client(args: argparse.Namespace) -> dict[str, Any]:
    payload = random.Random(args.seed).randbytes(args.bytes)
    ep = await UdpEndpoint.create(("::" if ":" in args.to else "0.0.0.0", 0))
    try:
        t0 = time.perf_counter()
        conn = await ep.connect((args.to, args.port), [Composition.parse(COMPOSITION)], timeout=10)
        async with asyncio.timeout(args.timeout):
            await conn.send(payload)
            conn.close()
            chunks = []
            while data := await conn.receive():
                chunks.append(data)
            await conn.wait_closed()
        seconds = time.perf_counter() - t0
        back = b"".join(chunks)
        st = ep.stats()
        return {
            "sent": len(payload),
            "received": len(back),
            "exact": back == payload,
            "seconds": round(seconds, 4),
            "datagrams_in": st["datagrams_in"],
            "datagrams_out": st["datagrams_out"],
            "error_code": conn.error_code,
            "endpoint": st,
        }
    finally:
        await ep.close()


def send_udp(args: argparse.Namespace) -> dict[str, Any]:
    datagrams = [bytes.fromhex(h) for h in json.loads(sys.stdin.read())]
    family = socket.AF_INET6 if ":" in args.to else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        for d in datagrams:
            s.sendto(d, (args.to, args.port))
            time.sleep(0.0005)  # no burst big enough to overflow anything
    return {"sent": len(datagrams)}


def main() -> int:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--ifname", required=True)
    s.add_argument("--bind", required=True)
    s.add_argument("--mode", default="auto")
    s.add_argument("--grace", type=float, default=10.0)
    s.add_argument("--no-xdp", action="store_true")
    c = sub.add_parser("client")
    c.add_argument("--to", required=True)
    c.add_argument("port", type=int)
    c.add_argument("--bytes", type=int, default=4 << 20)
    c.add_argument("--seed", type=int, default=7)
    c.add_argument("--timeout", type=float, default=120)
    u = sub.add_parser("udp")
    u.add_argument("--to", required=True)
    u.add_argument("port", type=int)
    args = p.parse_args()
    if args.cmd == "serve":
        asyncio.run(serve(args))
    elif args.cmd == "client":
        print(json.dumps(asyncio.run(client(args))), flush=True)
    else:
        print(json.dumps(send_udp(args)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
