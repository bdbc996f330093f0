"""Shadow copies of generation requests: what a rollout's candidate LLM is sent, and how it is scored.

During a rollout's shadow phase the routing decision mirrors each request to the candidate. For a
causal LM the OpenAI routes (:mod:`modelpress.serving.protocols.openai_llm`) answer the client
first, then hand the server's :class:`~modelpress.serving.routing.Mirror` a copy: one
:class:`ShadowPrompt` per prompt (not ``n`` per prompt), the client's sampling with ``max_tokens``
capped at :data:`SHADOW_MAX_TOKENS`, a text re-encoded with the candidate's own tokenizer. The
candidate's ``EngineBatcher.infer`` (:mod:`modelpress.serving.llm`) generates them
(:func:`generate_answer`) and answers :class:`GenerationAnswer` rows; the rollout's shadow
recorder compares them with the primary's (:func:`first_token_agreement`) and records the
candidate's time to first token as the copy's latency.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

# A shadow copy generates at most this many tokens: agreement is scored on the first one (see
# first_token_agreement), the rest exercise the candidate's decode steps under the same load at a bounded cost.
SHADOW_MAX_TOKENS = 16


@dataclass(frozen=True)
class ShadowPrompt:
    """One prompt of a mirrored request, as the candidate gets it: ``prompt_ids`` (ids the client sent), or
    ``text`` / ``messages`` encoded with the candidate's own tokenizer; ``params``: the client's sampling,
    ``max_tokens`` capped at :data:`SHADOW_MAX_TOKENS`; ``scored``: the client asked for greedy tokens, so
    the first token is the model's, comparable between versions."""

    params: Any  # generation.SamplingParams
    prompt_ids: tuple[int, ...] | None = None
    text: str | None = None
    messages: tuple[tuple[str, str], ...] | None = None
    scored: bool = True

    def ids_for(self, engine: Any) -> list[int]:
        if self.prompt_ids is not None:
            return list(self.prompt_ids)
        if self.messages is not None:
            return list(engine.apply_chat_template([{"role": r, "content": c} for r, c in self.messages]))
        return list(engine.encode(self.text or ""))


@dataclass
class GenerationAnswer:
    """What one version generated for one prompt: its tokens, time to first token, total seconds."""

    token_ids: list[int] = field(default_factory=list)
    ttft_s: float | None = None
    seconds: float = 0.0
    finish_reason: str | None = None
    scored: bool = True


@dataclass
class ShadowRows:
    """What :class:`~modelpress.serving.routing.Mirror` hands the candidate (``rows``; generation has no lengths)."""

    rows: list[ShadowPrompt]
    lengths: list[int] | None = None


async def generate_answer(engine: Any, prompt: ShadowPrompt) -> GenerationAnswer:
    """Generate ``prompt`` on ``engine`` (on the event loop, not blocking it); an engine failure raises."""
    started = time.perf_counter()
    handle = engine.submit(prompt.ids_for(engine), prompt.params)
    out = GenerationAnswer(scored=prompt.scored)
    try:
        async for event in handle.aiter():
            if event.token_id is not None:
                if out.ttft_s is None:
                    out.ttft_s = time.perf_counter() - started
                out.token_ids.append(int(event.token_id))
            if event.finish_reason is not None:
                out.finish_reason = event.finish_reason
    finally:
        if out.finish_reason is None:  # left early (the server is closing): free its slot at the next step
            handle.cancel()
    if out.finish_reason == "error":
        raise RuntimeError("the shadow sequence failed in the engine")
    out.seconds = time.perf_counter() - started
    return out


def first_token_agreement(primary: Sequence[GenerationAnswer], candidate: Sequence[GenerationAnswer]) -> float | None:
    """The share of scored prompts whose first generated token is the same on both versions; None when no prompt is scored.

    Greedy decoding's first token is the model's most likely next token after the prompt: this is
    the top-1 next-token agreement the optimization gate measures offline (``top1_agreement``),
    taken at the one position every request has. Later tokens are not compared: after one
    different token the two versions continue different texts, so a position-wise match there
    says little about the candidate (on stories260k an int8 variant's per-request share of equal
    tokens over 32 tokens had a standard deviation of 0.37; see docs/rollouts.md, "LLMs").
    """
    pairs = [(p, c) for p, c in zip(primary, candidate, strict=False) if p.scored and c.scored and p.token_ids]
    if not pairs:
        return None
    return sum(bool(c.token_ids) and c.token_ids[0] == p.token_ids[0] for p, c in pairs) / len(pairs)


def send_copies(server: Any, lv: Any, decision: Any, prompts: Sequence[ShadowPrompt], primary: list[GenerationAnswer]) -> None:
    """Hand the mirror the copies ``decision`` asks for (on the event loop, after the client was answered)."""
    router = server.repository.routers.get(lv.name)
    if router is None or not decision.mirrors or not prompts:  # unloaded meanwhile, or nothing to copy
        return
    prompts = list(prompts)

    def decode(handler: Any) -> ShadowRows:  # in a worker thread, with the candidate's own tokenizer
        engine = handler.engine
        return ShadowRows([dataclasses.replace(p, prompt_ids=tuple(p.ids_for(engine)), text=None, messages=None) for p in prompts])

    server.mirror.send(router, decision, decode, lv, primary)


__all__ = [
    "SHADOW_MAX_TOKENS",
    "GenerationAnswer",
    "ShadowPrompt",
    "ShadowRows",
    "first_token_agreement",
    "generate_answer",
    "send_copies",
]
