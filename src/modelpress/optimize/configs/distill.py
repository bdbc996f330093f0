"""The ``distill`` config; the handler is :mod:`modelpress.optimize.distill.distill`."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator

from modelpress.optimize.configs.base import TechniqueConfig, register_config
from modelpress.optimize.configs.training import TrainingSpec, check_budget, short_label


class DistillTraining(TrainingSpec):
    """Training settings with distillation's defaults (a longer run, a higher learning rate)."""

    max_steps: int = Field(2000, ge=1, le=10_000_000)
    lr: float = Field(1e-4, gt=0, le=1.0)
    eval_every: int | None = Field(250, ge=1)


class Distill(TechniqueConfig):
    """A student with fewer layers (or a smaller config) trained to match the source model."""

    technique_name: ClassVar[str] = "distill"
    supported_runtimes: ClassVar[tuple[str, ...]] = ("torch",)
    technique: Literal["distill"] = "distill"
    runtime: Literal["torch"] = "torch"
    layers: int | list[int] | None = None
    student_config: dict[str, Any] | None = None
    training: DistillTraining = Field(default_factory=lambda: DistillTraining())
    cache: bool = True

    @field_validator("layers")
    @classmethod
    def _layers(cls, value: int | list[int] | None) -> int | list[int] | None:
        if isinstance(value, int) and value < 1:
            raise ValueError(f"layers must be at least 1, got {value}; e.g. layers: 3")
        if isinstance(value, list) and (not value or any(i < 0 for i in value) or sorted(set(value)) != value):
            raise ValueError(f"layers must list teacher layer indices in increasing order, e.g. [0, 3, 5]; got {value}")
        return value

    def label(self) -> str:
        return short_label(self)

    def check(self) -> None:
        if self.exclude or self.auto_exclude:
            raise ValueError("exclude and auto_exclude keep layers of a quantized model in float; distill has no such layers (drop them)")
        if self.layers is not None and self.student_config is not None:
            raise ValueError("give either layers (a student taken from the teacher's layers) or student_config (a fresh student), not both")
        check_budget(self.training, "distillation")


register_config(Distill)
