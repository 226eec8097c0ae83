"""Measure deploy time: verify + load + register, for a module and a wheel.

``python -m vtl.deploy.measure [--runs N]`` builds a small single-module
package and a wheel, signs both, and deploys fresh copies (each with a new
digest, so nothing is cached) into an endpoint, printing the median, p90,
min and max of each phase in milliseconds."""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import zipfile
from pathlib import Path

from vtl.core.config import ConnectionConfig
from vtl.core.endpoint import EndpointCore
from vtl.deploy.deployer import Deployer
from vtl.deploy.trust import TrustPolicy, keygen, sign

SOURCE = '''\
"""A deployed congestion controller (run {n})."""
from typing import ClassVar
from vtl.tfs.congestion.newreno import NewReno


class MeasuredCC(NewReno):
    """NewReno under a deployed name."""

    NAME: ClassVar[str] = "measured{n}"
    VERSION: ClassVar[str] = "1.0"
'''


def _module(d: Path, n: int) -> Path:
    path = d / f"measured{n}.py"
    path.write_text(SOURCE.format(n=n))
    return path


def _wheel(d: Path, n: int) -> Path:
    dist = f"measured{n}"
    path = d / f"{dist}-1.0-py3-none-any.whl"
    info = f"{dist}-1.0.dist-info"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(f"{dist}/__init__.py", "")
        zf.writestr(f"{dist}/cc.py", SOURCE.format(n=n))
        zf.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n")
        zf.writestr(f"{info}/entry_points.txt", f"[vtl.tfs]\nm = {dist}.cc:MeasuredCC\n")
    return path


def measure(runs: int = 20) -> dict[str, dict[str, dict[str, float]]]:
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        _, pub, _ = keygen(d / "key")
        trust = TrustPolicy.load(trusted_keys=pub)
        out = {}
        for kind, build in (("module", _module), ("wheel", _wheel)):
            core = EndpointCore(ConnectionConfig(), listen=True)
            deployer = Deployer.for_endpoint(core, trust)
            samples: dict[str, list[float]] = {}
            for i in range(runs):
                path = build(d, i + (1000 if kind == "wheel" else 0))
                sign(path, d / "key")
                dep = deployer.deploy(path)
                for phase, ms in dep.timing_ms.items():
                    samples.setdefault(phase, []).append(ms)
            deployer.close()
            out[kind] = {
                phase: {
                    "median": statistics.median(v),
                    "p90": sorted(v)[int(0.9 * (len(v) - 1))],
                    "min": min(v),
                    "max": max(v),
                }
                for phase, v in samples.items()
            }
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    result = measure(args.runs)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    for kind, phases in result.items():
        for phase, s in phases.items():
            print(
                f"{kind:6} {phase:8} median {s['median']:7.2f} ms  p90 {s['p90']:7.2f}  "
                f"min {s['min']:7.2f}  max {s['max']:7.2f}"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
