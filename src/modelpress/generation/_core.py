"""What every engine shares: request handles, sampling, incremental detokenization, stop
handling and the continuous-batching step loop. An engine supplies a backend with two calls:

- ``prefill(ids) -> (logits [V], kv)``: one prompt alone, its KV cache as per-layer
  ``(K, V)`` tensors of shape ``[1, kv_heads, length, head_dim]``;
- ``decode(tokens [B], positions [B], kv, mask [B, T]) -> (logits [B, V], kv)``: one step of
  every running sequence together; ``kv`` holds ``T`` cached positions per row, left-padded
  (``mask`` 0 on padding), and comes back with ``T + 1``.

- ``prefill_padded(ids, positions, mask) -> (logits [n, V], kv)``: several left-padded prompts
  in one pass (the requests admitted at one step).

The step loop (one thread) admits waiting requests between decode steps (prefilled together,
then their cache rows are left-padded into the running batch), runs one decode step for all
running sequences, and drops the finished and cancelled ones (trimming padding no row needs).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from modelpress.errors import InvalidInputError, ModelNotReadyError, ModelpressRuntimeError, RequestTimeoutError, ServerOverloadedError
from modelpress.generation.base import (
    Engine,
    EngineStats,
    FinishReason,
    GenerationResult,
    SamplingParams,
    SequenceHandle,
    TokenEvent,
)

log = logging.getLogger(__name__)

STEP_LOG_LENGTH = 256  # decode steps kept in ``stats().step_log``
DETOKENIZE_PREFIX = 5  # prompt tokens decoded before the new ones, so a leading space is kept

KV = list[tuple[torch.Tensor, torch.Tensor]]
Observer = Callable[[str, float], None]


class Handle(SequenceHandle):
    """One request's event stream, fed by the step-loop thread and read from any thread or event loop."""

    def __init__(self, request_id: str, prompt_tokens: int) -> None:
        self.request_id = request_id
        self.prompt_tokens = prompt_tokens
        self._events: list[TokenEvent] = []
        self._cond = threading.Condition()
        self._subscribers: list[tuple[asyncio.AbstractEventLoop, asyncio.Queue[TokenEvent]]] = []
        self._result: GenerationResult | None = None
        self.cancelled = False

    # --- the step loop's side
    def push(self, event: TokenEvent, result: GenerationResult | None = None) -> None:
        with self._cond:
            self._events.append(event)
            if result is not None:
                self._result = result
            for loop, queue in list(self._subscribers):
                try:
                    loop.call_soon_threadsafe(queue.put_nowait, event)
                except RuntimeError:  # that event loop is closed: its reader is gone
                    self._subscribers.remove((loop, queue))
            self._cond.notify_all()

    # --- the reader's side
    def __iter__(self) -> Iterator[TokenEvent]:
        i = 0
        while True:
            with self._cond:
                while i >= len(self._events):
                    self._cond.wait()
                event = self._events[i]
            i += 1
            yield event
            if event.finish_reason is not None:
                return

    async def aiter(self) -> AsyncIterator[TokenEvent]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[TokenEvent] = asyncio.Queue()
        with self._cond:
            backlog = list(self._events)
            self._subscribers.append((loop, queue))
        try:
            for event in backlog:
                yield event
                if event.finish_reason is not None:
                    return
            while True:
                event = await queue.get()
                yield event
                if event.finish_reason is not None:
                    return
        finally:
            with self._cond, contextlib.suppress(ValueError):
                self._subscribers.remove((loop, queue))

    def cancel(self) -> None:
        self.cancelled = True

    @property
    def done(self) -> bool:
        return self._result is not None

    def result(self, timeout: float | None = None) -> GenerationResult:
        with self._cond:
            if not self._cond.wait_for(lambda: self._result is not None, timeout):
                raise RequestTimeoutError(
                    f"Request {self.request_id} did not finish within {timeout} s.",
                    hint="Pass a larger timeout, or a smaller max_tokens.",
                )
            if self._result is None:  # an invariant of the step loop, not user input
                raise ModelpressRuntimeError("generation: the step loop lost its state (_result).")
            return self._result


@dataclass
class _Seq:
    handle: Handle
    prompt: list[int]
    params: SamplingParams
    stop_ids: frozenset[int]
    generator: torch.Generator | None
    submitted: float
    tokens: list[int] = field(default_factory=list)
    text: str = ""  # detokenized so far (stop strings not yet cut)
    sent: int = 0  # characters of ``text`` already sent
    prefix_offset: int = 0
    read_offset: int = 0
    first_token_at: float | None = None
    last_token_at: float | None = None
    finished: FinishReason | None = None

    @property
    def length(self) -> int:  # tokens in the KV cache once the last sampled token is fed
        return len(self.prompt) + len(self.tokens)


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """One token from a row of logits: argmax when temperature is 0, else temperature, top-k, top-p."""
    if params.temperature == 0:
        return int(torch.argmax(logits))
    x = logits.float() / params.temperature
    if params.top_k > 0 and params.top_k < x.numel():
        kth = torch.topk(x, params.top_k).values[-1]
        x = x.masked_fill(x < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_x, order = torch.sort(x, descending=True)
        probs = torch.softmax(sorted_x, -1)
        # drop a token when the tokens before it already hold top_p of the mass (the first is always kept)
        drop = (torch.cumsum(probs, -1) - probs) >= params.top_p
        x = x.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    probs = torch.softmax(x, -1)
    return int(torch.multinomial(probs, 1, generator=generator))


def _held_back(text: str, stops: Sequence[str]) -> int:
    """Characters at the end of ``text`` that could still become the start of a stop string."""
    best = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:n]):
                best = n
                break
    return best


class BatchingEngine(Engine):
    """The step loop and request bookkeeping; subclasses set the backend (``_prefill``/``_decode``),
    the tokenizer, ``context_length`` and the default stop ids."""

    def __init__(self, *, tokenizer: Any, context_length: int, stop_token_ids: Sequence[int], bos_token_id: int | None,
                 max_batch_size: int = 8, max_waiting: int = 64, model_name: str = "") -> None:  # fmt: skip
        if max_batch_size < 1 or max_waiting < 0:
            raise InvalidInputError(
                f"max_batch_size must be >= 1 and max_waiting >= 0 (got {max_batch_size}, {max_waiting}).",
                hint="Example: create_engine(path, max_batch_size=8, max_waiting=64)",
            )
        self.tokenizer = tokenizer
        self.context_length = int(context_length)
        self.default_stop_ids = tuple(dict.fromkeys(int(i) for i in stop_token_ids))
        self.bos_token_id = bos_token_id
        self.max_batch_size = max_batch_size
        self.max_waiting = max_waiting
        self.model_name = model_name
        self._lock = threading.Condition()
        self._waiting: deque[_Seq] = deque()
        self._running: list[_Seq] = []
        self._observers: list[Observer] = []
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._drain = True
        self._ids = itertools.count(1)
        self._stats = EngineStats(kv_cache_capacity_tokens=self.max_batch_size * self.context_length)
        self._step_log: deque[tuple[str, ...]] = deque(maxlen=STEP_LOG_LENGTH)
        # the running batch: per-layer K/V [B, H, T, D], its mask [B, T]
        self._kv: KV = []
        self._mask: torch.Tensor | None = None

    # --- backend
    def _prefill(self, ids: list[int]) -> tuple[torch.Tensor, KV]:
        raise NotImplementedError

    def _decode(self, tokens: torch.Tensor, positions: torch.Tensor, kv: KV, mask: torch.Tensor) -> tuple[torch.Tensor, KV]:
        raise NotImplementedError

    # --- tokenizer
    def encode(self, text: str) -> list[int]:
        ids = list(self.tokenizer(text)["input_ids"])
        if self.bos_token_id is not None and (not ids or ids[0] != self.bos_token_id):
            ids = [self.bos_token_id, *ids]
        return ids

    def decode(self, token_ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(token_ids), skip_special_tokens=True)

    def apply_chat_template(self, messages: Sequence[dict[str, str]]) -> list[int]:
        for m in messages:
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise InvalidInputError(
                    f"A chat message must be an object with 'role' and 'content' (got {m!r}).",
                    hint='Example: [{"role": "user", "content": "Tell me a story."}]',
                )
        if getattr(self.tokenizer, "chat_template", None):
            out = self.tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=True)
            ids = out["input_ids"] if hasattr(out, "keys") else out
            return [int(i) for i in ids]
        # The documented default (docs/llm.md) for a model without a chat template: plain text turns.
        text = "".join(f"{m['role'].capitalize()}: {m['content']}\n" for m in messages) + "Assistant:"
        return self.encode(text)

    # --- requests
    def submit(self, prompt_ids: Sequence[int], params: SamplingParams, request_id: str | None = None) -> SequenceHandle:
        prompt = [int(i) for i in prompt_ids]
        self._check(prompt, params)
        seq = _Seq(
            handle=Handle(request_id or f"seq-{next(self._ids)}-{uuid.uuid4().hex[:6]}", len(prompt)),
            prompt=prompt,
            params=params,
            stop_ids=frozenset(self.default_stop_ids if params.stop_token_ids is None else params.stop_token_ids),
            generator=None if params.temperature == 0 else torch.Generator().manual_seed(
                params.seed if params.seed is not None else int(torch.randint(0, 2**62, ()).item())
            ),
            submitted=time.perf_counter(),
            prefix_offset=max(0, len(prompt) - DETOKENIZE_PREFIX),
            read_offset=len(prompt),
        )  # fmt: skip
        with self._lock:
            if self._stopping or self._thread is None:
                raise ModelNotReadyError(f"The {self.name} engine is not running.", hint="Call engine.start() first.")
            # a request a free batch slot takes at the next step does not count as waiting
            free = max(0, self.max_batch_size - len(self._running))
            if len(self._waiting) >= self.max_waiting + free:
                raise ServerOverloadedError(
                    f"The generation queue is full ({len(self._waiting)} requests waiting, {len(self._running)} running).",
                    hint="Retry after a moment, or start the engine with a larger max_waiting.",
                )
            self._waiting.append(seq)
            self._lock.notify_all()
        return seq.handle

    def _check(self, prompt: list[int], p: SamplingParams) -> None:
        if not prompt:
            raise InvalidInputError("The prompt is empty.", hint='Example: engine.encode("Once upon a time")')
        if p.max_tokens < 1:
            raise InvalidInputError(f"max_tokens must be >= 1 (got {p.max_tokens}).", hint="Example: max_tokens=64")
        if p.temperature < 0 or not 0 < p.top_p <= 1 or p.top_k < 0:
            raise InvalidInputError(
                f"Sampling needs temperature >= 0, 0 < top_p <= 1 and top_k >= 0 (got {p.temperature}, {p.top_p}, {p.top_k}).",
                hint="Example: temperature=0.8, top_p=0.95, top_k=0 (0: no top-k); temperature=0 is greedy.",
            )
        if any(not isinstance(stop, str) or not stop for stop in p.stop):
            raise InvalidInputError(
                f"Stop strings must be non-empty strings (got {list(p.stop)!r}).", hint='Example: stop=("\\n\\n", "The end")'
            )
        vocab = getattr(self, "vocab_size", None)
        if vocab and any(i < 0 or i >= vocab for i in prompt):
            raise InvalidInputError(
                f"A prompt token id is outside the vocabulary (0..{vocab - 1}).", hint="Encode text with engine.encode(text)."
            )
        if len(prompt) + p.max_tokens > self.context_length:
            raise InvalidInputError(
                f"The prompt ({len(prompt)} tokens) plus max_tokens ({p.max_tokens}) exceeds the model's context of "
                f"{self.context_length} tokens.",
                hint=f"Shorten the prompt or lower max_tokens to at most {max(0, self.context_length - len(prompt))}.",
            )

    def stats(self) -> EngineStats:
        with self._lock:
            s = self._stats
            return EngineStats(
                running=len(self._running),
                waiting=len(self._waiting),
                kv_cache_used_tokens=sum(q.length for q in self._running),
                kv_cache_capacity_tokens=s.kv_cache_capacity_tokens,
                steps=s.steps,
                prompt_tokens=s.prompt_tokens,
                generated_tokens=s.generated_tokens,
                step_log=list(self._step_log),
            )

    def add_observer(self, observer: Any) -> None:
        self._observers.append(observer)

    def _observe(self, name: str, value: float) -> None:
        for observer in self._observers:
            try:
                observer(name, value)
            except Exception:  # an observer never stops generation
                log.exception("generation observer failed")

    # --- lifecycle
    def start(self) -> None:
        with self._lock:
            if self._thread is not None:
                return
            self._stopping = False
            self._thread = threading.Thread(target=self._loop, name=f"modelpress-{self.name}-engine", daemon=True)
            self._thread.start()

    def stop(self, drain: bool = True) -> None:
        with self._lock:
            thread = self._thread
            if thread is None:
                return
            self._stopping, self._drain = True, drain
            self._lock.notify_all()
        thread.join()
        with self._lock:
            self._thread = None

    def __enter__(self) -> BatchingEngine:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop(drain=False)

    # --- the step loop
    def _loop(self) -> None:
        with torch.inference_mode():
            while True:
                with self._lock:
                    while not self._running and not self._waiting and not self._stopping:
                        self._lock.wait()
                    if self._stopping and not self._drain:
                        for seq in [*self._running, *self._waiting]:
                            self._finish(seq, "cancelled")
                        self._waiting.clear()
                    if self._stopping and not self._running and not self._waiting:
                        self._running = []
                        self._reset_batch()
                        return
                    for seq in [q for q in self._waiting if q.handle.cancelled]:
                        self._waiting.remove(seq)
                        self._finish(seq, "cancelled")
                    admit: list[_Seq] = []
                    while self._waiting and len(self._running) + len(admit) < self.max_batch_size:
                        admit.append(self._waiting.popleft())
                try:
                    self._step(admit)
                except Exception as exc:  # a failing step ends its sequences, never the loop
                    log.exception("generation step failed")
                    with self._lock:
                        for seq in [*self._running, *admit]:
                            if seq.finished is None:
                                self._finish(seq, "error", error=str(exc))
                        self._running = []
                        self._reset_batch()

    def _reset_batch(self) -> None:
        """Forget the running batch's cache (the batch is empty: stopped, or a step failed)."""
        self._kv, self._mask = [], None

    def _live(self, admit: list[_Seq]) -> list[_Seq]:
        """The admitted sequences still wanted: those cancelled while they waited are finished here."""
        live = []
        for seq in admit:
            if seq.handle.cancelled:
                self._finish(seq, "cancelled")
            else:
                live.append(seq)
        return live

    def _step(self, admit: list[_Seq]) -> None:
        live = self._live(admit)
        if live:
            logits, kv, kv_mask = self._prefill_all([q.prompt for q in live])
            for i, seq in enumerate(live):
                self._stats.prompt_tokens += len(seq.prompt)
                self._advance(seq, sample(logits[i], seq.params, seq.generator))
                self._observe("tokens", 1.0)
            self._join(live, kv, kv_mask)
        self._drop_finished()
        if not self._running:
            return
        running = list(self._running)
        tokens = torch.tensor([q.tokens[-1] for q in running], dtype=torch.long)
        positions = torch.tensor([q.length - 1 for q in running], dtype=torch.long)
        if self._mask is None:  # an invariant of the step loop, not user input
            raise ModelpressRuntimeError("generation: the step loop lost its state (_mask).")
        mask = torch.cat([self._mask, torch.ones(len(running), 1, dtype=self._mask.dtype)], 1)
        logits, self._kv = self._decode(tokens, positions, self._kv, mask)
        self._mask = mask
        with self._lock:
            self._stats.steps += 1
            self._step_log.append(tuple(q.handle.request_id for q in running))
        for i, seq in enumerate(running):
            if seq.handle.cancelled:
                self._finish(seq, "cancelled")
            else:
                self._advance(seq, sample(logits[i], seq.params, seq.generator))
        self._observe("tokens", float(len(running)))
        self._drop_finished()

    def _prefill_all(self, prompts: list[list[int]]) -> tuple[torch.Tensor, KV, torch.Tensor]:
        """Prefill the admitted prompts: alone when one, else together, left-padded to the longest
        (one pass over the weights instead of one per prompt). Logits [n, V], KV and its mask [n, L]."""
        if len(prompts) == 1:
            logits, kv = self._prefill(prompts[0])
            return logits[None], kv, torch.ones(1, len(prompts[0]), dtype=torch.long)
        size = max(len(p) for p in prompts)
        ids = torch.zeros(len(prompts), size, dtype=torch.long)
        positions = torch.zeros(len(prompts), size, dtype=torch.long)
        mask = torch.zeros(len(prompts), size, dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, size - len(p) :] = torch.tensor(p)
            positions[i, size - len(p) :] = torch.arange(len(p))
            mask[i, size - len(p) :] = 1
        logits, kv = self._prefill_padded(ids, positions, mask)
        return logits, kv, mask

    def _prefill_padded(self, ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, KV]:
        """Several left-padded prompts in one pass (logits of each row's last position); the backend's."""
        raise NotImplementedError

    def _join(self, seqs: list[_Seq], kv: KV, mask: torch.Tensor) -> None:
        """Add the still-running ones of newly prefilled sequences (rows of ``kv``/``mask``) to the
        batch: left-pad the new rows and the batch's to one length and stack them."""
        rows = [i for i, q in enumerate(seqs) if q.finished is None]
        if not rows:
            return
        if len(rows) < len(seqs):
            index = torch.tensor(rows, dtype=torch.long)
            kv, mask = [(k[index], v[index]) for k, v in kv], mask[index]
        length = mask.shape[1]
        with self._lock:
            if not self._running:
                self._kv, self._mask = kv, mask
                self._running.extend(seqs[i] for i in rows)
                return
            if self._mask is None:  # an invariant of the step loop, not user input
                raise ModelpressRuntimeError("generation: the step loop lost its state (_mask).")
            t = self._mask.shape[1]
            size = max(t, length)

            def pad(x: torch.Tensor, n: int) -> torch.Tensor:
                if n == 0:
                    return x
                return torch.cat([x.new_zeros(*x.shape[:2], n, x.shape[3]), x], 2)

            self._kv = [
                (torch.cat([pad(k, size - t), pad(nk, size - length)]), torch.cat([pad(v, size - t), pad(nv, size - length)]))
                for (k, v), (nk, nv) in zip(self._kv, kv, strict=True)
            ]
            pad_mask = torch.nn.functional.pad
            self._mask = torch.cat([pad_mask(self._mask, (size - t, 0)), pad_mask(mask, (size - length, 0))])
            self._running.extend(seqs[i] for i in rows)

    def _drop_finished(self) -> None:
        with self._lock:
            keep = [i for i, q in enumerate(self._running) if q.finished is None and not q.handle.cancelled]
            for q in self._running:
                if q.finished is None and q.handle.cancelled:
                    self._finish(q, "cancelled")
            if len(keep) == len(self._running):
                return
            self._running = [self._running[i] for i in keep]
            if not keep:
                self._kv, self._mask = [], None
                return
            if self._mask is None:  # an invariant of the step loop, not user input
                raise ModelpressRuntimeError("generation: the step loop lost its state (_mask).")
            rows = torch.tensor(keep, dtype=torch.long)
            mask = self._mask[rows]
            first = int((mask.sum(0) > 0).nonzero()[0])  # padding no remaining row needs
            self._mask = mask[:, first:]
            self._kv = [(k[rows, :, first:], v[rows, :, first:]) for k, v in self._kv]

    def _advance(self, seq: _Seq, token: int) -> None:
        """Record one sampled token: detokenize, check stops, push its event."""
        now = time.perf_counter()
        if seq.first_token_at is None:
            seq.first_token_at = now
            self._observe("ttft_s", now - seq.submitted)
        else:
            self._observe("itl_s", now - (seq.last_token_at or now))
        seq.last_token_at = now
        self._stats.generated_tokens += 1
        if token in seq.stop_ids:
            self._finish(seq, "stop", token_id=token, counted=1)
            return
        seq.tokens.append(token)
        all_ids = seq.prompt + seq.tokens
        prefix = self.decode(all_ids[seq.prefix_offset : seq.read_offset])
        full = self.decode(all_ids[seq.prefix_offset :])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            seq.text += full[len(prefix) :]
            seq.prefix_offset, seq.read_offset = seq.read_offset, len(all_ids)
        stops = seq.params.stop
        if stops:
            start = max(0, seq.sent - max(len(s) for s in stops))
            hits = [i for i in (seq.text.find(s, start) for s in stops) if i >= 0]
            if hits:
                seq.text = seq.text[: min(hits)]
                self._finish(seq, "stop", token_id=token)
                return
        if len(seq.tokens) >= seq.params.max_tokens:
            self._finish(seq, "length", token_id=token)
            return
        end = len(seq.text) - _held_back(seq.text, stops)
        piece = seq.text[seq.sent : end] if end > seq.sent else ""
        seq.sent = max(seq.sent, end)
        seq.handle.push(TokenEvent(token, piece, None, len(seq.prompt), len(seq.tokens)))

    def _finish(self, seq: _Seq, reason: FinishReason, *, token_id: int | None = None, counted: int = 0, error: str = "") -> None:
        if seq.finished is not None:
            return
        seq.finished = reason
        piece = seq.text[seq.sent :]
        seq.sent = len(seq.text)
        now = time.perf_counter()
        completion = len(seq.tokens) + counted
        result = GenerationResult(
            token_ids=list(seq.tokens),
            text=seq.text,
            finish_reason=reason,
            prompt_tokens=len(seq.prompt),
            completion_tokens=completion,
            seconds_to_first_token=None if seq.first_token_at is None else seq.first_token_at - seq.submitted,
            seconds=now - seq.submitted,
        )
        if error:
            log.warning("sequence %s ended with an error: %s", seq.handle.request_id, error)
        seq.handle.push(TokenEvent(token_id, piece, reason, len(seq.prompt), completion), result)
