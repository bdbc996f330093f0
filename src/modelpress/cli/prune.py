"""``modelpress prune``: prune a model, gate it against the original, and measure what it buys.

    modelpress prune shakespeare-lm --method wanda --sparsity 0.5 --data tinyshakespeare-test -o out/wanda50
    modelpress prune stories260k-folder --method sparsegpt --nm 2:4 --data tinystories -o out/sgpt24
    modelpress prune minilm --method global --sparsity 0.3 --data stsb-dev -o out/minilm-g30

:func:`prune_model` is the Python verb the command calls: it applies the technique, evaluates the
variant and the original on the same data, gates the variant (``max_drop`` of the task's
primary metric), measures the sizes stored sparse and the speed of both side by side, and
records all of it in the variant's manifest (``metrics.evaluation``, ``gate``, ``shippable``,
``speed``). A variant that fails the gate is written but marked ``shippable: false``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from modelpress.artifacts import Artifact
from modelpress.errors import ConfigError

METHODS = ("magnitude", "global", "nm", "sparsegpt", "wanda")


def prune_config(
    method: str,
    *,
    sparsity: float | None = None,
    nm: str | None = None,
    runtime: str = "torch",
    exclude: list[str] | None = None,
    calibration: dict[str, Any] | None = None,
) -> Any:
    """The technique config a ``--method`` names (``nm``: magnitude N:M, default 2:4)."""
    from modelpress.optimize.prune.llm import SparseGPT, Wanda
    from modelpress.optimize.prune.magnitude import MagnitudePrune

    common: dict[str, Any] = {"runtime": runtime, "exclude": list(exclude or [])}
    if sparsity is not None:
        common["sparsity"] = sparsity
    if nm is not None:
        common["nm"] = nm
    if method == "magnitude":
        return MagnitudePrune(scope="layer", **common)
    if method == "global":
        return MagnitudePrune(scope="global", **common)
    if method == "nm":
        return MagnitudePrune(**{**common, "nm": nm or "2:4"})
    if method in ("sparsegpt", "wanda"):
        cls = SparseGPT if method == "sparsegpt" else Wanda
        return cls(**common, **({"calibration": calibration} if calibration else {}))
    raise ConfigError(f"Unknown pruning method '{method}'.", hint=f"Use one of {', '.join(METHODS)}, e.g. --method wanda --sparsity 0.5")


def _with_options(art: Artifact, options: dict[str, Any] | None) -> Artifact:
    """A copy of ``art`` with task settings for evaluation only (the artifact on disk is untouched)."""
    if not options:
        return art
    manifest = art.manifest.model_copy(deep=True)
    manifest.task_config.update(options)
    return Artifact(manifest, art.path, art.module)


def _record(art: Artifact, extra: dict[str, Any]) -> None:
    import os

    art.manifest.metrics.update(extra)
    path = art.path / "modelpress.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(art.manifest.model_dump_json(indent=2))
    os.replace(tmp, path)


def prune_model(
    model: Any,
    output: str | Path,
    config: Any,
    *,
    task: str | None = None,
    data: str | None = None,
    data_dir: str | Path | None = None,
    limit: int | None = None,
    max_drop: float = 0.05,
    threads: int | None = None,
    task_options: dict[str, Any] | None = None,
    measure_speed: bool = True,
    seconds: float = 2.0,
    overwrite: bool = False,
    progress: Any = None,
) -> dict[str, Any]:
    """Prune ``model`` with ``config`` into ``output``; evaluate, gate and measure it against the original."""
    from modelpress.api import as_artifact
    from modelpress.locations import find_data_dir
    from modelpress.optimize import techniques  # noqa: F401  (registers the handlers)
    from modelpress.optimize.configs import parse_step
    from modelpress.optimize.evaluation import Evaluator
    from modelpress.optimize.gate import GateConfig, check, flat_metrics
    from modelpress.optimize.handlers import StepContext, handler_for
    from modelpress.optimize.prune.sparse_store import speed_ratio

    say = progress or (lambda _d, _t: lambda _n: None)
    cfg = parse_step(config)
    original = as_artifact(model, task)
    ddir = find_data_dir(data_dir)
    evaluator = Evaluator(_with_options(original, task_options), data=data, data_dir=ddir, limit=limit, threads=threads)
    advance = say(f"evaluating the original {original.name} on {evaluator.dataset_name}", None)
    base = evaluator.original_result()
    advance(1)
    advance = say(f"pruning: {cfg.label()}", None)
    art = handler_for(cfg)(original, cfg, StepContext(Path(output), ddir, overwrite, threads))
    advance(1)
    advance = say(f"evaluating the pruned model on {cfg.runtime}", None)
    evaluation = evaluator.evaluate(_with_options(art, task_options), cfg.runtime)
    advance(1)
    verdict = check(flat_metrics(base), flat_metrics(evaluation), GateConfig.for_task(original.task, max_drop=max_drop))
    speed = None
    if measure_speed:
        advance = say(f"measuring speed on {cfg.runtime}: original, then pruned", None)
        speed = speed_ratio(original, art, runtime=cfg.runtime, threads=threads, seconds=seconds, data_dir=ddir)
        advance(1)
    _record(
        art,
        {
            "evaluation": {"dataset": evaluation["dataset"], "runtime": evaluation["runtime"], **flat_metrics(evaluation)},
            "gate": verdict.to_json(),
            "shippable": verdict.passed,
            "speed": speed,
        },
    )
    technique = art.manifest.metrics.get("technique", {})
    return {
        "model": original.name,
        "output": str(art.path),
        "config": cfg.to_step(),
        "label": cfg.label(),
        "dataset": evaluator.dataset_name,
        "original": base,
        "variant": evaluation,
        "gate": verdict.to_json(),
        "shippable": verdict.passed,
        "sparsity": technique.get("sparsity"),
        "model_sparsity": technique.get("model_sparsity"),
        "size": technique.get("size"),
        "speed": speed,
        "technique": technique,
    }


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
    sp = res.get("speed")
    if sp:
        shape = f"batch {sp['batch_size']}" + (f" x {sp['seq_len']} tokens" if sp.get("seq_len") else "")
        lo, hi = sp["throughput_ratio_range"]
        table.add_row(
            f"throughput on {sp['runtime']}, {shape}",
            f"{sp['original_items_per_s']:.1f} -> {sp['variant_items_per_s']:.1f} items/s: {sp['throughput_ratio']:.2f}x (rounds {lo:.2f}-{hi:.2f}x)",
        )
        lo, hi = sp["latency_ratio_range"]
        table.add_row(
            f"latency p50 on {sp['runtime']}, batch 1",
            f"{sp['original_p50_ms']:.2f} -> {sp['variant_p50_ms']:.2f} ms: {sp['latency_ratio']:.2f}x (rounds {lo:.2f}-{hi:.2f}x)",
        )
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
