"""Every technique config, registered on import: ``import modelpress.optimize.configs`` knows them all.

One module per family (pure pydantic: no torch, ONNX Runtime or OpenVINO is imported here):

* :mod:`.base`: :class:`TechniqueConfig`, :class:`StrictModel`, :class:`Calibration`, :func:`parse_step`,
  :func:`register_config` and the name -> class table :data:`TECHNIQUES`;
* :mod:`.quantize`: ``dynamic-int8``, ``static-int8``, ``weight-only``, ``precision``;
* :mod:`.prune`: ``magnitude-prune``, ``sparsegpt``, ``wanda``, ``structured-prune``;
* :mod:`.distill`: ``distill``; :mod:`.training`: the training settings distill and structured-prune share.

The handlers that apply them are registered separately (:mod:`modelpress.optimize.handlers` is the
registry; :mod:`modelpress.optimize.techniques` imports every backend), so parsing a recipe never
loads a backend.
"""

from modelpress.optimize.configs import llm as llm  # registers gptq, awq, smoothquant (names: .llm)
from modelpress.optimize.configs.base import (
    CALIBRATION_DEFAULTS,
    RUNTIME_NAMES,
    TECHNIQUES,
    Calibration,
    RuntimeName,
    StrictModel,
    TechniqueConfig,
    parse_step,
    register_config,
    step_from_json,
    step_from_yaml,
)
from modelpress.optimize.configs.distill import Distill, DistillTraining
from modelpress.optimize.configs.prune import (
    METHODS,
    PRUNE_RUNTIMES,
    FineTune,
    GradualSchedule,
    LLMCalibration,
    MagnitudePrune,
    PruneConfig,
    RecoveryTraining,
    SparseGPT,
    StructuredPrune,
    Wanda,
    parse_nm,
    prune_config,
)
from modelpress.optimize.configs.quantize import STEP_TYPES, DynamicInt8, Precision, PrecisionHint, StaticInt8, Step, WeightOnly
from modelpress.optimize.configs.training import TrainConfig, TrainingSpec, check_budget, short_label

__all__ = [
    "CALIBRATION_DEFAULTS",
    "METHODS",
    "PRUNE_RUNTIMES",
    "RUNTIME_NAMES",
    "STEP_TYPES",
    "TECHNIQUES",
    "Calibration",
    "Distill",
    "DistillTraining",
    "DynamicInt8",
    "FineTune",
    "GradualSchedule",
    "LLMCalibration",
    "MagnitudePrune",
    "Precision",
    "PrecisionHint",
    "PruneConfig",
    "RecoveryTraining",
    "RuntimeName",
    "SparseGPT",
    "StaticInt8",
    "Step",
    "StrictModel",
    "StructuredPrune",
    "TechniqueConfig",
    "TrainConfig",
    "TrainingSpec",
    "Wanda",
    "WeightOnly",
    "check_budget",
    "parse_nm",
    "parse_step",
    "prune_config",
    "register_config",
    "short_label",
    "step_from_json",
    "step_from_yaml",
]
