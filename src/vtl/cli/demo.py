"""``vtl demo``: two hosts in network namespaces exchange a file over VTL
across a lossy, rate-limited veth link, next to kernel TCP on the same link.

It prints what each side negotiated and the verified goodput.  (Once the
Hooker exists, the demo carries an unmodified TCP application instead.)"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

from vtl.cli.common import emit, fail

DEFAULT_COMPOSITIONS = [
    "reliability=selective-repeat congestion=bbr",  # does not read random loss as congestion
    "reliability=selective-repeat congestion=newreno",  # does, like kernel cubic
]


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="file transfer between two namespaces over a lossy link")
    p.add_argument("--size-mib", type=float, default=8.0, help="file size (default 8 MiB)")
    p.add_argument("--loss", type=float, default=2.0, help="random loss %% each way (default 2)")
    p.add_argument("--rate", type=float, default=50.0, help="link rate Mbit/s (0 = unlimited)")
    p.add_argument("-c", "--composition", action="append", help="compositions to show (repeatable)")
    p.add_argument("--no-tcp", action="store_true", help="skip the kernel TCP comparison")
    p.add_argument("--json", action="store_true", help="one JSON record per transfer")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if os.geteuid() != 0:
        return fail("the demo creates network namespaces: run it as root")
    from vtl.testbed.conditions import set_ingress_loss, set_rate
    from vtl.testbed.netns import NetnsPair

    compositions = args.composition or DEFAULT_COMPOSITIONS
    size = int(args.size_mib * 1024 * 1024)
    results = []
    with (
        tempfile.TemporaryDirectory(prefix="vtl-demo-") as tmp,
        NetnsPair(disable_offloads=True) as pair,
    ):
        path = os.path.join(tmp, "payload.bin")
        with open(path, "wb") as f:
            f.write(os.urandom(size))
        for host in (pair.a, pair.b):
            set_rate(host, host.ifname, args.rate)
            set_ingress_loss(host, host.ifname, args.loss)
        _say(
            args,
            f"link {pair.a.ip4} <-> {pair.b.ip4}: {args.rate or 'unlimited'} Mbit/s, "
            f"{args.loss}% random loss each way; file {args.size_mib} MiB",
        )
        py = sys.executable
        for i, comp in enumerate(compositions):
            port = 4433 + i
            recv = pair.b.popen(
                [py, "-m", "vtl", "recv", f"{pair.b.ip4}:{port}", "--json", "-c", comp],
                stdout=-1,
                stderr=-1,
                text=True,
            )
            time.sleep(0.5)
            cp = pair.a.run(
                [py, "-m", "vtl", "send", f"{pair.b.ip4}:{port}", path, "--json", "-c", comp],
                check=False,
                timeout=600,
            )
            results.append(_vtl_result(comp, cp, recv))
            _report(args, results[-1])
        if not args.no_tcp:
            for cc in ("cubic", "bbr"):
                port = 5001
                recv = pair.b.popen(
                    [py, "-m", "vtl.bench.tcp_transfer", "recv", str(port)],
                    stdout=-1,
                    stderr=-1,
                    text=True,
                )
                time.sleep(0.5)
                cp = pair.a.run(
                    [
                        py,
                        "-m",
                        "vtl.bench.tcp_transfer",
                        "send",
                        pair.b.ip4,
                        str(port),
                        path,
                        "--cc",
                        cc,
                    ],
                    check=False,
                    timeout=600,
                )
                recv.wait(timeout=30)
                results.append(_tcp_result(cc, cp))
                _report(args, results[-1])
    ok = all(r.get("verified") for r in results)
    if not args.json:
        print("\nall transfers verified byte-exact" if ok else "\nSOME TRANSFERS FAILED")
    return 0 if ok else 1


def _vtl_result(comp: str, cp, recv) -> dict:
    try:
        rec = json.loads(cp.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        rec = {"verified": False, "error": (cp.stderr or "").strip()[-500:]}
    try:
        recv.wait(timeout=30)
    except Exception:  # the receiver must not outlive its transfer
        recv.kill()
    rec.update(transport="vtl", requested=comp)
    return rec


def _tcp_result(cc: str, cp) -> dict:
    try:
        rec = json.loads(cp.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        rec = {"verified": False, "error": (cp.stderr or "").strip()[-500:]}
    rec.setdefault("transport", f"tcp-{cc}")
    return rec


def _say(args: argparse.Namespace, text: str) -> None:
    if not args.json:
        print(text, flush=True)


def _report(args: argparse.Namespace, r: dict) -> None:
    if "error" in r:
        human = f"{r.get('transport')}: FAILED: {r['error']}"
    elif r.get("transport") == "vtl":
        human = (
            f"VTL  {r['goodput_mbps']:7.2f} Mbit/s  verified={r['verified']}  "
            f"retransmissions={r['retransmissions']}\n"
            f"     negotiated: {r['composition']}"
        )
    else:
        human = (
            f"TCP  {r['goodput_mbps']:7.2f} Mbit/s  verified={r['verified']}  ({r['transport']})"
        )
    emit(r, args.json, human)
