"""Built-in congestion controllers.

Every controller is a :class:`~vtl.tfs.congestion.base.CongestionControl`
that exposes a congestion window (bytes allowed in flight) and a pacing rate
(bytes/s; ``None`` lets the engine derive one from cwnd / srtt, ``inf``
means "do not pace"):

* ``none`` (:class:`NoCongestionControl`): infinite window, no pacing;
* ``fixed-rate`` (:class:`FixedRate`): paced constant bit rate that ignores
  loss, for constant-rate streaming;
* ``newreno`` (:class:`NewReno`): loss-based AIMD as in RFC 9002 section 7,
  the default;
* ``cubic`` (:class:`Cubic`): RFC 9438 with HyStart++ (RFC 9406);
* ``bbr`` (:class:`Bbr`): model-based (bottleneck bandwidth and min RTT,
  BBRv1 state machine), does not collapse under random loss;
* ``ledbat`` (:class:`Ledbat`): delay-based scavenger (RFC 6817 / LEDBAT++),
  chosen for the capacity profile "scavenger".

``BUILTIN`` lists the classes to register, in the spirit of aioquic's
``congestion`` registry; third-party controllers subclass
``CongestionControl`` and register through the ``vtl.tfs`` entry points.
"""

from __future__ import annotations

from vtl.tfs.congestion.base import (
    INFINITE_WINDOW,
    CongestionControl,
    RateSample,
    SentPacketInfo,
)
from vtl.tfs.congestion.bbr import Bbr
from vtl.tfs.congestion.cubic import Cubic
from vtl.tfs.congestion.fixed_rate import FixedRate
from vtl.tfs.congestion.ledbat import Ledbat
from vtl.tfs.congestion.newreno import NewReno
from vtl.tfs.congestion.none import NoCongestionControl

BUILTIN: list[type[CongestionControl]] = [
    NoCongestionControl,
    FixedRate,
    NewReno,
    Cubic,
    Bbr,
    Ledbat,
]

__all__ = [
    "BUILTIN",
    "Bbr",
    "Cubic",
    "Ledbat",
    "INFINITE_WINDOW",
    "CongestionControl",
    "FixedRate",
    "NewReno",
    "NoCongestionControl",
    "RateSample",
    "SentPacketInfo",
]
