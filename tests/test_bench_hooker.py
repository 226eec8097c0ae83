"""``vtl bench``'s ``hooker:<composition>`` transport: the unmodified TCP
runner carried over VTL by a Hooker in each host, with the Hooker's counters
in the record as proof."""

from __future__ import annotations

import contextlib
import subprocess
import sys
from typing import Any

import pytest

from vtl.bench import report, runner
from vtl.bench.hooker_session import HookerSession
from vtl.bench.network import Cell, ProfileInfo
from vtl.bench.transports import (
    DEFAULT_HOOKER,
    HookerTransport,
    SessionError,
    TransportError,
    Workload,
    parse_transport,
)

PY = sys.executable


def test_hooker_transport_name_and_seam():
    t = parse_transport("hooker")
    assert isinstance(t, HookerTransport) and t.name == f"hooker:{DEFAULT_HOOKER}"
    t = parse_transport("hooker:reliability=go-back-n(window=64)  congestion=newreno")
    assert t.name == "hooker:reliability=go-back-n(window=64) congestion=newreno"
    assert t.label == "hooker go-back-n(window=64)+newreno"
    assert t.describe()["family"] == "hooker"
    # the efficiency is VTL's (what crosses the link), the runner TCP's, unchanged
    assert t.efficiency() == parse_transport("vtl").efficiency()
    argv = t.client_argv(Workload("bulk", size=1000), "10.0.0.2", 4000)
    assert argv[:3] == [PY, "-m", "vtl.bench.tcp_runner"]
    with pytest.raises(TransportError):
        parse_transport("hooker:reliability=nonsense")


def test_the_estimate_counts_the_hookers_start_and_stop():
    cfg = runner.BenchConfig(size=1 << 20)
    info, cell = ProfileInfo("net3", 10.0, 20.0), Cell("net3", 0.0)
    tcp = runner.run_estimate(cfg, info, cell, parse_transport("tcp-cubic"), "bulk")
    hooked = runner.run_estimate(cfg, info, cell, parse_transport("hooker"), "bulk")
    assert hooked - tcp > 3.0


def _session(a: dict[str, Any], b: dict[str, Any]) -> HookerSession:
    s = HookerSession("c", client=None, server=None)  # type: ignore[arg-type]
    s.statuses = {
        "a": {"engine": a, "kernel": {"connect_redirected": 1}},
        "b": {"engine": b, "kernel": {}},
    }
    return s


def _ok_record() -> dict[str, Any]:
    return {"workload": "bulk", "size": 1000, "status": "ok", "errors": [], "rr": None}


def test_a_run_not_carried_over_vtl_fails():
    """Verified data that went around the Hooker (plain TCP fallback) must not
    count as a Hooker result."""
    t = parse_transport("hooker")
    rec = _ok_record()
    t.finish_record(rec, _session({"bytes_to_peer_fallback": 1000}, {}))
    assert rec["status"] == "failed" and "NOT CARRIED OVER VTL" in rec["errors"][-1]
    assert rec["hooker"]["bytes_fallback"] == 1000 and not rec["hooker"]["carried_over_vtl"]

    rec = _ok_record()
    carried = _session({"bytes_to_peer_carrier": 1000}, {"bytes_to_app_carrier": 1000})
    t.finish_record(rec, carried)
    assert rec["status"] == "ok" and rec["hooker"]["carried_over_vtl"], rec["errors"]

    rec = _ok_record()
    short = _session({"bytes_to_peer_carrier": 999}, {"bytes_to_app_carrier": 999})
    t.finish_record(rec, short)
    assert rec["status"] == "failed"


class _NoDaemon(HookerTransport):
    """A transport whose helpers cannot start."""

    def session(self, net: Any) -> contextlib.AbstractContextManager[Any]:
        @contextlib.contextmanager
        def broken() -> Any:
            raise SessionError("no Hooker here")
            yield

        return broken()


@pytest.mark.netns
def test_a_session_that_cannot_start_is_a_failed_run(netns_pair):
    cfg = runner.BenchConfig(size=1000, timeout=5)
    run = runner.PlannedRun(Cell("clean", 0.0), 0, 0, "bulk", _NoDaemon(), 5.0, 1.0)
    rec = runner.run_one(netns_pair, cfg, run, ProfileInfo("clean", None, None))
    assert rec["status"] == "failed" and rec["goodput_mbps"] == 0.0
    assert "no Hooker here" in rec["errors"][0] and rec["wall_s"] < 5


@pytest.mark.netns
def test_quick_hooker_run_end_to_end(tmp_path):
    """`vtl bench run --quick` with the Hooker: every run verified, carried
    over VTL by the counters, and no Hooker left behind."""
    out = tmp_path / "bench"
    cp = subprocess.run(
        [PY, "-m", "vtl", "bench", "run", "--quick", "--transports", "hooker", "--loss", "2",
         "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )  # fmt: skip
    assert cp.returncode == 0, cp.stderr[-4000:]
    records = report.load(out / "results.jsonl")
    assert {r["workload"] for r in records} == {"bulk", "rr"}
    for r in records:
        assert r["status"] == "ok" and r["verified"], r["errors"]
        h = r["hooker"]
        assert h["carried_over_vtl"] and h["connects_redirected"] == 1
        assert h["bytes_fallback"] == 0
        assert h["udp_bytes_b_in"] >= h["bytes_vtl_to_b"]  # the bytes came as VTL datagrams
        if r["workload"] == "bulk":
            assert h["bytes_a_to_vtl"] == h["bytes_vtl_to_b"] == r["size"] == 1 << 20
            assert 0 < r["fraction_of_limit"] < 1.05
        assert "errors" not in h  # both Hookers stopped by `vtl hooker stop`, not killed
