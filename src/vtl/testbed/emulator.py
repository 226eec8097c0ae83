"""The link emulator: a user-space layer-2 relay between two interfaces.

This kernel has no sch_netem, so delay (and everything else a link does to
packets) is emulated here. One emulator process runs per emulated link, in a
relay namespace ``R`` between the two hosts::

    host X [ethK] ==veth== [ra] R [rb] ==veth== [ethM] host Y

It opens an AF_PACKET raw socket on each of ``ra`` and ``rb`` (ETH_P_ALL,
PACKET_IGNORE_OUTGOING so it does not see its own sends, promiscuous) and
forwards every frame from ``ra`` to ``rb`` (direction ``a->b``) and back
(``b->a``), applying that direction's :class:`Conditions`. X and Y are on one
Ethernet segment (same subnet); ARP and NDP cross the emulator too. Rate
and delay apply to every frame; loss, corruption, duplication, reordering
and queue-overflow drops only to IP packets, and never to ARP, IPv6
neighbour discovery (ICMPv6 types 133-137) or MLD, so that hosts do not
stall on address resolution.

Scheduling: each packet's departure time is computed when it arrives (queue
and serialisation at the rate or at the trace's delivery opportunities, then
delay and jitter), so a single-threaded ``select`` loop only has to sleep
until the next departure. In-order packets go to a FIFO per direction
(departure times never decrease); packets picked for reordering go to a heap.
A direction without any impairment forwards at once.

Control: a Unix stream socket accepting one JSON line per connection and
answering one JSON line::

    {"set": {"dir": "a->b"|"b->a"|"both", "delay_ms": 30, ...}, "replace": false}
    {"stats": true}            {"get": true}         {"reset_stats": true}

``set`` merges the given fields into the current conditions (``replace``:
start from no impairment); changes apply to packets arriving afterwards.

Run as ``python -m vtl.testbed.emulator --iface-a ra --iface-b rb --control
PATH [--config JSON]`` inside the relay namespace (the topology does that).
Standard library only.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import heapq
import json
import math
import os
import random
import select
import signal
import socket
import struct
import sys
import time
from bisect import bisect_left
from collections import deque
from typing import Any

from vtl.testbed.linkspec import Conditions
from vtl.testbed.traces import OPPORTUNITY_BYTES, load_trace

__all__ = ["DIRECTIONS", "Emulator", "control", "main"]

DIRECTIONS = ("a->b", "b->a")

ETH_P_ALL = 0x0003
SOL_PACKET = 263
PACKET_ADD_MEMBERSHIP = 1
PACKET_MR_PROMISC = 1
PACKET_STATISTICS = 6
PACKET_IGNORE_OUTGOING = 23
SO_RCVBUFFORCE = 33
SO_SNDBUFFORCE = 32
PR_SET_PDEATHSIG = 1
PR_SET_TIMERSLACK = 29

ETH_HLEN = 14
ETHERTYPE_IPV4 = b"\x08\x00"
ETHERTYPE_IPV6 = b"\x86\xdd"

BATCH = 64  # frames read from one socket before due departures are served again
# select() wakes up ~60 us after the requested time on the reference VM (with a
# 1 ns timer slack): aim that much early, and send packets due within EARLY,
# so that departure errors centre on zero instead of always being late.
EARLY = 60e-6
SOCKET_BUFFER = 2 << 20  # ~900 full-size frames: overload shows as drop_kernel, not hidden delay


def _frame_impairable(frame: bytes) -> bool:
    """IP packets may be lost/corrupted/duplicated/reordered; ARP and NDP may not."""
    et = frame[12:14]
    if et == ETHERTYPE_IPV4:
        return True
    if et == ETHERTYPE_IPV6 and len(frame) > 54:
        nh = frame[20]
        if nh == 58:  # ICMPv6 router/neighbour discovery (133-137)
            return not 133 <= frame[54] <= 137
        # MLD: ICMPv6 behind a hop-by-hop (router alert) header
        return not (nh == 0 and frame[54] == 58)
    return et == ETHERTYPE_IPV6


def _corrupt(frame: bytes, rng: random.Random) -> bytes | None:
    """Flip one random bit of the IP payload (after the IP header); None if there is none."""
    ipv4 = frame[12:14] == ETHERTYPE_IPV4
    start = ETH_HLEN + ((frame[ETH_HLEN] & 0x0F) * 4 if ipv4 else 40)
    if start >= len(frame):
        return None
    buf = bytearray(frame)
    pos = rng.randrange(start, len(buf))
    buf[pos] ^= 1 << rng.randrange(8)
    return bytes(buf)


class Direction:
    """One direction of the link: conditions, queue state, scheduled packets, counters."""

    STAT_FIELDS = (
        "rx_packets",
        "rx_bytes",
        "tx_packets",
        "tx_bytes",
        "non_ip",
        "drop_loss",
        "drop_burst",
        "drop_queue",
        "drop_send",
        "duplicated",
        "corrupted",
        "reordered",
        "queue_hwm_bytes",
        "queue_hwm_packets",
    )

    def __init__(self, name: str, out: socket.socket, rng: random.Random):
        self.name = name
        self.out = out
        self.rng = rng
        self.fifo: deque[tuple[float, bytes]] = deque()  # (due, frame), due never decreases
        self.heap: list[tuple[float, int, bytes]] = []  # reordered packets: (due, seq, frame)
        self.seq = 0
        self.last_due = 0.0  # departure of the latest in-order packet
        self.link_free = 0.0  # when the link finishes serialising what is queued
        self.qlog: deque[tuple[float, int]] = deque()  # (tx_done, size) of queued packets
        self.qbytes = 0
        self.ge_bad = False
        self.drop_kernel = 0
        self.reset_stats()
        self.cond = Conditions()
        self.configure(Conditions(), time.monotonic())

    def reset_stats(self) -> None:
        for f in self.STAT_FIELDS:
            setattr(self, f, 0)
        self.late_sum = 0.0
        self.late_n = 0
        self.late_max = 0.0
        self.drop_kernel = 0

    # -- configuration

    def configure(self, cond: Conditions, now: float) -> None:
        cond.validate()
        old_trace = self.cond.trace
        self.cond = cond
        self.delay = cond.delay_ms / 1000.0
        self.jitter = cond.jitter_ms / 1000.0
        self.p_loss = cond.loss / 100.0
        self.ge = cond.burst if cond.burst and cond.burst[0] > 0 and cond.burst[2] > 0 else None
        if self.ge is None:
            self.ge_bad = False
        self.p_reorder = cond.reorder / 100.0
        self.reorder_delay = cond.reorder_delay_ms / 1000.0
        self.p_dup = cond.duplicate / 100.0
        self.p_corrupt = cond.corrupt / 100.0
        self.impair = bool(self.p_loss or self.ge or self.p_reorder or self.p_dup or self.p_corrupt)
        self.byte_time = 0.0
        self.trace: list[int] | None = None
        if cond.trace is not None:
            stamps = load_trace(cond.trace)
            self.trace = stamps
            self.trace_n = len(stamps)
            self.trace_period = stamps[-1] / 1000.0
            self.trace_s = [ms / 1000.0 for ms in stamps]
            if cond.trace != old_trace or not hasattr(self, "trace_start"):
                self.trace_start = now  # the trace starts (again) now
                self.opp_k = -1  # no opportunity in use yet
                self.opp_left = 0
        elif cond.rate_mbps is not None:
            self.byte_time = 8.0 / (cond.rate_mbps * 1e6)
        self.shaped = self.trace is not None or self.byte_time > 0
        self.qlimit = cond.effective_queue_bytes() or 0
        self.qlimit_pkts = cond.queue_packets or 0
        self.passthrough = not (self.shaped or self.impair or self.delay or self.jitter)
        self.delay_only = not (self.shaped or self.impair or self.jitter)

    # -- trace-driven serialisation (mahimahi semantics)

    def _opp_time(self, k: int) -> float:
        loop, i = divmod(k, self.trace_n)
        return self.trace_start + loop * self.trace_period + self.trace_s[i]

    def _first_opp_at_or_after(self, t: float) -> int:
        rel = t - self.trace_start
        loop = math.floor(rel / self.trace_period)
        i = bisect_left(self.trace_s, rel - loop * self.trace_period)
        if i == self.trace_n:
            loop, i = loop + 1, 0
        return loop * self.trace_n + i

    def _trace_tx_done(self, size: int, now: float) -> float:
        """When the last byte of a `size`-byte packet arriving at `now` is delivered.

        Each opportunity carries up to 1500 bytes; a packet may span several,
        and bytes left in an opportunity serve the next packet. Opportunities
        that pass while the queue is empty are lost (as in mahimahi).
        """
        k, left = self.opp_k, self.opp_left
        if k < 0 or left == 0 or self._opp_time(k) < now:
            if k >= 0 and left == 0 and self._opp_time(k + 1) >= now:
                k += 1
            else:
                k = self._first_opp_at_or_after(now)
            left = OPPORTUNITY_BYTES
        need = size
        while need > left:
            need -= left
            k += 1
            left = OPPORTUNITY_BYTES
        left -= need
        self.opp_k, self.opp_left = k, left
        return self._opp_time(k)

    # -- the data path

    def receive(self, frame: bytes, now: float) -> None:
        """Schedule (or drop) a frame that arrived at `now`."""
        size = len(frame) - ETH_HLEN
        self.rx_packets += 1
        self.rx_bytes += size
        if self.delay_only:  # fast path: a constant delay, FIFO
            due = now + self.delay
            if due < self.last_due:
                due = self.last_due
            self.last_due = due
            self.fifo.append((due, frame))
            return
        t = now
        if self.shaped:
            q = self.qlog
            while q and q[0][0] <= now:
                self.qbytes -= q.popleft()[1]
            if (
                (self.qbytes + size > self.qlimit)
                or (self.qlimit_pkts and len(q) >= self.qlimit_pkts)
            ) and _frame_impairable(frame):  # ARP/NDP pass a full queue (no stalls)
                self.drop_queue += 1
                return
            if self.trace is not None:
                t = self._trace_tx_done(size, now)
            else:
                t = (self.link_free if self.link_free > now else now) + size * self.byte_time
            self.link_free = t
            q.append((t, size))
            self.qbytes += size
            if self.qbytes > self.queue_hwm_bytes:
                self.queue_hwm_bytes = self.qbytes
            if len(q) > self.queue_hwm_packets:
                self.queue_hwm_packets = len(q)
        dup = reorder = False
        if self.impair:
            if not _frame_impairable(frame):
                self.non_ip += 1
            else:
                rnd = self.rng.random
                if self.ge is not None:
                    g2b, b2g, h = self.ge
                    if self.ge_bad:
                        if rnd() < b2g:
                            self.ge_bad = False
                    elif rnd() < g2b:
                        self.ge_bad = True
                    if self.ge_bad and rnd() < h:
                        self.drop_burst += 1
                        return
                if self.p_loss and rnd() < self.p_loss:
                    self.drop_loss += 1
                    return
                if self.p_corrupt and rnd() < self.p_corrupt:
                    bad = _corrupt(frame, self.rng)
                    if bad is not None:
                        frame = bad
                        self.corrupted += 1
                if self.p_dup and rnd() < self.p_dup:
                    dup = True
                    self.duplicated += 1
                if self.p_reorder and rnd() < self.p_reorder:
                    reorder = True
                    self.reordered += 1
        due = t + self.delay
        if self.jitter:
            due += self.rng.uniform(-self.jitter, self.jitter)
            if due < t:
                due = t
        if reorder:
            self.seq += 1
            heapq.heappush(self.heap, (due + self.reorder_delay, self.seq, frame))
            return
        if due < self.last_due:
            due = self.last_due  # FIFO: never overtake the packet ahead
        self.last_due = due
        self.fifo.append((due, frame))
        if dup:
            self.fifo.append((due, frame))

    def next_due(self) -> float:
        t = self.fifo[0][0] if self.fifo else math.inf
        if self.heap and self.heap[0][0] < t:
            t = self.heap[0][0]
        return t

    def flush(self, now: float) -> None:
        """Send every packet due by `now` (+EARLY), in order of departure."""
        fifo, heap, send = self.fifo, self.heap, self.out.send
        limit = now + EARLY
        late_max = self.late_max
        late_sum = 0.0
        n = nbytes = drops = 0
        if not heap:  # common case: only in-order packets
            if fifo and now - fifo[0][0] > late_max:
                late_max = now - fifo[0][0]  # the first one is the latest (FIFO)
            while fifo and fifo[0][0] <= limit:
                due, frame = fifo.popleft()
                try:
                    send(frame)
                except OSError:
                    drops += 1
                    continue
                n += 1
                nbytes += len(frame)
                late_sum += now - due
        else:
            while True:
                if fifo and fifo[0][0] <= limit and not (heap and heap[0][0] < fifo[0][0]):
                    due, frame = fifo.popleft()
                elif heap and heap[0][0] <= limit:
                    due, _, frame = heapq.heappop(heap)
                else:
                    break
                try:
                    send(frame)
                except OSError:
                    drops += 1
                    continue
                n += 1
                nbytes += len(frame)
                late = now - due
                late_sum += late
                if late > late_max:
                    late_max = late
        self.tx_packets += n
        self.tx_bytes += nbytes - n * ETH_HLEN
        self.drop_send += drops
        self.late_sum += late_sum
        self.late_n += n
        self.late_max = late_max

    @property
    def pending(self) -> int:
        return len(self.fifo) + len(self.heap)

    def stats(self, now: float) -> dict[str, Any]:
        q = self.qlog
        while q and q[0][0] <= now:
            self.qbytes -= q.popleft()[1]
        d: dict[str, Any] = {f: getattr(self, f) for f in self.STAT_FIELDS}
        d["drop_kernel"] = self.drop_kernel
        d["queue_bytes"] = self.qbytes
        d["queue_packets"] = len(q)
        d["queue_limit_bytes"] = self.qlimit or None
        d["in_flight"] = self.pending
        d["late_mean_us"] = round(1e6 * self.late_sum / self.late_n, 1) if self.late_n else 0.0
        d["late_max_us"] = round(1e6 * self.late_max, 1)
        return d


def _open_packet_socket(ifname: str) -> socket.socket:
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    try:
        s.setsockopt(SOL_PACKET, PACKET_IGNORE_OUTGOING, 1)
        bufopts = ((SO_RCVBUFFORCE, socket.SO_RCVBUF), (SO_SNDBUFFORCE, socket.SO_SNDBUF))
        for opt, fallback in bufopts:
            try:
                s.setsockopt(socket.SOL_SOCKET, opt, SOCKET_BUFFER)
            except OSError:
                s.setsockopt(socket.SOL_SOCKET, fallback, SOCKET_BUFFER)
        s.bind((ifname, ETH_P_ALL))
        ifindex = socket.if_nametoindex(ifname)
        mreq = struct.pack("iHH8s", ifindex, PACKET_MR_PROMISC, 0, b"")
        s.setsockopt(SOL_PACKET, PACKET_ADD_MEMBERSHIP, mreq)
        s.setblocking(False)
    except BaseException:
        s.close()
        raise
    # Frames that arrived before PACKET_IGNORE_OUTGOING/bind took effect are stale.
    with contextlib.suppress(BlockingIOError):
        while True:
            s.recv(65536)
    return s


def _kernel_drops(s: socket.socket) -> int:
    """Frames the kernel dropped for this socket since the last call (buffer full)."""
    try:
        _packets, drops = struct.unpack("II", s.getsockopt(SOL_PACKET, PACKET_STATISTICS, 8))
    except OSError:
        return 0
    return drops


def _prctl(option: int, arg: int) -> None:
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(option, ctypes.c_ulong(arg), 0, 0, 0)


def _proc_start_time(pid: int) -> str | None:
    try:
        stat = open(f"/proc/{pid}/stat").read()  # noqa: SIM115
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[-1].split()
    if len(fields) < 20 or fields[0] in ("Z", "X"):
        return None
    return fields[19]


def _parse_dirs(spec: str | None) -> tuple[str, ...]:
    if spec in (None, "both", "*"):
        return DIRECTIONS
    if spec in DIRECTIONS:
        return (spec,)
    raise ValueError(f"dir must be 'a->b', 'b->a' or 'both', got {spec!r}")


class Emulator:
    """The relay: two packet sockets, two Directions, a control socket, one loop."""

    def __init__(
        self,
        iface_a: str,
        iface_b: str,
        control_path: str | None = None,
        config: dict[str, Any] | None = None,
        *,
        seed: int | None = None,
        bufsize: int = 65536,
        owner: tuple[int, str] | None = None,
    ):
        self.rng = random.Random(seed)
        self.bufsize = bufsize
        self.owner = owner
        self.sock_a = _open_packet_socket(iface_a)
        self.sock_b = _open_packet_socket(iface_b)
        self.ifaces = (iface_a, iface_b)
        self.dirs = {
            "a->b": Direction("a->b", self.sock_b, self.rng),
            "b->a": Direction("b->a", self.sock_a, self.rng),
        }
        now = time.monotonic()
        for name, cond in (config or {}).items():
            for d in _parse_dirs(name):
                self.dirs[d].configure(Conditions.from_dict(cond), now)
        self.control_path = control_path
        self.ctl: socket.socket | None = None
        if control_path:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(control_path)
            self.ctl = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.ctl.bind(control_path)
            self.ctl.listen(16)
            self.ctl.setblocking(False)
        self.started = time.monotonic()
        self.running = True

    def close(self) -> None:
        for s in (self.sock_a, self.sock_b, self.ctl):
            if s is not None:
                s.close()
        if self.control_path:
            with contextlib.suppress(OSError):
                os.unlink(self.control_path)

    # -- control

    def handle(self, msg: dict[str, Any]) -> dict[str, Any]:
        now = time.monotonic()
        reply: dict[str, Any] = {"ok": True}
        if "set" in msg:
            fields = dict(msg["set"] or {})
            dirs = _parse_dirs(fields.pop("dir", None))
            new = {}
            for d in dirs:  # validate everything before changing anything
                base = Conditions() if msg.get("replace") else self.dirs[d].cond
                new[d] = base.replace(**fields)
            for d, cond in new.items():
                self.dirs[d].configure(cond, now)
        if msg.get("reset_stats"):
            for d in self.dirs.values():
                d.reset_stats()
            self.started = now
        if msg.get("stop"):
            self.running = False
        if msg.get("stats"):
            self._collect_kernel_drops()
            reply["stats"] = {name: d.stats(now) for name, d in self.dirs.items()}
            reply["uptime_s"] = round(now - self.started, 3)
        reply["conditions"] = {name: d.cond.to_dict() for name, d in self.dirs.items()}
        return reply

    def _collect_kernel_drops(self) -> None:
        self.dirs["a->b"].drop_kernel += _kernel_drops(self.sock_a)
        self.dirs["b->a"].drop_kernel += _kernel_drops(self.sock_b)

    def _serve_control(self) -> None:
        assert self.ctl is not None
        while True:
            try:
                conn, _ = self.ctl.accept()
            except BlockingIOError:
                return
            with conn:
                conn.settimeout(1.0)
                try:
                    data = b""
                    while not data.endswith(b"\n") and len(data) < 1 << 20:
                        chunk = conn.recv(65536)
                        if not chunk:
                            break
                        data += chunk
                    try:
                        msg = json.loads(data)
                        if not isinstance(msg, dict):
                            raise ValueError("request must be a JSON object")
                        reply = self.handle(msg)
                    except (ValueError, TypeError, KeyError, OSError) as exc:
                        reply = {"ok": False, "error": str(exc)}
                    conn.sendall(json.dumps(reply).encode() + b"\n")
                except OSError:
                    pass

    # -- the loop

    def _owner_gone(self) -> bool:
        if self.owner is None:
            return False
        pid, start = self.owner
        return _proc_start_time(pid) != start

    def run(self) -> None:
        ab, ba = self.dirs["a->b"], self.dirs["b->a"]
        by_sock = {self.sock_a: ab, self.sock_b: ba}
        rlist: list[socket.socket] = [self.sock_a, self.sock_b]
        if self.ctl is not None:
            rlist.append(self.ctl)
        ctl = self.ctl
        bufsize = self.bufsize
        monotonic = time.monotonic
        sel = select.select
        next_check = monotonic() + 1.0
        while self.running:
            now = monotonic()
            soon = now + EARLY
            t1 = ab.next_due()
            if t1 <= soon:
                ab.flush(now)
                t1 = ab.next_due()
            t2 = ba.next_due()
            if t2 <= soon:
                ba.flush(now)
                t2 = ba.next_due()
            nxt = (t1 if t1 < t2 else t2) - EARLY
            if now >= next_check:
                next_check = now + 1.0
                self._collect_kernel_drops()
                if self._owner_gone():
                    return
            timeout = nxt - monotonic()
            if timeout > 1.0:
                timeout = 1.0
            elif timeout > 0.002:
                # Long sleeps wake up late (idle vCPUs: ~0.2-0.3 ms after 25-200 ms
                # here, ~0.05 ms after 1 ms), so sleep in two steps: most of the
                # way, then a short precise sleep.
                timeout -= 0.001
            elif timeout < 0:
                timeout = 0
            try:
                ready, _, _ = sel(rlist, [], [], timeout)
            except InterruptedError:
                continue
            for s in ready:
                if s is ctl:
                    self._serve_control()
                    continue
                d = by_sock[s]
                recv = s.recv
                for _ in range(BATCH):
                    try:
                        frame = recv(bufsize)
                    except (BlockingIOError, InterruptedError):
                        break
                    if d.passthrough and not (d.fifo or d.heap):
                        size = len(frame) - ETH_HLEN
                        d.rx_packets += 1
                        d.rx_bytes += size
                        try:
                            d.out.send(frame)
                        except OSError:
                            d.drop_send += 1
                            continue
                        d.tx_packets += 1
                        d.tx_bytes += size
                    else:
                        d.receive(frame, monotonic())
                # Serve what became due while reading (keeps departures punctual).
                now = monotonic()
                if ab.fifo or ab.heap:
                    ab.flush(now)
                if ba.fifo or ba.heap:
                    ba.flush(now)


def control(path: str, msg: dict[str, Any], timeout: float = 5.0) -> dict[str, Any]:
    """Send one request to an emulator's control socket and return its reply.

    Raises OSError if the emulator cannot be reached and RuntimeError if it
    answers with an error.
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(path)
        s.sendall(json.dumps(msg).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    if not data:
        raise OSError(f"no reply from the emulator at {path}")
    reply = json.loads(data)
    if not reply.get("ok"):
        raise RuntimeError(reply.get("error", "emulator error"))
    return reply


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m vtl.testbed.emulator", description="user-space L2 link emulator"
    )
    p.add_argument("--iface-a", required=True, help="interface towards host a")
    p.add_argument("--iface-b", required=True, help="interface towards host b")
    p.add_argument("--control", help="Unix socket path for the control channel")
    p.add_argument(
        "--config",
        default="{}",
        help='JSON {"a->b": {conditions}, "b->a": {...}} (or "both")',
    )
    p.add_argument("--seed", type=int, help="random seed (loss, jitter, ...)")
    p.add_argument("--owner", help="PID:STARTTIME of the controlling process; exit when it is gone")
    p.add_argument("--nice", type=int, default=-10, help="scheduling niceness (default -10)")
    p.add_argument("--bufsize", type=int, default=65536, help="largest frame read")
    args = p.parse_args(argv)

    owner = None
    if args.owner:
        pid, _, start = args.owner.partition(":")
        owner = (int(pid), start)
        # Hear about the parent's death at once (checked against the owner, since
        # the death signal really reports the exit of the thread that forked us).
        _prctl(PR_SET_PDEATHSIG, signal.SIGUSR1)
    _prctl(PR_SET_TIMERSLACK, 1)  # wake up on time (default slack is 50 us)
    if args.nice:
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, 0, args.nice)

    emu = Emulator(
        args.iface_a,
        args.iface_b,
        args.control,
        json.loads(args.config),
        seed=args.seed,
        bufsize=args.bufsize,
        owner=owner,
    )

    def stop(signum: int, frame: Any) -> None:
        if signum != signal.SIGUSR1 or emu._owner_gone():
            emu.running = False
            raise SystemExit(0)  # out of select() at once (it would otherwise resume)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1):
        signal.signal(sig, stop)
    print(f"emulator ready: {args.iface_a} <-> {args.iface_b}", flush=True)
    try:
        emu.run()
    finally:
        emu.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
