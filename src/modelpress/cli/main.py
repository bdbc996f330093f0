"""The `modelpress` command. Every verb calls the Python function of the same name in api.py."""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from modelpress.cli import deploy
from modelpress.cli.common import (
    DataDirOpt,
    JsonOpt,
    TaskOpt,
    ThreadsOpt,
    TokOpt,
    VerboseOpt,
    console,
    emit_json,
    handle_errors,
    out,
    parse_kv,
    progress_bars,
    show_third_party_noise,
)
from modelpress.errors import ConfigError
from modelpress.export import FORMATS as EXPORT_FORMATS

app = typer.Typer(
    name="modelpress",
    help="Optimize, export, validate, benchmark, version and serve a trained model.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


@app.callback()
def _root(verbose: VerboseOpt = False) -> None:
    if verbose:
        show_third_party_noise()


@app.command()
@handle_errors
def info(
    model: Annotated[str, typer.Argument(help="Model folder, .onnx file, or short name (minilm).")],
    task: TaskOpt = None,
    tokenizer: TokOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Show a model's task, format, signature, settings and size."""
    from modelpress import api

    data = api.info(model, task=task, tokenizer=tokenizer)
    if as_json:
        emit_json(data)
        return
    from rich.table import Table

    table = Table(title=f"modelpress info: {data['name']}", title_justify="left", show_header=False)
    for key in ("task", "format", "path", "architecture", "parameters", "size_bytes"):
        if data.get(key) is not None:
            table.add_row(key, f"{data[key]:,}" if isinstance(data[key], int) else str(data[key]))
    sig = data.get("signature") or {}
    for io in ("inputs", "outputs"):
        for spec in sig.get(io, []):
            table.add_row(io[:-1], f"{spec['name']}: {spec['dtype']}{spec['shape']}")
    for k, v in (data.get("task_config") or {}).items():
        table.add_row(f"task.{k}", str(v))
    out.print(table)


@app.command()
@handle_errors
def evaluate(
    model: Annotated[str, typer.Argument(help="Model folder, .onnx file, or short name (minilm).")],
    task: TaskOpt = None,
    data: Annotated[
        str | None,
        typer.Option(
            "--data",
            "-d",
            help="Dataset name (stsb-dev, sst2-dev, trec-test, mnist-test, wikitext2-test, tinystories), file, or hf:NAME:SPLIT.",
        ),
    ] = None,
    runtime: Annotated[
        str | None,
        typer.Option(
            "--runtime",
            "-r",
            help="torch, onnxruntime, openvino, aoti, torchscript, executorch (default: the one the model's manifest records, else torch).",
        ),
    ] = None,
    threads: ThreadsOpt = None,
    data_dir: DataDirOpt = None,
    batch_size: Annotated[int | None, typer.Option("--batch-size", help="Batch size for evaluation.")] = None,
    limit: Annotated[int | None, typer.Option("--limit", help="Use only the first N examples.")] = None,
    columns: Annotated[list[str] | None, typer.Option("--columns", help="Map columns of a user file: NAME=COLUMN (repeatable).")] = None,
    reference: Annotated[str | None, typer.Option("--reference", help="Compare outputs with this model (e.g. the original).")] = None,
    option: Annotated[
        list[str] | None,
        typer.Option("--option", "-o", help="Task setting KEY=VALUE, e.g. context=256, stride=128, max_eval_tokens=20000."),
    ] = None,
    tokenizer: TokOpt = None,
    engine: Annotated[
        str | None,
        typer.Option(
            "--engine",
            help="Causal LMs: also generate with this engine (torch, openvino, onnxruntime, llamacpp, auto) against the reference.",
        ),
    ] = None,
    engine_option: Annotated[
        list[str] | None, typer.Option("--engine-option", help="The engine's setting KEY=VALUE, e.g. quantize=int4 (repeatable).")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Score a model on a dataset with its task's metric."""
    from modelpress import api
    from modelpress.bench.report import eval_table, generation_table

    cols = {k: str(v) for k, v in parse_kv(columns, "Column mapping", "--columns text=review").items()}
    opts = parse_kv(option, "Option", "--option context=256")
    with progress_bars(not as_json or sys.stderr.isatty()) as prog:
        result = api.evaluate(
            model,
            task=task,
            data=data,
            runtime=runtime,
            threads=threads,
            data_dir=data_dir,
            batch_size=batch_size,
            limit=limit,
            columns=cols or None,
            reference=reference,
            tokenizer=tokenizer,
            task_options=opts or None,
            engine=engine,
            engine_options=parse_kv(engine_option, "Engine option", "--engine-option quantize=int4") or None,
            progress=prog,
        )
    if as_json:
        emit_json(result)
    else:
        out.print(eval_table(result))
        if result.get("generation"):
            out.print(generation_table([result["generation"]], f"Generation with the {engine} engine against the torch reference"))


@app.command()
@handle_errors
def bench(
    model: Annotated[str, typer.Argument(help="Model folder, .onnx file, or short name (minilm).")],
    runtime: Annotated[
        list[str] | None,
        typer.Option(
            "--runtime",
            "-r",
            help="Runtime to measure (repeatable): torch, onnxruntime, openvino, aoti, torchscript, executorch "
            "(default: the manifest's, else torch).",
        ),
    ] = None,
    baseline: Annotated[
        str | None,
        typer.Option(
            "--baseline",
            "-b",
            help="Measured in the same run; figures are also shown as ratios to it: a runtime (torch), MODEL@RUNTIME, or MODEL.",
        ),
    ] = None,
    task: TaskOpt = None,
    threads: ThreadsOpt = None,
    batch_sizes: Annotated[str, typer.Option("--batch-sizes", help="Comma-separated batch sizes for throughput.")] = "1,8,32",
    seq_lens: Annotated[str, typer.Option("--seq-lens", help="Comma-separated sequence lengths (text tasks).")] = "16,128",
    seconds: Annotated[float, typer.Option("--seconds", help="Time per measured figure.")] = 2.0,
    data_dir: DataDirOpt = None,
    tokenizer: TokOpt = None,
    output: Annotated[Path | None, typer.Option("--output", help="Also write the JSON report to this file.")] = None,
    engine: Annotated[
        list[str] | None,
        typer.Option(
            "--engine",
            help="Causal LMs: also time decode tokens/s at batch 1 on this engine (repeatable): torch, openvino, onnxruntime, llamacpp.",
        ),
    ] = None,
    engine_option: Annotated[
        list[str] | None,
        typer.Option("--engine-option", help="ENGINE.KEY=VALUE, e.g. openvino.quantize=int4 or llamacpp.quantize=q4_0 (repeatable)."),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Latency percentiles, throughput by batch size, memory and size, on one or more runtimes."""
    from modelpress import api
    from modelpress.bench.measure import BenchConfig
    from modelpress.bench.report import bench_table, generation_table

    def ints(text: str, what: str) -> list[int]:
        try:
            return [int(x) for x in text.split(",") if x.strip()]
        except ValueError:
            raise ConfigError(f"{what} '{text}' is not a comma-separated list of integers.", hint=f"Example: --{what} 1,8,32") from None

    cfg = BenchConfig(batch_sizes=ints(batch_sizes, "batch-sizes"), seq_lens=ints(seq_lens, "seq-lens"), seconds=seconds)
    with progress_bars(not as_json or sys.stderr.isatty()) as prog:
        report = api.bench(
            model,
            runtimes=runtime or None,
            baseline=baseline,
            task=task,
            threads=threads,
            config=cfg,
            data_dir=data_dir,
            tokenizer=tokenizer,
            engines=engine or None,
            engine_options=_engine_options(engine_option),
            progress=prog,
        )
    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(report, indent=2, default=str))
    if as_json:
        emit_json(report)
    else:
        out.print(bench_table(report))
        if report.get("generation"):
            out.print(generation_table(report["generation"], "Decode speed at batch 1"))


def _engine_options(items: list[str] | None) -> dict[str, dict[str, object]] | None:
    """``["openvino.quantize=int4"]`` -> ``{"openvino": {"quantize": "int4"}}``."""
    out: dict[str, dict[str, object]] = {}
    for key, value in parse_kv(items, "Engine option", "--engine-option openvino.quantize=int4").items():
        name, dot, setting = key.partition(".")
        if not dot or not name or not setting:
            raise ConfigError(
                f"Engine option '{key}' must name its engine: ENGINE.KEY=VALUE.", hint="Example: --engine-option openvino.quantize=int4"
            )
        out.setdefault(name, {})[setting] = value
    return out or None


@app.command()
@handle_errors
def export(
    model: Annotated[str, typer.Argument(help="Model folder, short name (minilm), or with --to a registry reference (NAME@production).")],
    dest: deploy.DestArg = None,
    fmt: Annotated[str, typer.Option("--format", "-f", help=f"One of: {', '.join(EXPORT_FORMATS)}.")] = "onnx",
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder to write the exported artifact to.")] = Path("exported"),
    to: deploy.ToOpt = None,
    task: TaskOpt = None,
    tokenizer: TokOpt = None,
    force: Annotated[bool, typer.Option("--force", help="Replace the output folder if it exists.")] = False,
    legacy: Annotated[bool, typer.Option("--legacy", help="ONNX: use the TorchScript exporter instead of dynamo.")] = False,
    runtime: deploy.RuntimeOpt = None,
    name: deploy.NameOpt = None,
    registry: deploy.RegistryOpt = None,
    max_batch_size: deploy.MaxBatchOpt = 32,
    max_queue_delay_ms: deploy.DelayOpt = 5.0,
    max_queue_size: deploy.QueueOpt = 1024,
    instances: deploy.InstancesOpt = 1,
    pad_to_length: deploy.PadOpt = None,
    storage_uri: deploy.StorageOpt = "s3://models/modelpress",
    image: deploy.ImageOpt = None,
    min_replicas: deploy.MinRepOpt = 1,
    max_replicas: deploy.MaxRepOpt = 3,
    scale_metric: deploy.MetricOpt = "concurrency",
    scale_target: deploy.TargetOpt = None,
    cpu: deploy.CpuOpt = "2",
    memory: deploy.MemOpt = "4Gi",
    gpus: deploy.GpuOpt = 0,
    namespace: deploy.NamespaceOpt = None,
    deployment_mode: deploy.ModeOpt = None,
    rollout: deploy.RolloutOpt = True,
    as_json: JsonOpt = False,
) -> None:
    """Export to another format (checked against its source before it is written), or with --to kserve|triton
    write what KServe (an InferenceService) or Triton (a model repository) serves."""
    from modelpress import api

    if to is not None:
        options = {
            k: v
            for k, v in locals().items()
            if k not in {"api", "model", "dest", "fmt", "output", "to", "task", "tokenizer", "force", "legacy", "as_json"}
        }
        deploy.export_to(to, model, dest or output, force=force, as_json=as_json, options=options)
        return
    if dest is not None:
        raise ConfigError(
            f"'{dest}' is a destination, which only --to takes.",
            hint="Use -o DIR for an export, e.g. modelpress export minilm -f onnx -o out/minilm-onnx",
        )
    options = {"dynamo": False} if legacy and fmt == "onnx" else {}
    with progress_bars(not as_json) as prog:
        prog(f"exporting to {fmt} and checking parity", None)
        art = api.export(model, fmt, output, task=task, tokenizer=tokenizer, overwrite=force, **options)
    if as_json:
        emit_json(art.to_json())
        return
    parity = art.manifest.metrics.get("parity_max_abs_diff", {})
    diffs = ", ".join(f"{k} {v:.2g} (tol {parity.get(k + '_tolerance', 0):.2g})" for k, v in parity.items() if not k.endswith("_tolerance"))
    step = art.manifest.step or {}
    how = step.get("exporter") or step.get("export") or ""
    out.print(f"[green]wrote[/green] {art.path} ({fmt}{'; ' + str(how) if how else ''})")
    out.print(f"parity max-abs-diff: {diffs}")


@app.command()
@handle_errors
def run(
    model: Annotated[str, typer.Argument(help="Model folder or short name.")] = "minilm",
    budget: Annotated[str, typer.Option("--budget", help="Time for the tuner's search: 90s, 4m, 1h.")] = "4m",
    max_drop: Annotated[str, typer.Option("--max-drop", help="The primary metric may drop at most this much.")] = "1%",
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder for the chosen variant and the report.")] = Path("out/run"),
    no_register: Annotated[bool, typer.Option("--no-register", help="Do not record the model and its variants in the registry.")] = False,
    seconds: Annotated[float, typer.Option("--seconds", help="Time per measured figure.")] = 1.0,
    threads: ThreadsOpt = None,
    data_dir: DataDirOpt = None,
    serve: Annotated[
        bool | None,
        typer.Option("--serve/--no-serve", help="Then serve the chosen variant until Ctrl-C (default: when stdout is a terminal)."),
    ] = None,
    port: Annotated[int, typer.Option("--port", help="Port for --serve.")] = 8000,
    as_json: JsonOpt = False,
) -> None:
    """The main job: tune the model (evaluate, optimize, gate and benchmark every candidate against
    PyTorch eager), register the original and its variants, and print the table, the lineage and
    the report's path. Without a data folder, only the benchmark runs."""
    from modelpress.bench.report import bench_table
    from modelpress.cli.optimize import gate_table, parse_duration, parse_fraction, tune_table
    from modelpress.locations import find_data_dir
    from modelpress.optimize.api import run as run_job

    if find_data_dir(data_dir) is None:
        console.print(
            "[yellow]No data folder found: quality cannot be measured, so only the benchmark runs "
            "(set MODELPRESS_DATA or --data-dir).[/yellow]"
        )

    def show(p: Any) -> None:
        if not as_json:
            console.print(
                f"  measured {p.label}: {p.status}"
                + (f", recovery {p.recovery:.4f}, {p.throughput:.1f} items/s" if p.status == "measured" else f" ({p.error})"),
                highlight=False,
            )

    with progress_bars(not as_json) as prog:
        job = run_job(
            model,
            max_drop=parse_fraction(max_drop),
            budget_s=parse_duration(budget),
            output=output,
            threads=threads,
            data_dir=data_dir,
            bench_seconds=seconds,
            register=not no_register,
            progress=prog,
            on_point=show,
        )
    if job.tune is None:
        emit_json(job.to_json()) if as_json else out.print(bench_table(job.bench or {}))
        return
    res = job.tune
    if as_json:
        emit_json(job.to_json())
        return
    out.print(tune_table(res))
    if res.chosen is not None and res.chosen.gate:
        out.print(gate_table(res.chosen.gate["rows"], f"chosen: {res.chosen.label} ({res.chosen.speedup:.2f}x PyTorch fp32 eager)"))
    if job.lineage is not None:
        from modelpress.registry.lineage import render_tree

        out.print(render_tree(job.lineage))
    out.print(f"report: {res.report}")
    if (sys.stdout.isatty() if serve is None else serve) and res.chosen is not None:
        from modelpress.ship import serve_foreground

        ref = res.chosen.registered or res.chosen.artifact or model
        serve_foreground(
            ref,
            res.chosen.runtime if ref != model else "torch",
            ref.split(":")[0] if res.chosen.registered else res.model,
            port=port,
            announce=out.print,
        )


def _mount_subcommands() -> None:
    from modelpress.cli.catalog import register_commands as register_catalog

    register_catalog(app)
    from modelpress.cli.optimize import register_commands

    register_commands(app)
    from modelpress.cli.compare import register_commands as register_compare

    register_compare(app)
    with contextlib.suppress(ImportError):
        from modelpress.cli.registry import app as registry_app

        app.add_typer(registry_app, name="registry", help="Versions, lineage and stages of every model variant.")
    from modelpress.cli.serve import register_commands as register_serving

    register_serving(app)
    from modelpress.cli.prune import register_commands as register_prune

    register_prune(app)
    from modelpress.cli.distill import register_commands as register_distill

    register_distill(app)
    from modelpress.cli.rollout import register_commands as register_rollout

    register_rollout(app)
    from modelpress.cli.alerts import register_commands as register_alerts

    register_alerts(app)
    from modelpress.cli.ship import register_commands as register_ship

    register_ship(app)
    from modelpress.cli.chat import register_commands as register_chat

    register_chat(app)


_mount_subcommands()


def main() -> None:
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
