"""``vtl demo``: the Hooker carries an unmodified TCP application over VTL.

Two testbed hosts joined by an emulated lossy link (net3, 10 Mbit/s, 20 ms
RTT, 2 % random loss each way, by default).  ``curl`` in host ``a`` fetches a
random file from ``python3 -m http.server`` in host ``b`` -- stock programs,
not a line changed -- first over plain kernel TCP (cubic, the default, and
bbr), then with a Hooker running in each host, which carries the same TCP
connection over VTL (selective repeat + bbr by default).

For every transfer it prints the goodput, whether the file arrived byte-exact
(SHA-256 of what curl wrote = the file served) and, for the Hooker, the
counters that prove the bytes went over VTL: the redirected ``connect()``,
the bytes each Hooker moved between the application and VTL, the VTL
endpoint's UDP bytes, and the bytes that fell back to plain TCP (0).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from vtl.cli.common import emit, fail

DEFAULT_COMPOSITION = "reliability=selective-repeat congestion=bbr"
HTTP_PORT = 8000
LINK = "a-b"  # the link of Topology.pair
CURL_FORMAT = "%{http_code} %{size_download} %{time_connect} %{time_total}\n"


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "demo", help="unmodified curl + http.server over a lossy link: plain TCP vs the Hooker"
    )
    p.add_argument("--size-mib", type=float, default=8.0, help="file size (default 8 MiB)")
    p.add_argument("--profile", default="net3", help="link profile (default net3: 10 Mbit/s 20 ms)")
    p.add_argument("--loss", type=float, default=2.0, help="random loss %% each way (default 2)")
    p.add_argument("--rate", type=float, help="link rate Mbit/s instead of the profile's")
    p.add_argument(
        "-c", "--composition", default=DEFAULT_COMPOSITION, help="what the Hooker carries with"
    )
    p.add_argument("--no-tcp", action="store_true", help="skip the plain TCP transfers")
    p.add_argument("--json", action="store_true", help="one JSON record per transfer")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if os.geteuid() != 0:
        return fail("the demo creates network namespaces and loads eBPF: run it as root")
    if shutil.which("curl") is None:
        return fail("the demo needs curl (scripts/apt-packages.txt)")
    if args.size_mib <= 0 or not 0 <= args.loss < 100 or (args.rate or 1) <= 0:
        return fail("--size-mib and --rate must be > 0 and --loss in [0, 100)")
    from vtl.bench.network import profile_info
    from vtl.testbed.topology import Topology

    try:
        info = profile_info(args.profile)
    except KeyError as exc:
        return fail(str(exc.args[0]))
    size = int(args.size_mib * (1 << 20))
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="vtl-demo-") as tmp:
        www = Path(tmp) / "www"
        www.mkdir()
        data = os.urandom(size)
        (www / "file.bin").write_bytes(data)
        digest = hashlib.sha256(data).hexdigest()
        del data
        overrides = {"rate_mbps": args.rate} if args.rate else {}
        with Topology.pair(profile=args.profile, loss=args.loss, **overrides).up() as net:
            a, b = net.hosts["a"], net.hosts["b"]
            _say(
                args,
                f"host a {a.ip4} <-> host b {b.ip4}: {args.profile} ({info.description})"
                f"{f', rate {args.rate:g} Mbit/s' if args.rate else ''}, "
                f"{args.loss:g} % random loss each way\n"
                f"curl in a fetches a {args.size_mib:g} MiB random file from "
                f"`python3 -m http.server` in b (unmodified programs)\n",
            )
            server = _start_http_server(b, www)
            try:
                url = f"http://{b.ip4}:{HTTP_PORT}/file.bin"
                out = Path(tmp) / "got.bin"
                if not args.no_tcp:
                    for cc in ("cubic", "bbr"):
                        _route_cc(a, b, cc)  # http.server is the sender: b's route counts
                        net.reset_stats(LINK)
                        rec = _fetch(a, url, out, size, digest)
                        rec.update(transport=f"tcp-{cc}", path=f"plain TCP ({cc})")
                        rec["link"] = _link(net)
                        results.append(rec)
                        _report(args, rec)
                    _route_cc(a, b, None)
                net.reset_stats(LINK)
                results.append(_hooked_fetch(args, net, url, out, size, digest))
            finally:
                server.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    server.wait(timeout=5)
    ok = all(r.get("verified") for r in results)
    hooked = results[-1]
    ok = ok and bool(hooked.get("carried_over_vtl"))
    if not args.json:
        print(
            "\nall transfers byte-exact; the Hooker carried the whole file over VTL"
            if ok
            else "\nSOME TRANSFERS FAILED (see above)"
        )
    return 0 if ok else 1


def _start_http_server(host: Any, root: Path) -> subprocess.Popen[str]:
    py = shutil.which("python3") or sys.executable
    proc: subprocess.Popen[str] = host.popen(
        [py, "-m", "http.server", str(HTTP_PORT), "--bind", host.ip4, "--directory", str(root)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        ss = host.run(["ss", "-Hltn", f"sport = :{HTTP_PORT}"], check=False)
        if ss.stdout.strip():
            return proc
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    proc.kill()
    raise SystemExit(fail(f"python3 -m http.server did not start in {host.name}", 1))


def _route_cc(a: Any, b: Any, cc: str | None) -> None:
    """Kernel TCP congestion control between a and b, set on the host routes
    (``ip route ... congctl``): the programs stay unmodified, and in a network
    namespace the default (``net.ipv4.tcp_congestion_control``) can only be
    set to the algorithms the host allows, often just reno and the host's
    default.  ``None`` removes the routes."""
    for host, peer in ((a, b), (b, a)):
        if cc is None:
            host.run(["ip", "route", "del", f"{peer.ip4}/32"], check=False)
        else:
            route = [f"{peer.ip4}/32", "dev", host.ifname, "congctl", cc]
            host.run(["ip", "route", "replace", *route])


def _fetch(a: Any, url: str, out: Path, size: int, digest: str) -> dict[str, Any]:
    """curl ``url`` in host a into ``out``; goodput over curl's total time
    (connect, request and the whole response)."""
    with contextlib.suppress(FileNotFoundError):
        out.unlink()
    cp = a.run(
        ["curl", "-sS", "--max-time", "300", "-o", str(out), "-w", CURL_FORMAT, url],
        check=False,
        timeout=330,
    )
    rec: dict[str, Any] = {"size": size, "verified": False}
    try:
        code, got, _t_connect, t_total = cp.stdout.split()
        rec.update(http_status=int(code), bytes=int(got), seconds=round(float(t_total), 3))
    except ValueError:
        rec["error"] = (cp.stderr or cp.stdout or f"curl exit {cp.returncode}").strip()[-300:]
        return rec
    sha = hashlib.sha256(out.read_bytes()).hexdigest() if out.exists() else None
    rec["verified"] = cp.returncode == 0 and rec["bytes"] == size and sha == digest
    rec["sha256_ok"] = sha == digest
    t = rec["seconds"]
    rec["goodput_mbps"] = round(size * 8 / t / 1e6, 3) if rec["verified"] and t > 0 else 0.0
    if cp.returncode != 0:
        rec["error"] = cp.stderr.strip()[-300:]
    return rec


def _link(net: Any) -> dict[str, Any] | None:
    """The emulator's packets and random-loss drops per direction since the
    last reset: the loss really hit the transfer."""
    try:
        st = net.link_stats(LINK)
    except Exception:  # noqa: BLE001 -- a diagnostic
        return None
    if not st.get("emulated"):
        return None
    return {d: {k: st[d].get(k) for k in ("tx_packets", "drop_loss")} for d in ("a->b", "b->a")}


def _hooked_fetch(
    args: argparse.Namespace, net: Any, url: str, out: Path, size: int, digest: str
) -> dict[str, Any]:
    from vtl.bench.hooker_session import HookerStartError, hooker_daemons

    a, b = net.hosts["a"], net.hosts["b"]
    rec: dict[str, Any]
    try:
        with hooker_daemons(a, b, args.composition) as session:
            _say(args, f"Hookers started in a and b ({session.started_s:.1f} s)")
            net.reset_stats(LINK)
            rec = _fetch(a, url, out, size, digest)
            rec["link"] = _link(net)
    except HookerStartError as exc:
        rec = {"verified": False, "error": str(exc)}
        session = None
    rec.update(transport="hooker", path="Hooker", composition=args.composition)
    if session is not None:
        # the response goes b -> a: at least the file; the request a -> b
        proof = session.proof(payload=1, reverse=size)
        rec["carried_over_vtl"] = proof["carried_over_vtl"]
        rec["proof"] = {
            k: proof[k]
            for k in (
                "connects_redirected",
                "bytes_a_to_vtl",
                "bytes_vtl_to_b",
                "bytes_b_to_vtl",
                "bytes_vtl_to_a",
                "bytes_fallback",
            )
        }
        eb = (proof.get("b") or {}).get("endpoint") or {}
        ea = (proof.get("a") or {}).get("endpoint") or {}
        rec["proof"]["udp_bytes_b_out"] = eb.get("bytes_out")
        rec["proof"]["udp_bytes_a_in"] = ea.get("bytes_in")
        if proof.get("errors"):
            rec.setdefault("error", "; ".join(proof["errors"]))
    _report(args, rec)
    return rec


def _say(args: argparse.Namespace, text: str) -> None:
    if not args.json:
        print(text, flush=True)


def _report(args: argparse.Namespace, r: dict[str, Any]) -> None:
    name = r["path"] if r["transport"] != "hooker" else f"Hooker (VTL {_short(r)})"
    if "goodput_mbps" in r:
        human = (
            f"{name:<34} {r['goodput_mbps']:6.2f} Mbit/s  {r['seconds']:6.2f} s  "
            f"byte-exact={r['verified']}"
        )
    else:
        human = f"{name:<34} FAILED"
    link = r.get("link")
    if link:
        ba = link["b->a"]
        human += f"  (link b->a: {ba['tx_packets']} packets, {ba['drop_loss']} lost)"
    if r.get("error"):
        human += f"\n    error: {r['error']}"
    p = r.get("proof")
    if p:
        human += (
            f"\n    proof: connect() redirected {p['connects_redirected']}x;"
            f" b: server -> VTL {p['bytes_b_to_vtl']} B, a: VTL -> curl {p['bytes_vtl_to_a']} B"
            f" (request a -> b {p['bytes_a_to_vtl']} B);"
            f"\n           VTL UDP payload b -> a {p['udp_bytes_b_out']} B;"
            f" plain-TCP fallback {p['bytes_fallback']} B;"
            f" carried over VTL: {r.get('carried_over_vtl')}"
        )
    emit(r, args.json, human)


def _short(r: dict[str, Any]) -> str:
    comp = str(r.get("composition", ""))
    return "+".join(tok.split("=", 1)[-1] for tok in comp.split())
