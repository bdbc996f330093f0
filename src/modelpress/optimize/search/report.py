"""Plots (PNG) and a self-contained HTML report of a tuning run.

The HTML embeds its plots as base64 PNGs, so the one file can be mailed or attached to a ticket;
the PNGs are written beside it too.
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Any


def _fig_bytes(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()


def pareto_plot(result: Any) -> bytes:
    """Quality (recovery of the primary metric) against throughput; the front joined, peers marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from modelpress.optimize.search.front import FIDELITY, fidelity

    pts = [p for p in result.points if p.status == "measured" and fidelity(p, result.task) is not None and p.throughput]
    fig, ax = plt.subplots(figsize=(8.5, 5.2))
    for p in pts:
        marker = "s" if p.peer else "o"
        color = "#2a9d8f" if p.passed else "#e76f51"
        y = fidelity(p, result.task)
        ax.scatter(
            p.throughput, y, marker=marker, s=70 if p.on_front else 40, c=color, edgecolors="black" if p.on_front else "none", zorder=3
        )
        ax.annotate(
            p.label if len(p.label) < 40 else p.label[:37] + "...", (p.throughput, y), fontsize=7, xytext=(4, 3), textcoords="offset points"
        )
    front = sorted([p for p in pts if p.on_front], key=lambda p: p.throughput)
    if front:
        ax.plot(
            [p.throughput for p in front],
            [fidelity(p, result.task) for p in front],
            "--",
            color="black",
            lw=1,
            zorder=2,
            label="Pareto front (quality, throughput, latency)",
        )
    if result.chosen is not None and result.chosen.throughput:
        ax.scatter(
            result.chosen.throughput,
            fidelity(result.chosen, result.task),
            s=260,
            facecolors="none",
            edgecolors="#264653",
            lw=2,
            zorder=4,
            label="chosen",
        )
    ax.scatter([], [], marker="s", c="grey", label="peer recipe")
    ax.scatter([], [], marker="o", c="grey", label="modelpress candidate")
    ax.scatter([], [], marker="o", c="#2a9d8f", label="passes the gate")
    ax.scatter([], [], marker="o", c="#e76f51", label="fails the gate")
    ax.set_xlabel(
        f"throughput (items/s, batch {result.settings['batch_size']}"
        + (f" x {result.settings['seq_len']} tokens)" if result.settings.get("seq_len") else ")")
    )
    ax.set_ylabel(f"{FIDELITY.get(result.task, 'recovery')} with the original")
    ax.set_title(f"{result.model}: quality vs throughput ({result.dataset})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    data = _fig_bytes(fig)
    plt.close(fig)
    return data


def latency_plot(result: Any) -> bytes:
    """p50 and p99 latency at batch 1 for every measured candidate."""
    pts = [p for p in result.points if p.latency_p50_ms]
    return latency_bars([(p.label[:45], p.latency_p50_ms, p.latency_p99_ms) for p in pts], label_size=7, row_height=0.35)


def latency_bars(
    rows: list[tuple[str, float, float]], *, goal_ms: float | None = None, label_size: int = 8, row_height: float = 0.45
) -> bytes:
    """A PNG of p50 and p99 bars per (label, p50 ms, p99 ms), fastest p50 first; ``goal_ms``: a p99 goal line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted(rows, key=lambda r: r[1])
    fig, ax = plt.subplots(figsize=(8.5, row_height * len(rows) + 1.5))
    ys = range(len(rows))
    ax.barh([y + 0.2 for y in ys], [r[2] for r in rows], height=0.4, color="#f4a261", label="p99")
    ax.barh([y - 0.2 for y in ys], [r[1] for r in rows], height=0.4, color="#2a9d8f", label="p50")
    if goal_ms is not None:
        ax.axvline(goal_ms, color="#9d0208", ls=":", label=f"goal: p99 <= {goal_ms:g} ms")
    ax.set_yticks(list(ys), [r[0] for r in rows], fontsize=label_size)
    ax.set_xlabel("latency at batch 1 (ms)")
    ax.set_title("latency percentiles")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=8)
    data = _fig_bytes(fig)
    plt.close(fig)
    return data


def _fmt(v: Any, digits: int = 4) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.{digits}g}"
    return html.escape(str(v))


def compound_section(result: Any) -> str:
    """The compound candidates (two steps chained): each step, what the first one's training did, how far the search took it."""
    comps = [p for p in result.points if getattr(p, "steps", None)]
    if not comps:
        return ""
    rows = []
    for p in comps:
        first, second = [*p.steps, {}, {}][:2]
        tr = p.training or {}
        size = ""
        if tr.get("student_layers") is not None:
            size = f"student layers {tr['student_layers']} of {tr.get('teacher_layers')}"
        elif tr.get("parameters_after") is not None:
            size = f"parameters {tr.get('parameters_before'):,} -> {tr['parameters_after']:,}"
        training = "" if not tr else f"{tr.get('steps')} steps in {tr.get('seconds') or 0:.0f} s ({tr.get('stopped')})"
        stopped = "picked" if result.chosen is p else (p.stop or ("passed" if p.passed else ""))
        rows.append(
            f"<tr data-stage='{_fmt(p.stage)}'><td>{_fmt(p.label)}</td><td>{_fmt(first.get('technique'))}</td>"
            f"<td>{_fmt(second.get('technique'))}@{_fmt(second.get('runtime'))}</td><td>{html.escape(size)}</td>"
            f"<td>{html.escape(training)}{' (cached)' if tr.get('cached') else ''}</td><td>{_fmt(p.stage)}</td>"
            f"<td>{_fmt(stopped)}</td><td>{_fmt(p.reason or p.error)}</td></tr>"
        )
    return (
        "<h2>Compound candidates</h2><p>A smaller model (a distilled student, or structured pruning with recovery training), "
        "then quantized: built after every other candidate was timed, only under a budget that covers the training; "
        "lineage: original -> first step -> quantized.</p>"
        "<table id='compound'><tr><th>candidate</th><th>step 1</th><th>step 2</th><th>model</th><th>training</th>"
        f"<th>stage reached</th><th>stopped</th><th>notes</th></tr>{''.join(rows)}</table>"
    )


def mixed_section(result: Any) -> str:
    """The mixed-precision candidates: an int8 candidate that failed only on agreement, with its most sensitive layers in float."""
    from modelpress.tasks import TASKS

    mixed = [p for p in result.points if getattr(p, "float_layers", None) is not None]
    if not mixed:
        return ""
    metrics = [m for m in getattr(TASKS.get(result.task), "agreement_metrics", ()) if any(m in p.quality for p in mixed)]
    rows = []
    for p in mixed:
        stopped = "picked" if result.chosen is p else (p.stop or ("passed" if p.passed else ""))
        rows.append(
            f"<tr data-stage='{_fmt(p.stage)}'><td>{_fmt(p.label)}</td><td>{len(p.float_layers)}: "
            f"{html.escape(', '.join(p.float_layers))}</td>{''.join(f'<td>{_fmt(p.quality.get(m))}</td>' for m in metrics)}"
            f"<td>{_fmt(p.speedup, 3)}</td><td>{_fmt(p.stage)}</td><td>{_fmt(stopped)}</td></tr>"
        )
    heads = "".join(f"<th>{html.escape(m)}</th>" for m in metrics)
    return (
        "<h2>Mixed precision</h2><p>A fast int8 candidate that failed the gate only on agreement with the original, "
        "again with its 1, 2, 3, 4, 6 ... most sensitive layers (ranked by a sensitivity scan) kept in float.</p>"
        f"<table id='mixed'><tr><th>candidate</th><th>layers in float</th>{heads}<th>speed-up</th><th>stage reached</th>"
        f"<th>stopped</th></tr>{''.join(rows)}</table>"
    )


def tune_report(result: Any, out_dir: Path) -> Path:
    """Write ``pareto.png``, ``latency.png`` and ``report.html`` to ``out_dir``; returns the HTML path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    pareto, latency = pareto_plot(result), latency_plot(result)
    (out_dir / "pareto.png").write_bytes(pareto)
    (out_dir / "latency.png").write_bytes(latency)
    rows = []
    for p in sorted(result.points, key=lambda p: -(p.speedup or 0)):
        cls = "chosen" if result.chosen is p else ("fail" if p.status == "measured" and not p.passed else "")
        stopped = "picked" if result.chosen is p else (p.stop or ("passed" if p.passed else ""))
        screen = p.screen or {}
        screened = "" if not screen else ("pass" if screen.get("passed") else "fail") + f" ({screen.get('rows')} rows)"
        gate = "" if p.status != "measured" else ("pass" if p.passed else "fail")
        rows.append(
            f"<tr class='{cls}' data-stage='{_fmt(p.stage)}'><td>{_fmt(p.label)}</td><td>{_fmt(p.peer)}</td>"
            f"<td class='stage'>{_fmt(p.stage)}{' (cached)' if p.cached else ''}</td><td class='stop'>{_fmt(stopped)}</td>"
            f"<td>{_fmt(p.recovery)}</td><td>{_fmt(p.throughput, 4)}</td><td>{_fmt(p.first_speedup, 3)}</td>"
            f"<td>{_fmt(p.speedup, 3) if p.retimed else ''}</td>"
            f"<td>{_fmt(p.latency_p50_ms, 3)}</td><td>{_fmt(p.latency_p99_ms, 3)}</td>"
            f"<td>{screened}</td><td>{gate}</td><td>{'*' if p.on_front else ''}</td>"
            f"<td>{_fmt(p.reason or p.error or (p.gate or {}).get('summary'))}</td></tr>"
        )
    search = getattr(result, "search", None) or {}
    funnel = "".join(
        f"<tr><td>{html.escape(stage)}</td><td>{_fmt(count)}</td></tr>" for stage, count in (search.get("stages") or {}).items()
    )
    secs = ", ".join(f"{html.escape(k.replace('_', ' '))} {v:.0f} s" for k, v in (search.get("seconds") or {}).items())
    screening = (
        f"screened on {search['screen_rows']} fixed rows, dropped when below the gate by more than {search['screen_margin']:.3f}"
        if search.get("screen_rows")
        else "no screening"
    )
    notes = "".join(f"<p class='note'>{html.escape(n)}</p>" for n in getattr(result, "notes", None) or [])
    search_html = (
        f"<h2>Search</h2><p id='search'>{html.escape(str(search.get('mode', '')))} search of {len(result.points)} candidates: "
        f"{html.escape(screening)}; time: {secs}. Re-timed together at the end: "
        f"{html.escape(', '.join(search.get('retimed') or []) or 'none')}.</p>{notes}"
        f"<table id='stages'><tr><th>stage reached</th><th>candidates</th></tr>{funnel}</table>"
        if search
        else ""
    )
    gate_rows = ""
    if result.chosen is not None and result.chosen.gate:
        for r in result.chosen.gate["rows"]:
            gate_rows += (
                f"<tr><td>{_fmt(r['metric'])}</td><td>{_fmt(r['original'])}</td><td>{_fmt(r['variant'])}</td><td>{_fmt(r['recovery'])}</td>"
                f"<td>{_fmt(r['threshold'])}</td><td>{'pass' if r['passed'] else 'FAIL'}</td></tr>"
            )
    chosen = html.escape(result.chosen.label) if result.chosen else "none passed the gate"
    b64 = {k: base64.b64encode(v).decode() for k, v in (("pareto", pareto), ("latency", latency))}
    machine = html.escape(
        f"{result.machine.get('cpu', '')}, {result.machine.get('cores')} cores, flags {' '.join(result.machine.get('flags', []))}"
    )
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>modelpress tune: {html.escape(result.model)}</title>
<style>body{{font-family:system-ui,sans-serif;margin:2em;max-width:1100px}} table{{border-collapse:collapse;font-size:13px}}
td,th{{border:1px solid #ccc;padding:3px 7px;text-align:left}} tr.chosen{{background:#d8f3dc}} tr.fail{{color:#9d0208}}
img{{max-width:100%}}</style></head><body>
<h1>modelpress tune: {html.escape(result.model)}</h1>
<p>task <b>{html.escape(result.task)}</b>, dataset <b>{html.escape(result.dataset)}</b>,
primary metric <b>{html.escape(result.primary_metric)}</b>
(original: {_fmt(result.original["metrics"].get(result.primary_metric))}). Machine: {machine}.</p>
<h2 id="chosen">Chosen: {chosen}</h2>
<table><tr><th>metric</th><th>original</th><th>variant</th><th>recovery</th><th>threshold</th><th>pass</th></tr>{gate_rows}</table>
<h2>Quality vs throughput</h2><img alt="pareto" src="data:image/png;base64,{b64["pareto"]}">
<h2>Latency</h2><img alt="latency" src="data:image/png;base64,{b64["latency"]}">
{search_html}
{compound_section(result)}
{mixed_section(result)}
<h2>Every candidate</h2>
<table id="candidates"><tr><th>candidate</th><th>peer recipe</th><th>stage reached</th><th>stopped</th><th>recovery</th>
<th>items/s</th><th>speed-up (own timing)</th><th>speed-up (re-timed)</th>
<th>p50 ms</th><th>p99 ms</th><th>screening</th><th>gate</th><th>front</th><th>notes</th></tr>{"".join(rows)}</table>
<p>Speed-ups are against {html.escape(result.model)} on PyTorch fp32 eager: first each candidate's own timing, side by side
with the baseline in interleaved rounds; then the front and the passing candidates re-timed together in one process, the
figures the pick rests on (cached points are marked).</p>
</body></html>"""
    path = out_dir / "report.html"
    tmp = out_dir / ".report.html.tmp"
    tmp.write_text(page)
    tmp.replace(path)
    return path
