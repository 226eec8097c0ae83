"""Service properties: what an application asks of the transport.

In the spirit of IETF TAPS (RFC 9622), an application states *services* --
"reliable", "keep message boundaries", "low latency" -- with one of five
preference levels, and VTL chooses the composition of transport functions
(:mod:`vtl.service.selection`).  The original VTL's QoS targets (maximum
delay, minimum throughput, tolerated loss) sit beside the TAPS properties.

Nothing here does I/O; these are small immutable values.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from enum import Enum
from typing import Any

from vtl.core.errors import VtlError

__all__ = [
    "CapacityProfile",
    "MessageProperties",
    "MessagePropertyError",
    "PathMeasurements",
    "Preference",
    "SendReport",
    "TransportProperties",
    "SELECTION_PROPERTIES",
]


class Preference(Enum):
    """The five TAPS preference levels (RFC 9622 section 6.2).

    ``REQUIRE`` and ``PROHIBIT`` filter candidate compositions, ``PREFER``
    and ``AVOID`` rank them, ``NO_PREFERENCE`` does neither."""

    REQUIRE = "require"
    PREFER = "prefer"
    NO_PREFERENCE = "no-preference"
    AVOID = "avoid"
    PROHIBIT = "prohibit"

    @property
    def label(self) -> str:
        return {
            "require": "Require",
            "prefer": "Prefer",
            "no-preference": "No Preference",
            "avoid": "Avoid",
            "prohibit": "Prohibit",
        }[self.value]

    @classmethod
    def coerce(cls, value: Preference | str | bool) -> Preference:
        """Accept ``Preference.REQUIRE``, ``"require"``, ``"Require"``,
        ``"no_preference"``, or a bool (True = Require, False = Prohibit)."""
        if isinstance(value, Preference):
            return value
        if isinstance(value, bool):
            return cls.REQUIRE if value else cls.PROHIBIT
        if isinstance(value, str):
            key = value.strip().lower().replace("_", "-").replace(" ", "-")
            for member in cls:
                if member.value == key:
                    return member
        raise ValueError(
            f"not a preference level: {value!r}; use one of " + ", ".join(m.label for m in cls)
        )


class CapacityProfile(Enum):
    """TAPS ``connCapacityProfile`` (RFC 9622 section 8.1.6)."""

    DEFAULT = "default"
    SCAVENGER = "scavenger"
    LOW_LATENCY_INTERACTIVE = "low-latency-interactive"
    LOW_LATENCY_NON_INTERACTIVE = "low-latency-non-interactive"
    CONSTANT_RATE_STREAMING = "constant-rate-streaming"
    CAPACITY_SEEKING = "capacity-seeking"

    @classmethod
    def coerce(cls, value: CapacityProfile | str) -> CapacityProfile:
        if isinstance(value, CapacityProfile):
            return value
        if isinstance(value, str):
            key = value.strip().lower().replace("_", "-").replace(" ", "-").replace("/", "-")
            for member in cls:
                if member.value == key:
                    return member
        raise ValueError(f"not a capacity profile: {value!r}; use one of {[m.value for m in cls]}")


#: selection properties with a preference level, in the order they are reported
SELECTION_PROPERTIES = (
    "reliability",
    "preserve_order",
    "preserve_msg_boundaries",
    "per_msg_reliability",
    "congestion_control",
    "security",
    "full_checksum_recv",
)


@dataclass(frozen=True)
class TransportProperties:
    """What the application wants from a connection.

    Selection properties take a :class:`Preference` (strings such as
    ``"require"`` and bools are accepted too).  Defaults follow TAPS:
    reliability, preserve_order and congestion_control are *Required*,
    message boundaries and per-message reliability have *No Preference*.

    ``full_checksum_recv`` (TAPS ``fullChecksumRecv``, default *Require*):
    *Avoid* or *Prohibit* selects partial checksum coverage (integrity TF
    ``partial``), which delivers payload damaged past the first
    ``recv_checksum_len`` bytes (TAPS ``recvChecksumLen``; None: 0, only
    the headers are covered) instead of dropping the packet.

    ``security`` has no TAPS selection-property equivalent (TAPS configures
    security separately); VTL has no encryption TF yet, so *Require* makes
    selection fail with a :class:`~vtl.core.errors.SelectionError` that says
    so, and *Prefer* is reported as not honoured.

    The QoS targets come from the original VTL (``vtl_negotiate(delay,
    throughput, loss)``): ``max_delay_ms`` (one-way delivery delay target),
    ``min_throughput_mbps`` and ``max_loss_percent`` (the share of data the
    application tolerates losing; 0 means none).  ``None`` means "no target".
    """

    reliability: Preference = Preference.REQUIRE
    preserve_order: Preference = Preference.REQUIRE
    preserve_msg_boundaries: Preference = Preference.NO_PREFERENCE
    per_msg_reliability: Preference = Preference.NO_PREFERENCE
    congestion_control: Preference = Preference.REQUIRE
    security: Preference = Preference.NO_PREFERENCE
    full_checksum_recv: Preference = Preference.REQUIRE
    capacity_profile: CapacityProfile = CapacityProfile.DEFAULT
    max_delay_ms: float | None = None
    min_throughput_mbps: float | None = None
    max_loss_percent: float | None = None
    recv_checksum_len: int | None = None

    def __post_init__(self) -> None:
        cov = self.recv_checksum_len
        if cov is not None and (isinstance(cov, bool) or not isinstance(cov, int) or cov < 0):
            raise ValueError(f"recv_checksum_len must be an int >= 0 or None, got {cov!r}")
        for name in SELECTION_PROPERTIES:
            object.__setattr__(self, name, Preference.coerce(getattr(self, name)))
        object.__setattr__(self, "capacity_profile", CapacityProfile.coerce(self.capacity_profile))
        for name, lo, hi in (
            ("max_delay_ms", 0.0, None),
            ("min_throughput_mbps", 0.0, None),
            ("max_loss_percent", 0.0, 100.0),
        ):
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"{name} must be a number or None, got {value!r}")
            if value < lo or (hi is not None and value > hi):
                bound = f"between {lo} and {hi}" if hi is not None else f">= {lo}"
                raise ValueError(f"{name} must be {bound}, got {value}")
            object.__setattr__(self, name, float(value))

    # ------------------------------------------------------------ helpers

    def with_(self, **changes: Any) -> TransportProperties:
        """A copy with some properties changed (validated again)."""
        return replace(self, **changes)

    def require(self, *names: str) -> TransportProperties:
        return self.with_(**{n: Preference.REQUIRE for n in names})

    def prefer(self, *names: str) -> TransportProperties:
        return self.with_(**{n: Preference.PREFER for n in names})

    def ignore(self, *names: str) -> TransportProperties:
        return self.with_(**{n: Preference.NO_PREFERENCE for n in names})

    def avoid(self, *names: str) -> TransportProperties:
        return self.with_(**{n: Preference.AVOID for n in names})

    def prohibit(self, *names: str) -> TransportProperties:
        return self.with_(**{n: Preference.PROHIBIT for n in names})

    def describe(self) -> dict[str, str]:
        """Every property as text, for explanations and logs."""
        out: dict[str, str] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Preference):
                out[f.name] = value.label
            elif isinstance(value, CapacityProfile):
                out[f.name] = value.value
            elif value is not None:
                out[f.name] = f"{value:g}"
        return out

    def __str__(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.describe().items())

    # ------------------------------------------------------ constructors

    @classmethod
    def reliable_stream(cls) -> TransportProperties:
        """TCP-like: reliable, ordered byte stream, congestion controlled
        (the TAPS defaults)."""
        return cls()

    @classmethod
    def reliable_messages(cls, *, ordered: bool = True) -> TransportProperties:
        """Reliable messages whose boundaries are kept (each send() arrives
        as one message); ``ordered=False`` lets messages overtake each other."""
        return cls(
            preserve_msg_boundaries=Preference.REQUIRE,
            preserve_order=Preference.REQUIRE if ordered else Preference.AVOID,
        )

    @classmethod
    def unreliable_datagram(cls) -> TransportProperties:
        """UDP-like: messages sent once, never retransmitted, delivered as
        they arrive; still congestion controlled (RFC 8085)."""
        return cls(
            reliability=Preference.PROHIBIT,
            preserve_order=Preference.AVOID,
            preserve_msg_boundaries=Preference.REQUIRE,
        )

    @classmethod
    def low_latency(cls, max_delay_ms: float | None = None) -> TransportProperties:
        """Interactive traffic: reliable messages without head-of-line
        blocking between them, quick loss recovery."""
        return cls(
            preserve_order=Preference.NO_PREFERENCE,
            preserve_msg_boundaries=Preference.REQUIRE,
            capacity_profile=CapacityProfile.LOW_LATENCY_INTERACTIVE,
            max_delay_ms=max_delay_ms,
        )

    @classmethod
    def constant_rate(cls, mbps: float, *, reliable: bool = True) -> TransportProperties:
        """Constant-rate streaming at ``mbps``: a paced constant bit rate.

        Constant-rate sending does not back off on loss, so this relaxes
        ``congestion_control`` from Require to No Preference (use it on
        provisioned paths).  ``reliable=False`` turns reliability from
        Require into Avoid (media that would rather lose data than wait)."""
        return cls(
            reliability=Preference.REQUIRE if reliable else Preference.AVOID,
            congestion_control=Preference.NO_PREFERENCE,
            capacity_profile=CapacityProfile.CONSTANT_RATE_STREAMING,
            min_throughput_mbps=mbps,
        )

    @classmethod
    def bulk(cls) -> TransportProperties:
        """Bulk transfer: reliable stream that takes what capacity it can."""
        return cls(capacity_profile=CapacityProfile.CAPACITY_SEEKING)

    @classmethod
    def background(cls) -> TransportProperties:
        """Less-than-best-effort background transfer (TAPS Scavenger)."""
        return cls(capacity_profile=CapacityProfile.SCAVENGER)

    @classmethod
    def qos(
        cls,
        *,
        max_delay_ms: float | None = None,
        min_throughput_mbps: float | None = None,
        max_loss_percent: float | None = None,
    ) -> TransportProperties:
        """The original VTL's ``vtl_negotiate({delay, throughput, loss})``:
        QoS targets only.  A tolerated loss above zero relaxes reliability
        to No Preference (VTL may then pick an unreliable composition if the
        path's loss stays within the tolerance)."""
        tolerant = max_loss_percent is not None and max_loss_percent > 0
        return cls(
            reliability=Preference.NO_PREFERENCE if tolerant else Preference.REQUIRE,
            max_delay_ms=max_delay_ms,
            min_throughput_mbps=min_throughput_mbps,
            max_loss_percent=max_loss_percent,
        )


@dataclass(frozen=True)
class PathMeasurements:
    """What is known about the path (each None when unknown).

    ``rtt_ms`` round-trip time, ``loss_percent`` random loss rate,
    ``bandwidth_mbps`` bottleneck capacity.  Selection uses them to size
    windows and rates and to predict whether QoS targets can be met."""

    rtt_ms: float | None = None
    loss_percent: float | None = None
    bandwidth_mbps: float | None = None

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                raise ValueError(f"{f.name} must be a non-negative number or None, got {value!r}")
            object.__setattr__(self, f.name, float(value))
        if self.loss_percent is not None and self.loss_percent > 100:
            raise ValueError(f"loss_percent must be <= 100, got {self.loss_percent}")
        if self.rtt_ms == 0:
            raise ValueError("rtt_ms must be > 0")

    @property
    def known(self) -> bool:
        return any(getattr(self, f.name) is not None for f in fields(self))

    def __str__(self) -> str:
        parts = [
            f"{f.name}={getattr(self, f.name):g}"
            for f in fields(self)
            if getattr(self, f.name) is not None
        ]
        return " ".join(parts) or "unknown path"


class MessagePropertyError(VtlError):
    """A message property asks for a guarantee the connection's
    composition cannot give (e.g. ``reliable=True`` on an unreliable one)."""


@dataclass(frozen=True)
class MessageProperties:
    """Per-message properties (RFC 9622 section 9.1.3).

    ``None`` means "the connection's default".  VTL honours what the
    negotiated composition supports; asking for a guarantee it lacks
    (``reliable=True`` on an unreliable composition, ``ordered=True`` on an
    unordered one) raises :class:`MessagePropertyError`, and properties it
    cannot act on (``lifetime`` and ``reliable=False`` need partial
    reliability, not installed yet; ``priority`` needs a multi-stream
    scheduler) are reported as not honoured in the :class:`SendReport`
    that ``send()`` returns, never silently pretended.

    ``final`` marks the last message: the connection half-closes after it.
    """

    lifetime: float | None = None  # seconds; None = infinite
    priority: int | None = None  # TAPS: lower = more important, default 100
    ordered: bool | None = None
    reliable: bool | None = None
    final: bool = False

    def __post_init__(self) -> None:
        if self.lifetime is not None and not self.lifetime > 0:
            raise ValueError(f"lifetime must be > 0 seconds or None, got {self.lifetime!r}")
        if self.priority is not None and (
            isinstance(self.priority, bool)
            or not isinstance(self.priority, int)
            or self.priority < 0
        ):
            raise ValueError(f"priority must be a non-negative int or None, got {self.priority!r}")


@dataclass(frozen=True)
class SendReport:
    """What became of one message's properties: ``honoured`` maps each
    property the application set to True/False, ``notes`` says why."""

    size: int
    honoured: dict[str, bool] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)

    @property
    def all_honoured(self) -> bool:
        return all(self.honoured.values())

    @property
    def not_honoured(self) -> list[str]:
        return [k for k, v in self.honoured.items() if not v]
