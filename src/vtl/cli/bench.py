"""``vtl bench``: compare VTL with kernel TCP and QUIC on emulated networks.

``vtl bench run`` runs the matrix and writes DIR/results.jsonl (one record per
run), DIR/results.md and DIR/*.png; ``vtl bench report FILE`` rebuilds the
table and plots from a results file. See docs/bench.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from vtl.bench.common import format_size, parse_size


def add_parser(sub: Any) -> None:
    p = sub.add_parser("bench", help="benchmark VTL against kernel TCP and QUIC")
    bsub = p.add_subparsers(dest="bench_command", metavar="SUBCOMMAND")
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])

    r = bsub.add_parser("run", help="run the benchmark matrix (root: uses network namespaces)")
    r.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: net3, loss 0,2, 1 MiB, 1 repeat, tcp-cubic + quic + one "
        "VTL composition, 20 round trips (options given explicitly still win)",
    )
    r.add_argument("--profiles", help="comma-separated profiles (default net1,net2,net3,clean)")
    r.add_argument("--loss", help="comma-separated loss percentages (default 0,2,5)")
    r.add_argument("--bursty", action="store_true", help="bursty (Gilbert-Elliott) loss")
    r.add_argument(
        "--transports",
        help="comma-separated: tcp-cubic, tcp-bbr, quic, quic-cubic, "
        "'vtl:<composition>' (default: tcp-cubic, tcp-bbr, quic and the "
        "reliable VTL compositions)",
    )
    r.add_argument("--size", type=parse_size, help="bulk transfer size (default 8MiB)")
    r.add_argument("--repeats", type=int, help="repeats per cell (default 3)")
    r.add_argument("--workloads", help="comma-separated: bulk, rr (default both)")
    r.add_argument("--rr-count", type=int, help="request/response round trips (default 100)")
    r.add_argument("--rr-request", help="request size range MIN-MAX bytes (default 64-1024)")
    r.add_argument("--rr-response", type=parse_size, help="response size (default 1024)")
    r.add_argument(
        "--timeout",
        type=float,
        help="fixed time limit per run in s (default: 20 x the time at the "
        "physical limit, at least 60 s)",
    )
    r.add_argument("--timeout-factor", type=float, help="scale of the default time limit")
    r.add_argument("--seed", type=int, help="payload seed (default 1)")
    r.add_argument(
        "--strict",
        action="store_true",
        help="a timed-out run also makes the exit status non-zero (--quick sets it)",
    )
    r.add_argument("--out", default="bench-results", help="output directory")
    r.add_argument(
        "--dry-run", action="store_true", help="print the plan and the time estimate, run nothing"
    )
    r.set_defaults(func=run_cmd)

    rep = bsub.add_parser("report", help="rebuild the table and plots from results.jsonl")
    rep.add_argument("results", help="a results.jsonl written by 'vtl bench run'")
    rep.add_argument("--out", help="output directory (default: the file's directory)")
    rep.add_argument("--reference", default=None, help="transport for ratios (default tcp-cubic)")
    rep.set_defaults(func=report_cmd)


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def _names(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def config_from_args(args: argparse.Namespace) -> Any:
    from vtl.bench.runner import BenchConfig
    from vtl.bench.transports import split_list

    over: dict[str, Any] = {}
    if args.profiles:
        over["profiles"] = _names(args.profiles)
    if args.loss:
        over["losses"] = _floats(args.loss)
    if args.bursty:
        over["bursty"] = True
    if args.transports:
        over["transports"] = split_list(args.transports)
    if args.size is not None:
        over["size"] = args.size
    if args.repeats is not None:
        over["repeats"] = args.repeats
    if args.workloads:
        over["workloads"] = _names(args.workloads)
    if args.rr_count is not None:
        over["rr_count"] = args.rr_count
    if args.rr_request:
        lo, _, hi = args.rr_request.partition("-")
        over["rr_request_min"], over["rr_request_max"] = int(lo), int(hi or lo)
    if args.rr_response is not None:
        over["rr_response"] = args.rr_response
    if args.timeout is not None:
        over["timeout"] = args.timeout
    if args.timeout_factor is not None:
        over["timeout_factor"] = args.timeout_factor
    if args.seed is not None:
        over["seed"] = args.seed
    if args.strict:
        over["strict"] = True
    cfg = BenchConfig.quick(**over) if args.quick else BenchConfig(**over)
    if cfg.repeats < 1:
        raise ValueError("--repeats must be at least 1")
    if cfg.size < 1:
        raise ValueError("--size must be positive")
    if not 0 < cfg.rr_request_min <= cfg.rr_request_max:
        raise ValueError("--rr-request must be MIN-MAX with 0 < MIN <= MAX")
    for loss in cfg.losses:
        if not 0 <= loss < 100:
            raise ValueError(f"loss {loss} is not a percentage below 100")
    return cfg


def _minutes(s: float) -> str:
    if s < 90:
        return f"{s:.0f} s"
    if s < 5400:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.1f} h"


def run_cmd(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from vtl.bench import report, runner
    from vtl.bench.transports import TransportError

    console = Console(stderr=True, highlight=False, soft_wrap=True)
    try:
        cfg = config_from_args(args)
        runs = runner.plan(cfg)
    except (ValueError, TransportError, KeyError) as exc:
        console.print(f"[red]error:[/] {exc}")
        return 2
    if os.geteuid() != 0 and not args.dry_run:
        console.print("[red]error:[/] vtl bench needs root (it creates network namespaces)")
        return 2
    expected, worst = runner.estimate_seconds(runs)
    transports = list(dict.fromkeys(r.transport.name for r in runs))
    cells = list(dict.fromkeys(r.cell for r in runs))
    console.print(
        f"vtl bench: {len(runs)} runs = {len(cells)} cells x {len(transports)} transports x "
        f"{len(cfg.workloads)} workloads x {cfg.repeats} repeats; bulk {format_size(cfg.size)}, "
        f"{cfg.rr_count} round trips"
    )
    console.print(f"  cells: {', '.join(c.label for c in cells)}")
    console.print(f"  transports: {', '.join(transports)}")
    console.print(
        f"  estimated time: ~{_minutes(expected)} (rough; up to {_minutes(worst)} if every "
        f"run hit its time limit)"
    )
    if args.dry_run:
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "run.json").write_text(
        json.dumps(
            {
                "command": shlex.join(["vtl", *sys.argv[1:]]) if sys.argv else None,
                "config": runner.config_record(cfg),
                "versions": runner.versions(),
                "estimate_s": round(expected),
            },
            indent=2,
        )
        + "\n"
    )
    started = time.monotonic()
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=console,
        transient=True,
        disable=not console.is_terminal,
    )
    # the bar advances by each run's estimated duration, so its ETA weighs runs right
    weight = {id(r): r.estimate for r in runs}
    total_weight = sum(weight.values())
    with progress:
        task = progress.add_task("starting", total=len(runs))
        done_weight = 0.0

        def on_start(run: Any) -> None:
            progress.update(
                task,
                description=f"{run.cell.label} {run.kind} {run.transport.label} #{run.repeat + 1}",
            )

        def on_result(run: Any, rec: dict[str, Any]) -> None:
            nonlocal done_weight
            done_weight += weight.get(id(run), 0.0)
            progress.update(task, advance=1)
            console.print(_run_line(rec))

        def on_cell(cell: Any) -> None:
            elapsed = time.monotonic() - started
            if done_weight > 0:
                left = elapsed * (total_weight - done_weight) / done_weight
                console.print(f"[dim]-- {cell.label} (about {_minutes(left)} left)[/]")
            else:
                console.print(f"[dim]-- {cell.label}[/]")

        interrupted = False
        try:
            records = runner.run_matrix(
                cfg, out / "results.jsonl", on_start=on_start, on_result=on_result,
                on_cell=on_cell, runs=runs,
            )  # fmt: skip
        except KeyboardInterrupt:
            interrupted = True
            records = report.load(out / "results.jsonl")
    if interrupted:
        console.print(f"[yellow]interrupted[/] after {len(records)} of {len(runs)} runs")
        if not records:
            return 130
    written = report.write_report(records, out)
    elapsed = time.monotonic() - started
    n_fail = sum(r["status"] == "failed" for r in records)
    n_to = sum(r["status"] == "timeout" for r in records)
    console.print(
        f"{len(records)} runs in {_minutes(elapsed)}: {len(records) - n_fail - n_to} ok, "
        f"{n_fail} failed, {n_to} timed out"
    )
    for path in [out / "results.jsonl", *written.values()]:
        console.print(f"  wrote {path}")
    if interrupted:
        return 130
    if n_fail:
        console.print(
            f"[bold red]{n_fail} run(s) FAILED[/] (data not verified or a runner "
            f"crashed): see the Failures section of {written['markdown']}"
        )
        return 1
    if n_to and cfg.strict:
        console.print(f"[bold red]{n_to} run(s) timed out[/] (--strict)")
        return 1
    return 0


def _run_line(rec: dict[str, Any]) -> str:
    head = (
        f"{rec['profile']} {rec['loss']:g}%{' bursty' if rec.get('bursty') else ''} "
        f"{rec['workload']:4} {rec.get('label', rec['transport']):32} #{rec['repeat'] + 1}: "
    )
    if rec["status"] != "ok":
        err = "; ".join(rec.get("errors") or [])
        colour = "red" if rec["status"] == "failed" else "yellow"
        return f"{head}[bold {colour}]{rec['status'].upper()}[/] {err}"
    if rec["workload"] == "bulk":
        frac = rec.get("fraction_of_limit")
        frac_txt = f" ({100 * frac:.0f}% of limit)" if frac is not None else ""
        rt = rec.get("retrans_bytes")
        rt_txt = f", retrans {rt / 1024:.0f} KiB" if rt is not None else ""
        return f"{head}{rec['goodput_mbps']:.2f} Mbit/s{frac_txt}, FCT {rec['fct_s']:.2f} s{rt_txt}"
    lat = rec.get("latency_ms") or {}
    return (
        f"{head}p50 {lat.get('p50', 0):.1f} ms, p95 {lat.get('p95', 0):.1f} ms, "
        f"p99 {lat.get('p99', 0):.1f} ms"
    )


def report_cmd(args: argparse.Namespace) -> int:
    from vtl.bench import report
    from vtl.bench.transports import REFERENCE

    path = Path(args.results)
    try:
        records = report.load(path)
    except (OSError, report.ReportError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else path.parent
    written = report.write_report(records, out, reference=args.reference or REFERENCE)
    for p in written.values():
        print(f"wrote {p}", file=sys.stderr)
    print(written["markdown"].read_text())
    failed = sum(r.get("status") == "failed" for r in records)
    return 1 if failed else 0
