"""The benchmark's arithmetic: payload efficiency, physical limits, statistics.

Payload efficiency is defined at the IP layer, the same way for every
transport: application payload bytes / IP packet bytes, for a full-size
packet on a path with a 1500-byte MTU and IPv4 (the benchmark's addresses).

* kernel TCP with timestamps: MSS 1448 in a 1500-byte packet (20 IP + 20 TCP
  + 12 timestamp option): 1448 / 1500 = 0.9653;
* VTL: a UDP payload of ``max_datagram_size`` (1452 by default) carries
  ``max_datagram_size - 40`` bytes of data (28 header + 8 seq/una + 4 CRC),
  in an IP packet 28 bytes larger (20 IPv4 + 8 UDP): 1412 / 1480 = 0.9541;
* QUIC (aioquic, run with ``max_datagram_size`` 1452): ~35 bytes of 1-RTT
  short header, AEAD tag and STREAM frame header per packet:
  1417 / 1480 = 0.9574.

The physical limit of a cell is link rate x (1 - loss) x efficiency: the
goodput a transport would reach if it kept the link busy, never sent a
byte twice that was not lost, and had no other overhead (ACKs travel the
other direction). Loss is the configured average loss rate of the data
direction (for bursty loss the same average).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence

MTU = 1500
IPV4_HEADER = 20
IPV6_HEADER = 40
UDP_HEADER = 8
TCP_HEADER = 20
TCP_TIMESTAMPS = 12
VTL_DATA_OVERHEAD = 40  # vtl.core.wire.DATA_OVERHEAD (checked by the tests)
QUIC_PACKET_OVERHEAD = 35  # vtl.bench.quic_runner.PACKET_OVERHEAD


def tcp_efficiency(
    mtu: int = MTU, *, timestamps: bool = True, ip_header: int = IPV4_HEADER
) -> float:
    """Payload / IP packet of a full-size kernel TCP segment."""
    mss = mtu - ip_header - TCP_HEADER - (TCP_TIMESTAMPS if timestamps else 0)
    return mss / mtu


def udp_efficiency(
    max_datagram_size: int, overhead: int, *, mtu: int = MTU, ip_header: int = IPV4_HEADER
) -> float:
    """Payload / IP packet of a full-size datagram of a UDP-based transport
    that puts ``max_datagram_size - overhead`` payload bytes in each datagram."""
    datagram = min(max_datagram_size, mtu - ip_header - UDP_HEADER)
    payload = datagram - overhead
    if payload <= 0:
        raise ValueError(f"no room for payload: datagram {datagram}, overhead {overhead}")
    return payload / (datagram + ip_header + UDP_HEADER)


def vtl_efficiency(max_datagram_size: int = 1452, **kw: int) -> float:
    return udp_efficiency(max_datagram_size, VTL_DATA_OVERHEAD, **kw)


def quic_efficiency(max_datagram_size: int = 1452, **kw: int) -> float:
    return udp_efficiency(max_datagram_size, QUIC_PACKET_OVERHEAD, **kw)


def physical_limit_mbps(
    rate_mbps: float | None, loss_percent: float, efficiency: float
) -> float | None:
    """Link rate x (1 - loss) x payload efficiency (None if the link has no rate)."""
    if rate_mbps is None or rate_mbps <= 0:
        return None
    if not 0 <= loss_percent <= 100:
        raise ValueError(f"loss must be a percentage, got {loss_percent}")
    if not 0 < efficiency <= 1:
        raise ValueError(f"efficiency must be in (0, 1], got {efficiency}")
    return rate_mbps * (1 - loss_percent / 100) * efficiency


def goodput_mbps(nbytes: int, seconds: float) -> float:
    if seconds <= 0:
        raise ValueError("a transfer takes a positive time")
    return nbytes * 8 / seconds / 1e6


def median(values: Iterable[float | None]) -> float | None:
    """Median of the values that are not None (None if there are none)."""
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0..100), linear interpolation between closest ranks
    (numpy's default); None for no values."""
    if not values:
        return None
    if not 0 <= q <= 100:
        raise ValueError("q must be in 0..100")
    s = sorted(values)
    pos = (len(s) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def latency_summary(latencies_ms: Sequence[float]) -> dict[str, float | None]:
    return {
        "p50": percentile(latencies_ms, 50),
        "p95": percentile(latencies_ms, 95),
        "p99": percentile(latencies_ms, 99),
        "mean": statistics.fmean(latencies_ms) if latencies_ms else None,
        "max": max(latencies_ms) if latencies_ms else None,
    }


def ratio(value: float | None, reference: float | None) -> float | None:
    """value / reference, None when either is missing or the reference is 0."""
    if value is None or reference is None or reference == 0:
        return None
    return value / reference
