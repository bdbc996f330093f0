"""Bench and evaluation results as Rich tables (and plain dicts for JSON)."""

from __future__ import annotations

from typing import Any

from rich.table import Table


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _with_ratio(text: str, ratio: float | None) -> str:
    return text if ratio is None else f"{text} [cyan]({ratio:.2f}x)[/cyan]"


def bench_table(report: dict[str, Any]) -> Table:
    """One column per measured runner, one row per figure; ratios to the baseline in brackets."""
    results = report["results"]
    base_idx = report.get("baseline_index")
    title = "modelpress bench"
    if base_idx is not None:
        b = results[base_idx]
        title += f" (in brackets: speed-up vs the baseline, {b['model']} on {b['runtime']}; for memory and size, the fraction of it)"
    table = Table(title=title, title_justify="left")
    table.add_column("figure")
    rats: list[dict[str, Any] | None] = []
    for i, r in enumerate(results):
        table.add_column(
            f"{r['model']}\n{r['runtime']} ({r['threads']} threads)" + ("\n[dim]baseline[/dim]" if i == base_idx else ""), justify="right"
        )
        rats.append(report.get("ratios", {}).get(str(i)) if base_idx is not None and i != base_idx else None)
    for k in ("p50", "p90", "p99"):
        table.add_row(
            f"latency {k} ms (batch 1)",
            *[
                _with_ratio(f"{r['latency_ms'][k]:.2f}", rat["latency_speedup"].get(k) if rat else None)
                for r, rat in zip(results, rats, strict=True)
            ],
        )
    keys = [(t["batch"], t["seq_len"]) for t in results[0]["throughput"]]
    for key in keys:
        cells = []
        for r, rat in zip(results, rats, strict=True):
            thr = {(t["batch"], t["seq_len"]): t["items_per_s"] for t in r["throughput"]}
            spd = {(t["batch"], t["seq_len"]): t["speedup"] for t in rat["throughput_speedup"]} if rat else {}
            cells.append(_with_ratio(f"{thr[key]:.1f}", spd.get(key)) if key in thr else "-")
        bs, seq = key
        table.add_row(f"items/s batch {bs}" + (f" x {seq} tokens" if seq else ""), *cells)
    table.add_row(
        "memory rise",
        *[
            _with_ratio(f"{r['memory_mb']['rise']:.0f} MB", rat["memory_fraction"] if rat else None)
            for r, rat in zip(results, rats, strict=True)
        ],
    )
    table.add_row(
        "size on disk",
        *[_with_ratio(_size(r["size_bytes"]), rat["size_fraction"] if rat else None) for r, rat in zip(results, rats, strict=True)],
    )
    m = report.get("machine", {})
    table.caption = f"{m.get('cpu', '?')} | {m.get('cores', '?')} cores | flags: {' '.join(m.get('flags', [])) or 'none of note'}"
    return table


def eval_table(result: dict[str, Any]) -> Table:
    table = Table(title=f"modelpress evaluate: {result['model']} ({result['task']}) on {result['dataset']}", title_justify="left")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for k, v in result["metrics"].items():
        table.add_row(k, f"{v:.4f}" if isinstance(v, float) and not float(v).is_integer() else f"{v:g}" if isinstance(v, float) else str(v))
    for k, v in (result.get("agreement") or {}).items():
        table.add_row(f"agreement {k}", f"{v:.4f}")
    table.caption = f"runtime {result['runtime']} | {result['seconds']:.1f} s"
    return table


def generation_table(rows: list[dict[str, Any]], title: str) -> Table:
    """Generation engines' figures (``generation.measure``): decode tokens/s at batch 1, time to first
    token and, from ``evaluate``, how far the greedy tokens follow the torch reference."""
    table = Table(title=title, title_justify="left")
    for col in ("engine", "options", "decode tok/s", "first token ms", "greedy identical", "greedy prefix"):
        table.add_column(col, justify="left" if col in ("engine", "options") else "right")
    for r in rows:
        opts = ", ".join(f"{k}={v}" for k, v in (r.get("options") or {}).items())
        tps, ttft = r.get("decode_tokens_per_s"), r.get("ttft_s")
        same, prefix = r.get("greedy_identical"), r.get("greedy_prefix_agreement")
        table.add_row(
            str(r.get("engine", "")),
            opts,
            f"{tps:.1f}" if tps is not None else "",
            f"{ttft * 1000:.1f}" if ttft is not None else "",
            f"{same:.0%}" if same is not None else "",
            f"{prefix:.0%}" if prefix is not None else "",
        )
    return table
