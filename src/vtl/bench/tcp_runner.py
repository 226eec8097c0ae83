"""Benchmark endpoint over kernel TCP (one process: a server or a client).

``python -m vtl.bench.tcp_runner server --workload bulk``
``python -m vtl.bench.tcp_runner client --workload bulk --to IP --port P --size 8M --cc cubic``

The client sets the congestion control (``TCP_CONGESTION``) before it
connects; the server's socket inherits the system default, which only matters
for the responses of the request/response workload, so the server takes
``--cc`` too. Retransmissions come from the sender's ``TCP_INFO``
(``tcpi_bytes_retrans``, exact payload bytes; ``tcpi_total_retrans`` x MSS on
kernels without it), read once the receiver has closed, i.e. after the
last retransmission. See :mod:`vtl.bench.common` for the line protocol.
"""

from __future__ import annotations

import socket
import struct
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
)

CHUNK = 256 * 1024

# struct tcp_info (include/uapi/linux/tcp.h): byte offsets of the fields we read
_TCPI_LEN = 232
_TCPI_U32 = {
    "snd_mss": 16,
    "lost": 32,
    "retrans": 36,
    "rtt_us": 68,
    "rttvar_us": 72,
    "snd_cwnd": 80,
    "total_retrans": 100,
    "segs_out": 136,
    "data_segs_out": 156,
}
_TCPI_U64 = {"bytes_acked": 120, "bytes_sent": 200, "bytes_retrans": 208}


def tcp_info(sock: socket.socket) -> dict[str, Any]:
    """The fields of ``TCP_INFO`` the benchmark reports (those the kernel fills)."""
    raw = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCPI_LEN)
    out: dict[str, Any] = {}
    for name, off in _TCPI_U32.items():
        if off + 4 <= len(raw):
            out[name] = struct.unpack_from("=I", raw, off)[0]
    for name, off in _TCPI_U64.items():
        if off + 8 <= len(raw):
            out[name] = struct.unpack_from("=Q", raw, off)[0]
    if "bytes_retrans" in out:
        out["retrans_bytes"] = out["bytes_retrans"]
    else:  # older kernels: segments x MSS (an upper bound)
        out["retrans_bytes"] = out.get("total_retrans", 0) * out.get("snd_mss", 0)
    return out


def _set_cc(sock: socket.socket, cc: str | None) -> str:
    if cc:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, cc.encode())
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, 16).rstrip(b"\0").decode()


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        part = sock.recv(n - len(buf))
        if not part:
            raise EOFError(f"connection closed after {len(buf)} of {n} bytes")
        buf += part
    return bytes(buf)


def _listen(bind: str) -> socket.socket:
    family = socket.AF_INET6 if ":" in bind else socket.AF_INET
    ls = socket.socket(family, socket.SOCK_STREAM)
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind((bind, 0))
    ls.listen(1)
    return ls


def server(args: Any) -> int:
    with _listen(args.bind) as ls:
        ls.settimeout(args.timeout)
        emit("ready", port=ls.getsockname()[1])
        conn, _ = ls.accept()
    cpu0 = cpu_seconds()
    with conn:
        conn.settimeout(args.timeout)
        cc = _set_cc(conn, args.cc)
        if args.workload == "bulk":
            sink = BulkSink()
            buf = bytearray(CHUNK)
            view = memoryview(buf)
            while n := conn.recv_into(buf):
                sink.feed(view[:n])
            t_eof = time.monotonic()
            conn.sendall(b"k")  # tells the sender that everything arrived
            return finish({"role": "receiver", "cc": cc, **sink.result(), "t_eof": t_eof}, cpu0)
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        checker = RequestChecker(args.seed)
        while True:
            first = conn.recv(RR_HEADER.size)
            if not first:
                break
            header = first + _recv_exact(conn, RR_HEADER.size - len(first))
            _, req_len, _ = RR_HEADER.unpack(header)
            conn.sendall(checker.response_for(header, _recv_exact(conn, req_len)))
        return finish(
            {
                "role": "server",
                "cc": cc,
                **checker.result(),
                "retrans_bytes": tcp_info(conn)["retrans_bytes"],
                "ok": checker.bad == 0,
            },
            cpu0,
        )


def client(args: Any) -> int:
    family = socket.AF_INET6 if ":" in args.to else socket.AF_INET
    payload = bulk_payload(args.size, args.seed) if args.workload == "bulk" else b""
    cpu0 = cpu_seconds()
    t_start = time.monotonic()
    with socket.socket(family, socket.SOCK_STREAM) as s:
        cc = _set_cc(s, args.cc)
        s.settimeout(args.timeout)
        s.connect((args.to, args.port))
        t_connected = time.monotonic()
        if args.workload == "bulk":
            view = memoryview(payload)
            for pos in range(0, len(view), CHUNK):
                s.sendall(view[pos : pos + CHUNK])
            s.shutdown(socket.SHUT_WR)
            ack = s.recv(16)  # the receiver answers once it has read to the end
            t_end = time.monotonic()
            info = tcp_info(s)
            return finish(
                {
                    "role": "sender",
                    "cc": cc,
                    "bytes": len(payload),
                    "t_start": t_start,
                    "t_connected": t_connected,
                    "t_end": t_end,
                    "retrans_bytes": info["retrans_bytes"],
                    "tcp_info": info,
                    "ok": ack == b"k",
                },
                cpu0,
            )
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        plan = RequestPlan(args)
        for i in range(len(plan.sizes)):
            t0 = time.monotonic()
            s.sendall(plan.request(i))
            resp = _recv_exact(s, plan.response)
            plan.check(i, resp, time.monotonic() - t0)
        s.shutdown(socket.SHUT_WR)
        s.recv(1)  # the server closes after the last response
        t_end = time.monotonic()
        info = tcp_info(s)
        return finish(
            {
                "role": "client",
                "cc": cc,
                **plan.result(),
                "t_start": t_start,
                "t_connected": t_connected,
                "t_end": t_end,
                "retrans_bytes": info["retrans_bytes"],
                "tcp_info": info,
                "ok": plan.bad == 0,
            },
            cpu0,
        )


def _options(p: Any) -> None:
    p.add_argument("--cc", default=None, help="TCP congestion control (TCP_CONGESTION)")


def main(argv: list[str] | None = None) -> int:
    args = runner_parser("python -m vtl.bench.tcp_runner", _options).parse_args(argv)
    try:
        return server(args) if args.role == "server" else client(args)
    except (OSError, EOFError) as exc:
        return fail(f"tcp {args.role}: {type(exc).__name__}: {exc}")


if __name__ == "__main__":
    sys.exit(main())
