"""The Python verbs. The CLI calls exactly these functions.

>>> import modelpress as mp
>>> mp.evaluate("minilm", data="stsb-dev")["metrics"]["spearman"]       # doctest: +SKIP
>>> mp.bench("minilm", runtimes=["torch", "onnxruntime"], baseline="torch")  # doctest: +SKIP
>>> mp.export("minilm", "onnx", "out/minilm-onnx")                       # doctest: +SKIP
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from typing import Any

from modelpress.artifacts import Artifact
from modelpress.bench.measure import BenchConfig, bench_runners, machine_info, ratios
from modelpress.datasets import load_dataset
from modelpress.errors import ConfigError
from modelpress.locations import find_data_dir
from modelpress.progress import ProgressFactory, no_progress
from modelpress.runtimes import RUNTIMES, create_runner, runtime_of
from modelpress.sources import describe, load
from modelpress.tasks import get_task_class, task_for

ModelLike = Any  # a path, a short name, a torch.nn.Module, or an Artifact


def as_artifact(model: ModelLike, task: str | None = None, **load_options: Any) -> Artifact:
    if isinstance(model, Artifact):
        return model
    return load(model, task, **load_options)


def info(model: ModelLike, *, task: str | None = None, tokenizer: str | None = None) -> dict[str, Any]:
    """What modelpress knows about a model: task, format, signature, task settings, size."""
    art = as_artifact(model, task, tokenizer=tokenizer)
    if art.manifest.signature is None:
        from modelpress.runtimes.torch import load_torch_module

        if art.format in ("hf", "torch"):
            _, art.manifest.signature = load_torch_module(art)
    return describe(art)


def evaluate(
    model: ModelLike,
    *,
    task: str | None = None,
    data: str | os.PathLike | None = None,
    runtime: str | None = None,
    threads: int | None = None,
    data_dir: str | os.PathLike | None = None,
    batch_size: int | None = None,
    limit: int | None = None,
    columns: dict[str, str] | None = None,
    reference: ModelLike | None = None,
    reference_runtime: str | None = None,
    tokenizer: str | None = None,
    task_options: dict[str, Any] | None = None,
    runtime_options: dict[str, Any] | None = None,
    engine: str | None = None,
    engine_options: dict[str, Any] | None = None,
    progress: ProgressFactory = no_progress,
) -> dict[str, Any]:
    """Score ``model`` on ``data`` (the task's default dataset if None).

    ``reference``: another model (usually the original) whose outputs ``model`` is compared
    with on the same data (embedding cosine and top-10 overlap, label agreement, top-1 token
    agreement). ``task_options`` override task settings, e.g. ``{"context": 256, "stride": 128}``
    or ``{"max_eval_tokens": 20000}`` for causal-lm perplexity. ``runtime`` / ``reference_runtime``
    None: the runtime each artifact's manifest records (an optimized variant's), else torch.
    ``engine`` (causal LMs): also generate through that generation engine (``torch``,
    ``openvino``, ``onnxruntime``, ``llamacpp``, ``auto``; ``engine_options`` e.g. ``{"quantize": "int4"}``) and report under
    ``generation`` how its greedy continuations of the dataset's first texts follow the torch
    reference engine's, and its decode tokens/s.
    """
    art = as_artifact(model, task, tokenizer=tokenizer).with_task_options(task_options)
    if engine is not None and art.task != "causal-lm":
        raise ConfigError(f"engine= generates text: it needs a causal-lm model, not {art.task}.", hint="Drop --engine for this model.")
    tsk = task_for(art)
    ds = load_dataset(data or tsk.default_dataset, tsk.dataset_kind, data_dir_=data_dir, columns=columns, limit=limit)
    runner = create_runner(art, runtime, threads=threads, **(runtime_options or {}))
    t0 = time.perf_counter()
    runner.load()
    kwargs = {"batch_size": batch_size} if batch_size else {}
    advance = progress(f"evaluating {art.name} on {ds.name}", tsk.eval_size(ds))
    metrics = tsk.evaluate(runner, ds, progress=advance, **kwargs)
    result: dict[str, Any] = {
        "model": art.name,
        "task": tsk.name,
        "dataset": ds.name,
        "runtime": runner.name,
        "runtime_options": runner.describe(),
        "metrics": metrics,
        "primary_metric": tsk.primary_metric,
    }
    if reference is not None:
        ref_art = as_artifact(reference, art.task, tokenizer=tokenizer).with_task_options(task_options)
        ref_runner = create_runner(ref_art, reference_runtime, threads=threads)
        progress(f"comparing with {ref_art.name} on {ref_runner.name}", None)
        result["agreement"] = tsk.agreement(runner, ref_runner, ds, **kwargs)
        result["reference"] = {"model": ref_art.name, "runtime": ref_runner.name}
    if engine is not None:
        progress(f"generating with the {engine} engine", None)
        result["generation"] = _evaluate_generation(art, ds.texts(), engine, engine_options or {})
    result["seconds"] = time.perf_counter() - t0
    return result


GENERATION_PROMPTS = 4  # dataset texts whose first tokens prompt the engine and the reference in evaluate
GENERATION_TOKENS = 32  # new greedy tokens per prompt (evaluate) and per timed request (bench)


def _evaluate_generation(art: Artifact, texts: Sequence[str], engine: str, options: dict[str, Any]) -> dict[str, Any]:
    from modelpress.generation import create_engine
    from modelpress.generation.measure import decode_speed, greedy_agreement, prompts_from_texts

    if art.format in ("onnx", "openvino"):  # an exported decoder (ONNX, OpenVINO IR) has no torch model to compare with
        raise ConfigError(
            f"evaluate --engine compares the engine with the torch engine, which needs the Hugging Face folder; "
            f"'{art.name}' is a '{art.format}' export.",
            hint="Evaluate the original folder with the engine, e.g. "
            "modelpress evaluate ../shared/data/models/stories260k --engine onnxruntime",
        )
    eng, ref = create_engine(art, engine, **options), create_engine(art, "torch")
    eng.start()
    ref.start()
    try:
        prompts = prompts_from_texts(ref, texts, GENERATION_PROMPTS)
        out = greedy_agreement(eng, ref, prompts, tokens=GENERATION_TOKENS)
        if prompts:
            out.update(decode_speed(eng, prompts[0], tokens=GENERATION_TOKENS, rounds=1))
        return out
    finally:
        eng.stop(drain=False)
        ref.stop(drain=False)


def _parse_baseline(baseline: str | None, model: ModelLike) -> tuple[ModelLike, str] | None:
    """``torch`` -> the same model on torch; ``MODEL@RUNTIME`` or ``MODEL`` -> that model."""
    if baseline is None:
        return None
    if baseline in RUNTIMES:
        return model, baseline
    if "@" in baseline:
        spec, rt = baseline.rsplit("@", 1)
        if rt not in RUNTIMES:
            raise ConfigError(f"Unknown runtime '{rt}' in baseline '{baseline}'.", hint="Example: --baseline minilm@torch")
        return spec, rt
    return baseline, "torch"


def bench(
    model: ModelLike,
    *,
    runtimes: Sequence[str] | None = None,
    baseline: str | None = None,
    task: str | None = None,
    threads: int | None = None,
    config: BenchConfig | None = None,
    data_dir: str | os.PathLike | None = None,
    tokenizer: str | None = None,
    runtime_options: dict[str, dict[str, Any]] | None = None,
    engines: Sequence[str] | None = None,
    engine_options: dict[str, dict[str, Any]] | None = None,
    progress: ProgressFactory = no_progress,
) -> dict[str, Any]:
    """Benchmark ``model`` on each runtime, and the baseline in the same run.

    ``runtimes`` None: the runtime the model's manifest records (an optimized variant's), else torch.
    ``baseline``: a runtime name (the same model on it), ``MODEL@RUNTIME``, or ``MODEL``.
    Every runner is loaded together and timed in ``config.rounds`` interleaved rounds
    (:func:`modelpress.bench.measure.time_interleaved`). The report holds every result, the
    machine, and ratios of each result to the baseline (medians of the per-round ratios).
    ``engines`` (causal LMs): generation engines whose decode tokens/s at batch 1 is measured too
    (report key ``generation``); ``engine_options`` per engine, e.g. ``{"openvino": {"quantize": "int4"}}``.
    """
    cfg = config or BenchConfig()
    art = as_artifact(model, task, tokenizer=tokenizer)
    if engines and art.task != "causal-lm":
        raise ConfigError(
            f"engines= time text generation: they need a causal-lm model, not {art.task}.", hint="Drop --engine for this model."
        )
    ddir = find_data_dir(data_dir)
    plan: list[tuple[Artifact, str]] = []
    base = _parse_baseline(baseline, art)
    if base is not None:
        plan.append((as_artifact(base[0], art.task, tokenizer=tokenizer), base[1]))
    for rt in runtimes or [runtime_of(art)]:
        if base is not None and base[0] is art and base[1] == rt:
            continue  # the baseline row already measures this
        plan.append((art, rt))
    advance = progress(f"benchmarking ({cfg.rounds} interleaved rounds)", cfg.rounds)
    runners = [create_runner(a, rt, threads=threads, **(runtime_options or {}).get(rt, {})) for a, rt in plan]
    tasks = {id(a): task_for(a) for a, _ in plan}  # one task per model: its runners share the same inputs
    try:
        # Every runner side by side, in interleaved rounds: the ratios to the baseline are per-round ratios.
        results = bench_runners(
            runners,
            [tasks[id(a)] for a, _ in plan],
            cfg,
            data_dir=ddir,
            progress=lambda msg: advance(1) if msg.startswith("round") else None,
        )
    finally:
        for runner in runners:
            runner.close()
    report: dict[str, Any] = {"machine": machine_info(), "results": results, "baseline_index": 0 if base is not None else None}
    if base is not None:
        report["ratios"] = {str(i): ratios(r, results[0]) for i, r in enumerate(results) if i != 0}
    if engines:
        report["generation"] = _bench_generation(art, engines, engine_options or {}, cfg.rounds, threads)
    return report


def _bench_generation(art: Artifact, engines: Sequence[str], options: dict[str, dict[str, Any]], rounds: int, threads: int | None) -> list:
    """Decode tokens/s at batch 1 of each engine, one engine loaded at a time (a 16-token prompt from the task's sample text)."""
    from modelpress.generation import create_engine
    from modelpress.generation.measure import decode_speed, prompts_from_texts

    out = []
    for name in engines:
        eng = create_engine(art, name, **({"threads": threads} if threads else {}), **options.get(name, {}))
        eng.start()
        try:
            prompts = prompts_from_texts(eng, task_for(art).sample_raw(8), 1) or [eng.encode("Once upon a time")]
            out.append(decode_speed(eng, prompts[0], tokens=GENERATION_TOKENS, rounds=rounds))
        finally:
            eng.stop(drain=False)
    return out


def export(
    model: ModelLike,
    fmt: str,
    output: str | os.PathLike,
    *,
    task: str | None = None,
    tokenizer: str | None = None,
    overwrite: bool = False,
    **options: Any,
) -> Artifact:
    """Export ``model`` to ``fmt`` (one of ``modelpress.export.FORMATS``) at ``output``, checked for parity."""
    from modelpress.export import export as _export

    return _export(as_artifact(model, task, tokenizer=tokenizer), fmt, output, overwrite=overwrite, **options)


def list_datasets() -> dict[str, str]:
    from modelpress.datasets import NAMED

    return {name: desc for name, (_, desc) in NAMED.items()}


def list_tasks() -> dict[str, str]:
    from modelpress.tasks import TASKS

    return {name: f"{cls.primary_metric} on {cls.default_dataset}" for name, cls in TASKS.items()}


__all__ = ["as_artifact", "bench", "evaluate", "export", "get_task_class", "info", "list_datasets", "list_tasks", "load"]
