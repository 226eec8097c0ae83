"""Bulk transfer between two network namespaces over a veth pair.

A receiver process in namespace ``b`` and a sender process in namespace ``a``
(``python -m vtl.io._selftest``) move 32 MiB of seeded random bytes with
selective-repeat + newreno; both report the SHA-256 and the goodput.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from vtl.testbed import NetnsPair

pytestmark = pytest.mark.netns

SIZE = 32 << 20
COMPOSITION = "reliability=selective-repeat congestion=newreno framing=stream"


def _json_line(text: str) -> dict:
    lines = [line for line in text.splitlines() if line.startswith("{")]
    assert lines, f"no result line in output:\n{text[-2000:]}"
    return json.loads(lines[-1])


def _transfer(pair: NetnsPair, family: str, size: int = SIZE) -> tuple[dict, dict]:
    dst = getattr(pair.b, family)
    selftest = [sys.executable, "-m", "vtl.io._selftest"]
    receiver = pair.b.popen(
        [*selftest, "recv", "--bind", dst, "--timeout", "60"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert receiver.stdout is not None
    first = receiver.stdout.readline()
    assert first.startswith("PORT "), first + (receiver.stderr.read() if receiver.stderr else "")
    port = first.split()[1]
    sender = pair.a.popen(
        [*selftest, "send", "--to", dst, port, "--bytes", str(size), "--timeout", "60"]
        + ["--composition", COMPOSITION],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    s_out, s_err = sender.communicate(timeout=120)
    r_out, r_err = receiver.communicate(timeout=30)
    assert sender.returncode == 0, s_err[-3000:]
    assert receiver.returncode == 0, r_err[-3000:]
    return _json_line(s_out), _json_line(first + r_out)


@pytest.mark.parametrize("family", ["ip4", "ip6"])
def test_bulk_transfer_between_namespaces(
    netns_pair: NetnsPair, family: str, record_property: pytest.RecordProperty
) -> None:
    sent, got = _transfer(netns_pair, family)
    assert sent["bytes"] == got["bytes"] == SIZE
    assert sent["sha256"] == got["sha256"]
    assert sent["connection"]["state"] == "terminated"
    assert got["endpoint"]["drops"] == {}
    assert sent["endpoint"]["send_errors"] == 0
    summary = (
        f"{family}: {SIZE >> 20} MiB, goodput {got['goodput_mbps']} Mbit/s at the receiver "
        f"({got['pps_in']} pkt/s in, CPU {got['cpu_percent']}%), sender "
        f"{sent['goodput_mbps']} Mbit/s ({sent['pps_out']} pkt/s out, CPU "
        f"{sent['cpu_percent']}%), retransmissions {sent['connection']['retransmissions']}, "
        f"GSO batches {sent['endpoint']['gso_batches']}, GRO segments "
        f"{got['endpoint']['gro_segments']}"
    )
    print(summary)
    record_property("goodput", summary)
    assert got["goodput_mbps"] > 10  # sanity: a broken datapath crawls or stalls
