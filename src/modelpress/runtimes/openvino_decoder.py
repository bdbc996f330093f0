"""The ``openvino-decoder`` runtime: a causal LM's KV-cache decoder IR, run on whole sequences.

The OpenVINO generation engine runs a decoder graph with the cache as plain tensors
(``export/kv_decoder.py``: ``input_ids, position_ids, attention_mask, past_k, past_v -> logits,
new_k, new_v``). LLM quantization (``gptq``, ``awq``, ``weight-only`` on ``openvino-decoder``)
compresses that graph, so its quality is measured on it: this runner gives it the task's
``input_ids`` and ``attention_mask``, positions counted over the unmasked tokens and an empty
cache, and returns the logits of every position (the graph must be exported with
``all_logits``). Perplexity and agreement are then computed as on any other runner, on the very
graph that generates.

It loads a folder holding ``decoder.xml`` and ``engine.json`` (what the LLM techniques write).
Any other artifact (a Hugging Face folder) goes through the ``openvino-decoder`` converter, the
float decoder exported once per content hash (registered by :mod:`modelpress.optimize.quantize.llm`).
Options: ``precision`` (f32 by default: OpenVINO's bf16 default moves stories260k's perplexity
from 3.55 to 4.53 with no quantization at all; f32 also turns off the CPU plugin's int8 activations for
compressed weights on VNNI/AMX CPUs, :func:`modelpress.runtimes.openvino.exact_f32`), ``performance_hint``.
"""

from __future__ import annotations

import json
import threading
from typing import Any

import numpy as np

from modelpress.artifacts import Artifact
from modelpress.errors import ConfigError, UnsupportedModelError
from modelpress.runtimes.base import Runner, register_runtime
from modelpress.runtimes.openvino import compile_config, compile_model, exact_f32

NAME = "openvino-decoder"
MODEL_FILE = "decoder.xml"
META_FILE = "engine.json"


@register_runtime
class OpenVINODecoderRunner(Runner):
    """Options: ``precision`` (f32, bf16, f16), ``performance_hint`` (LATENCY, THROUGHPUT)."""

    name = NAME
    formats = ("openvino",)
    target_format = NAME
    parallel_calls = False  # one stream (LATENCY): the CPU plugin runs one request at a time per compiled model

    def loadable(self) -> Artifact:
        art = self.artifact
        if art.format == "openvino" and art.path is not None and (art.path / META_FILE).is_file():
            return art
        if art.format == "openvino":
            raise UnsupportedModelError(
                f"'{art.name}' is an OpenVINO IR without {META_FILE}: the {NAME} runtime runs the KV-cache decoder of a causal LM.",
                hint="Run this IR with --runtime openvino, or make a decoder with a recipe, e.g. "
                "modelpress optimize MODEL --recipe recipes/llm-int8.yaml.",
            )
        if art.task != "causal-lm":
            raise UnsupportedModelError(
                f"The {NAME} runtime runs causal LMs; '{art.name}' is a {art.task} model.", hint="Use --runtime openvino for it."
            )
        return super().loadable()

    def _load(self) -> None:
        precision = self.options.get("precision") or "f32"
        hint = self.options.get("performance_hint") or "LATENCY"
        compile_config(precision=precision, performance_hint=hint)  # bad options fail before any export
        art = self.loaded_artifact = self.loadable()
        if art.path is None:
            raise UnsupportedModelError(f"'{art.name}' has no folder holding {MODEL_FILE}.")
        meta = json.loads((art.path / META_FILE).read_text())
        if not meta.get("all_logits"):
            raise ConfigError(
                f"The decoder in '{art.path}' returns the last position's logits only: perplexity needs every position's.",
                hint="Export it with all_logits=True (what the LLM techniques write), e.g. modelpress optimize MODEL "
                "--recipe recipes/llm-int8.yaml.",
            )
        self.compiled = compile_model(
            art.path / MODEL_FILE, self.threads, precision=precision, performance_hint=hint, extra=exact_f32(precision)
        )
        past = next(p for p in self.compiled.inputs if "past_k" in p.get_names()).get_partial_shape()
        self._cache_heads, self._head_dim = int(past[1].get_length()), int(past[3].get_length())
        self.signature = self.signature or art.manifest.signature
        self._local = threading.local()  # one infer request per thread

    def _run(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ids = np.ascontiguousarray(batch["input_ids"], dtype=np.int64)
        mask = np.ascontiguousarray(batch.get("attention_mask", np.ones_like(ids)), dtype=np.int64)
        # positions count the real tokens: left padding gets position 0 (it is masked anyway)
        positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
        empty = np.zeros((ids.shape[0], self._cache_heads, 0, self._head_dim), dtype=np.float32)
        req = getattr(self._local, "req", None)
        if req is None:
            req = self._local.req = self.compiled.create_infer_request()
        req.infer({"input_ids": ids, "position_ids": positions, "attention_mask": mask, "past_k": empty, "past_v": empty})
        return {"logits": req.get_tensor("logits").data.copy()}

    def describe(self) -> dict[str, Any]:
        return {"precision": "f32", **super().describe()}

    def close(self) -> None:
        self.compiled = None
        self._local = threading.local()
        super().close()
