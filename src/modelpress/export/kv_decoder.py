"""A Llama-style decoder as one traceable graph with an explicit KV cache, for the exporters of
generation engines (the OpenVINO engine's IR; the ONNX export with past keys and values).

The graph uses the transformers model's own modules (embeddings, norms, projections, MLPs, rotary
embedding): only attention is spelled out, so the cache is plain tensors in and out and the graph
has no Python control flow::

    (input_ids [B,S], position_ids [B,S], attention_mask [B,T+S], past_k, past_v [B, layers*kv_heads, T, head_dim])
        -> (logits of the last position [B, vocab], new_k, new_v [B, layers*kv_heads, S, head_dim])

(``all_logits=True``: logits of every new position, ``[B, S, vocab]``.)

Grouped-query attention is computed per KV head with the queries of its group stacked
(``[B, kv_heads, group*S, head_dim]``) instead of repeating the keys and values ``group`` times:
the repeat copies the whole cache ``group`` times per layer and step, which at batch 8 costs more
than the attention itself (measured in ``benchmarks/llm_bench.py``; see docs/llm.md).
"""

from __future__ import annotations

from typing import Any

import torch

from modelpress.export.decoder_spec import INPUT_NAMES, OUTPUT_NAMES, SUPPORTED_TYPES

__all__ = ["INPUT_NAMES", "OUTPUT_NAMES", "SUPPORTED_TYPES", "KVDecoder"]


class KVDecoder(torch.nn.Module):
    """The export graph: one forward over new tokens given the cache of earlier ones."""

    def __init__(self, hf_model: Any, *, all_logits: bool = False) -> None:
        super().__init__()
        # all_logits: the logits of every new position ([B, S, vocab]), for perplexity on the same
        # graph that generates; else only the last position's ([B, vocab]), the cheap prefill
        self.all_logits = all_logits
        cfg = hf_model.config
        self.inner = hf_model.model
        self.lm_head = hf_model.lm_head
        self.layers = len(self.inner.layers)
        attn = self.inner.layers[0].self_attn
        self.head_dim = int(attn.head_dim)
        self.heads = int(cfg.num_attention_heads)
        self.kv_heads = int(getattr(cfg, "num_key_value_heads", None) or self.heads)
        self.scaling = float(attn.scaling)

    @property
    def cache_heads(self) -> int:
        """The second dimension of ``past_k``/``past_v``: every layer's KV heads, layer by layer."""
        return self.layers * self.kv_heads

    def example_inputs(self) -> tuple[torch.Tensor, ...]:
        """Inputs for tracing: a batch of 2, 3 new tokens, 4 cached positions."""
        n = self.cache_heads
        return (
            torch.ones(2, 3, dtype=torch.long),
            torch.tensor([[4, 5, 6], [2, 3, 4]]),
            torch.ones(2, 7, dtype=torch.long),
            torch.zeros(2, n, 4, self.head_dim),
            torch.zeros(2, n, 4, self.head_dim),
        )

    @staticmethod
    def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return x * cos + rotated * sin

    def forward(self, input_ids, position_ids, attention_mask, past_k, past_v):
        b, s = input_ids.shape
        h = self.inner.embed_tokens(input_ids)
        cos, sin = self.inner.rotary_emb(h, position_ids)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # [B, 1, S, D]
        t = past_k.shape[2]
        # query i (absolute position t+i) sees key j when j <= t+i and the key is not padding
        keys = torch.arange(t + s).view(1, 1, 1, t + s)
        queries = (torch.arange(s) + t).view(1, 1, s, 1)
        # a padding query (left padding of a batched prefill) sees itself too: no row is empty, since an
        # empty row gives NaN, and a NaN key or value of a padding position would spoil later steps
        visible = ((keys <= queries) & attention_mask.view(b, 1, 1, t + s).bool()) | (keys == queries)
        group = self.heads // self.kv_heads
        if group > 1:  # the queries of one KV head's group, stacked: [B, 1, group*S, T+S]
            visible = visible.repeat(1, 1, group, 1)
        new_k, new_v = [], []
        for i, layer in enumerate(self.inner.layers):
            attn = layer.self_attn
            x = layer.input_layernorm(h)
            q = attn.q_proj(x).view(b, s, self.heads, self.head_dim).transpose(1, 2)
            k = attn.k_proj(x).view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
            v = attn.v_proj(x).view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
            q, k = self._rotate(q, cos, sin), self._rotate(k, cos, sin)
            lo, hi = i * self.kv_heads, (i + 1) * self.kv_heads
            new_k.append(k)
            new_v.append(v)
            k = torch.cat([past_k[:, lo:hi], k], dim=2)
            v = torch.cat([past_v[:, lo:hi], v], dim=2)
            # head j of q belongs to KV head j // group: [B, heads, S, D] -> [B, kv_heads, group*S, D]
            qg = q.reshape(b, self.kv_heads, group * s, self.head_dim)
            o = torch.nn.functional.scaled_dot_product_attention(qg, k, v, attn_mask=visible, scale=self.scaling)
            o = o.reshape(b, self.heads, s, self.head_dim)
            h = h + attn.o_proj(o.transpose(1, 2).reshape(b, s, self.heads * self.head_dim))
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        if self.all_logits:
            logits = self.lm_head(self.inner.norm(h))
        else:
            logits = self.lm_head(self.inner.norm(h[:, -1:]))[:, 0]
        return logits, torch.cat(new_k, dim=1), torch.cat(new_v, dim=1)
