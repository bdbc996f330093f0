"""The runner protocol: load an artifact on one backend and run a batch.

Evaluation, benchmarks and the server all call ``runner.run(batch) -> outputs`` with a dict of
NumPy arrays named as the artifact's signature says, so what is measured is what is served.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from typing import Any, ClassVar

import numpy as np

from modelpress.artifacts import Artifact, Signature
from modelpress.errors import ConfigError, InvalidInputError, UnknownRuntimeError


def default_threads() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))


class Runner(ABC):
    """One loaded model on one backend."""

    name: ClassVar[str]

    def __init__(self, artifact: Artifact, *, threads: int | None = None, **options: Any) -> None:
        if threads is not None and (not isinstance(threads, int) or threads < 1):
            raise ConfigError(f"threads must be a positive integer, got {threads!r}.", hint="Example: threads=2")
        self.artifact = artifact
        self.threads = threads or default_threads()
        self.options = options
        self.signature: Signature | None = artifact.manifest.signature
        self._loaded = False

    @abstractmethod
    def _load(self) -> None:
        """Load the model; set ``self.signature`` if the artifact did not have one."""

    @abstractmethod
    def _run(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one checked batch."""

    def load(self) -> Runner:
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


def create_runner(artifact: Artifact, runtime: str = "torch", *, threads: int | None = None, **options: Any) -> Runner:
    """A runner for ``artifact`` on ``runtime`` (torch, onnxruntime, openvino).

    An artifact made by an optimization step may carry runtime options (e.g. OpenVINO's bf16
    precision hint) in ``manifest.task_config["runtime_options"][runtime]``; they are the
    defaults here, and ``options`` passed explicitly override them. So evaluation, benchmarks and
    the server all run a variant exactly as it was made.
    """
    if runtime not in RUNTIMES:
        raise UnknownRuntimeError(
            f"Unknown runtime '{runtime}'.", hint=f"Known runtimes: {', '.join(sorted(RUNTIMES))}. Example: --runtime onnxruntime"
        )
    stored = (artifact.manifest.task_config.get("runtime_options") or {}).get(runtime) or {}
    merged = {**stored, **{k: v for k, v in options.items() if v is not None}}
    return RUNTIMES[runtime](artifact, threads=threads, **merged)
