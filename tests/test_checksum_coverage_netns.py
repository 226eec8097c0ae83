"""Partial checksum coverage over the testbed: the emulator flips one bit
after the IP header of some packets (docs/testbed.md).  With full coverage
the UDP checksum (and VTL's CRC32C) drop every damaged packet and the
transfer is byte-exact; with ``integrity=partial`` the endpoints send
without the UDP checksum, so the damaged payload bytes are delivered (the
VTL header is still protected: the transfer completes with every byte
accounted for)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from vtl.testbed import Topology
from vtl.testbed.topology import python_env

pytestmark = pytest.mark.netns

SIZE = 2 << 20
BASE = "reliability=selective-repeat congestion=newreno framing=stream"


@pytest.fixture(scope="module")
def net(requires_root_netns: None):
    with Topology.pair(emulate=True).up(seed=11) as topo:
        yield topo


def _json_line(text: str) -> dict:
    lines = [line for line in text.splitlines() if line.startswith("{")]
    assert lines, f"no result line in output:\n{text[-2000:]}"
    return json.loads(lines[-1])


def _transfer(net, family: int, composition: str) -> tuple[dict, dict]:
    dst = net.addr("b", None, family)
    selftest = [sys.executable, "-m", "vtl.io._selftest"]
    env = python_env()
    receiver = net.hosts["b"].popen(
        [*selftest, "recv", "--bind", dst, "--timeout", "60"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    first = receiver.stdout.readline()
    assert first.startswith("PORT "), first + receiver.stderr.read()
    sender = net.hosts["a"].popen(
        [*selftest, "send", "--to", dst, first.split()[1], "--bytes", str(SIZE),
         "--timeout", "60", "--composition", composition],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    s_out, s_err = sender.communicate(timeout=120)
    r_out, r_err = receiver.communicate(timeout=30)
    assert sender.returncode == 0, s_err[-3000:]
    assert receiver.returncode == 0, r_err[-3000:]
    return _json_line(s_out), _json_line(r_out)


@pytest.mark.parametrize("family", [4, 6])
def test_damaged_payload_delivered_only_with_partial_coverage(net, family: int) -> None:
    net.set_link("a-b", "a->b", replace=True, corrupt=3)
    results = {}
    for name, comp in (("full", BASE), ("partial", BASE + " integrity=partial(coverage=0)")):
        net.reset_stats()
        sent, got = _transfer(net, family, comp)
        corrupted = net.link_stats("a-b")["a->b"]["corrupted"]
        results[name] = (sent, got, corrupted)
        assert corrupted > 10, name
        assert got["bytes"] == sent["bytes"] == SIZE, name
    sent, got, _ = results["full"]
    assert got["sha256"] == sent["sha256"]  # damage never delivered
    assert sent["endpoint"].get("udp_checksum_off", 0) == 0
    sent, got, corrupted = results["partial"]
    assert got["sha256"] != sent["sha256"]  # damaged payload delivered
    assert sent["endpoint"]["udp_checksum_off"] == got["endpoint"]["udp_checksum_off"] == 1
    # fewer resends: only damage to the UDP/VTL headers still costs a packet
    assert (
        sent["connection"]["retransmissions"] < results["full"][0]["connection"]["retransmissions"]
    )
    print(
        f"IPv{family}: {corrupted} packets corrupted; retransmissions full "
        f"{results['full'][0]['connection']['retransmissions']}, partial "
        f"{sent['connection']['retransmissions']}"
    )
