"""OpenVINO runner. ``precision`` sets the inference precision hint.

OpenVINO runs in bf16 by default on CPUs with AVX512_BF16, which moves hidden states by about
1e-2; modelpress asks for ``f32`` unless told otherwise, so an OpenVINO model means the same as
its source. Pass ``precision="bf16"`` (or use the Precision technique) for the faster mode.
"""

from __future__ import annotations

import threading

import numpy as np

from modelpress.errors import ConfigError, require
from modelpress.runtimes.base import Runner, register_runtime
from modelpress.runtimes.onnxruntime import exported

PRECISIONS = ("f32", "bf16", "f16")


@register_runtime
class OpenVINORunner(Runner):
    """Options: ``precision`` (f32, bf16, f16), ``performance_hint`` (LATENCY, THROUGHPUT)."""

    name = "openvino"

    def _load(self) -> None:
        ov = require("openvino", "openvino")
        precision = self.options.get("precision") or "f32"
        if precision not in PRECISIONS:
            raise ConfigError(
                f"Unknown OpenVINO precision '{precision}'.", hint=f"Use one of {', '.join(PRECISIONS)}, e.g. precision='bf16'."
            )
        art = self.loaded_artifact = exported(self.artifact, "openvino")
        core = ov.Core()
        model = core.read_model(str(art.model_file))
        config = {
            "INFERENCE_NUM_THREADS": self.threads,
            "PERFORMANCE_HINT": self.options.get("performance_hint", "LATENCY"),
            "INFERENCE_PRECISION_HINT": precision,
        }
        self.compiled = core.compile_model(model, "CPU", config)
        self.signature = self.signature or art.manifest.signature
        self._inputs = [p.get_any_name() for p in self.compiled.inputs]
        self._outputs = [p.get_any_name() for p in self.compiled.outputs]
        self._local = threading.local()  # one infer request per thread

    def _run(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        req = getattr(self._local, "req", None)
        if req is None:
            req = self._local.req = self.compiled.create_infer_request()
        req.infer({n: batch[n] for n in self._inputs})
        return {n: req.get_output_tensor(i).data.copy() for i, n in enumerate(self._outputs)}
