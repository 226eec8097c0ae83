"""The matrix runner: {transport} x {profile} x {loss} x {workload}, repeated.

Order of work: for each cell (profile, loss) one topology is brought up
(:func:`vtl.bench.network.open_cell`); inside it, for each repeat, for each
workload, every transport runs once, the transports rotated by one place per
repeat -- so slow drifts of the machine hit all transports alike and no
transport is always first. Every run is one server process in host ``b`` and
one client process in host ``a`` (:mod:`vtl.bench.transports`).

A run is recorded whatever happens to it (one JSON line each, written as soon
as the run ends): ``status`` is ``ok`` (data verified), ``failed`` (a runner
crashed or the data did not verify: goodput 0) or ``timeout`` (killed after
the run's time limit: goodput 0, ``bytes_at_timeout`` from the receiver's last
progress line).

Time limit of a bulk run: ``timeout_factor`` (20) x the time the transfer
takes at the cell's physical limit, at least ``min_timeout`` (60 s); with no
rate (``clean``) as if the limit were 50 Mbit/s. Request/response:
``timeout_factor`` x count x (RTT + 5 ms), at least ``min_timeout``.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import platform
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from vtl.bench import metrics
from vtl.bench.common import bulk_digest
from vtl.bench.network import Cell, ProfileInfo, open_cell, profile_info
from vtl.bench.transports import (
    DEFAULT_TRANSPORTS,
    QUICK_TRANSPORTS,
    SessionError,
    Transport,
    Workload,
    parse_transport,
)

SCHEMA = 1
READY_TIMEOUT = 30.0  # s for a server to start listening
SERVER_GRACE = 5.0  # s for a server to exit by itself after the client, then again after SIGTERM
NO_RATE_MBPS = 50.0  # assumed rate for time limits and estimates when a profile has none
RUN_OVERHEAD_S = 1.5  # process start-up, imports, payload generation (estimate)
CELL_OVERHEAD_S = 3.0  # topology up + down (estimate)


@dataclass
class BenchConfig:
    transports: list[str] = field(default_factory=lambda: list(DEFAULT_TRANSPORTS))
    profiles: list[str] = field(default_factory=lambda: ["net1", "net2", "net3", "clean"])
    losses: list[float] = field(default_factory=lambda: [0.0, 2.0, 5.0])
    bursty: bool = False
    workloads: list[str] = field(default_factory=lambda: ["bulk", "rr"])
    size: int = 8 << 20
    repeats: int = 3
    rr_count: int = 100
    rr_request_min: int = 64
    rr_request_max: int = 1024
    rr_response: int = 1024
    seed: int = 1
    timeout: float | None = None  # fixed per-run limit (s); None: scaled
    timeout_factor: float = 20.0
    min_timeout: float = 60.0
    strict: bool = False  # a timeout also makes the run fail the command

    @classmethod
    def quick(cls, **overrides: Any) -> BenchConfig:
        """The CI smoke test: one profile, 1 MiB, one repeat, three transports."""
        base: dict[str, Any] = dict(
            transports=list(QUICK_TRANSPORTS),
            profiles=["net3"],
            losses=[0.0, 2.0],
            size=1 << 20,
            repeats=1,
            rr_count=20,
            strict=True,
        )
        base.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**base)

    def cells(self) -> list[Cell]:
        return [Cell(p, float(loss), self.bursty) for p in self.profiles for loss in self.losses]

    def workload(self, kind: str, timeout: float) -> Workload:
        return Workload(
            kind=kind,
            size=self.size,
            seed=self.seed,
            count=self.rr_count,
            request_min=self.rr_request_min,
            request_max=self.rr_request_max,
            response=self.rr_response,
            timeout=timeout,
        )


# ------------------------------------------------------------------ planning


@dataclass(frozen=True)
class PlannedRun:
    cell: Cell
    repeat: int
    order: int  # position within the repeat
    kind: str
    transport: Transport
    timeout: float
    estimate: float  # expected seconds, for the progress bar


def _limit(info: ProfileInfo, cell: Cell, t: Transport) -> float | None:
    return metrics.physical_limit_mbps(info.rate_mbps, cell.loss, t.efficiency())


def run_timeout(cfg: BenchConfig, info: ProfileInfo, cell: Cell, t: Transport, kind: str) -> float:
    if cfg.timeout is not None:
        return cfg.timeout
    if kind == "bulk":
        limit = _limit(info, cell, t) or NO_RATE_MBPS
        nominal = cfg.size * 8 / (limit * 1e6)
    else:
        nominal = cfg.rr_count * ((info.rtt_ms or 1.0) + 5.0) / 1e3
    return max(cfg.min_timeout, cfg.timeout_factor * nominal)


def run_estimate(cfg: BenchConfig, info: ProfileInfo, cell: Cell, t: Transport, kind: str) -> float:
    """A rough guess of a run's duration: bulk at 70 % of the limit without loss
    and 30 % with loss; request/response at 1.3 RTT per round trip."""
    overhead = RUN_OVERHEAD_S + t.session_overhead_s
    if kind == "bulk":
        limit = _limit(info, cell, t)
        if limit is None:
            return overhead + cfg.size * 8 / (NO_RATE_MBPS * 1e6)
        share = 0.7 if cell.loss == 0 else 0.3
        return overhead + cfg.size * 8 / (limit * share * 1e6)
    return overhead + cfg.rr_count * ((info.rtt_ms or 0.5) * 1.3 + 1.0) / 1e3


def plan(cfg: BenchConfig) -> list[PlannedRun]:
    transports = [parse_transport(t) for t in cfg.transports]
    if not transports:
        raise ValueError("no transports to run")
    for kind in cfg.workloads:
        Workload(kind)  # validates the name
    runs: list[PlannedRun] = []
    for cell in cfg.cells():
        info = profile_info(cell.profile)
        for rep in range(cfg.repeats):
            shift = rep % len(transports)
            order = transports[shift:] + transports[:shift]
            pos = 0
            for kind in cfg.workloads:
                for t in order:
                    runs.append(
                        PlannedRun(
                            cell, rep, pos, kind, t,
                            run_timeout(cfg, info, cell, t, kind),
                            run_estimate(cfg, info, cell, t, kind),
                        )
                    )  # fmt: skip
                    pos += 1
    return runs


def estimate_seconds(runs: list[PlannedRun]) -> tuple[float, float]:
    """(expected, worst case if every run times out) wall-clock seconds."""
    cells = len({r.cell for r in runs})
    expected = sum(r.estimate for r in runs) + cells * CELL_OVERHEAD_S
    worst = sum(r.timeout + RUN_OVERHEAD_S + r.transport.session_overhead_s for r in runs)
    worst += cells * CELL_OVERHEAD_S
    return expected, worst


# ------------------------------------------------------------------ versions


@cache
def versions() -> dict[str, str | None]:
    import sys

    import vtl

    out: dict[str, str | None] = {
        "vtl": vtl.__version__,
        "python": platform.python_version(),
        "kernel": platform.release(),
    }
    try:
        import aioquic

        out["aioquic"] = aioquic.__version__
    except ImportError:
        out["aioquic"] = None
    out["vtl_git"] = _git_describe(Path(vtl.__file__).resolve().parent)
    out["executable"] = sys.executable
    return out


def _git_describe(path: Path) -> str | None:
    try:
        head = subprocess.run(
            ["git", "-C", str(path), "rev-parse", "--short=12", "HEAD"],
            capture_output=True, text=True, timeout=5,
        )  # fmt: skip
        if head.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "-C", str(path), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=5,
        )  # fmt: skip
        return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


@cache
def _expected_digest(size: int, seed: int) -> str:
    return bulk_digest(size, seed)


# ------------------------------------------------------------------ one run


class _Endpoint:
    """A runner process in a namespace; its JSON lines are collected by threads."""

    def __init__(self, host: Any, argv: list[str]) -> None:
        self.argv = argv
        self.events: list[dict[str, Any]] = []
        self.stderr: list[str] = []
        self.ready = threading.Event()
        self.port: int | None = None
        self.proc: subprocess.Popen[str] = host.popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1
        )
        self._threads = [
            threading.Thread(target=self._read_stdout, daemon=True),
            threading.Thread(target=self._read_stderr, daemon=True),
        ]
        for th in self._threads:
            th.start()

    def _read_stdout(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            line = line.strip()
            if not line:
                continue
            try:
                ev = json.loads(line)
            except ValueError:
                self.stderr.append(f"(stdout) {line}")
                continue
            self.events.append(ev)
            if ev.get("event") == "ready":
                self.port = int(ev["port"])
                self.ready.set()
        self.ready.set()  # EOF: nobody will say "ready" any more

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.stderr.append(line.rstrip())
            del self.stderr[:-50]

    def wait(self, timeout: float) -> bool:
        try:
            self.proc.wait(timeout=max(0.0, timeout))
        except subprocess.TimeoutExpired:
            return False
        for th in self._threads:
            th.join(timeout=5)
        return True

    def terminate(self) -> None:
        """SIGTERM to the runner itself (it reports what it has, then exits)."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                self.proc.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=5)
        for th in self._threads:
            th.join(timeout=5)

    @property
    def result(self) -> dict[str, Any] | None:
        for ev in reversed(self.events):
            if ev.get("event") == "result":
                return ev
        return None

    @property
    def last_progress(self) -> dict[str, Any] | None:
        for ev in reversed(self.events):
            if ev.get("event") == "progress":
                return ev
        return None

    def problem(self, role: str) -> str | None:
        res = self.result
        if res is not None and res.get("error"):
            return f"{role}: {res['error']}"
        if res is None:
            tail = " | ".join(self.stderr[-5:])
            rc = self.proc.returncode
            return f"{role}: no result (exit {rc}){': ' + tail if tail else ''}"
        if self.proc.returncode not in (0, None):
            return f"{role}: exit {self.proc.returncode}"
        return None


def run_one(net: Any, cfg: BenchConfig, run: PlannedRun, info: ProfileInfo) -> dict[str, Any]:
    """Run one transfer and turn what both ends said into a result record."""
    t = run.transport
    w = cfg.workload(run.kind, run.timeout)
    limit = _limit(info, run.cell, t)
    rec: dict[str, Any] = {
        "schema": SCHEMA,
        "timestamp": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "transport": t.name,
        "label": t.label,
        **t.describe(),
        "profile": run.cell.profile,
        "loss": run.cell.loss,
        "bursty": run.cell.bursty,
        "workload": run.kind,
        "size": cfg.size if run.kind == "bulk" else None,
        "rr": None
        if run.kind == "bulk"
        else {
            "count": w.count,
            "request_min": w.request_min,
            "request_max": w.request_max,
            "response": w.response,
        },
        "repeat": run.repeat,
        "order": run.order,
        "seed": cfg.seed,
        "link_rate_mbps": info.rate_mbps,
        "rtt_ms": info.rtt_ms,
        "efficiency": round(t.efficiency(), 6),
        "physical_limit_mbps": limit,
        "timeout_s": run.timeout,
        "status": "failed",
        "verified": False,
        "errors": [],
        "versions": versions(),
    }
    a, b = net.hosts["a"], net.hosts["b"]
    _link_call(net, "reset_stats")
    started = time.monotonic()
    with contextlib.ExitStack() as stack:
        try:  # the transport's helpers, e.g. the Hooker daemons
            session = stack.enter_context(t.session(net))
        except SessionError as exc:
            rec["errors"].append(f"transport session: {exc}")
            rec["wall_s"] = round(time.monotonic() - started, 3)
            rec["goodput_mbps"] = 0.0 if run.kind == "bulk" else None
            rec["fraction_of_limit"] = 0.0 if run.kind == "bulk" and limit else None
            return rec
        server = _Endpoint(b, t.server_argv(w))
        client: _Endpoint | None = None
        timed_out = False
        try:
            server.ready.wait(READY_TIMEOUT)
            if server.port is None:
                server.kill()
                rec["errors"].append(server.problem("server") or "server did not start")
            else:
                client = _Endpoint(a, t.client_argv(w, b.ip4, server.port))
                deadline = started + run.timeout
                if not client.wait(deadline - time.monotonic()):
                    timed_out = True
                elif not server.wait(SERVER_GRACE):
                    # The client has all it wanted; a server still waiting for the
                    # connection's close (whose last packet may be lost) is told to
                    # stop and report what it has.
                    server.terminate()
                    if not server.wait(SERVER_GRACE):
                        rec["errors"].append(
                            f"server did not exit within {2 * SERVER_GRACE:g} s after the client"
                        )
        finally:
            for ep in (client, server):
                if ep is not None:
                    ep.kill()
    rec["wall_s"] = round(time.monotonic() - started, 3)
    rec["link_stats"] = _link_stats(net)
    if client is not None:
        _fill(rec, cfg, run, client, server)
    if timed_out:
        rec["status"] = "timeout"
        rec["verified"] = False
        prog = server.last_progress if run.kind == "bulk" else None
        rec["bytes_at_timeout"] = prog["bytes"] if prog else None
        rec["errors"].insert(0, f"timed out after {run.timeout:g} s")
    t.finish_record(rec, session)
    if rec["status"] != "ok":
        rec["goodput_mbps"] = 0.0 if run.kind == "bulk" else None
        rec["fraction_of_limit"] = 0.0 if run.kind == "bulk" and limit else None
    return rec


LINK = "a-b"  # the link of Topology.pair
_LINK_FIELDS = (
    "rx_packets",
    "tx_packets",
    "drop_loss",
    "drop_burst",
    "drop_queue",
    "drop_send",
    "drop_kernel",
    "queue_hwm_bytes",
)


def _link_call(net: Any, method: str) -> Any:
    fn = getattr(net, method, None)
    if fn is None:
        return None
    try:
        return fn(LINK)
    except Exception:  # noqa: BLE001 -- counters are a diagnostic, never fail a run
        return None


def _link_stats(net: Any) -> dict[str, Any] | None:
    """The emulator's counters for this run, per direction (None if unavailable)."""
    st = _link_call(net, "link_stats")
    if not isinstance(st, dict) or not st.get("emulated"):
        return None
    return {d: {k: st[d][k] for k in _LINK_FIELDS if k in st.get(d, {})} for d in ("a->b", "b->a")}


def _fill(
    rec: dict[str, Any], cfg: BenchConfig, run: PlannedRun, client: _Endpoint, server: _Endpoint
) -> None:
    cres, sres = client.result or {}, server.result or {}
    for ep, role in ((client, "client"), (server, "server")):
        msg = ep.problem(role)
        if msg:
            rec["errors"].append(msg)
    rec["cpu_client_s"] = cres.get("cpu_s")
    rec["cpu_server_s"] = sres.get("cpu_s")
    if run.kind == "bulk":
        expected = _expected_digest(cfg.size, cfg.seed)
        got, digest = sres.get("bytes"), sres.get("sha256")
        rec["bytes"] = got
        rec["sha256"] = digest
        rec["sha256_expected"] = expected
        ok = got == cfg.size and digest == expected and bool(cres.get("ok"))
        if sres and (got != cfg.size or digest != expected):
            rec["errors"].append(
                f"DATA VERIFICATION FAILED: receiver got {got} bytes with SHA-256 "
                f"{str(digest)[:16]}..., sent {cfg.size} bytes with {expected[:16]}..."
            )
        rec["retrans_bytes"] = cres.get("retrans_bytes")
        rec["cpu_sender_s"], rec["cpu_receiver_s"] = rec["cpu_client_s"], rec["cpu_server_s"]
        t_start, t_last = cres.get("t_start"), sres.get("t_last")
        if ok and t_start is not None and t_last is not None and t_last > t_start:
            fct = t_last - t_start
            rec["fct_s"] = round(fct, 6)
            rec["goodput_mbps"] = metrics.goodput_mbps(cfg.size, fct)
            t_first = sres.get("t_first")
            if t_first is not None and t_last > t_first:
                rec["goodput_rx_mbps"] = metrics.goodput_mbps(cfg.size, t_last - t_first)
            if cres.get("t_connected") is not None:
                rec["handshake_s"] = round(cres["t_connected"] - t_start, 6)
            lim = rec["physical_limit_mbps"]
            rec["fraction_of_limit"] = rec["goodput_mbps"] / lim if lim else None
        elif ok:
            ok = False
            rec["errors"].append("no usable timestamps from the endpoints")
    else:
        lat = cres.get("latencies_ms") or []
        ok = (
            bool(cres.get("ok"))
            and bool(sres.get("ok"))
            and cres.get("responses") == cfg.rr_count
            and sres.get("requests") == cfg.rr_count
            and not cres.get("bad_responses")
            and not sres.get("bad_requests")
        )
        if cres.get("bad_responses") or sres.get("bad_requests"):
            rec["errors"].append(
                f"DATA VERIFICATION FAILED: {cres.get('bad_responses')} bad responses, "
                f"{sres.get('bad_requests')} bad requests"
            )
        rec["bytes"] = cres.get("bytes")
        rec["latencies_ms"] = lat
        rec["latency_ms"] = metrics.latency_summary(lat)
        if cres.get("t_end") is not None and cres.get("t_connected") is not None:
            rec["fct_s"] = round(cres["t_end"] - cres["t_connected"], 6)
        rb = (cres.get("retrans_bytes"), sres.get("retrans_bytes"))
        rec["retrans_bytes"] = None if None in rb else sum(rb)  # type: ignore[arg-type]
    for res, role in ((cres, "client"), (sres, "server")):
        for key in ("tcp_info", "vtl", "lost_packets", "cc"):
            if key in res:
                rec.setdefault("detail", {}).setdefault(role, {})[key] = res[key]
    rec["verified"] = ok
    rec["status"] = "ok" if ok else "failed"


# ------------------------------------------------------------------ the matrix


Callback = Callable[[PlannedRun, dict[str, Any]], None]


def run_matrix(
    cfg: BenchConfig,
    out: Path,
    *,
    on_start: Callable[[PlannedRun], None] | None = None,
    on_result: Callback | None = None,
    on_cell: Callable[[Cell], None] | None = None,
    runs: list[PlannedRun] | None = None,
) -> list[dict[str, Any]]:
    """Run everything, appending one JSON line per run to ``out`` (truncated first)."""
    runs = plan(cfg) if runs is None else runs
    out.parent.mkdir(parents=True, exist_ok=True)
    records: list[dict[str, Any]] = []
    with out.open("w") as f:
        for cell, cell_runs in _by_cell(runs):
            if on_cell:
                on_cell(cell)
            info = profile_info(cell.profile)
            try:
                with open_cell(cell) as net:
                    _prepare_hosts(net)
                    for run in cell_runs:
                        if on_start:
                            on_start(run)
                        rec = run_one(net, cfg, run, info)
                        records.append(rec)
                        f.write(json.dumps(rec, default=str) + "\n")
                        f.flush()
                        if on_result:
                            on_result(run, rec)
            except Exception as exc:  # the cell broke (topology?): its other runs failed
                done = {(r["repeat"], r["order"]) for r in records if _same_cell(r, cell)}
                for run in cell_runs:
                    if (run.repeat, run.order) in done:
                        continue
                    rec = _not_run(cfg, run, info, f"cell aborted: {type(exc).__name__}: {exc}")
                    records.append(rec)
                    f.write(json.dumps(rec, default=str) + "\n")
                    if on_result:
                        on_result(run, rec)
                f.flush()
    return records


def _prepare_hosts(net: Any) -> None:
    """Make runs independent: no TCP metrics (ssthresh, RTT) cached between
    connections of the same namespaces (a per-namespace sysctl)."""
    for host in net.hosts.values():
        host.run(["sysctl", "-qw", "net.ipv4.tcp_no_metrics_save=1"], check=False)


def _same_cell(rec: dict[str, Any], cell: Cell) -> bool:
    return (rec["profile"], rec["loss"], rec["bursty"]) == (cell.profile, cell.loss, cell.bursty)


def _by_cell(runs: list[PlannedRun]) -> Iterator[tuple[Cell, list[PlannedRun]]]:
    cells: dict[Cell, list[PlannedRun]] = {}
    for r in runs:
        cells.setdefault(r.cell, []).append(r)
    yield from cells.items()


def _not_run(cfg: BenchConfig, run: PlannedRun, info: ProfileInfo, error: str) -> dict[str, Any]:
    t = run.transport
    return {
        "schema": SCHEMA,
        "timestamp": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "transport": t.name,
        "label": t.label,
        **t.describe(),
        "profile": run.cell.profile,
        "loss": run.cell.loss,
        "bursty": run.cell.bursty,
        "workload": run.kind,
        "size": cfg.size if run.kind == "bulk" else None,
        "repeat": run.repeat,
        "order": run.order,
        "link_rate_mbps": info.rate_mbps,
        "rtt_ms": info.rtt_ms,
        "efficiency": t.efficiency(),
        "physical_limit_mbps": _limit(info, run.cell, t),
        "status": "failed",
        "verified": False,
        "goodput_mbps": 0.0 if run.kind == "bulk" else None,
        "errors": [error],
        "versions": versions(),
    }


def config_record(cfg: BenchConfig) -> dict[str, Any]:
    return asdict(cfg)
