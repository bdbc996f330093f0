"""The reference engine: a transformers causal LM with its KV cache (a ``DynamicCache`` built from
the batch's left-padded per-layer tensors each step), prefill + decode, continuous batching.

Every other engine is checked against it: greedy tokens equal (``tests/generation``).
"""

from __future__ import annotations

from typing import Any

import torch

from modelpress.errors import UnsupportedModelError
from modelpress.generation._core import KV, BatchingEngine
from modelpress.generation._load import ModelSource, load_tokenizer, resolve, stop_ids_of
from modelpress.runtimes.torch import hf_load_kwargs

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


class TorchEngine(BatchingEngine):
    name = "torch"

    def __init__(self, source: Any, *, dtype: str = "float32", threads: int | None = None, **options: Any) -> None:
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        if dtype not in DTYPES:
            raise UnsupportedModelError(f"Unknown dtype '{dtype}' for the torch engine.", hint=f"Use one of {sorted(DTYPES)}.")
        src = resolve(source)
        if threads:
            torch.set_num_threads(int(threads))
        if src.module is not None:
            model = src.module
        else:
            kwargs = hf_load_kwargs(src.folder)  # no remote code; pickled-only weights refused unless allowed
            model = AutoModelForCausalLM.from_pretrained(str(src.folder), dtype=DTYPES[dtype], **kwargs)
        self.model = model.eval()
        self.dtype = dtype
        self.config = model.config
        self.vocab_size = int(getattr(self.config, "vocab_size", 0) or 0)
        super().__init__(**batching_settings(src, self.config), **options)

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor, kv: KV, mask: torch.Tensor) -> tuple[torch.Tensor, KV]:
        return forward(self.model, self.config, ids, positions, kv, mask)

    def _prefill(self, ids: list[int]) -> tuple[torch.Tensor, KV]:
        x = torch.tensor([ids], dtype=torch.long)
        logits, kv = self._forward(x, torch.arange(len(ids)).unsqueeze(0), [], torch.ones_like(x))
        return logits[0], kv

    def _prefill_padded(self, ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, KV]:
        return self._forward(ids, positions, [], mask)

    def _decode(self, tokens: torch.Tensor, positions: torch.Tensor, kv: KV, mask: torch.Tensor) -> tuple[torch.Tensor, KV]:
        return self._forward(tokens.unsqueeze(1), positions.unsqueeze(1), kv, mask)


def batching_settings(src: ModelSource, config: Any) -> dict[str, Any]:
    """The step loop's settings for a model (tokenizer, context, stop ids, BOS): what every torch engine passes
    to :class:`BatchingEngine` (the tensor-parallel one too, which holds no weights in this process)."""
    from transformers import GenerationConfig

    try:
        gen_cfg = GenerationConfig.from_pretrained(str(src.folder)) if src.folder is not None else None
    except OSError:
        gen_cfg = None
    return {
        "tokenizer": load_tokenizer(src.tokenizer),
        "context_length": int(getattr(config, "max_position_embeddings", 0) or 2048),
        "stop_token_ids": stop_ids_of(config, gen_cfg),
        "bos_token_id": getattr(config, "bos_token_id", None),
        "model_name": src.name,
    }


def forward(model: Any, config: Any, ids: torch.Tensor, positions: torch.Tensor, kv: KV, mask: torch.Tensor) -> tuple[torch.Tensor, KV]:
    """One pass of a transformers causal LM over ``ids`` with the cache ``kv``: the last position's logits and the cache
    with the new positions (the tensor-parallel workers run it on their shard)."""
    from transformers import DynamicCache

    cache = DynamicCache(ddp_cache_data=kv or None, config=config)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True, logits_to_keep=1)
    new_kv: KV = [(layer.keys, layer.values) for layer in cache.layers]  # type: ignore[union-attr, misc]  # updated in place
    return out.logits[:, -1].float(), new_kv
