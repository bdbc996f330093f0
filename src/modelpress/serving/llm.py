"""Causal LMs on the server: one generation engine per served version, started and stopped with it.

``modelpress serve ../shared/data/models/stories260k`` loads the folder, sees the ``causal-lm``
task and, instead of a runner behind the dynamic batcher, creates a generation engine
(:func:`modelpress.generation.create_engine`, ``--engine torch`` by default) whose own step loop
batches sequences continuously. The version then sits in the repository like any other:
routers, rollout policies, ``/v2/models``, readiness and ``/metrics`` see it, and the OpenAI
routes of :mod:`modelpress.serving.protocols.openai_llm` send it completions and chats.

The pieces the repository expects of a version, over the engine:

* :class:`GenerationHandler`: the task and the engine (``handler.engine``); KServe v2 ``infer``
  on it answers 400 pointing at ``/v1/completions`` (generation has no tensor form here);
* :class:`EngineBatcher`: ``accepting`` (readiness), ``depth`` (waiting sequences), ``start``
  and ``drain`` (running sequences finish within the drain deadline, then the engine stops);
* :class:`EngineRunner`: ``name`` (the engine's, shown as the version's runtime) and ``close``.

Engine settings come from the model's config: ``engine`` (torch, ...), ``batching.max_batch_size``
(sequences decoded together), ``batching.max_queue_size`` (waiting sequences before 429),
``threads`` and ``runtime_options`` (passed to the engine as they are). Without ``engine``, a
folder holding a prebuilt OpenVINO decoder (what LLM quantization writes) runs on ``openvino``,
a version whose ``runtime`` names an engine (a rollout candidate loaded on the runtime its
manifest records) runs on that engine, and anything else on ``torch``.

Shadow copies (a rollout's shadow phase, :mod:`modelpress.serving.llm_shadow`): the candidate's
:meth:`EngineBatcher.infer` generates the mirrored prompts.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any, ClassVar

from modelpress.errors import InvalidInputError, ModelNotReadyError
from modelpress.serving.handlers import Handler, TensorInfo

log = logging.getLogger("modelpress.serving")

DEFAULT_ENGINE = "torch"
WARMUP_PROMPT = "Once upon a time"
WARMUP_TOKENS = 2  # one prefill and one decode step before the version reports ready
DRAIN_POLL_S = 0.02  # how often a draining version looks whether its sequences have finished
WINDOW_S = 60.0  # the dashboard's recent latencies and tokens/s cover this many seconds
MAX_SAMPLES = 20_000  # recent latency samples kept per version (bounded memory under any load)
ENGINE_RUNTIMES = ("torch", "openvino", "llamacpp", "onnxruntime")  # runtimes that name a generation engine too
GENERATE_EXAMPLE = (
    'curl -s localhost:8000/v1/completions -H "Content-Type: application/json" '
    '-d \'{"model": "stories260k", "prompt": "Once upon a time", "max_tokens": 32}\''
)


class RecentLatencies:
    """The latencies an engine reported in the last :data:`WINDOW_S` seconds (for the dashboard)."""

    def __init__(self, clock: Any = time.monotonic) -> None:
        self.clock = clock
        self.ttft: deque[tuple[float, float]] = deque(maxlen=MAX_SAMPLES)
        self.itl: deque[tuple[float, float]] = deque(maxlen=MAX_SAMPLES)
        self.lock = threading.Lock()

    def __call__(self, event: str, value: Any) -> None:
        if event in ("ttft_s", "itl_s"):
            with self.lock:
                (self.ttft if event == "ttft_s" else self.itl).append((self.clock(), float(value)))

    def summary(self, span_s: float = WINDOW_S) -> dict[str, Any]:
        since = self.clock() - span_s
        with self.lock:
            ttft = sorted(v for t, v in self.ttft if t >= since)
            itl = sorted(v for t, v in self.itl if t >= since)

        def pct(values: list[float], q: float) -> float | None:
            return 1000 * values[min(len(values) - 1, int(q * len(values)))] if values else None

        return {
            "ttft_p50_ms": pct(ttft, 0.5),
            "ttft_p99_ms": pct(ttft, 0.99),
            "itl_p50_ms": pct(itl, 0.5),
            "itl_p99_ms": pct(itl, 0.99),
            # every first token reports a ttft and every later one an itl: their count is the tokens made
            "tokens_per_s": (len(ttft) + len(itl)) / span_s,
            "sequences_started": len(ttft),
        }


class EngineRunner:
    """What the repository calls the version's runner: the engine's name, and ``close`` (stop it, forget its metrics)."""

    def __init__(self, engine: Any, forget: Any = None) -> None:
        self.engine = engine
        self.name = getattr(engine, "name", DEFAULT_ENGINE)
        self._forget = forget
        self._closed = False

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._forget is not None:
            self._forget()
        self.engine.stop(drain=False)


class GenerationHandler(Handler):
    """A served causal LM: its task (tokenizer, context) and its engine. Generation goes through the OpenAI routes."""

    kind: ClassVar[str] = "text"  # KServe v2 reads a BYTES input, then decode() answers 400 pointing at the OpenAI routes

    def __init__(self, task: Any, engine: Any, runner: EngineRunner, *, max_text_chars: int = 100_000) -> None:
        super().__init__(task, runner, max_text_chars=max_text_chars)
        self.engine = engine
        self.recent = RecentLatencies()
        engine.add_observer(self.recent)

    def decode(self, inputs: Any) -> Any:
        raise InvalidInputError(
            "This model is a causal LM: it generates text through the OpenAI routes /v1/completions and /v1/chat/completions, "
            "not through tensor inference.",
            hint=f"Example: {GENERATE_EXAMPLE}",
        )

    def collate(self, rows: list[Any]) -> Any:  # pragma: no cover - decode never lets a row through
        raise NotImplementedError

    def inputs_info(self) -> list[TensorInfo]:
        return [TensorInfo("text", "BYTES", (-1,))]

    def outputs_info(self) -> list[TensorInfo]:
        return [TensorInfo("text", "BYTES", (-1,))]

    def sample(self, n: int) -> Any:
        return [WARMUP_PROMPT] * n

    def summary(self) -> dict[str, Any]:
        """Engine stats and recent latencies (what the dashboard shows for an LLM version)."""
        s = self.engine.stats()
        cap = s.kv_cache_capacity_tokens
        return {
            "engine": getattr(self.engine, "name", DEFAULT_ENGINE),
            "context_length": getattr(self.engine, "context_length", 0),
            "running": s.running,
            "waiting": s.waiting,
            "kv_cache_used_tokens": s.kv_cache_used_tokens,
            "kv_cache_capacity_tokens": cap,
            "kv_cache_usage": s.kv_cache_used_tokens / cap if cap else 0.0,
            "steps": s.steps,
            "prompt_tokens": s.prompt_tokens,
            "generated_tokens": s.generated_tokens,
            **self.recent.summary(),
        }


class EngineBatcher:
    """The version's "batcher" over an engine: readiness, queue depth, start and drain.

    The engine batches by itself (continuous batching); this object only answers what the
    repository, the router and the health routes ask of any version.
    """

    def __init__(self, engine: Any, name: str) -> None:
        self.engine = engine
        self.name = name
        self.accepting = False

    def start(self) -> EngineBatcher:
        self.accepting = True
        return self

    @property
    def depth(self) -> int:
        return int(self.engine.stats().waiting)

    @property
    def running(self) -> int:
        return int(self.engine.stats().running)

    def retry_after(self) -> int:
        return 1

    async def infer(self, rows: list[Any], lengths: list[int] | None = None, timeout: float | None = None) -> list[Any]:
        """Generate mirrored prompts (``llm_shadow.ShadowPrompt`` rows, a rollout's shadow copies); other rows answer 400."""
        from modelpress.serving.llm_shadow import ShadowPrompt, generate_answer

        if not rows or not all(isinstance(r, ShadowPrompt) for r in rows):
            raise InvalidInputError(f"Model '{self.name}' generates text through /v1/completions.", hint=f"Example: {GENERATE_EXAMPLE}")
        self.check_accepting()
        return list(await asyncio.gather(*(generate_answer(self.engine, r) for r in rows)))

    def check_accepting(self) -> None:
        if not self.accepting:
            raise ModelNotReadyError(f"Model '{self.name}' is shutting down.", hint="Send the request again (to another replica).")

    async def drain(self, timeout: float | None = None) -> bool:
        """Take no new sequences; let the running and waiting ones finish (within ``timeout``), then stop the engine."""
        self.accepting = False
        deadline = None if timeout is None else time.monotonic() + timeout
        drained = True
        while True:
            s = self.engine.stats()
            if s.running == 0 and s.waiting == 0:
                break
            if deadline is not None and time.monotonic() > deadline:
                log.warning("%s: %d sequences still running at the drain deadline; cancelling them", self.name, s.running + s.waiting)
                drained = False
                break
            await asyncio.sleep(DRAIN_POLL_S)
        await asyncio.to_thread(self.engine.stop, drain=False)
        return drained

    async def close(self) -> None:
        await self.drain(0)


def engine_for(cfg: Any, artifact: Any) -> str:
    """The engine a version runs on: ``cfg.engine``; else openvino for a prebuilt decoder folder, the
    ``runtime`` when it names an engine, else torch."""
    if getattr(cfg, "engine", None):
        return str(cfg.engine)
    folder = getattr(artifact, "path", None) or (artifact if isinstance(artifact, str | Path) else None)
    if folder is not None and (Path(folder) / "decoder.xml").is_file():
        return "openvino"
    runtime = getattr(cfg, "runtime", None)
    return str(runtime) if runtime in ENGINE_RUNTIMES else DEFAULT_ENGINE


def decoder_precision(artifact: Any) -> str:
    """The float precision a decoder variant was evaluated with (``openvino-decoder``'s runtime options; f32 unless
    it was made with a ``precision_hint``): the engine serves it the same way."""
    manifest = getattr(artifact, "manifest", None)
    stored = ((manifest.task_config.get("runtime_options") or {}) if manifest is not None else {}).get("openvino-decoder") or {}
    return str(stored.get("precision") or "f32")


def engine_options(cfg: Any) -> dict[str, Any]:
    """The engine's keyword options from a model config (batching sizes, threads, runtime_options)."""
    options: dict[str, Any] = {"max_batch_size": cfg.batching.max_batch_size, "max_waiting": cfg.batching.max_queue_size}
    if cfg.threads:
        options["threads"] = cfg.threads
    options.update(cfg.runtime_options)
    return options


def build_generation(
    cfg: Any, artifact: Any, task: Any, name: str, version: str, metrics: Any = None
) -> tuple[GenerationHandler, EngineBatcher]:
    """Create, start and warm up the engine of one causal-LM version (blocking: a worker thread calls it)."""
    from modelpress.generation import SamplingParams, create_engine

    engine_name = engine_for(cfg, artifact)
    options = engine_options(cfg)
    path = getattr(artifact, "path", None)
    source = artifact
    if engine_name == "openvino" and path is not None and (Path(path) / "decoder.xml").is_file():
        options.setdefault("precision", decoder_precision(artifact))  # served as it was evaluated (else the engine's bf16)
        source = str(path)  # the engine reads a decoder variant from its folder (IR, engine.json, config, tokenizer)
    engine = create_engine(source, engine=engine_name, **options)
    forget = None
    if metrics is not None:
        from modelpress.serving.llm_metrics import llm_metrics

        lm = llm_metrics(metrics)
        lm.track(name, version, engine)

        def forget() -> None:
            lm.forget(name, version)

    runner = EngineRunner(engine, forget)
    handler = GenerationHandler(task, engine, runner, max_text_chars=cfg.max_text_chars)
    engine.start()
    try:
        if cfg.warmup:
            engine.generate(engine.encode(WARMUP_PROMPT), SamplingParams(max_tokens=WARMUP_TOKENS, temperature=0.0))
    except BaseException:
        runner.close()
        raise
    return handler, EngineBatcher(engine, f"{name}:{version}")


def is_generation(lv: Any) -> bool:
    return isinstance(getattr(lv, "handler", None), GenerationHandler)


__all__ = [
    "EngineBatcher",
    "EngineRunner",
    "GenerationHandler",
    "build_generation",
    "engine_for",
    "engine_options",
    "is_generation",
]
