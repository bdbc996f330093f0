"""llama.cpp behind our interface: the model converted to GGUF (:mod:`.gguf_convert`, cached),
run by llama-cpp-python's low-level API (``pip install 'modelpress[llamacpp]'``, an optional
extra: it builds llama.cpp from source).

Continuous batching is llama.cpp's own: one ``llama_context`` with ``n_seq_max`` = the batch
size and one KV stream per sequence slot (``kv_unified=False``: each slot holds a whole context).
Every step is one ``llama_decode`` of a ``llama_batch`` carrying each running sequence's next
token (its own ``seq_id`` and position) and the whole prompt of each admitted request (logits of
its last position only); a sequence that finishes or is cancelled has its cells removed
(``llama_memory_seq_rm``) and its slot reused. Tokenization (the Hugging Face tokenizer: ids
are passed), sampling, stop strings and ids, seeds, streaming, the step log and the bounded
queue are the shared ones of :mod:`._core`: logits come back per sequence
(``llama_get_logits_ith``) to the same sampler as every other engine's.

``quantize``: ``"q8_0"`` (default; ``"int8"`` is an alias), ``"q4_0"`` (``"int4"``), ``"f16"``
or None (f32 weights and an f32 KV cache: greedy tokens equal the torch reference). llama.cpp's
log lines go to the ``modelpress.generation.llamacpp`` logger (errors as warnings, the rest at
debug), never to stderr.
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
import time
import weakref
from pathlib import Path
from typing import Any

import numpy as np
import torch

from modelpress.errors import BackendUnavailableError, ConfigError, ModelpressError, UnsupportedModelError, require
from modelpress.generation._core import BatchingEngine, _Seq, sample
from modelpress.generation._load import load_tokenizer, resolve, stop_ids_of
from modelpress.generation.gguf_convert import cached_gguf, check_supported, normalize_quantize

log = logging.getLogger("modelpress.generation.llamacpp")

N_BATCH = 512  # tokens per llama_decode call: a longer step (long prompts) is split into calls
_GGML_LOG_ERROR = 4  # ggml.h: NONE 0, DEBUG 1, INFO 2, WARN 3, ERROR 4, CONT 5
_init_lock = threading.Lock()
_log_callback: Any = None  # kept alive: llama.cpp holds a pointer to it


def available() -> bool:
    from importlib.util import find_spec

    return find_spec("llama_cpp") is not None and find_spec("gguf") is not None


def supported(source: Any) -> bool:
    """Whether ``source`` is a model folder this engine converts (a Llama-architecture decoder)."""
    try:
        src = resolve(source)
        if src.folder is None:
            return False
        check_supported(src.folder)
    except (ModelpressError, OSError, ValueError):
        return False
    return True


def _lib() -> Any:
    """llama_cpp's low-level module, its backend initialised once and its logging routed to ours."""
    global _log_callback
    llama_cpp = require("llama_cpp", "llamacpp")
    with _init_lock:
        if _log_callback is None:

            def forward(level: int, text: bytes, _user: Any) -> None:
                line = text.decode("utf-8", "replace").rstrip()
                if line:
                    log.log(logging.WARNING if level == _GGML_LOG_ERROR else logging.DEBUG, "%s", line)

            _log_callback = llama_cpp.llama_log_callback(forward)
            llama_cpp.llama_log_set(_log_callback, ctypes.c_void_p(0))
            llama_cpp.llama_backend_init()
    return llama_cpp


def _free(lib: Any, ctx: Any, model: Any, batch: Any) -> None:
    if batch is not None:
        lib.llama_batch_free(batch)
    if ctx is not None:
        lib.llama_free(ctx)
    if model is not None:
        lib.llama_model_free(model)


class LlamaCppEngine(BatchingEngine):
    name = "llamacpp"

    def __init__(
        self,
        source: Any,
        *,
        quantize: str | None = "q8_0",
        threads: int | None = None,
        cache_dir: str | os.PathLike | None = None,
        gguf_path: str | os.PathLike | None = None,
        **options: Any,
    ) -> None:
        lib = _lib()
        require("gguf", "llamacpp")
        src = resolve(source)
        if src.folder is None:
            raise UnsupportedModelError(
                f"The llamacpp engine converts a Hugging Face model folder; '{src.name}' is only in memory.",
                hint="Save it with model.save_pretrained(DIR) and pass DIR, or use engine='torch'.",
            )
        self.quantize = normalize_quantize(quantize)
        from transformers import AutoConfig, GenerationConfig

        config = AutoConfig.from_pretrained(str(src.folder), trust_remote_code=False)
        t0 = time.perf_counter()
        self.gguf_path = Path(gguf_path) if gguf_path else cached_gguf(src.folder, self.quantize, cache_dir)
        self.export_seconds = time.perf_counter() - t0
        max_batch_size = max(1, int(options.get("max_batch_size", 8)))
        if max_batch_size > int(lib.llama_max_parallel_sequences()):
            raise ConfigError(
                f"max_batch_size {max_batch_size} exceeds llama.cpp's {lib.llama_max_parallel_sequences()} sequences.",
                hint="Example: create_engine(path, 'llamacpp', max_batch_size=8)",
            )
        model_ctx = int(getattr(config, "max_position_embeddings", 0) or 2048)
        self.threads = int(threads or os.cpu_count() or 1)

        mparams = lib.llama_model_default_params()
        mparams.n_gpu_layers = 0
        model = lib.llama_model_load_from_file(str(self.gguf_path).encode(), mparams)
        if not model:
            raise BackendUnavailableError(
                f"llama.cpp could not load '{self.gguf_path}'.",
                hint="Delete the file so it is converted again, or use engine='openvino'.",
            )
        cparams = lib.llama_context_default_params()
        cparams.n_ctx = model_ctx * max_batch_size
        cparams.n_batch = cparams.n_ubatch = min(N_BATCH, cparams.n_ctx)
        cparams.n_seq_max = max_batch_size
        cparams.kv_unified = False  # one stream per slot: every sequence has its whole context
        cparams.n_threads = cparams.n_threads_batch = self.threads
        cparams.no_perf = True
        if self.quantize is None:  # f32 weights: an f32 cache too, so greedy tokens equal the reference's
            cparams.type_k = cparams.type_v = lib.GGML_TYPE_F32
        ctx = lib.llama_init_from_model(model, cparams)
        if not ctx:
            lib.llama_model_free(model)
            raise BackendUnavailableError(
                f"llama.cpp could not create a context of {cparams.n_ctx} tokens for '{self.gguf_path}'.",
                hint="Lower max_batch_size (each sequence slot holds a whole context).",
            )
        self._lib, self._model, self._ctx = lib, model, ctx
        self._batch = lib.llama_batch_init(N_BATCH, 0, 1)
        self._finalizer = weakref.finalize(self, _free, lib, ctx, model, self._batch)
        self._memory = lib.llama_get_memory(ctx)
        self.n_vocab = int(lib.llama_vocab_n_tokens(lib.llama_model_get_vocab(model)))
        self.vocab_size = int(getattr(config, "vocab_size", 0) or self.n_vocab)
        per_seq = int(lib.llama_n_ctx_seq(ctx)) if hasattr(lib, "llama_n_ctx_seq") else model_ctx
        self._slots: dict[int, int] = {}  # id(seq) -> its llama.cpp seq_id
        self._free_slots = list(range(max_batch_size - 1, -1, -1))
        try:
            gen_cfg = GenerationConfig.from_pretrained(str(src.folder))
        except OSError:
            gen_cfg = None
        super().__init__(
            tokenizer=load_tokenizer(src.tokenizer),
            context_length=min(model_ctx, per_seq),
            stop_token_ids=stop_ids_of(config, gen_cfg),
            bos_token_id=getattr(config, "bos_token_id", None),
            model_name=src.name,
            **options,
        )
        self._stats.kv_cache_capacity_tokens = int(lib.llama_n_ctx(ctx))

    def close(self) -> None:
        """Stop the step loop and free llama.cpp's model and context (also done when the engine is collected)."""
        self.stop(drain=False)
        self._finalizer()

    # --- the step: one llama_decode for every running sequence's next token and every admitted prompt
    def _step(self, admit: list[_Seq]) -> None:
        live = self._live(admit)
        self._drop_finished()
        running = list(self._running)
        if not running and not live:
            return
        entries: list[tuple[int, int, int, bool]] = []  # (token, position, seq_id, logits wanted)
        for seq in running:
            entries.append((seq.tokens[-1], seq.length - 1, self._slots[id(seq)], True))
        for seq in live:
            slot = self._free_slots.pop()
            self._slots[id(seq)] = slot
            n = len(seq.prompt)
            entries.extend((t, i, slot, i == n - 1) for i, t in enumerate(seq.prompt))
        with self._lock:  # in the batch now: their slots are released by _drop_finished
            self._running.extend(live)
        logits = self._run(entries)
        with self._lock:
            self._stats.steps += 1
            self._step_log.append(tuple(q.handle.request_id for q in [*running, *live]))
        for i, seq in enumerate([*running, *live]):
            if i >= len(running):
                self._stats.prompt_tokens += len(seq.prompt)
            if seq.handle.cancelled:
                self._finish(seq, "cancelled")
            else:
                self._advance(seq, sample(logits[i], seq.params, seq.generator))
        self._observe("tokens", float(len(running) + len(live)))
        self._drop_finished()

    def _run(self, entries: list[tuple[int, int, int, bool]]) -> list[torch.Tensor]:
        """``llama_decode`` over ``entries`` in calls of at most N_BATCH tokens; the logits of the wanted ones, in order."""
        lib, batch, out = self._lib, self._batch, []
        for start in range(0, len(entries), N_BATCH):
            chunk = entries[start : start + N_BATCH]
            for j, (token, pos, slot, want) in enumerate(chunk):
                batch.token[j] = token
                batch.pos[j] = pos
                batch.n_seq_id[j] = 1
                batch.seq_id[j][0] = slot
                batch.logits[j] = 1 if want else 0
            batch.n_tokens = len(chunk)
            rc = lib.llama_decode(self._ctx, batch)
            if rc != 0:
                raise BackendUnavailableError(
                    f"llama_decode failed (code {rc}{': no room in the KV cache' if rc == 1 else ''}).",
                    hint="Retry the request; lower max_batch_size or max_tokens if it persists.",
                )
            for j, (*_, want) in enumerate(chunk):
                if want:
                    ptr = lib.llama_get_logits_ith(self._ctx, j)
                    out.append(torch.from_numpy(np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy()))
        return out

    def _drop_finished(self) -> None:
        with self._lock:
            for q in self._running:
                if q.finished is None and q.handle.cancelled:
                    self._finish(q, "cancelled")
            gone = [q for q in self._running if q.finished is not None]
            if not gone:
                return
            self._running = [q for q in self._running if q.finished is None]
            for q in gone:  # under the lock: a reader of stats() sees their slots free with them gone
                slot = self._slots.pop(id(q), None)
                if slot is not None:
                    self._lib.llama_memory_seq_rm(self._memory, slot, -1, -1)
                    self._free_slots.append(slot)

    def _reset_batch(self) -> None:
        super()._reset_batch()
        self._lib.llama_memory_clear(self._memory, True)
        self._slots.clear()
        self._free_slots = list(range(self.max_batch_size - 1, -1, -1))
