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
:func:`run_recipe` runs each step through :class:`modelpress.optimize.step.Pipeline` and writes
its artifact (with its manifest: parent, config, metrics, hashes, tool versions) under the
output folder. A step that breaks the gate is moved to ``rejected/`` with its gate table in the
manifest: it is never shippable and never registered. :func:`run_step` is a recipe of one step
whose artifact is written at the output folder itself: ``prune``, ``distill`` and
``prune-structured`` are such one-step recipes.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator

from modelpress._fs import atomic_write_text
from modelpress.artifacts import Artifact
from modelpress.errors import ConfigError
from modelpress.optimize.configs import StrictModel, TechniqueConfig, parse_step
from modelpress.optimize.gate import GateConfig, parse_gate
from modelpress.optimize.step import Pipeline, Speed, StepResult
from modelpress.progress import ProgressFactory, no_progress

__all__ = ["Recipe", "RecipeResult", "StepResult", "run_recipe", "run_step"]


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


def _pipeline(
    original: Artifact,
    gate: GateConfig,
    *,
    data: str | None,
    data_dir: str | os.PathLike | None,
    limit: int | None,
    threads: int | None,
    task_options: dict[str, Any] | None,
    speed: Speed | None,
    register: bool,
    registry: Any,
    name: str | None,
    progress: ProgressFactory,
) -> Pipeline:
    from modelpress.locations import find_data_dir

    reg = None
    if register:
        from modelpress.optimize.registering import open_registry

        reg = registry or open_registry()
    return Pipeline(
        original,
        gate,
        data=data,
        data_dir=find_data_dir(data_dir),
        limit=limit,
        threads=threads,
        task_options=task_options,
        speed=speed,
        registry=reg,
        name=name,
        progress=progress,
    )


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
    speed: Speed | None = None,
    progress: ProgressFactory = no_progress,
) -> RecipeResult:
    """Run every step of ``recipe`` on ``model``: apply, evaluate, gate, time, and write (or reject).

    Each step goes through :class:`modelpress.optimize.step.Pipeline`. The gate is the recipe's,
    else the task's default keeping ``1 - max_drop`` (default 1%) of the primary metric. With
    ``register``, the original and every shipped variant are recorded in the registry
    (``registry`` or the default one) under ``name`` with their lineage. ``speed``: also time each
    step side by side with the original (:class:`~modelpress.optimize.step.Speed`).
    """
    from modelpress.api import as_artifact
    from modelpress.optimize.search.sensitivity import auto_exclude

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
    pipe = _pipeline(
        original,
        gate,
        data=data or recipe.data,
        data_dir=data_dir,
        limit=limit or recipe.limit,
        threads=threads,
        task_options=None,
        speed=speed,
        register=register,
        registry=registry,
        name=name,
        progress=progress,
    )
    base = pipe.baseline()

    results: list[StepResult] = []
    current, current_ref = original, pipe.original_ref
    bar = progress(f"recipe {recipe.name or ''}".strip(), len(recipe.steps))
    for i, cfg in enumerate(recipe.steps, start=1):
        branch = recipe.mode == "branch"
        step = pipe.step(
            cfg,
            out_dir / f"{i:02d}-{_slug(cfg.label())}",
            source=original if branch else current,
            source_ref=pipe.original_ref if branch else current_ref,
            index=i,
            overwrite=overwrite,
            rejected_dir=out_dir / "rejected",
            retry=auto_exclude,
        )
        results.append(step)
        bar(1)
        if step.shipped and step.artifact is not None:
            current, current_ref = step.artifact, step.registered or current_ref
        elif recipe.on_failure == "stop":
            break

    result = RecipeResult(recipe.to_dict(), original.name, original.task, pipe.dataset_name, base, results, str(out_dir), pipe.original_ref)
    atomic_write_text(out_dir / "recipe-report.json", json.dumps(result.to_json(), indent=2, default=str))
    return result


def run_step(
    model: Any,
    step: TechniqueConfig | dict[str, Any],
    output: str | os.PathLike,
    *,
    task: str | None = None,
    data: str | None = None,
    data_dir: str | os.PathLike | None = None,
    limit: int | None = None,
    threads: int | None = None,
    max_drop: float = 0.01,
    gate: GateConfig | dict[str, Any] | None = None,
    runtime: str | None = None,
    task_options: dict[str, Any] | None = None,
    speed: Speed | None = None,
    overwrite: bool = False,
    register: bool = False,
    registry: Any = None,
    name: str | None = None,
    progress: ProgressFactory = no_progress,
) -> RecipeResult:
    """A recipe of one step whose artifact is written at ``output`` itself (``prune``, ``distill``, ``prune-structured``).

    The step is applied, evaluated on ``runtime`` (default: the step's), gated (``gate``, else
    the primary metric keeps ``1 - max_drop``), timed with ``speed``, recorded and (with
    ``register``) registered, exactly as a recipe step. A variant that breaks the gate stays at
    ``output``, marked ``shippable: false``. Errors of the technique are raised, not recorded.
    """
    from modelpress.api import as_artifact

    cfg = parse_step(step)
    original = as_artifact(model, task)
    pipe = _pipeline(
        original,
        parse_gate(gate) if gate is not None else GateConfig.for_task(original.task, max_drop=max_drop),
        data=data,
        data_dir=data_dir,
        limit=limit,
        threads=threads,
        task_options=task_options,
        speed=speed,
        register=register,
        registry=registry,
        name=name,
        progress=progress,
    )
    base = pipe.baseline()
    res = pipe.step(cfg, Path(output), runtime=runtime, overwrite=overwrite, errors="raise")
    recipe = Recipe(steps=[cfg], gate=pipe.gate)
    return RecipeResult(
        recipe.to_dict(), original.name, original.task, pipe.dataset_name, base, [res], str(Path(output).resolve()), pipe.original_ref
    )
