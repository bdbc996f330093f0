"""The ``modelpress optimize`` and ``modelpress tune`` commands (they call modelpress.optimize.api)."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table
from rich.text import Text

from modelpress import units
from modelpress.cli.common import DataDirOpt, JsonOpt, TaskOpt, ThreadsOpt, console, emit_json, handle_errors, out, progress_bars


def parse_fraction(text: str, what: str = "max-drop") -> float:
    """``1%`` -> 0.01, ``0.01`` -> 0.01 (below 100%)."""
    return units.parse_fraction(text, f"--{what}", allow_one=False)


def parse_duration(text: str) -> float:
    """``90s``, ``5m``, ``1h``, ``1m30s`` or a number of seconds."""
    return units.parse_duration(text, "--budget")


def quiet_stdout(as_json: bool) -> contextlib.AbstractContextManager:
    """With --json, stdout carries only the JSON: libraries' own progress output (NNCF prints
    Rich bars to stdout) goes to stderr while the work runs."""
    return contextlib.redirect_stdout(sys.stderr) if as_json else contextlib.nullcontext()


def gate_table(rows: list[dict[str, Any]], title: str) -> Table:
    table = Table(title=title, title_justify="left")
    for col in ("metric", "original", "variant", "recovery", "threshold", "pass"):
        table.add_column(col, justify="right" if col in ("original", "variant", "recovery") else "left")
    for r in rows:
        f = lambda v: "" if v is None else f"{v:.4f}"  # noqa: E731
        table.add_row(
            r["metric"],
            f(r["original"]),
            f(r["variant"]),
            f(r["recovery"]),
            r["threshold"],
            "[green]pass[/green]" if r["passed"] else f"[red]FAIL[/red] {r['reason']}",
        )
    return table


def side_by_side_table(res: Any) -> Table:
    """The gate of every step of a branch recipe (alternatives, each made from the original) in one
    table: a row per metric, a column per step."""
    f = lambda v: "" if v is None else f"{v:.4f}"  # noqa: E731
    table = Table(title=f"{res.model} on {res.dataset}: {len(res.steps)} alternatives side by side", title_justify="left")
    table.add_column("metric")
    table.add_column("original", justify="right")
    for s in res.steps:
        table.add_column(f"{s.index}: {s.label}", justify="right", overflow="fold")
    table.add_column("threshold")
    rows: dict[str, dict[int, dict[str, Any]]] = {}
    for s in res.steps:
        for r in [r.to_json() for r in s.gate.rows] if s.gate is not None else []:
            rows.setdefault(r["metric"], {})[s.index] = r
    for metric, by_step in rows.items():
        first = next(iter(by_step.values()))
        cells = []
        for s in res.steps:
            r = by_step.get(s.index)
            cells.append("" if r is None else f"{f(r['variant'])} " + ("[green]pass[/green]" if r["passed"] else "[red]FAIL[/red]"))
        table.add_row(metric, f(first["original"]), *cells, first["threshold"])
    shipped = [("[green]yes[/green]" if s.shipped else f"[red]no[/red] {s.error or ''}".strip()) for s in res.steps]
    table.add_row("shipped", "", *shipped, "")
    return table


def speed_rows(sp: dict[str, Any] | None) -> list[tuple[str, str]]:
    """A speed record (``metrics.speed``) as (figure, "original -> variant: speed-up (range)") rows."""
    if not sp:
        return []
    rounds = f"median of {sp['rounds']} interleaved rounds"
    rows = []
    for row in sp.get("throughput") or []:
        shape = f"batch {row['batch']}" + (f" x {row['seq_len']} tokens" if row.get("seq_len") else "")
        lo, hi = row.get("speedup_range") or (row["speedup"], row["speedup"])
        rows.append(
            (
                f"throughput on {sp['runtime']}, {shape}",
                f"{row['original_items_per_s']:.1f} -> {row['variant_items_per_s']:.1f} items/s: "
                f"[bold]{row['speedup']:.2f}x[/bold] ({rounds}, range {lo:.2f}-{hi:.2f}x)",
            )
        )
    if sp.get("latency_ratio") is not None:
        lo, hi = sp.get("latency_ratio_range") or (sp["latency_ratio"], sp["latency_ratio"])
        rows.append(
            (
                f"latency p50 on {sp['runtime']}, batch 1",
                f"{sp['original_p50_ms']:.2f} -> {sp['variant_p50_ms']:.2f} ms: [bold]{sp['latency_ratio']:.2f}x[/bold] "
                f"({rounds}, range {lo:.2f}-{hi:.2f}x)",
            )
        )
    return rows


def optimize(
    model: Annotated[str, typer.Argument(help="Model folder, .onnx file, or short name (minilm).")],
    recipe: Annotated[Path, typer.Option("--recipe", help="Recipe file (YAML or JSON) with the steps and the gate.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder for the step artifacts and recipe-report.json.")] = Path(
        "optimized"
    ),
    task: TaskOpt = None,
    data: Annotated[
        str | None, typer.Option("--data", "-d", help="Dataset to evaluate and gate on (default: the recipe's, else the task's).")
    ] = None,
    max_drop: Annotated[
        str | None,
        typer.Option("--max-drop", help="Default gate: the primary metric may drop this much (1% or 0.01), when the recipe has no gate."),
    ] = None,
    limit: Annotated[int | None, typer.Option("--limit", help="Evaluate on the first N examples only.")] = None,
    threads: ThreadsOpt = None,
    data_dir: DataDirOpt = None,
    name: Annotated[str | None, typer.Option("--name", help="Registry name (default: the model's name).")] = None,
    no_register: Annotated[
        bool, typer.Option("--no-register", help="Do not record the original and the variants in the registry.")
    ] = False,
    force: Annotated[bool, typer.Option("--force", help="Write into a non-empty output folder.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Run a recipe: each step is applied, evaluated and gated; a step that breaks the gate is not shipped."""
    from modelpress.optimize import api

    with progress_bars(not as_json or sys.stderr.isatty()) as prog, quiet_stdout(as_json):
        res = api.optimize(
            model,
            recipe,
            output,
            task=task,
            data=data,
            max_drop=parse_fraction(max_drop) if max_drop else None,
            limit=limit,
            threads=threads,
            data_dir=data_dir,
            register=not no_register,
            name=name,
            overwrite=force,
            progress=prog,
        )
    data_ = res.to_json()
    if as_json:
        emit_json(data_)
    else:
        base = res.original["metrics"]
        out.print(
            f"original {res.model}: "
            + ", ".join(f"{k} {v:.4f}" for k, v in base.items() if isinstance(v, float))
            + (f"  (registered {res.registered_original})" if res.registered_original else "")
        )
        branch = res.recipe.get("mode") == "branch" and len(res.steps) > 1
        if branch:  # alternatives made from the original: one table, a column each
            out.print(side_by_side_table(res))
        for s in res.steps:
            status = "[green]shipped[/green]" if s.shipped else "[red]not shipped[/red]"
            if branch:
                pass
            elif s.gate is not None:
                out.print(
                    gate_table(
                        [r.to_json() for r in s.gate.rows],
                        f"step {s.index}: {s.label}: {status}" + (f" (kept in float: {', '.join(s.excluded)})" if s.excluded else ""),
                    )
                )
            else:
                out.print(f"step {s.index}: {s.label}: {status}: {s.error}")
            out.print(f"  -> {s.path}" + (f"  (registered {s.registered})" if s.registered else ""))
    failed = [s for s in res.steps if not s.shipped]
    # a branch recipe compares alternatives: one failing its gate is the comparison working; none shipped is a failure
    if failed and (res.recipe.get("mode") != "branch" or not any(s.shipped for s in res.steps)):
        first = failed[0]
        why = first.error or (first.gate.summary() if first.gate else "")
        console.print(f"[bold red]step {first.index} ({first.label}) was not shipped:[/bold red] {why}", highlight=False, soft_wrap=True)
        raise typer.Exit(4)


def tune(
    model: Annotated[str, typer.Argument(help="Model folder, .onnx file, or short name (minilm).")],
    task: TaskOpt = None,
    data: Annotated[str | None, typer.Option("--data", "-d", help="Dataset to score quality on (default: the task's).")] = None,
    max_drop: Annotated[str, typer.Option("--max-drop", help="The primary metric may drop at most this much: 1% or 0.01.")] = "1%",
    min_agreement: Annotated[
        float | None,
        typer.Option(
            "--min-agreement",
            help="Also require this agreement with the original (on --agreement-metric; default the task's: mean cosine for "
            "embeddings, labels for classifiers, top-1 tokens for causal LMs).",
        ),
    ] = None,
    agreement_metric: Annotated[
        str | None,
        typer.Option(
            "--agreement-metric",
            help="Which agreement --min-agreement gates: one the task reports (embedding: mean_cosine, min_cosine, top10_agreement).",
        ),
    ] = None,
    budget: Annotated[str, typer.Option("--budget", help="Time for the search: 90s, 5m, 1h.")] = "5m",
    preset: Annotated[
        str | None, typer.Option("--preset", help="Hardware preset (x86-avx512-vnni, x86-avx2, arm64, nvidia); default: this machine's.")
    ] = None,
    runtime: Annotated[list[str] | None, typer.Option("--runtime", "-r", help="Only candidates on these runtimes (repeatable).")] = None,
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder for the chosen variant, tune.json, report.html and plots.")] = Path(
        "tuned"
    ),
    limit: Annotated[int | None, typer.Option("--limit", help="Evaluate on the first N examples only.")] = None,
    threads: ThreadsOpt = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Batch size of the throughput figure.")] = 32,
    seq_len: Annotated[int, typer.Option("--seq-len", help="Tokens per input of the throughput figure (text tasks).")] = 128,
    data_dir: DataDirOpt = None,
    name: Annotated[str | None, typer.Option("--name", help="Registry name (default: the model's name).")] = None,
    no_register: Annotated[
        bool, typer.Option("--no-register", help="Do not record the original and the variants in the registry.")
    ] = False,
    no_cache: Annotated[bool, typer.Option("--no-cache", help="Measure every candidate again, ignoring cached results.")] = False,
    screen_rows: Annotated[
        int | None,
        typer.Option("--screen-rows", help="Rows of the screening subsample (default: a tenth of the dataset, at least 200; 0: none)."),
    ] = None,
    exhaustive: Annotated[
        bool, typer.Option("--exhaustive", help="Score every candidate in full (no screening, none dropped as slower): the reference run.")
    ] = False,
    compound: Annotated[
        bool | None,
        typer.Option(
            "--compound/--no-compound",
            help="Add the trained candidates (distilled or pruned, then quantized; QAT); default: when --budget covers their training.",
        ),
    ] = None,
    train_time: Annotated[
        str | None, typer.Option("--train-time", help="Training time of each compound candidate's first step: 5m (the default), 90s.")
    ] = None,
    auto_exclude: Annotated[
        int | None,
        typer.Option(
            "--auto-exclude",
            help="A fast int8 candidate failing only on agreement is tried again with 1, 2, 4 ... up to N of its most "
            "sensitive layers in float (mixed precision), each a candidate of its own (default 12); 0: never.",
        ),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Find the fastest variant that keeps quality: every candidate built and timed, the fastest scored, the pick re-timed."""
    from modelpress.optimize import api

    def show(p: Any) -> None:
        if as_json:
            return
        cached = " (cached)" if p.cached else ""
        if p.status == "measured":
            mark = "[green]pass[/green]" if p.passed else "[red]fail[/red]"
            rec = "" if p.recovery is None else f"recovery {p.recovery:.4f}, "
            console.print(
                f"  {p.label}: {rec}{p.speedup or 0:.2f}x (own timing), p50 {p.latency_p50_ms or 0:.2f} ms, gate {mark}{cached}",
                highlight=False,
            )
        elif p.speedup is not None:
            console.print(f"  {p.label}: {p.stage}, {p.speedup:.2f}x (own timing); {p.stop}: {p.reason}{cached}", highlight=False)
        else:
            console.print(f"  {p.label}: {p.stage}; {p.stop or p.status}: {p.reason or p.error}{cached}", highlight=False)

    with progress_bars(not as_json or sys.stderr.isatty()) as prog, quiet_stdout(as_json):
        res = api.tune(
            model,
            task=task,
            data=data,
            max_drop=parse_fraction(max_drop),
            min_agreement=min_agreement,
            agreement_metric=agreement_metric,
            budget_s=parse_duration(budget),
            preset=preset,
            runtimes=runtime,
            output=output,
            limit=limit,
            threads=threads,
            batch_size=batch_size,
            seq_len=seq_len,
            data_dir=data_dir,
            register=not no_register,
            name=name,
            use_cache=not no_cache,
            screen_rows=screen_rows,
            exhaustive=exhaustive,
            compound_candidates=compound,
            compound_train_s=parse_duration(train_time) if train_time else None,
            **({} if auto_exclude is None else {"auto_exclude": auto_exclude}),
            progress=prog,
            on_point=show,
        )
    if as_json:
        emit_json(res.to_json())
    else:
        out.print(tune_table(res))
        if res.chosen is not None and res.chosen.gate:
            out.print(gate_table(res.chosen.gate["rows"], f"chosen: {res.chosen.label}"))
        out.print(f"report: {res.report}")
    if res.chosen is None:
        console.print("[bold red]No candidate kept the quality gate.[/bold red] Allow a larger --max-drop or a longer --budget.")
        raise typer.Exit(4)


def tune_table(res: Any) -> Table:
    """Every candidate: how far the search took it (built, timed, screened, scored), why it stopped, its figures."""
    search = getattr(res, "search", None) or {}
    retimed = ", re-timed together at the end: R" if search.get("retimed") else ""
    table = Table(
        title=f"modelpress tune: {res.model} on {res.dataset} (speed-up vs PyTorch fp32 eager, same rounds{retimed}; * = Pareto front)",
        title_justify="left",
        caption="\n".join(getattr(res, "notes", None) or []) or None,
        caption_justify="left",
    )
    cols = ("candidate", "peer recipe", "stage", "stopped", res.primary_metric, "recovery", "items/s", "speed-up", "p50 ms", "p99 ms")
    for col in (*cols, "gate", "front"):
        table.add_column(col, overflow="fold")
    for p in sorted(res.points, key=lambda p: -(p.speedup or 0)):
        f = lambda v, d=4: "" if v is None else f"{v:.{d}g}"  # noqa: E731
        chosen = res.chosen is p
        gate = "" if p.status != "measured" else ("pass" if p.passed else "fail")
        stopped = "picked" if chosen else (p.stop or ("passed" if p.passed else ""))
        if p.stop and p.reason:
            stopped += f": {p.reason}"
        speedup = f(p.speedup, 3) + (" R" if getattr(p, "retimed", False) else "")
        table.add_row(
            ("[bold green]" + p.label + "[/bold green]") if chosen else p.label,
            p.peer or "",
            p.stage + (" (cached)" if p.cached else ""),
            Text(stopped),  # reasons quote metric values and labels: never read as markup
            f(p.quality.get(res.primary_metric)),
            f(p.recovery),
            f(p.throughput),
            speedup,
            f(p.latency_p50_ms),
            f(p.latency_p99_ms),
            gate if p.status == "measured" else p.status,
            "*" if p.on_front else "",
        )
    return table


def register_commands(app: typer.Typer) -> None:
    app.command("optimize")(handle_errors(optimize))
    app.command("tune")(handle_errors(tune))
