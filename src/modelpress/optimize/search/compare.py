"""Model selection: several models of one task on one machine, and the one to ship for a stated goal.

``modelpress compare MODEL_A MODEL_B ... --task T --data D`` (:func:`compare`):

1. every model is loaded (with ``tune``, each one's best variant is found first by
   :func:`modelpress.optimize.search.tune.tune` and takes its place);
2. each is scored on the same dataset (the task's primary metric; for causal LMs also bits per
   byte, which, unlike perplexity per token, does not depend on the tokenizer);
3. all of them are timed together in one process, in interleaved rounds
   (:func:`modelpress.bench.measure.bench_runners`), so a busy machine slows a round of every
   model alike and their ratios hold: latency p50/p99 at batch 1, throughput at one batch size,
   the memory each adds when loaded, the size on disk;
4. the cost per million requests is the price per hour (``price_per_hour`` or an instance preset
   of ``instances.yaml``) over the requests an hour serves at the measured throughput;
5. the recommendation is the cheapest model that meets every goal (``max_p99_ms``,
   ``min_quality``, ``max_cost_per_million``), with the reason each other model was not chosen.
   Without a price, cheapest means highest throughput (at any one price the cost is proportional
   to 1 / throughput).
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modelpress.errors import ConfigError, TaskMismatchError
from modelpress.progress import ProgressFactory, no_progress

SECONDS_PER_HOUR = 3600.0
PER_MILLION = 1_000_000.0
# Models whose cost (or, without a price, throughput) differs by less than this are a tie; the tie
# goes to the better quality. Interleaved rounds on a loaded machine move a throughput by a few percent.
COST_TIE = 0.02
INSTANCES_FILE = "instances.yaml"


@dataclass
class Price:
    """What an hour of the machine costs, and where that figure comes from."""

    usd_per_hour: float
    instance: str | None = None
    source: str = "--price-per-hour"
    as_of: str | None = None
    details: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def instances() -> dict[str, dict[str, Any]]:
    """The instance presets shipped with modelpress (``instances.yaml``): name -> price and its source."""
    from importlib import resources

    import yaml  # type: ignore[import-untyped]  # no stubs installed (types-PyYAML)

    text = resources.files("modelpress.optimize.search").joinpath(INSTANCES_FILE).read_text()
    return dict(yaml.safe_load(text)["instances"])


def resolve_price(price_per_hour: float | None = None, instance: str | None = None) -> Price | None:
    """``price_per_hour`` (USD) wins; else the ``instance`` preset's price; else None (no cost)."""
    if price_per_hour is not None:
        if not math.isfinite(price_per_hour) or price_per_hour <= 0:
            raise ConfigError(
                f"The price per hour must be a positive number of USD, got {price_per_hour}.", hint="Example: --price-per-hour 0.085"
            )
        return Price(float(price_per_hour), instance=instance)
    if instance is None:
        return None
    table = instances()
    if instance not in table:
        raise ConfigError(f"Unknown instance '{instance}'.", hint=f"Instances: {', '.join(table)}. Example: --instance aws-c7i.large")
    entry = table[instance]
    return Price(float(entry["usd_per_hour"]), instance=instance, source=str(entry["source"]), as_of=str(entry.get("as_of")), details=entry)


@dataclass
class Goal:
    """What the recommended model must meet; None: no bound."""

    max_p99_ms: float | None = None
    min_quality: float | None = None  # in the metric's direction: a ceiling for perplexity / bits per byte
    max_cost_per_million: float | None = None

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def describe(self, metric: str, higher_is_better: bool) -> str:
        parts = []
        if self.max_p99_ms is not None:
            parts.append(f"p99 <= {self.max_p99_ms:g} ms")
        if self.min_quality is not None:
            parts.append(f"{metric} {'>=' if higher_is_better else '<='} {self.min_quality:g}")
        if self.max_cost_per_million is not None:
            parts.append(f"cost <= ${self.max_cost_per_million:g} per million requests")
        return ", ".join(parts) or "no bound: the cheapest"


@dataclass
class Entry:
    """One compared model: its figures, whether it meets the goal, and why it was (not) recommended."""

    label: str
    model: str
    path: str
    runtime: str
    quality: float | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    p50_ms: float | None = None
    p99_ms: float | None = None
    throughput: float | None = None  # items/s at the compare's batch size
    throughput_spread: list[float] | None = None
    speedup: float | None = None  # throughput against the first model: the median of the per-round ratios
    speedup_range: list[float] | None = None
    memory_mb: float | None = None  # RSS rise when loaded and warmed up
    size_bytes: int | None = None
    cost_per_million: float | None = None
    tuned_from: str | None = None  # with tune: the model it is the best variant of
    variant: str | None = None  # with tune: the chosen candidate's label
    meets: bool = False
    failed: list[str] = field(default_factory=list)  # the goals it misses, with its figure
    on_front: bool = False
    verdict: str = ""  # recommended, or why not

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class CompareResult:
    task: str
    dataset: str
    metric: str
    higher_is_better: bool
    entries: list[Entry]
    recommended: Entry | None
    goal: Goal
    price: Price | None
    machine: dict[str, Any]
    settings: dict[str, Any]
    notes: list[str] = field(default_factory=list)
    report: str | None = None

    @property
    def answer(self) -> str:
        """One sentence: the recommendation, or that none meets the goal."""
        goal = self.goal.describe(self.metric, self.higher_is_better)
        if self.recommended is None:
            return f"None meets the goal ({goal})."
        return f"Recommended: {self.recommended.label} ({goal})."

    @property
    def front(self) -> list[Entry]:
        return [e for e in self.entries if e.on_front]

    def to_json(self) -> dict[str, Any]:
        return {
            "task": self.task,
            "dataset": self.dataset,
            "metric": self.metric,
            "higher_is_better": self.higher_is_better,
            "recommended": self.recommended.label if self.recommended else None,
            "answer": self.answer,
            "goal": self.goal.to_json(),
            "price": self.price.to_json() if self.price else None,
            "front": [e.label for e in self.front],
            "entries": [e.to_json() for e in self.entries],
            "machine": self.machine,
            "settings": self.settings,
            "notes": self.notes,
            "report": self.report,
        }


def cost_per_million(usd_per_hour: float, items_per_s: float) -> float:
    """USD per million requests (one item each) served at ``items_per_s`` by a machine costing ``usd_per_hour``."""
    return usd_per_hour / (items_per_s * SECONDS_PER_HOUR) * PER_MILLION


def _better(a: float, b: float, higher_is_better: bool) -> bool:
    return a > b if higher_is_better else a < b


def pareto(entries: list[Entry], higher_is_better: bool) -> None:
    """Mark the entries no other beats on quality and cost (without a price: throughput) at once."""
    pts = [e for e in entries if e.quality is not None and e.throughput]
    for e in pts:
        e.on_front = not any(
            o is not e
            and (o.quality == e.quality or _better(o.quality or 0.0, e.quality or 0.0, higher_is_better))
            and (o.throughput or 0.0) >= (e.throughput or 0.0)
            and (o.quality != e.quality or o.throughput != e.throughput)
            for o in pts
        )


def recommend(entries: list[Entry], goal: Goal, metric: str, higher_is_better: bool) -> Entry | None:
    """The cheapest entry that meets every goal (ties within :data:`COST_TIE` go to the better quality); sets each verdict."""
    for e in entries:
        e.failed = []
        if goal.max_p99_ms is not None and (e.p99_ms is None or e.p99_ms > goal.max_p99_ms):
            e.failed.append(f"p99 {e.p99_ms:.2f} ms > {goal.max_p99_ms:g} ms" if e.p99_ms is not None else "no latency measured")
        if goal.min_quality is not None and (e.quality is None or _better(goal.min_quality, e.quality, higher_is_better)):
            sign = "<" if higher_is_better else ">"
            e.failed.append(f"{metric} {e.quality:.4g} {sign} {goal.min_quality:g}" if e.quality is not None else f"no {metric}")
        if goal.max_cost_per_million is not None and (e.cost_per_million is None or e.cost_per_million > goal.max_cost_per_million):
            e.failed.append(
                f"${e.cost_per_million:.4g} per million > ${goal.max_cost_per_million:g}" if e.cost_per_million is not None else "no cost"
            )
        e.meets = not e.failed
    ok = [e for e in entries if e.meets and e.throughput]
    best, near = None, []
    if ok:
        top = max(e.throughput or 0.0 for e in ok)
        near = [e for e in ok if (e.throughput or 0.0) >= top * (1 - COST_TIE)]
        direction = 1.0 if higher_is_better else -1.0
        best = max(near, key=lambda e: (direction * e.quality if e.quality is not None else -math.inf, e.throughput or 0.0))
    for e in entries:
        if e is best:
            e.verdict = "recommended: the cheapest that meets the goal" + (" (a near tie, better quality)" if len(near) > 1 else "")
        elif not e.meets:
            e.verdict = "misses the goal: " + "; ".join(e.failed)
        elif best is not None:
            if e.cost_per_million is not None and best.cost_per_million is not None:
                e.verdict = f"meets the goal but costs ${e.cost_per_million:.4g} per million, {best.label} ${best.cost_per_million:.4g}"
            else:
                e.verdict = f"meets the goal but serves {e.throughput or 0:.4g} items/s, {best.label} {best.throughput or 0:.4g}"
            if best.throughput and e.throughput and e.throughput >= best.throughput * (1 - COST_TIE):
                e.verdict = f"meets the goal, as cheap as {best.label} (within {COST_TIE:.0%}) but of lower {metric}"
    return best


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "model"


def _labels(models: list[Any], arts: list[Any]) -> list[str]:
    labels = [m if isinstance(m, str) else a.name for m, a in zip(models, arts, strict=True)]
    if len(set(labels)) != len(labels):
        dup = sorted({x for x in labels if labels.count(x) > 1})
        raise ConfigError(
            f"A model is named twice: {', '.join(dup)}.", hint="Compare different models, e.g. modelpress compare minilm out/minilm-pruned"
        )
    return labels


def _bits_per_byte(metrics: dict[str, float], dataset: Any, task: Any) -> float | None:
    """Causal LMs: the total negative log-likelihood in bits over the dataset's UTF-8 bytes (None when
    evaluation was cut to fewer tokens than the text: then the bytes scored are not known)."""
    if task.config.get("max_eval_tokens") or "nll_per_token" not in metrics or "tokens" not in metrics:
        return None
    docs = list(dataset.documents)
    texts = ["\n\n".join(docs)] if dataset.mode == "stream" else docs  # what CausalLMTask.token_streams scores
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    return metrics["nll_per_token"] * metrics["tokens"] / math.log(2) / n_bytes if n_bytes else None


def compare(
    models: list[Any],
    *,
    task: str | None = None,
    data: str | None = None,
    data_dir: str | os.PathLike | None = None,
    limit: int | None = None,
    runtime: str | None = None,
    threads: int | None = None,
    batch_size: int = 32,
    seq_len: int = 128,
    seconds: float = 2.0,
    rounds: int = 3,
    price_per_hour: float | None = None,
    instance: str | None = None,
    max_p99_ms: float | None = None,
    min_quality: float | None = None,
    max_cost_per_million: float | None = None,
    tune: bool = False,
    tune_budget_s: float = 300.0,
    max_drop: float = 0.01,
    tune_options: dict[str, Any] | None = None,
    output: str | os.PathLike | None = None,
    progress: ProgressFactory = no_progress,
) -> CompareResult:
    """Compare ``models`` (names, folders, artifacts) of one task on one machine; recommend one for the goal.

    ``runtime`` None: each model's own (an optimized variant's manifest records it), else torch.
    ``price_per_hour`` (USD) or ``instance`` (a preset of :func:`instances`) gives the cost per
    million requests. ``tune``: each model is replaced by its best variant
    (:func:`modelpress.optimize.search.tune.tune` with ``tune_budget_s``, ``max_drop`` and
    ``tune_options``), written under ``output/tuned/`` (without ``output``: the cache folder
    ``compare/tuned/``). ``output``: ``compare.json``, ``report.html`` and the plots are written there.
    """
    from modelpress.api import as_artifact, evaluate
    from modelpress.bench.measure import BenchConfig, bench_runners, machine_info, ratios
    from modelpress.datasets import load_dataset
    from modelpress.locations import cache_dir, find_data_dir
    from modelpress.runtimes import create_runner, runtime_of
    from modelpress.tasks import task_for

    if len(models) < 2:
        raise ConfigError(
            f"compare needs at least two models, got {len(models)}.", hint="Example: modelpress compare minilm out/minilm-pruned"
        )
    for name, v, example in (("max-p99-ms", max_p99_ms, "50"), ("max-cost-per-million", max_cost_per_million, "0.5")):
        if v is not None and (not math.isfinite(v) or v <= 0):
            raise ConfigError(f"--{name} must be a positive number, got {v}.", hint=f"Example: --{name} {example}")
    if min_quality is not None and not math.isfinite(min_quality):
        raise ConfigError(f"--min-quality must be a finite number, got {min_quality}.", hint="Example: --min-quality 0.8")
    # the timing settings are checked before anything is evaluated
    cfg = BenchConfig(batch_sizes=[batch_size], seq_lens=[seq_len], seconds=seconds, rounds=rounds)
    price = resolve_price(price_per_hour, instance)
    if max_cost_per_million is not None and price is None:
        raise ConfigError(
            "--max-cost-per-million needs a price: the cost is the price per hour over the measured throughput.",
            hint="Add --price-per-hour 0.085 or --instance aws-c7i.large",
        )
    goal = Goal(max_p99_ms, min_quality, max_cost_per_million)
    out_dir = Path(output) if output is not None else None
    arts = [as_artifact(m, task) for m in models]
    labels = _labels(list(models), arts)
    tasks = {a.task for a in arts}
    if len(tasks) > 1:
        raise TaskMismatchError(
            "The models are of different tasks: " + ", ".join(f"{lbl} is {a.task}" for lbl, a in zip(labels, arts, strict=True)) + ".",
            hint="Compare models of one task, e.g. modelpress compare minilm out/minilm-pruned --task embedding",
        )
    tsk0 = task_for(arts[0])
    ddir = find_data_dir(data_dir)
    notes: list[str] = []
    entries = [Entry(lbl, a.name, str(a.path), runtime or runtime_of(a)) for lbl, a in zip(labels, arts, strict=True)]

    if tune:
        from modelpress.optimize.search.tune import tune as run_tune

        for i, (e, a) in enumerate(zip(entries, arts, strict=True)):
            tuned = run_tune(
                a,
                data=data,
                data_dir=data_dir,
                limit=limit,
                threads=threads,
                batch_size=batch_size,
                seq_len=seq_len,
                budget_s=tune_budget_s,
                max_drop=max_drop,
                output=(out_dir or cache_dir("compare")) / "tuned" / _slug(e.label),
                register=False,
                progress=progress,
                **(tune_options or {}),
            )
            if tuned.chosen is None:
                notes.append(f"{e.label}: no variant kept the tune's gate; compared as it is")
                continue
            if tuned.chosen.artifact is not None:  # None: the model as it is, on the chosen runtime
                arts[i] = as_artifact(tuned.chosen.artifact)
            e.tuned_from, e.variant = e.label, tuned.chosen.label
            e.label, e.path, e.runtime = f"{e.label} ({tuned.chosen.label})", str(arts[i].path), tuned.chosen.runtime

    dataset_name = data or tsk0.default_dataset
    for e, a in zip(entries, arts, strict=True):
        ev = evaluate(a, data=data, data_dir=data_dir, limit=limit, runtime=e.runtime, threads=threads, progress=progress)
        dataset_name = ev["dataset"]
        e.metrics = {k: float(v) for k, v in ev["metrics"].items() if isinstance(v, int | float)}
    metric, higher = tsk0.primary_metric, tsk0.higher_is_better
    if tsk0.name == "causal-lm":
        corpus = load_dataset(data or tsk0.default_dataset, tsk0.dataset_kind, data_dir_=data_dir, limit=limit)
        for e, a in zip(entries, arts, strict=True):
            bpb = _bits_per_byte(e.metrics, corpus, task_for(a))
            if bpb is not None:
                e.metrics["bits_per_byte"] = bpb
        if all("bits_per_byte" in e.metrics for e in entries):
            metric = "bits_per_byte"
            notes.append("quality is bits per byte of the dataset's text: unlike perplexity per token, it does not depend on the tokenizer")
    for e in entries:
        e.quality = e.metrics.get(metric)

    advance = progress(f"timing {len(arts)} models ({rounds} interleaved rounds)", rounds)
    runners = []
    try:
        for e, a in zip(entries, arts, strict=True):
            runners.append(create_runner(a, e.runtime, threads=threads))
        results = bench_runners(
            runners,
            [task_for(a) for a in arts],
            cfg,
            data_dir=ddir,
            progress=lambda msg: advance(1) if msg.startswith("round") else None,
        )
    finally:
        for r in runners:
            r.close()
    for e, timing in zip(entries, results, strict=True):
        e.runtime = timing.get("runtime", e.runtime)
        e.p50_ms, e.p99_ms = timing["latency_ms"]["p50"], timing["latency_ms"]["p99"]
        thr = timing["throughput"][0]
        e.throughput, e.throughput_spread = thr["items_per_s"], thr["spread"]
        e.memory_mb, e.size_bytes = timing["memory_mb"]["rise"], timing["size_bytes"]
        rows = ratios(timing, results[0])["throughput_speedup"]  # paired per round: what holds on a busy machine
        if rows:
            e.speedup, e.speedup_range = rows[0]["speedup"], rows[0].get("range")
        if price is not None and e.throughput:
            e.cost_per_million = cost_per_million(price.usd_per_hour, e.throughput)
    pareto(entries, higher)
    best = recommend(entries, goal, metric, higher)
    shape = f"batch {batch_size}" + (f" x {seq_len} tokens" if tsk0.uses_tokenizer() else "")
    settings = {
        "batch_size": batch_size,
        "seq_len": seq_len if tsk0.uses_tokenizer() else None,
        "shape": shape,
        "seconds": seconds,
        "rounds": rounds,
        "threads": threads,
        "limit": limit,
        "tune": tune,
        "tune_budget_s": tune_budget_s if tune else None,
    }
    notes.append(
        f"timed together in one process, {rounds} interleaved rounds; throughput at {shape}; a request is one item, "
        "and the cost assumes the server keeps the machine busy at that batch size"
    )
    res = CompareResult(tsk0.name, dataset_name, metric, higher, entries, best, goal, price, machine_info(), settings, notes)
    if out_dir is not None:
        import json

        from modelpress.optimize.search.compare_report import compare_report

        out_dir.mkdir(parents=True, exist_ok=True)
        res.report = str(compare_report(res, out_dir))
        (out_dir / "compare.json").write_text(json.dumps(res.to_json(), indent=2, default=str))
    return res


__all__ = ["CompareResult", "Entry", "Goal", "Price", "compare", "cost_per_million", "instances", "recommend", "resolve_price"]
