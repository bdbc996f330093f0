"""``modelpress prune``: prune a model, gate it against the original, and measure what it buys.

    modelpress prune shakespeare-lm --method wanda --sparsity 0.5 --data tinyshakespeare-test -o out/wanda50
    modelpress prune stories260k-folder --method sparsegpt --nm 2:4 --data tinystories -o out/sgpt24
    modelpress prune minilm --method global --sparsity 0.3 --data stsb-dev -o out/minilm-g30

The command parses its options and prints; the work is :func:`modelpress.optimize.api.prune_model`,
a one-step recipe: it applies the technique, evaluates the variant and the original on the same
data, gates the variant (``max_drop`` of the task's primary metric), measures the sizes stored
sparse and the speed of both side by side, and records all of it in the variant's manifest
(``metrics.evaluation``, ``gate``, ``shippable``, ``speed``). A variant that fails the gate is
written but marked ``shippable: false``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from modelpress.cli.optimize import speed_rows
from modelpress.errors import ConfigError
from modelpress.optimize.api import prune_model
from modelpress.optimize.configs.prune import METHODS, prune_config

__all__ = ["METHODS", "prune", "prune_config", "prune_model", "register_commands", "what_it_buys"]


def what_it_buys(res: dict[str, Any]) -> Table:
    table = Table(
        title="what the sparsity buys on this machine (measured; speed: side by side, interleaved rounds)",
        title_justify="left",
        show_header=False,
    )
    if res.get("sparsity") is not None:
        table.add_row("sparsity of the pruned layers", f"{res['sparsity']:.2%}")
    if res.get("model_sparsity") is not None:
        table.add_row("sparsity of all parameters", f"{res['model_sparsity']:.2%}")
    size = res.get("size") or {}
    if size.get("dense_bytes"):
        d = size["dense_bytes"]
        table.add_row("weights stored dense (as written)", f"{d:,} B")
        table.add_row("stored as bitmask + values", f"{size['bitmask_bytes']:,} B ({size['bitmask_bytes'] / d:.2f}x)")
        table.add_row("dense, zlib-compressed", f"{size['dense_zlib_bytes']:,} B ({size['dense_zlib_bytes'] / d:.2f}x)")
        table.add_row("bitmask + values, zlib-compressed", f"{size['bitmask_zlib_bytes']:,} B ({size['bitmask_zlib_bytes'] / d:.2f}x)")
    for label, text in speed_rows(res.get("speed")):
        table.add_row(label, text)
    return table


def prune(
    model: Annotated[str, typer.Argument(help="Model folder, .onnx file, or short name (shakespeare-lm, minilm).")],
    method: Annotated[
        str, typer.Option("--method", "-m", help="magnitude (per layer), global (one threshold), nm (magnitude N:M), sparsegpt, wanda.")
    ] = "magnitude",
    sparsity: Annotated[
        float | None, typer.Option("--sparsity", "-s", help="Fraction of the weights zeroed (default 0.5; N:M sets it).")
    ] = None,
    nm: Annotated[
        str | None, typer.Option("--nm", help="N:M pattern, keep N of every M weights, e.g. 2:4 (with nm, sparsegpt, wanda, magnitude).")
    ] = None,
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder to write the pruned model to.")] = Path("pruned"),
    data: Annotated[
        str | None, typer.Option("--data", "-d", help="Dataset to evaluate and gate on (default: the task's, e.g. tinystories).")
    ] = None,
    calibration: Annotated[
        str | None, typer.Option("--calibration", help="sparsegpt/wanda: corpus to calibrate on (default tinyshakespeare-train).")
    ] = None,
    samples: Annotated[int, typer.Option("--samples", help="sparsegpt/wanda: calibration windows.")] = 64,
    seq_len: Annotated[int, typer.Option("--seq-len", help="sparsegpt/wanda: tokens per calibration window.")] = 128,
    exclude: Annotated[
        list[str] | None, typer.Option("--exclude", help="Keep these layers dense: a module path or a regular expression (repeatable).")
    ] = None,
    runtime: Annotated[
        str, typer.Option("--runtime", "-r", help="Evaluate and measure the pruned model on torch, onnxruntime or openvino.")
    ] = "torch",
    max_drop: Annotated[str, typer.Option("--max-drop", help="Gate: the primary metric may worsen this much (5% or 0.05).")] = "5%",
    max_eval_tokens: Annotated[
        int | None, typer.Option("--max-eval-tokens", help="causal-lm: score only the first N tokens of the data.")
    ] = None,
    limit: Annotated[int | None, typer.Option("--limit", help="Evaluate on the first N examples only.")] = None,
    seconds: Annotated[float, typer.Option("--seconds", help="Time per speed figure.")] = 2.0,
    no_speed: Annotated[bool, typer.Option("--no-speed", help="Skip the speed measurement.")] = False,
    task: Annotated[str | None, typer.Option("--task", "-t", help="Task (inferred when omitted).")] = None,
    threads: Annotated[int | None, typer.Option("--threads", help="Threads for pruning, evaluation and the speed figures.")] = None,
    data_dir: Annotated[
        Path | None, typer.Option("--data-dir", help="Data folder (default: $MODELPRESS_DATA, then ../shared/data).")
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace the output folder if it exists.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.")] = False,
) -> None:
    """Prune a model (magnitude, global, N:M, SparseGPT, Wanda), gate it, and measure its size and speed."""
    from modelpress.cli.common import console, emit_json, out, progress_bars
    from modelpress.cli.optimize import gate_table, parse_fraction

    calib = {"samples": samples, "seq_len": seq_len, **({"dataset": calibration} if calibration else {})}
    if method not in ("sparsegpt", "wanda") and (calibration is not None):
        raise ConfigError(
            f"--calibration is for sparsegpt and wanda; --method {method} needs no data to prune.",
            hint="Drop --calibration, or use --method wanda.",
        )
    cfg = prune_config(
        method, sparsity=sparsity, nm=nm, runtime=runtime, exclude=exclude, calibration=calib if method in ("sparsegpt", "wanda") else None
    )
    options = {"max_eval_tokens": max_eval_tokens} if max_eval_tokens else None
    with progress_bars(not as_json or sys.stderr.isatty()) as prog:
        res = prune_model(
            model,
            output,
            cfg,
            task=task,
            data=data,
            data_dir=data_dir,
            limit=limit,
            max_drop=parse_fraction(max_drop),
            threads=threads,
            task_options=options,
            measure_speed=not no_speed,
            seconds=seconds,
            overwrite=force,
            progress=prog,
        )
    if as_json:
        emit_json(res)
    else:
        status = "[green]shippable[/green]" if res["shippable"] else "[red]not shippable[/red]"
        out.print(gate_table(res["gate"]["rows"], f"modelpress prune {res['model']}: {res['label']} on {res['dataset']}: {status}"))
        out.print(what_it_buys(res))
        out.print(f"-> {res['output']}")
    if not res["shippable"]:
        console.print(f"[bold red]The pruned model failed the gate:[/bold red] {res['gate']['summary']}", highlight=False, soft_wrap=True)
        raise typer.Exit(4)


def register_commands(app: typer.Typer) -> None:
    from modelpress.cli.common import handle_errors

    app.command("prune")(handle_errors(prune))
