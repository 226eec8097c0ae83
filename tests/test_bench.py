"""``vtl bench``: the arithmetic of the report, the transport registry, the
run records (verification, time limits) and the quick run end to end."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from typing import Any

import pytest

from vtl.bench import common, metrics, report, runner, transports
from vtl.bench.network import Cell, ProfileInfo
from vtl.bench.transports import (
    QUICK_TRANSPORTS,
    Transport,
    TransportError,
    Workload,
    parse_transport,
    split_list,
)

PY = sys.executable


# ------------------------------------------------------------------ arithmetic


def test_payload_efficiency_at_the_ip_layer():
    assert metrics.tcp_efficiency() == pytest.approx(1448 / 1500)
    assert metrics.tcp_efficiency(timestamps=False) == pytest.approx(1460 / 1500)
    assert metrics.vtl_efficiency(1452) == pytest.approx(1412 / 1480)
    assert metrics.quic_efficiency(1452) == pytest.approx(1417 / 1480)
    # a datagram larger than the MTU allows is clamped to what fits
    assert metrics.vtl_efficiency(9000) == pytest.approx((1472 - 40) / 1500)
    with pytest.raises(ValueError):
        metrics.udp_efficiency(40, 40)


def test_efficiency_constants_match_the_implementations():
    from vtl.bench import quic_runner
    from vtl.core import wire
    from vtl.core.config import ConnectionConfig

    assert metrics.VTL_DATA_OVERHEAD == wire.DATA_OVERHEAD
    assert metrics.QUIC_PACKET_OVERHEAD == quic_runner.PACKET_OVERHEAD
    vtl = parse_transport("vtl")
    mds = ConnectionConfig().max_datagram_size
    assert vtl.efficiency() == pytest.approx((mds - 40) / (mds + 28))
    assert parse_transport("tcp-cubic").efficiency() == pytest.approx(0.96533, abs=1e-5)


def test_physical_limit():
    eff = 1448 / 1500
    assert metrics.physical_limit_mbps(10, 0, eff) == pytest.approx(9.6533, abs=1e-4)
    assert metrics.physical_limit_mbps(10, 2, eff) == pytest.approx(10 * 0.98 * eff)
    assert metrics.physical_limit_mbps(4, 5, 1.0) == pytest.approx(3.8)
    assert metrics.physical_limit_mbps(None, 2, eff) is None
    for bad in ((10, -1, eff), (10, 101, eff), (10, 2, 0.0), (10, 2, 1.5)):
        with pytest.raises(ValueError):
            metrics.physical_limit_mbps(*bad)


def test_median_percentile_ratio_goodput():
    assert metrics.median([3.0, None, 1.0, 2.0]) == 2.0
    assert metrics.median([4.0, 1.0]) == 2.5
    assert metrics.median([None]) is None
    assert metrics.percentile([1, 2, 3, 4], 50) == 2.5
    assert metrics.percentile(list(range(1, 101)), 99) == pytest.approx(99.01)
    assert metrics.percentile([5.0], 99) == 5.0
    assert metrics.percentile([], 50) is None
    assert metrics.ratio(4.5, 9.0) == 0.5
    assert metrics.ratio(1.0, 0.0) is None
    assert metrics.ratio(None, 1.0) is None
    assert metrics.goodput_mbps(1 << 20, 1.0) == pytest.approx(8.388608)
    lat = metrics.latency_summary([1.0, 2.0, 3.0, 100.0])
    assert lat["p50"] == 2.5 and lat["max"] == 100.0


def test_sizes_and_payloads():
    assert common.parse_size("8MiB") == 8 << 20
    assert common.parse_size("512K") == 512 << 10
    assert common.parse_size("1.5M") == 3 << 19
    assert common.parse_size("1000") == 1000
    data = common.bulk_payload(1 << 16, seed=7)
    assert data == common.bulk_payload(1 << 16, seed=7) != common.bulk_payload(1 << 16, seed=8)
    assert b"\0" in data
    sizes = common.rr_request_sizes(1, 50, 64, 1024)
    assert all(64 <= s <= 1024 for s in sizes) and len(set(sizes)) > 10
    assert common.rr_payload(1, 3, 0, 100) != common.rr_payload(1, 3, 1, 100)


# ------------------------------------------------------------------ registry


def test_transport_names():
    assert parse_transport("tcp-cubic").name == "tcp-cubic"
    assert parse_transport("tcp").name == "tcp-cubic"
    assert parse_transport("tcp:bbr").options() == ["--cc", "bbr"]
    assert parse_transport("quic").name == "quic"
    assert "--cc" in parse_transport("quic-cubic").options()
    v = parse_transport("vtl:reliability=go-back-n(window=64)   congestion=newreno")
    assert v.name == "vtl:reliability=go-back-n(window=64) congestion=newreno"
    assert v.label == "vtl go-back-n(window=64)+newreno"
    assert v.describe()["composition"] == "reliability=go-back-n(window=64) congestion=newreno"
    for bad in ("sctp", "tcp-nosuchcc", "quic-bbr2", "vtl:reliability=nonsense"):
        with pytest.raises(TransportError):
            parse_transport(bad)
    for name in transports.DEFAULT_TRANSPORTS:
        parse_transport(name)


def test_split_list_keeps_commas_in_parentheses():
    assert split_list("tcp-cubic, quic,vtl:reliability=go-back-n(window=64,min_rto=0.1)") == [
        "tcp-cubic",
        "quic",
        "vtl:reliability=go-back-n(window=64,min_rto=0.1)",
    ]


def test_a_new_transport_is_one_class(monkeypatch):
    monkeypatch.setattr(transports, "TRANSPORTS", dict(transports.TRANSPORTS))

    @transports.register
    class Fake(transports.TcpTransport):
        prefix = "fake"
        default_arg = "reno"

    t = parse_transport("fake:cubic")
    assert isinstance(t, Fake) and t.name == "fake-cubic"
    w = Workload("bulk", size=1000, timeout=5)
    argv = t.client_argv(w, "10.0.0.2", 4000)
    assert argv[:3] == [PY, "-m", "vtl.bench.tcp_runner"]
    assert argv[argv.index("--size") : argv.index("--size") + 2] == ["--size", "1000"]


# ------------------------------------------------------------------ planning


@pytest.fixture
def fake_profiles(monkeypatch):
    table = {"net3": (10.0, 20.0), "net1": (4.0, 100.0), "clean": (None, None)}
    monkeypatch.setattr(runner, "profile_info", lambda name: ProfileInfo(name, *table[name]))


def test_plan_interleaves_and_rotates_transports(fake_profiles):
    cfg = runner.BenchConfig(
        transports=["tcp-cubic", "quic", "vtl"], profiles=["net3"], losses=[0, 2], repeats=3
    )
    runs = runner.plan(cfg)
    assert len(runs) == 2 * 3 * 2 * 3
    first_cell = [r for r in runs if r.cell == Cell("net3", 0.0)]
    by_rep = {}
    for r in first_cell:
        by_rep.setdefault((r.repeat, r.kind), []).append(r.transport.prefix)
    assert by_rep[(0, "bulk")] == ["tcp", "quic", "vtl"]
    assert by_rep[(1, "bulk")] == ["quic", "vtl", "tcp"]
    assert by_rep[(2, "rr")] == ["vtl", "tcp", "quic"]
    # a cell's runs are contiguous (one topology per cell)
    assert [c for c, _ in itertools.groupby(r.cell for r in runs)] == [
        Cell("net3", 0.0),
        Cell("net3", 2.0),
    ]


def test_run_timeouts_scale_with_the_limit(fake_profiles):
    cfg = runner.BenchConfig(size=8 << 20)
    t = parse_transport("tcp-cubic")
    net1 = ProfileInfo("net1", 4.0, 100.0)
    limit = 4.0 * 0.95 * t.efficiency()
    expect = 20 * (8 << 20) * 8 / (limit * 1e6)
    assert runner.run_timeout(cfg, net1, Cell("net1", 5), t, "bulk") == pytest.approx(expect)
    small = runner.BenchConfig(size=1 << 20)
    assert runner.run_timeout(small, net1, Cell("net1", 0), t, "bulk") == 60.0
    assert runner.run_timeout(cfg, net1, Cell("net1", 0), t, "rr") == pytest.approx(
        20 * 100 * 0.105
    )
    fixed = runner.BenchConfig(timeout=7)
    assert runner.run_timeout(fixed, net1, Cell("net1", 0), t, "bulk") == 7
    exp, worst = runner.estimate_seconds(runner.plan(runner.BenchConfig.quick()))
    assert 0 < exp < worst


# ------------------------------------------------------------------ records


class _Stub:
    def __init__(self, result: dict[str, Any] | None, rc: int = 0):
        self.result = result
        self.last_progress = None
        self.proc = type("P", (), {"returncode": rc})()

    def problem(self, role: str) -> str | None:
        if self.result is None:
            return f"{role}: no result"
        return f"{role}: {self.result['error']}" if self.result.get("error") else None


def _planned(kind: str = "bulk") -> runner.PlannedRun:
    return runner.PlannedRun(Cell("net3", 2.0), 0, 0, kind, parse_transport("tcp-cubic"), 60, 1)


def _bulk_rec(cfg: runner.BenchConfig, *, digest: str | None = None) -> dict[str, Any]:
    rec: dict[str, Any] = {"errors": [], "physical_limit_mbps": 9.46}
    sender = {"ok": True, "t_start": 100.0, "t_connected": 100.02, "retrans_bytes": 2896}
    receiver = {
        "bytes": cfg.size,
        "sha256": digest or common.bulk_digest(cfg.size, cfg.seed),
        "t_first": 100.05,
        "t_last": 101.0,
        "cpu_s": 0.1,
    }
    runner._fill(rec, cfg, _planned(), _Stub(sender), _Stub(receiver))
    return rec


def test_record_of_a_verified_bulk_run():
    cfg = runner.BenchConfig(size=1 << 20)
    rec = _bulk_rec(cfg)
    assert rec["status"] == "ok" and rec["verified"]
    assert rec["fct_s"] == pytest.approx(1.0)
    assert rec["goodput_mbps"] == pytest.approx(8.388608)
    assert rec["fraction_of_limit"] == pytest.approx(8.388608 / 9.46)
    assert rec["retrans_bytes"] == 2896 and rec["handshake_s"] == pytest.approx(0.02)


def test_a_digest_mismatch_fails_the_run_loudly():
    cfg = runner.BenchConfig(size=1 << 20)
    rec = _bulk_rec(cfg, digest="0" * 64)
    assert rec["status"] == "failed" and not rec["verified"]
    assert "goodput_mbps" not in rec
    assert any("DATA VERIFICATION FAILED" in e for e in rec["errors"])


def test_a_bad_response_fails_a_request_response_run():
    cfg = runner.BenchConfig(rr_count=3)
    rec: dict[str, Any] = {"errors": [], "physical_limit_mbps": None}
    client = {
        "ok": False,
        "responses": 3,
        "bad_responses": 1,
        "latencies_ms": [20.0, 21.0, 40.0],
        "t_connected": 1.0,
        "t_end": 1.1,
        "retrans_bytes": 0,
    }
    server = {"ok": True, "requests": 3, "bad_requests": 0, "retrans_bytes": 1448}
    runner._fill(rec, cfg, _planned("rr"), _Stub(client), _Stub(server))
    assert rec["status"] == "failed"
    assert any("DATA VERIFICATION FAILED" in e for e in rec["errors"])
    assert rec["retrans_bytes"] == 1448 and rec["latency_ms"]["p50"] == 21.0


# ------------------------------------------------------------------ report


def _rec(transport: str, loss: float, repeat: int, goodput: float | None, **kw: Any) -> dict:
    status = kw.pop("status", "ok")
    rec = {
        "transport": transport,
        "label": transport,
        "profile": "net3",
        "loss": loss,
        "bursty": False,
        "workload": "bulk",
        "size": 1 << 20,
        "repeat": repeat,
        "status": status,
        "verified": status == "ok",
        "goodput_mbps": goodput if status == "ok" else 0.0,
        "physical_limit_mbps": 9.0,
        "fct_s": 1.0,
        "retrans_bytes": 1000,
        "errors": [] if status == "ok" else ["boom"],
        "timestamp": "2026-01-01T00:00:00+00:00",
        "versions": {"vtl": "0.1.0"},
    }
    rec.update(kw)
    return rec


def _records() -> list[dict[str, Any]]:
    recs = [
        _rec("tcp-cubic", 2, 0, 6.0),
        _rec("tcp-cubic", 2, 1, 8.0),
        _rec("tcp-cubic", 2, 2, 7.0),
        _rec("vtl:x", 2, 0, 8.0),
        _rec("vtl:x", 2, 1, None, status="failed"),
        _rec("vtl:x", 2, 2, 9.0),
        _rec("quic", 2, 0, None, status="timeout"),
    ]
    for i, (t, lat) in enumerate(
        [("tcp-cubic", [20.0, 22.0, 24.0, 200.0]), ("vtl:x", [21.0, 21.0, 23.0, 30.0])]
    ):
        recs.append(
            _rec(t, 2, 0, None, workload="rr", size=None, latencies_ms=lat, goodput_mbps=None)
        )
        recs[-1]["order"] = i
    return recs


def test_summary_medians_count_failures_as_zero():
    sums = {(s.key[0], s.transport): s for s in report.summarize(_records())}
    cubic, vtl, quic = (sums[("bulk", t)] for t in ("tcp-cubic", "vtl:x", "quic"))
    assert cubic.goodput == 7.0 and cubic.ratio == 1.0
    assert vtl.goodputs == [8.0, 0.0, 9.0] and vtl.goodput == 8.0
    assert vtl.ratio == pytest.approx(8 / 7) and vtl.fraction == pytest.approx(8 / 9)
    assert (vtl.ok, vtl.failures, vtl.timeouts) == (2, 1, 0)
    assert quic.goodput == 0.0 and quic.timeouts == 1 and quic.ratio == 0.0
    rr = sums[("rr", "vtl:x")]
    assert rr.pct(50) == 22.0 and rr.ratio == pytest.approx(22.0 / 23.0)
    assert rr.ratio_p99 == pytest.approx(rr.pct(99) / sums[("rr", "tcp-cubic")].pct(99))


def test_markdown_shows_failures():
    md = report.markdown(_records())
    assert "| net3 | 2% | vtl:x | **8.00** | 0.00..9.00 | 1.14 | 89% |" in md
    assert "2/3 (1 FAILED)" in md and "0/1 (1 timeout)" in md
    assert "## Failures" in md and "repeat 1: failed: boom" in md
    assert "| tcp-cubic | 7.00 (78%) |" in md


def test_emulator_drops_and_log_ticks():
    rec = _rec("tcp-cubic", 2, 0, 7.0)
    assert report._drops(rec, "loss") is None
    rec["link_stats"] = {"a->b": {"drop_loss": 3, "drop_burst": 2, "drop_queue": 7}}
    assert report._drops(rec, "loss") == 5 and report._drops(rec, "queue") == 7
    assert report.log_ticks(22, 31) == [20.0, 25.0, 30.0]
    assert report.log_ticks(0.2, 3) == [0.2, 0.3, 0.5, 0.7, 1.0, 2.0, 3.0]
    assert report.log_ticks(0.1, 5000) == [0.1, 1.0, 10.0, 100.0, 1000.0]
    with pytest.raises(ValueError):
        report.log_ticks(0, 10)


def test_report_command_rebuilds_table_and_plots(tmp_path):
    path = tmp_path / "results.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in _records()) + "\n")
    cp = subprocess.run(
        [PY, "-m", "vtl", "bench", "report", str(path), "--out", str(tmp_path / "out")],
        capture_output=True,
        text=True,
    )
    assert cp.returncode == 1, cp.stderr  # the file holds a failed run
    assert "## Bulk transfer" in cp.stdout
    for name in ("results.md", "goodput.png", "latency_cdf.png"):
        assert (tmp_path / "out" / name).read_bytes()[:4] in (b"# vt", b"\x89PNG")
    path.write_text("not json\n")
    cp = subprocess.run([PY, "-m", "vtl", "bench", "report", str(path)], capture_output=True)
    assert cp.returncode == 2


# ------------------------------------------------------------------ in namespaces


class _Sleeper(Transport):
    """Listens, then never finishes: the run must be recorded as a timeout."""

    prefix = "sleeper"
    runner = "-"

    def efficiency(self) -> float:
        return 1.0

    def server_argv(self, w: Workload) -> list[str]:
        code = "import json,time;print(json.dumps({'event':'ready','port':9}),flush=True);"
        code += "print(json.dumps({'event':'progress','bytes':123}),flush=True);time.sleep(60)"
        return [PY, "-c", code]

    def client_argv(self, w: Workload, host: str, port: int) -> list[str]:
        return [PY, "-c", "import time; time.sleep(60)"]


@pytest.mark.netns
def test_a_run_that_hangs_is_recorded_as_a_timeout(netns_pair):
    cfg = runner.BenchConfig(size=1000, timeout=2)
    run = runner.PlannedRun(Cell("clean", 0.0), 0, 0, "bulk", _Sleeper(), 2.0, 1.0)
    rec = runner.run_one(netns_pair, cfg, run, ProfileInfo("clean", None, None))
    assert rec["status"] == "timeout" and not rec["verified"]
    assert rec["goodput_mbps"] == 0.0 and rec["bytes_at_timeout"] == 123
    assert rec["wall_s"] < 15


@pytest.mark.netns
@pytest.mark.parametrize("name", ["tcp-cubic", "quic", "vtl"])
def test_each_runner_verifies_both_workloads(netns_pair, name):
    """The endpoint processes of every transport, over a plain veth pair."""
    cfg = runner.BenchConfig(size=300_000, rr_count=5, timeout=60)
    info = ProfileInfo("clean", None, None)
    for kind in ("bulk", "rr"):
        run = runner.PlannedRun(Cell("clean", 0.0), 0, 0, kind, parse_transport(name), 60, 1)
        rec = runner.run_one(netns_pair, cfg, run, info)
        assert rec["status"] == "ok", rec["errors"]
        assert rec["verified"] and rec["cpu_client_s"] is not None
        assert rec["retrans_bytes"] is not None or name == "quic"
        if kind == "bulk":
            assert rec["bytes"] == 300_000 and rec["goodput_mbps"] > 0
        else:
            assert len(rec["latencies_ms"]) == 5


@pytest.mark.netns
def test_quick_run_end_to_end(tmp_path):
    out = tmp_path / "bench"
    cp = subprocess.run(
        [PY, "-m", "vtl", "bench", "run", "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert cp.returncode == 0, cp.stderr[-4000:]
    assert "estimated time" in cp.stderr
    records = report.load(out / "results.jsonl")
    seen = {(r["transport"], r["workload"]) for r in records}
    for t in QUICK_TRANSPORTS:
        name = parse_transport(t).name
        assert (name, "bulk") in seen and (name, "rr") in seen
    for r in records:
        assert r["status"] == "ok" and r["verified"], (r["transport"], r["errors"])
        assert r["versions"]["kernel"] and r["profile"] == "net3"
        assert r["link_stats"]["a->b"]["tx_packets"] > 0  # the emulator carried it
        if r["workload"] == "bulk":
            assert r["sha256"] == r["sha256_expected"] and r["bytes"] == 1 << 20
            assert 0 < r["fraction_of_limit"] < 1.05
        else:
            assert r["latency_ms"]["p50"] > 0
    md = (out / "results.md").read_text()
    assert "| profile | loss | transport | goodput |" in md and "## Request/response" in md
    for png in ("goodput.png", "latency_cdf.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((out / "run.json").read_text())["config"]["repeats"] == 1


def test_cli_rejects_bad_options():
    for argv in (["--transports", "sctp"], ["--loss", "150"], ["--repeats", "0"]):
        cp = subprocess.run(
            [PY, "-m", "vtl", "bench", "run", *argv, "--out", "/nonexistent/x"],
            capture_output=True,
            text=True,
        )
        assert cp.returncode == 2, (argv, cp.stderr)


def test_imports_are_light_for_runners():
    """The endpoint processes must not pull in matplotlib or rich."""
    code = (
        "import sys, vtl.bench.tcp_runner, vtl.bench.vtl_runner, vtl.bench.quic_runner;"
        "print(any(m.split('.')[0] in ('matplotlib', 'rich') for m in sys.modules))"
    )
    cp = subprocess.run([PY, "-c", code], capture_output=True, text=True, check=True)
    assert cp.stdout.strip() == "False"
