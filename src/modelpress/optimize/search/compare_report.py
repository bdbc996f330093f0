"""The HTML report of ``modelpress compare``: quality against cost with the Pareto front, latency, the table.

Self-contained like the tune report (:mod:`modelpress.optimize.search.report`, whose PNG helper and
style it shares): plots embedded as base64 PNGs, and written beside it as ``quality-cost.png`` and
``latency.png``.
"""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Any

from modelpress.optimize.search.report import _fig_bytes, _fmt, latency_bars


def _short(label: str) -> str:
    """A plot label: a folder's last part (the table has the whole path), at most 40 characters."""
    name = Path(label).name if "/" in label else label
    return name if len(name) <= 40 else name[:37] + "..."


def _x(entry: Any, priced: bool) -> float | None:
    """The plot's cost axis: USD per million requests, or, without a price, milliseconds of machine time per item."""
    if priced:
        return entry.cost_per_million
    return 1000.0 / entry.throughput if entry.throughput else None


def quality_cost_plot(result: Any) -> bytes:
    """Quality against cost per million requests; the Pareto front joined, the recommendation circled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    priced = result.price is not None
    xs: dict[int, float] = {}
    for e in result.entries:
        x = _x(e, priced)
        if e.quality is not None and x is not None:
            xs[id(e)] = x
    pts = [e for e in result.entries if id(e) in xs]
    fig, ax = plt.subplots(figsize=(8.5, 5.2))
    for e in pts:
        color = "#2a9d8f" if e.meets else "#e76f51"
        ax.scatter(xs[id(e)], e.quality, s=70 if e.on_front else 40, c=color, edgecolors="black" if e.on_front else "none", zorder=3)
        ax.annotate(_short(e.label), (xs[id(e)], e.quality), fontsize=8, xytext=(4, 3), textcoords="offset points")
    front = sorted([e for e in pts if e.on_front], key=lambda e: xs[id(e)])
    if front:
        ax.plot([xs[id(e)] for e in front], [e.quality for e in front], "--", color="black", lw=1, zorder=2, label="Pareto front")
    best = result.recommended
    if best is not None and id(best) in xs:
        ax.scatter(xs[id(best)], best.quality, s=260, facecolors="none", edgecolors="#264653", lw=2, zorder=4, label="recommended")
    ax.scatter([], [], c="#2a9d8f", label="meets the goal")
    ax.scatter([], [], c="#e76f51", label="misses the goal")
    if priced:
        where = result.price.instance or "--price-per-hour"
        ax.set_xlabel(f"cost per million requests (USD, at ${result.price.usd_per_hour:g}/h: {where}; {result.settings['shape']})")
    else:
        ax.set_xlabel(f"machine time per item (ms, 1 / throughput at {result.settings['shape']}; no price given)")
    ax.set_ylabel(f"{result.metric} ({'higher' if result.higher_is_better else 'lower'} is better)")
    ax.set_title(f"{result.task}: quality vs cost on {result.dataset}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    data = _fig_bytes(fig)
    plt.close(fig)
    return data


def latency_plot(result: Any) -> bytes:
    """p50 and p99 latency at batch 1 of every model."""
    rows = [(_short(e.label), e.p50_ms, e.p99_ms) for e in result.entries if e.p50_ms]
    return latency_bars(rows, goal_ms=result.goal.max_p99_ms)


def _speedup(e: Any) -> str:
    if e.speedup is None:
        return ""
    lo, hi = e.speedup_range or (e.speedup, e.speedup)
    return f"{e.speedup:.2f}x ({lo:.2f}-{hi:.2f})"


def _mb(n: int | None) -> str:
    return "" if n is None else f"{n / 2**20:.1f}"


def compare_report(result: Any, out_dir: Path) -> Path:
    """Write ``quality-cost.png``, ``latency.png`` and ``report.html`` to ``out_dir``; returns the HTML path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    plots = {"quality-cost": quality_cost_plot(result), "latency": latency_plot(result)}
    for name, data in plots.items():
        (out_dir / f"{name}.png").write_bytes(data)
    b64 = {k: base64.b64encode(v).decode() for k, v in plots.items()}
    rows = []
    for e in sorted(result.entries, key=lambda e: -(e.throughput or 0.0)):
        cls = "chosen" if e is result.recommended else ("fail" if not e.meets else "")
        rows.append(
            f"<tr class='{cls}'><td>{_fmt(e.label)}</td><td>{_fmt(e.runtime)}</td><td>{_fmt(e.quality)}</td>"
            f"<td>{_fmt(e.p50_ms, 3)}</td><td>{_fmt(e.p99_ms, 3)}</td><td>{_fmt(e.throughput, 4)}</td><td>{_speedup(e)}</td>"
            f"<td>{_fmt(e.memory_mb, 3)}</td><td>{_mb(e.size_bytes)}</td><td>{_fmt(e.cost_per_million, 4)}</td>"
            f"<td>{'*' if e.on_front else ''}</td><td class='verdict'>{_fmt(e.verdict)}</td></tr>"
        )
    price = result.price
    if price is None:
        price_html = "No price given: the models are ranked by throughput (at one price, cost is proportional to 1 / throughput)."
    else:
        src = html.escape(price.source)
        link = f"<a href='{src}'>{src}</a>" if price.source.startswith("http") else src
        price_html = (
            f"Price: ${price.usd_per_hour:g} per hour"
            + (f" ({html.escape(price.instance)})" if price.instance else "")
            + f", source {link}"
            + (f", as of {html.escape(str(price.as_of))}" if price.as_of else "")
            + "."
        )
    m = result.machine
    machine = html.escape(f"{m.get('cpu', '')}, {m.get('cores')} cores, flags {' '.join(m.get('flags', []))}")
    notes = "".join(f"<p class='note'>{html.escape(n)}</p>" for n in result.notes)
    goal = html.escape(result.goal.describe(result.metric, result.higher_is_better))
    title = f"modelpress compare: {len(result.entries)} {result.task} models"
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:system-ui,sans-serif;margin:2em;max-width:1100px}} table{{border-collapse:collapse;font-size:13px}}
td,th{{border:1px solid #ccc;padding:3px 7px;text-align:left}} tr.chosen{{background:#d8f3dc}} tr.fail{{color:#9d0208}}
img{{max-width:100%}}</style></head><body>
<h1>{html.escape(title)}</h1>
<p>dataset <b>{html.escape(result.dataset)}</b>, quality <b>{html.escape(result.metric)}</b>
({"higher" if result.higher_is_better else "lower"} is better). Machine: {machine}.</p>
<p id="goal">Goal: {goal}.</p>
<h2 id="recommendation">{html.escape(result.answer)}</h2>
<p id="price">{price_html}</p>
<h2>Quality vs cost</h2><img alt="quality-cost" src="data:image/png;base64,{b64["quality-cost"]}">
<h2>Latency</h2><img alt="latency" src="data:image/png;base64,{b64["latency"]}">
<h2>Every model</h2>
<table id="models"><tr><th>model</th><th>runtime</th><th>{html.escape(result.metric)}</th><th>p50 ms</th><th>p99 ms</th>
<th>items/s ({html.escape(result.settings["shape"])})</th><th>vs {html.escape(result.entries[0].label)} (range)</th>
<th>memory rise MB</th><th>size MB</th><th>USD per million</th>
<th>front</th><th>verdict</th></tr>{"".join(rows)}</table>
{notes}
</body></html>"""
    path = out_dir / "report.html"
    tmp = out_dir / ".report.html.tmp"
    tmp.write_text(page)
    tmp.replace(path)
    return path
