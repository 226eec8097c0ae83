"""Measure what an emulated link really does: RTT, loss, rate, forwarding speed.

Helpers used by the tests (short runs) and by ``vtl testbed validate``
(longer runs, the numbers quoted in docs/testbed.md). Each helper runs
:mod:`vtl.testbed.traffic` or ``ping`` inside the topology's namespaces.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
import tempfile
import time
from typing import Any

from vtl.testbed.netns import TestbedError
from vtl.testbed.topology import RunningTopology, Topology, python_env
from vtl.testbed.traffic import steady_goodput_mbps

__all__ = [
    "measure_forwarding",
    "ping_rtt",
    "run_validation",
    "tcp_goodput",
    "udp_transfer",
]

_TRAFFIC = [sys.executable, "-m", "vtl.testbed.traffic"]


def _addr(net: RunningTopology, host: str, link: str | None, family: int) -> str:
    return net.addr(host, link, family)


def ping_rtt(
    net: RunningTopology,
    src: str,
    dst: str,
    *,
    count: int = 20,
    interval: float = 0.05,
    link: str | None = None,
    family: int = 4,
) -> dict[str, Any]:
    """Ping `dst` from `src`: per-packet RTTs (ms) and their min/avg/max."""
    addr = _addr(net, dst, link, family)
    cp = net.hosts[src].run(
        ["ping", "-n", "-c", str(count), "-i", str(interval), "-W", "2", addr],
        check=False,
        timeout=count * interval + 30,
    )
    rtts = [float(x) for x in re.findall(r"time=([\d.]+) ms", cp.stdout)]
    if not rtts:
        raise TestbedError(f"no ping replies from {addr}:\n{cp.stdout}{cp.stderr}")
    return {
        "rtts": rtts,
        "sent": count,
        "received": len(rtts),
        "min": min(rtts),
        "avg": sum(rtts) / len(rtts),
        "max": max(rtts),
        "median": sorted(rtts)[len(rtts) // 2],
    }


def _start_sink(net: RunningTopology, host: str, argv: list[str]) -> tuple[subprocess.Popen, int]:
    proc = net.hosts[host].popen(
        _TRAFFIC + argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=python_env(),
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith("READY"):
        err = proc.stderr.read() if proc.stderr else ""
        raise TestbedError(f"sink did not start: {line!r} {err}")
    return proc, int(line.split()[1])


def _finish(proc: subprocess.Popen, timeout: float) -> dict[str, Any]:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise TestbedError(f"traffic sink timed out: {err}") from None
    if proc.returncode != 0:
        raise TestbedError(f"traffic sink failed ({proc.returncode}): {err}")
    return json.loads(out.strip().splitlines()[-1])


def udp_transfer(
    net: RunningTopology,
    src: str,
    dst: str,
    *,
    count: int,
    size: int = 1400,
    pps: float = 0.0,
    link: str | None = None,
    family: int = 4,
    idle: float = 1.0,
) -> dict[str, Any]:
    """Send `count` numbered datagrams from `src` to `dst`; the sink's report plus the sender's.

    Keys: received, unique, lost, loss (fraction), mean_burst, duplicates,
    reordered, corrupted, rate_mbps_ip, pps, owd_ms{min,median,mean,p99,max},
    and ``sender`` {sent, errors, pps}.
    """
    daddr = _addr(net, dst, link, family)
    sink, port = _start_sink(
        net, dst, ["udp-sink", "--bind", daddr, "--count", str(count), "--idle", str(idle)]
    )
    cp = net.hosts[src].run(
        _TRAFFIC
        + ["udp-blast", "--to", daddr, "--port", str(port), "--count", str(count),
           "--size", str(size), "--pps", str(pps)],
        env=python_env(),
        timeout=600,
    )  # fmt: skip
    report = _finish(sink, timeout=60 + idle)
    report["sender"] = json.loads(cp.stdout.strip().splitlines()[-1])
    return report


def tcp_goodput(
    net: RunningTopology,
    src: str,
    dst: str,
    *,
    seconds: float = 4.0,
    skip_s: float = 1.0,
    cc: str | None = None,
    link: str | None = None,
    family: int = 4,
) -> dict[str, Any]:
    """Bulk TCP from `src` to `dst` for `seconds`; steady goodput after `skip_s` (Mbit/s)."""
    daddr = _addr(net, dst, link, family)
    sink, port = _start_sink(net, dst, ["tcp-sink", "--bind", daddr])
    argv = ["tcp-send", "--to", daddr, "--port", str(port), "--seconds", str(seconds)]
    if cc:
        argv += ["--cc", cc]
    net.hosts[src].run(_TRAFFIC + argv, env=python_env(), timeout=seconds + 120)
    report = _finish(sink, timeout=60)
    report["goodput_mbps"] = steady_goodput_mbps(report["samples"], skip_s)
    report["mean_mbps"] = report["bytes"] * 8 / report["elapsed_s"] / 1e6
    del report["samples"]
    return report


def measure_forwarding(
    net: RunningTopology, src: str = "a", dst: str = "b", *, count: int = 200_000, size: int = 64
) -> dict[str, Any]:
    """Blast small datagrams flat out: what the emulator forwarded per second."""
    net.reset_stats()
    r = udp_transfer(net, src, dst, count=count, size=size, pps=0)
    link = next(iter(net.links))
    st = net.link_stats(link)
    d = st["a->b"] if net.links[link].a == src else st["b->a"]
    return {
        "sent_pps": r["sender"]["pps"],
        "received_pps": r.get("pps", 0.0),
        "received": r["unique"],
        "sent": count,
        "emulator_rx": d["rx_packets"],
        "emulator_tx": d["tx_packets"],
        "drop_kernel": d["drop_kernel"],
    }


def _within(measured: float, expected: float, rel: float, absolute: float = 0.0) -> bool:
    return abs(measured - expected) <= max(rel * expected, absolute)


def run_validation(quick: bool = True, log=print) -> list[dict[str, Any]]:
    """Run the accuracy suite; return one row per check (name, expected, measured, ok)."""
    rows: list[dict[str, Any]] = []

    def row(name: str, expected: Any, measured: Any, ok: bool, note: str = "") -> None:
        rows.append(
            {"check": name, "expected": expected, "measured": measured, "ok": ok, "note": note}
        )
        log(f"{'ok  ' if ok else 'FAIL'} {name}: expected {expected}, measured {measured} {note}")

    n_loss = 10_000 if quick else 100_000
    with Topology.pair(emulate=True).up() as net:
        n_fw = 100_000 if quick else 400_000
        for label, cond in (("no impairment", {}), ("5 ms delay each way", {"delay_ms": 5})):
            net.set_link("a-b", replace=True, **cond)
            fw = measure_forwarding(net, count=n_fw)
            row(
                f"forwarding flat out, {label} (64 B datagrams)",
                ">= 50000 pkt/s",
                f"{fw['received_pps']:.0f} pkt/s (sender {fw['sent_pps']:.0f} pkt/s)",
                fw["received_pps"] >= 50_000,
            )
            net.reset_stats()
            r = udp_transfer(net, "a", "b", count=n_fw, size=64, pps=50_000)
            owd = r["owd_ms"]["median"]
            row(
                f"forwarding paced at 50000 pkt/s, {label}",
                "no loss" + (", one-way delay 5 ms" if cond else ""),
                f"{r['lost']} lost of {n_fw}, one-way delay median {owd:.2f} ms, "
                f"p99 {r['owd_ms']['p99']:.2f} ms",
                r["lost"] == 0 and (not cond or abs(owd - 5) <= 1.0),
            )
        for rtt in (20, 100):
            net.set_link("a-b", replace=True, delay_ms=rtt / 2)
            p = ping_rtt(net, "a", "b", count=20 if quick else 100, interval=0.05)
            row(
                f"ping RTT {rtt} ms",
                f"{rtt} ms",
                f"avg {p['avg']:.2f} ms (min {p['min']:.2f}, max {p['max']:.2f})",
                _within(p["avg"], rtt, 0.05, 1.0),
            )
        for loss in (2.0, 5.0):
            net.set_link("a-b", replace=True, loss=loss)
            r = udp_transfer(net, "a", "b", count=n_loss, size=200, pps=20_000)
            p = loss / 100
            sigma = math.sqrt(n_loss * p * (1 - p))
            row(
                f"random loss {loss}% over {n_loss} datagrams",
                f"{loss}% (3 sigma = {300 * sigma / n_loss:.2f} pts)",
                f"{100 * r['loss']:.2f}%, mean burst {r['mean_burst']:.2f}",
                abs(r["lost"] - n_loss * p) <= 3 * sigma,
            )
        from vtl.testbed.linkspec import gilbert_elliott_for

        net.set_link("a-b", replace=True, burst=gilbert_elliott_for(5.0, 4.0))
        r = udp_transfer(net, "a", "b", count=n_loss, size=200, pps=20_000)
        row(
            "Gilbert-Elliott 5% mean loss, mean burst 4",
            "5% loss, burst ~4",
            f"{100 * r['loss']:.2f}%, mean burst {r['mean_burst']:.2f}",
            r["mean_burst"] > 1.5 and _within(100 * r["loss"], 5.0, 0.35),
        )
        for rate in (10.0, 50.0):
            net.set_link("a-b", replace=True, rate_mbps=rate)
            pps = rate * 1.3 * 1e6 / 8 / 1428
            cnt = int(pps * (3 if quick else 10))
            r = udp_transfer(net, "a", "b", count=cnt, size=1400, pps=pps)
            row(
                f"UDP rate {rate:g} Mbit/s (sent at 130%)",
                f"{rate:g} Mbit/s",
                f"{r['rate_mbps_ip']:.3f} Mbit/s (IP bytes)",
                _within(r["rate_mbps_ip"], rate, 0.05),
            )
        for rate, delay in ((10.0, 0.0), (10.0, 25.0)):
            net.set_link("a-b", replace=True, rate_mbps=rate, delay_ms=delay)
            for cc in ("cubic", "bbr"):
                t = tcp_goodput(net, "a", "b", seconds=4 if quick else 10, skip_s=1.5, cc=cc)
                expected = rate * 1448 / 1500
                row(
                    f"TCP {cc} at {rate:g} Mbit/s, RTT {2 * delay:g} ms",
                    f"{expected:.2f} Mbit/s goodput (rate x 1448/1500)",
                    f"{t['goodput_mbps']:.3f} Mbit/s",
                    _within(t["goodput_mbps"], expected, 0.05),
                )
        net.set_link("a-b", replace=True, rate_mbps=100.0, delay_ms=5.0)
        for cc in ("cubic", "bbr"):
            t = tcp_goodput(net, "a", "b", seconds=4 if quick else 10, skip_s=1.5, cc=cc)
            expected = 100 * 1448 / 1500
            row(
                f"TCP {cc} on 'fast' (100 Mbit/s, RTT 10 ms)",
                f"{expected:.2f} Mbit/s goodput",
                f"{t['goodput_mbps']:.3f} Mbit/s",
                _within(t["goodput_mbps"], expected, 0.05),
            )
        from vtl.testbed.traces import cellular_trace, trace_mean_mbps, write_trace

        with tempfile.TemporaryDirectory() as tmp:
            stamps = cellular_trace(10.0 if quick else 60.0, seed=1)
            path = write_trace(stamps, f"{tmp}/cell.trace")
            mean = trace_mean_mbps(stamps)
            net.set_link("a-b", replace=True, trace=str(path), queue_bytes=200_000)
            pps = 26e6 / 8 / 1500
            period = stamps[-1] / 1000
            r = udp_transfer(net, "a", "b", count=int(pps * period), size=1472, pps=pps)
            row(
                f"trace-driven rate (cellular, {period:g} s, saturated)",
                f"{mean:.3f} Mbit/s (trace mean)",
                f"{r['rate_mbps_ip']:.3f} Mbit/s",
                _within(r["rate_mbps_ip"], mean, 0.10),
            )
    return rows


if __name__ == "__main__":
    t0 = time.monotonic()
    res = run_validation(quick="--long" not in sys.argv)
    print(f"{sum(r['ok'] for r in res)}/{len(res)} ok in {time.monotonic() - t0:.0f}s")
