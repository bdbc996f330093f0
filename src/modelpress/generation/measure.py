"""What ``evaluate`` and ``bench`` measure through an engine: decode speed and greedy agreement."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any

from modelpress.generation.base import Engine, SamplingParams

DEFAULT_PROMPT_TOKENS = 16


def decode_speed(engine: Engine, prompt_ids: Sequence[int], *, tokens: int = 32, rounds: int = 3) -> dict[str, Any]:
    """Decode tokens/s at batch 1 (greedy, no stop ids): the median of ``rounds`` requests after one warm-up,
    and the time to first token (the prefill of ``prompt_ids``)."""
    greedy = SamplingParams(max_tokens=tokens, temperature=0, stop_token_ids=())
    engine.generate(prompt_ids, SamplingParams(max_tokens=2, temperature=0, stop_token_ids=()))
    rates, ttfts = [], []
    for _ in range(max(1, rounds)):
        r = engine.generate(prompt_ids, greedy)
        first = r.seconds_to_first_token or 0.0
        rates.append((r.completion_tokens - 1) / max(r.seconds - first, 1e-9))
        ttfts.append(first)
    return {
        "engine": engine.name,
        "options": describe(engine),
        "prompt_tokens": len(prompt_ids),
        "new_tokens": tokens,
        "decode_tokens_per_s": statistics.median(rates),
        "rounds_tokens_per_s": rates,
        "ttft_s": statistics.median(ttfts),
    }


def greedy_agreement(engine: Engine, reference: Engine, prompts: Sequence[Sequence[int]], *, tokens: int = 32) -> dict[str, Any]:
    """How far ``engine``'s greedy continuations follow ``reference``'s: the share of prompts whose
    ``tokens`` new tokens are identical, and the mean share of tokens before the first difference."""
    greedy = SamplingParams(max_tokens=tokens, temperature=0, stop_token_ids=())
    same, prefix = 0, []
    for ids in prompts:
        a = engine.generate(ids, greedy).token_ids
        b = reference.generate(ids, greedy).token_ids
        n = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
        same += a == b
        prefix.append(n / max(len(b), 1))
    return {
        "prompts": len(prompts),
        "new_tokens": tokens,
        "greedy_identical": same / max(len(prompts), 1),
        "greedy_prefix_agreement": statistics.fmean(prefix) if prefix else 0.0,
    }


def describe(engine: Engine) -> dict[str, Any]:
    out: dict[str, Any] = {"max_batch_size": engine.max_batch_size}
    for attr in ("quantize", "precision", "dtype"):
        if hasattr(engine, attr):
            out[attr] = getattr(engine, attr)
    return out


def prompts_from_texts(engine: Engine, texts: Sequence[str], n: int, prompt_tokens: int = DEFAULT_PROMPT_TOKENS) -> list[list[int]]:
    """The first ``prompt_tokens`` tokens of the first ``n`` texts long enough to have them."""
    out = []
    for text in texts:
        ids = engine.encode(text)
        if len(ids) >= prompt_tokens:
            out.append(ids[:prompt_tokens])
        if len(out) == n:
            break
    return out
