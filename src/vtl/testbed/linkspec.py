"""Conditions of one direction of an emulated link.

Shared by the topology code and the emulator process (standard library only).
Percentages (``loss``, ``reorder``, ``duplicate``, ``corrupt``) are 0-100;
the Gilbert-Elliott ``burst`` triple holds probabilities 0-1.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

__all__ = ["MIN_QUEUE_BYTES", "Conditions", "gilbert_elliott_for"]

MIN_QUEUE_BYTES = 64 * 1024


@dataclass
class Conditions:
    """What one direction of a link does to the packets crossing it.

    The order inside the emulator is the one of a real link: a packet waits
    in a bounded drop-tail queue (``queue_bytes``) while the link serialises
    the packets ahead of it at ``rate_mbps`` (or at the delivery
    opportunities of ``trace``); once on the wire it may be lost (``loss``,
    Bernoulli; ``burst``, Gilbert-Elliott: a packet is dropped if either
    model drops it), corrupted, duplicated, and it arrives ``delay_ms`` (+/-
    ``jitter_ms``, uniform) later. Packets stay in order unless ``reorder``
    picks one to hold back ``reorder_delay_ms`` longer. Rates and queue
    sizes count IP bytes (the Ethernet header is not counted), so one
    1500-byte IP packet uses one mahimahi delivery opportunity.
    """

    delay_ms: float = 0
    jitter_ms: float = 0
    loss: float = 0
    burst: tuple[float, float, float] | None = None
    rate_mbps: float | None = None
    queue_bytes: int | None = None
    reorder: float = 0
    reorder_delay_ms: float = 10
    duplicate: float = 0
    corrupt: float = 0
    trace: str | None = None
    queue_packets: int | None = None

    def __post_init__(self) -> None:
        if self.burst is not None:
            self.burst = tuple(float(x) for x in self.burst)  # type: ignore[assignment]
        if self.trace is not None:
            self.trace = str(self.trace)

    # -- validation and conversion

    def validate(self) -> Conditions:
        """Raise ValueError if a field is out of range; return self."""

        def num(name: str, lo: float, hi: float = math.inf) -> None:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int | float) or not lo <= v <= hi:
                raise ValueError(f"{name} must be a number in [{lo}, {hi}], got {v!r}")

        num("delay_ms", 0, 3_600_000)
        num("jitter_ms", 0, 3_600_000)
        num("reorder_delay_ms", 0, 3_600_000)
        for pct in ("loss", "reorder", "duplicate", "corrupt"):
            num(pct, 0, 100)
        if self.rate_mbps is not None:
            num("rate_mbps", 1e-6)
        for q in ("queue_bytes", "queue_packets"):
            v = getattr(self, q)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"{q} must be a positive integer or None, got {v!r}")
        if self.burst is not None:
            if len(self.burst) != 3 or not all(0 <= p <= 1 for p in self.burst):
                raise ValueError(
                    "burst must be (p_good_to_bad, p_bad_to_good, loss_in_bad), "
                    f"each a probability in [0, 1], got {self.burst!r}"
                )
            if self.burst[0] > 0 and self.burst[1] == 0:
                raise ValueError("burst: p_bad_to_good = 0 would stay in the bad state forever")
        if self.trace is not None and not isinstance(self.trace, str):
            raise ValueError(f"trace must be a file path or None, got {self.trace!r}")
        return self

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if d["burst"] is not None:
            d["burst"] = list(d["burst"])
        return d

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> Conditions:
        """Build from a dict (unknown keys are an error); validates."""
        d = dict(d or {})
        unknown = sorted(set(d) - set(cls.field_names()))
        if unknown:
            raise ValueError(
                f"unknown condition field(s) {', '.join(unknown)}; "
                f"known: {', '.join(cls.field_names())}"
            )
        if d.get("burst") is not None:
            d["burst"] = tuple(d["burst"])
        return cls(**d).validate()

    def replace(self, **fields: Any) -> Conditions:
        """A copy with some fields changed (validated)."""
        merged = self.to_dict()
        merged.update(fields)
        return Conditions.from_dict(merged)

    # -- derived values

    def is_null(self) -> bool:
        """True if these conditions do nothing (a plain veth would do)."""
        return self == Conditions() or (
            self.delay_ms == 0
            and self.jitter_ms == 0
            and self.loss == 0
            and (self.burst is None or self.burst[0] == 0 or self.burst[2] == 0)
            and self.rate_mbps is None
            and self.trace is None
            and self.reorder == 0
            and self.duplicate == 0
            and self.corrupt == 0
        )

    def link_mbps(self) -> float | None:
        """The (mean) link rate in Mbit/s: the trace's mean, rate_mbps, or None."""
        if self.trace is not None:
            from vtl.testbed.traces import trace_mean_mbps

            return trace_mean_mbps(self.trace)
        return self.rate_mbps

    def effective_queue_bytes(self) -> int | None:
        """The queue limit in force: queue_bytes, else max(64 KiB, 1.5 x BDP(rate, 2 x delay)).

        None when there is no rate limit (no queue builds up in the emulator).
        """
        rate = self.link_mbps()
        if rate is None:
            return None
        if self.queue_bytes is not None:
            return self.queue_bytes
        bdp = rate * 1e6 / 8 * (2 * self.delay_ms / 1000.0)
        return max(MIN_QUEUE_BYTES, int(1.5 * bdp))

    def mean_loss(self) -> float:
        """Long-run fraction (0-1) of packets lost by `loss` and `burst` together."""
        p = self.loss / 100.0
        ge = 0.0
        if self.burst is not None:
            g2b, b2g, h = self.burst
            if g2b > 0:
                ge = g2b / (g2b + b2g) * h
        return 1 - (1 - p) * (1 - ge)

    def summary(self) -> str:
        """A short human description, e.g. ``10 Mbit/s, 25 ms, 2% loss``."""
        parts = []
        if self.trace:
            parts.append(f"trace {self.trace.rsplit('/', 1)[-1]}")
        elif self.rate_mbps is not None:
            parts.append(f"{self.rate_mbps:g} Mbit/s")
        if self.delay_ms or self.jitter_ms:
            parts.append(
                f"{self.delay_ms:g} ms" + (f" +/-{self.jitter_ms:g}" if self.jitter_ms else "")
            )
        if self.loss:
            parts.append(f"{self.loss:g}% loss")
        if self.burst is not None:
            g2b, b2g, h = self.burst
            parts.append(f"GE({g2b:g},{b2g:g},{h:g}) ~{100 * self.mean_loss():.3g}% loss")
        for name in ("reorder", "duplicate", "corrupt"):
            v = getattr(self, name)
            if v:
                parts.append(f"{v:g}% {name}")
        if self.queue_bytes is not None:
            parts.append(f"queue {self.queue_bytes} B")
        if self.queue_packets is not None:
            parts.append(f"queue {self.queue_packets} pkts")
        return ", ".join(parts) or "no impairment"


def gilbert_elliott_for(
    loss_percent: float, mean_burst: float = 4.0
) -> tuple[float, float, float] | None:
    """GE parameters with the given mean loss and mean loss-burst length (packets).

    Uses the simple Gilbert model: every packet is lost in the bad state and
    none in the good one, so bursts are geometric with mean ``mean_burst``
    (p_bad_to_good = 1 / mean_burst) and the stationary bad-state share is
    the loss rate (p_good_to_bad = L r / (1 - L)).
    """
    if loss_percent <= 0:
        return None
    if not 0 < loss_percent < 100 or mean_burst < 1:
        raise ValueError("need 0 < loss < 100 and mean_burst >= 1")
    loss = loss_percent / 100.0
    r = 1.0 / mean_burst
    p = loss * r / (1 - loss)
    return (p, r, 1.0)
