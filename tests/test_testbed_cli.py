"""``vtl testbed``: up / exec / show / set / down round trip, crash clean-up, tools."""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vtl.testbed import list_netns
from vtl.testbed.netns import STATE_DIR
from vtl.testbed.traces import load_trace

PY = sys.executable
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "testbed" / "three-hosts.toml"


def vtl(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [PY, "-m", "vtl", "testbed", *args], capture_output=True, text=True, timeout=timeout
    )


def _rtt(cp: subprocess.CompletedProcess) -> float:
    m = re.search(r"rtt min/avg/max/mdev = [\d.]+/([\d.]+)/", cp.stdout)
    assert m, cp.stdout + cp.stderr
    return float(m.group(1))


@pytest.fixture
def topo_name(requires_root_netns: None):
    name = f"t{secrets.token_hex(3)}"
    yield name
    vtl("down", "--name", name)  # always, whatever happened
    assert not [ns for ns in list_netns() if ns.startswith(f"vtl-{name}-")]


@pytest.mark.netns
def test_up_exec_show_set_down(topo_name: str) -> None:
    n = topo_name
    cp = vtl("up", str(EXAMPLE), "--name", n)
    assert cp.returncode == 0, cp.stderr
    assert "h1" in cp.stdout and "h1-h2" in cp.stdout

    cp = vtl("exec", "--name", n, "h1", "--", "ping", "-n", "-c", "3", "-i", "0.2", "10.0.12.2")
    assert cp.returncode == 0, cp.stderr
    assert abs(_rtt(cp) - 50) <= 2.5  # net2: 50 ms RTT
    cp = vtl("exec", "--name", n, "h2", "--", "sh", "-c", "exit 3")
    assert cp.returncode == 3

    cp = vtl("show", "--name", n, "--json")
    assert cp.returncode == 0, cp.stderr
    info = json.loads(cp.stdout)
    assert set(info["hosts"]) == {"h1", "h2", "h3"}
    assert info["hosts"]["h1"]["ip4"] == "10.0.12.1"
    link = info["links"]["h1-h2"]
    assert link["emulated"] and link["conditions"]["a->b"]["delay_ms"] == 25
    assert link["conditions"]["a->b"]["rate_mbps"] == 10
    assert link["stats"]["a->b"]["rx_packets"] >= 3
    h23 = info["links"]["h2-h3"]["conditions"]
    assert h23["a->b"]["rate_mbps"] == 20 and h23["b->a"]["rate_mbps"] == 2

    cp = vtl("set", "--name", n, "h1-h2", "--from", "h1", "delay_ms=40", "loss=0")
    assert cp.returncode == 0, cp.stderr
    assert "h1->h2: 10 Mbit/s, 40 ms" in cp.stdout
    cp = vtl("exec", "--name", n, "h1", "--", "ping", "-n", "-c", "3", "-i", "0.2", "10.0.12.2")
    assert abs(_rtt(cp) - 65) <= 2.5  # 40 + 25
    cp = vtl("set", "--name", n, "h1-h2", "--dir", "h2->h1", "profile=net3")
    assert cp.returncode == 0, cp.stderr
    info = json.loads(vtl("show", "--name", n, "--json").stdout)
    conds = info["links"]["h1-h2"]["conditions"]
    assert conds["a->b"]["delay_ms"] == 40 and conds["b->a"]["delay_ms"] == 10

    cp = vtl("set", "--name", n, "h1-h2", "nonsense=1")
    assert cp.returncode != 0 and "unknown condition field" in cp.stderr
    cp = vtl("set", "--name", n, "nolink", "loss=1")
    assert cp.returncode != 0 and "no link" in cp.stderr

    cp = vtl("show", "--name", n)
    assert cp.returncode == 0 and "h1->h2" in cp.stdout
    assert n in vtl("list").stdout
    cp = vtl("up", str(EXAMPLE), "--name", n)
    assert cp.returncode != 0 and "already up" in cp.stderr

    cp = vtl("down", "--name", n)
    assert cp.returncode == 0, cp.stderr
    assert not [ns for ns in list_netns() if ns.startswith(f"vtl-{n}-")]
    assert not (STATE_DIR / f"{n}.json").exists()
    assert not (STATE_DIR / f"vtl-{n}.d").exists()
    cp = vtl("show", "--name", n)
    assert cp.returncode != 0 and "no topology" in cp.stderr


@pytest.mark.netns
def test_down_after_supervisor_killed(topo_name: str, tmp_path: Path) -> None:
    topo = tmp_path / "tiny.toml"
    topo.write_text('[[link]]\na = "x"\nb = "y"\ndelay_ms = 2\n')
    cp = vtl("up", str(topo), "--name", topo_name, "--json")
    assert cp.returncode == 0, cp.stderr
    state = json.loads(cp.stdout)
    os.kill(state["pid"], signal.SIGKILL)
    time.sleep(0.2)
    cp = vtl("show", "--name", topo_name)
    assert cp.returncode != 0 and "not running" in cp.stderr
    cp = vtl("down", "--name", topo_name)
    assert cp.returncode == 0, cp.stderr
    assert not [ns for ns in list_netns() if ns.startswith(f"vtl-{topo_name}-")]
    assert not (STATE_DIR / f"vtl-{topo_name}.d").exists()


def test_bad_topology_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[[link]]\na = "x"\nb = "y"\nspeed = 3\n')
    cp = vtl("up", str(bad), "--name", "never")
    assert cp.returncode != 0 and "unknown condition field" in cp.stderr


def test_profiles_and_trace(tmp_path: Path) -> None:
    cp = vtl("profiles", "--json")
    assert cp.returncode == 0, cp.stderr
    rows = {r["name"]: r for r in json.loads(cp.stdout)}
    assert rows["net1"]["rate_mbps"] == 4 and rows["net1"]["rtt_ms"] == 100
    assert rows["clean"]["rate_mbps"] is None
    out = tmp_path / "cell.trace"
    cp = vtl("trace", "--kind", "cellular", "--seconds", "5", "--seed", "2", "-o", str(out))
    assert cp.returncode == 0, cp.stderr
    assert load_trace(out)[-1] == 5000 and "Mbit/s" in cp.stderr
