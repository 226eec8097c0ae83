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

``bench`` (root, outside any namespace): the cost of the filter, measured as
packets per second through echo transfers with the filter in native mode,
in generic mode and without it, interleaved in one run on one NetnsPair::

    PYTHONPATH=src python tests/xdp_netns_peer.py bench --bytes 33554432 --repeat 3
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


def frame(payload: bytes, dport: int, *, proto: int = 17) -> bytes:
    """An Ethernet + IPv4 + UDP frame around ``payload`` (checksums left 0)."""
    import struct

    udp = struct.pack("!HHHH", 40000, dport, 8 + len(payload), 0) + payload
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0, 64, proto, 0,
                     bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2]))  # fmt: skip
    return b"\x02" * 6 + b"\x04" * 6 + b"\x08\x00" + ip + udp


def cost(args: argparse.Namespace) -> dict[str, Any]:
    """Nanoseconds per run of the program (BPF_PROG_TEST_RUN) on typical frames."""
    from vtl.core import wire
    from vtl.core.wire import PacketType
    from vtl.hooker.xdp import XdpFilter

    with XdpFilter(args.ifname) as xdp:
        xdp.add_port(4433)
        for cid in range(1, 1001):
            xdp.add_conn(cid << 8)
        data = wire.encode(PacketType.DATA, 500 << 8, 7, 1, b"\0" * 8 + b"x" * 1400)
        cases = {
            "valid DATA (1452 B), known connection": frame(data, 4433),
            "DATA for an unknown connection": frame(
                wire.encode(PacketType.DATA, 12345, 7, 1, b"\0" * 8 + b"x" * 1400), 4433
            ),
            "malformed (bad version)": frame(b"\x02" + data[1:], 4433),
            "UDP to another port": frame(data, 53),
            "TCP": frame(b"\0" * 20, 80, proto=6),
        }
        return {
            name: dict(zip(("verdict", "ns"), xdp.test_run(f, args.repeat), strict=True))
            for name, f in cases.items()
        }


def bench(args: argparse.Namespace) -> dict[str, Any]:
    import statistics
    import subprocess
    import tempfile

    from vtl.testbed import NetnsPair

    # control: an empty XDP_PASS program, to tell the attachment's cost from ours
    tmp = tempfile.mkdtemp()
    src, obj = f"{tmp}/noop.bpf.c", f"{tmp}/noop.bpf.o"
    with open(src, "w") as f:
        f.write(
            "#include <linux/bpf.h>\n#include <bpf/bpf_helpers.h>\n"
            'SEC("xdp") int noop(struct xdp_md *c) { return XDP_PASS; }\n'
            'char _license[] SEC("license") = "GPL";\n'
        )
    subprocess.run(
        ["clang", "-O2", "-g", "-target", "bpf", "-I/usr/include/x86_64-linux-gnu",
         "-c", src, "-o", obj],
        check=True,
    )  # fmt: skip
    rates: dict[str, list[float]] = {"none": [], "native": [], "generic": [], "noop-native": []}
    with NetnsPair(disable_offloads=args.disable_offloads) as pair:
        dev = str(pair.b.ifname)
        for _ in range(args.repeat):
            for variant in rates:
                extra = ["--no-xdp"] if variant in ("none", "noop-native") else ["--mode", variant]
                if variant == "noop-native":
                    pair.b.ip("link", "set", "dev", dev, "xdpdrv", "obj", obj, "sec", "xdp")
                srv = pair.b.popen(
                    [sys.executable, __file__, "serve", "--ifname", str(pair.b.ifname),
                     "--bind", str(pair.b.ip4), *extra],
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                )  # fmt: skip
                assert srv.stdout is not None and srv.stdin is not None
                ready = json.loads(srv.stdout.readline().split(" ", 1)[1])
                cp = pair.a.run(
                    [sys.executable, __file__, "client", "--to", str(pair.b.ip4),
                     str(ready["vtl_port"]), "--bytes", str(args.bytes)],
                    timeout=600,
                )  # fmt: skip
                got = json.loads(cp.stdout.strip().splitlines()[-1])
                assert got["exact"], got
                srv.stdin.write("quit\n")
                srv.stdin.flush()
                srv.communicate(timeout=30)
                if variant == "noop-native":
                    pair.b.ip("link", "set", "dev", dev, "xdpdrv", "off")
                pps = (got["datagrams_in"] + got["datagrams_out"]) / got["seconds"]
                rates[variant].append(pps)
                print(f"{variant:8s} {got['seconds']:7.3f} s {pps:10.0f} pkt/s", file=sys.stderr)
    med = {k: statistics.median(v) for k, v in rates.items()}
    return {
        "bytes_each_way": args.bytes,
        "offloads": not args.disable_offloads,
        "pps_median": {k: round(v) for k, v in med.items()},
        "ratio_native": round(med["native"] / med["none"], 3),
        "ratio_generic": round(med["generic"] / med["none"], 3),
        "ratio_noop_native": round(med["noop-native"] / med["none"], 3),
        "runs": {k: [round(x) for x in v] for k, v in rates.items()},
    }


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
    b = sub.add_parser("bench")
    b.add_argument("--bytes", type=int, default=32 << 20)
    b.add_argument("--repeat", type=int, default=3)
    b.add_argument("--disable-offloads", action="store_true", help="GSO/GRO off on the veths")
    k = sub.add_parser("cost")
    k.add_argument("--ifname", required=True)
    k.add_argument("--repeat", type=int, default=1_000_000)
    args = p.parse_args()
    if args.cmd == "cost":
        print(json.dumps(cost(args)), flush=True)
    elif args.cmd == "bench":
        print(json.dumps(bench(args)), flush=True)
    elif args.cmd == "serve":
        asyncio.run(serve(args))
    elif args.cmd == "client":
        print(json.dumps(asyncio.run(client(args))), flush=True)
    else:
        print(json.dumps(send_udp(args)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
