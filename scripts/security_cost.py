"""CPU cost of security=aead, measured in-process on the simulator.

Both endpoints run in this process over a clean simulated link, so the
process CPU time per MiB is the whole engine's cost (sender + receiver);
comparing security=none with each cipher gives the price of the AEAD.
``--micro`` times one seal and one open of a full DATA packet instead.
Run: PYTHONPATH=src .venv/bin/python scripts/security_cost.py [--mib 16] [--runs 3] [--micro]
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


def micro(runs: int) -> None:
    """Best-of-``runs`` time of seal and open of a 1396-byte DATA payload."""
    from vtl.core import wire
    from vtl.core.protection import CIPHERS, PacketProtection

    n = 20_000
    for cipher, (klen, _) in CIPHERS.items():
        tx = PacketProtection(cipher, b"k" * klen, b"i" * 12, b"K" * klen, b"I" * 12, 4096)
        rx = PacketProtection(cipher, b"K" * klen, b"I" * 12, b"k" * klen, b"i" * 12, 4096)
        payload = bytes(1396)
        seal_s = open_s = float("inf")
        for r in range(runs):
            plain = [wire.encode_data(7, 9, r * n + i, 0, 0, payload) for i in range(n)]
            start = time.perf_counter()
            sealed = [tx.seal(d) for d in plain]
            seal_s = min(seal_s, (time.perf_counter() - start) / n)
            packets = [wire.decode(d) for d in sealed]
            start = time.perf_counter()
            for i, (p, d) in enumerate(zip(packets, sealed, strict=True)):
                rx.open(p, r * n + i, d)
            open_s = min(open_s, (time.perf_counter() - start) / n)
        print(f"{cipher:20s} seal {seal_s * 1e6:5.2f} us   open {open_s * 1e6:5.2f} us")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mib", type=int, default=16)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--micro", action="store_true", help="per-packet seal/open times only")
    args = ap.parse_args()
    if args.micro:
        micro(args.runs)
        return
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
