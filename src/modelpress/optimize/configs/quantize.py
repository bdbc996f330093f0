"""The quantization configs: ``dynamic-int8``, ``static-int8``, ``weight-only``, ``precision``, and ``qat``.

Their handlers live in :mod:`modelpress.optimize.quantize` (one module per backend).
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import Field, field_validator

from modelpress.errors import ConfigError
from modelpress.optimize.configs.base import RUNTIME_NAMES, Calibration, RuntimeName, TechniqueConfig, register_config
from modelpress.optimize.configs.training import TrainingSpec, check_budget, short_label

PrecisionHint = Literal["bf16", "fp16", "fp32"]
# The runtime of a causal LM's KV-cache decoder IR (modelpress.runtimes.openvino_decoder): the
# graph the OpenVINO generation engine runs, compressed by optimize/quantize/llm.py.
DECODER_RUNTIME = "openvino-decoder"


def _check_precision_hint(cfg: TechniqueConfig) -> None:
    if getattr(cfg, "precision_hint", None) is not None and cfg.runtime not in ("openvino", DECODER_RUNTIME):
        raise ValueError(
            f"precision_hint sets OpenVINO's inference precision; {cfg.runtime} has no such setting "
            "(drop precision_hint, or add a precision step for the float math)"
        )


class DynamicInt8(TechniqueConfig):
    """int8 weights, activations quantized on the fly.

    onnxruntime: ``quantize_dynamic`` (per-tensor or per-channel weights), after ORT's transformer
    fusions for BERT-like models (``fuse``). torch: torchao ``Int8DynamicActivationInt8WeightConfig``
    on every ``nn.Linear``, run under ``torch.compile`` with freezing (``compile``).
    """

    technique_name: ClassVar[str] = "dynamic-int8"
    supported_runtimes: ClassVar[tuple[str, ...]] = ("onnxruntime", "torch")
    technique: Literal["dynamic-int8"] = "dynamic-int8"
    per_channel: bool = False
    fuse: bool = True
    reduce_range: bool = False
    compile: bool = True
    # onnxruntime: the weights' type. uint8 runs ONNX Runtime's U8U8 kernels, which do not saturate on CPUs without
    # VNNI (AVX2, AVX-512 without VNNI), so the weights keep their 8 bits where int8 (U8S8) needs reduce_range there
    weight_type: Literal["int8", "uint8"] = "int8"

    def check(self) -> None:
        if self.weight_type != "int8" and self.runtime != "onnxruntime":
            raise ValueError(f"weight_type {self.weight_type} is an onnxruntime setting; torchao's dynamic int8 has int8 weights")


class StaticInt8(TechniqueConfig):
    """int8 weights and activations with ranges calibrated on ``calibration.samples`` inputs.

    onnxruntime: ``quantize_static`` in QDQ format (``method``: minmax, entropy, percentile) of
    the MatMul/Gemm/Conv inputs. openvino: NNCF ``nncf.quantize`` (model_type TRANSFORMER for
    text models; ``preset``, ``fast_bias_correction``; ``precision_hint`` the inference precision
    of what stays in float, e.g. bf16). torch: torchao PT2E with ``X86InductorQuantizer``, then
    ``torch.compile``.
    """

    technique_name: ClassVar[str] = "static-int8"
    technique: Literal["static-int8"] = "static-int8"
    calibration: Calibration = Field(default_factory=Calibration)
    method: Literal["minmax", "entropy", "percentile"] = "minmax"
    per_channel: bool = False
    fuse: bool = False
    preset: Literal["performance", "mixed"] = "performance"
    fast_bias_correction: bool = True
    compile: bool = True
    precision_hint: PrecisionHint | None = None  # openvino: the inference precision of the ops left in float

    def check(self) -> None:
        if self.runtime != "onnxruntime" and self.method != "minmax":
            raise ValueError(
                f"method '{self.method}' is an ONNX Runtime calibration method; "
                f"{self.runtime} calibrates with min/max statistics (drop 'method')"
            )
        _check_precision_hint(self)


def check_group_size(value: int | None) -> int | None:
    """A weight-quantization group: -1 (per output channel) or a power of two >= 16 (None: the default)."""
    if value is None or value == -1:
        return value
    if value < 16 or value & (value - 1):
        raise ValueError(f"group_size must be -1 (per channel) or a power of two >= 16, e.g. 32, 64, 128; got {value}")
    return value


class WeightOnly(TechniqueConfig):
    """Weights stored in int8 or int4 (per group of ``group_size`` input channels), float math.

    openvino: NNCF ``compress_weights`` (INT8/INT4, sym or asym, ``ratio`` of layers in 4 bits;
    ``group_size_fallback`` for weights whose input channels divide by no group size: ``adjust``
    a smaller group or int8, ``ignore`` keep them in float, ``error``; ``precision_hint``).
    onnxruntime: ``MatMulNBitsQuantizer`` (MatMulNBits, 4 or 8 bits per block of
    ``group_size``, default 128; the last block is padded). torch: torchao
    ``Int8WeightOnlyConfig`` / ``IntxWeightOnlyConfig`` (int4 groups), under ``torch.compile``.
    openvino-decoder (causal LMs): NNCF ``compress_weights`` on the KV-cache decoder the LLM
    engine runs (round-to-nearest; GPTQ and AWQ are the ``gptq`` and ``awq`` techniques).
    """

    technique_name: ClassVar[str] = "weight-only"
    supported_runtimes: ClassVar[tuple[str, ...]] = (*RUNTIME_NAMES, DECODER_RUNTIME)
    technique: Literal["weight-only"] = "weight-only"
    runtime: RuntimeName | Literal["openvino-decoder"] = "onnxruntime"
    bits: Literal[4, 8] = 8
    group_size: int | None = None  # None: per output channel for 8 bits, 128 for 4 bits; -1: per channel
    symmetric: bool = True
    ratio: float = Field(1.0, gt=0.0, le=1.0)
    # openvino, 4 bits: what to do with a weight whose input channels divide by no group size.
    group_size_fallback: Literal["adjust", "ignore", "error"] = "adjust"
    compile: bool = True
    precision_hint: PrecisionHint | None = None  # openvino: the inference precision of the float math

    _group = field_validator("group_size")(classmethod(lambda cls, value: check_group_size(value)))

    def check(self) -> None:
        if self.bits == 8 and self.group_size not in (None, -1) and self.runtime in ("openvino", DECODER_RUNTIME):
            raise ValueError("NNCF compresses 8-bit weights per output channel: drop group_size, or use bits: 4")
        if self.ratio != 1.0 and self.runtime not in ("openvino", DECODER_RUNTIME):
            raise ValueError("ratio (a mix of 4- and 8-bit layers) is an NNCF option: use runtime: openvino, or drop ratio")
        if self.runtime == "onnxruntime" and self.group_size == -1:
            raise ValueError(
                "ONNX Runtime's MatMulNBits quantizes per block of input channels, not per channel: use group_size: 32, 64 or 128"
            )
        _check_precision_hint(self)

    @property
    def effective_group_size(self) -> int:
        """The group used: as given; else 128 for 4 bits and per channel (-1) for 8 bits (MatMulNBits: 128)."""
        if self.group_size is not None:
            return self.group_size
        return -1 if self.bits == 8 and self.runtime != "onnxruntime" else 128


class Precision(TechniqueConfig):
    """Floating-point inference precision.

    openvino: the model is unchanged and the ``INFERENCE_PRECISION_HINT`` is recorded in the
    artifact's runtime options. torch: weights cast to bf16/fp16 (``compile``: torch.compile with
    freezing). onnxruntime: fp16 graph with fp32 inputs and outputs (``dtype: fp16`` only).
    """

    technique_name: ClassVar[str] = "precision"
    technique: Literal["precision"] = "precision"
    runtime: RuntimeName = "openvino"  # bf16 (the default dtype) has no ONNX Runtime CPU kernels
    dtype: Literal["bf16", "fp16", "fp32"] = "bf16"
    compile: bool = True

    def check(self) -> None:
        if self.runtime == "onnxruntime" and self.dtype == "bf16":
            raise ValueError("ONNX Runtime's CPU kernels have no bf16: use dtype: fp16, or runtime: openvino / torch for bf16")
        if self.runtime == "openvino" and self.exclude:
            raise ValueError(
                "OpenVINO's inference precision is one setting for the whole model on CPU, so no layer can be kept in fp32: "
                "drop exclude, or use runtime: onnxruntime (dtype: fp16) or torch"
            )


STEP_TYPES: tuple[type[TechniqueConfig], ...] = (DynamicInt8, StaticInt8, WeightOnly, Precision)
for _cls in STEP_TYPES:
    register_config(_cls)
Step = Annotated[DynamicInt8 | StaticInt8 | WeightOnly | Precision, Field(discriminator="technique")]


# -- quantization-aware training ---------------------------------------------------------------
class QATTraining(TrainingSpec):
    """Training settings with QAT's defaults: a short run at a low learning rate from the trained model."""

    max_steps: int = Field(300, ge=1, le=10_000_000)
    max_seconds: float | None = Field(900.0, gt=0)
    lr: float = Field(2e-5, gt=0, le=1.0)
    warmup: float = Field(0.1, ge=0, lt=1.0)
    # The final weights are kept: a held-out set of a few hundred examples cannot resolve what QAT wins (a
    # fraction of a point; mnist's is at 99.4% of 500), so picking the "best" evaluation keeps whichever came
    # first among ties, the float start included. The held-out metric is still measured at the end.
    eval_every: int | None = Field(None, ge=1)
    eval_at_start: bool = False
    patience: int | None = Field(None, ge=1)
    alpha: float = Field(0.9, ge=0.0, le=1.0)  # mostly the float model's soft labels: QAT keeps its function, not a new one
    temperature: float = Field(1.0, gt=0.0, le=100.0)


class QAT(TechniqueConfig):
    """Quantization-aware training: fine-tune with the quantization simulated, then quantize for real.

    ``quantize`` is the post-training step the result is converted with (``static-int8``, the
    default, or ``weight-only``), on this config's ``runtime``: the QAT artifact is the same kind of
    artifact that step makes from the original. ``training`` bounds the fine-tuning (the shared
    loop; the loss is distillation from the float model plus the labels where the data has them).
    Handler: :mod:`modelpress.optimize.quantize.qat`.
    """

    technique_name: ClassVar[str] = "qat"
    technique: Literal["qat"] = "qat"
    runtime: RuntimeName = "torch"
    quantize: dict[str, Any] = Field(default_factory=lambda: {"technique": "static-int8"})
    training: QATTraining = Field(default_factory=lambda: QATTraining())

    @field_validator("quantize", mode="before")
    @classmethod
    def _quantize_step(cls, value: Any) -> Any:
        if isinstance(value, TechniqueConfig):
            value = value.to_step()
        if isinstance(value, str):
            value = {"technique": value}
        if not isinstance(value, dict) or value.get("technique") not in QAT_TARGETS:
            raise ValueError(
                f"quantize must be a {' or '.join(QAT_TARGETS)} step, got {value!r}; "
                "e.g. quantize: {technique: static-int8, per_channel: true} or quantize: {technique: weight-only, bits: 4, group_size: 32}"
            )
        return value

    def target(self) -> StaticInt8 | WeightOnly:
        """The post-training step the fine-tuned model is converted with (on this config's runtime and exclusions)."""
        step = {**self.quantize}
        if step.get("runtime", self.runtime) != self.runtime:
            raise ValueError(f"quantize.runtime ({step['runtime']}) differs from the step's runtime ({self.runtime}): give runtime once")
        step["runtime"] = self.runtime
        step.setdefault("exclude", list(self.exclude))
        return QAT_TARGETS[step["technique"]](**step)

    def label(self) -> str:
        return short_label(self)

    def check(self) -> None:
        if self.auto_exclude:
            raise ValueError(
                "auto_exclude retries a post-training step; QAT trains instead (drop auto_exclude, or keep layers with exclude)"
            )
        try:
            self.target()
        except ConfigError as exc:
            raise ValueError(f"quantize: {exc.message}") from None
        check_budget(self.training, "quantization-aware training")


QAT_TARGETS: dict[str, type[StaticInt8] | type[WeightOnly]] = {"static-int8": StaticInt8, "weight-only": WeightOnly}
register_config(QAT)
