"""Training settings shared by ``distill`` and ``structured-prune`` (pure configs: no torch here).

:class:`TrainConfig` bounds the training loop (:mod:`modelpress.optimize.train.loop`);
:class:`TrainingSpec` adds the data and the loss (:mod:`modelpress.optimize.train.objectives`).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from modelpress.errors import OptimizationError
from modelpress.optimize.configs.base import StrictModel


class TrainConfig(StrictModel):
    """How long and how to train; every run is bounded by ``max_steps`` and ``max_seconds``."""

    max_steps: int = Field(500, ge=1, le=10_000_000)
    max_seconds: float | None = Field(600.0, gt=0)  # wall-clock budget, resumed runs included; None: steps only
    lr: float = Field(5e-5, gt=0, le=1.0)
    weight_decay: float = Field(0.01, ge=0, le=1.0)
    warmup: float = Field(0.06, ge=0, lt=1.0)  # fraction of max_steps with a linearly rising learning rate
    decay: Literal["linear", "constant"] = "linear"  # after warm-up: down to 0 at max_steps, or flat
    grad_clip: float | None = Field(1.0, gt=0)
    eval_every: int | None = Field(100, ge=1)  # None: evaluate only at the start and the end
    eval_at_start: bool = True  # the starting point competes for "best" too
    patience: int | None = Field(3, ge=1)  # evaluations without improvement before stopping; None: never stop early
    min_delta: float = Field(0.0, ge=0)  # smaller improvements do not count
    checkpoint_every: int | None = Field(None, ge=1)  # default: every evaluation
    seed: int = 0

    @model_validator(mode="after")
    def _budget(self) -> TrainConfig:
        if self.eval_every is not None and self.eval_every > self.max_steps:
            raise ValueError(
                f"eval_every ({self.eval_every}) is larger than max_steps ({self.max_steps}): no evaluation would run; "
                f"e.g. eval_every: {max(1, self.max_steps // 5)}"
            )
        return self

    @property
    def warmup_steps(self) -> int:
        return round(self.warmup * self.max_steps)

    def lr_factor(self, step: int) -> float:
        """The learning-rate multiplier for the update that follows ``step`` completed steps."""
        w = self.warmup_steps
        if w and step < w:
            return (step + 1) / (w + 1)
        if self.decay == "constant":
            return 1.0
        return max(0.0, (self.max_steps - step) / max(1, self.max_steps - w))


class TrainingSpec(TrainConfig):
    """The training loop's settings plus the data and the loss (see the module docstring)."""

    data: list[str] | None = None  # dataset names or files; None: the task's default (TRAIN_DEFAULTS)
    samples: int | None = Field(20_000, ge=1)  # at most this many training examples, a seeded sample
    validation_samples: int = Field(500, ge=0)  # held out for evaluations; 0: no evaluation, no early stopping
    batch_size: int = Field(32, ge=1, le=4096)
    max_length: int = Field(128, ge=8, le=8192)  # tokens per text (causal-lm: per training chunk)
    loss: Literal["cosine", "mse", "similarity"] = "cosine"  # embedding: on the pooled sentence embedding (see the module docstring)
    hidden_weight: float = Field(0.0, ge=0.0)  # embedding: weight of the matched hidden-state MSE
    temperature: float = Field(2.0, gt=0.0, le=100.0)
    alpha: float = Field(0.5, ge=0.0, le=1.0)  # weight of the soft-label KL; 1 - alpha on the hard labels
    freeze_embeddings: bool = True  # Hugging Face models: the token embeddings (half of MiniLM's weights) stay as they are


def short_label(config: Any) -> str:
    """``technique@runtime(key=value, ...)`` with only the settings that differ from the defaults, nested ones too."""
    from pydantic import BaseModel

    def diff(model: BaseModel, default: BaseModel | None) -> list[str]:
        out = []
        for key, info in type(model).model_fields.items():
            if key in ("technique", "runtime"):
                continue
            value = getattr(model, key)
            base = getattr(default, key) if default is not None else info.get_default(call_default_factory=True)
            if isinstance(value, BaseModel) and isinstance(base, BaseModel) and type(value) is type(base):
                out += [f"{key}.{d}" for d in diff(value, base)]
            elif isinstance(value, BaseModel):
                out += [f"{key}.{d}" for d in diff(value, None)] or [key]
            elif value != base:
                out.append(f"{key}={value}")
        return out

    parts = diff(config, None)
    return f"{config.technique_name}@{config.runtime}" + (f"({', '.join(parts)})" if parts else "")


def check_budget(spec: TrainingSpec, what: str) -> None:
    """Training is always bounded: refuse a spec with neither a time budget nor a modest step count."""
    if spec.max_seconds is None and spec.max_steps > 100_000:
        raise OptimizationError(
            f"The {what} would run {spec.max_steps} steps with no time budget.", hint="Set max_seconds (e.g. 600) or fewer max_steps."
        )
