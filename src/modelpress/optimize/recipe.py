"""Recipes: an ordered list of technique steps, each evaluated and gated before it ships.

A recipe is written in Python or YAML::

    name: minilm-int8
    mode: chain            # chain: each step works on the previous shipped artifact; branch: each on the original
    on_failure: stop       # stop at the first step that breaks the gate, or skip it and go on
    gate:                  # default: the task's primary metric keeps 99% (--max-drop)
      spearman: {min_recovery: 0.99}
      top10_agreement: {min_value: 0.9}
    steps:
      - {technique: dynamic-int8, runtime: onnxruntime, per_channel: true}
      - {technique: static-int8, runtime: openvino, calibration: {samples: 64}}

Unknown keys fail loudly with the valid keys listed, in the recipe and in every step.
:func:`run_recipe` writes each step's artifact (with its manifest: parent, config, metrics,
hashes, tool versions) under the output folder. A step that breaks the gate is moved to
``rejected/`` with its gate table in the manifest: it is never shippable and never registered.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator

from modelpress.artifacts import Artifact
from modelpress.errors import ConfigError, ModelpressError, OptimizationError
from modelpress.optimize.configs import Calibration, StrictModel, TechniqueConfig, parse_step
from modelpress.optimize.gate import GateConfig, GateResult, check, flat_metrics, parse_gate

Progress = Callable[[str, int | None], Callable[[int], None]]


def _quiet(_d: str, _t: int | None) -> Callable[[int], None]:
    return lambda _n: None


class Recipe(StrictModel):
    """An ordered list of technique steps with the gate they must pass."""

    name: str | None = None
    task: str | None = None
    data: str | None = None
    limit: int | None = Field(None, ge=1)
    mode: Literal["chain", "branch"] = "chain"
    on_failure: Literal["stop", "skip"] = "stop"
    gate: GateConfig | None = None
    steps: list[Any] = Field(min_length=1)

    def __init__(self, **data: Any) -> None:
        # Steps are parsed first, so a typo inside a step is reported with that step's valid keys.
        if isinstance(data.get("steps"), list):
            data["steps"] = [parse_step(s, where=f"step {i + 1}") for i, s in enumerate(data["steps"])]
        super().__init__(**data)

    @field_validator("gate", mode="before")
    @classmethod
    def _gate(cls, value: Any) -> GateConfig | None:
        return None if value is None else parse_gate(value)

    @field_validator("steps")
    @classmethod
    def _steps(cls, value: list[Any]) -> list[TechniqueConfig]:
        return [parse_step(s, where=f"step {i + 1}") for i, s in enumerate(value)]

    # -- reading and writing -----------------------------------------------------------
    @classmethod
    def from_dict(cls, data: Any, *, where: str = "recipe") -> Recipe:
        if isinstance(data, list):
            data = {"steps": data}
        if not isinstance(data, dict):
            raise ConfigError(
                f"The {where} must be a mapping with 'steps', got {type(data).__name__}.",
                hint="Example:\nsteps:\n  - {technique: dynamic-int8, per_channel: true}",
            )
        try:
            return cls(**data)
        except ConfigError as exc:
            raise type(exc)(f"{where}: {exc.message}", hint=exc.hint) from None

    @classmethod
    def from_yaml(cls, text: str, *, where: str = "recipe") -> Recipe:
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(
                f"The {where} is not valid YAML: {exc}", hint="Check the indentation; steps are a list under 'steps:'."
            ) from None
        return cls.from_dict(data, where=where)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> Recipe:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(
                f"The recipe file '{p}' does not exist.", hint="Example: modelpress optimize minilm --recipe recipes/minilm-int8.yaml"
            )
        text = p.read_text()
        if p.suffix == ".json":
            try:
                return cls.from_dict(json.loads(text), where=f"recipe {p}")
            except json.JSONDecodeError as exc:
                raise ConfigError(f"The recipe {p} is not valid JSON: {exc}") from None
        return cls.from_yaml(text, where=f"recipe {p}")

    def to_dict(self) -> dict[str, Any]:
        data = self.model_dump(mode="json", exclude={"steps", "gate"}, exclude_none=True)
        if self.gate is not None:
            data["gate"] = self.gate.model_dump(mode="json", exclude_none=True)
        data["steps"] = [s.to_step() for s in self.steps]
        return data

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# -- running -----------------------------------------------------------------------------
@dataclass
class StepResult:
    index: int
    label: str
    config: dict[str, Any]
    runtime: str
    shipped: bool
    path: str | None = None
    evaluation: dict[str, Any] | None = None
    gate: GateResult | None = None
    excluded: list[str] = field(default_factory=list)
    error: str | None = None
    seconds: float = 0.0
    registered: str | None = None

    def to_json(self) -> dict[str, Any]:
        data = {k: v for k, v in self.__dict__.items() if k != "gate"}
        data["gate"] = self.gate.to_json() if self.gate is not None else None
        return data


@dataclass
class RecipeResult:
    recipe: dict[str, Any]
    model: str
    task: str
    dataset: str
    original: dict[str, Any]
    steps: list[StepResult]
    output: str
    registered_original: str | None = None

    @property
    def final(self) -> StepResult | None:
        shipped = [s for s in self.steps if s.shipped]
        return shipped[-1] if shipped else None

    @property
    def failed(self) -> list[StepResult]:
        return [s for s in self.steps if not s.shipped]

    def to_json(self) -> dict[str, Any]:
        return {
            "recipe": self.recipe,
            "model": self.model,
            "task": self.task,
            "dataset": self.dataset,
            "original": self.original,
            "steps": [s.to_json() for s in self.steps],
            "final": self.final.path if self.final else None,
            "output": self.output,
            "registered_original": self.registered_original,
        }


def _slug(text: str) -> str:
    keep = "".join(c if c.isalnum() or c in "-_.@" else "-" for c in text)
    return "-".join(p for p in keep.split("-") if p)[:80]


def _reject(art: Artifact, rejected_dir: Path, gate: GateResult) -> Path:
    """Move a variant that broke the gate out of the shippable folder, its gate table in its manifest."""
    rejected_dir.mkdir(parents=True, exist_ok=True)
    target = rejected_dir / art.path.name
    if target.exists():
        shutil.rmtree(target)
    os.rename(art.path, target)
    manifest = target / "modelpress.json"
    data = json.loads(manifest.read_text())
    data["metrics"]["gate"] = gate.to_json()
    data["metrics"]["shippable"] = False
    tmp = manifest.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, manifest)
    return target


def _record(art: Artifact, evaluation: dict[str, Any], gate: GateResult) -> Artifact:
    """Add the evaluation and the gate to a shipped variant's manifest (the manifest is not hashed)."""
    art.manifest.metrics["evaluation"] = {"dataset": evaluation["dataset"], "runtime": evaluation["runtime"], **flat_metrics(evaluation)}
    art.manifest.metrics["gate"] = gate.to_json()
    art.manifest.metrics["shippable"] = True
    path = art.path / "modelpress.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(art.manifest.model_dump_json(indent=2))
    os.replace(tmp, path)
    return art


def run_recipe(
    model: Any,
    recipe: Recipe | dict[str, Any] | str | os.PathLike,
    output: str | os.PathLike,
    *,
    task: str | None = None,
    data: str | None = None,
    data_dir: str | os.PathLike | None = None,
    limit: int | None = None,
    threads: int | None = None,
    max_drop: float | None = None,
    overwrite: bool = False,
    register: bool = False,
    registry: Any = None,
    name: str | None = None,
    progress: Progress = _quiet,
) -> RecipeResult:
    """Run every step of ``recipe`` on ``model``: apply, evaluate, gate, and write (or reject).

    The gate is the recipe's, else the task's default keeping ``1 - max_drop`` (default 1%) of
    the primary metric. With ``register``, the original and every shipped variant are recorded
    in the registry (``registry`` or the default one) under ``name`` with their lineage.
    """
    from modelpress.api import as_artifact
    from modelpress.locations import find_data_dir
    from modelpress.optimize import techniques  # noqa: F401  (registers the handlers)
    from modelpress.optimize.evaluation import Evaluator
    from modelpress.optimize.handlers import StepContext, handler_for

    if isinstance(recipe, str | os.PathLike) and not isinstance(recipe, Recipe):
        recipe = Recipe.from_file(recipe)
    elif isinstance(recipe, dict | list):
        recipe = Recipe.from_dict(recipe)
    original = as_artifact(model, task or recipe.task)
    gate = recipe.gate or GateConfig.for_task(original.task, max_drop=0.01 if max_drop is None else max_drop)
    out_dir = Path(output).resolve()
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise ConfigError(
            f"The output folder '{out_dir}' is not empty.", hint="Choose a new folder, or pass --force to replace what is there."
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    ddir = find_data_dir(data_dir)
    evaluator = Evaluator(original, data=data or recipe.data, data_dir=ddir, limit=limit or recipe.limit, threads=threads)
    advance = progress(f"evaluating the original {original.name} on {evaluator.dataset_name}", None)
    base = evaluator.original_result()
    advance(1)
    base_flat = flat_metrics(base)

    reg_ref = None
    reg = None
    if register:
        from modelpress.optimize.registering import open_registry, register_original

        reg = registry or open_registry()
        reg_ref = register_original(reg, original, name or original.name, base)

    results: list[StepResult] = []
    current, current_ref = original, reg_ref
    bar = progress(f"recipe {recipe.name or ''}".strip(), len(recipe.steps))
    for i, cfg in enumerate(recipe.steps, start=1):
        source = original if recipe.mode == "branch" else current
        source_ref = reg_ref if recipe.mode == "branch" else current_ref
        label = cfg.label()
        target = out_dir / f"{i:02d}-{_slug(label)}"
        t0 = time.perf_counter()
        step = StepResult(index=i, label=label, config=cfg.to_step(), runtime=cfg.runtime, shipped=False)
        try:
            ctx = StepContext(target, ddir, overwrite, threads)
            art = handler_for(cfg)(source, cfg, ctx)
            evaluation = evaluator.evaluate(art, cfg.runtime)
            verdict = check(base_flat, flat_metrics(evaluation), gate)
            if not verdict.passed and cfg.auto_exclude > 0:
                art, evaluation, verdict, step.excluded = _auto_exclude(
                    source, cfg, ctx, evaluator, base_flat, gate, art, evaluation, verdict, ddir
                )
        except ModelpressError as exc:
            step.error = exc.message
            step.seconds = time.perf_counter() - t0
            results.append(step)
            bar(1)
            if recipe.on_failure == "stop":
                break
            continue
        step.evaluation, step.gate = evaluation, verdict
        if verdict.passed:
            _record(art, evaluation, verdict)
            step.shipped, step.path = True, str(art.path)
            if reg is not None:
                from modelpress.optimize.registering import register_variant

                step.registered = register_variant(reg, art, name or original.name, source_ref, evaluation=evaluation)
            current, current_ref = art, step.registered or current_ref
        else:
            step.path = str(_reject(art, out_dir / "rejected", verdict))
        step.seconds = time.perf_counter() - t0
        results.append(step)
        bar(1)
        if not verdict.passed and recipe.on_failure == "stop":
            break

    result = RecipeResult(recipe.to_dict(), original.name, original.task, evaluator.dataset_name, base, results, str(out_dir), reg_ref)
    report = out_dir / "recipe-report.json"
    report.write_text(json.dumps(result.to_json(), indent=2, default=str))
    return result


def _auto_exclude(source, cfg, ctx, evaluator, base_flat, gate, art, evaluation, verdict, ddir):  # noqa: ANN001
    """Keep the most sensitive layers in float (1, 2, 4, ... up to ``auto_exclude``) until the gate passes."""
    from modelpress.optimize.handlers import calibration_batches, handler_for
    from modelpress.optimize.search.sensitivity import layer_sensitivity

    batches, _ = calibration_batches(source, Calibration(samples=32, batch_size=8), ddir)
    ranked = [name for name, _score in layer_sensitivity(source, cfg, batches)]
    if not ranked:
        return art, evaluation, verdict, []
    k = 1
    excluded: list[str] = []
    while k <= min(cfg.auto_exclude, len(ranked)):
        excluded = ranked[:k]
        trial = cfg.excluding(excluded)
        shutil.rmtree(art.path, ignore_errors=True)
        art = handler_for(trial)(source, trial, ctx)
        evaluation = evaluator.evaluate(art, trial.runtime)
        verdict = check(base_flat, flat_metrics(evaluation), gate)
        if verdict.passed:
            break
        if k == min(cfg.auto_exclude, len(ranked)):
            break
        k = min(k * 2, cfg.auto_exclude, len(ranked))
    if not art.path.exists():  # pragma: no cover - defensive
        raise OptimizationError("The auto-exclusion retry left no artifact.")
    return art, evaluation, verdict, excluded
