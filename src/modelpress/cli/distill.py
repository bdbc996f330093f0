"""The ``modelpress distill`` and ``modelpress prune-structured`` commands.

Both make one variant with a one-step recipe (:func:`modelpress.optimize.api.compress`), then
print the gate table (original against variant on the task's metric) and the speed-ups measured
side by side in the same run (:func:`modelpress.bench.measure.compare_speed`). ``--json`` prints
the same as JSON. Exit code 4 when the gate fails (the variant stays on disk, marked by the
report as not passing).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from modelpress.cli.common import DataDirOpt, JsonOpt, TaskOpt, ThreadsOpt, console, emit_json, handle_errors, out, progress_bars
from modelpress.errors import ConfigError

OutOpt = Annotated[Path, typer.Option("--output", "-o", help="Folder to write the new model to (an artifact with its manifest).")]
EvalDataOpt = Annotated[str | None, typer.Option("--eval-data", help="Dataset the gate scores on (default: the task's, e.g. stsb-dev).")]
LimitOpt = Annotated[int | None, typer.Option("--limit", help="Score on the first N examples only.")]
RuntimeOpt = Annotated[
    str, typer.Option("--runtime", "-r", help="Runtime the variant is scored and timed on (the original is scored on torch).")
]
BudgetOpt = Annotated[str, typer.Option("--budget", help="Wall-clock limit of the training: 90s, 10m.")]
BenchOpt = Annotated[
    int, typer.Option("--bench-rounds", help="Interleaved timing rounds of original and variant (0: do not measure speed).")
]
BatchOpt = Annotated[str, typer.Option("--bench-batch", help="Comma-separated batch sizes timed (text: at --seq-len tokens).")]
SeqOpt = Annotated[int, typer.Option("--seq-len", help="Tokens per input when timing text models.")]
EvalEveryOpt = Annotated[
    int | None, typer.Option("--eval-every", help="Evaluate on the held-out examples every N steps (early stopping, best weights).")
]
ForceOpt = Annotated[bool, typer.Option("--force", help="Replace the output folder if it exists.")]
NoCacheOpt = Annotated[bool, typer.Option("--no-cache", help="Train again even if this exact run is cached.")]


def _ints(text: str, what: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"--{what} '{text}' is not a comma-separated list of integers.", hint=f"Example: --{what} 0,3,5") from None
    if not values:
        raise ConfigError(f"--{what} is empty.", hint=f"Example: --{what} 0,3,5")
    return values


def _names(text: str | None) -> list[str] | None:
    return [x.strip() for x in text.split(",") if x.strip()] if text else None


def _training(
    max_steps: int | None,
    budget: str | None,
    lr: float | None,
    batch_size: int | None,
    data: str | None,
    samples: int | None,
    extra: dict[str, Any],
    *,
    default_eval_every: int,
) -> dict[str, Any]:
    """The training block from the options; only what was given, so equal runs share a cache entry."""
    from modelpress.cli.optimize import parse_duration

    cfg: dict[str, Any] = {k: v for k, v in extra.items() if v is not None}
    if max_steps is not None:
        cfg["max_steps"] = max_steps
        if "eval_every" not in cfg and max_steps < default_eval_every:  # the default would never run
            cfg["eval_every"] = None if max_steps < 4 else max_steps // 4
    if budget is not None:
        cfg["max_seconds"] = parse_duration(budget)
    if lr is not None:
        cfg["lr"] = lr
    if batch_size is not None:
        cfg["batch_size"] = batch_size
    if data:
        cfg["data"] = _names(data)
    if samples is not None:
        cfg["samples"] = samples
    return cfg


def _compress(
    model: str,
    cfg: dict[str, Any],
    output: Path,
    task: str | None,
    eval_data: str | None,
    data_dir: Path | None,
    limit: int | None,
    threads: int | None,
    max_drop: str,
    runtime: str,
    bench_rounds: int,
    bench_batch: str,
    seq_len: int,
    force: bool,
    as_json: bool,
) -> Any:
    """The one-step recipe of ``distill`` and ``prune-structured`` (:func:`modelpress.optimize.api.compress`),
    from the options they share, under progress bars."""
    from modelpress.cli.optimize import parse_fraction
    from modelpress.optimize.api import compress

    with progress_bars(not as_json or sys.stderr.isatty()) as prog:
        return compress(
            model,
            cfg,
            output,
            task=task,
            data=eval_data,
            data_dir=data_dir,
            limit=limit,
            threads=threads,
            max_drop=parse_fraction(max_drop),
            runtime=runtime,
            bench=bench_rounds > 0,
            rounds=bench_rounds or 1,
            batch_sizes=tuple(_ints(bench_batch, "bench-batch")),
            seq_len=seq_len,
            overwrite=force,
            progress=prog,
        )


def _show(res: Any, title: str, as_json: bool) -> None:
    from modelpress.cli.optimize import gate_table, speed_rows

    if as_json:
        emit_json(res.to_json())
    else:
        status = "[green]passed[/green]" if res.passed else "[red]failed[/red]"
        out.print(gate_table([r.to_json() for r in res.gate.rows], f"{title}: gate {status}"))
        t = res.technique.get("training") or (res.technique.get("finetune") or {}).get("training")
        if t:
            f = lambda v: "n/a" if v is None else f"{v:.4f}"  # noqa: E731
            out.print(
                f"training: {t['steps']} steps in {t['seconds']:.0f} s (stopped: {t['stopped']}); "
                f"held-out metric {f(t['first_metric'])} (untrained) "
                f"-> best {f(t['best_metric'])} at step {t['best_step']}" + (" (cached)" if res.technique.get("cached") else "")
            )
        for label, text in speed_rows(res.speed):
            out.print(f"{label} (original and variant measured side by side): {text}")
        out.print(f"-> {res.artifact.path}")
    if not res.passed:
        console.print(f"[bold red]the variant did not pass the gate:[/bold red] {res.gate.summary()}", highlight=False, soft_wrap=True)
        raise typer.Exit(4)


def distill_cmd(
    teacher: Annotated[str, typer.Argument(help="The teacher: a model folder or short name (minilm).")],
    output: OutOpt = Path("distilled"),
    layers: Annotated[
        int | None,
        typer.Option(
            "--layers", "-l", help="Student layers, picked evenly from the teacher (first and last kept). Default: every other layer."
        ),
    ] = None,
    layer_map: Annotated[
        str | None, typer.Option("--layer-map", help="Exactly these teacher layers, e.g. 0,3,5 (instead of --layers).")
    ] = None,
    data: Annotated[
        str | None,
        typer.Option(
            "--data", "-d", help="Training data, comma-separated names or files (default: the task's, e.g. stsb-train,sst2-train)."
        ),
    ] = None,
    samples: Annotated[int | None, typer.Option("--samples", help="At most this many training examples.")] = None,
    max_steps: Annotated[int | None, typer.Option("--max-steps", help="Training steps (default 2000).")] = None,
    budget: BudgetOpt = "10m",
    lr: Annotated[float | None, typer.Option("--lr", help="Peak learning rate (default 1e-4).")] = None,
    batch_size: Annotated[int | None, typer.Option("--batch-size", help="Training batch size (default 32).")] = None,
    eval_every: EvalEveryOpt = None,
    loss: Annotated[
        str | None,
        typer.Option("--loss", help="Embedding students: cosine, mse or similarity (in-batch similarity matrix) on the pooled embedding."),
    ] = None,
    hidden_weight: Annotated[
        float | None, typer.Option("--hidden-weight", help="Embedding students: weight of the matched hidden-state MSE.")
    ] = None,
    temperature: Annotated[float | None, typer.Option("--temperature", help="Classifiers and LMs: soft-label temperature.")] = None,
    alpha: Annotated[
        float | None, typer.Option("--alpha", help="Classifiers and LMs: weight of the soft labels (1 - alpha on hard labels).")
    ] = None,
    task: TaskOpt = None,
    eval_data: EvalDataOpt = None,
    limit: LimitOpt = None,
    max_drop: Annotated[str, typer.Option("--max-drop", help="Gate: the primary metric may drop this much (3% or 0.03).")] = "3%",
    runtime: RuntimeOpt = "torch",
    threads: ThreadsOpt = None,
    bench_rounds: BenchOpt = 6,
    bench_batch: BatchOpt = "32",
    seq_len: SeqOpt = 128,
    data_dir: DataDirOpt = None,
    no_cache: NoCacheOpt = False,
    force: ForceOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Distill a model into a student with fewer layers, then gate it and time it against the teacher."""
    from modelpress.optimize.distill.distill import DistillTraining

    if layers is not None and layer_map is not None:
        raise ConfigError("Give --layers or --layer-map, not both.", hint="Example: --layers 3, or --layer-map 0,3,5")
    extra = {"loss": loss, "hidden_weight": hidden_weight, "temperature": temperature, "alpha": alpha, "eval_every": eval_every}
    cfg = {"technique": "distill", "layers": _ints(layer_map, "layer-map") if layer_map else layers, "cache": not no_cache}
    cfg["training"] = _training(max_steps, budget, lr, batch_size, data, samples, extra, default_eval_every=DistillTraining().eval_every)
    res = _compress(
        teacher,
        cfg,
        output,
        task,
        eval_data,
        data_dir,
        limit,
        threads,
        max_drop,
        runtime,
        bench_rounds,
        bench_batch,
        seq_len,
        force,
        as_json,
    )
    m = res.technique
    _show(
        res,
        f"distill {teacher}: {m.get('teacher_layers')} -> {m.get('student_layers')} layers (teacher layers {m.get('layer_map')})",
        as_json,
    )


def prune_structured_cmd(
    model: Annotated[str, typer.Argument(help="Model folder or short name (minilm, a zoo CNN).")],
    output: OutOpt = Path("pruned"),
    ratio: Annotated[float, typer.Option("--ratio", help="Fraction of the channels / FFN neurons removed in each layer.")] = 0.5,
    targets: Annotated[
        str | None, typer.Option("--targets", help="channels (CNNs), ffn and/or heads (transformers), comma-separated.")
    ] = None,
    head_ratio: Annotated[
        float | None, typer.Option("--head-ratio", help="Fraction of attention heads removed (decoders; default: --ratio).")
    ] = None,
    importance: Annotated[str, typer.Option("--importance", help="auto, activation (calibration data) or magnitude.")] = "auto",
    round_to: Annotated[int | None, typer.Option("--round-to", help="Keep widths a multiple of this.")] = None,
    finetune: Annotated[
        bool, typer.Option("--finetune/--no-finetune", help="Recovery fine-tuning after pruning (on the task's training data).")
    ] = True,
    data: Annotated[
        str | None,
        typer.Option("--data", "-d", help="Fine-tuning data, comma-separated names or files (default: the task's training split)."),
    ] = None,
    samples: Annotated[int | None, typer.Option("--samples", help="At most this many fine-tuning examples.")] = None,
    max_steps: Annotated[int | None, typer.Option("--max-steps", help="Fine-tuning steps (default 300).")] = None,
    budget: BudgetOpt = "5m",
    lr: Annotated[float | None, typer.Option("--lr", help="Peak learning rate (default 1e-4).")] = None,
    batch_size: Annotated[int | None, typer.Option("--batch-size", help="Fine-tuning batch size (default 32).")] = None,
    eval_every: EvalEveryOpt = None,
    task: TaskOpt = None,
    eval_data: EvalDataOpt = None,
    limit: LimitOpt = None,
    max_drop: Annotated[str, typer.Option("--max-drop", help="Gate: the primary metric may drop this much (1% or 0.01).")] = "1%",
    runtime: RuntimeOpt = "torch",
    threads: ThreadsOpt = None,
    bench_rounds: BenchOpt = 6,
    bench_batch: BatchOpt = "32",
    seq_len: SeqOpt = 128,
    data_dir: DataDirOpt = None,
    no_cache: NoCacheOpt = False,
    force: ForceOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Remove whole channels, FFN neurons or heads, fine-tune to recover, then gate and time against the original."""
    from modelpress.optimize.prune.structured import RecoveryTraining

    cfg: dict[str, Any] = {
        "technique": "structured-prune",
        "ratio": ratio,
        "targets": _names(targets),
        "head_ratio": head_ratio,
        "importance": importance,
        "round_to": round_to,
        "cache": not no_cache,
    }
    extra = {"eval_every": eval_every}
    cfg["finetune"] = (
        _training(max_steps, budget, lr, batch_size, data, samples, extra, default_eval_every=RecoveryTraining().eval_every)
        if finetune
        else None
    )
    res = _compress(
        model, cfg, output, task, eval_data, data_dir, limit, threads, max_drop, runtime, bench_rounds, bench_batch, seq_len, force, as_json
    )
    m = res.technique
    if "widths_after" in m:
        widths = ", ".join(f"{k} {m['widths_before'][k]}->{v}" for k, v in m["widths_after"].items() if v != m["widths_before"][k])
    else:
        widths = ", ".join(f"{k} {m[k]['before']}->{m[k]['after']}" for k in ("ffn", "heads") if k in m)
    _show(res, f"prune-structured {model}: {widths}; parameters {m.get('parameters_before'):,} -> {m.get('parameters_after'):,}", as_json)


def register_commands(app: typer.Typer) -> None:
    app.command("distill")(handle_errors(distill_cmd))
    app.command("prune-structured")(handle_errors(prune_structured_cmd))
