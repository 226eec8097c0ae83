"""The link emulator, topologies and profiles: accuracy against what was configured.

Most tests share one emulated pair (module fixture) and reset its conditions;
the lifecycle tests build their own. The first part needs no namespaces.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from vtl.testbed import Conditions, TestbedError, Topology, cleanup_stale, list_netns, profiles
from vtl.testbed.emulator import Direction
from vtl.testbed.linkspec import MIN_QUEUE_BYTES, gilbert_elliott_for
from vtl.testbed.netns import STATE_DIR
from vtl.testbed.topology import python_env
from vtl.testbed.traces import cellular_trace, load_trace, trace_mean_mbps, write_trace
from vtl.testbed.validate import ping_rtt, tcp_goodput, udp_transfer

# --------------------------------------------------------------------------- no namespaces


class _FakeSocket:
    def __init__(self) -> None:
        self.sent: list[bytes] = []

    def send(self, frame: bytes) -> int:
        self.sent.append(frame)
        return len(frame)


def _ipv4_frame(size_ip: int) -> bytes:
    """An Ethernet frame holding an IPv4 packet of `size_ip` bytes (header + zeros)."""
    ip = bytearray(size_ip)
    ip[0] = 0x45
    ip[9] = 17
    return b"\x02" * 12 + b"\x08\x00" + bytes(ip)


def _direction(**cond) -> tuple[Direction, _FakeSocket]:
    import random

    out = _FakeSocket()
    d = Direction("a->b", out, random.Random(1))  # type: ignore[arg-type]
    d.configure(Conditions(**cond), 100.0)
    return d, out


def test_conditions_roundtrip_and_validation() -> None:
    c = Conditions(delay_ms=25, loss=2, burst=(0.01, 0.25, 1.0), rate_mbps=10)
    assert Conditions.from_dict(json.loads(json.dumps(c.to_dict()))) == c
    assert Conditions().is_null() and not c.is_null()
    with pytest.raises(ValueError, match="loss"):
        Conditions(loss=150).validate()
    with pytest.raises(ValueError, match="unknown condition field"):
        Conditions.from_dict({"delay": 5})
    with pytest.raises(ValueError, match="burst"):
        Conditions(burst=(0.1, 0.0, 1.0)).validate()
    # default queue: max(64 KiB, 1.5 x rate x 2 x delay)
    assert Conditions(rate_mbps=10).effective_queue_bytes() == MIN_QUEUE_BYTES
    assert Conditions(rate_mbps=10, delay_ms=50).effective_queue_bytes() == int(1.5 * 1.25e6 * 0.1)
    assert Conditions(rate_mbps=10, queue_bytes=5000).effective_queue_bytes() == 5000
    assert Conditions(delay_ms=5).effective_queue_bytes() is None


def test_gilbert_elliott_parameters() -> None:
    p, r, h = gilbert_elliott_for(5.0, 4.0)  # type: ignore[misc]
    assert r == 0.25 and h == 1.0
    assert Conditions(burst=(p, r, h)).mean_loss() == pytest.approx(0.05)


def test_profiles() -> None:
    assert {"clean", "net1", "net2", "net3", "fast", "cellular"} <= set(profiles.PROFILES)
    for name, rate, rtt in (
        ("net1", 4, 100),
        ("net2", 10, 50),
        ("net3", 10, 20),
        ("fast", 100, 10),
    ):
        fwd, bwd = profiles.get(name)
        assert fwd == bwd
        assert fwd.rate_mbps == rate and fwd.delay_ms + bwd.delay_ms == rtt
        assert profiles.physical_limit_mbps(name, 2) == pytest.approx(rate * 0.98)
    assert profiles.physical_limit_mbps("clean", 5) is None
    assert profiles.get("clean") == (Conditions(), Conditions())
    fwd, _ = profiles.get("net2", loss=5, bursty=True)
    assert fwd.loss == 0 and fwd.mean_loss() == pytest.approx(0.05)
    fwd, _ = profiles.get("net2", loss=5)
    assert fwd.loss == 5 and fwd.burst is None
    cell, _ = profiles.get("cellular")
    assert cell.trace and 1 < (profiles.physical_limit_mbps("cellular") or 0) < 20
    with pytest.raises(ValueError, match="unknown profile"):
        profiles.get("net9")


def test_cellular_trace_generator(tmp_path: Path) -> None:
    a, b = cellular_trace(20, seed=3), cellular_trace(20, seed=3)
    assert a == b and a != cellular_trace(20, seed=4)
    assert a[-1] == 20_000 and a == sorted(a)
    assert 2 < trace_mean_mbps(a) < 20
    path = write_trace(a, tmp_path / "t.trace")
    assert load_trace(path) == a
    (tmp_path / "bad.trace").write_text("5\n3\n")
    with pytest.raises(ValueError, match="non-decreasing"):
        load_trace(tmp_path / "bad.trace")


def test_topology_from_toml() -> None:
    topo = Topology.from_toml(
        """
        hosts = ["h1", "h2", "h3"]
        [[link]]
        a = "h1"
        b = "h2"
        profile = "net2"
        loss = 2
        [link.forward]
        delay_ms = 40
        [[link]]
        a = "h2"
        b = "h3"
        name = "x"
        delay_ms = 5
        [link.backward]
        rate_mbps = 3
        [[link]]
        a = "h1"
        b = "h3"
        """
    )
    assert topo.hosts == ["h1", "h2", "h3"]
    l1, l2, l3 = topo.links
    assert l1.name == "h1-h2" and l1.emulated
    assert (l1.forward.delay_ms, l1.backward.delay_ms) == (40, 25)
    assert l1.forward.loss == 2 and l1.forward.rate_mbps == 10
    assert l2.name == "x" and l2.forward == Conditions(delay_ms=5)
    assert l2.backward == Conditions(delay_ms=5, rate_mbps=3)
    assert not l3.emulated
    again = Topology.from_dict(topo.to_dict())
    assert [x.forward for x in again.links] == [x.forward for x in topo.links]
    with pytest.raises(ValueError, match="unknown condition field"):
        Topology.from_toml('[[link]]\na = "a"\nb = "b"\ndelay = 3\n')
    with pytest.raises(ValueError, match="host name"):
        Topology.from_toml('[[link]]\na = "Bad-Name"\nb = "b"\n')
    assert Topology.pair("net1", loss=5).links[0].forward.loss == 5
    assert Topology.pair(emulate=True).links[0].emulated
    assert not Topology.pair().links[0].emulated


def test_direction_rate_serialisation() -> None:
    d, out = _direction(rate_mbps=12.0, queue_bytes=10 * 1500)
    # 12 Mbit/s: one 1500-byte IP packet per millisecond.
    for _ in range(12):
        d.receive(_ipv4_frame(1500), 100.0)
    assert d.drop_queue == 2 and d.queue_hwm_bytes == 15000
    dues = [due for due, _ in d.fifo]
    assert dues == pytest.approx([100.0 + 0.001 * (i + 1) for i in range(10)])
    d.flush(100.0105)
    assert len(out.sent) == 10 and d.tx_bytes == 15000


def test_direction_trace_semantics(tmp_path: Path) -> None:
    trace = write_trace([1, 1, 3, 4], tmp_path / "t.trace")  # period 4 ms
    d, _ = _direction(trace=str(trace), queue_bytes=10**6)
    t0 = 100.0
    for _ in range(6):
        d.receive(_ipv4_frame(1500), t0)
    dues = [round((due - t0) * 1000, 6) for due, _ in d.fifo]
    assert dues == [1, 1, 3, 4, 5, 5]  # the trace loops
    # small packets share an opportunity; unused opportunities are lost
    d, _ = _direction(trace=str(trace), queue_bytes=10**6)
    for _ in range(3):
        d.receive(_ipv4_frame(500), t0)
    d.receive(_ipv4_frame(1000), t0 + 0.0015)  # after the two 1 ms opportunities
    dues = [round((due - t0) * 1000, 6) for due, _ in d.fifo]
    assert dues == [1, 1, 1, 3]


def test_direction_delay_keeps_order_and_exempts_arp() -> None:
    d, out = _direction(delay_ms=10, jitter_ms=5, loss=100)
    arp = b"\xff" * 6 + b"\x02" * 6 + b"\x08\x06" + bytes(28)
    for i in range(50):
        d.receive(arp, 100.0 + i * 1e-4)
    assert d.drop_loss == 0 and d.non_ip == 50
    dues = [due for due, _ in d.fifo]
    assert dues == sorted(dues) and all(100.005 <= x <= 100.02 for x in dues)
    d.receive(_ipv4_frame(100), 100.01)
    assert d.drop_loss == 1


# --------------------------------------------------------------------------- emulated pair

netns = pytest.mark.netns


@pytest.fixture(scope="module")
def pair(requires_root_netns: None):
    with Topology.pair(emulate=True).up(seed=7) as net:
        yield net


@pytest.fixture
def net(pair):
    pair.set_link("a-b", replace=True)
    pair.reset_stats()
    return pair


def _three_sigma(n: int, p: float) -> float:
    return 3 * math.sqrt(n * p * (1 - p))


def _counts_match(emulator_count: int, seen_by_sink: int) -> bool:
    """The emulator's counter also covers the hosts' own few background IP packets
    (IPv6 MLD reports and the like), so it may exceed what the sink saw by a little."""
    return 0 <= emulator_count - seen_by_sink <= 3


@netns
@pytest.mark.parametrize("rtt", [20.0, 100.0])
def test_rtt_by_ping(net, rtt: float) -> None:
    net.set_link("a-b", delay_ms=rtt / 2)
    for family in (4, 6):
        p = ping_rtt(net, "a", "b", count=15, interval=0.05, family=family)
        assert p["received"] == 15
        assert abs(p["avg"] - rtt) <= max(0.05 * rtt, 1.0), p


@netns
def test_asymmetric_delay_one_way(net) -> None:
    net.set_link("a-b", "a->b", delay_ms=30)
    net.set_link("a-b", "b->a", delay_ms=5)
    r = udp_transfer(net, "a", "b", count=200, size=100, pps=1000, idle=0.5)
    assert abs(r["owd_ms"]["median"] - 30) <= 1.0, r["owd_ms"]
    r = udp_transfer(net, "b", "a", count=200, size=100, pps=1000, idle=0.5)
    assert abs(r["owd_ms"]["median"] - 5) <= 1.0, r["owd_ms"]


@netns
def test_random_loss_rate(net) -> None:
    n, p = 12_000, 0.05
    net.set_link("a-b", "a->b", loss=100 * p)
    r = udp_transfer(net, "a", "b", count=n, size=200, pps=20_000, idle=0.5)
    assert r["duplicates"] == 0 and r["corrupted"] == 0
    assert abs(r["lost"] - n * p) <= _three_sigma(n, p), r
    st = net.link_stats("a-b")["a->b"]
    assert _counts_match(st["drop_loss"], r["lost"]) and st["drop_kernel"] == 0
    assert r["mean_burst"] < 1.2  # independent losses: bursts of ~1/(1-p)


@netns
def test_gilbert_elliott_bursts(net) -> None:
    n = 20_000
    net.set_link("a-b", "a->b", burst=gilbert_elliott_for(5.0, 4.0))
    r = udp_transfer(net, "a", "b", count=n, size=200, pps=30_000, idle=0.5)
    assert r["mean_burst"] > 1.5, r
    assert abs(r["loss"] - 0.05) <= 0.35 * 0.05, r  # bursts make the count noisier
    assert _counts_match(net.link_stats("a-b")["a->b"]["drop_burst"], r["lost"])


@netns
def test_udp_rate_and_bounded_queue(net) -> None:
    rate = 10.0
    net.set_link("a-b", "a->b", rate_mbps=rate, queue_bytes=30_000)
    pps = 1.3 * rate * 1e6 / 8 / 1428  # 130 % of the link
    r = udp_transfer(net, "a", "b", count=int(pps * 2.5), size=1400, pps=pps, idle=0.5)
    assert abs(r["rate_mbps_ip"] - rate) <= 0.05 * rate, r
    st = net.link_stats("a-b")["a->b"]
    assert r["lost"] > 0 and _counts_match(st["drop_queue"], r["lost"])
    assert 28_000 <= st["queue_hwm_bytes"] <= 30_000 + 300  # (+ ARP/NDP, never dropped)
    # queueing delay is bounded by the queue: 30 kB at 10 Mbit/s = 24 ms
    assert r["owd_ms"]["p99"] <= 24 + 2, r["owd_ms"]


@netns
@pytest.mark.parametrize("cc", ["cubic", "bbr"])
def test_tcp_rate(net, cc: str) -> None:
    rate = 10.0
    net.set_link("a-b", rate_mbps=rate, delay_ms=10)
    t = tcp_goodput(net, "a", "b", seconds=3.5, skip_s=1.0, cc=cc)
    expected = rate * 1448 / 1500  # TCP payload per 1500-byte IP packet (timestamps on)
    assert abs(t["goodput_mbps"] - expected) <= 0.05 * expected, t


@netns
def test_duplication(net) -> None:
    n, p = 5000, 0.1
    net.set_link("a-b", "a->b", duplicate=100 * p)
    r = udp_transfer(net, "a", "b", count=n, size=200, pps=10_000, idle=0.5)
    st = net.link_stats("a-b")["a->b"]
    assert r["lost"] == 0 and _counts_match(st["duplicated"], r["duplicates"])
    assert abs(st["duplicated"] - n * p) <= _three_sigma(n, p)
    assert st["tx_packets"] == st["rx_packets"] + st["duplicated"]  # nothing else dropped


@netns
def test_corruption_is_caught_by_checksums(net) -> None:
    n, p = 5000, 0.1
    net.set_link("a-b", "a->b", corrupt=100 * p)
    r = udp_transfer(net, "a", "b", count=n, size=200, pps=10_000, idle=0.5)
    st = net.link_stats("a-b")["a->b"]
    assert abs(st["corrupted"] - n * p) <= _three_sigma(n, p)
    assert r["corrupted"] == 0  # no damaged payload reached the application...
    assert _counts_match(st["corrupted"], r["lost"])  # ...UDP checksums dropped them all


@netns
def test_reordering(net) -> None:
    n, p = 2000, 0.1
    net.set_link("a-b", "a->b", reorder=100 * p, reorder_delay_ms=10)
    r = udp_transfer(net, "a", "b", count=n, size=200, pps=2000, idle=0.5)
    st = net.link_stats("a-b")["a->b"]
    assert r["lost"] == 0
    assert abs(st["reordered"] - n * p) <= _three_sigma(n, p)
    assert abs(r["reordered"] - st["reordered"]) <= 3  # the last packets cannot be overtaken


@netns
def test_trace_driven_rate(net, tmp_path: Path) -> None:
    stamps = cellular_trace(3.0, seed=11)
    path = write_trace(stamps, tmp_path / "cell.trace")
    mean = trace_mean_mbps(stamps)
    net.set_link("a-b", "a->b", trace=str(path), queue_bytes=200_000)
    pps = 26e6 / 8 / 1500  # above the trace's highest rate (20 Mbit/s)
    r = udp_transfer(net, "a", "b", count=int(pps * 3.0), size=1472, pps=pps, idle=1.0)
    assert abs(r["rate_mbps_ip"] - mean) <= 0.10 * mean, (r, mean)


@netns
def test_live_change_while_pinging(net) -> None:
    net.set_link("a-b", delay_ms=10)
    a, b = net.hosts["a"], net.hosts["b"]
    proc = a.popen(
        ["ping", "-n", "-c", "60", "-i", "0.03", b.ip4], stdout=subprocess.PIPE, text=True
    )
    timer = threading.Timer(0.9, lambda: net.set_link("a-b", delay_ms=30))
    timer.start()
    out, _ = proc.communicate(timeout=30)
    timer.join()
    rtts = [float(x.split("time=")[1].split()[0]) for x in out.splitlines() if "time=" in x]
    assert len(rtts) >= 55
    before, after = sorted(rtts[:15]), sorted(rtts[-15:])
    assert abs(before[7] - 20) <= 1.0, rtts  # medians: a VM hiccup may delay one ping
    assert abs(after[7] - 60) <= 1.0, rtts


@netns
def test_set_link_errors(net) -> None:
    with pytest.raises(ValueError, match="loss"):
        net.set_link("a-b", loss=200)
    with pytest.raises(ValueError, match="direction"):
        net.set_link("a-b", "x->y", loss=1)
    with pytest.raises(KeyError):
        net.set_link("nope", loss=1)
    c = net.set_link("a-b", "a->b", conditions=Conditions(delay_ms=3, loss=1))
    assert c["a->b"] == Conditions(delay_ms=3, loss=1) and c["b->a"] == Conditions()
    assert net.conditions("a-b") == c


# --------------------------------------------------------------------------- lifecycle


def _leftovers(base: str, pids: list[int]) -> list[str]:
    found = [ns for ns in list_netns() if ns.startswith(base + "-")]
    found += [f"pid {p}" for p in pids if Path(f"/proc/{p}").exists() and _alive(p)]
    found += [str(p) for p in (STATE_DIR / f"{base}.d", STATE_DIR / f"{base}.owner") if p.exists()]
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


THREE = """
[[link]]
a = "h1"
b = "h2"
profile = "net3"
[[link]]
a = "h2"
b = "h3"
loss = 1
[[link]]
a = "h1"
b = "h3"
"""


@netns
def test_clean_link_is_plain_veth(requires_root_netns: None) -> None:
    with Topology.pair().up() as net:
        assert not net.links["a-b"].emulated and net.links["a-b"].relay is None
        p = ping_rtt(net, "a", "b", count=3, interval=0.05)
        assert p["avg"] < 1.0
        with pytest.raises(TestbedError, match="not emulated"):
            net.set_link("a-b", delay_ms=5)
        st = net.link_stats("a-b")
        assert st["emulated"] is False and st["a->b"]["tx_packets"] >= 3


@netns
def test_three_hosts_and_teardown(requires_root_netns: None) -> None:
    net = Topology.from_toml(THREE).up()
    try:
        base = net.base
        pids = [p.pid for p in net._emulators.values()]
        assert len(pids) == 2  # h1-h3 is a plain veth
        h2 = net.hosts["h2"]
        assert h2.ip4 == net.addr("h2", "h1-h2") and net.addr("h2", "h2-h3") != h2.ip4
        p = ping_rtt(net, "h2", "h3", count=3, interval=0.05, link="h2-h3")
        assert p["received"] >= 1
        desc = net.describe()
        assert set(desc["hosts"]) == {"h1", "h2", "h3"}
        assert desc["links"]["h1-h2"]["conditions"]["a->b"]["rate_mbps"] == 10
        assert [i["ifname"] for i in desc["hosts"]["h1"]["interfaces"]] == ["eth0", "eth1"]
    finally:
        net.down()
    assert _leftovers(base, pids) == []


@netns
def test_teardown_after_exception(requires_root_netns: None) -> None:
    with pytest.raises(RuntimeError, match="boom"), Topology.pair("net3").up() as net:
        base, pids = net.base, [p.pid for p in net._emulators.values()]
        raise RuntimeError("boom")
    assert _leftovers(base, pids) == []


CHILD = r"""
import json, sys, time
from vtl.testbed import Topology
net = Topology.pair("net3", loss=1).up()
print(json.dumps({"base": net.base, "pids": [p.pid for p in net._emulators.values()]}), flush=True)
time.sleep(120)
"""


@netns
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_controller_killed(requires_root_netns: None, sig: int) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD], stdout=subprocess.PIPE, text=True, env=python_env()
    )
    try:
        assert proc.stdout is not None
        info = json.loads(proc.stdout.readline())
        assert any(ns.startswith(info["base"]) for ns in list_netns())
        os.kill(proc.pid, sig)
        proc.wait(timeout=20)
        if sig == signal.SIGKILL:
            deadline = time.monotonic() + 5  # emulators notice their owner is gone
            while any(_alive(p) for p in info["pids"]) and time.monotonic() < deadline:
                time.sleep(0.05)
            cleanup_stale()
        assert _leftovers(info["base"], info["pids"]) == []
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        cleanup_stale()
