"""Delivery pause of a live reconfiguration on the simulated network.

A -> B bulk transfer (go-back-n(64) + newreno) over a 10 Mbit/s link with a
40 ms RTT and random loss; A switches at t = 1 s. Reported per switch: B's
``ReconfigureDone.pause`` (longest delivery gap from the request's arrival
to the first delivery after the switch) and, from delivery times recorded
outside the engine, the longest gap in [switch, switch + 3 RTT] next to the
longest gap in the same length of time just before the switch (baseline).
A reconfiguration to the same composition is the control. (At 10 % loss
go-back-n with fixed-rate can hit the retransmission limit with or without
a switch, so the loss levels stop at 5 %; tests/test_reconfig.py covers
switches under 10 % loss.) Deterministic
(seeded); run with::

    PYTHONPATH=src .venv/bin/python scripts/reconfig_pause_sim.py
"""

from __future__ import annotations

import json
import random
import statistics

from vtl.core.composition import Composition
from vtl.core.events import ReconfigureDone
from vtl.sim.harness import Transfer
from vtl.sim.network import LinkConditions

START = "reliability=go-back-n(window=64) congestion=newreno"
SWITCHES = [
    ("control (same composition)", START),
    ("go-back-n -> selective-repeat", "reliability=selective-repeat(window=512)"),
    ("newreno -> fixed-rate 8 Mbit/s", "congestion=fixed-rate(rate_mbps=8)"),
    ("flow window 4096 -> 256", "flow=window(window=256)"),
]
RTT, SWITCH_AT = 0.04, 1.0


def _gap(times: list[float], start: float, end: float) -> float:
    pts = [t for t in times if start <= t <= end]
    return max((b - a for a, b in zip(pts, pts[1:], strict=False)), default=0.0)


def run(change: str, loss: float, seed: int) -> dict:
    times: list[float] = []
    seen = [0]

    def check(t: Transfer) -> None:
        if t.conn_b is not None and t.conn_b.stats["app_bytes_delivered"] != seen[0]:
            seen[0] = t.conn_b.stats["app_bytes_delivered"]
            times.append(t.net.now)

    data = random.Random(seed).randbytes(3_000_000)
    t = Transfer(
        [Composition.parse(START)],
        forward=LinkConditions(delay=RTT / 2, loss=loss, rate_bps=10e6),
        data_ab=data,
        seed=seed,
        schedule=[(SWITCH_AT, lambda t: t.conn_a.reconfigure(change))],
        check=check,
        timeout=120,
    )
    res = t.run()
    assert res.completed and res.clean and res.b.data == data
    (done,) = [e for _, e in res.b.events if isinstance(e, ReconfigureDone)]
    assert done.pause is not None or loss == 0
    return {
        "pause": done.pause,
        "around": _gap(times, SWITCH_AT, SWITCH_AT + 3 * RTT),
        "before": _gap(times, SWITCH_AT - 3 * RTT, SWITCH_AT),
    }


def main() -> None:
    for loss in (0.0, 0.02, 0.05):
        for name, change in SWITCHES:
            runs = [run(change, loss, seed) for seed in range(1, 6)]
            row = {"loss": loss, "switch": name, "rtt_ms": RTT * 1000}
            for key in ("pause", "around", "before"):
                vals = [r[key] * 1000 for r in runs if r[key] is not None]
                row[f"{key}_ms_median"] = round(statistics.median(vals), 2)
                row[f"{key}_ms_max"] = round(max(vals), 2)
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
