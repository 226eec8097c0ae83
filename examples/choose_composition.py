"""How VTL chooses a composition: ranked candidates and the explanation for
several service requests (no network traffic).

    .venv/bin/python examples/choose_composition.py [--verbose]
"""

from __future__ import annotations

import sys

from vtl.service import (
    PathMeasurements,
    SelectionError,
    TransportProperties,
    select,
)

CASES = [
    ("TCP-like reliable stream (TAPS defaults)", TransportProperties.reliable_stream(), None),
    ("reliable messages", TransportProperties.reliable_messages(), None),
    ("UDP-like unreliable datagrams", TransportProperties.unreliable_datagram(), None),
    (
        "interactive, 40 ms RTT, 1% loss",
        TransportProperties.low_latency(max_delay_ms=80),
        PathMeasurements(rtt_ms=40, loss_percent=1),
    ),
    ("constant-rate streaming at 8 Mbit/s", TransportProperties.constant_rate(8), None),
    (
        "bulk transfer, 100 Mbit/s x 100 ms",
        TransportProperties.bulk(),
        PathMeasurements(rtt_ms=100, bandwidth_mbps=100),
    ),
    (
        "original VTL QoS: 30 ms delay, 5% loss tolerated, on a 40 ms / 2% path",
        TransportProperties.qos(max_delay_ms=30, max_loss_percent=5),
        PathMeasurements(rtt_ms=40, loss_percent=2),
    ),
    ("background (scavenger)", TransportProperties.background(), None),
    ("security required (no encryption TF yet)", TransportProperties(security="require"), None),
]


def main(argv: list[str]) -> int:
    verbose = "--verbose" in argv
    for title, properties, path in CASES:
        print(f"=== {title}")
        try:
            selection = select(properties, path)
        except SelectionError as exc:
            print(f"  SelectionError: {exc}\n")
            continue
        for i, cand in enumerate(selection.ranked[:3], start=1):
            print(f"  {i}. {cand}")
        print(f"  offered to the peer (best first): {len(selection.offers())} compositions")
        text = selection.explain(alternatives=2) if verbose else selection.summary()
        print("  " + text.replace("\n", "\n  ") + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
