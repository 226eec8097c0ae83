"""Benchmark endpoint over VTL (``vtl.io.UdpEndpoint``), one process.

``python -m vtl.bench.vtl_runner server --workload bulk``
``python -m vtl.bench.vtl_runner client --workload bulk --to IP --port P --size 8M
--composition "reliability=selective-repeat congestion=newreno"``

The client offers exactly one composition; the server (``listen=True``)
accepts any installed one. Bulk: the sender writes the payload, closes, and
waits until the connection is over (the close is acknowledged only once all
data is). Request/response: length-prefixed messages on one connection, read
as a byte stream (so any framing TF works). Retransmitted bytes are the
connection's ``retransmissions`` counter x the DATA payload size (an upper
bound: a retransmitted last segment may be shorter).
"""

from __future__ import annotations

import asyncio
import sys
import time
from typing import Any

from vtl.bench.common import (
    RR_HEADER,
    BulkSink,
    RequestChecker,
    RequestPlan,
    bulk_payload,
    cpu_seconds,
    emit,
    fail,
    finish,
    runner_parser,
    stop_event,
    wait_or_stop,
)
from vtl.core import wire
from vtl.core.composition import Composition
from vtl.core.config import ConnectionConfig
from vtl.io import UdpEndpoint

CHUNK = 1 << 20
_STATS = (
    "packets_sent",
    "packets_received",
    "data_packets_sent",
    "retransmissions",
    "packets_lost",
    "rto_count",
    "duplicate_segments",
    "out_of_window_drops",
    "acks_sent",
    "acks_received",
)


def _conn_stats(conn: Any) -> dict[str, Any]:
    st = conn.stats()
    out = {k: st.get(k) for k in _STATS}
    out.update(srtt=st.get("srtt"), min_rtt=st.get("min_rtt"), composition=st.get("composition"))
    return out


def _retrans_bytes(conn: Any, config: ConnectionConfig) -> int:
    return int(conn.stats().get("retransmissions", 0)) * (
        config.max_datagram_size - wire.DATA_OVERHEAD
    )


async def _recv_exact(conn: Any, n: int) -> bytes | None:
    """Exactly `n` bytes, or None at a clean end of stream before the first byte."""
    buf = bytearray()
    while len(buf) < n:
        data = await conn.receive(n - len(buf))
        if not data:
            if not buf:
                return None
            raise EOFError(f"connection closed after {len(buf)} of {n} bytes")
        buf += data
    return bytes(buf)


async def server(args: Any) -> int:
    config = ConnectionConfig()
    ep = await UdpEndpoint.create((args.bind, 0), listen=True, config=config)
    try:
        stop = stop_event()
        emit("ready", port=ep.local_address[1])
        async with asyncio.timeout(args.timeout):
            conn = await ep.accept()
            cpu0 = cpu_seconds()
            result: dict[str, Any]
            if args.workload == "bulk":
                sink = BulkSink()
                while data := await conn.receive():
                    sink.feed(data)
                result = {"role": "receiver", **sink.result(), "t_eof": time.monotonic()}
            else:
                checker = RequestChecker(args.seed)
                while (header := await _recv_exact(conn, RR_HEADER.size)) is not None:
                    _, req_len, _ = RR_HEADER.unpack(header)
                    body = await _recv_exact(conn, req_len) if req_len else b""
                    if body is None:
                        raise EOFError("connection closed inside a request")
                    await conn.send(checker.response_for(header, body))
                result = {"role": "server", **checker.result(), "ok": checker.bad == 0}
            conn.close()
            # the close handshake is reliable, but do not wait forever for it
            await wait_or_stop(conn.wait_closed(), stop, timeout=5)
        result.update(
            retrans_bytes=_retrans_bytes(conn, config),
            vtl=_conn_stats(conn),
            error_code=conn.error_code,
        )
        # graceful: stay to re-ACK a client that missed our final ACK (draining)
        await ep.close(graceful=True)
        return finish(result, cpu0)
    finally:
        await ep.close()


async def client(args: Any) -> int:
    comp = Composition.parse(args.composition)
    config = ConnectionConfig()
    bind = "::" if ":" in args.to else "0.0.0.0"
    ep = await UdpEndpoint.create((bind, 0), config=config)
    try:
        payload = bulk_payload(args.size, args.seed) if args.workload == "bulk" else b""
        cpu0 = cpu_seconds()
        t_start = time.monotonic()
        result: dict[str, Any] = {"t_start": t_start}
        async with asyncio.timeout(args.timeout):
            conn = await ep.connect((args.to, args.port), [comp], timeout=10)
            result["t_connected"] = time.monotonic()
            if args.workload == "bulk":
                view = memoryview(payload)
                for pos in range(0, len(view), CHUNK):
                    await conn.send(view[pos : pos + CHUNK])
                conn.close()
                await conn.wait_closed()
                result.update(role="sender", bytes=len(payload), ok=conn.error_code == 0)
            else:
                plan = RequestPlan(args)
                for i in range(len(plan.sizes)):
                    t0 = time.monotonic()
                    await conn.send(plan.request(i))
                    resp = await _recv_exact(conn, plan.response)
                    if resp is None:
                        raise EOFError(f"connection closed before response {i}")
                    plan.check(i, resp, time.monotonic() - t0)
                conn.close()
                await conn.wait_closed()
                result.update(role="client", **plan.result(), ok=plan.bad == 0)
            result["t_end"] = time.monotonic()
        result.update(
            composition=str(conn.composition),
            error_code=conn.error_code,
            retrans_bytes=_retrans_bytes(conn, config),
            vtl=_conn_stats(conn),
        )
        return finish(result, cpu0)
    finally:
        await ep.close()


def _options(p: Any) -> None:
    p.add_argument("--composition", default="reliability=selective-repeat congestion=newreno")


def main(argv: list[str] | None = None) -> int:
    args = runner_parser("python -m vtl.bench.vtl_runner", _options).parse_args(argv)
    try:
        return asyncio.run(server(args) if args.role == "server" else client(args))
    except Exception as exc:  # noqa: BLE001 -- reported to the orchestrator, never hidden
        return fail(f"vtl {args.role}: {type(exc).__name__}: {exc}")


if __name__ == "__main__":
    sys.exit(main())
