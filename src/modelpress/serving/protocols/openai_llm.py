"""OpenAI-compatible text generation: ``POST /v1/completions`` and ``POST /v1/chat/completions``.

Served causal LMs (:mod:`modelpress.serving.llm`) answer them; ``GET /v1/models`` (in
:mod:`modelpress.serving.protocols.openai`) lists them beside the embedding models, each with
its ``task``. What is supported, as OpenAI defines it:

* ``prompt``: a string, a list of strings, a list of token ids or a list of token-id lists
  (completions); ``messages``: ``system``, ``developer`` (read as system), ``user`` and
  ``assistant`` turns, content a string or a list of text parts (chat), turned into a prompt by
  the tokenizer's chat template or, for a model without one, the default of ``docs/llm.md``;
* ``max_tokens`` (chat: also ``max_completion_tokens``; default: completions 16, chat the rest of
  the context), ``temperature`` (0: greedy), ``top_p``, ``top_k`` (an extension, as in vLLM),
  ``n`` (choice ``i`` uses ``seed + i`` when ``seed`` is given, so the choices differ and the
  same request gives the same answer), ``seed``, ``stop`` (up to 4 strings), ``user``,
  ``ignore_eos`` (an extension, as in vLLM: fixed-length answers for benchmarks);
* ``stream: true``: server-sent events, one ``data: {...}`` chunk per new text and per
  finished choice, ending with ``data: [DONE]``; ``stream_options.include_usage`` adds a last
  chunk with the ``usage`` and no choices;
* ``usage`` (prompt tokens counted once per prompt, completion tokens over every choice) and
  ``finish_reason``: ``stop`` (a stop id or string), ``length`` (``max_tokens`` reached);
  ``abort`` when the server stopped the sequence (it was shutting down).

Request bodies are pydantic models (``extra`` keys rejected, as OpenAI does): every bad value
answers 400 in OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``; an unknown
model 404; a full generation queue 429 with ``Retry-After``; a model that is shutting down 503.
A client that disconnects (streaming or not) cancels its sequences at the engine's next step.
Penalties, ``logit_bias``, ``logprobs`` and ``echo`` are accepted only at their neutral values.

Rollouts: the latency a request reports to the request observers (rollout windows, the A/B
report, the dashboard) is its time to first token (an error: the time until it failed); when
the routing decision mirrors, the answered request is copied to the candidate
(:mod:`modelpress.serving.llm_shadow`).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import Response, StreamingResponse

from modelpress.errors import InvalidInputError, ModelpressError
from modelpress.serving.http import dumps, error_body, error_response, info_of, json_response, message_of, status_for
from modelpress.serving.protocols.openai_llm_schema import (
    DEFAULT_COMPLETION_TOKENS,
    ChatMessage,
    ChatRequest,
    CompletionRequest,
    Sampling,
)
from modelpress.serving.routing import RequestContext

router = APIRouter(tags=["OpenAI"])
CLIENT_CLOSED = 499  # the status recorded for a request whose client disconnected before the answer
SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}
FINISH = {"stop": "stop", "length": "length", "cancelled": "abort", "error": "error"}


# -- the shared path ---------------------------------------------------------------------------
class _Call:
    """One request on its way: the version it went to, its engine, and its submitted sequences."""

    def __init__(self, request: Request, body: Sampling) -> None:
        from modelpress.serving.llm import is_generation

        self.request = request
        self.server = request.app.state.server
        self.info = info_of(request)
        self.server.check_inference_key(request)
        body.check_supported()
        ctx = RequestContext(self.info.request_id, self.info.protocol, request.headers)
        self.lv, self.decision = self.server.repository.route(body.model, None, ctx)
        self.info.model, self.info.version = self.lv.name, self.lv.version
        if not is_generation(self.lv):
            raise InvalidInputError(
                f"Model '{body.model}' is a {self.lv.task} model; text generation needs a causal LM.",
                hint="Pick a model whose task is causal-lm in GET /v1/models.",
            )
        self.lv.batcher.check_accepting()
        self.engine = self.lv.handler.engine
        self.max_chars = self.lv.config.max_text_chars
        self.body = body
        self.handles: list[Any] = []
        self.ended: set[int] = set()  # choices whose end has been counted
        self.started = time.perf_counter()
        self.first_token_at: float | None = None
        self.tokens: dict[int, list[int]] = {}  # each choice's first tokens (what a shadow copy is compared with)
        self.shadow_prompts: list[Any] = []  # serving.llm.ShadowPrompt per prompt, set by the route
        self.created = int(time.time())

    def check_text(self, text: str, what: str) -> None:
        if len(text) > self.max_chars:
            raise InvalidInputError(
                f"{what} has {len(text):,} characters; this model accepts at most {self.max_chars:,}.",
                hint="Send a shorter text, or raise max_text_chars in the model's serve config.",
            )

    def params(self, index: int, max_tokens: int) -> Any:
        from modelpress.generation import SamplingParams

        b = self.body
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=b.temperature,
            top_p=b.top_p,
            top_k=b.top_k,
            seed=None if b.seed is None else b.seed + index,
            stop=b.stop_strings(),
            stop_token_ids=() if b.ignore_eos else None,
        )

    def submit(self, prompts: Sequence[list[int]], max_tokens: Sequence[int]) -> None:
        """Submit ``n`` sequences per prompt; if the engine refuses one (full queue, too long), none stays."""
        try:
            for p, ids in enumerate(prompts):
                for j in range(self.body.n):
                    rid = f"{self.info.request_id}-{p * self.body.n + j}"
                    self.handles.append(self.engine.submit(ids, self.params(j, max_tokens[p]), request_id=rid))
        except BaseException:
            self.cancel()
            raise

    def cancel(self) -> None:
        """Cancel every sequence that has not finished (counted as cancelled: nobody reads their last event)."""
        for i, h in enumerate(self.handles):
            if i not in self.ended:
                self.ended.add(i)
                h.cancel()
                self.finished("cancelled")

    async def events(self) -> AsyncIterator[tuple[int, Any]]:
        """(choice index, event) of every sequence as they come; cancels the unfinished ones when left early."""
        queue: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()

        async def pump(i: int, handle: Any) -> None:
            try:
                async for event in handle.aiter():
                    queue.put_nowait((i, event))
            except (ModelpressError, RuntimeError) as exc:  # an engine failure reaches the reader
                queue.put_nowait((i, exc))

        tasks = [asyncio.create_task(pump(i, h)) for i, h in enumerate(self.handles)]
        remaining = len(tasks)
        try:
            while remaining:
                i, event = await queue.get()
                if isinstance(event, BaseException):
                    raise event
                if event.token_id is not None:
                    self._token(i, int(event.token_id))
                if event.finish_reason is not None:
                    remaining -= 1
                    if i not in self.ended:
                        self.ended.add(i)
                        self.finished(event.finish_reason)
                yield i, event
        finally:
            self.cancel()
            for t in tasks:
                t.cancel()

    def _token(self, i: int, token_id: int) -> None:
        from modelpress.serving.llm_shadow import SHADOW_MAX_TOKENS

        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        tokens = self.tokens.setdefault(i, [])
        if len(tokens) < SHADOW_MAX_TOKENS:
            tokens.append(token_id)

    def shadow_prompt(self, max_tokens: int, *, ids: Sequence[int] | None = None, text: str | None = None, messages: Any = None) -> None:
        """Remember one prompt as a shadow copy sends it (the client's sampling, fewer tokens; scored when greedy)."""
        from modelpress.serving.llm_shadow import SHADOW_MAX_TOKENS, ShadowPrompt

        msgs = tuple((m["role"], m["content"]) for m in messages) if messages is not None else None
        params = self.params(0, min(max_tokens, SHADOW_MAX_TOKENS))
        self.shadow_prompts.append(ShadowPrompt(params, None if ids is None else tuple(ids), text, msgs, self.body.temperature == 0))

    def mirror(self) -> None:
        """The shadow copies the routing decision asks for, once the client has its answer (never waited for)."""
        from modelpress.serving.llm_shadow import GenerationAnswer, send_copies

        if self.decision.mirrors:
            ttft = None if self.first_token_at is None else self.first_token_at - self.started
            n = self.body.n
            primary = [GenerationAnswer(list(self.tokens.get(i * n, [])), ttft, scored=p.scored) for i, p in enumerate(self.shadow_prompts)]
            send_copies(self.server, self.lv, self.decision, self.shadow_prompts, primary)

    def finished(self, reason: str) -> None:
        from modelpress.serving.llm_metrics import llm_metrics

        llm_metrics(self.server.metrics).finish(self.lv.name, self.lv.version, reason)

    def observe(self, ok: bool) -> None:
        """Tell the request observers (metrics, a rollout's observations) how this request went: the latency
        of an answered request is its time to first token, of a failed one the time until it failed."""
        end = self.first_token_at if ok and self.first_token_at is not None else time.perf_counter()
        seconds = end - self.started
        for observer in self.server.request_observers:
            observer(self.lv.name, self.lv.version, seconds, ok, self.info.request_id if ok else None)

    async def collect(self) -> dict[int, dict[str, Any]] | None:
        """Every choice's text, finish reason and token count; None (all cancelled) when the client went away."""
        out: dict[int, dict[str, Any]] = {i: {"text": [], "finish_reason": None, "tokens": 0} for i in range(len(self.handles))}
        watcher = asyncio.create_task(_disconnected(self.request))
        reader = asyncio.create_task(self._read_all(out))
        try:
            done, _ = await asyncio.wait({watcher, reader}, return_when=asyncio.FIRST_COMPLETED)
            if reader not in done:  # the client left: stop its sequences at the next step
                self.cancel()
                reader.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await reader
                return None
            reader.result()
            return out
        finally:
            watcher.cancel()
            self.cancel()

    async def _read_all(self, out: dict[int, dict[str, Any]]) -> None:
        async for i, event in self.events():
            choice = out[i]
            choice["text"].append(event.text)
            if event.finish_reason is not None:
                choice["finish_reason"] = event.finish_reason
                choice["tokens"] = event.completion_tokens

    def usage(self, prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens}

    def stream(self, chunk: Any, first: Any, prompt_tokens: int) -> StreamingResponse:
        """The SSE answer: ``first(i)`` chunks (chat: the role), then ``chunk(i, text, finish)``, then usage and [DONE]."""
        include_usage = bool(self.body.stream_options and self.body.stream_options.include_usage)

        async def body() -> AsyncIterator[bytes]:
            completion_tokens = 0
            ok = False
            try:
                for i in range(len(self.handles)):
                    if first is not None:
                        yield _sse(first(i) | ({"usage": None} if include_usage else {}))
                async for i, event in self.events():
                    finish = event.finish_reason
                    if finish == "error":
                        yield _sse(
                            _error_doc(500, f"Generation failed (request id {self.info.request_id}); the server log has the details.")
                        )
                        yield b"data: [DONE]\n\n"
                        return
                    if event.text or finish is not None:
                        yield _sse(
                            chunk(i, event.text, FINISH.get(finish) if finish else None) | ({"usage": None} if include_usage else {})
                        )
                    if finish is not None:
                        completion_tokens += event.completion_tokens
                if include_usage:
                    yield _sse(first_or_chunk_usage(chunk, self.usage(prompt_tokens, completion_tokens)))
                yield b"data: [DONE]\n\n"
                ok = True
                self.mirror()
            except ModelpressError as exc:
                yield _sse(_error_doc(status_for(exc), message_of(exc)))
                yield b"data: [DONE]\n\n"
            finally:
                self.cancel()
                self.observe(ok)

        return StreamingResponse(body(), media_type="text/event-stream", headers=SSE_HEADERS)


def first_or_chunk_usage(chunk: Any, usage: dict[str, int]) -> dict[str, Any]:
    """The last chunk of ``stream_options.include_usage``: no choices, the usage."""
    doc = chunk(0, "", None)
    doc["choices"] = []
    doc["usage"] = usage
    return doc


def _sse(doc: Any) -> bytes:
    return b"data: " + dumps(doc) + b"\n\n"


def _error_doc(status: int, message: str) -> Any:
    import orjson

    return orjson.loads(error_body("openai", status, message))


async def _disconnected(request: Request) -> None:
    """Return when the client closes the connection (the body has been read already)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def _fail(exc: ModelpressError, request: Request) -> Response:
    return error_response(exc, "openai")


# -- /v1/completions ---------------------------------------------------------------------------
def _prompt_ids(call: _Call, prompt: Any) -> list[list[int]]:
    if isinstance(prompt, str):
        prompt = [prompt]
    if prompt and isinstance(prompt[0], int):
        prompt = [prompt]
    out = []
    for i, p in enumerate(prompt):
        if isinstance(p, str):
            call.check_text(p, f"Prompt {i}")
            out.append(call.engine.encode(p))
        else:
            out.append([int(t) for t in p])
    return out


def _shadow_prompts(call: _Call, prompt: Any, max_tokens: int) -> None:
    """What a shadow copy of this completion sends: texts as texts (the candidate encodes them), ids as ids."""
    if call.decision.mirrors:
        for p in [prompt] if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)) else prompt:
            call.shadow_prompt(max_tokens, **({"text": p} if isinstance(p, str) else {"ids": p}))


@router.post("/v1/completions", summary="Text completion (OpenAI)", response_model=None)
async def completions(request: Request, body: CompletionRequest) -> Response:
    try:
        call = _Call(request, body)
        prompts = _prompt_ids(call, body.prompt)
        max_tokens = body.max_tokens or DEFAULT_COMPLETION_TOKENS
        call.submit(prompts, [max_tokens] * len(prompts))
        _shadow_prompts(call, body.prompt, max_tokens)
    except ModelpressError as exc:
        return _fail(exc, request)
    prompt_tokens = sum(len(p) for p in prompts)
    rid, model = f"cmpl-{call.info.request_id}", call.lv.name

    def chunk(i: int, text: str, finish: str | None) -> dict[str, Any]:
        choice = {"index": i, "text": text, "logprobs": None, "finish_reason": finish}
        return {"id": rid, "object": "text_completion", "created": call.created, "model": model, "choices": [choice]}

    if body.stream:
        return call.stream(chunk, None, prompt_tokens)
    return await _answer(call, prompt_tokens, lambda i, c: chunk(i, "".join(c["text"]), FINISH[c["finish_reason"]])["choices"][0])


async def _answer(call: _Call, prompt_tokens: int, choice: Any) -> Response:
    """The non-streamed answer: every choice, the usage; a failed sequence answers 500 in OpenAI's shape."""
    ok = False
    try:
        out = await call.collect()
        if out is None:  # nobody to answer; the access log and metrics show 499 (nginx's "client closed request")
            return Response(status_code=CLIENT_CLOSED)
        if any(c["finish_reason"] == "error" for c in out.values()):
            raise RuntimeError("a sequence failed in the engine")
        doc = {
            "choices": [choice(i, c) for i, c in sorted(out.items())],
            "usage": call.usage(prompt_tokens, sum(c["tokens"] for c in out.values())),
        }
        ok = True
        call.mirror()
    except ModelpressError as exc:
        return _fail(exc, call.request)
    except RuntimeError as exc:
        return _fail_500(call, exc)
    finally:
        call.observe(ok)
    first = doc["choices"][0]
    head = {"id": "", "object": "", "created": call.created, "model": call.lv.name}
    if "message" in first:
        head.update(id=f"chatcmpl-{call.info.request_id}", object="chat.completion", system_fingerprint=None)
    else:
        head.update(id=f"cmpl-{call.info.request_id}", object="text_completion")
    return json_response(head | doc)


def _fail_500(call: _Call, exc: BaseException) -> Response:
    import logging

    logging.getLogger("modelpress.serving").error("generation failed (request id %s): %s", call.info.request_id, exc)
    message = f"Generation failed (request id {call.info.request_id}); the server log has the details."
    return Response(error_body("openai", 500, message), 500, media_type="application/json")


# -- /v1/chat/completions ----------------------------------------------------------------------
@router.post("/v1/chat/completions", summary="Chat completion (OpenAI)", response_model=None)
async def chat_completions(request: Request, body: ChatRequest) -> Response:
    try:
        call = _Call(request, body)
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages]
        call.check_text("".join(m["content"] for m in messages), "The conversation")
        ids = call.engine.apply_chat_template(messages)
        limit = body.max_completion_tokens or body.max_tokens
        context = int(getattr(call.engine, "context_length", 0) or 0)
        max_tokens = limit if limit is not None else max(1, context - len(ids))
        call.submit([ids], [max_tokens])
        if call.decision.mirrors:
            call.shadow_prompt(max_tokens, messages=messages)
    except ModelpressError as exc:
        return _fail(exc, request)
    rid, model = f"chatcmpl-{call.info.request_id}", call.lv.name

    def head() -> dict[str, Any]:
        return {"id": rid, "object": "chat.completion.chunk", "created": call.created, "model": model, "system_fingerprint": None}

    def first(i: int) -> dict[str, Any]:
        delta = {"role": "assistant", "content": ""}
        return head() | {"choices": [{"index": i, "delta": delta, "logprobs": None, "finish_reason": None}]}

    def chunk(i: int, text: str, finish: str | None) -> dict[str, Any]:
        delta = {"content": text} if text else {}
        return head() | {"choices": [{"index": i, "delta": delta, "logprobs": None, "finish_reason": finish}]}

    if body.stream:
        return call.stream(chunk, first, len(ids))

    def choice(i: int, c: dict[str, Any]) -> dict[str, Any]:
        message = {"role": "assistant", "content": "".join(c["text"])}
        return {"index": i, "message": message, "logprobs": None, "finish_reason": FINISH[c["finish_reason"]]}

    return await _answer(call, len(ids), choice)


__all__ = ["ChatMessage", "ChatRequest", "CompletionRequest", "router"]
