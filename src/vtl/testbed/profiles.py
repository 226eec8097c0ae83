"""Named network profiles: link rate and RTT, combinable with random or bursty loss.

=========  ===============  ========  =========================================
profile    rate             RTT       notes
=========  ===============  ========  =========================================
clean      (veth)           ~0        no emulator at all: the fastest baseline
net1       4 Mbit/s         100 ms
net2       10 Mbit/s        50 ms
net3       10 Mbit/s        20 ms
fast       100 Mbit/s       10 ms
cellular   trace, ~1-20     40 ms     generated Markov-modulated trace, outages
=========  ===============  ========  =========================================

The RTT is split equally into a one-way delay per direction; the rate,
queue and loss apply to each direction independently. ``loss`` is a
percentage; ``bursty=True`` replaces the independent (Bernoulli) loss by a
Gilbert-Elliott model with the same mean loss and a mean burst length of
4 packets.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from vtl.testbed.linkspec import Conditions, gilbert_elliott_for
from vtl.testbed.traces import cellular_trace, load_trace, trace_mean_mbps, write_trace

__all__ = [
    "BURST_LENGTH",
    "PROFILES",
    "Profile",
    "cellular_trace_path",
    "get",
    "physical_limit_mbps",
]

BURST_LENGTH = 4.0  # mean loss-burst length (packets) of the bursty variants


@dataclass(frozen=True)
class Profile:
    """A named link: rate (Mbit/s, None = unlimited), RTT, and how it is built."""

    name: str
    description: str
    rate_mbps: float | None
    rtt_ms: float
    trace_seeds: tuple[int, int] | None = None  # (a->b, b->a) seeds of a generated trace
    queue_bytes: int | None = None

    def __str__(self) -> str:
        return self.description

    @property
    def emulated(self) -> bool:
        return self.name != "clean"


PROFILES: dict[str, Profile] = {
    p.name: p
    for p in (
        Profile("clean", "direct veth pair, no emulator (fastest baseline)", None, 0.0),
        Profile("net1", "4 Mbit/s, 100 ms RTT", 4.0, 100.0),
        Profile("net2", "10 Mbit/s, 50 ms RTT", 10.0, 50.0),
        Profile("net3", "10 Mbit/s, 20 ms RTT", 10.0, 20.0),
        Profile("fast", "100 Mbit/s, 10 ms RTT", 100.0, 10.0),
        Profile(
            "cellular",
            "trace-driven 1-20 Mbit/s with short outages (generated), 40 ms RTT, 256 KiB queue",
            None,
            40.0,
            trace_seeds=(1, 2),
            queue_bytes=256 * 1024,
        ),
    )
}

CELLULAR_SECONDS = 60.0
CELLULAR_VERSION = 2  # of the generator: part of the cached file's name


def _trace_dir() -> Path:
    for base in (Path("/run/vtl-testbed"), Path(tempfile.gettempdir()) / "vtl-testbed"):
        d = base / "traces"
        try:
            d.mkdir(parents=True, exist_ok=True)
            if os.access(d, os.W_OK):
                return d
        except OSError:
            continue
    raise OSError("no writable directory for generated traces")


def cellular_trace_path(seed: int = 1, seconds: float = CELLULAR_SECONDS) -> str:
    """Path of the generated cellular trace for `seed` (generated once, then reused)."""
    path = _trace_dir() / f"cellular-v{CELLULAR_VERSION}-{seconds:g}s-seed{seed}.trace"
    if path.exists():
        try:
            load_trace(path)
            return str(path)
        except (OSError, ValueError):
            pass
    write_trace(cellular_trace(seconds, seed), path)
    return str(path)


def _profile(name: str) -> Profile:
    try:
        return PROFILES[name]
    except KeyError:
        raise ValueError(f"unknown profile {name!r}; known: {', '.join(PROFILES)}") from None


def get(name: str, loss: float = 0.0, bursty: bool = False) -> tuple[Conditions, Conditions]:
    """Conditions (a->b, b->a) of a profile with `loss` percent in each direction.

    For ``clean`` with loss > 0 the link has to be emulated (loss only, no
    delay or rate limit).
    """
    prof = _profile(name)
    if not 0 <= loss < 100:
        raise ValueError(f"loss must be a percentage in [0, 100), got {loss!r}")
    loss_fields: dict = {}
    if loss > 0:
        if bursty:
            loss_fields["burst"] = gilbert_elliott_for(loss, BURST_LENGTH)
        else:
            loss_fields["loss"] = float(loss)
    out = []
    for i in range(2):
        trace = cellular_trace_path(prof.trace_seeds[i]) if prof.trace_seeds else None
        out.append(
            Conditions(
                delay_ms=prof.rtt_ms / 2,
                rate_mbps=prof.rate_mbps,
                trace=trace,
                queue_bytes=prof.queue_bytes,
                **loss_fields,
            ).validate()
        )
    return out[0], out[1]


def physical_limit_mbps(profile: str, loss: float = 0.0, direction: str = "a->b") -> float | None:
    """Link rate x (1 - loss): the most any transport can deliver; None for ``clean``.

    For a trace-driven profile the rate is the trace's mean. `loss` is a
    percentage. Payload efficiency (headers) is the caller's to apply.
    """
    prof = _profile(profile)
    if prof.trace_seeds:
        seed = prof.trace_seeds[0 if direction == "a->b" else 1]
        rate = trace_mean_mbps(cellular_trace_path(seed))
    else:
        rate = prof.rate_mbps
    if rate is None:
        return None
    return rate * (1 - loss / 100.0)
