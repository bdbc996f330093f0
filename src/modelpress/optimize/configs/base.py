"""One config class per technique: pydantic models that reject unknown keys on construction.

Every config carries a ``technique`` discriminator (``dynamic-int8``, ``static-int8``,
``weight-only``, ``precision``) and the ``runtime`` the artifact it makes is for, so a config
round-trips through JSON and YAML and is stored, as the recipe step that made it, in the
manifest of every artifact (``manifest.step``).

Shared keys:

* ``runtime``: ``onnxruntime``, ``openvino`` or ``torch`` (each technique lists what it supports);
* ``exclude``: layers to keep in float, each entry a layer name or a regular expression searched
  in the layer's name (ONNX node names, OpenVINO operation names, torch module paths);
* ``auto_exclude``: when the step fails the gate, measure each layer's sensitivity (quantize it
  alone, compare the outputs with the float model) and keep up to this many of the worst layers
  in float, retrying until the gate passes (0, the default, turns this off).
"""

from __future__ import annotations

import difflib
import json
import re
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from modelpress.errors import ConfigError, UnknownTechniqueError

RuntimeName = Literal["onnxruntime", "openvino", "torch"]
RUNTIME_NAMES: tuple[str, ...] = ("onnxruntime", "openvino", "torch")


def _format_validation_error(cls: type[BaseModel], exc: ValidationError, where: str) -> ConfigError:
    """A pydantic error as a :class:`ConfigError`: what is wrong, the valid keys, a close match."""
    valid = sorted(cls.model_fields)
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        msg = str(err["msg"]).removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            key = str(err["loc"][-1])
            keys = valid
            if len(err["loc"]) > 1:  # a key inside a nested block (calibration: {...})
                nested = cls.model_fields.get(str(err["loc"][0]))
                ann = getattr(nested, "annotation", None)
                if isinstance(ann, type) and issubclass(ann, BaseModel):
                    keys = sorted(ann.model_fields)
                    valid = [f"{err['loc'][0]}.{k}" for k in keys] + [v for v in valid if v != err["loc"][0]]
            near = difflib.get_close_matches(key, keys, n=1)
            hint = f" Did you mean '{near[0]}'?" if near else ""
            lines.append(f"unknown key '{loc}'.{hint}")
        elif err["type"] == "value_error":
            # A nested block (calibration: {...}) raised its own ConfigError: keep its words, one line.
            msg = re.sub(r"^Invalid [\w-]+: ", "", msg).replace("\n", " ")
            lines.append(f"'{loc}': {msg}" if loc else msg)
        else:
            lines.append(f"'{loc}': {msg} (got {err.get('input')!r})" if loc else msg)
    name = getattr(cls, "technique_name", None) or cls.__name__
    return ConfigError(
        f"Invalid {where or name}: " + "; ".join(lines),
        hint=f"Valid keys for {name}: {', '.join(valid)}.",
    )


class StrictModel(BaseModel):
    """A pydantic model whose constructor raises :class:`ConfigError` (a ValueError) on bad input."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise _format_validation_error(type(self), exc, "") from None


class Calibration(StrictModel):
    """Where static quantization gets its activation ranges from."""

    dataset: str | None = None  # a named dataset or a file; None: the task's calibration default
    samples: int = Field(64, ge=1, le=100_000)
    batch_size: int = Field(8, ge=1, le=1024)
    seed: int = 0


# The dataset each task calibrates on by default: a split other than the one it is scored on.
CALIBRATION_DEFAULTS = {
    "embedding": "stsb-train",
    "text-classification": "sst2-train",
    "image-classification": "mnist-train5k",
    "causal-lm": "tinyshakespeare",
}


class TechniqueConfig(StrictModel):
    """Base class of the technique configs."""

    technique_name: ClassVar[str] = ""
    supported_runtimes: ClassVar[tuple[str, ...]] = RUNTIME_NAMES

    runtime: RuntimeName = "onnxruntime"
    exclude: list[str] = Field(default_factory=list)
    auto_exclude: int = Field(0, ge=0, le=256)

    @field_validator("exclude")
    @classmethod
    def _patterns_compile(cls, value: list[str]) -> list[str]:
        for pattern in value:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"'{pattern}' is neither a layer name nor a valid regular expression ({exc})") from None
        return value

    @model_validator(mode="after")
    def _runtime_supported(self) -> TechniqueConfig:
        if self.runtime not in self.supported_runtimes:
            raise ValueError(f"{self.technique_name} has no {self.runtime} implementation; it runs on {', '.join(self.supported_runtimes)}")
        self.check()
        return self

    def check(self) -> None:
        """Cross-field checks of a technique (raise ValueError)."""

    # -- serialisation --------------------------------------------------------------
    def to_step(self) -> dict[str, Any]:
        """The JSON-ready dict stored as ``manifest.step`` (technique first)."""
        data = self.model_dump(mode="json")
        return {"technique": data.pop("technique"), **data}

    def to_json(self) -> str:
        return json.dumps(self.to_step(), sort_keys=True)

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_step(), sort_keys=False)

    def label(self) -> str:
        """A short human name: technique, runtime and the settings that differ from the defaults."""
        fields = type(self).model_fields
        step = self.to_step()
        diff = []
        for key, value in step.items():
            if key in ("technique", "runtime"):
                continue
            default = fields[key].get_default(call_default_factory=True)
            default = default.model_dump(mode="json") if isinstance(default, BaseModel) else default
            if isinstance(default, dict) and isinstance(value, dict):  # a nested setting: only its keys that differ
                diff += [f"{key}.{k}={v}" for k, v in value.items() if default.get(k) != v]
            elif default != value:
                diff.append(f"{key}={value}")
        return f"{self.technique_name}@{self.runtime}" + (f"({', '.join(diff)})" if diff else "")

    def excluding(self, layers: list[str]) -> TechniqueConfig:
        """A copy that also keeps ``layers`` (exact names) in float."""
        extra = [f"^{re.escape(n)}$" for n in layers]
        return type(self)(**{**self.to_step(), "exclude": list(self.exclude) + [e for e in extra if e not in self.exclude]})


# Every technique name -> its config class. Filled by :func:`register_config`, called by each
# module of this package on import, so ``import modelpress.optimize.configs`` knows them all.
TECHNIQUES: dict[str, type[TechniqueConfig]] = {}


def register_config(cls: type[TechniqueConfig]) -> type[TechniqueConfig]:
    """Make a new technique config known to recipes (``technique: NAME`` in YAML)."""
    TECHNIQUES[cls.technique_name] = cls
    return cls


def parse_step(data: Any, *, where: str = "step") -> TechniqueConfig:
    """A technique config from a dict (``{"technique": "dynamic-int8", ...}``) or a config."""
    if isinstance(data, TechniqueConfig):
        return data
    if isinstance(data, str):
        data = {"technique": data}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{where} must be a mapping with a 'technique' key, got {type(data).__name__}.",
            hint="Example: {technique: dynamic-int8, per_channel: true}",
        )
    name = data.get("technique")
    if name not in TECHNIQUES:
        near = difflib.get_close_matches(str(name), list(TECHNIQUES), n=1)
        raise UnknownTechniqueError(
            f"{where}: unknown technique {name!r}." + (f" Did you mean '{near[0]}'?" if near else ""),
            hint=f"Known techniques: {', '.join(sorted(TECHNIQUES))}. Example: {{technique: dynamic-int8, per_channel: true}}",
        )
    cls = TECHNIQUES[name]
    try:
        return cls(**data)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc.message}", hint=exc.hint) from None


def step_from_json(text: str) -> TechniqueConfig:
    return parse_step(json.loads(text))


def step_from_yaml(text: str) -> TechniqueConfig:
    import yaml

    return parse_step(yaml.safe_load(text))
