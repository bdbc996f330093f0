"""OpenVINO runner, and the one place OpenVINO models are compiled. ``precision`` sets the inference precision hint.

OpenVINO runs in bf16 by default on CPUs with AVX512_BF16, which moves hidden states by about
1e-2; modelpress asks for ``f32`` unless told otherwise, so an OpenVINO model means the same as
its source. Pass ``precision="bf16"`` (or use the Precision technique) for the faster mode.

:func:`compile_model` is what the runner and every other user of OpenVINO in modelpress (the
quantizers' compile check, the sensitivity scan) compile with, so a model is checked with the
options it is served with.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np

from modelpress.errors import ConfigError, require
from modelpress.runtimes.base import Runner, register_runtime

PRECISIONS = ("f32", "bf16", "f16")
PERFORMANCE_HINTS = ("LATENCY", "THROUGHPUT")


def exact_f32(precision: str) -> dict[str, Any]:
    """The setting that makes ``precision: f32`` mean f32 for weight-compressed decoders on every CPU.

    OpenVINO's CPU plugin quantizes the activations of weight-compressed MatMuls to int8 (per group) on CPUs
    with VNNI or AMX, whatever ``INFERENCE_PRECISION_HINT`` says: on an AMD EPYC with AVX-512 VNNI the GPTQ
    stories260k's logits moved by 0.27 from the same graph in f32 (2.6e-5 on AVX2 hosts, which have no such
    kernel), so the ONNX export's parity check and the perplexity a gate reads depended on the host. A decoder
    run in f32 (the quality reference, and generation by default) turns it off; bf16 and f16 keep the plugin's
    default. The ``openvino`` runtime (encoders) keeps the plugin's default: its weight-only variants run faster
    with it, and their quality is measured on the same runner that serves them.
    """
    return {"DYNAMIC_QUANTIZATION_GROUP_SIZE": 0} if precision == "f32" else {}


def compile_config(threads: int | None = None, *, precision: str = "f32", performance_hint: str = "LATENCY") -> dict[str, Any]:
    """The CPU plugin's settings: precision hint, performance hint, and ``threads`` (the plugin's choice when None)."""
    if precision not in PRECISIONS:
        raise ConfigError(f"Unknown OpenVINO precision '{precision}'.", hint=f"Use one of {', '.join(PRECISIONS)}, e.g. precision='bf16'.")
    performance_hint = str(performance_hint).upper()
    if performance_hint not in PERFORMANCE_HINTS:
        raise ConfigError(
            f"Unknown OpenVINO performance hint '{performance_hint}'.",
            hint=f"Use one of {', '.join(PERFORMANCE_HINTS)}, e.g. performance_hint='THROUGHPUT'.",
        )
    config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": performance_hint}
    if threads:
        config["INFERENCE_NUM_THREADS"] = int(threads)
    return config


def compile_model(
    model: Any,
    threads: int | None = None,
    *,
    precision: str = "f32",
    performance_hint: str = "LATENCY",
    extra: dict[str, Any] | None = None,
) -> Any:
    """A compiled CPU model from a model in memory or a path to an IR / ONNX file; ``extra``: more CPU plugin properties."""
    ov = require("openvino", "openvino")
    core = ov.Core()
    if not hasattr(model, "get_ordered_ops"):  # a path, not an ov.Model
        model = core.read_model(str(model))
    return core.compile_model(
        model, "CPU", {**compile_config(threads, precision=precision, performance_hint=performance_hint), **(extra or {})}
    )


@register_runtime
class OpenVINORunner(Runner):
    """Options: ``precision`` (f32, bf16, f16), ``performance_hint`` (LATENCY, THROUGHPUT)."""

    name = "openvino"
    formats = ("openvino", "onnx")
    target_format = "openvino"
    parallel_calls = False  # one stream (LATENCY): the CPU plugin runs one request at a time per compiled model

    def _load(self) -> None:
        precision = self.options.get("precision") or "f32"
        performance_hint = self.options.get("performance_hint") or "LATENCY"
        compile_config(precision=precision, performance_hint=performance_hint)  # bad options fail before any export
        art = self.loaded_artifact = self.loadable()
        self.compiled = compile_model(art.model_file, self.threads, precision=precision, performance_hint=performance_hint)
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

    def close(self) -> None:
        self.compiled = None  # the compiled model and its infer requests go with their last references
        self._local = threading.local()
        super().close()
