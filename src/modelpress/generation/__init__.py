"""Text generation for causal LMs: engines with a KV cache and continuous batching (see ``base``)."""

from modelpress.generation.base import Engine, EngineStats, GenerationResult, SamplingParams, SequenceHandle, TokenEvent

__all__ = ["Engine", "EngineStats", "GenerationResult", "SamplingParams", "SequenceHandle", "TokenEvent"]
