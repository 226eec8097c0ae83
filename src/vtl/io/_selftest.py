"""Bulk-transfer self-test over real UDP: one receiver, one sender process.

Used by the network-namespace tests and for measurements::

    python -m vtl.io._selftest recv --bind 10.77.1.2
    # prints "PORT 40123", then one JSON line when the transfer is over
    python -m vtl.io._selftest send --to 10.77.1.2 40123 --bytes 64M
    # prints one JSON line: bytes, sha256, seconds, goodput, CPU, counters

The payload is pseudo-random (seeded, so it contains NUL bytes and every
other value) and both sides report its SHA-256.  ``--profile FILE`` writes
cProfile data for the whole run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import hashlib
import json
import random
import resource
import sys
import time
from typing import Any

from vtl.core.composition import Composition
from vtl.core.config import ConnectionConfig
from vtl.io import UdpEndpoint

DEFAULT_COMPOSITION = "reliability=selective-repeat congestion=newreno framing=stream"
CHUNK = 1 << 20


def _size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    text = text.strip().upper().removesuffix("IB").removesuffix("B")
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


def _cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def _report(
    role: str, nbytes: int, digest: str, seconds: float, cpu: float, ep: UdpEndpoint, conn: Any
) -> dict[str, Any]:
    st = ep.stats()
    secs = max(seconds, 1e-9)
    return {
        "role": role,
        "bytes": nbytes,
        "sha256": digest,
        "seconds": round(seconds, 4),
        "goodput_mbps": round(nbytes * 8 / secs / 1e6, 1),
        "pps_in": round(st["datagrams_in"] / secs),
        "pps_out": round(st["datagrams_out"] / secs),
        "cpu_seconds": round(cpu, 3),
        "cpu_percent": round(100 * cpu / secs, 1),
        "endpoint": st,
        "connection": conn.stats(),
    }


async def receive(args: argparse.Namespace) -> dict[str, Any]:
    """Accept one connection, read it to the end, hash it, close."""
    ep = await UdpEndpoint.create(
        (args.bind, args.port),
        listen=True,
        recv_budget=args.budget,
        ack_interval=args.ack_interval,
        config=ConnectionConfig(),
        gso=not args.no_offload,
        gro=not args.no_offload,
    )
    print(f"PORT {ep.local_address[1]}", flush=True)
    try:
        conn = await asyncio.wait_for(ep.accept(), args.timeout)
        t0, c0 = time.perf_counter(), _cpu()
        h = hashlib.sha256()
        got = 0
        async with asyncio.timeout(args.timeout):
            while data := await conn.receive():
                h.update(data)
                got += len(data)
        seconds, cpu = time.perf_counter() - t0, _cpu() - c0
        conn.close()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(conn.wait_closed(), 5)
        return _report("receiver", got, h.hexdigest(), seconds, cpu, ep, conn)
    finally:
        await ep.close()


async def send(args: argparse.Namespace) -> dict[str, Any]:
    """Connect, send ``--bytes`` seeded random bytes, close, wait for the end."""
    comp = Composition.parse(args.composition)
    ep = await UdpEndpoint.create(
        (args.bind, 0),
        recv_budget=args.budget,
        ack_interval=args.ack_interval,
        gso=not args.no_offload,
        gro=not args.no_offload,
    )
    try:
        payload = random.Random(args.seed).randbytes(args.bytes)  # made before the clock starts
        digest = hashlib.sha256(payload).hexdigest()
        view = memoryview(payload)
        t0, c0 = time.perf_counter(), _cpu()
        conn = await ep.connect((args.to, args.port), [comp], timeout=10)
        async with asyncio.timeout(args.timeout):
            for pos in range(0, len(view), CHUNK):
                await conn.send(view[pos : pos + CHUNK])
            conn.close()
            await conn.wait_closed()
        seconds, cpu = time.perf_counter() - t0, _cpu() - c0
        return _report("sender", args.bytes, digest, seconds, cpu, ep, conn)
    finally:
        await ep.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m vtl.io._selftest", description=__doc__)
    sub = p.add_subparsers(dest="role", required=True)
    r = sub.add_parser("recv", help="receive one connection")
    r.add_argument("--bind", default="0.0.0.0")
    r.add_argument("--port", type=int, default=0)
    s = sub.add_parser("send", help="send to a receiver")
    s.add_argument("--to", required=True)
    s.add_argument("port", type=int)
    s.add_argument("--bind", default=None, help="local address (default: any, same family)")
    s.add_argument("--bytes", type=_size, default=32 << 20)
    s.add_argument("--seed", type=int, default=1)
    s.add_argument("--composition", default=DEFAULT_COMPOSITION)
    for q in (r, s):
        q.add_argument("--timeout", type=float, default=120.0)
        q.add_argument("--budget", type=int, default=256, help="datagrams per read batch")
        q.add_argument("--ack-interval", type=int, default=64, help="flush every N datagrams")
        q.add_argument("--no-offload", action="store_true", help="no UDP GSO/GRO (comparison)")
        q.add_argument("--profile", default=None, help="write cProfile data here")
    args = p.parse_args(argv)
    if args.role == "send" and args.bind is None:
        args.bind = "::" if ":" in args.to else "0.0.0.0"
    coro = receive(args) if args.role == "recv" else send(args)
    prof = cProfile.Profile() if args.profile else None
    if prof:
        prof.enable()
    try:
        result = asyncio.run(coro)
    finally:
        if prof:
            prof.disable()
            prof.dump_stats(args.profile)
    print(json.dumps(result, default=str), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
