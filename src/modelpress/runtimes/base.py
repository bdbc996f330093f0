"""The runner protocol: load an artifact on one backend and run a batch.

Evaluation, benchmarks and the server all call ``runner.run(batch) -> outputs`` with a dict of
NumPy arrays named as the artifact's signature says, so what is measured is what is served.

A runner reads some formats as they are (``Runner.formats``). Any other artifact is handed to a
*converter* first: ``modelpress.export`` registers its export cache (a Hugging Face folder or a
torch module to ONNX or OpenVINO IR, exported once per content hash). The runtimes never import
the export package (it sits above them, and checks its exports with runners); ``import
modelpress`` imports it, so every runner can load every artifact.
"""

from __future__ import annotations

import os
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, ClassVar

import numpy as np

from modelpress.artifacts import Artifact, Signature
from modelpress.errors import ConfigError, InvalidInputError, UnknownRuntimeError, UnsupportedModelError


def default_threads() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))


Converter = Callable[[Artifact], Artifact]

# target format -> the function that makes an artifact a runner can load: "onnx", "openvino",
# "aoti", "torchscript", "executorch" (an export, registered by modelpress.export).
CONVERTERS: dict[str, Converter] = {}


def register_converter(target: str, converter: Converter) -> Converter:
    """Make ``converter`` the way to turn an artifact into ``target`` (see the module docstring)."""
    CONVERTERS[target] = converter
    return converter


def convert(artifact: Artifact, target: str, runtime: str) -> Artifact:
    """``artifact`` as ``target`` through the registered converter (a clear error when there is none)."""
    converter = CONVERTERS.get(target)
    if converter is None:
        raise UnsupportedModelError(
            f"The {runtime} runtime cannot load a '{artifact.format}' artifact as it is, and nothing that converts it to "
            f"'{target}' is registered.",
            hint=f"import modelpress (it registers the exporters), or export it first: modelpress export MODEL --format {target} -o DIR",
        )
    return converter(artifact)


# artifact format -> the runtime that serves it as it is (hf and torch: "torch").
FORMAT_RUNTIMES: dict[str, str] = {
    "onnx": "onnxruntime",
    "openvino": "openvino",
    "aoti": "aoti",
    "torchscript": "torchscript",
    "executorch": "executorch",
}


def runtime_of(artifact: Artifact) -> str:
    """The runtime an artifact is meant to run on: the one its manifest records, else the one its format needs.

    An optimization step records its runtime in ``manifest.step["runtime"]`` (the tuner's ONNX
    Runtime variant: ``onnxruntime``); each exported format runs on its runtime
    (:data:`FORMAT_RUNTIMES`: ONNX on ``onnxruntime``, an AOTInductor package on ``aoti``, ...);
    everything else on ``torch``.
    """
    recorded = (artifact.manifest.step or {}).get("runtime")
    if isinstance(recorded, str) and recorded in RUNTIMES:
        return recorded
    return FORMAT_RUNTIMES.get(artifact.format, "torch")


class Runner(ABC):
    """One loaded model on one backend."""

    name: ClassVar[str]
    formats: ClassVar[tuple[str, ...]]  # the artifact formats it loads as they are; others are converted
    target_format: ClassVar[str | None] = None  # what it converts the others to (see :func:`convert`); None: it cannot
    # whether calls from several threads run at the same time (else one at a time: a lock, or OpenVINO's one stream per
    # compiled model); the server runs one instance of a runtime without (serving.config.SERIAL_RUNTIMES)
    parallel_calls: ClassVar[bool] = True

    def __init__(self, artifact: Artifact, *, threads: int | None = None, **options: Any) -> None:
        if threads is not None and (not isinstance(threads, int) or threads < 1):
            raise ConfigError(f"threads must be a positive integer, got {threads!r}.", hint="Example: threads=2")
        self.artifact = artifact
        self.threads = threads or default_threads()
        self.options = options
        self.signature: Signature | None = artifact.manifest.signature
        self._loaded = False
        self._load_lock = threading.Lock()  # worker threads calling run() on a runner not loaded yet load it once

    @abstractmethod
    def _load(self) -> None:
        """Load the model; set ``self.signature`` if the artifact did not have one."""

    @abstractmethod
    def _run(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one checked batch."""

    def load(self) -> Runner:
        if not self._loaded:
            with self._load_lock:
                if not self._loaded:
                    self._load()
                    self._loaded = True
        return self

    def run(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.load()
        return self._run(self.check_batch(batch))

    def check_batch(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Keep the signature's inputs, check they are present, 2-D+ and of one batch size."""
        if self.signature is None:
            return batch
        out = {}
        sizes = set()
        for spec in self.signature.inputs:
            if spec.name not in batch:
                if spec.name == "token_type_ids" and "input_ids" in batch:
                    out[spec.name] = np.zeros_like(batch["input_ids"])
                    continue
                raise InvalidInputError(
                    f"The batch has no input '{spec.name}' (it has {', '.join(batch) or 'nothing'}).",
                    hint=f"This model takes: {', '.join(self.signature.input_names)}.",
                )
            arr = np.asarray(batch[spec.name])
            if arr.dtype != np.dtype(spec.dtype):
                arr = arr.astype(spec.dtype)
            if arr.ndim != len(spec.shape):
                raise InvalidInputError(
                    f"Input '{spec.name}' has {arr.ndim} dimensions; the model takes {len(spec.shape)} {spec.shape}.",
                    hint="Reshape the input to the model's signature (see `modelpress info MODEL`).",
                )
            sizes.add(arr.shape[0])
            out[spec.name] = np.ascontiguousarray(arr)
        if len(sizes) > 1:
            raise InvalidInputError(f"Inputs have different batch sizes: {sorted(sizes)}.")
        return out

    def loadable(self) -> Artifact:
        """The artifact this runner loads: its own, or its conversion to ``target_format``."""
        if self.artifact.format in self.formats:
            return self.artifact
        if self.target_format is None:
            raise UnsupportedModelError(
                f"The {self.name} runtime cannot load a '{self.artifact.format}' artifact.",
                hint=f"It loads {', '.join(self.formats)}; use the runtime of the artifact's format (e.g. --runtime onnxruntime for ONNX).",
            )
        return convert(self.artifact, self.target_format, self.name)

    def describe(self) -> dict[str, Any]:
        return {"runtime": self.name, "threads": self.threads, **{k: v for k, v in self.options.items() if v is not None}}

    def close(self) -> None:
        self._loaded = False

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.artifact.name!r}, threads={self.threads})"


RUNTIMES: dict[str, type[Runner]] = {}


def register_runtime(cls: type[Runner]) -> type[Runner]:
    RUNTIMES[cls.name] = cls
    return cls


def create_runner(artifact: Artifact, runtime: str | None = None, *, threads: int | None = None, **options: Any) -> Runner:
    """A runner for ``artifact`` on ``runtime`` (torch, onnxruntime, openvino).

    ``runtime=None``: the runtime the artifact's manifest records (:func:`runtime_of`), else torch.

    An artifact made by an optimization step may carry runtime options (e.g. OpenVINO's bf16
    precision hint) in ``manifest.task_config["runtime_options"][runtime]``; they are the
    defaults here, and ``options`` passed explicitly override them. So evaluation, benchmarks and
    the server all run a variant exactly as it was made.
    """
    if runtime is None:
        runtime = runtime_of(artifact)
    if runtime not in RUNTIMES:
        raise UnknownRuntimeError(
            f"Unknown runtime '{runtime}'.", hint=f"Known runtimes: {', '.join(sorted(RUNTIMES))}. Example: --runtime onnxruntime"
        )
    stored = (artifact.manifest.task_config.get("runtime_options") or {}).get(runtime) or {}
    merged = {**stored, **{k: v for k, v in options.items() if v is not None}}
    return RUNTIMES[runtime](artifact, threads=threads, **merged)
