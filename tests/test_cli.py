"""The ``vtl`` command line: TF listing, send/recv between namespaces over a
lossy link (verified by SHA-256 on both ends), and the demo."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time

import pytest

from vtl.testbed.conditions import dropped_by_loss_rule, set_ingress_loss

PY = sys.executable


def vtl(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-m", "vtl", *args], capture_output=True, text=True, **kw)


def test_tfs_lists_every_role_as_json():
    cp = vtl("tfs", "--json")
    assert cp.returncode == 0, cp.stderr
    tfs = json.loads(cp.stdout)
    names = {(t["role"], t["name"]) for t in tfs}
    for expected in [
        ("reliability", "none"),
        ("reliability", "stop-and-wait"),
        ("reliability", "go-back-n"),
        ("reliability", "selective-repeat"),
        ("congestion", "newreno"),
        ("congestion", "fixed-rate"),
        ("ordering", "unordered"),
        ("flow", "window"),
        ("framing", "message"),
    ]:
        assert expected in names
    sr = next(t for t in tfs if t["name"] == "selective-repeat")
    assert sr["params"]["window"]["type"] == "int"


def test_tfs_human_output():
    cp = vtl("tfs")
    assert cp.returncode == 0
    assert "selective-repeat" in cp.stdout and "window" in cp.stdout


def test_bad_composition_is_a_clear_error():
    cp = vtl("send", "127.0.0.1:9", "/dev/null", "-c", "reliability=quantum-teleport")
    assert cp.returncode == 2
    assert "quantum-teleport" in cp.stderr and "not installed" in cp.stderr
    cp = vtl("send", "127.0.0.1:9", "/dev/null", "-c", "reliability=go-back-n(window=0)")
    assert cp.returncode == 2
    assert "window" in cp.stderr


def test_send_to_nobody_fails_fast():
    start = time.monotonic()
    cp = vtl(
        "send", "127.0.0.1:9", "/dev/null", "--timeout", "1.5", "-c", "reliability=selective-repeat"
    )
    assert cp.returncode == 1
    assert time.monotonic() - start < 10
    assert "error" in cp.stderr


@pytest.mark.netns
@pytest.mark.parametrize(
    "composition",
    [
        "reliability=selective-repeat congestion=newreno",
        "reliability=go-back-n(window=32) congestion=newreno framing=message",
    ],
)
def test_send_recv_between_namespaces_with_loss(netns_pair_factory, tmp_path, composition):
    pair = netns_pair_factory(disable_offloads=True)
    set_ingress_loss(pair.b, pair.b.ifname, 3.0)
    set_ingress_loss(pair.a, pair.a.ifname, 3.0)
    payload = os.urandom(3 * 1024 * 1024) + bytes(1000)  # NUL bytes included
    src = tmp_path / "in.bin"
    src.write_bytes(payload)
    dst = tmp_path / "out.bin"
    recv = pair.b.popen(
        [
            PY,
            "-m",
            "vtl",
            "recv",
            f"{pair.b.ip4}:7000",
            "-o",
            str(dst),
            "--json",
            "-c",
            composition,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(0.5)
    cp = pair.a.run(
        [PY, "-m", "vtl", "send", f"{pair.b.ip4}:7000", str(src), "--json", "-c", composition],
        check=False,
        timeout=120,
    )
    out, err = recv.communicate(timeout=60)
    assert cp.returncode == 0, cp.stderr
    sent = json.loads(cp.stdout)
    got = json.loads(out)
    assert sent["verified"] is True
    assert got["sha256"] == sent["sha256"] == hashlib.sha256(payload).hexdigest()
    assert dst.read_bytes() == payload
    assert sent["composition"] == got["composition"]
    assert (
        "reliability=" + composition.split()[0].split("=")[1].split("(")[0] in sent["composition"]
    )
    assert sent["retransmissions"] > 0  # the loss really happened ...
    assert dropped_by_loss_rule(pair.b) > 0  # ... in the kernel, on the link


@pytest.mark.netns
def test_send_recv_ipv6(netns_pair, tmp_path):
    pair = netns_pair
    payload = os.urandom(512 * 1024)
    src = tmp_path / "in.bin"
    src.write_bytes(payload)
    recv = pair.b.popen(
        [
            PY,
            "-m",
            "vtl",
            "recv",
            f"[{pair.b.ip6}]:7001",
            "--json",
            "-c",
            "reliability=selective-repeat",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(0.5)
    cp = pair.a.run(
        [
            PY,
            "-m",
            "vtl",
            "send",
            f"[{pair.b.ip6}]:7001",
            str(src),
            "--json",
            "-c",
            "reliability=selective-repeat",
        ],
        check=False,
        timeout=60,
    )
    recv.communicate(timeout=30)
    assert cp.returncode == 0, cp.stderr
    assert json.loads(cp.stdout)["verified"] is True


@pytest.mark.netns
@pytest.mark.slow
def test_demo_runs_and_verifies(requires_root_netns):
    """The Hooker demo: curl + http.server, plain TCP next to the Hooker."""
    cp = vtl("demo", "--size-mib", "1", "--loss", "2", "--json", timeout=300)
    assert cp.returncode == 0, cp.stdout + cp.stderr
    records = [json.loads(line) for line in cp.stdout.splitlines() if line.startswith("{")]
    assert [r["transport"] for r in records] == ["tcp-cubic", "tcp-bbr", "hooker"]
    assert all(r["verified"] and r["goodput_mbps"] > 0 for r in records), records
    hooked = records[-1]
    assert hooked["carried_over_vtl"], hooked
    proof = hooked["proof"]
    assert proof["connects_redirected"] == 1 and proof["bytes_fallback"] == 0
    assert proof["bytes_vtl_to_a"] >= 1 << 20 and proof["udp_bytes_b_out"] > 1 << 20
