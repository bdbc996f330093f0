"""The LLM quantization configs: ``gptq``, ``awq``, ``smoothquant`` (and ``weight-only`` on ``openvino-decoder``).

They compress a causal LM's KV-cache decoder (the graph the OpenVINO generation engine runs)
with NNCF; their handlers live in :mod:`modelpress.optimize.quantize.llm`. Round-to-nearest is
the ``weight-only`` technique with ``runtime: openvino-decoder`` (:mod:`.quantize`).
See docs/llm-compression.md.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, field_validator

from modelpress.optimize.configs.base import RuntimeName, StrictModel, TechniqueConfig, register_config
from modelpress.optimize.configs.quantize import DECODER_RUNTIME, PrecisionHint, _check_precision_hint, check_group_size

DecoderRuntime = Literal["openvino-decoder"]


class DecoderCalibration(StrictModel):
    """Token windows the data-aware algorithms see: ``samples`` windows of ``seq_len`` tokens.

    ``dataset`` None: the training split of the dataset the step is evaluated on (``--data``),
    or that dataset itself when it has no training split, else ``tinyshakespeare-train``.
    """

    dataset: str | None = None
    samples: int = Field(64, ge=1, le=100_000)
    seq_len: int = Field(128, ge=2, le=32_768)  # capped at the model's context
    seed: int = 0


class DecoderWeights(TechniqueConfig):
    """What GPTQ and AWQ share: the weight format NNCF writes and the calibration windows."""

    supported_runtimes: ClassVar[tuple[str, ...]] = (DECODER_RUNTIME,)
    runtime: RuntimeName | DecoderRuntime = "openvino-decoder"  # type: ignore[assignment]
    bits: Literal[4, 8] = 4
    group_size: int | None = None  # None: 128; -1: per output channel
    symmetric: bool = True
    ratio: float = Field(1.0, gt=0.0, le=1.0)
    all_layers: bool = False  # embeddings and the output head in 4 bits too (else int8, NNCF's default)
    group_size_fallback: Literal["adjust", "ignore", "error"] = "adjust"
    scale_estimation: bool = False
    calibration: DecoderCalibration = Field(default_factory=DecoderCalibration)
    precision_hint: PrecisionHint | None = None

    _group = field_validator("group_size")(classmethod(lambda cls, value: check_group_size(value)))

    def check(self) -> None:
        if self.bits == 8:
            raise ValueError(
                f"NNCF's {self.technique_name} changes 4-bit weights only (8-bit weights are rounded to nearest): "
                "use bits: 4, or {technique: weight-only, runtime: openvino-decoder, bits: 8}"
            )
        _check_precision_hint(self)

    @property
    def effective_group_size(self) -> int:
        return 128 if self.group_size is None else self.group_size


class GPTQ(DecoderWeights):
    """GPTQ (Frantar et al. 2022) by NNCF: ``compress_weights(..., gptq=True)``.

    ``damping``: NNCF's ``damp_percent``, the share of the mean Hessian diagonal added to it;
    ``block_size``: columns per lazy update. NNCF quantizes the columns in their order: it has no
    activation ordering, so ``act_order`` can only be false.
    """

    technique_name: ClassVar[str] = "gptq"
    technique: Literal["gptq"] = "gptq"
    damping: float = Field(0.1, gt=0.0, lt=1.0)
    block_size: int = Field(128, ge=1, le=8192)
    act_order: bool = False

    def check(self) -> None:
        if self.act_order:
            raise ValueError(
                "NNCF's GPTQ quantizes the columns in their order and has no activation ordering: drop act_order "
                "(scale_estimation: true is NNCF's way to refine the scales)"
            )
        super().check()


class AWQ(DecoderWeights):
    """AWQ (Lin et al. 2023) by NNCF: ``compress_weights(..., awq=True)``.

    The smoothness exponent is searched on a grid of ``steps`` values in [``alpha_min``,
    ``alpha_max``]; ``percent_to_apply``: the share of outlier channels scaled.
    """

    technique_name: ClassVar[str] = "awq"
    technique: Literal["awq"] = "awq"
    alpha_min: float = Field(0.0, ge=0.0, le=1.0)
    alpha_max: float = Field(1.0, ge=0.0, le=1.0)
    steps: int = Field(100, ge=1, le=10_000)
    percent_to_apply: float = Field(0.002, gt=0.0, le=1.0)

    def check(self) -> None:
        if self.alpha_min > self.alpha_max:
            raise ValueError(f"alpha_min ({self.alpha_min}) must not exceed alpha_max ({self.alpha_max}), e.g. alpha_min: 0, alpha_max: 1")
        super().check()


class SmoothQuant(TechniqueConfig):
    """SmoothQuant W8A8 (Xiao et al. 2022) by NNCF: ``nncf.quantize`` (model_type TRANSFORMER) with
    ``AdvancedSmoothQuantParameters(matmul=alpha)``: int8 weights and activations, int8 matmuls."""

    technique_name: ClassVar[str] = "smoothquant"
    supported_runtimes: ClassVar[tuple[str, ...]] = (DECODER_RUNTIME,)
    technique: Literal["smoothquant"] = "smoothquant"
    runtime: RuntimeName | DecoderRuntime = "openvino-decoder"  # type: ignore[assignment]
    alpha: float = Field(0.95, ge=0.0, le=1.0)
    preset: Literal["performance", "mixed"] = "performance"
    calibration: DecoderCalibration = Field(default_factory=DecoderCalibration)
    precision_hint: PrecisionHint | None = None

    def check(self) -> None:
        _check_precision_hint(self)


LLM_STEP_TYPES: tuple[type[TechniqueConfig], ...] = (GPTQ, AWQ, SmoothQuant)
for _cls in LLM_STEP_TYPES:
    register_config(_cls)
