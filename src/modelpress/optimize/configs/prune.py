"""The pruning configs: ``magnitude-prune``, ``sparsegpt``, ``wanda`` and ``structured-prune``.

Their handlers: :mod:`modelpress.optimize.prune.magnitude` (unstructured and N:M magnitude),
:mod:`modelpress.optimize.prune.llm` (SparseGPT, Wanda) and
:mod:`modelpress.optimize.prune.structured` (channels, FFN neurons, heads).
"""

from __future__ import annotations

import math
import re
from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator

from modelpress.errors import ConfigError
from modelpress.optimize.configs.base import Calibration, RuntimeName, StrictModel, TechniqueConfig, register_config
from modelpress.optimize.configs.training import TrainingSpec, check_budget, short_label

PRUNE_RUNTIMES = ("torch", "onnxruntime", "openvino")  # the variant is a model folder: any runtime runs it


def parse_nm(text: str) -> tuple[int, int]:
    """``"2:4"`` -> (2, 4): keep N of every M consecutive weights."""
    m = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", str(text))
    if not m or not 0 < int(m.group(1)) < int(m.group(2)):
        raise ValueError(f"nm must be 'N:M' with 0 < N < M (keep N of every M weights), e.g. '2:4' or '4:8'; got {text!r}")
    return int(m.group(1)), int(m.group(2))


# -- magnitude ----------------------------------------------------------------------------------
class PruneConfig(TechniqueConfig):
    """What every pruning technique shares: how much, which pattern, which layers."""

    supported_runtimes: ClassVar[tuple[str, ...]] = PRUNE_RUNTIMES
    runtime: RuntimeName = "torch"
    sparsity: float | None = Field(None, gt=0.0, lt=1.0)  # fraction of weights zeroed; default 0.5, or 1 - N/M
    nm: str | None = None  # "2:4": keep N of every M consecutive input weights of each output
    keep_output_layer: bool = True

    @field_validator("nm")
    @classmethod
    def _nm(cls, value: str | None) -> str | None:
        if value is None:
            return None
        n, m = parse_nm(value)
        return f"{n}:{m}"

    def check(self) -> None:
        if self.auto_exclude:
            raise ValueError("auto_exclude measures quantization sensitivity; pruning keeps layers dense with exclude: [names or regexes]")
        if self.nm is not None and self.sparsity is not None:
            n, m = parse_nm(self.nm)
            if not math.isclose(self.sparsity, 1.0 - n / m, abs_tol=1e-9):
                raise ValueError(f"nm {self.nm} means sparsity {1.0 - n / m:g}; drop sparsity (or set it to {1.0 - n / m:g})")

    @property
    def target_sparsity(self) -> float:
        if self.nm is not None:
            n, m = parse_nm(self.nm)
            return 1.0 - n / m
        return 0.5 if self.sparsity is None else float(self.sparsity)

    @property
    def nm_pair(self) -> tuple[int, int] | None:
        return parse_nm(self.nm) if self.nm else None


class GradualSchedule(StrictModel):
    """Zhu & Gupta's gradual schedule: sparsity rises from ``initial_sparsity`` to the target.

    ``s_t = s_f + (s_i - s_f) * (1 - (t - begin_step) / (end_step - begin_step)) ** exponent``
    for ``begin_step <= t <= end_step`` (``exponent: 3``, the paper's cubic); masks are updated
    every ``frequency`` steps and at ``end_step``.
    """

    initial_sparsity: float = Field(0.0, ge=0.0, lt=1.0)
    begin_step: int = Field(0, ge=0)
    end_step: int = Field(100, ge=1)
    frequency: int = Field(10, ge=1)
    exponent: float = Field(3.0, gt=0.0)

    def sparsity_at(self, step: int, final: float) -> float:
        if step <= self.begin_step:
            return self.initial_sparsity
        if step >= self.end_step:
            return final
        frac = (step - self.begin_step) / (self.end_step - self.begin_step)
        return final + (self.initial_sparsity - final) * (1.0 - frac) ** self.exponent

    def updates_at(self, step: int) -> bool:
        return self.begin_step <= step <= self.end_step and ((step - self.begin_step) % self.frequency == 0 or step == self.end_step)


class FineTune(StrictModel):
    """The short fine-tune a gradual schedule runs in (bounded by steps and by wall-clock time)."""

    steps: int = Field(200, ge=1, le=1_000_000)
    budget_s: float = Field(300.0, gt=0.0)
    lr: float = Field(1e-4, gt=0.0)
    batch_size: int = Field(16, ge=1, le=4096)
    seq_len: int = Field(128, ge=8, le=8192)  # causal-lm: tokens per training window
    dataset: str | None = None  # default: the task's training split (tinyshakespeare-train, sst2-train, mnist-train5k)
    seed: int = 0


class MagnitudePrune(PruneConfig):
    """Zero the smallest-magnitude weights: per layer, globally, or as an N:M pattern."""

    technique_name: ClassVar[str] = "magnitude-prune"
    technique: Literal["magnitude-prune"] = "magnitude-prune"
    scope: Literal["layer", "global"] = "layer"
    layer_types: list[Literal["linear", "conv"]] = Field(default_factory=lambda: ["linear", "conv"])
    schedule: GradualSchedule | None = None  # prune gradually while fine-tuning (see FineTune)
    fine_tune: FineTune | None = None

    def check(self) -> None:
        super().check()
        if self.nm is not None and self.scope == "global":
            raise ValueError("an N:M pattern is set within each group of M weights, so it has no global scope: drop scope: global or nm")
        if self.schedule is not None:
            if self.nm is not None:
                raise ValueError("an N:M pattern is applied at once; a gradual schedule needs unstructured sparsity (drop nm or schedule)")
            steps = (self.fine_tune or FineTune()).steps
            if self.schedule.end_step > steps:
                raise ValueError(
                    f"schedule.end_step {self.schedule.end_step} is after the last fine-tuning step {steps}: "
                    "raise fine_tune.steps or lower end_step"
                )
        elif self.fine_tune is not None:
            raise ValueError("fine_tune runs with a gradual schedule: add schedule: {end_step: 100} (or drop fine_tune)")
        if not self.layer_types:
            raise ValueError("layer_types must name at least one of linear, conv")


register_config(MagnitudePrune)


# -- SparseGPT and Wanda -----------------------------------------------------------------------
class LLMCalibration(StrictModel):
    """Where SparseGPT and Wanda see activations: token windows from a corpus."""

    dataset: str | None = None  # a named corpus or a text file; default tinyshakespeare-train
    samples: int = Field(64, ge=1, le=100_000)  # windows (or lines, with seq_len: null)
    seq_len: int | None = Field(128, ge=2, le=32_768)  # tokens per window (capped at the model's context)
    batch_size: int = Field(8, ge=1, le=1024)
    seed: int = 0


class _LLMPrune(PruneConfig):
    calibration: LLMCalibration = Field(default_factory=LLMCalibration)


class SparseGPT(_LLMPrune):
    """SparseGPT: prune and update the remaining weights to keep each layer's output (OBS)."""

    technique_name: ClassVar[str] = "sparsegpt"
    technique: Literal["sparsegpt"] = "sparsegpt"
    block_size: int = Field(128, ge=1, le=4096)  # columns per lazy update block (and per mask-selection block)
    damp: float = Field(0.01, gt=0.0, lt=1.0)  # fraction of the mean diagonal of H added to it

    def check(self) -> None:
        super().check()
        if self.nm_pair is not None and self.block_size % self.nm_pair[1]:
            raise ValueError(f"block_size {self.block_size} must divide by M={self.nm_pair[1]} of nm {self.nm} (e.g. block_size: 128)")


class Wanda(_LLMPrune):
    """Wanda: prune by |weight| x input-feature norm, per output, with no weight update.

    ``group``: which weights compete (the paper's "comparison group"): ``output`` (each output
    row loses exactly ``sparsity``, the paper's choice for LLMs) or ``layer`` (the whole layer,
    as magnitude pruning does). On shakespeare-lm at 50%, measured: output 4.904, layer 4.857,
    against 4.898 for magnitude over the layer and 4.944 for magnitude per output row.
    """

    technique_name: ClassVar[str] = "wanda"
    technique: Literal["wanda"] = "wanda"
    group: Literal["output", "layer"] = "output"

    def check(self) -> None:
        super().check()
        if self.nm is not None and self.group != "output":
            raise ValueError("an N:M pattern is chosen within each group of M inputs of an output: drop group: layer (or nm)")


register_config(SparseGPT)
register_config(Wanda)


# -- structured ---------------------------------------------------------------------------------
Target = Literal["channels", "ffn", "heads"]


class RecoveryTraining(TrainingSpec):
    """Recovery fine-tuning settings (a short run after pruning)."""

    max_steps: int = Field(300, ge=1, le=10_000_000)
    max_seconds: float | None = Field(300.0, gt=0)
    lr: float = Field(1e-4, gt=0, le=1.0)
    eval_every: int | None = Field(100, ge=1)


class StructuredPrune(TechniqueConfig):
    """Remove ``ratio`` of the channels / FFN neurons (and ``head_ratio`` of the heads) of each layer."""

    technique_name: ClassVar[str] = "structured-prune"
    supported_runtimes: ClassVar[tuple[str, ...]] = ("torch",)
    technique: Literal["structured-prune"] = "structured-prune"
    runtime: Literal["torch"] = "torch"
    ratio: float = Field(0.5, gt=0.0, lt=1.0)
    targets: list[Target] | None = None  # None: channels for CNNs, ffn for transformers
    head_ratio: float | None = Field(None, ge=0.0, lt=1.0)  # None: ratio
    importance: Literal["auto", "activation", "magnitude"] = "auto"  # auto: activation for transformers, magnitude for CNNs
    round_to: int | None = Field(None, ge=1, le=1024)  # kept widths a multiple of this (SIMD-friendly)
    calibration: Calibration = Field(default_factory=lambda: Calibration(samples=64))
    finetune: RecoveryTraining | None = None
    cache: bool = True

    def label(self) -> str:
        return short_label(self)

    def check(self) -> None:
        if self.exclude or self.auto_exclude:
            raise ValueError("exclude and auto_exclude keep quantized layers in float; structured-prune has no such layers (drop them)")
        if self.targets is not None and not self.targets:
            raise ValueError("targets is empty; e.g. targets: [ffn] or [ffn, heads] or [channels]")
        if self.head_ratio is not None and self.targets is not None and "heads" not in self.targets:
            raise ValueError("head_ratio is set but 'heads' is not in targets; e.g. targets: [ffn, heads]")
        if self.finetune is not None:
            check_budget(self.finetune, "recovery fine-tuning")


register_config(StructuredPrune)


# -- the methods of ``modelpress prune`` --------------------------------------------------------
METHODS = ("magnitude", "global", "nm", "sparsegpt", "wanda")


def prune_config(
    method: str,
    *,
    sparsity: float | None = None,
    nm: str | None = None,
    runtime: str = "torch",
    exclude: list[str] | None = None,
    calibration: dict[str, Any] | None = None,
) -> PruneConfig:
    """The technique config a ``--method`` names (``nm``: magnitude N:M, default 2:4)."""
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
