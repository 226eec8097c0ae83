"""Measure the delivery pause a live reconfiguration causes on the testbed.

Two namespaces joined by an emulated link (default: profile net3, 10 Mbit/s,
20 ms RTT); ``vtl recv`` in b, ``vtl send --reconfigure-after`` in a. The
receiver reports, for the switch, the longest gap in delivery to the
application from the arrival of the request to the first delivery after
the switch (``pause``). A reconfiguration to the very same composition is
run too, as the control: its pause is what the exchange costs with no TF
change, i.e. the path's ordinary delivery gaps over the same window.

Run as root from the repository::

    PYTHONPATH=src .venv/bin/python scripts/reconfig_pause.py --loss 0 2 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from vtl.testbed import Topology

PY = sys.executable
START = "reliability=go-back-n(window=64) congestion=newreno"
SWITCHES = [
    ("control (same composition)", START),
    ("go-back-n -> selective-repeat", "reliability=selective-repeat(window=512)"),
    ("newreno -> fixed-rate 8 Mbit/s", "congestion=fixed-rate(rate_mbps=8)"),
    ("flow window 4096 -> 256", "flow=window(window=256)"),
]


def _one(net, src: Path, change: str, after: int, port: int) -> dict:
    env = {**os.environ, "PYTHONPATH": os.environ.get("PYTHONPATH", "")}
    b_ip = net.addr("b")
    recv = net.hosts["b"].popen(
        [PY, "-m", "vtl", "recv", f"{b_ip}:{port}", "--json", "-c", START],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    time.sleep(0.7)
    cp = net.hosts["a"].run(
        [PY, "-m", "vtl", "send", f"{b_ip}:{port}", str(src), "--json", "-c", START]
        + ["--reconfigure-after", str(after), change],
        check=False,
        timeout=180,
        env=env,
    )
    out, err = recv.communicate(timeout=60)
    if cp.returncode != 0:
        raise RuntimeError(f"send failed: {cp.stderr}")
    sent, got = json.loads(cp.stdout), json.loads(out)
    (rec,) = got["reconfigurations"]
    return {
        "verified": sent["verified"],
        "pause_ms": None if rec["pause"] is None else rec["pause"] * 1000,
        "elapsed_ms": rec["elapsed"] * 1000,
        "srtt_ms": sent["srtt_ms"],
        "goodput_mbps": sent["goodput_mbps"],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--profile", default="net3")
    ap.add_argument("--loss", type=float, nargs="+", default=[0.0, 2.0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--size", type=int, default=4 << 20)
    args = ap.parse_args()
    payload = os.urandom(args.size)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "in.bin"
        src.write_bytes(payload)
        os.chmod(tmp, 0o755)
        for loss in args.loss:
            with Topology.pair(args.profile, loss=loss).up() as net:
                port = 7100
                for name, change in SWITCHES:
                    runs = []
                    for _ in range(args.repeats):
                        port += 1
                        runs.append(_one(net, src, change, args.size // 3, port))
                    pauses = [r["pause_ms"] for r in runs if r["pause_ms"] is not None]
                    row = {
                        "profile": args.profile,
                        "loss": loss,
                        "switch": name,
                        "verified": all(r["verified"] for r in runs),
                        "pause_ms": [round(p, 2) for p in pauses],
                        "pause_ms_median": round(statistics.median(pauses), 2) if pauses else None,
                        "elapsed_ms": [round(r["elapsed_ms"], 1) for r in runs],
                        "srtt_ms": round(statistics.median(r["srtt_ms"] for r in runs), 1),
                        "goodput_mbps": round(
                            statistics.median(r["goodput_mbps"] for r in runs), 2
                        ),
                    }
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
