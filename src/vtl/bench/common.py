"""What the benchmark endpoint processes share: payloads, the request/response
framing, clocks and the line protocol they speak with the orchestrator.

Every endpoint is a separate process started inside a network namespace
(``python -m vtl.bench.<transport>_runner server|client ...``). It writes
JSON lines on stdout:

* a server first prints ``{"event": "ready", "port": P}`` once it listens;
* a bulk receiver prints ``{"event": "progress", "bytes": N, "t": T}`` at most
  once a second, so a run that times out still shows how far it got;
* every endpoint ends with one ``{"event": "result", ...}`` line.

Times (``t_*``) are ``time.monotonic()`` values: CLOCK_MONOTONIC is shared by
all processes of the machine (network namespaces do not change it), so the
orchestrator subtracts a sender's start from a receiver's last byte.

This module is imported by the endpoint processes: keep it light.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import random
import resource
import signal
import struct
import sys
import time
from collections.abc import Callable
from typing import Any

#: bulk payload: `random.Random(seed).randbytes(size)` -- contains NUL bytes
#: and every other value; the orchestrator computes the same SHA-256 itself.
DEFAULT_SEED = 1

#: request header: index, request payload length, wanted response length
RR_HEADER = struct.Struct("!III")

#: the largest request or response a run may ask for
RR_MAX_MESSAGE = 16 << 20


def parse_size(text: str | int) -> int:
    """``"8MiB"``, ``"512K"``, ``"1.5M"``, ``"1000"`` -> bytes (binary units)."""
    if isinstance(text, int):
        return text
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    if t and t[-1] in units:
        return int(float(t[:-1]) * units[t[-1]])
    return int(t)


def format_size(n: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.4g}{unit}"
    return f"{n}B"


def bulk_payload(size: int, seed: int = DEFAULT_SEED) -> bytes:
    """The bulk transfer's bytes (deterministic, incompressible, with NULs)."""
    return random.Random(seed).randbytes(size)


def bulk_digest(size: int, seed: int = DEFAULT_SEED) -> str:
    return hashlib.sha256(bulk_payload(size, seed)).hexdigest()


def rr_payload(seed: int, index: int, direction: int, size: int) -> bytes:
    """Request (direction 0) or response (1) number `index` of a run."""
    return random.Random((seed << 32) ^ (index << 1) ^ direction).randbytes(size)


def rr_request_sizes(seed: int, count: int, lo: int, hi: int) -> list[int]:
    """Request sizes, uniform in [lo, hi], the same for every transport."""
    rng = random.Random(seed ^ 0x5EED)
    return [rng.randint(lo, hi) for _ in range(count)]


def cpu_seconds() -> float:
    """User + system CPU time of this process so far."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def emit(event: str, **fields: Any) -> None:
    print(json.dumps({"event": event, **fields}, default=str), flush=True)


class Progress:
    """Rate-limited ``progress`` lines of a bulk receiver."""

    def __init__(self, interval: float = 1.0) -> None:
        self.interval = interval
        self._next = time.monotonic() + interval

    def update(self, nbytes: int) -> None:
        now = time.monotonic()
        if now >= self._next:
            self._next = now + self.interval
            emit("progress", bytes=nbytes, t=now)


class BulkSink:
    """Hashes what a bulk receiver gets and remembers when it got it."""

    def __init__(self) -> None:
        self.digest = hashlib.sha256()
        self.bytes = 0
        self.t_first: float | None = None
        self.t_last: float | None = None
        self._progress = Progress()

    def feed(self, data: bytes | memoryview) -> None:
        if not data:
            return
        now = time.monotonic()
        if self.t_first is None:
            self.t_first = now
        self.t_last = now
        self.digest.update(data)
        self.bytes += len(data)
        self._progress.update(self.bytes)

    def result(self) -> dict[str, Any]:
        return {
            "bytes": self.bytes,
            "sha256": self.digest.hexdigest(),
            "t_first": self.t_first,
            "t_last": self.t_last,
        }


class RequestChecker:
    """Server side of request/response: checks each request, makes each response."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.count = 0
        self.bad = 0
        self.bytes_in = 0
        self.bytes_out = 0

    def response_for(self, header: bytes, body: bytes) -> bytes:
        index, req_len, resp_len = RR_HEADER.unpack(header)
        if len(body) != req_len or body != rr_payload(self.seed, index, 0, req_len):
            self.bad += 1
        self.count += 1
        self.bytes_in += RR_HEADER.size + len(body)
        resp = rr_payload(self.seed, index, 1, resp_len)
        self.bytes_out += len(resp)
        return resp

    def result(self) -> dict[str, Any]:
        return {
            "requests": self.count,
            "bad_requests": self.bad,
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
        }


class RequestPlan:
    """Client side of request/response: the requests to send and the checks."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.seed = args.seed
        self.sizes = rr_request_sizes(args.seed, args.count, args.request_min, args.request_max)
        self.response = args.response
        self.latencies: list[float] = []
        self.bad = 0
        self.bytes = 0

    def request(self, index: int) -> bytes:
        size = self.sizes[index]
        body = rr_payload(self.seed, index, 0, size)
        return RR_HEADER.pack(index, size, self.response) + body

    def check(self, index: int, response: bytes, seconds: float) -> None:
        if response != rr_payload(self.seed, index, 1, self.response):
            self.bad += 1
        self.latencies.append(seconds)
        self.bytes += RR_HEADER.size + self.sizes[index] + len(response)

    def result(self) -> dict[str, Any]:
        return {
            "responses": len(self.latencies),
            "bad_responses": self.bad,
            "bytes": self.bytes,
            "latencies_ms": [round(x * 1e3, 4) for x in self.latencies],
        }


def runner_parser(prog: str, add_options: Callable[[argparse.ArgumentParser], None]) -> Any:
    """The command line every runner module accepts (plus its own options)."""
    p = argparse.ArgumentParser(prog=prog)
    sub = p.add_subparsers(dest="role", required=True)
    srv = sub.add_parser("server")
    srv.add_argument("--bind", default="0.0.0.0")
    cli = sub.add_parser("client")
    cli.add_argument("--to", required=True)
    cli.add_argument("--port", type=int, required=True)
    cli.add_argument("--size", type=parse_size, default=1 << 20, help="bulk bytes")
    cli.add_argument("--count", type=int, default=20, help="request/response round trips")
    cli.add_argument("--request-min", type=int, default=64)
    cli.add_argument("--request-max", type=int, default=1024)
    cli.add_argument("--response", type=int, default=1024)
    for q in (srv, cli):
        q.add_argument("--workload", choices=("bulk", "rr"), required=True)
        q.add_argument("--seed", type=int, default=DEFAULT_SEED)
        q.add_argument("--timeout", type=float, default=120.0)
        add_options(q)
    return p


def finish(result: dict[str, Any], cpu0: float) -> int:
    """Print the result line (with CPU seconds since `cpu0`) and pick the exit code."""
    result["cpu_s"] = round(cpu_seconds() - cpu0, 4)
    result["cpu_total_s"] = round(cpu_seconds(), 4)
    emit("result", **result)
    return 0 if result.get("ok", True) else 1


def fail(message: str) -> int:
    emit("result", ok=False, error=message)
    print(message, file=sys.stderr, flush=True)
    return 1


def stop_event() -> asyncio.Event:
    """An event set by SIGTERM (the orchestrator's "the client is done, report now")."""
    ev = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, ev.set)
    return ev


async def wait_or_stop(aw: Any, stop: asyncio.Event, timeout: float | None = None) -> bool:
    """Wait for `aw` until `stop` is set or `timeout` passes; True if `aw` finished."""
    main = asyncio.ensure_future(aw)
    stopped = asyncio.ensure_future(stop.wait())
    try:
        done, _ = await asyncio.wait(
            (main, stopped), timeout=timeout, return_when=asyncio.FIRST_COMPLETED
        )
    finally:
        for fut in (main, stopped):
            fut.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await main
    return main in done
