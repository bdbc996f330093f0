"""ONNX Runtime runner, and the one place ONNX Runtime sessions are configured.

A source model (HF folder, torch module) is converted to ONNX first by the export cache that
``modelpress.export`` registers (see :mod:`modelpress.runtimes.base`). :func:`session` is what the
runner and every other user of ONNX Runtime in modelpress (the quantizers' load check) open a
graph with, so a graph is checked with exactly the options it is served with.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from modelpress.errors import ConfigError, require
from modelpress.runtimes.base import Runner, default_threads, register_runtime

OPTIMIZATION_LEVELS = ("all", "basic", "none")
DEFAULT_PROVIDERS = ("CPUExecutionProvider",)


def session_options(threads: int | None = None, *, optimization: str = "all", log_severity: int | None = None) -> Any:
    """ONNX Runtime session options: ``threads`` intra-op threads (all cores when None), one inter-op thread."""
    ort = require("onnxruntime", "onnx")
    if optimization not in OPTIMIZATION_LEVELS:
        raise ConfigError(
            f"Unknown ONNX Runtime optimization level '{optimization}'.",
            hint=f"Use one of {', '.join(OPTIMIZATION_LEVELS)}, e.g. optimization='basic'.",
        )
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads or default_threads()
    so.inter_op_num_threads = 1
    so.graph_optimization_level = {
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    }[optimization]
    if log_severity is not None:
        so.log_severity_level = log_severity
    return so


def session(
    model: str | Path | Any,
    threads: int | None = None,
    *,
    optimization: str = "all",
    providers: list[str] | None = None,
    log_severity: int | None = None,
) -> Any:
    """An inference session on a graph file or an in-memory ``ModelProto``."""
    ort = require("onnxruntime", "onnx")
    so = session_options(threads, optimization=optimization, log_severity=log_severity)
    source = str(model) if isinstance(model, str | Path) else model.SerializeToString()
    return ort.InferenceSession(source, so, providers=list(providers or DEFAULT_PROVIDERS))


@register_runtime
class OnnxRuntimeRunner(Runner):
    """Options: ``providers`` (list, default CPU), ``optimization`` ("all", "basic", "none")."""

    name = "onnxruntime"
    formats = ("onnx",)
    target_format = "onnx"

    def _load(self) -> None:
        art = self.loaded_artifact = self.loadable()
        self.session = session(
            art.model_file, self.threads, optimization=self.options.get("optimization") or "all", providers=self.options.get("providers")
        )
        self.signature = self.signature or art.manifest.signature
        self._inputs = [i.name for i in self.session.get_inputs()]
        self._outputs = [o.name for o in self.session.get_outputs()]

    def _run(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        res = self.session.run(self._outputs, {n: batch[n] for n in self._inputs})
        return dict(zip(self._outputs, res, strict=True))

    def close(self) -> None:
        self.session = None  # the session (and its memory) goes with its last reference
        super().close()
