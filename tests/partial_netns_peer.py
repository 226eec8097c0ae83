"""Message peer for tests/test_partial_reliability_netns.py, run inside a
test-bed namespace over real UDP (``vtl.io.UdpEndpoint``)::

    python partial_netns_peer.py recv --bind 10.77.1.2
    # prints "PORT 40123", then one JSON line when the connection is over
    python partial_netns_peer.py send --to 10.77.1.2 40123 --count 300 --size 1000 \
        --rate 100 --lifetime 0.15 --composition 'reliability=partial framing=message'
    # prints one JSON line

Message ``i`` is ``header(i, t)`` (its number and the CLOCK_MONOTONIC time
of its send(), which all namespaces share) followed by ``body(i, size)``
(seeded bytes), so the test can rebuild every message the receiver reports
and check it byte for byte.  The receiver reports each delivered message
(number, send time, delivery latency, SHA-256) in delivery order and every
DataAbandoned event (the io layer hands it out through ``next_event()``).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import random
import struct
import sys
import time
from typing import Any

HEADER = struct.Struct("!Id")  # message number, send time (time.monotonic())


def body(i: int, size: int) -> bytes:
    return random.Random(i).randbytes(size - HEADER.size)


def message(i: int, sent_at: float, size: int) -> bytes:
    return HEADER.pack(i, sent_at) + body(i, size)


async def receive(args: argparse.Namespace) -> dict[str, Any]:
    from vtl.core.events import (
        ConnectionTerminated,
        DataAbandoned,
        DataReceived,
        MessageReceived,
        PeerClosed,
    )
    from vtl.io import UdpEndpoint

    ep = await UdpEndpoint.create((args.bind, 0), listen=True)
    print(f"PORT {ep.local_address[1]}", flush=True)
    delivered: list[list[Any]] = []  # [number, sent_at, latency_s, sha256, size]
    abandoned: list[dict[str, Any]] = []
    out: dict[str, Any] = {"delivered": delivered, "abandoned": abandoned, "other_events": []}
    try:
        conn = await asyncio.wait_for(ep.accept(), args.timeout)
        async with asyncio.timeout(args.timeout):
            while (event := await conn.next_event()) is not None:
                now = time.monotonic()
                if isinstance(event, MessageReceived):
                    i, sent_at = HEADER.unpack_from(event.data)
                    sha = hashlib.sha256(event.data).hexdigest()
                    delivered.append([i, sent_at, now - sent_at, sha, len(event.data)])
                elif isinstance(event, DataAbandoned):
                    abandoned.append(
                        {
                            "messages": list(event.messages),
                            "segments": event.segments,
                            "bytes": event.bytes,
                            "after_delivered": len(delivered),
                        }
                    )
                elif isinstance(event, PeerClosed):
                    out["peer_closed_after"] = len(delivered)
                    conn.close()  # our half: the connection can now finish
                elif isinstance(event, ConnectionTerminated):
                    out["terminated"] = [event.error_code, event.reason, event.by_peer]
                elif isinstance(event, DataReceived):
                    out["other_events"].append(f"stream data ({len(event.data)} bytes)")
                else:
                    out["other_events"].append(type(event).__name__)
            out["error_code"] = conn.error_code
        out["connection"] = conn.stats()
        return out
    finally:
        await ep.close(graceful=True, timeout=2)


async def send(args: argparse.Namespace) -> dict[str, Any]:
    from vtl.core.composition import Composition
    from vtl.io import UdpEndpoint

    loop = asyncio.get_running_loop()
    ep = await UdpEndpoint.create((args.bind, 0))
    out: dict[str, Any] = {}
    try:
        conn = await ep.connect(
            (args.to, args.port), [Composition.parse(args.composition)], timeout=10
        )
        out["composition"] = str(conn.composition)
        bodies = [body(i, args.size) for i in range(args.count)]  # made before the clock starts
        late = 0.0
        async with asyncio.timeout(args.timeout):
            start = loop.time() + 0.05
            for i in range(args.count):
                due = start + i / args.rate
                if (wait := due - loop.time()) > 0:
                    await asyncio.sleep(wait)
                sent_at = time.monotonic()
                late = max(late, sent_at - due)
                await conn.send(HEADER.pack(i, sent_at) + bodies[i], lifetime=args.lifetime)
            out["send_seconds"] = round(loop.time() - start, 3)
            closing = loop.time()
            conn.close()
            await conn.wait_closed()
            out["close_seconds"] = round(loop.time() - closing, 3)
        out["max_send_lateness_s"] = round(late, 4)
        out["error_code"] = conn.error_code
        out["reason"] = conn.reason
        out["connection"] = conn.stats()
        return out
    finally:
        await ep.close(graceful=True, timeout=2)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("recv")
    r.add_argument("--bind", required=True)
    r.add_argument("--timeout", type=float, default=60.0)
    s = sub.add_parser("send")
    s.add_argument("--to", required=True)
    s.add_argument("port", type=int)
    s.add_argument("--bind", default="")
    s.add_argument("--count", type=int, default=300)
    s.add_argument("--size", type=int, default=1000)
    s.add_argument("--rate", type=float, default=100.0, help="messages per second")
    s.add_argument("--lifetime", type=float, default=None, help="seconds, per message")
    s.add_argument("--composition", required=True)
    s.add_argument("--timeout", type=float, default=60.0)
    args = p.parse_args(argv)
    if args.cmd == "send" and not args.bind:
        args.bind = "::" if ":" in args.to else "0.0.0.0"
    result = asyncio.run(receive(args) if args.cmd == "recv" else send(args))
    print(json.dumps(result, default=str), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
