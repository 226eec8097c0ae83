"""Composition selection: from service properties to a ranked, explained
list of compositions.

Candidates are generated from what is installed in a
:class:`~vtl.core.registry.Registry` (every combination of one TF per
role), never from a fixed table, so a third-party TF shows up as soon as it
is registered.  Each candidate is then

1. *filtered*: a ``Require`` or ``Prohibit`` property it does not meet, or a
   QoS target it structurally cannot meet, excludes it;
2. *parameterised*: windows sized from bandwidth x RTT, a fixed rate from the
   throughput target, a shorter minimum RTO for latency targets, ...;
3. *scored*: ``Prefer`` / ``Avoid`` weigh most, then the capacity profile
   and QoS targets, then small tie-breakers (mechanism quality, VTL's
   defaults).  Every score change carries a human-readable reason.

The result (:class:`Selection`) is ordered deterministically (score, then
the composition's text) and :meth:`Selection.explain` says why the top
candidate won and why the others lost or were excluded.

How TFs are understood: the service-relevant *traits* of a TF come from its
class (``Reliability.reliable``, ``sack``, ``buffers_out_of_order``,
``window``; ``Ordering.ordered``; ``Framing.messages``), from knowledge of
the built-in congestion controllers, and from an optional class attribute
``SERVICE_TRAITS`` (a dict) that any TF, built-in or third-party, may set to
describe itself, e.g. ``{"congestion_controlled": True, "scavenger": True}``
or ``{"encrypted": True}``.  See :data:`TRAIT_KEYS`.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Any

from vtl.core import wire
from vtl.core.composition import DEFAULTS, Composition
from vtl.core.errors import CompositionError, SelectionError
from vtl.core.registry import OPTIONAL_ROLES, ROLES, Registry, default_registry
from vtl.service.properties import (
    SELECTION_PROPERTIES,
    CapacityProfile,
    PathMeasurements,
    Preference,
    TransportProperties,
)

__all__ = [
    "Candidate",
    "CompositionTraits",
    "Reason",
    "Selection",
    "Selector",
    "TRAIT_KEYS",
    "Violation",
    "select",
    "tf_traits",
]

# Score weights: Prefer/Avoid dominate, then profile/QoS, then tie-breakers.
W_PREFERENCE = 10.0
W_PROFILE = 4.0
W_QOS = 4.0
W_MECHANISM = 1.0
W_TIE = 0.5

#: traits a TF may declare in ``SERVICE_TRAITS`` (and their meaning)
TRAIT_KEYS: dict[str, str] = {
    "reliable": "retransmits lost data until delivered (reliability role)",
    "recovery": "'selective', 'go-back-n', 'stop-and-wait' or 'none' (reliability role)",
    "per_message_reliability": "reliability can be chosen per message (reliability role)",
    "partial_reliability": "can give up on data after a lifetime (reliability role)",
    "ordered": "delivers in sequence order (ordering role)",
    "messages": "keeps message boundaries (framing role)",
    "congestion_controlled": "backs off when the path is congested (congestion role)",
    "constant_rate": "sends at a fixed paced rate, parameter 'rate_mbps' (congestion role)",
    "scavenger": "yields to other traffic, less than best effort (congestion role)",
    "encrypted": "protects confidentiality and integrity of the payload (any role)",
    "partial_checksum": "delivers payload damaged past its checksum coverage (integrity role)",
}

# What we know of the built-in congestion controllers beyond their classes.
_CONGESTION_KNOWLEDGE: dict[str, dict[str, Any]] = {
    "none": {"congestion_controlled": False},
    "fixed-rate": {"congestion_controlled": False, "constant_rate": True},
    "newreno": {"congestion_controlled": True},
    "ledbat": {"congestion_controlled": True, "scavenger": True},
}

_RECOVERY_TEXT = {
    "selective": "resends only the segments that were lost (SACK, fast retransmit)",
    "go-back-n": "resends everything after a loss (no receiver buffering)",
    "stop-and-wait": "keeps one segment in flight",
    "none": "never retransmits",
}


#: roles no transport property asks for (FEC trades capacity for latency
#: under loss): selection keeps their default; a composition names them
EXPLICIT_ONLY_ROLES = ("fec",)


def tf_traits(cls: type) -> dict[str, Any]:
    """The service-relevant traits of one TF class (see :data:`TRAIT_KEYS`)."""
    return dict(_tf_traits(cls))


@functools.lru_cache(maxsize=256)
def _tf_traits(cls: type) -> dict[str, Any]:
    role = getattr(cls, "ROLE", "")
    name = getattr(cls, "NAME", "")
    params = getattr(cls, "PARAMS", {}) or {}
    t: dict[str, Any] = {}
    if role == "reliability":
        reliable = bool(getattr(cls, "reliable", True))
        try:
            window = int(cls().window)
        except Exception:  # a TF that cannot be built with defaults: assume windowed
            window = None
        if not reliable:
            recovery = "none"
        elif window == 1:
            recovery = "stop-and-wait"
        elif getattr(cls, "buffers_out_of_order", True) and getattr(cls, "sack", True):
            recovery = "selective"
        else:
            recovery = "go-back-n"
        t.update(
            reliable=reliable,
            recovery=recovery,
            per_message_reliability=False,
            partial_reliability=False,
        )
    elif role == "congestion":
        t.update(congestion_controlled=True, constant_rate=False, scavenger=False)
        t.update(_CONGESTION_KNOWLEDGE.get(name, {}))
        if "rate_mbps" in params and not t["congestion_controlled"]:
            t["constant_rate"] = True
    elif role == "ordering":
        t["ordered"] = bool(getattr(cls, "ordered", True))
    elif role == "framing":
        t["messages"] = bool(getattr(cls, "messages", False))
    elif role == "integrity":
        t["partial_checksum"] = False
    declared = getattr(cls, "SERVICE_TRAITS", None)
    if isinstance(declared, dict):
        t.update(declared)
    return t


@dataclass(frozen=True)
class CompositionTraits:
    """Traits of a whole composition (merged from its TFs)."""

    reliable: bool
    recovery: str
    per_message_reliability: bool
    partial_reliability: bool
    ordered: bool
    messages: bool
    congestion_controlled: bool
    constant_rate: bool
    scavenger: bool
    encrypted: bool
    full_checksum: bool = True

    @classmethod
    def of(cls, composition: Composition, registry: Registry) -> CompositionTraits:
        merged: dict[str, Any] = {}
        encrypted = False
        for spec in composition.specs:
            t = tf_traits(registry.get(spec.role, spec.name, spec.version))
            encrypted = encrypted or bool(t.pop("encrypted", False))
            merged.update(t)
        return cls(
            reliable=bool(merged.get("reliable", True)),
            recovery=str(merged.get("recovery", "selective")),
            per_message_reliability=bool(merged.get("per_message_reliability", False)),
            partial_reliability=bool(merged.get("partial_reliability", False)),
            ordered=bool(merged.get("ordered", True)),
            messages=bool(merged.get("messages", False)),
            congestion_controlled=bool(merged.get("congestion_controlled", True)),
            constant_rate=bool(merged.get("constant_rate", False)),
            scavenger=bool(merged.get("scavenger", False)),
            encrypted=encrypted,
            full_checksum=not merged.get("partial_checksum", False),
        )


@dataclass(frozen=True)
class Reason:
    """One contribution to a candidate's score (``delta`` may be 0).

    ``key`` names the criterion (a property name, ``mechanism:recovery``,
    ``tie:defaults``, ...) so two candidates can be compared criterion by
    criterion."""

    delta: float
    text: str
    key: str = ""

    def __str__(self) -> str:
        return f"{self.delta:+5.1f}  {self.text}"


@dataclass(frozen=True)
class Violation:
    """Why a candidate is excluded: the property and an explanation."""

    property: str
    text: str

    def __str__(self) -> str:
        return self.text


@dataclass
class Candidate:
    """One composition with its score, reasons and (if excluded) violations."""

    composition: Composition
    traits: CompositionTraits
    reasons: list[Reason] = field(default_factory=list)
    violations: list[Violation] = field(default_factory=list)
    #: notes that do not change the score (how parameters were chosen, ...)
    notes: list[str] = field(default_factory=list)

    @property
    def score(self) -> float:
        return round(sum(r.delta for r in self.reasons), 3)

    @property
    def eligible(self) -> bool:
        return not self.violations

    def sort_key(self) -> tuple[float, str]:
        return (-self.score, str(self.composition))

    def __str__(self) -> str:
        return f"{self.composition}  (score {self.score:g})"


# Per selection property: the trait that provides it, the role responsible,
# and how to say it is present / absent.
_PROPERTY_TRAITS: dict[str, tuple[str, str | None, str, str]] = {
    "reliability": ("reliable", "reliability", "retransmits lost data", "does not retransmit"),
    "preserve_order": ("ordered", "ordering", "delivers in order", "does not preserve order"),
    "preserve_msg_boundaries": (
        "messages",
        "framing",
        "keeps message boundaries",
        "is a byte stream without message boundaries",
    ),
    "per_msg_reliability": (
        "per_message_reliability",
        "reliability",
        "chooses reliability per message",
        "has no per-message reliability (no partial-reliability TF is installed)",
    ),
    "congestion_control": (
        "congestion_controlled",
        "congestion",
        "backs off on congestion",
        "does not react to congestion",
    ),
    "full_checksum_recv": (
        "full_checksum",
        "integrity",
        "checks every byte received",
        "delivers payload damaged past its checksum coverage",
    ),
    "security": (
        "encrypted",
        None,
        "encrypts and authenticates its packets",
        "does not encrypt",
    ),
}


def _who(composition: Composition, role: str) -> str:
    return f"{role}={composition[role].name}"


def _label(properties: TransportProperties, prop: str) -> str:
    """How a property's requested value is written in explanations."""
    value = getattr(properties, prop, None)
    if isinstance(value, Preference):
        return value.label
    if isinstance(value, CapacityProfile):
        return value.value
    return f"{value:g}" if isinstance(value, float) else str(value)


def _fmt(x: float) -> str:
    return f"{x:.3g}" if x < 100 else f"{x:.0f}"


@dataclass
class Negotiation:
    """What the peer made of our offers (filled in after the handshake)."""

    composition: Composition
    offered_index: int | None
    counter_offer: bool
    role: str  # "initiator" or "listener"
    offers: int = 0

    def describe(self) -> str:
        if self.role == "listener":
            if self.counter_offer or self.offered_index is None:
                return (
                    "none of the initiator's offers was acceptable; it took our counter-offer: "
                    f"{self.composition}"
                )
            return f"accepted the initiator's offer #{self.offered_index + 1}: {self.composition}"
        if self.counter_offer:
            return f"the peer took none of our {self.offers} offers and counter-offered: " + str(
                self.composition
            )
        if self.offered_index == 0:
            return "the peer took our first choice"
        assert self.offered_index is not None
        return (
            f"the peer took our offer #{self.offered_index + 1} of {self.offers} "
            "(it lacked or refused the ones ranked above)"
        )


@dataclass
class Selection:
    """Ranked eligible candidates, the excluded ones, and path warnings."""

    properties: TransportProperties
    path: PathMeasurements
    ranked: list[Candidate]
    excluded: list[Candidate]
    warnings: list[str] = field(default_factory=list)
    negotiated: Negotiation | None = None
    _selector: Selector | None = field(default=None, repr=False, compare=False)

    @property
    def top(self) -> Candidate:
        return self.ranked[0]

    @property
    def composition(self) -> Composition:
        """The negotiated composition if known, else the top choice."""
        return self.negotiated.composition if self.negotiated else self.top.composition

    @property
    def compositions(self) -> list[Composition]:
        return [c.composition for c in self.ranked]

    def candidate(self, composition: Composition) -> Candidate:
        """The candidate for ``composition`` (evaluated afresh if it is not
        one of ours, e.g. a peer's counter-offer)."""
        for c in itertools.chain(self.ranked, self.excluded):
            if c.composition == composition:
                return c
        if self._selector is None:
            raise KeyError(str(composition))
        return self._selector.evaluate(composition)

    def offers(self, max_offers: int = 4) -> list[Composition]:
        """What to offer a peer, best first: the top choice; then, for each
        role, an alternative with a different TF in that role only (the best
        such; failing that the best differing there at all), so a peer that
        lacks or refuses one of the top choice's TFs can still take an
        offer; then the next ranked ones, up to ``max_offers``.  The list
        stays in rank order (the peer takes the first it can)."""
        if not self.ranked or max_offers < 1:
            return []
        ranked = self.ranked
        if self.properties.security not in (Preference.REQUIRE, Preference.PREFER):
            # encryption needs keys nobody asked for: offer it only when wanted
            ranked = [c for c in ranked if not c.traits.encrypted] or ranked
        top = ranked[0]
        chosen: list[Candidate] = [top]
        # optional roles first (a peer is likeliest to lack security, fec or
        # integrity TFs), then the core roles
        fallback_roles = (*reversed(OPTIONAL_ROLES), *(r for r in ROLES if r not in OPTIONAL_ROLES))
        for role in fallback_roles:
            if len(chosen) >= max_offers:
                break
            mine = top.composition[role].name
            differing = [c for c in ranked[1:] if c.composition[role].name != mine]
            if not differing:
                continue
            only_here = [
                c
                for c in differing
                if all(c.composition[r].name == top.composition[r].name for r in ROLES if r != role)
            ]
            pick = (only_here or differing)[0]
            if pick not in chosen:
                chosen.append(pick)
        for cand in ranked[1:]:
            if len(chosen) >= max_offers:
                break
            if cand not in chosen:
                chosen.append(cand)
        chosen.sort(key=self.ranked.index)
        return [c.composition for c in chosen]

    def with_negotiation(self, negotiation: Negotiation) -> Selection:
        return replace(self, negotiated=negotiation)

    # ----------------------------------------------------------- explain

    def explain(self, alternatives: int = 3) -> str:
        """Why the top candidate won and why the others lost or were excluded."""
        lines: list[str] = []
        top = self.top
        lines.append(f"Asked for: {self.properties}")
        lines.append(f"Path: {self.path}")
        lines.append(f"Chose: {top.composition}  (score {top.score:g})")
        if self.negotiated is not None:
            neg = self.negotiated
            lines.append(f"Negotiated: {neg.describe()}")
            if neg.composition != top.composition:
                used = self.candidate(neg.composition)
                lines.append(f"  in use: {used.composition}  (score {used.score:g})")
                for v in used.violations:
                    lines.append(f"  note: violates {v.text}")
        lines.append("Because:")
        for r in sorted(top.reasons, key=lambda r: (-abs(r.delta), r.text)):
            lines.append(f"  {r}")
        for n in top.notes:
            lines.append(f"  note: {n}")
        if len(self.ranked) > 1 and alternatives > 0:
            lines.append(f"Runners-up ({len(self.ranked) - 1} other eligible):")
            for i, cand in enumerate(self.ranked[1 : 1 + alternatives], start=2):
                gap = top.score - cand.score
                lines.append(f"  {i}. {cand.composition}  (score {cand.score:g}, {gap:g} behind)")
                for delta, text in _differences(top, cand)[:4]:
                    lines.append(f"     {delta:+5.1f}  {text}")
        if self.excluded:
            total = len(self.ranked) + len(self.excluded)
            lines.append(f"Excluded ({len(self.excluded)} of {total} candidates):")
            groups: Counter[str] = Counter()
            for cand in self.excluded:
                groups[cand.violations[0].text] += 1
            for text, n in sorted(groups.items(), key=lambda kv: (-kv[1], kv[0])):
                lines.append(f"  {n:3d} x {text}")
        for w in self.warnings:
            lines.append(f"Warning: {w}")
        return "\n".join(lines)

    def summary(self, reasons: int = 3) -> str:
        """A few lines: the choice, its deciding reasons, the runner-up and
        what excluded the rest."""
        top = self.top
        lines = [f"chose {top.composition}  (score {top.score:g})"]
        deciding = [r for r in top.reasons if r.delta != 0] or list(top.reasons)
        deciding.sort(key=lambda r: (-abs(r.delta), r.text))
        for r in deciding[:reasons]:
            lines.append(f"  {r}")
        lines.extend(f"  note: {n}" for n in top.notes)
        if len(self.ranked) > 1:
            second = self.ranked[1]
            diff = _differences(top, second)
            why = f": {diff[0][1]}" if diff else ""
            lines.append(
                f"runner-up {second.composition} is {top.score - second.score:g} behind{why}"
            )
        if self.excluded:
            props = Counter(c.violations[0].property for c in self.excluded)
            lines.append(
                f"excluded {len(self.excluded)}: "
                + ", ".join(
                    f"{n} by {p}={_label(self.properties, p)}"
                    for p, n in sorted(props.items(), key=lambda kv: (-kv[1], kv[0]))
                )
            )
        lines.extend(f"warning: {w}" for w in self.warnings)
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.explain()


def _differences(top: Candidate, other: Candidate) -> list[tuple[float, str]]:
    """Criteria on which ``other`` scores differently from ``top``: (its
    delta minus top's, the text), biggest losses first."""
    mine = {r.key: r for r in top.reasons}
    theirs = {r.key: r for r in other.reasons}
    out = []
    for key in sorted(set(mine) | set(theirs)):
        a, b = mine.get(key), theirs.get(key)
        da, db = (a.delta if a else 0.0), (b.delta if b else 0.0)
        if abs(da - db) < 1e-9:
            continue
        if b is not None:
            text = b.text
        else:
            assert a is not None
            text = f"only #1: {a.text}"
        out.append((round(db - da, 3), text))
    out.sort(key=lambda x: (x[0], x[1]))
    return out


class Selector:
    """Evaluates compositions against properties and a path."""

    def __init__(
        self,
        properties: TransportProperties | None = None,
        path: PathMeasurements | None = None,
        *,
        registry: Registry | None = None,
        max_datagram_size: int = 1452,
    ) -> None:
        self.properties = properties or TransportProperties()
        self.path = path or PathMeasurements()
        self.registry = registry or default_registry()
        self.payload = max(1, max_datagram_size - wire.DATA_OVERHEAD)
        self.max_datagram_size = max_datagram_size
        self._param_cache: dict[tuple[str, str], tuple[dict[str, Any], list[str]]] = {}

    # ------------------------------------------------------- path model

    @property
    def rtt_s(self) -> float | None:
        return self.path.rtt_ms / 1000 if self.path.rtt_ms is not None else None

    def _bdp_segments(self) -> tuple[float, str] | None:
        """Bandwidth x RTT in segments, and where the rate came from."""
        rtt = self.rtt_s
        if rtt is None:
            return None
        if self.path.bandwidth_mbps is not None:
            rate, src = self.path.bandwidth_mbps, "bandwidth"
        elif self.properties.min_throughput_mbps is not None:
            rate, src = self.properties.min_throughput_mbps, "min_throughput"
        else:
            return None
        return rate * 1e6 / 8 * rtt / self.payload, src

    @property
    def latency_sensitive(self) -> bool:
        return self.properties.max_delay_ms is not None or self.properties.capacity_profile in (
            CapacityProfile.LOW_LATENCY_INTERACTIVE,
            CapacityProfile.LOW_LATENCY_NON_INTERACTIVE,
        )

    def path_warnings(self) -> list[str]:
        p, path = self.properties, self.path
        out = []
        if (
            p.max_delay_ms is not None
            and path.rtt_ms is not None
            and path.rtt_ms / 2 > p.max_delay_ms
        ):
            out.append(
                f"max_delay_ms={p.max_delay_ms:g} cannot be met on this path: half the RTT is "
                f"already {path.rtt_ms / 2:g} ms; no composition can fix that"
            )
        if (
            p.min_throughput_mbps is not None
            and path.bandwidth_mbps is not None
            and path.bandwidth_mbps < p.min_throughput_mbps
        ):
            out.append(
                f"min_throughput_mbps={p.min_throughput_mbps:g} exceeds the path's bandwidth "
                f"({path.bandwidth_mbps:g} Mbit/s); no composition can fix that"
            )
        if p.security is Preference.PREFER and not self._encryption_installed():
            out.append("security=Prefer is not honoured: VTL has no encryption TF installed")
        return out

    def _encryption_installed(self) -> bool:
        return any(tf_traits(cls).get("encrypted") for cls in self.registry)

    # ------------------------------------------------- candidate space

    def candidates(self) -> list[Composition]:
        """Every combination of installed TFs (newest versions), with
        parameters chosen for these properties and this path."""
        inventory = self.registry.inventory()
        per_role: list[list[str]] = []
        for role in ROLES:
            names = sorted(inventory.get(role, {}))
            if role in EXPLICIT_ONLY_ROLES and DEFAULTS[role] in names:
                names = [DEFAULTS[role]]
            if not names:
                raise SelectionError(
                    f"no transport function is installed for the {role!r} role, "
                    "so no composition can be built"
                )
            per_role.append(names)
        out = []
        for names in itertools.product(*per_role):
            data: dict[str, Any] = {}
            for role, name in zip(ROLES, names, strict=True):
                params, _ = self._params_for(role, name)
                data[role] = {"name": name, **params}
            try:
                out.append(Composition.from_dict(data).validate(self.registry))
            except CompositionError:
                # a parameter we chose does not fit this TF: fall back to its defaults
                try:
                    plain = Composition.from_dict(dict(zip(ROLES, names, strict=True)))
                except CompositionError:
                    continue  # TFs that cannot be combined (integrity=partial + security)
                out.append(plain.validate(self.registry))
        return out

    def _params_for(self, role: str, name: str) -> tuple[dict[str, Any], list[str]]:
        """Parameters for one TF of a candidate, and notes on why."""
        key = (role, name)
        if key not in self._param_cache:
            self._param_cache[key] = self._choose_params(role, name)
        params, notes = self._param_cache[key]
        return dict(params), list(notes)

    def _choose_params(self, role: str, name: str) -> tuple[dict[str, Any], list[str]]:
        cls = self.registry.get(role, name)
        params = cls.PARAMS
        traits = tf_traits(cls)
        p = self.properties
        out: dict[str, Any] = {}
        notes: list[str] = []
        bdp = self._bdp_segments()

        def clamp(value: float, lo: int, pname: str) -> int:
            spec = params[pname]
            hi = spec.max if spec.max is not None else value
            lo = max(lo, int(spec.min) if spec.min is not None else lo)
            return int(min(max(math.ceil(value), lo), hi))

        if role == "reliability":
            if "window" in params and traits.get("reliable") and bdp is not None:
                segs, src = bdp
                if traits.get("recovery") == "go-back-n":
                    out["window"] = clamp(1.25 * segs, 8, "window")
                    how = "1.25 x"
                else:
                    out["window"] = clamp(2 * segs, 32, "window")
                    how = "2 x"
                notes.append(
                    f"{name} window {out['window']} segments = {how} {src} x RTT "
                    f"({_fmt(segs)} segments of {self.payload} bytes)"
                )
            if (
                traits.get("partial_reliability")
                and "lifetime_ms" in params
                and self._deadline_tolerant()
            ):
                out["lifetime_ms"] = float(p.max_delay_ms)  # type: ignore[arg-type]
                notes.append(
                    f"{name} lifetime_ms {out['lifetime_ms']:g} from max_delay_ms: data that "
                    "cannot arrive in time is abandoned (max_loss_percent tolerates it)"
                )
            if "min_rto" in params and traits.get("reliable") and self.latency_sensitive:
                rtt = self.rtt_s
                min_rto = max(0.01, 1.5 * rtt) if rtt is not None else 0.05
                default = params["min_rto"].default
                if min_rto < default:
                    out["min_rto"] = round(min_rto, 4)
                    notes.append(
                        f"{name} min_rto {out['min_rto']} s (default {default}) "
                        "for quicker recovery of lost segments"
                    )
        elif role == "congestion":
            if traits.get("constant_rate") and "rate_mbps" in params:
                rate = None
                if p.min_throughput_mbps is not None:
                    overhead = self.max_datagram_size / self.payload
                    rate = p.min_throughput_mbps * overhead
                    src = f"min_throughput_mbps={p.min_throughput_mbps:g} plus header overhead"
                elif p.capacity_profile is CapacityProfile.CONSTANT_RATE_STREAMING and (
                    self.path.bandwidth_mbps is not None
                ):
                    rate = 0.9 * self.path.bandwidth_mbps
                    src = "90% of the path bandwidth (no throughput target given)"
                if rate is not None:
                    if self.path.bandwidth_mbps is not None:
                        rate = min(rate, self.path.bandwidth_mbps)
                    spec = params["rate_mbps"]
                    rate = max(spec.min or 0.0, min(rate, spec.max or rate))
                    out["rate_mbps"] = round(rate, 3)
                    notes.append(f"{name} rate_mbps {out['rate_mbps']} from {src}")
            if (
                p.capacity_profile is CapacityProfile.SCAVENGER
                and traits.get("congestion_controlled")
                and not traits.get("scavenger")
                and "beta" in params
            ):
                out["beta"] = max(params["beta"].min or 0.3, 0.3)
                if "initial_window_packets" in params:
                    out["initial_window_packets"] = 2
                notes.append(
                    f"{name} tuned to yield (beta {out['beta']}, small initial window): "
                    "an approximation of a scavenger, no LEDBAT-like TF is installed"
                )
        elif role == "integrity" and "coverage" in params and p.recv_checksum_len is not None:
            out["coverage"] = clamp(p.recv_checksum_len, 0, "coverage")
            notes.append(f"{name} coverage {out['coverage']} bytes from recv_checksum_len")
        elif role == "flow" and "window" in params and bdp is not None:
            segs, src = bdp
            out["window"] = clamp(4 * segs, 64, "window")
            notes.append(f"{name} receive window {out['window']} segments = 4 x {src} x RTT")
        return out, notes

    # ---------------------------------------------------------- scoring

    def evaluate(self, composition: Composition) -> Candidate:
        """Score one composition (ours or a peer's) and list its violations."""
        comp = composition
        t = CompositionTraits.of(comp, self.registry)
        cand = Candidate(comp, t)
        for role in ROLES:
            params, notes = self._params_for(role, comp[role].name)
            if all(comp[role].params.get(k) == v for k, v in params.items()):
                cand.notes.extend(notes)

        def add(key: str, delta: float, text: str) -> None:
            cand.reasons.append(Reason(round(delta, 3), text, key))

        def exclude(prop: str, text: str) -> None:
            cand.violations.append(Violation(prop, text))

        self._score_preferences(comp, t, add, exclude)
        self._score_loss(comp, t, add, exclude)
        self._score_throughput(comp, t, add, exclude)
        self._score_delay(comp, t, add)
        self._score_profile(comp, t, add)
        self._score_mechanisms(comp, t, add)
        return cand

    def _score_preferences(self, comp, t: CompositionTraits, add, exclude) -> None:
        for prop in SELECTION_PROPERTIES:
            pref: Preference = getattr(self.properties, prop)
            trait, role, yes, no = _PROPERTY_TRAITS[prop]
            has = bool(getattr(t, trait))
            if role is None:  # a property of the whole composition
                desc = f"this composition {yes if has else no}"
            else:
                desc = f"{_who(comp, role)} {yes if has else no}"
            tag = f"{prop}={pref.label}"
            if (pref is Preference.REQUIRE and not has) or (pref is Preference.PROHIBIT and has):
                exclude(prop, f"{tag}: {desc}")
            elif pref is Preference.PREFER:
                add(prop, W_PREFERENCE if has else 0.0, f"{tag}{'' if has else ' not met'}: {desc}")
            elif pref is Preference.AVOID:
                add(prop, 0.0 if has else W_PREFERENCE, f"{tag}{' not met' if has else ''}: {desc}")
            elif pref is not Preference.NO_PREFERENCE:
                add(prop, 0.0, f"{tag}: {desc}")

    def _score_mechanisms(self, comp, t: CompositionTraits, add) -> None:
        """Mechanism quality and tie-breakers (small weights)."""
        p, path = self.properties, self.path
        rel, cc = comp["reliability"].name, comp["congestion"].name
        if t.reliable:
            # relative to the best recovery, so it ranks reliable TFs among
            # themselves without favouring reliability over its absence
            q = {"selective": 0.0, "go-back-n": -2.0, "stop-and-wait": -3.0}.get(t.recovery, -1.0)
            if path.loss_percent and t.recovery != "selective":
                q -= min(3.0, path.loss_percent)  # loss hurts non-selective recovery most
            loss = f" (path loss {path.loss_percent:g}%)" if path.loss_percent else ""
            add(
                "mechanism:recovery",
                q * W_MECHANISM,
                f"reliability={rel} {_RECOVERY_TEXT.get(t.recovery, '')}{loss}",
            )
        if (
            t.partial_reliability
            and p.per_msg_reliability is Preference.NO_PREFERENCE
            and not self._deadline_tolerant()
        ):
            add(
                "mechanism:partial",
                -2.5 * W_MECHANISM,
                f"reliability={rel} may give up on data, which nobody asked for "
                "(per_msg_reliability not specified)",
            )
        if t.congestion_controlled:
            add(
                "mechanism:congestion",
                2.0 * W_MECHANISM,
                f"congestion={cc} is safe on shared networks",
            )
        elif not t.constant_rate:
            asked = p.congestion_control in (Preference.AVOID, Preference.PROHIBIT)
            add(
                "mechanism:congestion",
                0.0 if asked else -2.0 * W_MECHANISM,
                f"congestion={cc} has no congestion response (for dedicated links only)",
            )
        elif (
            p.capacity_profile is not CapacityProfile.CONSTANT_RATE_STREAMING
            and p.min_throughput_mbps is None
        ):
            add(
                "mechanism:congestion",
                -3.0 * W_MECHANISM,
                f"congestion={cc} sends at a fixed rate but no rate was asked for",
            )
        if not t.ordered and not t.messages:
            add(
                "mechanism:unordered-stream",
                -4.0,
                "ordering=unordered with framing=stream hands out bytes without their "
                "positions (unordered suits message framing)",
            )
        if p.reliability is Preference.NO_PREFERENCE and t.reliable:
            add("tie:reliability", 2 * W_TIE, "delivers everything (reliability not specified)")
        if (
            p.preserve_order is Preference.NO_PREFERENCE
            and t.ordered
            and not self.latency_sensitive
        ):
            add("tie:order", W_TIE, "in-order delivery (order not specified)")
        if p.preserve_msg_boundaries is Preference.NO_PREFERENCE and t.messages == (not t.ordered):
            add(
                "tie:framing",
                W_TIE,
                "message framing suits unordered delivery"
                if t.messages
                else "stream framing suits ordered delivery",
            )
        defaults = [r for r in ROLES if comp[r].name == DEFAULTS[r]]
        if defaults:
            add(
                "tie:defaults",
                W_TIE * len(defaults) / len(ROLES),
                f"{len(defaults)} of {len(ROLES)} TFs are VTL's defaults",
            )

    def _score_loss(self, comp, t: CompositionTraits, add, exclude) -> None:
        limit = self.properties.max_loss_percent
        if limit is None:
            return
        tag = f"max_loss_percent={limit:g}"
        if t.partial_reliability and self._deadline_tolerant():
            add("max_loss_percent", 0.0, f"{tag}: loses only what could not arrive in time")
            return
        if t.reliable:
            add("max_loss_percent", 0.0, f"{tag}: reliable, residual loss 0%")
            return
        name = f"reliability={comp['reliability'].name}"
        loss = self.path.loss_percent
        if loss is None:
            if limit == 0:
                exclude("max_loss_percent", f"{tag}: {name} may lose data")
            else:
                add(
                    "max_loss_percent",
                    -1.0,
                    f"{tag}: {name} loses what the path loses (path loss unknown)",
                )
        elif loss > limit:
            exclude(
                "max_loss_percent",
                f"{tag}: {name} would lose about {loss:g}% (the path's loss)",
            )
        else:
            add("max_loss_percent", 0.0, f"{tag}: {name} loses about {loss:g}%, within tolerance")

    def _score_throughput(self, comp, t: CompositionTraits, add, exclude) -> None:
        target = self.properties.min_throughput_mbps
        if target is None:
            return
        rtt, loss = self.rtt_s, self.path.loss_percent
        rel, cc = comp["reliability"].name, comp["congestion"].name
        tag = f"min_throughput_mbps={target:g}"
        key = "min_throughput_mbps"
        if t.reliable and t.recovery == "stop-and-wait":
            if rtt is None:
                add(
                    key + ":window",
                    -W_QOS,
                    f"{tag}: reliability={rel} sends one segment per RTT (RTT unknown, "
                    "cannot check)",
                )
            else:
                cap = self.payload * 8 / rtt / 1e6
                if cap < target:
                    exclude(
                        key,
                        f"{tag}: reliability={rel} is capped at {_fmt(cap)} Mbit/s "
                        f"(one segment per {self.path.rtt_ms:g} ms RTT)",
                    )
                    return
        # Mathis et al.: loss-based AIMD gets about MSS/RTT * 1.22/sqrt(p)
        est = self.payload * 8 / rtt * 1.22 / math.sqrt(loss / 100) / 1e6 if loss and rtt else None
        if t.constant_rate:
            rate = comp["congestion"].params.get("rate_mbps")
            if rate is None or rate + 1e-9 < target:
                shown = f"{rate:g} Mbit/s" if rate is not None else "(its default)"
                exclude(key, f"{tag}: congestion={cc} rate {shown} is below the target")
            elif est is not None and est < target:
                add(
                    key,
                    W_QOS,
                    f"{tag}: congestion={cc} paces at {rate:g} Mbit/s whatever the loss "
                    f"(loss-based control would get about {_fmt(est)} Mbit/s)",
                )
            elif self.properties.capacity_profile is CapacityProfile.CONSTANT_RATE_STREAMING:
                add(key, W_QOS, f"{tag}: congestion={cc} paces at {rate:g} Mbit/s")
            else:
                add(key, 0.0, f"{tag}: congestion={cc} paces at {rate:g} Mbit/s")
            return
        if t.congestion_controlled and est is not None and est < target:
            add(
                key,
                -W_QOS,
                f"{tag}: congestion={cc} is limited to about {_fmt(est)} Mbit/s by "
                f"{loss:g}% random loss at {self.path.rtt_ms:g} ms RTT",
            )
        if t.reliable and t.recovery == "go-back-n" and loss:
            add(
                key + ":window",
                -1.0,
                f"{tag}: reliability={rel} wastes capacity resending whole windows "
                f"at {loss:g}% loss",
            )

    def _deadline_tolerant(self) -> bool:
        """A delay target and some tolerated loss: partial reliability with
        that lifetime fits (retransmit what arrives in time, drop the rest)."""
        p = self.properties
        return p.max_delay_ms is not None and (p.max_loss_percent or 0) > 0

    def _score_delay(self, comp, t: CompositionTraits, add) -> None:
        target = self.properties.max_delay_ms
        if target is None:
            return
        tag = f"max_delay_ms={target:g}"
        key = "max_delay_ms"
        rtt_ms, loss = self.path.rtt_ms, self.path.loss_percent
        rel = comp["reliability"].name
        if t.partial_reliability and self._deadline_tolerant():
            if loss == 0 or (rtt_ms is not None and rtt_ms * 1.5 <= target):
                add(
                    key,
                    W_QOS / 2,
                    f"{tag}: reliability={rel} resends what still arrives in time and "
                    "abandons the rest (loss is tolerated): nothing arrives late",
                )
            else:
                add(
                    key,
                    0.0,
                    f"{tag}: reliability={rel} would abandon every loss (a retransmission "
                    "does not fit): no gain over sending once",
                )
        elif t.reliable:
            if rtt_ms is not None and rtt_ms * 1.5 <= target:
                add(key, 0.0, f"{tag}: a retransmission (about {rtt_ms * 1.5:g} ms) still fits")
            elif loss == 0:
                add(key, 0.0, f"{tag}: no loss on the path, so no retransmission delay")
            else:
                add(key, -W_QOS / 2, f"{tag}: a lost segment arrives at least one RTT late")
            if t.recovery == "stop-and-wait":
                add(
                    key + ":queue",
                    -W_QOS,
                    f"{tag}: reliability={rel} queues data behind one round trip per segment",
                )
        elif loss == 0 or (rtt_ms is not None and rtt_ms * 1.5 <= target):
            add(key, 0.0, f"{tag}: sends once (no gain: a retransmission would fit too)")
        else:
            add(key, W_QOS / 2, f"{tag}: no retransmission delay (loss is tolerated)")
        if not t.ordered and t.messages:
            add(key + ":hol", W_QOS / 2, f"{tag}: unordered messages avoid head-of-line blocking")

    def _score_profile(self, comp, t: CompositionTraits, add) -> None:
        profile = self.properties.capacity_profile
        if t.scavenger and profile is not CapacityProfile.SCAVENGER:
            # a scavenger only makes sense when the application asked to yield
            add(
                "profile:yield",
                -W_PROFILE,
                f"congestion={comp['congestion'].name} yields to all other traffic "
                "(only for capacity_profile=scavenger)",
            )
        if profile is CapacityProfile.DEFAULT:
            return
        tag = f"capacity_profile={profile.value}"
        rel, cc = comp["reliability"].name, comp["congestion"].name
        recovery_weight = {"selective": 0.5, "go-back-n": -0.25, "stop-and-wait": -1.0}
        if profile in (
            CapacityProfile.LOW_LATENCY_INTERACTIVE,
            CapacityProfile.LOW_LATENCY_NON_INTERACTIVE,
        ):
            w = W_PROFILE if profile is CapacityProfile.LOW_LATENCY_INTERACTIVE else W_PROFILE / 2
            if t.reliable:
                add(
                    "profile:recovery",
                    recovery_weight.get(t.recovery, 0.0) * w,
                    f"{tag}: reliability={rel} {_RECOVERY_TEXT.get(t.recovery, '')}",
                )
            if not t.ordered and t.messages:
                add(
                    "profile:hol",
                    0.75 * w,
                    f"{tag}: unordered messages avoid head-of-line blocking",
                )
        elif profile is CapacityProfile.CONSTANT_RATE_STREAMING:
            if t.constant_rate:
                add(
                    "profile:rate", 1.5 * W_PROFILE, f"{tag}: congestion={cc} paces a constant rate"
                )
        elif profile is CapacityProfile.SCAVENGER:
            if t.scavenger:
                add("profile:yield", 1.5 * W_PROFILE, f"{tag}: congestion={cc} yields to others")
            elif not t.congestion_controlled:
                add(
                    "profile:yield",
                    -1.5 * W_PROFILE,
                    f"{tag}: congestion={cc} does not yield to other traffic",
                )
        elif profile is CapacityProfile.CAPACITY_SEEKING:
            if t.reliable:
                add(
                    "profile:recovery",
                    recovery_weight.get(t.recovery, 0.0) * W_PROFILE,
                    f"{tag}: reliability={rel} {_RECOVERY_TEXT.get(t.recovery, '')}",
                )
            if t.constant_rate:
                add(
                    "profile:rate",
                    -W_PROFILE,
                    f"{tag}: congestion={cc} cannot grow beyond its fixed rate",
                )

    # --------------------------------------------------------- selection

    def check(self, composition: Composition) -> list[Violation]:
        """The Require/Prohibit properties and QoS targets ``composition``
        violates (empty: acceptable).  Used by listeners and for peers'
        counter-offers."""
        return self.evaluate(composition).violations

    def select(self) -> Selection:
        """Rank every installed composition; raise :class:`SelectionError`
        naming the unsatisfiable properties when none is eligible."""
        if self.properties.security is Preference.REQUIRE and not self._encryption_installed():
            err = SelectionError(
                "security=Require cannot be satisfied: no installed transport function "
                "encrypts (VTL has no encryption TF yet); use Prefer or No Preference, or "
                "install an encrypting TF"
            )
            err.properties = ["security"]  # type: ignore[attr-defined]
            raise err
        ranked, excluded = [], []
        for comp in self.candidates():
            cand = self.evaluate(comp)
            (ranked if cand.eligible else excluded).append(cand)
        ranked.sort(key=Candidate.sort_key)
        excluded.sort(key=Candidate.sort_key)
        if not ranked:
            raise self._unsatisfiable(excluded)
        return Selection(
            self.properties, self.path, ranked, excluded, self.path_warnings(), _selector=self
        )

    def _unsatisfiable(self, excluded: list[Candidate]) -> SelectionError:
        n = len(excluded)
        by_prop: dict[str, list[str]] = {}
        for cand in excluded:
            for prop in {v.property for v in cand.violations}:
                by_prop.setdefault(prop, []).append(cand.violations[0].text)
        everywhere = sorted(
            prop
            for prop in by_prop
            if all(any(v.property == prop for v in c.violations) for c in excluded)
        )
        if everywhere:
            details = []
            for prop in everywhere:
                texts = sorted(
                    {v.text for c in excluded for v in c.violations if v.property == prop}
                )
                details.append(
                    f"{texts[0]}" + (f" (and {len(texts) - 1} similar)" if len(texts) > 1 else "")
                )
            msg = (
                "no installed composition satisfies "
                + ", ".join(f"{prop}={_label(self.properties, prop)}" for prop in everywhere)
                + f" (all {n} candidates violate it): "
                + "; ".join(details)
            )
            props = everywhere
        else:
            props = sorted(by_prop)
            msg = (
                "no installed composition satisfies these properties together: "
                + ", ".join(f"{prop}={_label(self.properties, prop)}" for prop in props)
                + f"; each of the {n} candidates violates at least one of them"
            )
        err = SelectionError(msg)
        err.properties = props  # type: ignore[attr-defined]
        return err


def select(
    properties: TransportProperties | None = None,
    path: PathMeasurements | None = None,
    *,
    registry: Registry | None = None,
    max_datagram_size: int = 1452,
) -> Selection:
    """Rank the installed compositions for ``properties`` on ``path``.

    Raises :class:`~vtl.core.errors.SelectionError` naming the
    unsatisfiable properties when no composition meets the Require /
    Prohibit set and the QoS targets."""
    return Selector(
        properties, path, registry=registry, max_datagram_size=max_datagram_size
    ).select()
