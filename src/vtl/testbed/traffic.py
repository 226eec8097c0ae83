"""Traffic generators and sinks used to validate the link emulator.

Run inside a host namespace (``host.popen([sys.executable, "-m",
"vtl.testbed.traffic", MODE, ...])``); each mode prints one JSON line with
its results on stdout (sinks first print ``READY <port>``).

- ``udp-sink``: counts datagrams with sequence numbers: loss, loss-burst
  lengths, duplicates, reordering, corrupted payloads, one-way delay and
  receive rate (IP bytes).
- ``udp-blast``: sends numbered datagrams, paced at ``--pps`` (0: flat out).
- ``tcp-sink`` / ``tcp-send``: a bulk TCP transfer; the sink samples the
  received bytes every 50 ms so that a steady-state goodput can be computed.

CLOCK_MONOTONIC is shared by all network namespaces, so the one-way delay is
exact (sender and sink timestamps come from the same clock).
Standard library only.
"""

from __future__ import annotations

import argparse
import json
import math
import socket
import struct
import sys
import time
from array import array
from typing import Any

__all__ = ["main", "steady_goodput_mbps"]

HEADER = struct.Struct("!Qd")  # sequence number, send time (monotonic)
FILLER = bytes((i * 7 + 3) & 0xFF for i in range(65536))


def _family(addr: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in addr else socket.AF_INET


def _ip_overhead(addr: str) -> int:
    return 48 if ":" in addr else 28  # IP + UDP headers


def udp_sink(args: argparse.Namespace) -> dict[str, Any]:
    s = socket.socket(_family(args.bind), socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 << 20)
    s.bind((args.bind, args.port))
    print(f"READY {s.getsockname()[1]}", flush=True)
    seqs = array("q")
    arrivals = array("d")
    owds = array("d")
    sizes = 0
    corrupted = 0
    buf = bytearray(65536)
    hlen = HEADER.size
    deadline = time.monotonic() + args.timeout
    s.settimeout(min(args.idle, args.timeout))
    while True:
        try:
            n = s.recv_into(buf)
        except TimeoutError:
            if seqs or time.monotonic() > deadline:
                break
            continue
        now = time.monotonic()
        if n < hlen:
            corrupted += 1
            continue
        seq, sent = HEADER.unpack_from(buf)
        if buf[hlen:n] != FILLER[: n - hlen]:
            corrupted += 1
            continue
        seqs.append(seq)
        arrivals.append(now)
        owds.append(now - sent)
        sizes += n
        if now > deadline or (args.count and len(seqs) >= args.count * 2):
            break
    s.close()
    return _sink_report(seqs, arrivals, owds, sizes, corrupted, args)


def _sink_report(seqs, arrivals, owds, sizes, corrupted, args) -> dict[str, Any]:
    total = len(seqs)
    seen: set[int] = set()
    dup = reordered = 0
    highest = -1
    for q in seqs:
        if q in seen:
            dup += 1
            continue
        seen.add(q)
        if q < highest:
            reordered += 1
        else:
            highest = q
    expected = args.count or (highest + 1)
    unique = len([q for q in seen if q < expected])
    # Runs of consecutive missing sequence numbers.
    runs: list[int] = []
    run = 0
    for q in range(expected):
        if q in seen:
            if run:
                runs.append(run)
            run = 0
        else:
            run += 1
    if run:
        runs.append(run)
    lost = expected - unique
    out: dict[str, Any] = {
        "received": total,
        "unique": unique,
        "expected": expected,
        "lost": lost,
        "loss": lost / expected if expected else 0.0,
        "loss_bursts": len(runs),
        "mean_burst": (sum(runs) / len(runs)) if runs else 0.0,
        "max_burst": max(runs) if runs else 0,
        "duplicates": dup,
        "reordered": reordered,
        "corrupted": corrupted,
        "payload_bytes": sizes,
    }
    if total >= 2:
        span = arrivals[-1] - arrivals[0]
        avg = sizes / total
        ip_bytes = (avg + _ip_overhead(args.bind)) * (total - 1)
        out["span_s"] = span
        out["rate_mbps_ip"] = ip_bytes * 8 / span / 1e6 if span > 0 else math.inf
        out["pps"] = (total - 1) / span if span > 0 else math.inf
    if owds:
        srt = sorted(owds)
        out["owd_ms"] = {
            "min": srt[0] * 1e3,
            "median": srt[len(srt) // 2] * 1e3,
            "mean": sum(srt) / len(srt) * 1e3,
            "p99": srt[min(len(srt) - 1, int(len(srt) * 0.99))] * 1e3,
            "max": srt[-1] * 1e3,
        }
    return out


def udp_blast(args: argparse.Namespace) -> dict[str, Any]:
    s = socket.socket(_family(args.to), socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8 << 20)
    s.connect((args.to, args.port))
    if args.size < HEADER.size:
        raise SystemExit(f"--size must be >= {HEADER.size}")
    filler = FILLER[: args.size - HEADER.size]
    pack = HEADER.pack
    send = s.send
    monotonic = time.monotonic
    errors = 0
    start = monotonic()
    per_ms = args.pps / 1000.0 if args.pps else 0.0
    seq = 0
    while seq < args.count:
        if per_ms:
            # Pace: packet `seq` is due at start + seq / pps (sent in ~1 ms batches).
            due = start + seq / args.pps
            now = monotonic()
            if due > now:
                time.sleep(due - now)
            burst = max(1, int(per_ms))
        else:
            burst = 256
        for _ in range(min(burst, args.count - seq)):
            try:
                send(pack(seq, monotonic()) + filler)
            except OSError:
                errors += 1  # ENOBUFS and the like: counted, and the number is used up
            seq += 1
    elapsed = monotonic() - start
    return {"sent": seq, "errors": errors, "elapsed_s": elapsed, "pps": seq / elapsed}


def tcp_sink(args: argparse.Namespace) -> dict[str, Any]:
    ls = socket.socket(_family(args.bind), socket.SOCK_STREAM)
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind((args.bind, args.port))
    ls.listen(1)
    print(f"READY {ls.getsockname()[1]}", flush=True)
    ls.settimeout(args.timeout)
    conn, _ = ls.accept()
    conn.settimeout(args.timeout)
    buf = bytearray(1 << 20)
    total = 0
    start = time.monotonic()
    samples = [(0.0, 0)]
    next_sample = start + 0.05
    while True:
        n = conn.recv_into(buf)
        now = time.monotonic()
        if n == 0:
            break
        total += n
        if now >= next_sample:
            samples.append((now - start, total))
            next_sample = now + 0.05
    samples.append((time.monotonic() - start, total))
    conn.close()
    ls.close()
    return {"bytes": total, "elapsed_s": samples[-1][0], "samples": samples}


def tcp_send(args: argparse.Namespace) -> dict[str, Any]:
    s = socket.socket(_family(args.to), socket.SOCK_STREAM)
    if args.cc:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, args.cc.encode())
    s.connect((args.to, args.port))
    chunk = bytes(1 << 16)
    sent = 0
    end = time.monotonic() + args.seconds
    while time.monotonic() < end:
        sent += s.send(chunk)
    s.shutdown(socket.SHUT_WR)
    s.recv(1)  # wait for the sink to close: everything was delivered
    s.close()
    return {"bytes": sent}


def steady_goodput_mbps(samples: list, skip_s: float) -> float:
    """Goodput (Mbit/s) between `skip_s` and the last sample (ignores slow start)."""
    pts = [(t, b) for t, b in samples if t >= skip_s]
    if len(pts) < 2:
        raise ValueError("not enough samples after the warm-up")
    (t0, b0), (t1, b1) = pts[0], pts[-1]
    return (b1 - b0) * 8 / (t1 - t0) / 1e6


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m vtl.testbed.traffic")
    sub = p.add_subparsers(dest="mode", required=True)
    k = sub.add_parser("udp-sink")
    k.add_argument("--bind", required=True)
    k.add_argument("--port", type=int, default=0)
    k.add_argument("--count", type=int, default=0, help="datagrams the sender sends")
    k.add_argument("--idle", type=float, default=1.0, help="stop after this long without data")
    k.add_argument("--timeout", type=float, default=60.0)
    k = sub.add_parser("udp-blast")
    k.add_argument("--to", required=True)
    k.add_argument("--port", type=int, required=True)
    k.add_argument("--count", type=int, required=True)
    k.add_argument("--size", type=int, default=1400, help="UDP payload bytes")
    k.add_argument("--pps", type=float, default=0.0, help="packets/s (0: as fast as possible)")
    k = sub.add_parser("tcp-sink")
    k.add_argument("--bind", required=True)
    k.add_argument("--port", type=int, default=0)
    k.add_argument("--timeout", type=float, default=60.0)
    k = sub.add_parser("tcp-send")
    k.add_argument("--to", required=True)
    k.add_argument("--port", type=int, required=True)
    k.add_argument("--seconds", type=float, default=3.0)
    k.add_argument("--cc", help="TCP congestion control (cubic, bbr, reno)")
    args = p.parse_args(argv)
    fn = {"udp-sink": udp_sink, "udp-blast": udp_blast, "tcp-sink": tcp_sink, "tcp-send": tcp_send}
    result = fn[args.mode](args)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
