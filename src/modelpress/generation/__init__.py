"""Text generation for causal LMs: engines with a KV cache and continuous batching (see ``base``).

``create_engine(source, engine="torch")``: ``torch`` is the reference (transformers, fp32 or
bf16); ``auto`` picks the fastest engine that runs the model.
"""

from __future__ import annotations

from typing import Any

from modelpress.errors import UnsupportedModelError
from modelpress.generation.base import Engine, EngineStats, GenerationResult, SamplingParams, SequenceHandle, TokenEvent

ENGINES = ("torch", "auto")


def create_engine(source: Any, engine: str = "torch", **options: Any) -> Engine:
    """An engine for ``source`` (a Hugging Face model folder or an Artifact of one); not started.

    ``options``: ``max_batch_size``, ``max_waiting``, and the engine's own (torch: ``dtype``,
    ``threads``; openvino: ``quantize``, ``threads``, ``cache_dir``).
    """
    if engine == "auto":
        engine = "torch"
    if engine == "torch":
        from modelpress.generation.torch_engine import TorchEngine

        return TorchEngine(source, **options)
    raise UnsupportedModelError(f"Unknown generation engine '{engine}'.", hint=f"Use one of {', '.join(ENGINES)}, e.g. engine='torch'.")


__all__ = ["ENGINES", "Engine", "EngineStats", "GenerationResult", "SamplingParams", "SequenceHandle", "TokenEvent", "create_engine"]
