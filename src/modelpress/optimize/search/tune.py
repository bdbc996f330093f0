"""The accuracy-aware tuner: the fastest variant of a model, on this machine, that keeps its quality.

``tune(model, max_drop=0.01, budget_s=300)`` tries candidates (technique x parameters x runtime:
the hardware preset's configs, the peers' default recipes, and the unoptimized runtimes) until
the time budget is spent. Each candidate is built, evaluated against the original (the gate),
and benchmarked (throughput at batch 32 x 128 tokens for text, latency at batch 1). Every
measured point is kept; the result has the Pareto front of quality against throughput and the
choice: the fastest candidate that passes the gate.

Nothing is done twice: each candidate's result is cached under ``MODELPRESS_HOME/cache/tune`` by
(artifact hash, config, runtime, machine, dataset, measurement settings), so a tune that is
interrupted resumes where it stopped, and a second tune with a larger budget only measures
what is new.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from modelpress._fs import atomic_write_text, crash_point
from modelpress.artifacts import Artifact
from modelpress.errors import ArtifactError, ConfigError, GateFailedError, ModelpressError
from modelpress.optimize.configs import DynamicInt8, Precision, StaticInt8, TechniqueConfig, WeightOnly, parse_step
from modelpress.optimize.gate import GateConfig, check, flat_metrics, recovery
from modelpress.optimize.search.front import FIDELITY, Point, TuneResult, fidelity, pareto_front  # noqa: F401  (named here too)
from modelpress.progress import ProgressFactory, no_progress

BASELINE_RUNTIME = "torch"
CACHE_VERSION = 2  # bump when what a cached result means changes (2: speed-ups timed side by side with the baseline)
SPEED_ROUNDS = 3  # interleaved rounds of each candidate and the baseline


@dataclass
class Candidate:
    """One point to try: a technique config, or (config None) the model as it is on a runtime."""

    runtime: str
    config: TechniqueConfig | None = None
    peer: str | None = None  # the peer recipe this reproduces ("Optimum's default", ...)

    @property
    def label(self) -> str:
        return self.config.label() if self.config is not None else f"fp32@{self.runtime}"

    def key_data(self) -> dict[str, Any]:
        return {"runtime": self.runtime, "step": self.config.to_step() if self.config is not None else None}


# The peers' default recipes (PEERS.md), as modelpress configs, so they are measured in the same run.
def peer_candidates(task: str) -> list[Candidate]:
    text = task in ("embedding", "text-classification")
    peers = [
        Candidate(
            "onnxruntime",
            DynamicInt8(runtime="onnxruntime", per_channel=False, fuse=False),
            "Optimum/ORT dynamic int8 (default, per-tensor)",
        ),
        Candidate("torch", Precision(runtime="torch", dtype="bf16", compile=True), "torch.compile bf16 + freezing"),
        Candidate("openvino", Precision(runtime="openvino", dtype="bf16"), "OpenVINO bf16"),
        # OpenVINO runs bf16 by default on this kind of CPU; our runner asks for f32 unless told, so
        # the peers' OpenVINO recipes carry the bf16 hint they get implicitly.
        Candidate("openvino", StaticInt8(runtime="openvino", precision_hint="bf16"), "OpenVINO + NNCF static int8"),
        Candidate("openvino", WeightOnly(runtime="openvino", bits=8, precision_hint="bf16"), "OpenVINO NNCF int8 weight-only"),
        Candidate("torch", DynamicInt8(runtime="torch", compile=True), "torchao int8 dynamic + compile"),
    ]
    if text:
        peers.insert(
            1,
            Candidate(
                "onnxruntime", DynamicInt8(runtime="onnxruntime", per_channel=True, fuse=True), "ORT dynamic int8 per-channel, fused"
            ),
        )
    return peers


def default_candidates(task: str, preset: str | None = None, runtimes: list[str] | None = None) -> list[Candidate]:
    """The baseline, the preset's configs (its best guesses first), the peers' recipes, then the
    other runtimes unoptimized (duplicates removed): the likeliest winners are tried first, so a
    short budget still finds them."""
    from modelpress.optimize.search.presets import detect_preset, expand_preset

    cands = [Candidate(BASELINE_RUNTIME)]
    cands += [Candidate(cfg.runtime, cfg) for cfg in expand_preset(preset or detect_preset(), task)]
    peers = peer_candidates(task)
    for c in cands:  # a preset config that is also a peer's recipe is marked as that peer
        for peer in peers:
            if c.config is not None and peer.key_data() == c.key_data():
                c.peer = peer.peer
    cands += [*peers, Candidate("openvino"), Candidate("onnxruntime")]
    seen: set[str] = set()
    unique = []
    for c in cands:
        key = json.dumps(c.key_data(), sort_keys=True)
        if key in seen or (runtimes and c.runtime not in runtimes):
            continue
        seen.add(key)
        unique.append(c)
    return unique


def parse_candidates(items: list[Any]) -> list[Candidate]:
    """Candidates from data: a runtime name (the model as it is) or a technique step."""
    out = []
    for i, item in enumerate(items):
        if isinstance(item, Candidate):
            out.append(item)
        elif isinstance(item, str) and item in ("torch", "onnxruntime", "openvino"):
            out.append(Candidate(item))
        else:
            cfg = parse_step(item, where=f"candidate {i + 1}")
            out.append(Candidate(cfg.runtime, cfg))
    return out


def _machine_key(machine: dict[str, Any]) -> dict[str, Any]:
    return {k: machine.get(k) for k in ("cpu", "flags", "machine")}


def _write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, default=str))


def _cached_point(entry: Path) -> dict[str, Any] | None:
    """A cache entry's result, when complete: ``point.json`` (written last, atomically) and, for a
    variant, its artifact folder intact. Anything less (a run killed midway) is measured again."""
    try:
        data = json.loads((entry / "point.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict):
        return None
    if data.get("artifact"):
        try:
            if Artifact.open(data["artifact"]).verify():
                return None
        except (ArtifactError, OSError):
            return None
    return data


def tune(
    model: Any,
    *,
    task: str | None = None,
    data: str | None = None,
    data_dir: str | os.PathLike | None = None,
    max_drop: float = 0.01,
    min_agreement: float | None = None,
    gate: GateConfig | None = None,
    budget_s: float = 300.0,
    candidates: list[Any] | None = None,
    preset: str | None = None,
    runtimes: list[str] | None = None,
    limit: int | None = None,
    threads: int | None = None,
    batch_size: int = 32,
    seq_len: int = 128,
    bench_seconds: float = 1.0,
    output: str | os.PathLike | None = None,
    register: bool = False,
    registry: Any = None,
    name: str | None = None,
    use_cache: bool = True,
    report: bool = True,
    progress: ProgressFactory = no_progress,
    on_point: Callable[[Point], None] | None = None,
) -> TuneResult:
    """Search for the fastest variant of ``model`` that keeps quality; see the module docstring.

    ``max_drop``: the primary metric may lose at most this fraction (0.01 = 1%).
    ``min_agreement``: also require this top-10 / label / top-1 agreement with the original.
    ``budget_s``: wall-clock seconds for the whole search (the baseline is always measured).
    Raises :class:`GateFailedError` when no candidate passes the gate and ``output`` is None.
    """
    from modelpress.api import as_artifact
    from modelpress.bench.measure import BenchConfig, machine_info
    from modelpress.locations import cache_dir, find_data_dir
    from modelpress.optimize.step import Pipeline, Speed, speed_figures

    if not 0.0 <= max_drop < 1.0:
        raise ConfigError(f"max_drop must be a fraction in [0, 1), got {max_drop}.", hint="Example: --max-drop 1% (or 0.01)")
    if budget_s <= 0:
        raise ConfigError(f"The budget must be positive, got {budget_s} s.", hint="Example: --budget 5m")
    t_start = time.perf_counter()
    original = as_artifact(model, task)
    gate = gate or GateConfig.for_task(original.task, max_drop=max_drop, min_agreement=min_agreement)
    cands = parse_candidates(candidates) if candidates else default_candidates(original.task, preset, runtimes)
    if not any(c.config is None and c.runtime == BASELINE_RUNTIME for c in cands):
        cands.insert(0, Candidate(BASELINE_RUNTIME))
    ddir = find_data_dir(data_dir)
    machine = machine_info()
    reg = None
    if register:
        from modelpress.optimize.registering import open_registry

        reg = registry or open_registry()
    # Every candidate goes through the one step pipeline, timed side by side with the baseline
    # (the original on PyTorch eager) in interleaved rounds: its speed-up is measured, not derived.
    bcfg = BenchConfig(batch_sizes=[batch_size], seq_lens=[seq_len], seconds=bench_seconds, latency_calls=50, rounds=SPEED_ROUNDS)
    pipe = Pipeline(
        original,
        gate,
        data=data,
        data_dir=ddir,
        limit=limit,
        threads=threads,
        speed=Speed(bcfg, baseline_runtime=BASELINE_RUNTIME),
        registry=reg,
        name=name,
        progress=progress,
    )
    evaluator = pipe.evaluator
    text = evaluator.task.uses_tokenizer()
    settings = {
        "max_drop": max_drop,
        "min_agreement": min_agreement,
        "budget_s": budget_s,
        "batch_size": batch_size,
        "seq_len": seq_len if text else None,
        "bench_seconds": bench_seconds,
        "limit": limit,
        "threads": threads,
        "dataset": evaluator.dataset_name,
    }
    root = cache_dir("tune")
    src_hash = original.content_hash()

    base = pipe.baseline()  # the original's evaluation (and its registration)
    base_flat = flat_metrics(base)
    primary = evaluator.task.primary_metric
    reg_ref = pipe.original_ref

    points: list[Point] = []
    bar = progress(f"tuning {original.name} ({len(cands)} candidates, budget {budget_s:.0f} s)", len(cands))
    for cand in cands:
        is_baseline = cand.config is None and cand.runtime == BASELINE_RUNTIME
        key_data = {
            "v": CACHE_VERSION,
            "source": src_hash,
            **cand.key_data(),
            "machine": _machine_key(machine),
            "dataset": evaluator.dataset_name,
            "limit": limit,
            "bench": [batch_size, seq_len, bench_seconds],
            "threads": threads,
            "gate": gate.model_dump(mode="json"),
        }
        key = hashlib.sha256(json.dumps(key_data, sort_keys=True, default=str).encode()).hexdigest()[:24]
        entry = root / key
        point = Point(
            label=cand.label, runtime=cand.runtime, step=cand.config.to_step() if cand.config else None, peer=cand.peer, status="skipped"
        )
        data_ = _cached_point(entry) if use_cache else None
        if data_ is not None:
            point = Point(**{**data_, "peer": cand.peer, "cached": True, "on_front": False})
        elif not is_baseline and time.perf_counter() - t_start > budget_s:
            point.error = "not tried: the time budget was spent"
        else:
            t0 = time.perf_counter()
            try:
                if cand.config is None:  # the model as it is on a runtime: evaluated (its agreement is measured, not assumed) and timed
                    evaluation, verdict = pipe.judge(original, cand.runtime)
                    speed = pipe.measure(original, cand.runtime)
                else:
                    art_dir = entry / "artifact"
                    if art_dir.exists():
                        shutil.rmtree(art_dir)  # left by an interrupted run
                    step = pipe.step(cand.config, art_dir, runtime=cand.runtime, overwrite=True, register=False, errors="raise")
                    crash_point("tune-artifact")
                    evaluation, verdict, speed = step.evaluation or {}, step.gate or check(base_flat, {}, gate), step.speed
                    point.artifact = step.path
                flat = flat_metrics(evaluation)
                figures = speed_figures(speed)
                point.status = "measured"
                point.quality = flat
                point.recovery = recovery(primary, base_flat[primary], flat[primary]) if primary in flat and primary in base_flat else None
                point.throughput = figures.get("throughput_items_per_s")
                point.latency_p50_ms = figures.get("latency_p50_ms")
                point.latency_p99_ms = figures.get("latency_p99_ms")
                point.speedup = figures.get("speedup")
                point.size_bytes = (speed or {}).get("variant_size_bytes")
                point.gate = verdict.to_json()
                point.passed = verdict.passed
            except ModelpressError as exc:
                point.status, point.error = "failed", exc.message
            point.seconds = time.perf_counter() - t0
            if point.status != "skipped":
                _write_json(
                    entry / "point.json", {k: v for k, v in point.to_json().items() if k not in ("cached", "on_front", "registered")}
                )
                crash_point("tune-point")
        points.append(point)
        if on_point is not None:
            on_point(point)
        bar(1)

    for p in pareto_front(points, original.task):
        p.on_front = True
    passing = [p for p in points if p.status == "measured" and p.passed]
    chosen = max(passing, key=lambda p: p.throughput or 0.0) if passing else None

    result = TuneResult(
        original.name,
        original.task,
        evaluator.dataset_name,
        primary,
        base,
        points,
        chosen,
        gate.model_dump(mode="json"),
        machine,
        settings,
        registered_original=reg_ref,
    )
    if reg is not None:
        from modelpress.optimize.registering import metric_rows

        for p in passing:  # cached points too: registering the same files again returns their version
            if p.artifact:
                speed = {
                    "throughput_items_per_s": p.throughput,
                    "latency_p50_ms": p.latency_p50_ms,
                    "latency_p99_ms": p.latency_p99_ms,
                    "speedup": p.speedup,
                }
                rows = metric_rows(p.quality, speed, dataset=evaluator.dataset_name, runtime=p.runtime)
                p.registered = pipe.register(Artifact.open(p.artifact), reg_ref, rows)
    if output is not None:
        out = Path(output).resolve()
        out.mkdir(parents=True, exist_ok=True)
        result.output = str(out)
        if chosen is not None and chosen.artifact:
            target = out / "chosen"
            if target.exists():
                shutil.rmtree(target)
            shutil.copytree(chosen.artifact, target)
        if report:
            from modelpress.optimize.search.report import tune_report

            result.report = str(tune_report(result, out))
        _write_json(out / "tune.json", result.to_json())
    if chosen is None and output is None:
        raise GateFailedError(
            f"No candidate kept the quality gate ({len([p for p in points if p.status == 'measured'])} measured).",
            hint="Allow a larger drop (--max-drop 2%), a longer --budget, or add candidates.",
        )
    return result
