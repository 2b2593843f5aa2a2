"""How ``handoff compare`` shows its results: rich tables, CSV, and a matplotlib chart.

The JSON (:meth:`handoff.compare.CompareResult.to_json`) holds everything; the table shows one
row per strategy, then (``--per-delegate``) one row per delegate, then the ops that kept each
backend from taking more of the model. Measured on several device keys (``--rpc``), the table,
the wide CSV and the chart keep one row per strategy with a column group (or a bar) per key.
"""

from __future__ import annotations

import csv
import math
import textwrap
from pathlib import Path
from typing import Any

from .compare import CELL_FIELDS, FAILED, NOT_RUNNABLE, OK, CompareResult, StrategyResult
from .errors import HandoffError
from .report import _size

OPS_SHOWN = 3
#: A cell's failure or "not runnable" reason in the per-key table is cut to this many characters
#: (the full line follows the table).
REASON_SHOWN = 40
#: One colour per backend in the chart, in first-seen order; the host's ATen ops are grey.
_PALETTE = ("#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B3", "#937860", "#DA8BC3", "#8C8C8C", "#CCB974")
_HOST_COLOUR = "#BBBBBB"


def render(result: CompareResult, console: Any) -> None:
    """Print the comparison as rich tables on ``console``. Names and reasons are escaped: a
    strategy's options are written in brackets (``coreml[precision=fp32]``), which rich would
    take for markup and drop."""
    from rich.markup import escape

    groups = f" (in {result.worker_groups} groups of workers)" if result.worker_groups > 1 else ""
    where = ""
    if result.devices:
        where = " on devices " + ", ".join(f"{k} ({d['target']})" for k, d in result.devices.items()) + \
            f" via the RPC tracker {result.rpc}"
    strategies = len(dict.fromkeys(r.strategy.name for r in result.strategies))
    if len(result.devices) > 1:
        table = _key_table(result)
    else:
        table = _row_table(result)
    table.title = f"Compare {result.model}: {strategies} strategies{where}, {result.runs} runs each " \
                  f"in {result.rounds} interleaved rounds{groups}, inputs seed {result.inputs_seed}"
    console.print(table)
    console.print("lowering: this run's time, with the compilers' original time in parentheses when the cache "
                  "supplied blobs; deleg./cross.: delegates and values crossing a step boundary per run")
    for r in result.strategies:
        if r.status == NOT_RUNNABLE:
            console.print(f"[yellow]{escape(r.label)}[/]: lowered, {r.status_text} ({escape(r.reason)})")
        elif r.status == FAILED:
            console.print(f"[red]{escape(r.label)}[/]: {escape(r.reason)}")
        for move in r.moves:
            console.print(f"[yellow]{escape(r.label)}[/]: moved {len(move['nodes'])} node(s) of {move['partition']} "
                          f"off {move['backend']}: {escape(move['reason'])}")
    if result.per_delegate:
        render_delegates([(r.strategy.name, r.per_delegate) for r in result.strategies if r.per_delegate],
                         result.tolerance, console)
    _render_blockers(result, console)


def _row_table(result: CompareResult) -> Any:
    """One row per strategy (and per device key, with one key)."""
    from rich.markup import escape
    from rich.table import Table

    table = Table(title_justify="left")
    keyed = bool(result.devices)
    columns = (("strategy", "left"), *((("device", "left"),) if keyed else ()), ("coverage", "left"), ("deleg.", "right"), ("cross.", "right"),
               ("lowering", "right"), ("size", "right"), ("load", "right"), ("first", "right"), ("p50", "right"),
               ("p90", "right"), ("max abs err", "right"), ("SNR dB", "right"), ("pareto", "center"))
    for col, just in columns:
        table.add_column(col, justify=just, no_wrap=col not in ("strategy", "coverage"))  # type: ignore[arg-type]
    for r in result.strategies:
        first = (escape(r.strategy.name), r.key or "") if keyed else (escape(r.strategy.name),)
        if r.status == FAILED and not r.chain:
            table.add_row(*first, "[red]failed to lower[/]", *["-"] * (len(columns) - len(first) - 1))
            continue
        measured = r.status == OK and r.samples_ms
        lowering = f"{r.lower_seconds:.1f}s" + (f" ({r.compile_seconds:.1f}s)" if r.cached_partitions else "")
        table.add_row(
            *first, _coverage_text(r), str(sum(r.delegates.values())), str(r.crossings), lowering,
            _size(r.program_bytes),
            _ms(r.load_ms), _ms(r.first_run_ms), _ms(r.p50_ms) if measured else _status(r), _ms(r.p90_ms),
            err_text(r.max_abs_error), snr_text(r.snr_db), "★" if r.pareto else "")
    return table


def _key_table(result: CompareResult) -> Any:
    """One row per strategy; the lowering figures once, then a column group per device key: p50
    (★ on that key's Pareto front) and max abs error, or the cell's status and shortened reason."""
    from rich.markup import escape
    from rich.table import Table

    keys = list(result.devices)
    table = Table(title_justify="left")
    for col, just in (("strategy", "left"), ("coverage", "left"), ("deleg.", "right"), ("lowering", "right")):
        table.add_column(col, justify=just, no_wrap=col not in ("strategy", "coverage"))  # type: ignore[arg-type]
    for key in keys:
        table.add_column(f"{key}\np50 ms", justify="right", no_wrap=True)
        table.add_column(f"{key}\nmax abs err", justify="right", no_wrap=True)
    for name, cells in result.by_key().items():
        first = next(iter(cells.values()))
        name = escape(name)
        if first.status == FAILED and not first.chain:
            table.add_row(name, "[red]failed to lower[/]", "-", "-",
                          *(t for _ in keys for t in ("-", escape(textwrap.shorten(first.reason, REASON_SHOWN, placeholder="…")))))
            continue
        lowering = f"{first.lower_seconds:.1f}s" + (f" ({first.compile_seconds:.1f}s)" if first.cached_partitions else "")
        row = [name, _coverage_text(first), str(sum(first.delegates.values())), lowering]
        for key in keys:
            r = cells.get(key)
            if r is None:
                row += ["-", "-"]
            elif r.status == OK and r.samples_ms:
                row += [_ms(r.p50_ms) + (" ★" if r.pareto else ""), err_text(r.max_abs_error)]
            else:
                colour = "yellow" if r.status == NOT_RUNNABLE else "red"
                row += [f"[{colour}]{'not runnable' if r.status == NOT_RUNNABLE else r.status}[/]",
                        f"[{colour}]{escape(textwrap.shorten(r.reason, REASON_SHOWN, placeholder='…'))}[/]"]
        table.add_row(*row)
    return table


def render_delegates(groups: list[tuple[str, list[dict[str, Any]]]], tolerance: float, console: Any,
                     what: str = "strategy") -> None:
    """The per-delegate table: ``groups`` of (strategy or program name, rows of
    :func:`handoff.numerics.run_case`)."""
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=f"Per delegate: each delegate against eager PyTorch on the same boundary inputs "
                        f"(mismatch: relative error over {tolerance:g})", title_justify="left")
    for col, just in ((what, "left"), ("#", "right"), ("backend", "left"), ("partition", "left"),
                      ("nodes", "right"), ("ops", "left"), ("max abs err", "right"), ("rel. err", "right"),
                      ("SNR dB", "right"), ("", "left")):
        table.add_column(col, justify=just)  # type: ignore[arg-type]
    for name, rows in groups:
        name = escape(name)
        for row in rows:
            ops = ", ".join(f"{_short_op(op)}×{n}" for op, n in list(row["ops"].items())[:OPS_SHOWN])
            if len(row["ops"]) > OPS_SHOWN:
                ops += f", +{len(row['ops']) - OPS_SHOWN} more"
            if "skipped" in row:
                table.add_row(name, str(row["delegate"]), row["backend"], row["partition"],
                              str(row["nodes"]), ops, "-", "-", "-", f"[yellow]skipped: {escape(row['skipped'])}[/]")
                continue
            flag = "[red]MISMATCH[/]" if row.get("mismatch") else ""
            if row.get("worst") and len(rows) > 1:
                flag = (flag + " " if flag else "") + "◀ largest"
            table.add_row(name, str(row["delegate"]), row["backend"], row["partition"], str(row["nodes"]),
                          ops, err_text(row["max_abs_error"]), err_text(row["relative_error"]), snr_text(row["snr_db"]), flag)
    console.print(table)


def _render_blockers(result: CompareResult, console: Any) -> None:
    """The ops each strategy's first backend declined (once per backend and op)."""
    from rich.markup import escape
    from rich.table import Table

    rows: dict[tuple[str, str], dict[str, Any]] = {}
    for r in result.strategies:
        if not r.chain:
            continue
        for op, d in r.declined.items():
            rows.setdefault((r.chain[0], op), d)
    if not rows:
        return
    table = Table(title="What kept each backend from more of the model (ops it declined, when first in the list)",
                  title_justify="left")
    for col in ("backend", "op", "nodes", "ran on", "reason"):
        table.add_column(col)
    for (backend, op), d in sorted(rows.items(), key=lambda kv: (kv[0][0], -kv[1]["count"])):
        ran_on = ", ".join(f"{b} {n}" for b, n in d["ran_on"].items())
        table.add_row(backend, op, str(d["count"]), ran_on, escape(d["reason"]))
    console.print(table)


def write_csv(result: CompareResult, out: Any, layout: str | None = None) -> None:
    """The results as CSV to ``out`` (a text file opened with ``newline=""``); coverage and
    delegates get one column per backend. ``layout``: ``long``, one row per strategy (and device
    key, with a ``key`` column); ``wide``, one row per strategy with ``KEY:p50_ms``-style columns per
    device key (the :data:`~handoff.compare.CELL_FIELDS`). Default: wide when measured on several
    keys, else long."""
    if layout is None:
        layout = "wide" if len(result.devices) > 1 else "long"
    if layout not in ("wide", "long"):
        raise HandoffError(f"unknown CSV layout {layout!r}; valid: wide, long")
    if layout == "wide":
        if not result.devices:
            raise HandoffError("--csv-layout wide needs --rpc HOST:PORT --key K1,K2 (a column group per device "
                               "key); a local compare writes one row per strategy")
        _write_wide_csv(result, out)
    else:
        _write_long_csv(result, out)


def _write_wide_csv(result: CompareResult, out: Any) -> None:
    keys = list(result.devices)
    matrix = result.by_key()
    cells_json = result.to_json()["by_key"]
    backends = list(dict.fromkeys(b for r in result.strategies for b in [*r.chain, *r.coverage]))
    fields = ["strategy", "spec", *[f"coverage_{b}" for b in backends], *[f"delegates_{b}" for b in backends],
              "crossings", "lower_seconds", *[f"{k}:{f}" for k in keys for f in CELL_FIELDS]]
    writer = csv.DictWriter(out, fieldnames=fields)
    writer.writeheader()
    for name, cells in matrix.items():
        first = next(iter(cells.values()))
        writer.writerow({
            "strategy": name, "spec": first.strategy.spec,
            **{f"coverage_{b}": round(first.coverage.get(b, 0.0), 2) for b in backends},
            **{f"delegates_{b}": first.delegates.get(b, 0) for b in backends},
            "crossings": first.crossings, "lower_seconds": round(first.lower_seconds, 3),
            **{f"{k}:{f}": v for k, cell in cells_json[name].items() for f, v in cell.items()}})


def _write_long_csv(result: CompareResult, out: Any) -> None:
    backends = list(dict.fromkeys(b for r in result.strategies for b in [*r.chain, *r.coverage]))
    fields = ["strategy", "spec", "key", "status", "reason", *[f"coverage_{b}" for b in backends],
              *[f"delegates_{b}" for b in backends], "crossings", "lower_seconds", "compile_seconds",
              "cached_partitions", "program_bytes", "load_ms", "first_run_ms", "p50_ms", "p90_ms", "runs",
              "max_abs_error", "snr_db", "pareto", "worst_delegate", "worst_delegate_relative_error"]
    writer = csv.DictWriter(out, fieldnames=fields)
    writer.writeheader()
    for r in result.strategies:
        j = r.to_json()
        worst = next((d for d in r.per_delegate if d.get("worst")), None)
        writer.writerow({
            "strategy": r.strategy.name, "spec": r.strategy.spec, "key": r.key or "", "status": r.status_text,
            "reason": r.reason,
            **{f"coverage_{b}": round(r.coverage.get(b, 0.0), 2) for b in backends},
            **{f"delegates_{b}": r.delegates.get(b, 0) for b in backends},
            **{k: j[k] for k in ("crossings", "lower_seconds", "compile_seconds", "cached_partitions",
                                 "program_bytes", "load_ms", "first_run_ms", "p50_ms", "p90_ms", "runs",
                                 "max_abs_error", "snr_db", "pareto")},
            "worst_delegate": f"{worst['delegate']} {worst['backend']} {worst['partition']}" if worst else "",
            "worst_delegate_relative_error": worst["relative_error"] if worst else ""})


def plot(result: CompareResult, path: str | Path) -> None:
    """Latency bars (p50, whisker to p90), coverage stacked by backend, and for ``auto`` the
    Pareto scatter (latency against error, marker area by program size), as one PNG. Measured on
    several device keys: one band per strategy with a bar per key, coloured by key (legend)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise HandoffError("--plot needs matplotlib; install with: pip install 'handoff[bench]'") from None

    by_key = len(result.devices) > 1
    # with several keys, one band per strategy: its lowering figures (coverage) from its first row
    rs = [next(iter(cells.values())) for cells in result.by_key().values()] if by_key else result.strategies
    names = [r.strategy.name for r in rs] if by_key else [r.label for r in rs]
    panels = 3 if result.auto else 2
    height = max(3.0, 0.32 * len(rs) * (len(result.devices) if by_key else 1) + 1.5)
    fig = Figure(figsize=(6.0 * panels, height), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, panels, sharey=False)
    ys = list(range(len(rs)))[::-1]

    lat = axes[0]
    if by_key:
        _latency_by_key(lat, result, ys)
    else:
        for y, r in zip(ys, rs):
            if r.status == OK and r.samples_ms:
                _bar(lat, y, r, "#4C72B0" if not r.pareto else "#C44E52")
            else:
                _no_bar(lat, y, r)
    lat.set_yticks(ys, names, fontsize=8)
    lat.set_xlabel("latency, ms (bar: p50, whisker: p90)")
    pareto = " (black edge: on the key's Pareto front)" if by_key else " (red: on the Pareto front)"
    lat.set_title(f"{result.model}: latency" + (pareto if any(r.pareto for r in result.strategies) else ""))
    lat.grid(axis="x", alpha=0.3)

    cov = axes[1]
    colours = _colours(rs)
    left = [0.0] * len(rs)
    for backend, colour in colours.items():
        widths = [r.coverage.get(backend, 0.0) for r in rs]
        if any(widths):
            cov.barh(ys, widths, left=left, color=colour, label="aten (host)" if backend == "aten" else backend)
            left = [a + b for a, b in zip(left, widths)]
    cov.set_yticks(ys, [""] * len(rs))  # the latency panel names them
    cov.set_xlim(0, 100)
    cov.set_xlabel("coverage, % of graph nodes")
    cov.set_title("coverage by backend")
    cov.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.12 * 6 / max(height, 6)), ncol=4, frameon=False)

    if result.auto:
        _pareto_panel(axes[2], result.strategies)
    fig.savefig(str(path), dpi=110)


def _bar(ax: Any, y: float, r: StrategyResult, colour: str, height: float = 0.8, **kw: Any) -> None:
    ax.barh(y, r.p50_ms, height=height, color=colour, **kw)
    ax.errorbar(r.p50_ms, y, xerr=[[0], [r.p90_ms - r.p50_ms]], fmt="none", ecolor="black", capsize=3, lw=1)


def _no_bar(ax: Any, y: float, r: StrategyResult, prefix: str = "") -> None:
    label = f"lowered, {r.status_text}" if r.status == NOT_RUNNABLE else "failed"
    ax.text(0, y, f" {prefix}{label}", va="center", fontsize=8, color="#A05000" if r.status == NOT_RUNNABLE else "red")


def _latency_by_key(ax: Any, result: CompareResult, ys: list[int]) -> None:
    """One bar per device key within each strategy's band, a colour per key, named in the legend."""
    from matplotlib.patches import Patch

    keys = list(result.devices)
    band = 0.8 / len(keys)
    colours = {k: _PALETTE[i % len(_PALETTE)] for i, k in enumerate(keys)}
    for y, cells in zip(ys, result.by_key().values()):
        for i, key in enumerate(keys):
            r = cells.get(key)
            at = y + 0.4 - band * (i + 0.5)  # the first key on top
            if r is None:
                continue
            if r.status == OK and r.samples_ms:
                _bar(ax, at, r, colours[key], band, edgecolor="black" if r.pareto else "none")
            else:
                _no_bar(ax, at, r, f"{key}: ")
    ax.legend([Patch(color=c) for c in colours.values()], keys, title="device key", fontsize=8, title_fontsize=8)


def _pareto_panel(ax: Any, rs: list[StrategyResult]) -> None:
    measured = [r for r in rs if r.status == OK and r.samples_ms and r.max_abs_error is not None]
    floor = min([r.max_abs_error for r in measured if r.max_abs_error > 0] or [1e-9]) / 10
    biggest = max([r.program_bytes for r in measured] or [1])
    for r in measured:
        err = r.max_abs_error if r.max_abs_error > 0 else floor
        ax.scatter(r.p50_ms, err, s=30 + 300 * r.program_bytes / biggest, alpha=0.7,
                   color="#C44E52" if r.pareto else "#8C8C8C", edgecolors="black", linewidths=0.5)
        if r.pareto:
            ax.annotate(r.label, (r.p50_ms, err), fontsize=7, xytext=(4, 4), textcoords="offset points")
    front = sorted((r for r in measured if r.pareto), key=lambda r: r.p50_ms)
    if len(front) > 1:
        ax.plot([r.p50_ms for r in front], [r.max_abs_error or floor for r in front], color="#C44E52", lw=0.8, ls="--")
    ax.set_yscale("log")
    ax.set_xlabel("latency p50, ms")
    ax.set_ylabel("max abs error vs eager (0 drawn at the floor)")
    ax.set_title("Pareto front (red; marker area: program size)")
    ax.grid(alpha=0.3)


def _colours(rs: list[StrategyResult]) -> dict[str, str]:
    order = list(dict.fromkeys(b for r in rs for b in [*r.chain, *r.coverage] if b != "aten"))
    colours = {b: _PALETTE[i % len(_PALETTE)] for i, b in enumerate(order)}
    colours["aten"] = _HOST_COLOUR
    return colours


def _coverage_text(r: StrategyResult) -> str:
    order = [b for b in [*r.chain, "aten"] if r.coverage.get(b)]
    return " ".join(f"{'aten' if b == 'aten' else b} {r.coverage[b]:.0f}%" for b in order)


def _status(r: StrategyResult) -> str:
    return "[yellow]not runnable[/]" if r.status == NOT_RUNNABLE else "[red]failed[/]" if r.status == FAILED else "-"


def _ms(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:.3f}" if x < 1 else f"{x:.2f}" if x < 100 else f"{x:.0f}"


def err_text(x: float | None) -> str:
    if x is None:
        return "-"
    if math.isinf(x):
        return "inf"
    return "0" if x == 0 else f"{x:.2e}"


def snr_text(x: float | None) -> str:
    if x is None:
        return "-"
    if math.isinf(x):
        return "exact" if x > 0 else "-inf"
    return f"{x:.1f}"


def _short_op(op: str) -> str:
    return op.split(".")[1] if op.startswith("aten.") and op.count(".") >= 2 else op


__all__ = ["render", "render_delegates", "write_csv", "plot"]
