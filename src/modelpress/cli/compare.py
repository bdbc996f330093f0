"""The ``modelpress compare`` command (it calls modelpress.optimize.search.compare.compare)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table
from rich.text import Text

from modelpress.cli.common import DataDirOpt, JsonOpt, TaskOpt, ThreadsOpt, console, emit_json, handle_errors, out, progress_bars

NONE_MEETS_EXIT = 4  # as tune's "no candidate kept the gate": the command ran, and the answer is no


def _size(n: int | None) -> str:
    return "" if n is None else f"{n / 2**20:.1f} MB"


def compare_table(res: Any) -> Table:
    """One row per model, fastest first: quality, latency, throughput, memory, size, cost, front, verdict."""
    table = Table(
        title=f"modelpress compare: {res.task} on {res.dataset} (timed together in interleaved rounds: the ratios to the first model are"
        " medians of per-round ratios; * = Pareto front of quality and cost)",
        title_justify="left",
        caption="\n".join(res.notes) or None,
        caption_justify="left",
    )
    thr = f"items/s ({res.settings['shape']})"
    vs = f"vs {res.entries[0].label} (range)"
    for col in ("model", "runtime", res.metric, "p50 ms", "p99 ms", thr, vs, "memory rise", "size", "USD / 1M req", "front", "verdict"):
        table.add_column(col, overflow="fold", justify="left" if col in ("model", "runtime", "verdict") else "right")
    f = lambda v, d=4: "" if v is None else f"{v:.{d}g}"  # noqa: E731
    for e in sorted(res.entries, key=lambda e: -(e.throughput or 0.0)):
        chosen = e is res.recommended
        table.add_row(
            Text(e.label, style="bold green" if chosen else ""),
            e.runtime,
            f(e.quality),
            f(e.p50_ms),
            f(e.p99_ms),
            f(e.throughput),
            ""
            if e.speedup is None
            else f"{e.speedup:.2f}x" + (f" ({e.speedup_range[0]:.2f}-{e.speedup_range[1]:.2f})" if e.speedup_range else ""),
            "" if e.memory_mb is None else f"{e.memory_mb:.0f} MB",
            _size(e.size_bytes),
            f(e.cost_per_million),
            "*" if e.on_front else "",
            Text(e.verdict, style="" if e.meets else "red"),  # verdicts quote labels and figures: never read as markup
        )
    return table


def compare(
    models: Annotated[list[str], typer.Argument(help="Two or more models of one task: folders, .onnx files or short names (minilm).")],
    task: TaskOpt = None,
    data: Annotated[str | None, typer.Option("--data", "-d", help="Dataset every model is scored on (default: the task's).")] = None,
    limit: Annotated[int | None, typer.Option("--limit", help="Score on the first N examples only.")] = None,
    runtime: Annotated[
        str | None, typer.Option("--runtime", "-r", help="Run every model on this runtime (default: each model's own, else torch).")
    ] = None,
    price_per_hour: Annotated[
        float | None, typer.Option("--price-per-hour", help="USD per hour of the machine: gives the cost per million requests.")
    ] = None,
    instance: Annotated[
        str | None, typer.Option("--instance", help="An instance preset's price (list: modelpress instances), e.g. aws-c7i.large.")
    ] = None,
    max_p99_ms: Annotated[float | None, typer.Option("--max-p99-ms", help="Goal: p99 latency at batch 1 at most this (ms).")] = None,
    min_quality: Annotated[
        float | None,
        typer.Option("--min-quality", help="Goal: the quality metric at least this (at most this when lower is better: bits per byte)."),
    ] = None,
    max_cost_per_million: Annotated[
        float | None, typer.Option("--max-cost-per-million", help="Goal: USD per million requests at most this (needs a price).")
    ] = None,
    tune: Annotated[
        bool, typer.Option("--tune", help="Compare each model's best variant (found by the tuner) instead of the model.")
    ] = False,
    budget: Annotated[str, typer.Option("--budget", help="With --tune: the tuner's time per model: 90s, 5m, 1h.")] = "5m",
    max_drop: Annotated[str, typer.Option("--max-drop", help="With --tune: the gate of each tune (1% or 0.01).")] = "1%",
    batch_size: Annotated[int, typer.Option("--batch-size", help="Batch size of the throughput figure (and of the cost).")] = 32,
    seq_len: Annotated[int, typer.Option("--seq-len", help="Tokens per input of the throughput figure (text tasks).")] = 128,
    seconds: Annotated[float, typer.Option("--seconds", help="Timing seconds per figure and model, spread over the rounds.")] = 2.0,
    rounds: Annotated[int, typer.Option("--rounds", help="Interleaved timing rounds.")] = 3,
    threads: ThreadsOpt = None,
    data_dir: DataDirOpt = None,
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder for compare.json, report.html and the plots.")] = Path("compared"),
    as_json: JsonOpt = False,
) -> None:
    """Compare models of one task on this machine: quality, latency, throughput, memory, size, cost; recommend one for a goal."""
    from modelpress.cli.optimize import parse_duration, parse_fraction, quiet_stdout
    from modelpress.optimize.search.compare import compare as run_compare

    with progress_bars(not as_json or sys.stderr.isatty()) as prog, quiet_stdout(as_json):
        res = run_compare(
            models,
            task=task,
            data=data,
            data_dir=data_dir,
            limit=limit,
            runtime=runtime,
            threads=threads,
            batch_size=batch_size,
            seq_len=seq_len,
            seconds=seconds,
            rounds=rounds,
            price_per_hour=price_per_hour,
            instance=instance,
            max_p99_ms=max_p99_ms,
            min_quality=min_quality,
            max_cost_per_million=max_cost_per_million,
            tune=tune,
            tune_budget_s=parse_duration(budget),
            max_drop=parse_fraction(max_drop),
            output=output,
            progress=prog,
        )
    if as_json:
        emit_json(res.to_json())
    else:
        out.print(compare_table(res))
        if res.price is not None:
            p = res.price
            out.print(f"price: ${p.usd_per_hour:g}/h" + (f" ({p.instance}, {p.source}, as of {p.as_of})" if p.as_of else f" ({p.source})"))
        out.print(Text(res.answer, style="bold green" if res.recommended else "bold red"))
        out.print(f"report: {res.report}")
    if res.recommended is None:
        console.print("[bold red]No model meets the goal[/bold red]: each one's reason is in the verdict column. Loosen a bound.")
        raise typer.Exit(NONE_MEETS_EXIT)


def instances_cmd(as_json: JsonOpt = False) -> None:
    """The instance presets (--instance) with their price per hour, its source and date."""
    from modelpress.optimize.search.compare import instances

    table_data = instances()
    if as_json:
        emit_json(table_data)
        return
    table = Table(title="instance presets of modelpress compare --instance", title_justify="left")
    for col in ("name", "provider", "region", "vCPUs", "USD/h", "as of", "source"):
        table.add_column(col)
    for name, e in table_data.items():
        table.add_row(name, e["provider"], e["region"], str(e["vcpus"]), f"{e['usd_per_hour']:g}", str(e.get("as_of")), e["source"])
    out.print(table)


def register_commands(app: typer.Typer) -> None:
    app.command("compare")(handle_errors(compare))
    app.command("instances")(handle_errors(instances_cmd))
