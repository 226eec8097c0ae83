"""Turn result records (JSON lines) into a markdown table and PNG plots.

Per cell (workload, profile, loss, bursty, size) and transport:

* bulk: the median goodput over the repeats -- failed and timed-out runs
  count as 0, so a transport cannot look better by failing -- with the
  min..max range, the ratio to the reference transport's median in the same
  cell (:data:`vtl.bench.transports.REFERENCE`, tcp-cubic), the fraction of
  the physical limit, and medians of FCT, retransmitted bytes and CPU;
* request/response: latency percentiles over all round trips of the
  successful repeats pooled together, and ratios to the reference.

Only runs from the records given are compared: ratios are "in the same run".
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vtl.bench import metrics
from vtl.bench.transports import REFERENCE

CellKey = tuple[str, str, float, bool, int | None]  # workload, profile, loss, bursty, size


class ReportError(ValueError):
    pass


def load(path: str | Path) -> list[dict[str, Any]]:
    """Records of a results.jsonl file (blank lines skipped)."""
    out = []
    with Path(path).open() as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except ValueError as exc:
                raise ReportError(f"{path}:{n}: not JSON: {exc}") from exc
            if not isinstance(rec, dict) or "transport" not in rec or "workload" not in rec:
                raise ReportError(f"{path}:{n}: not a vtl bench record")
            out.append(rec)
    return out


@dataclass
class Summary:
    """One transport in one cell."""

    key: CellKey
    transport: str
    label: str
    runs: int = 0
    ok: int = 0
    timeouts: int = 0
    failures: int = 0
    goodputs: list[float] = field(default_factory=list)  # every run, failures as 0
    limit: float | None = None
    fct: float | None = None
    retrans_bytes: float | None = None
    cpu_client: float | None = None
    cpu_server: float | None = None
    latencies: list[float] = field(default_factory=list)  # pooled, successful runs
    ratio: float | None = None  # vs the reference: goodput (bulk) / p50 (rr)
    ratio_p99: float | None = None
    drops_loss: float | None = None  # emulator drops on the data direction, median
    drops_queue: float | None = None
    errors: list[str] = field(default_factory=list)

    @property
    def goodput(self) -> float | None:
        return metrics.median(self.goodputs)

    @property
    def fraction(self) -> float | None:
        g = self.goodput
        return None if g is None or not self.limit else g / self.limit

    def pct(self, q: float) -> float | None:
        return metrics.percentile(self.latencies, q)


def _key(rec: dict[str, Any]) -> CellKey:
    return (
        rec["workload"],
        rec["profile"],
        float(rec["loss"]),
        bool(rec.get("bursty")),
        rec.get("size") if rec["workload"] == "bulk" else None,
    )


def summarize(records: Iterable[dict[str, Any]], reference: str = REFERENCE) -> list[Summary]:
    """Per (cell, transport) summaries; transports in the order they first ran
    (the reference first)."""
    records = list(records)
    groups: dict[tuple[CellKey, str], list[dict[str, Any]]] = defaultdict(list)
    for rec in records:
        groups[(_key(rec), rec["transport"])].append(rec)
    out: list[Summary] = []
    for (key, transport), recs in groups.items():
        s = Summary(key=key, transport=transport, label=recs[0].get("label", transport))
        s.runs = len(recs)
        s.ok = sum(r.get("status") == "ok" for r in recs)
        s.timeouts = sum(r.get("status") == "timeout" for r in recs)
        s.failures = s.runs - s.ok - s.timeouts
        s.limit = metrics.median(r.get("physical_limit_mbps") for r in recs)
        good = [r for r in recs if r.get("status") == "ok"]
        if key[0] == "bulk":
            s.goodputs = [
                float(r.get("goodput_mbps") or 0.0) if r.get("status") == "ok" else 0.0
                for r in recs
            ]
        else:
            for r in good:
                s.latencies.extend(r.get("latencies_ms") or [])
        s.fct = metrics.median(r.get("fct_s") for r in good)
        s.retrans_bytes = metrics.median(r.get("retrans_bytes") for r in good)
        s.cpu_client = metrics.median(r.get("cpu_client_s") for r in good)
        s.cpu_server = metrics.median(r.get("cpu_server_s") for r in good)
        s.drops_loss = metrics.median(_drops(r, "loss") for r in good)
        s.drops_queue = metrics.median(_drops(r, "queue") for r in good)
        for r in recs:
            if r.get("status") != "ok":
                errs = "; ".join(r.get("errors") or []) or r.get("status", "?")
                s.errors.append(f"repeat {r.get('repeat')}: {r.get('status')}: {errs}")
        out.append(s)
    by_cell: dict[CellKey, dict[str, Summary]] = defaultdict(dict)
    for s in out:
        by_cell[s.key][s.transport] = s
    for cell in by_cell.values():
        ref = cell.get(reference)
        if ref is None:
            continue
        for s in cell.values():
            if s.key[0] == "bulk":
                s.ratio = metrics.ratio(s.goodput, ref.goodput)
            else:
                s.ratio = metrics.ratio(s.pct(50), ref.pct(50))
                s.ratio_p99 = metrics.ratio(s.pct(99), ref.pct(99))
    first_seen = {t: i for i, t in enumerate(dict.fromkeys(r["transport"] for r in records))}
    out.sort(
        key=lambda s: (
            _cell_sort(s.key),
            s.transport != reference,
            first_seen.get(s.transport, len(first_seen)),
        )
    )
    return out


def _drops(rec: dict[str, Any], kind: str) -> float | None:
    """Packets the emulator dropped on the data direction (a->b) during a run:
    ``loss`` (random and bursty loss) or ``queue`` (drop-tail overflow)."""
    st = (rec.get("link_stats") or {}).get("a->b")
    if not st:
        return None
    if kind == "loss":
        return st.get("drop_loss", 0) + st.get("drop_burst", 0)
    return st.get("drop_queue", 0)


def _cell_sort(key: CellKey) -> tuple[Any, ...]:
    workload, profile, loss, bursty, size = key
    return (workload != "bulk", _profile_rank(profile), profile, bursty, loss, size or 0)


def _profile_rank(p: str) -> int:
    order = ["net1", "net2", "net3", "fast", "cellular", "clean"]
    return order.index(p) if p in order else len(order)


# ------------------------------------------------------------------ markdown


def _f(x: float | None, digits: int = 2) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.0f}%"


def _loss(loss: float, bursty: bool) -> str:
    return f"{loss:g}%{' bursty' if bursty else ''}"


def _runs(s: Summary) -> str:
    txt = f"{s.ok}/{s.runs}"
    bad = []
    if s.failures:
        bad.append(f"{s.failures} FAILED")
    if s.timeouts:
        bad.append(f"{s.timeouts} timeout")
    return txt + (f" ({', '.join(bad)})" if bad else "")


def _kib(x: float | None) -> str:
    return "n/a" if x is None else f"{x / 1024:.0f}"


def markdown(records: list[dict[str, Any]], *, reference: str = REFERENCE) -> str:
    """The results as markdown: bulk table, overview pivot, latency table, failures."""
    sums = summarize(records, reference)
    lines: list[str] = ["# vtl bench results", ""]
    lines += _header(records)
    bulk = [s for s in sums if s.key[0] == "bulk"]
    rr = [s for s in sums if s.key[0] == "rr"]
    if bulk:
        sizes = sorted({s.key[4] or 0 for s in bulk})
        size_txt = ", ".join(f"{n / (1 << 20):g} MiB" for n in sizes)
        lines += [
            f"## Bulk transfer ({size_txt}): goodput of verified bytes",
            "",
            f"Median over repeats (a failed or timed-out run counts as 0), Mbit/s; "
            f"*vs {reference}*: ratio of medians in the same cell; *of limit*: median "
            "goodput / physical limit (link rate x (1 - loss) x payload efficiency); "
            "*drops*: packets the emulator dropped on the data direction during the run, "
            "by random/bursty loss and by queue overflow (median of the successful runs).",
            "",
            "| profile | loss | transport | goodput | min..max | vs "
            + reference
            + " | of limit | limit | FCT s | retrans KiB | drops loss/queue | CPU snd/rcv s "
            "| runs ok |",
            "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
        ]
        for s in bulk:
            _, profile, loss, bursty, _ = s.key
            gp = [g for g in s.goodputs]
            rng = f"{min(gp):.2f}..{max(gp):.2f}" if gp else "n/a"
            cpu = f"{_f(s.cpu_client, 3)}/{_f(s.cpu_server, 3)}"
            lines.append(
                f"| {profile} | {_loss(loss, bursty)} | {s.transport} | **{_f(s.goodput)}** | "
                f"{rng} | {_f(s.ratio)} | {_pct(s.fraction)} | {_f(s.limit)} | {_f(s.fct)} | "
                f"{_kib(s.retrans_bytes)} | {_f(s.drops_loss, 0)}/{_f(s.drops_queue, 0)} | "
                f"{cpu} | {_runs(s)} |"
            )
        lines += [""] + _pivot(bulk)
    if rr:
        s0 = next((r for r in records if r["workload"] == "rr" and r.get("rr")), None)
        desc = ""
        if s0:
            p = s0["rr"]
            desc = (
                f" ({p['count']} sequential round trips per run, requests of "
                f"{p['request_min']}..{p['request_max']} B, responses of {p['response']} B)"
            )
        lines += [
            f"## Request/response latency{desc}",
            "",
            "Per-message latency (request sent to whole response received), ms, over "
            "all round trips of the successful repeats pooled together.",
            "",
            f"| profile | loss | transport | p50 | p95 | p99 | max | p50 vs {reference} | "
            f"p99 vs {reference} | retrans KiB | CPU cli/srv s | runs ok |",
            "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
        ]
        for s in rr:
            _, profile, loss, bursty, _ = s.key
            mx = max(s.latencies) if s.latencies else None
            lines.append(
                f"| {profile} | {_loss(loss, bursty)} | {s.transport} | {_f(s.pct(50))} | "
                f"{_f(s.pct(95))} | {_f(s.pct(99))} | {_f(mx)} | {_f(s.ratio)} | "
                f"{_f(s.ratio_p99)} | {_kib(s.retrans_bytes)} | "
                f"{_f(s.cpu_client, 3)}/{_f(s.cpu_server, 3)} | {_runs(s)} |"
            )
        lines.append("")
    bad = [s for s in sums if s.errors]
    lines += ["## Failures", ""]
    if not bad:
        lines += ["None: every run delivered verified data within its time limit.", ""]
    else:
        for s in bad:
            wl, profile, loss, bursty, _ = s.key
            for e in s.errors:
                lines.append(f"- {wl} {profile} {_loss(loss, bursty)} {s.transport}, {e}")
        lines.append("")
    return "\n".join(lines)


def _header(records: list[dict[str, Any]]) -> list[str]:
    if not records:
        return ["No records.", ""]
    vers = records[0].get("versions") or {}
    stamps = sorted(r.get("timestamp", "") for r in records)
    n_ok = sum(r.get("status") == "ok" for r in records)
    n_to = sum(r.get("status") == "timeout" for r in records)
    n_fail = len(records) - n_ok - n_to
    repeats = len({r.get("repeat") for r in records})
    return [
        f"{len(records)} runs ({n_ok} ok, {n_fail} failed, {n_to} timed out), "
        f"{repeats} repeat(s), {stamps[0]} .. {stamps[-1]}. "
        f"vtl {vers.get('vtl')} (git {vers.get('vtl_git')}), Python {vers.get('python')}, "
        f"kernel {vers.get('kernel')}, aioquic {vers.get('aioquic')}.",
        "",
    ]


def _pivot(bulk: list[Summary]) -> list[str]:
    """Transports x cells: median goodput and fraction of the limit."""
    cols: list[CellKey] = []
    for s in bulk:
        if s.key not in cols:
            cols.append(s.key)
    rows: list[str] = []
    for s in bulk:
        if s.transport not in rows:
            rows.append(s.transport)
    table = {(s.transport, s.key): s for s in bulk}
    head = " | ".join(f"{k[1]} {_loss(k[2], k[3])}" for k in cols)
    out = [
        "Overview: median goodput in Mbit/s (fraction of the physical limit).",
        "",
        f"| transport | {head} |",
        "|---|" + "---:|" * len(cols),
    ]
    for t in rows:
        cells = []
        for k in cols:
            s = table.get((t, k))
            if s is None:
                cells.append("")
                continue
            txt = _f(s.goodput)
            if s.fraction is not None:
                txt += f" ({_pct(s.fraction)})"
            if s.failures or s.timeouts:
                txt += f" [{s.failures + s.timeouts} bad]"
            cells.append(txt)
        out.append(f"| {t} | " + " | ".join(cells) + " |")
    out.append("")
    return out


# ------------------------------------------------------------------ plots


def _colors(transports: list[str]) -> dict[str, Any]:
    import matplotlib

    cmap = matplotlib.colormaps["tab10"]
    return {t: cmap(i % 10) for i, t in enumerate(transports)}


def log_ticks(lo: float, hi: float, max_ticks: int = 8) -> list[float]:
    """Readable tick values for a log axis from lo to hi (> 0): the densest of
    1-1.5-2-...-8, 1-2-3-5-7, 1-2-5 or 1 x 10^k that gives at most `max_ticks`."""
    if lo <= 0 or hi <= 0:
        raise ValueError("log ticks need positive bounds")
    lo, hi = min(lo, hi), max(lo, hi)
    ticks: list[float] = []
    for mantissas in ((1, 1.5, 2, 2.5, 3, 4, 5, 6, 7, 8), (1, 2, 3, 5, 7), (1, 2, 5), (1,)):
        ticks = [
            round(m * 10.0**k, 12)
            for k in range(math.floor(math.log10(lo)) - 1, math.ceil(math.log10(hi)) + 1)
            for m in mantissas
            if lo * 0.9 <= m * 10.0**k <= hi * 1.1
        ]
        if len(ticks) <= max_ticks:
            break
    if len(ticks) < 2:  # a very narrow range: its ends
        ticks = [float(f"{lo:.2g}"), float(f"{hi:.2g}")]
    return ticks


def _legend_below(fig: Any, handles: list[Any], names: list[str]) -> None:
    """A legend under the panels, as many columns as fit, and room made for it
    (and for the figure's title)."""
    width_in, height_in = fig.get_size_inches()
    longest = max((len(n) for n in names), default=10)
    per_col = 0.6 + 0.075 * longest  # inches per legend column (small font)
    ncol = max(1, min(len(names), int(width_in // per_col)))
    rows = -(-len(names) // ncol)
    fig.legend(handles, names, loc="lower center", ncol=ncol, fontsize="small", frameon=False)
    fig.tight_layout(rect=(0, min(0.5, (0.12 + 0.2 * rows) / height_in), 1, 1 - 0.55 / height_in))


def plot_goodput(records: list[dict[str, Any]], path: Path, reference: str = REFERENCE) -> bool:
    """Grouped bars: one panel per profile, loss levels on the x axis, one bar
    per transport (median, whiskers min..max); a black tick marks each bar's
    physical limit, an x a cell with failed or timed-out runs."""
    bulk = [s for s in summarize(records, reference) if s.key[0] == "bulk"]
    if not bulk:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels: list[tuple[str, bool, int | None]] = []
    for s in bulk:
        p = (s.key[1], s.key[3], s.key[4])
        if p not in panels:
            panels.append(p)
    transports = list(dict.fromkeys(s.transport for s in bulk))
    labels = {s.transport: s.label for s in bulk}
    colors = _colors(transports)
    width_in = max(8.0, 4.2 * len(panels))
    fig, axes = plt.subplots(1, len(panels), figsize=(width_in, 4.6), squeeze=False)
    width = 0.8 / max(1, len(transports))
    for ax, (profile, bursty, size) in zip(axes[0], panels, strict=True):
        mine = [s for s in bulk if (s.key[1], s.key[3], s.key[4]) == (profile, bursty, size)]
        losses = sorted({s.key[2] for s in mine})
        for i, t in enumerate(transports):
            for j, loss in enumerate(losses):
                s = next((m for m in mine if m.transport == t and m.key[2] == loss), None)
                if s is None or s.goodput is None:
                    continue
                x = j - 0.4 + width * (i + 0.5)
                g = s.goodput
                ax.bar(x, g, width, color=colors[t], label=labels[t] if j == 0 else None)
                lo, hi = min(s.goodputs), max(s.goodputs)
                if hi > lo:
                    ax.errorbar(x, g, yerr=[[g - lo], [hi - g]], fmt="none", ecolor="0.2", lw=1)
                if s.limit:
                    ax.hlines(s.limit, x - width / 2, x + width / 2, colors="black", lw=1.5)
                if s.failures or s.timeouts:
                    ax.plot(x, max(g, 0) + 0.02 * (s.limit or g or 1), "x", color="red")
        ax.set_xticks(range(len(losses)), [f"{loss:g}%" for loss in losses])
        ax.set_xlabel("loss" + (" (bursty)" if bursty else ""))
        size_txt = f", {size / (1 << 20):g} MiB" if size else ""
        ax.set_title(f"{profile}{size_txt}")
        ax.set_ylabel("goodput (Mbit/s)")
        ax.grid(axis="y", alpha=0.3)
        ax.set_axisbelow(True)
    handles, names = axes[0][0].get_legend_handles_labels()
    _legend_below(fig, handles, names)
    fig.suptitle("Bulk goodput (median; black tick: physical limit)", y=1 - 0.12 / 4.6)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_latency_cdf(records: list[dict[str, Any]], path: Path, reference: str = REFERENCE) -> bool:
    """One panel per cell: the empirical CDF of per-message latency per transport."""
    rr = [s for s in summarize(records, reference) if s.key[0] == "rr" and s.latencies]
    if not rr:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    cells = list(dict.fromkeys(s.key for s in rr))
    transports = list(dict.fromkeys(s.transport for s in rr))
    colors = _colors(transports)
    ncol = min(3, len(cells))
    nrow = (len(cells) + ncol - 1) // ncol
    ncol = max(ncol, 2)
    fig, axes = plt.subplots(nrow, ncol, figsize=(4.6 * ncol, 3.6 * nrow + 0.8), squeeze=False)
    for ax in axes.flat[len(cells) :]:
        ax.set_visible(False)
    for ax, key in zip(axes.flat, cells, strict=False):
        for s in (s for s in rr if s.key == key):
            xs = sorted(s.latencies)
            ys = [(i + 1) / len(xs) for i in range(len(xs))]
            ax.step(xs, ys, where="post", color=colors[s.transport], label=s.label)
        ax.set_xscale("log")
        lo = min(min(s.latencies) for s in rr if s.key == key)
        hi = max(max(s.latencies) for s in rr if s.key == key)
        ax.xaxis.set_major_locator(FixedLocator(log_ticks(lo, hi)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_title(f"{key[1]} {_loss(key[2], key[3])}")
        ax.set_xlabel("latency (ms)")
        ax.set_ylabel("CDF")
        ax.grid(alpha=0.3)
    handles, names = axes.flat[0].get_legend_handles_labels()
    _legend_below(fig, handles, names)
    fig.suptitle("Request/response latency", y=1 - 0.12 / (3.6 * nrow + 0.8))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_report(
    records: list[dict[str, Any]], outdir: Path, *, reference: str = REFERENCE
) -> dict[str, Path]:
    """results.md, goodput.png and latency_cdf.png in ``outdir``."""
    outdir.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    md = outdir / "results.md"
    text = markdown(records, reference=reference)
    plots = []
    gp, lat = outdir / "goodput.png", outdir / "latency_cdf.png"
    if plot_goodput(records, gp, reference):
        written["goodput"] = gp
        plots.append(f"![goodput]({gp.name})")
    if plot_latency_cdf(records, lat, reference):
        written["latency_cdf"] = lat
        plots.append(f"![latency CDF]({lat.name})")
    if plots:
        text += "\n## Plots\n\n" + "\n\n".join(plots) + "\n"
    md.write_text(text)
    written["markdown"] = md
    return written
