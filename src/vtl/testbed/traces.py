"""Packet-delivery traces in mahimahi format, and a generator for cellular-like ones.

A mahimahi trace is a text file with one integer per line: a time in
milliseconds at which the link may deliver one MTU-sized packet (1500 bytes).
Several lines may carry the same time (several opportunities in that
millisecond). The trace loops: its period is the last timestamp. A constant
12 Mbit/s link is one line per millisecond (1500 B x 8 / 1 ms = 12 Mbit/s).

Only the standard library is used (the emulator process imports this).
"""

from __future__ import annotations

import math
import os
import random
from collections.abc import Sequence
from pathlib import Path

__all__ = [
    "OPPORTUNITY_BYTES",
    "TRACE_KINDS",
    "cellular_trace",
    "constant_trace",
    "generate",
    "load_trace",
    "trace_mean_mbps",
    "trace_summary",
    "write_trace",
]

OPPORTUNITY_BYTES = 1500  # one delivery opportunity = one MTU-sized packet
_BITS_PER_OPP = OPPORTUNITY_BYTES * 8


def load_trace(path: str | os.PathLike[str]) -> list[int]:
    """Read a mahimahi trace: sorted millisecond timestamps (ValueError if malformed)."""
    stamps: list[int] = []
    with open(path, encoding="ascii") as f:
        for lineno, line in enumerate(f, 1):
            text = line.strip()
            if not text or text.startswith("#"):
                continue
            try:
                ms = int(text)
            except ValueError:
                raise ValueError(f"{path}:{lineno}: not an integer millisecond: {text!r}") from None
            if ms < 0 or (stamps and ms < stamps[-1]):
                raise ValueError(f"{path}:{lineno}: timestamps must be >= 0 and non-decreasing")
            stamps.append(ms)
    if not stamps or stamps[-1] <= 0:
        raise ValueError(f"{path}: empty trace, or its last timestamp (the period) is 0")
    return stamps


def trace_mean_mbps(trace: str | os.PathLike[str] | Sequence[int]) -> float:
    """Average delivery rate of a trace over one period, in Mbit/s (IP bytes)."""
    stamps = load_trace(trace) if isinstance(trace, str | os.PathLike) else trace
    return len(stamps) * _BITS_PER_OPP / (stamps[-1] / 1000.0) / 1e6


def trace_summary(trace: str | os.PathLike[str] | Sequence[int]) -> dict[str, float]:
    """Mean / min / max rate per 100 ms bin, period and outage time (bins without delivery)."""
    stamps = load_trace(trace) if isinstance(trace, str | os.PathLike) else list(trace)
    period = stamps[-1]
    bins = [0] * (math.ceil(period / 100) or 1)
    for ms in stamps:
        bins[min(ms // 100, len(bins) - 1)] += 1
    rates = [n * _BITS_PER_OPP / 0.1 / 1e6 for n in bins]
    return {
        "period_s": period / 1000.0,
        "opportunities": len(stamps),
        "mean_mbps": trace_mean_mbps(stamps),
        "min_mbps_100ms": min(rates),
        "max_mbps_100ms": max(rates),
        "outage_s": sum(0.1 for r in rates if r == 0),
    }


def _rate_to_stamps(rates_per_ms: Sequence[float], rng: random.Random | None) -> list[int]:
    """Turn a rate (Mbit/s) for each millisecond into delivery opportunities.

    A credit accumulates each millisecond; every whole opportunity's worth
    becomes a line. With `rng`, the credit gets a little noise so that
    opportunities do not fall on a perfectly regular grid.
    """
    stamps: list[int] = []
    credit = 0.0
    for ms, mbps in enumerate(rates_per_ms, 1):
        gain = mbps * 1e6 / 1000.0 / _BITS_PER_OPP  # opportunities this millisecond
        if rng is not None and gain > 0:
            gain *= rng.uniform(0.7, 1.3)
        credit += gain
        while credit >= 1.0:
            stamps.append(ms)
            credit -= 1.0
    period = len(rates_per_ms)
    if not stamps or stamps[-1] != period:
        stamps.append(period)  # the last line sets the loop period: make it exact
    return stamps


def constant_trace(mbps: float, seconds: float) -> list[int]:
    """A trace with a constant rate (useful to check the emulator against rate_mbps)."""
    if mbps <= 0 or seconds <= 0:
        raise ValueError("mbps and seconds must be > 0")
    return _rate_to_stamps([mbps] * max(1, round(seconds * 1000)), None)


# Rate levels of the cellular model (Mbit/s) and how long a level lasts on average.
_CELL_LEVELS = (1.0, 2.0, 4.0, 7.0, 10.0, 14.0, 20.0)
_CELL_MEAN_DWELL_S = 1.0
_CELL_OUTAGE_PROB = 0.06  # chance that a level change is an outage instead
_CELL_OUTAGE_S = (0.05, 0.4)


def cellular_trace(seconds: float = 60.0, seed: int = 1) -> list[int]:
    """A cellular-like trace: a Markov-modulated rate between ~1 and ~20 Mbit/s.

    The rate does a random walk over the levels {1, 2, 4, 7, 10, 14, 20}
    Mbit/s (steps of one or two levels, drifting back towards 7 Mbit/s), each
    level lasting an exponentially distributed time (mean 1 s); about 6 % of
    the changes are short outages (50-400 ms without any delivery). Within a
    level the per-millisecond rate varies by +/-30 %. The mean over 60 s is
    typically 6-10 Mbit/s. Deterministic for a given seed.
    """
    if seconds <= 0:
        raise ValueError("seconds must be > 0")
    rng = random.Random(seed)
    total_ms = max(1, round(seconds * 1000))
    rates: list[float] = []
    level = len(_CELL_LEVELS) // 2
    while len(rates) < total_ms:
        if rng.random() < _CELL_OUTAGE_PROB:
            dur = rng.uniform(*_CELL_OUTAGE_S)
            rates.extend([0.0] * max(1, round(dur * 1000)))
            continue
        dur = rng.expovariate(1.0 / _CELL_MEAN_DWELL_S)
        rates.extend([_CELL_LEVELS[level]] * max(1, round(dur * 1000)))
        # A random walk over the levels that drifts back towards the middle one.
        centre = len(_CELL_LEVELS) // 2
        if level > centre:
            steps: tuple[int, ...] = (-2, -1, -1, 1)
        elif level < centre:
            steps = (-1, 1, 1, 2)
        else:
            steps = (-2, -1, 1, 2)
        level = min(len(_CELL_LEVELS) - 1, max(0, level + rng.choice(steps)))
    return _rate_to_stamps(rates[:total_ms], rng)


TRACE_KINDS = {
    "cellular": "Markov-modulated 1-20 Mbit/s with short outages (seeded)",
    "constant": "a constant rate (--rate-mbps)",
}


def generate(kind: str, seconds: float = 60.0, seed: int = 1, rate_mbps: float = 12.0) -> list[int]:
    """Generate a trace of the given kind (see TRACE_KINDS)."""
    if kind == "cellular":
        return cellular_trace(seconds, seed)
    if kind == "constant":
        return constant_trace(rate_mbps, seconds)
    raise ValueError(f"unknown trace kind {kind!r}; known: {', '.join(TRACE_KINDS)}")


def write_trace(stamps: Sequence[int], path: str | os.PathLike[str]) -> Path:
    """Write timestamps as a mahimahi trace (atomically: temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text("".join(f"{ms}\n" for ms in stamps), encoding="ascii")
    os.replace(tmp, path)
    return path
