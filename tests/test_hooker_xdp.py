"""The Hooker's XDP ingress filter (src/vtl/hooker/xdp.py, bpf/vtl_xdp.bpf.c).

Real programs in this kernel, on the veth of testbed host ``b``: a server
process there (tests/xdp_netns_peer.py) owns the filter and a VTL endpoint;
datagrams come from host ``a``.  Every process is stopped and every namespace
deleted by the test bed, even on failure, and the tests check that no XDP
program stays behind.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from vtl.core import wire
from vtl.core.endpoint import EndpointCore
from vtl.core.wire import PacketType
from vtl.testbed import NetnsPair

PEER = str(Path(__file__).with_name("xdp_netns_peer.py"))
OTHER_BPF = r"""
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
SEC("xdp") int other_xdp(struct xdp_md *ctx) { return XDP_PASS; }
SEC("tc") int other_tc(struct __sk_buff *skb) { return 0; }
char _license[] SEC("license") = "GPL";
"""


# ------------------------------------------------------------------ helpers


class Server:
    """tests/xdp_netns_peer.py serve, in host b."""

    def __init__(self, pair: NetnsPair, *args: str, family: str = "ip4"):
        self.pair = pair
        self.addr = getattr(pair.b, family)
        self.proc = pair.b.popen(
            [sys.executable, PEER, "serve", "--ifname", pair.b.ifname, "--bind", self.addr, *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line.startswith("READY "):
            self.proc.kill()
            _, err = self.proc.communicate(timeout=10)
            raise RuntimeError(f"server did not start: {line}{err[-3000:]}")
        self.ready: dict[str, Any] = json.loads(line.split(" ", 1)[1])

    def command(self, cmd: str) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line.startswith("{"), line + (self.proc.stderr.read() if self.proc.stderr else "")
        return json.loads(line)

    def report(self) -> dict[str, Any]:
        return self.command("report")

    def quit(self) -> dict[str, Any]:
        final = self.command("quit")
        assert self.proc.wait(timeout=20) == 0
        return final


def _send_udp(pair: NetnsPair, addr: str, port: int, datagrams: list[bytes]) -> None:
    payload = json.dumps([d.hex() for d in datagrams])
    pair.a.run([sys.executable, PEER, "udp", "--to", addr, str(port)], input=payload, timeout=60)


def _client(pair: NetnsPair, addr: str, port: int, nbytes: int) -> dict[str, Any]:
    cp = pair.a.run(
        [sys.executable, PEER, "client", "--to", addr, str(port), "--bytes", str(nbytes)],
        timeout=180,
        check=False,
    )
    assert cp.returncode == 0, cp.stderr[-3000:]
    return json.loads(cp.stdout.strip().splitlines()[-1])


def _raw(ptype: int, dcid: int, *, version: int = 1, body: bytes = b"", optlen: int = 0,
         bodylen: int | None = None, extra: bytes = b"") -> bytes:  # fmt: skip
    """A VTL datagram with chosen header fields (the CRC is not checked in XDP)."""
    blen = len(body) if bodylen is None else bodylen
    hdr = wire.HEADER.pack(version, ptype, 0, 0, dcid, 0x1234, 7, optlen, blen)
    return hdr + b"\0" * optlen + body + b"\xde\xad\xbe\xef" + extra


def _xdp_state(pair: NetnsPair) -> str:
    """`ip -d link show` and `bpftool net show` of host b (no vtl_ program may appear)."""
    link = pair.b.run(["ip", "-d", "link", "show", pair.b.ifname]).stdout
    net = pair.b.run(["bpftool", "net", "show"]).stdout
    return link + net


def _prog_exists(prog_id: int) -> bool:
    cp = subprocess.run(["bpftool", "prog", "show", "id", str(prog_id)], capture_output=True)
    return cp.returncode == 0


def _wait_gone(pair: NetnsPair, prog_id: int, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _prog_exists(prog_id) and "vtl_" not in _xdp_state(pair):
            return
        time.sleep(0.05)
    pytest.fail(f"XDP program {prog_id} still present:\n{_xdp_state(pair)}")


@pytest.fixture
def pair(requires_root_netns: None) -> Iterator[NetnsPair]:
    with NetnsPair() as p:
        yield p


# ------------------------------------------------------- drops and passes


def _crafted() -> list[tuple[str, bytes]]:
    """(expected XDP counter, datagram) for every drop reason."""
    rnd = random.Random(5)
    unknown = rnd.getrandbits(64) | 1
    valid_unknown = wire.encode(PacketType.DATA, unknown, 99, 3, b"\0" * 8 + b"x" * 100)
    return [
        ("short", b""),
        ("short", _raw(PacketType.DATA, unknown)[:31]),
        ("version", _raw(PacketType.DATA, unknown, version=2, body=b"abc")),
        ("version", _raw(PacketType.DATA, unknown, version=0)),
        ("length", _raw(PacketType.DATA, unknown, body=b"abcd", bodylen=5)),  # claims more
        ("length", _raw(PacketType.ACK, unknown, optlen=4, bodylen=200)),
        ("length", _raw(PacketType.DATA, unknown, body=b"abcd", extra=b"tail")),  # claims less
        ("type", _raw(0, unknown, body=b"abc")),
        ("type", _raw(12, unknown)),
        ("type", _raw(255, unknown)),
        ("zero_dcid", _raw(PacketType.DATA, 0, body=b"12345678")),
        ("zero_dcid", _raw(PacketType.ACK, 0)),
        ("zero_dcid", _raw(PacketType.OFFER, unknown)),  # an OFFER names no connection
        ("unknown_conn", valid_unknown),
        ("unknown_conn", wire.encode(PacketType.RESET, unknown, 5, 0, wire.encode_error(1, "x"))),
        ("unknown_conn", wire.encode(PacketType.PROBE, rnd.getrandbits(64) | 1, 5, 9)),
    ]


@pytest.mark.netns
@pytest.mark.parametrize(
    ("mode", "family"), [("native", "ip4"), ("generic", "ip4"), ("native", "ip6")]
)
def test_malformed_and_unknown_dropped_in_xdp(pair: NetnsPair, mode: str, family: str) -> None:
    srv = Server(pair, "--mode", mode, family=family)
    assert srv.ready["mode"] == mode
    crafted = _crafted()
    if mode == "generic":
        # generic XDP runs after GRO, so a payload longer than its first VTL
        # datagram may be a GSO batch: judged by that first datagram, here by
        # its unknown connection ID
        crafted = [("unknown_conn" if d.endswith(b"tail") else r, d) for r, d in crafted]
    repeat = 3
    _send_udp(pair, srv.addr, srv.ready["vtl_port"], [d for _, d in crafted] * repeat)
    # traffic the filter must leave alone: UDP to another port, TCP
    _send_udp(pair, srv.addr, srv.ready["udp_port"], [b"not vtl", b"\x01" * 40] * 5)
    tcp = pair.a.run(
        [sys.executable, "-c", (
            "import socket,sys\n"
            f"s=socket.create_connection(({srv.addr!r},{srv.ready['tcp_port']}),timeout=10)\n"
            "data=bytes(range(256))*400\ns.sendall(data);s.shutdown(socket.SHUT_WR)\n"
            "got=b''\nwhile (c:=s.recv(65536)): got+=c\nsys.exit(0 if got==data else 1)\n"
        )],
        timeout=30,
        check=False,
    )  # fmt: skip
    assert tcp.returncode == 0, tcp.stderr
    deadline = time.monotonic() + 5
    while (rep := srv.report())["udp_datagrams"] < 10 and time.monotonic() < deadline:
        time.sleep(0.05)
    counters = rep["xdp"]["counters"]
    expected: dict[str, int] = {}
    for reason, _ in crafted:
        expected[reason] = expected.get(reason, 0) + repeat
    for reason in ("short", "version", "length", "type", "zero_dcid", "unknown_conn"):
        assert counters[reason] == expected.get(reason, 0), (reason, counters)
        assert counters[f"{reason}_bytes"] >= counters[reason] * 42  # whole frames
    assert counters["dropped"] == len(crafted) * repeat
    assert counters["passed"] == 0
    assert counters["non_vtl"] >= 10 + 1  # the plain UDP datagrams and the TCP segments
    # the VTL socket never saw one of them; the others arrived
    assert rep["endpoint"]["datagrams_received"] == 0
    assert rep["endpoint"]["drops"] == {}
    assert rep["udp_datagrams"] == 10
    assert rep["tcp_bytes"] == 256 * 400
    srv.quit()
    _wait_gone(pair, srv.ready["prog_id"])


@pytest.mark.netns
def test_generic_mode_passes_longer_payloads_to_user_space(pair: NetnsPair) -> None:
    """What generic mode lets through (a possible GSO batch) user space still drops."""
    srv = Server(pair, "--mode", "generic")
    tail = [_raw(PacketType.OFFER, 0, body=b"abcd", extra=b"tail")] * 3
    _send_udp(pair, srv.addr, srv.ready["vtl_port"], tail)
    deadline = time.monotonic() + 5
    while not (rep := srv.report())["endpoint"]["drops"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert rep["xdp"]["counters"]["aggregates"] == len(tail)
    assert rep["endpoint"]["drops"] == {"malformed": len(tail)}
    srv.quit()


# ------------------------------------------------------------ real traffic


@pytest.mark.netns
@pytest.mark.parametrize(
    ("mode", "family"), [("native", "ip4"), ("native", "ip6"), ("generic", "ip4")]
)
def test_vtl_transfer_passes_and_map_follows_the_endpoint(
    pair: NetnsPair, mode: str, family: str
) -> None:
    srv = Server(pair, "--mode", mode, "--grace", "3", family=family)
    size = 4 << 20
    got = _client(pair, srv.addr, srv.ready["vtl_port"], size)
    assert got["exact"] and got["received"] == got["sent"] == size, got
    assert got["error_code"] == 0
    rep = srv.report()
    assert rep["echoed"] == [size] and rep["errors"] == []
    counters = rep["xdp"]["counters"]
    assert counters["dropped"] == 0, counters
    assert counters["unknown_conn"] == 0
    assert rep["observer_errors"] == 0 and rep["endpoint"]["drops"] == {}
    if mode == "native":  # one frame per datagram
        assert counters["passed"] == rep["endpoint"]["datagrams_received"]
    else:  # GSO batches arrive whole: fewer frames than datagrams
        assert 0 < counters["passed"] <= rep["endpoint"]["datagrams_received"]
    # the connection ID the endpoint serves is (or was, until it lingered out) in the map
    deadline = time.monotonic() + 20
    while (rep := srv.report())["core_connections"] and time.monotonic() < deadline:
        assert {str(c) for c in rep["core_connections"]} <= set(rep["xdp_conns"])
        time.sleep(0.2)
    t_seen = time.monotonic()
    assert rep["core_connections"] == [], "the endpoint never forgot the connection"
    assert rep["xdp"]["connections"] == 0  # no live ID left
    graced = {int(c): g for c, g in rep["xdp_conns"].items()}
    assert graced and all(g is not None and 0 < g <= 3 for g in graced.values()), graced
    # still in its grace period: a late packet reaches the endpoint (which can
    # answer with a stateless RESET) ...
    cid = next(iter(graced))
    before = rep
    _send_udp(pair, srv.addr, srv.ready["vtl_port"], [wire.encode(PacketType.PROBE, cid, 77, 5)])
    time.sleep(0.2)
    rep = srv.report()
    assert rep["xdp"]["counters"]["passed"] == before["xdp"]["counters"]["passed"] + 1
    unknown = rep["endpoint"]["drops"]["unknown_connection"]
    assert unknown == before["endpoint"]["drops"].get("unknown_connection", 0) + 1
    # ... and once it is over, XDP drops them
    time.sleep(max(0.0, graced[cid] - (time.monotonic() - t_seen)) + 0.3)
    _send_udp(pair, srv.addr, srv.ready["vtl_port"], [wire.encode(PacketType.PROBE, cid, 77, 6)])
    time.sleep(0.2)
    rep = srv.report()
    assert rep["xdp"]["counters"]["unknown_conn"] == 1
    assert rep["endpoint"]["drops"]["unknown_connection"] == unknown
    assert str(cid) not in rep["xdp_conns"]  # deleted by the program that met it
    final = srv.quit()
    assert final["closed"]
    _wait_gone(pair, srv.ready["prog_id"])


@pytest.mark.netns
def test_program_verdicts_in_a_kernel_test_run(pair: NetnsPair) -> None:
    """XdpFilter.test_run (BPF_PROG_TEST_RUN), which the cost measurement uses."""
    out = pair.b.run(
        [sys.executable, PEER, "cost", "--ifname", str(pair.b.ifname), "--repeat", "1000"],
        timeout=120,
    ).stdout
    res = json.loads(out.strip().splitlines()[-1])
    assert {name: r["verdict"] for name, r in res.items()} == {
        "valid DATA (1452 B), known connection": "pass",
        "DATA for an unknown connection": "drop",
        "malformed (bad version)": "drop",
        "UDP to another port": "pass",
        "TCP": "pass",
    }
    assert all(0 <= r["ns"] < 100_000 for r in res.values()), res


# --------------------------------------------------------------- lifetime


@pytest.mark.netns
def test_no_program_left_after_close_or_sigkill(pair: NetnsPair) -> None:
    srv = Server(pair)
    prog = srv.ready["prog_id"]
    state = _xdp_state(pair)
    assert f"prog/xdp id {prog} name vtl_xdp_filter" in state and "vtl_xdp_filter" in state
    srv.quit()
    _wait_gone(pair, prog)

    srv = Server(pair)
    prog = srv.ready["prog_id"]
    assert _prog_exists(prog)
    os.kill(srv.ready["pid"], signal.SIGKILL)
    srv.proc.wait(timeout=10)
    _wait_gone(pair, prog)
    # and the interface is free again
    srv = Server(pair)
    assert srv.ready["prog_id"] != prog
    srv.quit()
    _wait_gone(pair, srv.ready["prog_id"])


@pytest.mark.netns
def test_auto_mode_falls_back_to_generic(requires_root_netns: None) -> None:
    """veth refuses native XDP when the MTU exceeds a page; auto mode goes generic."""
    with NetnsPair(mtu=9000) as big:
        srv = Server(big)
        assert srv.ready["mode"] == "generic"
        got = _client(big, srv.addr, srv.ready["vtl_port"], 1 << 20)
        assert got["exact"]
        rep = srv.report()
        assert "MTU" in rep["xdp"]["native_error"]
        assert rep["xdp"]["counters"]["dropped"] == 0 and rep["xdp"]["counters"]["passed"] > 0
        srv.quit()
        code = f"from vtl.hooker.xdp import XdpFilter\nXdpFilter({big.b.ifname!r}, mode='native')"
        cp = big.b.run([sys.executable, "-c", code], check=False)
        assert cp.returncode != 0 and "cannot attach XDP" in cp.stderr, cp.stderr[-2000:]
        assert "vtl_" not in _xdp_state(big)


# ----------------------------------------------------------- coexistence


@pytest.fixture
def other_obj(tmp_path: Path) -> Path:
    src = tmp_path / "other.bpf.c"
    src.write_text(OTHER_BPF)
    obj = tmp_path / "other.bpf.o"
    subprocess.run(
        ["clang", "-O2", "-g", "-target", "bpf", "-I/usr/include/x86_64-linux-gnu",
         "-c", str(src), "-o", str(obj)],
        check=True,
    )  # fmt: skip
    return obj


@pytest.mark.netns
def test_coexists_with_a_tc_clsact_program(pair: NetnsPair, other_obj: Path) -> None:
    ifname = pair.b.ifname
    assert ifname is not None
    pair.b.run(["tc", "qdisc", "add", "dev", ifname, "clsact"])
    pair.b.run(["tc", "filter", "add", "dev", ifname, "ingress", "bpf", "da",
                "obj", str(other_obj), "sec", "tc"])  # fmt: skip
    srv = Server(pair)
    got = _client(pair, srv.addr, srv.ready["vtl_port"], 256 << 10)
    assert got["exact"]
    assert srv.report()["xdp"]["counters"]["passed"] > 0
    srv.quit()
    _wait_gone(pair, srv.ready["prog_id"])
    assert "other_tc" in pair.b.run(["tc", "filter", "show", "dev", ifname, "ingress"]).stdout


@pytest.mark.netns
@pytest.mark.parametrize("how", ["xdpgeneric", "xdpdrv"])
def test_another_xdp_owner_is_a_clear_error(pair: NetnsPair, other_obj: Path, how: str) -> None:
    ifname = pair.b.ifname
    assert ifname is not None
    pair.b.ip("link", "set", "dev", ifname, how, "obj", str(other_obj), "sec", "xdp")
    with pytest.raises(RuntimeError) as info:
        Server(pair)
    message = str(info.value)
    assert "XdpBusyError" in message and "already has an XDP program" in message, message
    assert "other_xdp" in message and "Traceback" in message  # refused, not crashed mid-way
    state = _xdp_state(pair)
    assert "other_xdp" in state and "vtl_" not in state  # untouched, nothing of ours
    pair.b.ip("link", "set", "dev", ifname, how, "off")
    srv = Server(pair)
    srv.quit()


@pytest.mark.netns
def test_second_vtl_filter_on_the_same_interface_is_refused(pair: NetnsPair) -> None:
    code = (
        "import sys\n"
        "from vtl.hooker.xdp import XdpFilter, XdpBusyError\n"
        f"first = XdpFilter({pair.b.ifname!r})\n"
        "try:\n"
        f"    XdpFilter({pair.b.ifname!r}, mode='generic')\n"
        "except XdpBusyError as exc:\n"
        "    print('BUSY', exc)\n"
        "first.close()\n"
        f"again = XdpFilter({pair.b.ifname!r}); print('AGAIN', again.mode); again.close()\n"
    )
    out = pair.b.run([sys.executable, "-c", code], timeout=60).stdout
    assert re.search(r"BUSY .*already has an XDP program \(id \d+, 'vtl_xdp_filter'\)", out), out
    assert "AGAIN native" in out
    assert "vtl_" not in _xdp_state(pair)


# ------------------------------------------- the endpoint hook (no root needed)


class _Recorder:
    def __init__(self, core: EndpointCore, log: list[tuple[str, int, int]], fail: bool = False):
        self.core, self.log, self.fail = core, log, fail
        self.sent = 0

    def added(self, cid: int) -> None:
        self.log.append(("added", cid, self.sent))
        if self.fail:
            raise RuntimeError("observer broke")

    def removed(self, cid: int) -> None:
        self.log.append(("removed", cid, self.sent))
        if self.fail:
            raise RuntimeError("observer broke")


def _pump(client: EndpointCore, server: EndpointCore, obs: dict[str, _Recorder], until: float,
          now: float) -> float:  # fmt: skip
    """Exchange datagrams (and fire timers) until nothing is left or ``until``."""
    ends = {"c": (client, ("10.0.0.1", 1)), "s": (server, ("10.0.0.2", 2))}
    while now < until:
        moved = False
        for name, (core, _) in ends.items():
            other, addr = ends["s" if name == "c" else "c"][0], ends[name][1]
            out = core.datagrams_to_send(now)
            obs[name].sent += len(out)
            for datagram, _dst in out:
                other.receive(datagram, addr, now)
                moved = True
        if not moved:
            timers = [t for t in (client.next_timer(), server.next_timer()) if t is not None]
            if not timers or min(timers) > until:
                break
            now = max(now, min(timers))
            client.handle_timer(now)
            server.handle_timer(now)
    return now


@pytest.mark.parametrize("fail", [False, True])
def test_endpoint_tells_the_observer_before_any_datagram(fail: bool) -> None:
    from vtl.core.composition import Composition

    client, server = EndpointCore(), EndpointCore(listen=True)
    log: list[tuple[str, int, int]] = []
    obs = {"c": _Recorder(client, log, fail), "s": _Recorder(server, log, fail)}
    client.cid_observer, server.cid_observer = obs["c"], obs["s"]
    comp = Composition.parse("reliability=selective-repeat congestion=newreno framing=stream")
    conn = client.connect(("10.0.0.2", 2), [comp], 0.0)
    assert log == [("added", conn.local_cid, 0)]  # before the OFFER left
    now = _pump(client, server, obs, 1.0, 0.0)
    assert len(server.connections) == 1
    scid = next(iter(server.connections))
    # the server's ID was added when the OFFER arrived, before its ACCEPT was sent
    assert ("added", scid, 0) in log
    conn.send(b"hello" * 100, now=now)
    server_conn = server.connections[scid]
    now = _pump(client, server, obs, now + 1.0, now)
    conn.close()
    server_conn.close()
    _pump(client, server, obs, now + 60.0, now)
    assert not client.connections and not server.connections
    removed = {cid for kind, cid, _ in log if kind == "removed"}
    assert removed == {conn.local_cid, scid}
    assert client.cid_observer_errors == (2 if fail else 0)
    assert server.cid_observer_errors == (2 if fail else 0)


def test_connection_id_observer_follows_and_fails_open() -> None:
    from vtl.hooker.libbpf import BpfError
    from vtl.hooker.xdp import ConnectionIdObserver

    class FakeFilter:
        attached = True

        def __init__(self) -> None:
            self.conns: dict[int, float | None] = {}
            self.ports: set[int] = set()
            self.full = False

        def add_port(self, port: int) -> None:
            self.ports.add(port)

        def remove_port(self, port: int) -> None:
            self.ports.discard(port)

        def add_conn(self, cid: int) -> None:
            if self.full:
                raise BpfError(28, "map full")
            self.conns[cid] = None

        def remove_conn(self, cid: int, grace: float | None = None) -> None:
            if grace == 0:
                self.conns.pop(cid, None)
            else:
                self.conns[cid] = 10.0 if grace is None else grace

    core = EndpointCore(listen=True)
    core.connections[5] = object()  # type: ignore[assignment]  # served before attaching
    xdp = FakeFilter()
    obs = ConnectionIdObserver(xdp).attach(core, port=4433)  # type: ignore[arg-type]
    assert core.cid_observer is obs and xdp.ports == {4433} and xdp.conns == {5: None}
    obs.added(6)
    obs.removed(5)
    assert xdp.conns == {5: 10.0, 6: None}
    xdp.full = True
    obs.added(7)  # the real filter fails open here; the observer only counts
    assert obs.errors == 1 and 7 in obs.cids
    obs.detach()
    assert core.cid_observer is None and xdp.ports == set() and xdp.conns == {5: 10.0}
