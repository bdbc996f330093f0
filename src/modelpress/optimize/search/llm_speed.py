"""The tuner's speed figure for causal LMs: decode tokens/s through the generation engine that serves each candidate.

A causal LM is served token by token (:mod:`modelpress.generation`), so its candidates are timed
the way they run in production: each one's engine generates ``tokens`` greedy tokens after a
``prompt_tokens``-token prompt at batch 1 (:func:`modelpress.generation.measure.decode_speed`),
the baseline (the original on the torch engine) and the candidates one after another in every
round, ``rounds`` rounds (interleaved, as :func:`modelpress.bench.measure.time_interleaved`
does for runners), and each engine's median is kept. The records have the keys of
:func:`modelpress.bench.measure.speed_record`: ``variant_items_per_s`` is decode tokens/s,
``throughput_ratio`` the speed-up over the baseline's tokens/s in the same rounds, and
``variant_p50_ms`` / ``variant_p99_ms`` the median and the slowest time to first token.

Which engine runs a candidate: a folder holding an OpenVINO decoder IR (what ``weight-only`` on
``openvino-decoder``, ``gptq``, ``awq`` and ``smoothquant`` write) runs on ``openvino`` as it
is, with the float precision it was evaluated with; the original runs on ``torch`` (the
reference) or, as the ``openvino-decoder`` candidate, on ``openvino`` unquantized in f32. Any other
variant has no generation engine: timing it raises :class:`UnsupportedModelError` (the tuner
records the candidate as failed, with the reason).
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from modelpress.errors import UnsupportedModelError

DECODE_TOKENS = 32  # new tokens per timed request: enough decode steps that the prefill is a small share
PROMPT_TEXT = (  # any text the tokenizer splits into PROMPT_TOKENS tokens or more; the prompt is its first ones
    "Once upon a time, there was a little girl named Lily. She loved to play outside in the park with her friends, "
    "and every day she ran to the big tree by the pond."
)
PROMPT_TOKENS = 16
DECODER_RUNTIME = "openvino-decoder"


def engine_spec(art: Any, runtime: str, original: Any) -> tuple[str, dict[str, Any]]:
    """(engine name, options) that run ``art`` as ``runtime`` says, for decoding."""
    path = getattr(art, "path", None)
    if path is not None and (Path(path) / "decoder.xml").is_file():
        stored = (art.manifest.task_config.get("runtime_options") or {}).get(DECODER_RUNTIME) or {}
        return "openvino", {"precision": stored.get("precision") or "f32"}
    if art is original or getattr(art, "path", None) == getattr(original, "path", None):
        if runtime == "torch":
            return "torch", {}
        if runtime == DECODER_RUNTIME:
            return "openvino", {"quantize": None, "precision": "f32"}
    raise UnsupportedModelError(
        f"'{art.name}' on {runtime} has no generation engine, so its decoding speed cannot be measured.",
        hint="For a causal LM, tune candidates that write a decoder (weight-only on openvino-decoder, gptq, awq, smoothquant), "
        "e.g. {technique: gptq, bits: 4, group_size: 32}.",
    )


def time_decode(
    original: Any, variants: list[tuple[Any, str]], *, rounds: int = 3, threads: int | None = None, tokens: int = DECODE_TOKENS
) -> list[dict[str, Any]]:
    """Decode tokens/s of the original on torch and of every ``(artifact, runtime)``, in interleaved rounds.

    Returns one speed record per variant (see the module docstring).
    """
    from modelpress.generation import create_engine
    from modelpress.generation.measure import decode_speed

    specs: list[tuple[str, dict[str, Any]]] = [("torch", {})] + [engine_spec(art, rt, original) for art, rt in variants]
    sources = [original]
    for (art, _), (name, opts) in zip(variants, specs[1:], strict=True):
        # a decoder variant is read from its folder (IR, engine.json, config, tokenizer), the original as it is
        sources.append(str(art.path) if name == "openvino" and "quantize" not in opts else art)
    engines: list[Any] = []
    try:
        for source, (name, options) in zip(sources, specs, strict=True):
            engine = create_engine(source, engine=name, max_batch_size=1, **({"threads": threads} if threads else {}), **options)
            engine.start()
            engines.append(engine)
        prompt = engines[0].encode(PROMPT_TEXT)[:PROMPT_TOKENS]
        rates: list[list[float]] = [[] for _ in engines]
        ttfts: list[list[float]] = [[] for _ in engines]
        for _ in range(max(1, rounds)):
            for i, engine in enumerate(engines):
                rec = decode_speed(engine, prompt, tokens=tokens, rounds=1)
                rates[i].append(float(rec["decode_tokens_per_s"]))
                ttfts[i].append(float(rec["ttft_s"]))
    finally:
        for engine in engines:
            engine.stop(drain=False)
    base = statistics.median(rates[0])
    out = []
    for i, ((art, runtime), (name, options)) in enumerate(zip(variants, specs[1:], strict=True), start=1):
        rate = statistics.median(rates[i])
        out.append(
            {
                "unit": "decode tokens/s",
                "runtime": runtime,
                "engine": name,
                "engine_options": options,
                "baseline_runtime": "torch",
                "baseline_engine": "torch",
                "rounds": max(1, rounds),
                "prompt_tokens": len(prompt),
                "new_tokens": tokens,
                "threads": threads,
                "original_items_per_s": base,
                "variant_items_per_s": rate,
                "throughput_ratio": rate / base if base > 0 else None,
                "original_p50_ms": 1000 * statistics.median(ttfts[0]),
                "original_p99_ms": 1000 * max(ttfts[0]),
                "variant_p50_ms": 1000 * statistics.median(ttfts[i]),
                "variant_p99_ms": 1000 * max(ttfts[i]),
                "rounds_tokens_per_s": rates[i],
                "original_rounds_tokens_per_s": rates[0],
                "variant_size_bytes": art.size_bytes() if hasattr(art, "size_bytes") else None,
                "original_size_bytes": original.size_bytes() if hasattr(original, "size_bytes") else None,
            }
        )
    return out


def retime_decode(
    original: Any, variants: list[tuple[Any, str]], *, config: Any, threads: int | None, data_dir: Any = None, progress: Any = None
) -> list[dict[str, Any]]:
    """:func:`modelpress.optimize.search.stages.retime` for causal LMs (the same call): decode tokens/s, interleaved."""
    return time_decode(original, variants, rounds=getattr(config, "rounds", None) or 3, threads=threads)


__all__ = ["DECODE_TOKENS", "PROMPT_TOKENS", "engine_spec", "retime_decode", "time_decode"]
