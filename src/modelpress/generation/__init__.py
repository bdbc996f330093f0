"""Text generation for causal LMs: engines with a KV cache and continuous batching (see ``base``).

``create_engine(source, engine="torch")``: ``torch`` is the reference (transformers, fp32 or
bf16); ``llamacpp`` is the fastest measured on CPU (llama.cpp through llama-cpp-python, an
optional extra: the model converted to GGUF ``quantize="q8_0"`` (default), ``"q4_0"``, ``"f16"``
or None, with llama.cpp's own continuous batching); ``openvino`` is the fast CPU engine of the
default install (the decoder exported with an explicit KV cache, weights compressed to
``quantize="int8"`` (default) or ``"int4"`` by NNCF, or None); ``auto`` picks ``llamacpp`` when
llama_cpp and gguf import and the model is a Llama-architecture folder, else ``openvino`` when it
is installed and the model is a Llama-style decoder, else ``torch``; ``onnxruntime`` runs the
KV-cache ONNX decoder (the folder ``modelpress export MODEL --format onnx`` writes, or a Hugging
Face folder exported on first use; ``quantize=None`` (default), ``"int8"``, ``"int4"`` or
``"int8-dynamic"``). An
exported ONNX folder runs only on ``onnxruntime`` (``auto`` picks it there).
"""

from __future__ import annotations

from typing import Any

from modelpress.errors import UnsupportedModelError
from modelpress.generation.base import Engine, EngineStats, GenerationResult, SamplingParams, SequenceHandle, TokenEvent

ENGINES = ("torch", "openvino", "llamacpp", "onnxruntime", "auto")
# the options the llamacpp engine takes: ``auto`` gives it only calls it can honour (else openvino)
_LLAMACPP_OPTIONS = {"quantize", "threads", "cache_dir", "gguf_path", "max_batch_size", "max_waiting"}


def create_engine(source: Any, engine: str = "torch", **options: Any) -> Engine:
    """An engine for ``source`` (a Hugging Face model folder or an Artifact of one); not started.

    ``options``: ``max_batch_size``, ``max_waiting``, and the engine's own (torch: ``dtype``,
    ``threads``, ``tensor_parallel`` and ``device`` (the model split over N worker processes:
    docs/tensor-parallel.md); openvino: ``quantize``, ``threads``, ``cache_dir``; llamacpp: ``quantize``,
    ``threads``, ``cache_dir``, ``gguf_path``; onnxruntime: ``quantize``, ``threads``, ``cache_dir``).
    """
    if "tensor_parallel" in options:  # only the torch engine splits a model over processes (docs/tensor-parallel.md)
        if engine not in ("torch", "auto"):
            raise UnsupportedModelError(
                f"tensor_parallel runs on the torch engine, not '{engine}'.",
                hint="Example: create_engine(path, 'torch', tensor_parallel=2), modelpress serve DIR --tensor-parallel 2",
            )
        from modelpress.generation.tensor_parallel import create_tensor_parallel

        return create_tensor_parallel(source, **options)
    if _is_onnx(source):
        if engine == "auto":
            engine = "onnxruntime"
        elif engine in ENGINES and engine != "onnxruntime":
            raise UnsupportedModelError(
                f"'{getattr(source, 'name', source)}' is an ONNX export: the {engine} engine runs Hugging Face folders.",
                hint="Run it with engine='onnxruntime' (modelpress serve DIR --engine onnxruntime), or pass the original model folder.",
            )
    if engine == "auto":
        engine = "torch"
        from importlib.util import find_spec

        from modelpress.generation import llamacpp_engine

        if llamacpp_engine.available() and set(options) <= _LLAMACPP_OPTIONS and llamacpp_engine.supported(source):
            engine = "llamacpp"
        elif find_spec("openvino") is not None and find_spec("nncf") is not None:
            from modelpress.generation.openvino_engine import supported

            if supported(source):
                engine = "openvino"
    if engine == "torch":
        from modelpress.generation.torch_engine import TorchEngine

        return TorchEngine(source, **options)
    if engine == "llamacpp":
        from modelpress.generation.llamacpp_engine import LlamaCppEngine

        return LlamaCppEngine(source, **options)
    if engine == "openvino":
        from modelpress.generation.openvino_engine import OpenVINOEngine

        return OpenVINOEngine(source, **options)
    if engine == "onnxruntime":
        from modelpress.generation.onnxruntime_engine import OnnxRuntimeEngine

        return OnnxRuntimeEngine(source, **options)
    raise UnsupportedModelError(f"Unknown generation engine '{engine}'.", hint=f"Use one of {', '.join(ENGINES)}, e.g. engine='torch'.")


def _is_onnx(source: Any) -> bool:
    """An exported ONNX artifact (or its folder): only the onnxruntime engine runs it."""
    from modelpress.generation.onnxruntime_engine import onnx_folder

    return onnx_folder(source) is not None


__all__ = ["ENGINES", "Engine", "EngineStats", "GenerationResult", "SamplingParams", "SequenceHandle", "TokenEvent", "create_engine"]
