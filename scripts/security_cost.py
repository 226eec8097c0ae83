"""CPU cost of security=aead, measured in-process on the simulator.

Both endpoints run in this process over a clean simulated link, so the
process CPU time per MiB is the whole engine's cost (sender + receiver);
comparing security=none with each cipher gives the price of the AEAD.
Run: PYTHONPATH=src .venv/bin/python scripts/security_cost.py [--mib 16] [--runs 3]
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from vtl.core.config import ConnectionConfig
from vtl.core.secure_handshake import SecurityConfig, public_bytes
from vtl.sim.harness import run_transfer
from vtl.sim.network import LinkConditions

COMPOSITIONS = [
    "security=none",
    "security=aead(cipher=chacha20-poly1305)",
    "security=aead(cipher=aes-128-gcm)",
    "security=aead(cipher=aes-256-gcm)",
]


def cpu_ms_per_mib(comp: str, data: bytes, key: Ed25519PrivateKey) -> float:
    ca = ConnectionConfig(
        rng=random.Random(1),
        security=SecurityConfig(trusted_keys=frozenset({public_bytes(key)})),
    )
    cb = ConnectionConfig(rng=random.Random(2), security=SecurityConfig(identity=key))
    start = time.process_time()
    result = run_transfer(
        comp, data_ab=data, config_a=ca, config_b=cb, forward=LinkConditions(delay=0.005)
    )
    elapsed = time.process_time() - start
    if result.b.data != data:
        raise SystemExit(f"{comp}: transfer not byte-exact")
    return elapsed * 1000 / (len(data) / (1 << 20))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mib", type=int, default=16)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    key = Ed25519PrivateKey.generate()
    data = random.Random(1).randbytes(args.mib << 20)
    runs: dict[str, list[float]] = {c: [] for c in COMPOSITIONS}
    for _ in range(args.runs):  # interleaved, so load changes hit every composition
        for comp in COMPOSITIONS:
            runs[comp].append(cpu_ms_per_mib(comp, data, key))
    base = min(runs[COMPOSITIONS[0]])
    base_med = statistics.median(runs[COMPOSITIONS[0]])
    print(f"{args.mib} MiB, {args.runs} runs, CPU ms per MiB (sender + receiver, one process)")
    for comp in COMPOSITIONS:
        best, med = min(runs[comp]), statistics.median(runs[comp])
        all_runs = " ".join(f"{x:.1f}" for x in runs[comp])
        print(
            f"{comp:40s} best {best:6.1f} ({100 * (best / base - 1):+5.1f}%)"
            f"  median {med:6.1f} ({100 * (med / base_med - 1):+5.1f}%)  runs: {all_runs}"
        )


if __name__ == "__main__":
    main()
