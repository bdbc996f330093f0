"""The generation engine's interface: what the server, ``evaluate``, ``bench`` and the chat UI call.

An engine owns one causal LM and its tokenizer and runs a step loop in its own thread:
requests wait in a bounded queue, join the running batch between decode steps (continuous
batching), and leave it when they finish; every new token is pushed to the request's stream.

    engine = create_engine("../shared/data/models/stories260k", engine="torch")
    engine.start()
    handle = engine.submit(engine.encode("Once upon a time"), SamplingParams(max_tokens=32))
    for event in handle:            # or ``async for event in handle.aiter()`` on an event loop
        print(event.text, end="")
    engine.stop()

Concrete engines live beside this module (``torch_engine`` is the reference every other
engine is checked against: greedy tokens equal).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

FinishReason = Literal["stop", "length", "cancelled", "error"]


@dataclass(frozen=True)
class SamplingParams:
    """How one sequence is sampled. ``temperature == 0`` is greedy (top-p/top-k ignored).

    ``stop``: strings that end the sequence (not included in the text); ``stop_token_ids``:
    ids that end it (None: the model's generation config, e.g. ``[1, 2]`` for stories260k);
    ``seed``: a per-request generator, so the same seed gives the same tokens.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] | None = None


@dataclass(frozen=True)
class TokenEvent:
    """One step of one sequence. ``text``: the new text since the previous event (may be empty
    while a multi-byte character or a possible stop string is held back); the last event of a
    sequence has ``finish_reason`` set."""

    token_id: int | None
    text: str
    finish_reason: FinishReason | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass
class GenerationResult:
    token_ids: list[int]
    text: str
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    seconds_to_first_token: float | None = None
    seconds: float = 0.0


class SequenceHandle:
    """A submitted request: iterate it (blocking) or ``aiter()`` it (asyncio) for its events;
    ``cancel()`` frees its slot at the next step (a client that disconnects calls it);
    ``result()`` waits for the end and returns the whole :class:`GenerationResult`."""

    request_id: str

    def __iter__(self) -> Iterator[TokenEvent]:
        raise NotImplementedError

    def aiter(self) -> AsyncIterator[TokenEvent]:
        raise NotImplementedError

    def cancel(self) -> None:
        raise NotImplementedError

    def result(self, timeout: float | None = None) -> GenerationResult:
        raise NotImplementedError


@dataclass
class EngineStats:
    """What ``/metrics`` and the dashboard show. ``steps``: decode steps run; ``step_log``: the
    last steps' request ids (a bounded deque), so a test sees two sequences share a step."""

    running: int = 0
    waiting: int = 0
    kv_cache_used_tokens: int = 0
    kv_cache_capacity_tokens: int = 0
    steps: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    step_log: list[tuple[str, ...]] = field(default_factory=list)


class Engine:
    """A causal LM behind a continuous-batching step loop.

    ``submit`` never blocks: it raises :class:`modelpress.errors.ServerOverloadedError` (429) when
    the waiting queue is full and :class:`modelpress.errors.InvalidInputError` (400) when the
    prompt plus ``max_tokens`` does not fit the model's context. ``observer`` callbacks (set by
    the server) receive ``(event_name, value)`` pairs: ``ttft_s``, ``itl_s``, ``tokens``.
    """

    name: str = "engine"  # "torch", "openvino", ...
    model_name: str = ""
    context_length: int = 0
    max_batch_size: int = 8
    max_waiting: int = 64

    def start(self) -> None:
        raise NotImplementedError

    def stop(self, drain: bool = True) -> None:
        raise NotImplementedError

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, token_ids: Sequence[int]) -> str:
        raise NotImplementedError

    def apply_chat_template(self, messages: Sequence[dict[str, str]]) -> list[int]:
        """Prompt ids for OpenAI-style messages: the tokenizer's chat template, or the documented
        default (``docs/llm.md``) for a model without one."""
        raise NotImplementedError

    def submit(self, prompt_ids: Sequence[int], params: SamplingParams, request_id: str | None = None) -> SequenceHandle:
        raise NotImplementedError

    def generate(self, prompt_ids: Sequence[int], params: SamplingParams) -> GenerationResult:
        return self.submit(prompt_ids, params).result()

    def stats(self) -> EngineStats:
        raise NotImplementedError

    def add_observer(self, observer: Any) -> None:
        raise NotImplementedError


__all__ = ["Engine", "EngineStats", "FinishReason", "GenerationResult", "SamplingParams", "SequenceHandle", "TokenEvent"]
